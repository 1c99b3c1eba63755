"""StudySearch (study.search.optuna_search) across a resume from an experiment snapshot that lags the driver's
death: Tune restores the searcher as it was at the snapshot, while the Optuna storage holds everything.

These drive the real searcher (Ray Tune's OptunaSearch underneath, a sqlite Optuna storage) through Tune's
own calls (suggest, on_trial_complete, save, restore) without a Ray cluster."""
from __future__ import annotations

import functools

import optuna
import pytest
from conftest import QUICKSTART
from optuna.trial import TrialState

from study.keys import NUMBER_KEY
from study.search.optuna_search import define_by_run, load_optuna_study, open_storage, searcher_class
from study.search.samplers import make_sampler
from study.search.space import load_space

N_TRIALS = 3


@pytest.fixture
def space():
    return load_space(QUICKSTART, {"study.n_trials": N_TRIALS, "study.sampler": "nsga2", "study.sampler_options": None})


def _searcher(space, url, n_trials=N_TRIALS):
    s = space.study
    load_optuna_study(url, s.name, space)
    return searcher_class()(space=functools.partial(define_by_run, space), metric=s.metrics, mode=s.modes,
                            sampler=make_sampler(space), study_name=s.name, storage=open_storage(url),
                            n_trials=n_trials)


def _final(space, value):
    return {**{m: value for m in space.study.metrics}, "final": 1}


def _restored(space, url, snapshot):
    """What `study resume` builds: a searcher from the snapshot, pointed at the study's storage."""
    searcher = _searcher(space, url, n_trials=None)
    searcher.restore(str(snapshot))
    searcher.repoint(url)
    searcher.n_trials = space.study.n_trials
    return searcher


def _optuna_trials(space, url):
    return optuna.load_study(study_name=space.study.name, storage=open_storage(url)).get_trials(deepcopy=False)


def test_a_trial_finished_after_the_snapshot_is_not_asked_again(tmp_path, space):
    from ray.tune.search import ConcurrencyLimiter, Searcher

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = _searcher(space, url)
    for i in range(2):
        assert searcher.suggest(f"t{i}")[NUMBER_KEY] == i
        searcher.on_trial_complete(f"t{i}", _final(space, 0.5))
    snapshot = tmp_path / "searcher.pkl"
    searcher.save(str(snapshot))  # Tune's last snapshot: two trials
    searcher.suggest("t2")
    searcher.on_trial_complete("t2", _final(space, 0.5))  # the third trial finished, then the driver died

    resumed = _restored(space, url, snapshot)
    limited = ConcurrencyLimiter(resumed, max_concurrent=2)  # how the resume wraps it
    assert limited.suggest("t3") == Searcher.FINISHED  # the restored Tune counted two trials and asks for a third
    trials = _optuna_trials(space, url)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * N_TRIALS


def test_a_trial_asked_after_the_snapshot_is_adopted_and_then_nothing_more_is_asked(tmp_path, space):
    from ray.tune.search import Searcher

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = _searcher(space, url)
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", _final(space, 0.5))
    snapshot = tmp_path / "searcher.pkl"
    searcher.save(str(snapshot))
    asked = [searcher.suggest(f"t{i}") for i in (1, 2)]  # asked, RUNNING when the driver died

    resumed = _restored(space, url, snapshot)
    adopted = [resumed.suggest(f"r{i}") for i in (1, 2)]
    assert adopted == asked  # the same Optuna trials, the same values: no new ask
    assert resumed.suggest("r3") == Searcher.FINISHED
    for i in (1, 2):
        resumed.on_trial_complete(f"r{i}", _final(space, 0.25))
    trials = _optuna_trials(space, url)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * N_TRIALS
    assert trials[2].values == [0.25] * len(space.study.metrics)


def test_a_study_short_of_its_trials_asks_new_ones(tmp_path, space):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = _searcher(space, url)
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", None, error=True)  # a failed trial counts as asked
    snapshot = tmp_path / "searcher.pkl"
    searcher.save(str(snapshot))

    resumed = _restored(space, url, snapshot)
    assert [resumed.suggest(f"r{i}")[NUMBER_KEY] for i in (1, 2)] == [1, 2]
    assert resumed.suggest("r3") == "FINISHED"
    assert [t.state for t in _optuna_trials(space, url)] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]


def _tune_snapshot(folder, trials):
    """Tune's experiment snapshot beside the searcher's state, written with Ray's own trial serializer:
    `trials` = [(Tune trial id, Optuna trial number, Tune status)]."""
    import json

    from ray.tune.experiment import Trial

    data = []
    for trial_id, number, status in trials:
        trial = Trial("study_trainable", config={NUMBER_KEY: number}, trial_id=trial_id, stub=True)
        trial.set_status(status)
        data.append(list(trial.get_json_state()))
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": data}))


@pytest.mark.parametrize("state", ["empty", "stale"])
def test_tunes_restored_trials_are_claimed_when_the_searchers_state_is_unreadable_or_stale(tmp_path, space, state):
    """The driver died while Tune copied its snapshot into the study folder: the searcher's pickle is empty
    (seen: a SIGKILL right after a trial completed), or older than the experiment state beside it. Restoring
    must not raise (Tune would restart the experiment and wait forever), and the trial Tune reruns keeps
    its Optuna trial: a new Tune trial does not adopt it as an orphan, and its result is told to Optuna."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = _searcher(space, url)
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", _final(space, 0.5))
    snapshot = tmp_path / "searcher-state-2026-01-01_00-00-00.pkl"
    searcher.save(str(snapshot))  # knows t0 only
    assert searcher.suggest("t1")[NUMBER_KEY] == 1  # t1 trains when the driver dies
    _tune_snapshot(tmp_path, [("t0", 0, "TERMINATED"), ("t1", 1, "RUNNING")])
    if state == "empty":
        snapshot.write_bytes(b"")

    resumed = _restored(space, url, snapshot)
    assert resumed.suggest("t2")[NUMBER_KEY] == 2  # a new trial; Optuna trial 1 belongs to Tune's rerun of t1
    resumed.on_trial_complete("t1", _final(space, 0.25))
    resumed.on_trial_complete("t2", _final(space, 0.75))
    trials = _optuna_trials(space, url)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * N_TRIALS
    assert [t.values[0] for t in trials] == [0.5, 0.25, 0.75]


def test_a_trial_tunes_snapshot_lost_is_adopted_by_the_next_new_trial(tmp_path, space):
    """The searcher's state is newer than Tune's snapshot (the copy of experiment_state was killed, the
    searcher's was not): the searcher knows a Tune trial that the restored Tune will never run. Its Optuna
    trial, still RUNNING, goes to the next trial Tune creates instead of staying RUNNING until it is failed."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = _searcher(space, url)
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", _final(space, 0.5))
    asked = searcher.suggest("t1")  # RUNNING when the driver dies
    snapshot = tmp_path / "searcher-state-2026-01-01_00-00-00.pkl"
    searcher.save(str(snapshot))  # knows t0 and t1
    _tune_snapshot(tmp_path, [("t0", 0, "TERMINATED")])  # Tune's older snapshot: t0 only

    resumed = _restored(space, url, snapshot)
    assert resumed.suggest("r1") == asked  # adopted: the same Optuna trial and values, no new ask
    assert resumed.suggest("r2")[NUMBER_KEY] == 2
    for trial_id in ("r1", "r2"):
        resumed.on_trial_complete(trial_id, _final(space, 0.25))
    assert [t.state for t in _optuna_trials(space, url)] == [TrialState.COMPLETE] * N_TRIALS
