"""Multi-fidelity for a front (study.early_stop): the rung rule against an independent dominance count, the
Tune scheduler's bookkeeping, and a real study whose dominated trials end PRUNED in Optuna, Tune and MLflow."""
from __future__ import annotations

import functools
import random
import sys
from types import SimpleNamespace

import pytest
from conftest import QUICKSTART, FakeResult, fake_pretrain, mlflow_trial_runs
from ray.tune.schedulers import TrialScheduler

from study.errors import ConfigError
from study.search.optimize.rung_scheduler import RungScheduler
from study.search.optimize.rungs import RungRule, parse_rungs
from study.search.optimize.space import load_space


def reference_count(point, others, modes):
    """How many of `others` dominate `point`, written out per mode (no sign trick)."""
    n = 0
    for o in others:
        no_worse = all((a <= b) if m == "min" else (a >= b) for a, b, m in zip(o, point, modes))
        better = any((a < b) if m == "min" else (a > b) for a, b, m in zip(o, point, modes))
        n += no_worse and better
    return n


@pytest.mark.parametrize("modes", [("min", "max"), ("max", "max"), ("min", "min", "max")])
def test_rule_matches_an_independent_dominance_count(modes):
    rng = random.Random(0)
    levels = [0.0, 0.25, 0.5, 1.0]  # few levels: many ties, equal points (which never dominate)
    for _ in range(400):
        k = rng.randint(1, 4)
        rule = RungRule((2, 4), k)
        point = tuple(rng.choice(levels) for _ in modes)
        others = [tuple(rng.choice(levels) for _ in modes) for _ in range(rng.randint(0, 8))]
        expected = reference_count(point, others, modes) >= k
        assert rule.stops_point(2, point, others, modes) == expected
        assert rule.stops_point(3, point, others, modes) is False  # not a rung: never stopped


def test_rule_edge_cases():
    rule = RungRule((1,), 1)
    assert rule.stops(1, 0.5, 0.5, [(0.5, 0.5)]) is False  # an equal point does not dominate
    assert rule.stops(1, 0.5, 0.5, [(0.5, 0.6)]) is True  # same size, more robust
    assert rule.stops(1, 0.5, 0.5, [(0.4, 0.5)]) is True  # smaller, as robust
    assert rule.stops(1, 0.5, 0.5, [(0.4, 0.4)]) is False  # a trade-off, not a domination
    assert rule.stops(1, 0.5, 0.5, []) is False
    assert RungRule.default(6).rungs == (2, 4)
    assert RungRule.default(2).rungs == (1,)
    with pytest.raises(ValueError):
        RungRule((0,), 1)
    with pytest.raises(ValueError):
        RungRule((1,), 0)


def test_parse_rungs():
    assert parse_rungs(None) is None and parse_rungs(False) is None
    assert parse_rungs({"rungs": [4, 2, 2], "min_dominating": 2}) == RungRule((2, 4), 2)
    assert parse_rungs({"rungs": [3]}) == RungRule((3,), 3)
    for bad in (True, "yes", {"rungs": []}, {"rungs": [0]}, {"rungs": [1.5]}, {"rungs": [1], "min_dominating": 0},
                {"rungs": [1], "extra": 1}):
        with pytest.raises(ConfigError):
            parse_rungs(bad)
    space = load_space(QUICKSTART, {"study.early_stop": {"rungs": [1, 3], "min_dominating": 2}})
    assert space.study.early_stop == RungRule((1, 3), 2)
    assert load_space(QUICKSTART).study.early_stop is None


