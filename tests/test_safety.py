"""A study folder that is safe: relocatable, locked against a second driver, checked before anything is
created, and damaged files reported in one line (docs/reliability.md lists every case and its test)."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import optuna
import pytest
import ray
from optuna.trial import TrialState

from conftest import QUICKSTART, fake_pretrain, fake_run_trial

from study.search.folder import layout
from study.search.optimize.space import load_space
from study.search.study import report_study, resume_study, run_study
import study.search.study as study_module

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _space(n_trials=3, concurrent=1, **more):
    return load_space(QUICKSTART, {"study.n_trials": n_trials, "study.max_concurrent": concurrent, **more})


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# (a) A study folder names its parts relative to itself.


def test_manifest_is_relative_and_old_absolute_manifests_are_migrated(tmp_path):
    root = tmp_path / "runs" / "s"
    m = layout.Manifest(name="s", space_file="x.yaml", storage=f"sqlite:///{root / 'optuna.db'}",
                        tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", runs_dir=str(tmp_path / "runs"))
    m.save(root / "study.json")
    raw = json.loads((root / "study.json").read_text())
    assert (raw["storage"], raw["tracking_uri"], raw["runs_dir"]) == ("optuna.db", "../mlflow.db", "..")
    moved = tmp_path / "elsewhere" / "runs"
    shutil.copytree(tmp_path / "runs", moved)
    loaded = layout.Manifest.load(moved / "s" / "study.json")
    assert loaded.storage == f"sqlite:///{moved.resolve() / 's' / 'optuna.db'}"
    assert loaded.tracking_uri == f"sqlite:///{moved.resolve() / 'mlflow.db'}"
    # a URL the user gave stays as given
    user = layout.Manifest(name="s", space_file="", storage="postgresql://u@db/x", tracking_uri="http://mlflow:5000",
                           runs_dir=str(tmp_path / "runs"))
    user.save(root / "study.json")
    assert layout.Manifest.load(root / "study.json").storage == "postgresql://u@db/x"
    # an earlier release's absolute manifest, read from a moved folder: migrated by its tail
    (moved / "s" / "study.json").write_text(json.dumps(dataclass_dict(m)))
    old = layout.Manifest.load(moved / "s" / "study.json")
    assert old.storage == f"sqlite:///{moved.resolve() / 's' / 'optuna.db'}"
    assert old.tracking_uri == f"sqlite:///{moved.resolve() / 'mlflow.db'}"


def dataclass_dict(m):
    import dataclasses

    return dataclasses.asdict(m)


@pytest.mark.usefixtures("local_ray")
def test_a_copied_study_resumes_and_reports_without_touching_the_original(tmp_path):
    original, copy = tmp_path / "orig" / "runs", tmp_path / "copy" / "runs"
    marker = tmp_path / "interrupted"
    trial = functools.partial(fake_run_trial, interrupt=(1, os.getpid(), str(marker)))
    first = run_study(_space(n_trials=3), runs_dir=original, run_trial=trial, pretrain=fake_pretrain)
    assert first.status == "interrupted"
    shutil.copytree(original, copy)
    before = _tree_hashes(original)

    done = resume_study("quickstart", runs_dir=copy, run_trial=trial, pretrain=fake_pretrain)
    report_study("quickstart", runs_dir=copy)

    assert done.status == "complete"
    assert _tree_hashes(original) == before  # not a byte of the original changed
    trials = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{copy / 'quickstart' / 'optuna.db'}").trials
    assert len(trials) == 3 and {t.state for t in trials} == {TrialState.COMPLETE}
    assert (copy / "quickstart" / "pareto.csv").is_file()
    artifacts = list((copy / "mlartifacts").rglob("pareto.csv"))
    assert artifacts, "the copy's artifacts are written under the copy"
    assert not (copy / "quickstart" / ".lock").exists() and not (original / "quickstart" / ".lock").exists()


# ---------------------------------------------------------------------------------------------------
# (b) One driver per study.


def _cli(argv, capsys):
    import time

    from study.cli import main

    t0 = time.monotonic()
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("study: error:")]
    return rc, errors, err, time.monotonic() - t0


def _fake_study_folder(runs: Path) -> Path:
    root = runs / "quickstart"
    root.mkdir(parents=True)
    (root / "space.yaml").write_text(QUICKSTART.read_text())
    layout.Manifest(name="quickstart", space_file=str(QUICKSTART), storage=f"sqlite:///{root / 'optuna.db'}",
                    tracking_uri=f"sqlite:///{runs / 'mlflow.db'}", runs_dir=str(runs)).save(root / "study.json")
    (root / "optuna.db").write_bytes(b"keep me")
    return root


def test_a_second_driver_is_refused_in_one_line_and_fresh_wipes_nothing(tmp_path, capsys):
    from study.search.folder.lock import StudyLock

    runs = tmp_path / "runs"
    root = _fake_study_folder(runs)
    lock = StudyLock(root).acquire("study run search_spaces/quickstart.yaml")
    try:
        before = _tree_hashes(root)
        for argv in (["run", str(QUICKSTART), "--fresh", "--runs-dir", str(runs)],
                     ["resume", "quickstart", "--runs-dir", str(runs)]):
            rc, errors, err, _ = _cli(argv, capsys)
            assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
            assert f"pid {os.getpid()}" in errors[0] and "in use by another driver" in errors[0]
            assert "since 20" in errors[0] and "host " in errors[0]
            assert _tree_hashes(root) == before  # --fresh wiped nothing
    finally:
        lock.release()
    assert not (root / ".lock").exists()


def test_a_stale_lock_is_taken_over(tmp_path):
    import socket
    import subprocess

    from study.search.folder.lock import StudyLock

    root = tmp_path / "s"
    root.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    for record in ({"host": socket.gethostname(), "pid": gone.pid, "start": "", "since": 0, "command": "x"},
                   {"host": socket.gethostname(), "pid": os.getpid(), "start": "1", "since": 0, "command": "x"}):
        (root / ".lock").write_text(json.dumps(record))  # a dead driver; a pid reused by another process
        with StudyLock(root).acquire("y"):
            assert json.loads((root / ".lock").read_text())["command"] == "y"
        assert not (root / ".lock").exists()
    # a lock held on another host is never taken over
    (root / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0, "command": "x"}))
    with pytest.raises(Exception, match="host elsewhere, pid 1"):
        StudyLock(root).acquire()


# ---------------------------------------------------------------------------------------------------
# (c) Checked before anything is created.


def _refused_before_creation(tmp_path, capsys, *args, expect):
    runs = tmp_path / "runs"
    rc, errors, err, wall = _cli(["run", str(QUICKSTART), "--runs-dir", str(runs), *args], capsys)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert expect in errors[0], errors[0]
    assert wall < 30
    assert not (runs / "quickstart").exists()  # no study folder, no Optuna rows
    assert not (runs / "mlflow.db").exists()  # no MLflow runs
    return errors[0]


def test_missing_data_is_refused_before_anything_is_created(tmp_path, capsys):
    empty = tmp_path / "no_data"
    empty.mkdir()
    _refused_before_creation(tmp_path, capsys, "--set", "trial.data.name=cifar10", "--set", f"trial.data.root={empty}",
                             expect="not found")


def test_unreachable_tracking_uri_is_refused_quickly(tmp_path, capsys):
    with socket_closed_port() as port:
        line = _refused_before_creation(tmp_path, capsys, "--tracking-uri", f"http://127.0.0.1:{port}",
                                        expect="no MLflow server answers")
    assert f"127.0.0.1:{port}" in line


def test_missing_database_driver_is_named(tmp_path, capsys):
    line = _refused_before_creation(tmp_path, capsys, "--storage", "postgresql://u@127.0.0.1/x",
                                    expect="driver is not installed (psycopg)")
    assert "pip install 'psycopg[binary]'" in line  # SQLAlchemy 2.1's postgresql:// imports psycopg 3, not psycopg2


def test_zero_cpus_and_a_dead_address_are_refused(tmp_path, capsys):
    _refused_before_creation(tmp_path, capsys, "--num-cpus", "0", expect="--num-cpus 0")
    with socket_closed_port() as port:
        _refused_before_creation(tmp_path, capsys, "--address", f"127.0.0.1:{port}", expect="no Ray cluster answers")


@pytest.mark.usefixtures("local_ray")
def test_unschedulable_trial_resources_are_refused(tmp_path, capsys):
    line = _refused_before_creation(tmp_path, capsys, "--set", "study.cpus_per_trial=64", expect="needs 64 CPU")
    assert "2 CPU" in line


def socket_closed_port():
    """A context manager giving a local TCP port nobody listens on."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def closed():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        yield port

    return closed()


