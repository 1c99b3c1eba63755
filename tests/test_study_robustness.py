"""Robustness objectives in a study (study.robustness): validation of the section and of suite-metric
objectives, the per-trial search evaluation reaching Optuna, and the test-split evaluation of the front
(the suite's `test.*` figures beside the confirmation's `test_*` ones, in the Pareto CSV and in the trials'
MLflow runs).

The study test uses a FAKE run_trial that returns an untrained small_cnn (width 4) on digits: the trainable
still evaluates that real model with the suite, so the objective is a real, finite suite figure.
"""
from __future__ import annotations

import copy
import json
import math
import sys

import optuna
import pytest
import ray
from optuna.trial import TrialState

from conftest import QUICKSTART, ROOT, fake_pretrain, mlflow_trial_runs

from analysis import pareto
from study.search.folder import layout
from study.search.front import robust_eval, robust_settings
from study.search.study import report_study, resume_study, run_study
from study.trial.config import ConfigError
from study.search.optimize.space import load_space, parse_space

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

BASE = {
    "study": {"name": "t", "sampler": "random", "n_trials": 3,
              "objectives": [{"metric": "params_kept", "mode": "min"}, {"metric": "robust.l2.1.0", "mode": "max"}],
              "robustness": {"threats": {"linf": [0.05, 0.1], "l2": [0.5, 1.0], "l0": [2, 4]}}},
    "trial": {"data": {"name": "digits"}, "model": {"arch": "small_cnn"}},
    "search": {"prune.keep_fraction": {"float": [0.01, 0.5], "log": True}},
}


def _error(study_edits: dict) -> ConfigError:
    data = copy.deepcopy(BASE)
    data["study"].update(study_edits)
    with pytest.raises(ConfigError) as e:
        parse_space(data, "x.yaml")
    return e.value


def _objective(metric: str) -> dict:
    return {"objectives": [{"metric": "params_kept", "mode": "min"}, {"metric": metric, "mode": "max"}]}


def test_suite_objectives_get_the_suite_spelling():
    space = parse_space(copy.deepcopy(BASE), "x.yaml")
    assert space.study.metrics == ["params_kept", "robust.l2.1"]  # robust.l2.1.0 -> the suite's name
    rob = space.study.robustness
    assert rob.threats == {"linf": [0.05, 0.1], "l2": [0.5, 1.0], "l0": [2.0, 4.0]}
    assert rob.search_budget == robust_settings.SEARCH_DEFAULT and rob.final_budget == robust_settings.FINAL_DEFAULT
    for metric, name in [("auc.linf", "auc.linf"), ("scenario.linf.0.10.r0.50", "scenario.linf.0.1.r0.5"),
                         ("robust_nested.l0.4", "robust_nested.l0.4"), ("val_robust_acc", "val_robust_acc")]:
        data = copy.deepcopy(BASE)
        data["study"].update(_objective(metric))
        assert parse_space(data, "x.yaml").study.metrics[1] == name
    from study import keys
    from study.robustness import suite

    # the names the objectives use are the names the suite reports: one formatter builds both
    assert suite.suite_metric is keys.suite_metric is robust_settings.suite_metric
    expected = {0.0: "0", 1.0: "1", 8 / 255: "0.0314", 0.1: "0.1", 2.0: "2", 0.25: "0.25"}
    assert {v: keys.fmt(v) for v in expected} == expected


