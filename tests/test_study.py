"""The study runner end to end: Ray Tune + Optuna + MLflow on a local Ray, in temporary folders.

Most tests use a FAKE trial (a few epochs of made-up metrics, instant) to check the search wiring:
Optuna states, MLflow runs, the Pareto CSV, failures, interruption and resume. One slow test runs the
real pipeline on digits.
"""
from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time
from pathlib import Path

import optuna
import pytest
import ray
from optuna.trial import TrialState

from analysis import pareto
from study import runner
from study.space import load_space

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"

# Ray workers cannot import this test module: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


class FakeResult:
    def __init__(self, metrics):
        self.metrics = metrics


def fake_pretrain(cfg):
    path = Path(cfg.cache_dir) / f"{cfg.pretrain_key()}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("dense")
    return path


def fake_run_trial(cfg, *, on_epoch=None, resume_state=None, fail=(), nan=(), interrupt=None, epochs=2, sleep=0.0):
    """Made-up but sensible metrics: smaller keep_fraction -> fewer params, lower robust accuracy.

    `fail`/`nan`: Optuna numbers that raise / end with a NaN objective. `interrupt`: (number, driver pid,
    marker file): that trial sends the driver SIGINT (once) after its first epoch and keeps running.
    A resumed trial starts after the epoch of its checkpoint (`resume_state["step"]`).
    """
    number = int(cfg.name.rsplit("-", 1)[1])
    assert Path(cfg.cache_dir, f"{cfg.pretrain_key()}.pt").is_file(), "pretraining must come first"
    time.sleep(sleep)
    first = int(resume_state["step"]) + 1 if resume_state else 1
    for step in range(first, epochs + 1):
        if on_epoch is not None:
            from study.pipeline import EpochReport

            on_epoch(EpochReport("finetune", step, step, {"train_loss": 1.0 / step, "val_robust_acc": 0.1 * step},
                                 lambda s=step: {"step": s}))
        if interrupt and interrupt[0] == number and not Path(interrupt[2]).exists():
            Path(interrupt[2]).write_text("sent")  # after one epoch: the resumed trial starts from its checkpoint
            os.kill(interrupt[1], signal.SIGINT)
            time.sleep(60)
    if number in fail:
        raise RuntimeError(f"fake trial {number} failed on purpose")
    keep = cfg.prune.keep_fraction
    robust = 0.3 + 0.5 * math.sqrt(keep) * cfg.attack.eps_multiplier / 1.25
    return FakeResult({"params_kept": round(10000 * keep), "params_total": 10000.0, "compression": 1 / keep,
                       "clean_acc": min(1.0, robust + 0.2), "robust_acc": float("nan") if number in nan else robust,
                       "val_clean_acc": 0.5, "val_robust_acc": 0.4, "sparsity": 1 - keep, "wall_s": 0.1})


def logging_trial(cfg, *, log, inner, **kw):
    """Runs `inner`, first appending '<name> <resume step>' to the file `log` (trials run in workers)."""
    with open(log, "a") as f:
        f.write(f"{cfg.name} {(kw.get('resume_state') or {}).get('step', 0)}\n")
    return inner(cfg, **kw)


def _space(n_trials=3, concurrent=2, **more):
    overrides = {"study.n_trials": n_trials, "study.max_concurrent": concurrent, **more}
    return load_space(QUICKSTART, overrides)


def _run(tmp_path, space, **kw):
    kw.setdefault("run_trial", fake_run_trial)
    kw.setdefault("pretrain", fake_pretrain)
    return runner.run_study(space, runs_dir=tmp_path / "runs", **kw)


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
        assert r.data.tags["study"] == "quickstart" and r.data.tags["git_sha"] and r.data.tags["ray_version"]
        assert "prune.keep_fraction" in r.data.params and "attack.schedule" in r.data.params
        assert r.info.status == ("FAILED" if number in failed else "FINISHED")
        history = client.get_metric_history(r.info.run_id, "train_loss")
        assert [m.step for m in history] == [1, 2]  # per epoch, no duplicates after a resume
        if number not in failed:
            assert r.data.metrics["robust_acc"] == pytest.approx(study.trials[number].values[1])
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
    runner.report_study("quickstart", runs_dir=tmp_path / "runs")
    assert "Pareto front of study 'quickstart'" in capsys.readouterr().out
    # resuming a finished study changes nothing
    again = runner.resume_study("quickstart", runs_dir=tmp_path / "runs", run_trial=fake_run_trial,
                                pretrain=fake_pretrain)
    assert again.status == "complete"
    _check_consistent(tmp_path, 3)


