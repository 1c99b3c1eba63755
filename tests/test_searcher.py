"""StudySearch (study.search.optimize.searcher): Tune's searcher on Optuna's public ask/tell, whose only state is the
Optuna storage. A resumed study is a new searcher on the same storage: RUNNING trials (their driver died)
are handed out first under their own numbers and parameters, finished ones are never asked or told again.

These drive the real searcher (a sqlite Optuna storage) through Tune's own calls (suggest,
on_trial_complete, save_to_dir) without a Ray cluster."""
from __future__ import annotations

import pickle

import optuna
import pytest
from conftest import QUICKSTART
from optuna.trial import TrialState

from study.keys import FAIL_KEY, NUMBER_KEY
from study.search.optimize.optuna_search import load_optuna_study, open_storage
from study.search.optimize.searcher import DIED, STOPPED, StudySearch
from study.search.optimize.space import load_space

N_TRIALS = 3


@pytest.fixture
def space():
    return load_space(QUICKSTART, {"study.n_trials": N_TRIALS, "study.sampler": "nsga2", "study.sampler_options": None})


@pytest.fixture
def url(tmp_path, space):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    load_optuna_study(url, space.study.name, space)  # what Study.execute does before the search
    return url


def _final(space, value, **more):
    return {**{m: value for m in space.study.metrics}, "final": 1, **more}


def _trials(space, url):
    return optuna.load_study(study_name=space.study.name, storage=open_storage(url)).get_trials(deepcopy=False)


def test_trials_are_asked_told_by_number_and_capped_at_n_trials(space, url):
    from ray.tune.search import Searcher

    searcher = StudySearch(space, url)
    configs = [searcher.suggest(f"t{i}") for i in range(N_TRIALS)]
    assert [c[NUMBER_KEY] for c in configs] == [0, 1, 2]
    assert set(configs[0]) - {NUMBER_KEY} <= set(space.keys) and "prune.keep_fraction" in configs[0]
    assert searcher.suggest("t3") == Searcher.FINISHED
    for i in range(N_TRIALS):
        searcher.on_trial_complete(f"t{i}", _final(space, 0.25 * (i + 1), val_clean_acc=0.9, ray_node_id="n1"))
    trials = _trials(space, url)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * N_TRIALS
    assert [t.values[0] for t in trials] == [0.25, 0.5, 0.75]
    assert trials[0].params == {k: v for k, v in configs[0].items() if k != NUMBER_KEY}
    assert trials[1].user_attrs["tune_trial_id"] == "t1" and trials[1].user_attrs["ray_node_id"] == "n1"
    assert trials[1].user_attrs["val_clean_acc"] == 0.9


def test_failures_are_recorded_with_their_reason(space, url):
    searcher = StudySearch(space, url, n_trials=4)
    for i in range(4):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", {"final": 1, FAIL_KEY: "the trial raised RuntimeError: out of memory"})
    searcher.on_trial_complete("t1", error=True)  # the worker died more often than max_failures allows
    searcher.on_trial_complete("t2", {"val_robust_acc": 0.5, "step": 1})  # stopped by a scheduler/stopper
    searcher.on_trial_complete("t3", _final(space, float("nan")))
    searcher.on_trial_complete("t3", _final(space, 0.5))  # told once: a second call changes nothing
    t0, t1, t2, t3 = _trials(space, url)
    assert (t0.state, t0.user_attrs[FAIL_KEY]) == (TrialState.FAIL, "the trial raised RuntimeError: out of memory")
    assert (t1.state, t1.user_attrs[FAIL_KEY]) == (TrialState.FAIL, DIED)
    assert (t2.state, t2.user_attrs["stop_reason"]) == (TrialState.PRUNED, STOPPED)
    assert t3.state == TrialState.FAIL and "not finite" in t3.user_attrs[FAIL_KEY]


def test_a_new_searcher_continues_running_trials_under_their_own_numbers(space, url):
    """The driver died with trial 0 told, trials 1 and 2 RUNNING (one training, one asked just before the
    death): a new searcher on the same storage hands out 1 and 2 first, with their parameters, and asks no
    new trial once the study holds n_trials."""
    from ray.tune.search import Searcher

    before = StudySearch(space, url)
    asked = [before.suggest(f"t{i}") for i in range(N_TRIALS)]
    before.on_trial_complete("t0", _final(space, 0.5))

    resumed = StudySearch(space, url)
    assert [resumed.suggest(f"r{i}") for i in (1, 2)] == asked[1:]
    assert resumed.suggest("r3") == Searcher.FINISHED
    for i in (1, 2):
        resumed.on_trial_complete(f"r{i}", _final(space, 0.25))
    trials = _trials(space, url)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * N_TRIALS
    assert [t.values[0] for t in trials] == [0.5, 0.25, 0.25]


def test_a_resumed_study_short_of_its_trials_asks_new_ones_and_never_retells_finished_ones(space, url):
    before = StudySearch(space, url)
    before.suggest("t0")
    before.on_trial_complete("t0", {"final": 1, FAIL_KEY: "raised"})
    before.suggest("t1")
    before.on_trial_complete("t1", _final(space, 0.5))

    resumed = StudySearch(space, url)
    assert resumed.suggest("r2")[NUMBER_KEY] == 2
    assert resumed.suggest("r3") == "FINISHED"
    trials = _trials(space, url)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.RUNNING]


def test_a_running_trial_without_all_its_parameters_is_failed_not_handed_out(space, url):
    """The driver died between study.ask() and the last suggest: that trial cannot be run as asked."""
    study = optuna.load_study(study_name=space.study.name, storage=open_storage(url))
    study.ask()  # no parameter suggested
    searcher = StudySearch(space, url)
    assert searcher.suggest("r0")[NUMBER_KEY] == 1
    first = _trials(space, url)[0]
    assert first.state == TrialState.FAIL and "parameters are incomplete" in first.user_attrs[FAIL_KEY]


def test_the_searcher_pickles_without_its_study_and_saves_nothing(tmp_path, space, url):
    """Tune pickles its searcher into the experiment folder (scratch, never read back): the pickle holds no
    Optuna study or sampler (NSGA-II's holds a lock, which pickle refuses), and Tune's snapshot of the
    searcher's state writes no file."""
    searcher = StudySearch(space, url)
    searcher.suggest("t0")
    blob = pickle.dumps(searcher)
    assert b"NSGAIISampler" not in blob and b"RDBStorage" not in blob
    searcher.save_to_dir(str(tmp_path / "snapshot"), "session")
    assert not (tmp_path / "snapshot").exists()
    with pytest.raises(RuntimeError, match="Optuna storage"):
        searcher.restore_from_dir(str(tmp_path))