@pytest.mark.parametrize("edits, key, words", [
    (_objective("robust.l2.2"), "study.objectives[1].metric", ["eps 2 is not in study.robustness.threats.l2", "robust.l2.0.5"]),
    (_objective("robust.l1.0.5"), "study.objectives[1].metric", ["threat 'l1' is not evaluated", "linf, l2, l0"]),
    (_objective("scenario.linf.0.1.r0.3"), "study.objectives[1].metric", ["r 0.3 is not in", "scenario.linf.0.1.r0.5"]),
    (_objective("scenario.linf.0.1"), "study.objectives[1].metric", ["scenario.<threat>.<eps>.r<r>"]),
    (_objective("auc.linf.0.1"), "study.objectives[1].metric", ["expected auc.linf"]),
    (_objective("autoattack.linf.0.1"), "study.objectives[1].metric", ["final Pareto front", "robust.<threat>.<eps>"]),
    (_objective("robustness"), "study.objectives[1].metric", ["unknown metric", "params_kept", "auc.<threat>"]),
    (_objective("test.robust.l2.1"), "study.objectives[1].metric", ["selection uses validation", "robust.l2.1?"]),
    (_objective("test.autoattack.linf.0.1"), "study.objectives[1].metric", ["selection uses validation", "robust.linf.0.1?"]),
    ({**_objective("robust.linf.0.1"), "robustness": None}, "study.objectives[1].metric", ["add a study.robustness section"]),
    ({"robustness": {"threats": {"linf": [0.1]}, "budget": {}}}, "study.robustness.budget", ["search_budget", "final_budget"]),
    ({"robustness": {"scenario_r": [0.5]}}, "study.robustness.threats", ["required", "linf, l2, l0"]),
    ({"robustness": {"threats": {"l1": [0.5]}}}, "study.robustness.threats.l1", ["unknown threat", "linf, l2, l0"]),
    ({"robustness": {"threats": {"linf": [8]}}}, "study.robustness.threats.linf", ["outside [0, 1]", "/255"]),
    ({"robustness": {"threats": {"l0": [2.5]}}}, "study.robustness.threats.l0", ["integer"]),
    ({"robustness": {"threats": {"l2": []}}}, "study.robustness.threats.l2", ["non-empty"]),
    ({"robustness": {"threats": {"l2": [0.5, 0.5]}}}, "study.robustness.threats.l2", ["duplicate"]),
    ({"robustness": {"threats": {"l2": [-1]}}}, "study.robustness.threats.l2", [">= 0"]),
    ({"robustness": {"threats": {"l2": [1.0]}, "scenario_r": [0, 2]}}, "study.robustness.scenario_r", ["[0, 1]"]),
    ({"robustness": {"threats": {"l2": [1.0]}, "search_budget": {"autoattack": True}}},
     "study.robustness.search_budget.autoattack", ["final_budget"]),
    ({"robustness": {"threats": {"l2": [1.0]}, "search_budget": {"point": 10}}},
     "study.robustness.search_budget.point", ["points, steps, restarts"]),
    ({"robustness": {"threats": {"l2": [1.0]}, "final_budget": {"steps": 0}}},
     "study.robustness.final_budget.steps", [">= 1"]),
    ({"robustness": {"threats": {"l2": [1.0], "l0": [2]}, "final_budget": {"autoattack": True, "autoattack_eps": {"l0": [2]}}}},
     "study.robustness.final_budget.autoattack_eps.l0", ["valid choices: l2"]),
    ({"robustness": {"threats": {"l2": [1.0]}, "final_budget": {"autoattack_eps": {"l2": [1.0]}}}},
     "study.robustness.final_budget.autoattack_eps", ["autoattack: true"]),
])
def test_mistakes_name_the_key_and_the_choices(edits, key, words):
    err = _error(edits)
    assert err.key == key, str(err)
    for w in words:
        assert w in str(err), str(err)


def test_load_space_names_the_file():
    with pytest.raises(ConfigError) as e:
        load_space(QUICKSTART, {"study.objectives": _objective("robust.linf.0.1")["objectives"]})
    assert str(e.value).startswith(f"{QUICKSTART}: study.objectives[1].metric")
    # (tests/test_space.py's walk validates every shipped file, digits_threats.yaml included)
    assert load_space(ROOT / "search_spaces" / "digits_threats.yaml").study.robustness.final_budget.autoattack


def test_search_metrics_keep_the_pipeline_figures():
    class Report:
        def flat_metrics(self):
            return {"clean_acc": 0.1, "robust.linf.0.1": 0.05, "suspect": 0.0, "wall_s.total": 3.0, "auc.l2": float("nan")}

    out = robust_eval.search_metrics(Report(), {"val_clean_acc": 0.9, "val_robust_acc": 0.5})
    assert out == {"robust.linf.0.1": 0.05, "suspect": 0.0, "wall_s.total": 3.0}  # the suite's clean_acc is shadowed


# ---------------------------------------------------------------------------------------------------
# A study on Ray with a fake trial that returns a real (untrained, tiny) model.


def tiny_model_trial(cfg, *, on_epoch=None, resume_state=None):
    """An untrained small_cnn of width 4 on digits (seeded by the trial number), with made-up sizes."""
    import torch

    from study.trial.data import load_dataset
    from study.trial.models import create_model
    from study.trial.pipeline import TrialResult

    number = int(cfg.name.rsplit("-", 1)[1])
    torch.manual_seed(number)
    info = load_dataset(cfg.data, "cpu").info
    state = create_model(cfg.model.arch, info, width=cfg.model.width).state_dict()
    keep = cfg.prune.keep_fraction
    metrics = {"params_kept": float(round(10000 * keep)), "val_clean_acc": 0.9, "val_robust_acc": 0.5}
    return TrialResult(config=cfg, metrics=metrics, model_state=state)


