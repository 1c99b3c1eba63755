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
