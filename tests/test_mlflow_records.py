"""The MLflow records as their users read them: trial runs driven through MlflowTrialCallback with fake Tune
trials against a sqlite store (stage-prefixed metrics at the global step, no bookkeeping metrics, no duplicate
points after a resume), the data set as a dataset input, MLflow's standard source and git tags, and summary
metrics of the parent run logged once per value."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import QUICKSTART

from study.keys import NUMBER_KEY
from study.search.optimize.space import load_space
from study.search.recording import provenance
from study.search.recording.tracking import Tracker, open_parent_run
from study.search.recording.trial_callback import MlflowTrialCallback, epoch_record
from study.trial.config import DataConfig, TrialConfig

STAGES = [("prune", 1), ("prune", 2), ("finetune", 1), ("finetune", 2)]


def _epoch(step: int) -> dict:
    """One epoch report as Tune hands it to the callback: the trainable's record plus Tune's own keys."""
    stage, epoch = STAGES[step - 1]
    return {"train_loss": 1.0 / step, "val_robust_acc": 0.1 * step, "val_clean_acc": 0.2 * step, "epoch_s": 0.5,
            "stage": stage, "epoch": epoch, "step": step, "ray_node_id": "node-a", "training_iteration": step,
            "time_this_iter_s": 0.5, "time_total_s": 0.5 * step, "timestamp": 1700000000 + step,
            "time_since_restore": 0.5 * step, "iterations_since_restore": step, "done": False, "pid": 123,
            "trial_id": "t0", "date": "2026-01-01"}


FINAL = {"val_robust_acc": 0.45, "val_clean_acc": 0.8, "params_kept": 1000.0, "final": 1, "step": 5,
         "ray_node_id": "node-a", "training_iteration": 5, "time_total_s": 3.0}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def store(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "records", artifact_root=str(tmp_path / "art"))
    (tmp_path / "space.yaml").write_text("study: {}\n")
    data = DataConfig(name="digits", train_limit=400)
    parent = open_parent_run(tracker, "records", params={"study.n_trials": 1}, data=data)
    cfg = TrialConfig(data=data)

    def callback():  # one per driver: a resumed study's callback knows nothing of the last one's runs
        return MlflowTrialCallback(tracker, "records", parent, str(tmp_path / "space.yaml"),
                                   trial_config=lambda config: cfg)

    return SimpleNamespace(tracker=tracker, parent=parent, data=data, callback=callback)


def _history(tracker, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = tracker.client.get_run(run_id)
    return {k: sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, k))
            for k in run.data.metrics}


def test_epoch_records_are_named_by_their_stage_without_bookkeeping():
    metrics, tags = epoch_record(_epoch(3))
    assert metrics == {"finetune/train_loss": pytest.approx(1 / 3), "finetune/val_robust_acc": pytest.approx(0.3),
                       "finetune/val_clean_acc": pytest.approx(0.6), "finetune/epoch_s": 0.5}
    assert tags == {"stage": "finetune", "ray_node_id": "node-a"}
    final, tags = epoch_record(FINAL)  # the final report: its figures by their own names
    assert final == {"val_robust_acc": 0.45, "val_clean_acc": 0.8, "params_kept": 1000.0}
    assert "stage" not in tags


def test_trial_runs_chart_by_stage_and_a_resume_logs_no_epoch_twice(store):
    trial = SimpleNamespace(trial_id="t0", config={NUMBER_KEY: 0}, last_result={})
    first = store.callback()
    first.on_trial_start(0, [trial], trial)
    for step in (1, 2):
        first.on_trial_result(0, [trial], trial, _epoch(step))
    run_id = first._runs["t0"]
    # the driver dies; a new one continues the trial (a new Tune trial id) from its checkpoint, which carries
    # the epoch reports up to it: the trainable reports them again first, then trains on
    again = SimpleNamespace(trial_id="t0-resumed", config={NUMBER_KEY: 0}, last_result={})
    second = store.callback()
    assert store.tracker.last_step(store.tracker.client.get_run(run_id)) == 2
    for result in [_epoch(1), _epoch(2), _epoch(3), _epoch(4), FINAL]:
        second.on_trial_result(0, [again], again, result)
    assert second._runs["t0-resumed"] == run_id  # the same run, found by its Optuna number
    # ... and the whole trial reported once more (a third driver, the trial's final.json reported again)
    third = store.callback()
    for result in [_epoch(1), _epoch(2), _epoch(3), _epoch(4), FINAL]:
        third.on_trial_result(0, [again], again, result)

    hist = _history(store.tracker, run_id)
    assert set(hist) == {f"{s}/{k}" for s in ("prune", "finetune") for k in ("train_loss", "val_robust_acc",
                                                                            "val_clean_acc", "epoch_s")} | {
        "val_robust_acc", "val_clean_acc", "params_kept"}
    assert not {"epoch", "step", "stage", "training_iteration"} & set(hist)
    assert not [k for k in hist if "time" in k or k in ("timestamp", "pid", "iterations_since_restore")]
    assert hist["prune/val_robust_acc"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2))]
    assert hist["finetune/train_loss"] == [(3, pytest.approx(1 / 3)), (4, pytest.approx(0.25))]
    assert hist["val_robust_acc"] == [(5, 0.45)]  # the final figure, after the last epoch's step
    run = store.tracker.client.get_run(run_id)
    assert run.data.tags["stage"] == "finetune" and "stage_codes" not in run.data.tags
    assert store.tracker.last_step(run) == 5


def test_runs_carry_the_data_set_and_mlflows_source_and_git_tags(store):
    trial = SimpleNamespace(trial_id="t1", config={NUMBER_KEY: 1}, last_result={})
    callback = store.callback()
    callback.on_trial_start(0, [trial], trial)
    client = store.tracker.client
    runs = {"parent": client.get_run(store.parent), "trial": client.get_run(callback._runs["t1"])}
    digest = provenance.dataset_digest(store.data)
    for role, run in runs.items():
        inputs = run.inputs.dataset_inputs
        assert len(inputs) == 1, role
        ds = inputs[0].dataset
        assert (ds.name, ds.digest, ds.source_type) == ("digits", digest, "local"), role
        assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "training"}, role
        assert json.loads(ds.source)["package"] == "scikit-learn"
        assert json.loads(ds.profile) == {"val_fraction": 0.1, "train_limit": 400, "split_seed": 0}
        tags = run.data.tags
        assert "git_sha" not in tags, role
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"], role
        assert tags["mlflow.user"] and tags["python_version"] and tags["mlflow_version"], role
        assert tags["mlflow.source.git.commit"] == _git("rev-parse", "HEAD"), role
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        assert tags.get("mlflow.source.git.branch") == (branch if branch != "HEAD" else None), role
    # a reopened parent run (study resume) logs the same input again: still one
    assert open_parent_run(store.tracker, "records", data=store.data) == store.parent
    assert len(client.get_run(store.parent).inputs.dataset_inputs) == 1


def test_the_dataset_digest_is_stable_and_names_what_decides_the_points(tmp_path):
    a = DataConfig(name="fashion_mnist", root=str(tmp_path / "data"))
    assert provenance.dataset_digest(a) == provenance.dataset_digest(DataConfig(name="fashion_mnist",
                                                                                 root=str(tmp_path / "data")))
    assert len(provenance.dataset_digest(a)) == provenance.DIGEST_CHARS
    others = [DataConfig(name="fashion_mnist", root=str(tmp_path / "data"), split_seed=1),
              DataConfig(name="fashion_mnist", root=str(tmp_path / "data"), val_fraction=0.2),
              DataConfig(name="fashion_mnist", root=str(tmp_path / "data"), train_limit=10),
              DataConfig(name="fashion_mnist", root=str(tmp_path / "elsewhere")),
              DataConfig(name="mnist", root=str(tmp_path / "data"))]
    assert len({provenance.dataset_digest(d) for d in [a, *others]}) == 6
    assert DataConfig(name="fashion_mnist", batch_size=7, root=str(tmp_path / "data")) != a
    assert provenance.dataset_digest(DataConfig(name="fashion_mnist", batch_size=7, root=str(tmp_path / "data"))) \
        == provenance.dataset_digest(a)  # batches are not the data
    source_type, source, _ = provenance.dataset_source(a)
    assert source_type == "local" and json.loads(source) == {"uri": (tmp_path / "data").as_uri()}
    assert provenance.dataset_source(DataConfig(name="cifar10", root="s3://bucket/data"))[:2] == (
        "s3", json.dumps({"uri": "s3://bucket/data"}))
    # digits ships with scikit-learn: its folder setting is no part of its identity
    assert provenance.dataset_digest(DataConfig(root="x")) == provenance.dataset_digest(DataConfig(root="y"))


def test_source_names_and_repository_urls():
    assert provenance.source_name(["/venv/bin/study", "run", "space.yaml"]) == "study run"
    assert provenance.source_name(["/venv/bin/study", "-q", "resume", "quickstart"]) == "study resume"
    assert provenance.source_name(["/repo/study/cli.py", "report", "x"]) == "study report"
    assert provenance.source_name(["/venv/lib/pytest/__main__.py", "-q"]) == "pytest"
    assert provenance.source_name([]) == "python"
    strip = provenance._without_credentials
    assert strip("https://user:token@github.com/o/r.git") == "https://github.com/o/r.git"
    assert strip("git@github.com:o/r.git") == "git@github.com:o/r.git"


def test_summary_metrics_are_logged_once_per_value(store):
    from analysis.report import log_report

    tracker, parent = store.tracker, store.parent
    assert tracker.log_summary(parent, {"trials_complete": 3, "hypervolume": 0.5}) == {"trials_complete": 3.0,
                                                                                       "hypervolume": 0.5}
    assert tracker.log_summary(parent, {"trials_complete": 3, "hypervolume": 0.5}) == {}
    assert tracker.log_summary(parent, {"trials_complete": 4, "hypervolume": 0.5}, tags={"t": "x"}) == {
        "trials_complete": 4.0}
    hist = _history(tracker, parent)
    assert hist["hypervolume"] == [(0, 0.5)] and hist["trials_complete"] == [(0, 3.0), (1, 4.0)]
    assert tracker.client.get_run(parent).data.tags["t"] == "x"
    # `study report` twice: the report's summary once
    folder = Path(tracker.artifact_root).parent / "report"
    folder.mkdir()
    (folder / "index.html").write_text("<html></html>")
    space = load_space(QUICKSTART)
    summary = {"hypervolume": 0.5, "pareto_size": 2.0, "dense_val_robust_acc": 0.6}
    for _ in range(2):
        log_report(tracker, parent, folder, summary, {"recommendation": "knee"}, SimpleNamespace(front=[]), space)
    hist = _history(tracker, parent)
    assert {k: len(hist[k]) for k in summary} == {k: 1 for k in summary}
    assert tracker.client.get_run(parent).data.tags["recommendation"] == "knee"