def test_failing_and_nan_trials_are_failed_and_the_study_completes(tmp_path):
    trial = functools.partial(fake_run_trial, fail=(0,), nan=(2,))
    outcome = _run(tmp_path, _space(n_trials=4), run_trial=trial)
    assert outcome.status == "complete" and (outcome.complete, outcome.failed) == (2, 2)
    study = _check_consistent(tmp_path, 4, failed=(0, 2))
    assert "raised" in study.trials[0].user_attrs["fail_reason"]


def test_interrupted_study_resumes_to_exactly_n_trials(tmp_path):
    marker = tmp_path / "interrupted"
    trial = functools.partial(fake_run_trial, interrupt=(2, os.getpid(), str(marker)))
    first = _run(tmp_path, _space(n_trials=5, concurrent=1), run_trial=trial)
    assert first.status == "interrupted" and marker.exists()
    study = _optuna(tmp_path)
    assert len(study.trials) < 5 and study.trials[2].state == TrialState.RUNNING
    # an Optuna trial asked just before the driver died (never reached Tune's checkpoint): an orphan
    orphan = study.ask()
    with pytest.raises(Exception):
        runner.run_study(_space(n_trials=5, concurrent=1), runs_dir=tmp_path / "runs")  # exists: resume it
    log = tmp_path / "starts.txt"
    second = runner.resume_study("quickstart", runs_dir=tmp_path / "runs", pretrain=fake_pretrain,
                                 run_trial=functools.partial(logging_trial, log=str(log), inner=trial))
    assert "quickstart-0002 1" in log.read_text().splitlines()  # continued from its epoch-1 checkpoint
    assert second.status == "complete"
    study = _check_consistent(tmp_path, 5)
    assert study.trials[orphan.number].state == TrialState.COMPLETE  # adopted, not duplicated


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
    assert type(runner.open_storage(f"journal://{tmp_path}/a.log")).__name__ == "JournalStorage"
    assert type(runner.open_storage(str(tmp_path / "b.journal"))).__name__ == "JournalStorage"
    assert type(runner.open_storage(f"sqlite:///{tmp_path}/c.db")).__name__ == "RDBStorage"
    with pytest.raises(Exception, match="neither a database URL"):
        runner.open_storage(str(tmp_path / "d.txt"))


@pytest.mark.slow
def test_quickstart_on_digits_with_the_real_pipeline(tmp_path):
    """The real pipeline, tiny: 3 trials of 1+1 epochs after a 2-epoch pretraining."""
    space = load_space(QUICKSTART, {"study.n_trials": 3, "study.max_concurrent": 2, "trial.pretrain.epochs": 2,
                                    "trial.prune_stage.epochs": 1, "trial.finetune.epochs": 1,
                                    "trial.eval.points": 200, "trial.eval.val_points": 100})
    outcome = runner.run_study(space, runs_dir=tmp_path / "runs")
    assert outcome.status == "complete" and outcome.complete + outcome.failed == 3
    study = _optuna(tmp_path)
    assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.FAIL}
    best = study.best_trials[0]
    out = tmp_path / "runs" / "quickstart" / "trials" / f"{best.number:04d}"
    assert (out / "model.pt").is_file() and (out / "result.json").is_file()
    assert 0 < best.user_attrs["params_kept"] < best.user_attrs["params_total"]
    # the nested MLflow run carries the exported model and the node that ran the trial
    client, parent, children = _mlflow(tmp_path)
    run = next(r for r in children if r.data.tags.get("optuna_trial_number") == str(best.number))
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/model.pt", "model/result.json"}
    assert run.data.tags.get("ray_node_id")