def test_scheduler_judges_against_completed_trials_at_the_same_epoch():
    sched = RungScheduler(RungRule((2,), 2), ["params_kept", "val_robust_acc"], ["min", "max"])
    trial = lambda tid: SimpleNamespace(trial_id=tid)  # noqa: E731
    good = [{"step": s, "params_kept": 100.0, "val_robust_acc": 0.2 * s} for s in (1, 2, 3)]
    for tid in ("a", "b"):
        for r in good:
            assert sched.on_trial_result(None, trial(tid), r) == TrialScheduler.CONTINUE
    # "a" completes; "b" is stopped by something else (no final report): only "a" counts
    sched.on_trial_complete(None, trial("a"), {"final": 1, "params_kept": 100.0, "val_robust_acc": 0.6})
    sched.on_trial_complete(None, trial("b"), {"step": 3})
    bad = {"step": 2, "params_kept": 200.0, "val_robust_acc": 0.3}
    assert sched.on_trial_result(None, trial("c"), bad) == TrialScheduler.CONTINUE  # 1 dominating of 2 needed
    # a failed trial's points never count
    sched.on_trial_result(None, trial("f"), good[1])
    sched.on_trial_complete(None, trial("f"), {"final": 1, "fail_reason": "boom"})
    assert sched.on_trial_result(None, trial("c"), bad) == TrialScheduler.CONTINUE
    # an earlier driver's completed trial, from its result.json history (size from its final metrics)
    sched.add_completed([{"val_robust_acc": 0.1}, {"val_robust_acc": 0.5}], {"params_kept": 150.0})
    assert sched.on_trial_result(None, trial("c"), bad) == TrialScheduler.STOP
    assert "rung epoch 2" in sched.reasons["c"]
    # the same point at a non-rung epoch, or lacking an objective, or the final report: never stopped
    assert sched.on_trial_result(None, trial("d"), {**bad, "step": 3}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trial("d"), {"step": 2, "val_robust_acc": 0.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trial("d"), {**bad, "final": 1}) == TrialScheduler.CONTINUE


def rung_trial(cfg, *, on_epoch=None, resume_state=None, epochs=3):
    """Trial 0 is small and robust at every epoch; every later one is larger and less robust."""
    from study.trial.pipeline import EpochReport

    number = int(cfg.name.rsplit("-", 1)[1])
    kept, robust = (100.0, 0.9) if number == 0 else (1000.0, 0.2)
    for step in range(1, epochs + 1):
        on_epoch(EpochReport("finetune", step, step, {"val_robust_acc": robust * step / epochs},
                             lambda s=step: {"step": s}, size=lambda: {"params_kept": kept}))
    return FakeResult({"params_kept": kept, "params_total": 10000.0, "val_robust_acc": robust,
                       "val_clean_acc": robust, "wall_s": 0.1})


@pytest.mark.usefixtures("local_ray")
def test_dominated_trials_end_pruned_everywhere(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from study.search.study import run_study

    sys.modules["ray"].cloudpickle.register_pickle_by_value(sys.modules[__name__])
    space = load_space(QUICKSTART, {"study.n_trials": 3, "study.max_concurrent": 1,
                                    "study.early_stop": {"rungs": [2], "min_dominating": 1}})
    runs = tmp_path / "runs"
    outcome = run_study(space, runs_dir=runs, final_eval=False, pretrain=fake_pretrain,
                        run_trial=functools.partial(rung_trial))
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{runs / 'quickstart' / 'optuna.db'}")
    states = [t.state for t in sorted(study.trials, key=lambda t: t.number)]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    for t in study.trials[1:]:
        assert "rung epoch 2" in t.user_attrs["stop_reason"]
    assert [t.number for t in study.best_trials] == [0]
    assert outcome.status != "failed"
    _, mlruns = mlflow_trial_runs(runs)
    assert mlruns[0].info.status == "FINISHED"
    for n in (1, 2):
        assert mlruns[n].info.status == "KILLED"
        assert mlruns[n].data.tags["optuna_state"] == "PRUNED"
        assert "rung epoch 2" in mlruns[n].data.tags["stop_reason"]
        assert mlruns[n].data.metrics["finetune/val_robust_acc"] == pytest.approx(0.2 * 2 / 3)  # stopped after epoch 2
        assert "val_robust_acc" not in mlruns[n].data.metrics  # no final figure: the trial never reported one
    assert not (runs / "quickstart" / "trials" / "0001" / "final.json").exists()