# ---------------------------------------------------------------------------------------------------
# (d) Damaged or unsafe files: one line naming the file, exit status 2.


class _Code:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _trial_folder(folder: Path, model_bytes: bytes, config: dict | None = None) -> Path:
    from conftest import TINY_TRIAL

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps({"config": config if config is not None else TINY_TRIAL,
                                                    "metrics": {}}))
    (folder / "model.pt").write_bytes(model_bytes)
    return folder


def test_damaged_or_code_carrying_checkpoints_are_refused_in_one_line(tmp_path, capsys):
    import io
    import random

    import torch

    buf, evil = io.BytesIO(), io.BytesIO()
    torch.save({"w": torch.zeros(100, 100)}, buf)
    torch.save({"model": _Code()}, evil)  # a checkpoint whose unpickling would call os.system
    cases = {f"random{i}": (random.Random(i).randbytes(4096), "not a readable model checkpoint") for i in range(8)}
    cases |= {"truncated": (buf.getvalue()[: len(buf.getvalue()) // 2], "not a readable model checkpoint"),
              "code": (evil.getvalue(), "refused: the checkpoint holds more than tensors")}
    for name, (data, expect) in cases.items():
        folder = _trial_folder(tmp_path / name, data)
        rc, errors, err, _ = _cli(["evaluate", str(folder), "--points", "8", "--steps", "1"], capsys)
        assert rc == 2 and len(errors) == 1 and "Traceback" not in err, (name, err)
        assert str(folder / "model.pt") in errors[0] and expect in errors[0], (name, errors[0])
        assert "pwned" not in capsys.readouterr().out


def test_a_result_without_model_or_data_is_refused(tmp_path, capsys):
    from conftest import TINY_TRIAL

    config = {k: v for k, v in TINY_TRIAL.items() if k not in ("model", "data")}
    folder = _trial_folder(tmp_path / "t", b"x", config)
    rc, errors, err, _ = _cli(["evaluate", str(folder)], capsys)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert str(folder / "result.json") in errors[0] and "'model' and 'data'" in errors[0]


@pytest.mark.usefixtures("local_ray")
def test_read_only_study_is_reported_and_a_corrupt_manifest_is_one_line(tmp_path, capsys, monkeypatch, caplog):
    runs = tmp_path / "runs"
    run_study(_space(n_trials=2, concurrent=2), runs_dir=runs, run_trial=fake_run_trial, pretrain=fake_pretrain,
              final_eval=False)
    capsys.readouterr()
    root = runs / "quickstart"
    before = _tree_hashes(runs)
    modes = {p: p.stat().st_mode for p in [runs, *runs.rglob("*")]}
    for p in modes:
        p.chmod(p.stat().st_mode & ~0o222)
    real = study_module._writable
    monkeypatch.setattr(study_module, "_writable", lambda folder: False if Path(folder) == root else real(folder))  # root ignores modes
    try:
        from study.cli import main

        rc = main(["report", "quickstart", "--runs-dir", str(runs)])
        out, err = capsys.readouterr()
        errors = [line for line in err.splitlines() if line.startswith("study: error:")]
        assert "Pareto front of study 'quickstart'" in out and "study folder is read-only" in out
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert rc == 0 and not errors, err
    assert f"the study folder {root} is read-only" in caplog.text  # the warning names the folder
    assert _tree_hashes(runs) == before
    # a corrupt manifest
    (root / "study.json").write_text('{"name": "quickstart", "stor')
    for argv in (["report", "quickstart", "--runs-dir", str(runs)], ["resume", "quickstart", "--runs-dir", str(runs)]):
        rc, errors, err, _ = _cli(argv, capsys)
        assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
        assert str(root / "study.json") in errors[0] and "not a readable study manifest" in errors[0]


# ---------------------------------------------------------------------------------------------------
# (e) The MLflow link opens the experiment's runs, not MLflow 3's GenAI overview.


def test_viewers_name_the_mlflow_runs_page(tmp_path, capsys):
    from study.search import console

    paths = layout.study_paths(tmp_path / "runs", "quickstart")
    m = layout.Manifest(name="quickstart", space_file="", storage=paths.default_storage,
                        tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", runs_dir=str(tmp_path / "runs"))
    console.print_viewers(paths, m, ["params_kept", "val_robust_acc"], "7")
    out = capsys.readouterr().out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'runs' / 'mlflow.db'}" in out
    assert "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning" in out


def broken_pretrain(cfg):
    from study.trial.data import DataError

    raise DataError("data set 'digits' vanished")


@pytest.mark.usefixtures("local_ray")
def test_a_failure_before_the_first_trial_removes_what_it_created(tmp_path):
    from study.trial.data import DataError

    runs = tmp_path / "runs"
    with pytest.raises(DataError, match="vanished"):  # the task's own error, not Ray's wrapper
        run_study(_space(n_trials=2), runs_dir=runs, run_trial=fake_run_trial, pretrain=broken_pretrain)
    assert not (runs / "quickstart").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    assert not client.search_runs([exp.experiment_id])  # the parent run is gone (deleted), none left RUNNING
    # the same command simply runs again
    again = run_study(_space(n_trials=2), runs_dir=runs, run_trial=fake_run_trial, pretrain=fake_pretrain,
                      final_eval=False)
    assert again.status == "complete"
