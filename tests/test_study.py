"""The study end to end: Ray Tune + Optuna + MLflow on a local Ray, in temporary folders.

Most tests use a FAKE trial (a few epochs of made-up metrics, instant) to check the search wiring:
Optuna states, MLflow runs, the Pareto CSV, failures, interruption and resume. A fake trial that trains a
real tiny model checks the test-split confirmation of the front (study.confirm). Slow tests run the real
pipeline on digits, one of them twice to show that the sampler never sees the test split.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import sys

import optuna
import pytest
import ray
from optuna.trial import TrialState

from conftest import QUICKSTART, fake_pretrain, fake_run_trial, fit_briefly, logging_trial

from analysis import pareto
from study.search.optimize import optuna_search
from study.search.optimize.space import load_space
from study.search.study import report_study, resume_study, run_study
from study.trial.sparse_file import load_state

# Ray workers cannot import this test module: ship its functions by value (conftest's are shipped too).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.usefixtures("local_ray")


def _space(n_trials=3, concurrent=2, **more):
    overrides = {"study.n_trials": n_trials, "study.max_concurrent": concurrent, **more}
    return load_space(QUICKSTART, overrides)


def _run(tmp_path, space, **kw):
    kw.setdefault("run_trial", fake_run_trial)
    kw.setdefault("pretrain", fake_pretrain)
    return run_study(space, runs_dir=tmp_path / "runs", **kw)


def _optuna(tmp_path, name="quickstart"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'runs' / name / 'optuna.db'}")


def _mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_role") == "study"]
    trials = [r for r in runs if r.data.tags.get("run_role") == "trial"]
    return client, parents, trials


def _check_consistent(tmp_path, n_trials, failed=()):
    study = _optuna(tmp_path)
    trials = study.get_trials()
    assert len(trials) == n_trials
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.FAIL}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert all(math.isfinite(v) for v in t.values)
    assert sorted(t.number for t in trials if t.state == TrialState.FAIL) == sorted(failed)

    client, parents, runs = _mlflow(tmp_path)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert sorted(int(r.data.tags["optuna_trial_number"]) for r in runs) == list(range(n_trials))  # no duplicate
    for r in runs:
        number = int(r.data.tags["optuna_trial_number"])
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["study"] == "quickstart" and r.data.tags["mlflow.source.git.commit"] and r.data.tags["ray_version"]
        assert "prune.keep_fraction" in r.data.params and "attack.schedule" in r.data.params
        assert r.info.status == ("FAILED" if number in failed else "FINISHED")
        history = client.get_metric_history(r.info.run_id, "finetune/train_loss")  # the fake trial's one stage
        assert [m.step for m in history] == [1, 2]  # per epoch, no duplicates after a resume
        if number not in failed:
            assert r.data.metrics["val_robust_acc"] == pytest.approx(study.trials[number].values[1])
            assert not any(k.startswith("test") for k in r.data.metrics)  # fake trials have no model to confirm
            assert study.trials[number].user_attrs["mlflow_run_id"] == r.info.run_id
    csv = tmp_path / "runs" / "quickstart" / "pareto.csv"
    front = sorted(int(row["trial"]) for row in pareto.read_csv(csv))
    assert front == sorted(t.number for t in study.best_trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    mask = pareto.non_dominated([t.values for t in complete], ["min", "max"])
    assert front == sorted(t.number for t, keep in zip(complete, mask) if keep)
    return study


def test_study_records_every_trial_in_optuna_and_mlflow(tmp_path, capsys):
    outcome = _run(tmp_path, _space(n_trials=3))
    assert outcome.status == "complete" and outcome.complete == 3
    _check_consistent(tmp_path, 3)
    out = capsys.readouterr().out
    assert "Pareto front of study 'quickstart'" in out and "mlflow_run_id" in out
    assert "optuna-dashboard sqlite:///" in out and "tune ls /" in out
    # study report reprints the front from the Optuna storage
    report_study("quickstart", runs_dir=tmp_path / "runs")
    assert "Pareto front of study 'quickstart'" in capsys.readouterr().out
    # resuming a finished study changes nothing
    again = resume_study("quickstart", runs_dir=tmp_path / "runs", run_trial=fake_run_trial,
                         pretrain=fake_pretrain)
    assert again.status == "complete"
    _check_consistent(tmp_path, 3)


def test_failing_and_nan_trials_are_failed_and_the_study_completes(tmp_path):
    trial = functools.partial(fake_run_trial, fail=(0,), nan=(2,))
    outcome = _run(tmp_path, _space(n_trials=4), run_trial=trial)
    assert outcome.status == "complete" and (outcome.complete, outcome.failed) == (2, 2)
    study = _check_consistent(tmp_path, 4, failed=(0, 2))
    # the real reason, recorded by the trial itself, in Optuna and MLflow
    reason = "the trial raised RuntimeError: fake trial 0 failed on purpose"
    assert study.trials[0].user_attrs["fail_reason"] == reason
    assert "val_robust_acc missing or not finite" in study.trials[2].user_attrs["fail_reason"]
    _, _, runs = _mlflow(tmp_path)
    assert {r.data.tags["optuna_trial_number"]: r.data.tags.get("fail_reason") for r in runs}["0"] == reason


def test_interrupted_study_resumes_to_exactly_n_trials(tmp_path):
    marker = tmp_path / "interrupted"
    trial = functools.partial(fake_run_trial, interrupt=(2, os.getpid(), str(marker)))
    every_epoch = {"study.checkpoint_every_s": 0}  # a resume checkpoint per epoch (the default: one a minute)
    first = _run(tmp_path, _space(n_trials=5, concurrent=1, **every_epoch), run_trial=trial)
    assert first.status == "interrupted" and marker.exists()
    study = _optuna(tmp_path)
    assert len(study.trials) < 5 and study.trials[2].state == TrialState.RUNNING
    # an Optuna trial asked just before the driver died (never started): RUNNING, with its parameters
    orphan = study.ask()
    _space().suggest(orphan)
    with pytest.raises(Exception):
        run_study(_space(n_trials=5, concurrent=1, **every_epoch), runs_dir=tmp_path / "runs")  # exists
    log = tmp_path / "starts.txt"
    second = resume_study("quickstart", runs_dir=tmp_path / "runs", pretrain=fake_pretrain,
                          run_trial=functools.partial(logging_trial, log=str(log), inner=trial))
    assert "quickstart-0002 1" in log.read_text().splitlines()  # continued from its epoch-1 checkpoint
    assert second.status == "complete"
    study = _check_consistent(tmp_path, 5)
    assert study.trials[orphan.number].state == TrialState.COMPLETE  # continued, not duplicated


def test_time_budget_fails_unfinished_trials_and_ends_the_study(tmp_path):
    trial = functools.partial(fake_run_trial, sleep=30.0)
    outcome = _run(tmp_path, _space(n_trials=4, **{"study.time_budget_s": 2}), run_trial=trial)
    assert outcome.status == "complete" and outcome.complete == 0
    study = _optuna(tmp_path)
    assert study.trials and {t.state for t in study.trials} == {TrialState.FAIL}
    assert all("time budget" in t.user_attrs["fail_reason"] for t in study.trials)
    _, _, runs = _mlflow(tmp_path)
    assert len(runs) == len(study.trials) and {r.info.status for r in runs} == {"KILLED"}


def test_storage_urls(tmp_path):
    assert type(optuna_search.open_storage(f"journal://{tmp_path}/a.log")).__name__ == "JournalStorage"
    assert type(optuna_search.open_storage(str(tmp_path / "b.journal"))).__name__ == "JournalStorage"
    assert type(optuna_search.open_storage(f"sqlite:///{tmp_path}/c.db")).__name__ == "RDBStorage"
    with pytest.raises(Exception, match="neither a database URL"):
        optuna_search.open_storage(str(tmp_path / "d.txt"))


# ---------------------------------------------------------------------------------------------------
# The test-split confirmation of the front (study.confirm).


def trained_model_trial(cfg, *, on_epoch=None, resume_state=None):
    """A real small_cnn (width 8) trained without attacks for 150 Adam steps on digits (seeded, about a
    second), with made-up size and validation figures: val_robust_acc is the same for every trial, so only
    the trial with the fewest params_kept is on the front."""
    import torch

    from study.trial.data import load_dataset
    from study.trial.models import create_model
    from study.trial.pipeline import TrialResult

    torch.manual_seed(0)
    sp = load_dataset(cfg.data, "cpu")
    model = create_model(cfg.model.arch, sp.info, width=cfg.model.width)
    fit_briefly(model, sp)
    keep = cfg.prune.keep_fraction
    metrics = {"params_kept": float(round(10000 * keep)), "params_total": 10000.0, "val_clean_acc": 0.9,
               "val_robust_acc": 0.5}
    return TrialResult(config=cfg, metrics=metrics, model_state=model.eval().state_dict())


def test_the_front_is_confirmed_on_the_test_split(tmp_path, capsys):
    import torch

    from study.search.folder import layout
    from study.search.front import front_files
    from study.search.front.robust_settings import ConfirmSettings
    from study.trial.config import DataConfig
    from study.trial.data import load_dataset
    from study.trial.models import create_model

    confirm = {"points": 48, "steps": 10, "restarts": 2, "autoattack": True}
    space = _space(n_trials=3, **{"study.sampler": "random", "study.sampler_options": None, "trial.model.width": 8,
                                  "trial.eval.eps": 0.03, "study.confirm": confirm})
    outcome = _run(tmp_path, space, run_trial=trained_model_trial)
    out, err = capsys.readouterr()
    assert outcome.status == "complete" and outcome.complete == 3
    study = _optuna(tmp_path)
    front = {t.number for t in study.best_trials}
    assert 1 <= len(front) < 3  # at least one trial is dominated
    # Tune's table has the searched parameters and params_kept (study.search.running.progress_table)
    assert any("Trial name" in ln and "prune.keep_fraction" in ln and "params_kept" in ln for ln in out.splitlines())
    # progress lines of each front trial's confirmation, from its Ray task (study.search.front.progress)
    for n in front:
        lines = [ln.split(": ", 1)[1] for ln in err.splitlines() if re.match(rf"\[study\] confirming trial {n} \(\d/{len(front)}\): ", ln)]
        assert "PGD-10 x2 restarts Linf eps=0.03: 0/48 points, 0 s" in lines, err
        assert "AutoAttack standard Linf eps=0.03: 0/48 points, 0 s" in lines, err
        for what in ("PGD-10 x2 restarts Linf eps=0.03", "AutoAttack standard Linf eps=0.03"):
            assert any(re.fullmatch(rf"{what}: 48/48 points in \d+ s", ln) for ln in lines), lines
    attack = "PGD-10 x2 restarts (step 2.5*eps/10) + standard AutoAttack, Linf eps 0.03, 48 test points"
    rows = pareto.read_csv(outcome.pareto_csv)
    assert {int(r["trial"]) for r in rows} == front
    client, _, runs = _mlflow(tmp_path)
    runs = {int(r.data.tags["optuna_trial_number"]): r for r in runs}
    info = load_dataset(DataConfig(name="digits"), "cpu")
    for row in rows:
        number = int(row["trial"])
        m = {k: float(row[k]) for k in ("test_clean_acc", "test_pgd_acc", "test_autoattack_acc", "test_robust_acc")}
        assert row["test_attack"] == attack and float(row["test_points"]) == 48
        # the headline is the per-point worst case: never above either attack, and (both attacks breaking
        # only clean-correct points) never below their overlap
        assert m["test_robust_acc"] <= m["test_autoattack_acc"] <= m["test_clean_acc"]
        assert m["test_robust_acc"] <= m["test_pgd_acc"] <= m["test_clean_acc"]
        assert m["test_robust_acc"] >= m["test_pgd_acc"] + m["test_autoattack_acc"] - m["test_clean_acc"] - 1e-9
        assert 0 < m["test_robust_acc"] < m["test_clean_acc"]  # a real, non-trivial attack on a real model
        # clean accuracy recomputed here from the saved model on the same seeded 48 test points
        folder = tmp_path / "runs" / "quickstart" / "trials" / f"{number:04d}"
        model = create_model("small_cnn", info.info, width=8)
        model.load_state_dict(load_state(folder / "model.pt"))  # stored sparse (study.trial.sparse_file)
        idx = torch.randperm(len(info.x_test), generator=torch.Generator().manual_seed(0))[:48]
        with torch.no_grad():
            clean = (model.eval()(info.x_test[idx]).argmax(1) == info.y_test[idx]).float().mean().item()
        assert m["test_clean_acc"] == pytest.approx(clean)
        # the trial's nested MLflow run: the same figures, the attack named, the saved file
        run = runs[number]
        for k, v in m.items():
            assert run.data.metrics[k] == pytest.approx(v)
        assert run.data.tags["test_attack"] == attack
        assert layout.CONFIRM_FILE in [a.path for a in client.list_artifacts(run.info.run_id)]
        saved = front_files.load_confirm(folder, ConfirmSettings(**confirm))
        assert saved is not None and saved["metrics"]["test_robust_acc"] == pytest.approx(m["test_robust_acc"])
        assert front_files.load_confirm(folder, ConfirmSettings(**{**confirm, "points": 47})) is None
    for number in set(runs) - front:  # a trial the study did not choose is never evaluated on test
        assert not any(k.startswith("test") for k in runs[number].data.metrics)
        assert "test_attack" not in runs[number].data.tags
        assert not (tmp_path / "runs" / "quickstart" / "trials" / f"{number:04d}" / layout.CONFIRM_FILE).exists()
    assert not any(k.startswith("test") for t in study.trials for k in t.user_attrs)  # Optuna never sees them
    assert "test_robust_acc" in out and attack in out and "selected on the validation split" in out
    # a resume or a report reuses the saved confirmation
    resume_study("quickstart", runs_dir=tmp_path / "runs", run_trial=trained_model_trial, pretrain=fake_pretrain)
    out = capsys.readouterr().out
    assert "test-split evaluation of" not in out and attack in out
    assert pareto.read_csv(outcome.pareto_csv) == rows


@pytest.mark.slow
def test_quickstart_on_digits_with_the_real_pipeline(tmp_path):
    """The real pipeline, tiny: 3 trials of 1+1 epochs after a 2-epoch pretraining, then the front's
    test-split confirmation (a small budget here)."""
    space = load_space(QUICKSTART, {"study.n_trials": 3, "study.max_concurrent": 2, "trial.pretrain.epochs": 2,
                                    "trial.prune_stage.epochs": 1, "trial.finetune.epochs": 1,
                                    "trial.eval.points": 100, "trial.eval.val_points": 100,
                                    "study.confirm": {"points": 64, "steps": 10, "restarts": 1, "autoattack": False}})
    outcome = run_study(space, runs_dir=tmp_path / "runs")
    assert outcome.status == "complete" and outcome.complete + outcome.failed == 3
    study = _optuna(tmp_path)
    assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.FAIL}
    best = study.best_trials[0]
    out = tmp_path / "runs" / "quickstart" / "trials" / f"{best.number:04d}"
    assert (out / "model.pt").is_file() and (out / "result.json").is_file()
    assert 0 < best.user_attrs["params_kept"] < best.user_attrs["params_total"]
    assert best.user_attrs["val_points"] == 100 and not any(k.startswith("test") for k in best.user_attrs)
    # the nested MLflow run carries the exported model (a logged model) and the node that ran the trial
    client, parent, children = _mlflow(tmp_path)
    run = next(r for r in children if r.data.tags.get("optuna_trial_number") == str(best.number))
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/result.json"}
    logged = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [m.name for m in logged] == [f"quickstart-{best.number:04d}"]  # the model: an MLflow model of the run
    recommended = client.get_model_version_by_alias("quickstart", "recommended")  # registered by the report
    assert recommended.run_id == parent[0].data.tags["recommended_run_id"]
    assert run.data.tags.get("ray_node_id")
    # the front's test-split confirmation
    confirm = json.loads((out / "confirm.json").read_text())
    assert confirm["metrics"]["test_points"] == 64 and confirm["test_attack"].startswith("PGD-10 x1 restarts")
    assert run.data.metrics["test_robust_acc"] == confirm["metrics"]["test_robust_acc"] <= confirm["metrics"]["test_clean_acc"]


# ---------------------------------------------------------------------------------------------------
# Model selection never sees the test split.


def _fingerprint(x, y) -> str:
    import hashlib

    return hashlib.sha256(x.cpu().numpy().tobytes() + y.cpu().numpy().tobytes()).hexdigest()[:16]


def split_perturbing_trial(cfg, *, perturb, log, **kw):
    """The real pipeline's run_trial with study.trial.data's loader wrapped (inside the Ray worker that runs the
    trial): with `perturb`, the TEST split becomes noise images with permuted labels; train and validation
    are untouched. Appends '<trial name> <fingerprint of the test split the trial loaded>' to `log`."""
    import torch

    from study.trial import data, pipeline

    real = data.load_dataset

    def load(data_cfg, device="cpu"):
        sp = real(data_cfg, device)
        if perturb:
            g = torch.Generator().manual_seed(1234)
            sp.x_test = torch.rand(sp.x_test.shape, generator=g).to(sp.x_test.device)
            sp.y_test = sp.y_test[torch.randperm(len(sp.y_test), generator=g).to(sp.y_test.device)]
        with open(log, "a") as f:
            f.write(f"{cfg.name} {_fingerprint(sp.x_test, sp.y_test)}\n")
        return sp

    data.load_dataset = pipeline.load_dataset = load
    try:
        return pipeline.run_trial(cfg, **kw)
    finally:
        data.load_dataset = pipeline.load_dataset = real


@pytest.mark.slow
def test_the_sampler_never_sees_the_test_split(tmp_path):
    """The same tiny real study twice, the second time with the test split replaced by noise and permuted
    labels: Optuna receives exactly the same values, user attributes and (NSGA-II-sampled, so value-dependent)
    params, in the same order."""
    overrides = {"study.n_trials": 4, "study.max_concurrent": 1,
                 "study.sampler": "nsga2", "study.sampler_options": {"population_size": 2},  # trials 2-3 bred from 0-1
                 "study.stratify": "",
                 "trial.data.train_limit": 512, "trial.pretrain.epochs": 1, "trial.prune_stage.epochs": 1,
                 "trial.finetune.epochs": 1, "trial.eval.steps": 5, "trial.eval.restarts": 1,
                 "trial.eval.val_points": 64, "trial.eval.val_steps": 2}
    seen, logs = [], []
    for perturb in (False, True):
        runs, log = tmp_path / f"runs_{int(perturb)}", tmp_path / f"test_split_{int(perturb)}.txt"
        outcome = run_study(load_space(QUICKSTART, overrides), runs_dir=runs, final_eval=False,
                            run_trial=functools.partial(split_perturbing_trial, perturb=perturb, log=str(log)))
        assert outcome.status == "complete" and outcome.complete == 4
        study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{runs / 'quickstart' / 'optuna.db'}")
        varying = ("wall_s", "tune_trial_id", "ray_node_id", "mlflow_run_id")
        seen.append([(t.number, t.state, t.values, t.params,
                      {k: v for k, v in t.user_attrs.items() if k not in varying}) for t in study.trials])
        assert not any(k.startswith("test") for t in study.trials for k in t.user_attrs)
        logs.append(set(log.read_text().split("\n")) - {""})
    # the perturbation reached every trial: they loaded a different test split the second time...
    clean_prints = {line.split()[1] for line in logs[0]}
    noisy_prints = {line.split()[1] for line in logs[1]}
    assert len(clean_prints) == len(noisy_prints) == 1 and clean_prints != noisy_prints
    assert {line.split()[0] for line in logs[1]} == {f"quickstart-{n:04d}" for n in range(4)}
    # ...and Optuna saw exactly the same thing
    assert seen[0] == seen[1]
    assert len({tuple(sorted(p[3].items())) for p in seen[0]}) == 4  # four distinct configurations