def _space(final_autoattack: bool = True):
    budget = {"points": 24, "steps": 2, "restarts": 1, "square_queries": 10, "batch_size": 64}
    final = {**budget, "points": 32, **({"autoattack": True, "autoattack_eps": {"linf": [0.1]}} if final_autoattack else {})}
    return load_space(QUICKSTART, {
        "study.n_trials": 2, "study.max_concurrent": 2, "study.sampler": "random", "study.sampler_options": None,
        "trial.model.width": 4,
        "study.confirm": {"points": 32, "steps": 2, "restarts": 1, "autoattack": False},
        "study.objectives": [{"metric": "params_kept", "mode": "min"}, {"metric": "robust.linf.0.1", "mode": "max"}],
        "study.robustness": {"threats": {"linf": [0.1], "l2": [0.5]}, "scenario_r": [0.5],
                             "search_budget": budget, "final_budget": final},
    })


# AutoAttack's Square alone (5000 queries) takes ~25 s on CPU even for a few points: that variant is slow.
@pytest.mark.parametrize("autoattack", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.usefixtures("local_ray")
def test_suite_objective_reaches_optuna_and_the_front_gets_a_final_evaluation(tmp_path, capsys, autoattack):
    runs = tmp_path / "runs"
    space = _space(final_autoattack=autoattack)
    first = run_study(space, runs_dir=runs, run_trial=tiny_model_trial, pretrain=fake_pretrain,
                      final_eval=False)
    assert first.status == "complete" and first.complete == 2
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{runs / 'quickstart' / 'optuna.db'}")
    client, mlruns = mlflow_trial_runs(runs)
    for t in study.trials:
        assert t.state == TrialState.COMPLETE
        value = t.values[1]
        assert math.isfinite(value) and 0 <= value <= 1
        assert t.user_attrs["robust.linf.0.1"] == value and "auc.l2" in t.user_attrs  # the suite's metrics
        assert t.user_attrs["val_clean_acc"] == 0.9 and "clean_acc" not in t.user_attrs  # the suite's is shadowed
        assert mlruns[t.number].data.metrics["robust.linf.0.1"] == pytest.approx(value)
    assert not any(k.startswith("test") for k in pareto.read_csv(first.pareto_csv)[0])  # --no-final-eval
    capsys.readouterr()

    # resuming the finished study runs only the test-split evaluation of the front: suite and confirmation
    again = resume_study("quickstart", runs_dir=runs, run_trial=tiny_model_trial, pretrain=fake_pretrain)
    out = capsys.readouterr().out
    assert again.status == "complete" and again.complete == 2
    front = {t.number for t in study.best_trials}
    rows = pareto.read_csv(again.pareto_csv)
    assert {int(r["trial"]) for r in rows} == front
    client, mlruns = mlflow_trial_runs(runs)
    for row in rows:
        number = int(row["trial"])
        cols = ["test.robust.linf.0.1", "test.robust.l2.0.5", "test.clean_acc", "test.suspect", "test.auc.l2",
                "test_clean_acc", "test_pgd_acc", "test_robust_acc", "test_points"]
        for col in cols + ["test.autoattack.linf.0.1"] * autoattack:
            assert math.isfinite(float(row[col])), col
        assert ("test.autoattack.linf.0.1" in row) == autoattack
        assert not row.get("test_autoattack_acc")  # the confirmation's AutoAttack is off here
        assert row["test_attack"] == "PGD-2 x1 restarts (step 2.5*eps/2) (no AutoAttack), Linf eps 0.1, 32 test points"
        assert float(row["test_robust_acc"]) == float(row["test_pgd_acc"]) <= float(row["test_clean_acc"])
        saved = json.loads((runs / "quickstart" / "trials" / f"{number:04d}" / layout.SUITE_FINAL_FILE).read_text())
        assert saved["budget"]["points"] == 32 and saved["report"]["n_points"] == 32  # test split, final budget
        assert [a["threat"] for a in saved["report"]["autoattack"]] == ["linf"] * autoattack
        run = mlruns[number]
        for col in ("test.robust.linf.0.1", "test.suspect", "test_robust_acc") + ("test.autoattack.linf.0.1",) * autoattack:
            assert run.data.metrics[col] == pytest.approx(float(row[col]))
        assert run.data.tags["test.suspect"] in ("true", "false") and run.data.tags["test_attack"] == row["test_attack"]
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert layout.SUITE_FINAL_FILE in artifacts and layout.CONFIRM_FILE in artifacts
    for number in set(mlruns) - front:
        assert not any(k.startswith("test") for k in mlruns[number].data.metrics)
    assert not any(k.startswith(("final.", "final_")) for r in mlruns.values() for k in r.data.metrics)  # old prefix
    assert "robustness suite on the test split" in out and "test.robust.linf.0.1" in out
    assert ("test.autoattack.linf.0.1" in out) == autoattack
    assert all(f"trial {n}:" in out for n in front)

    # `study report` reprints the test columns from the saved evaluations, without evaluating again
    report_study("quickstart", runs_dir=runs)
    out = capsys.readouterr().out
    assert "test.robust.linf.0.1" in out and "test_robust_acc" in out and "[study] test-split evaluation of" not in out
