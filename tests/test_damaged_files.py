"""The damaged-file matrix: `study report` and `study resume` on a small study whose files are missing, empty,
truncated, garbage bytes or valid JSON/YAML of the wrong shape (one parametrized test).

- The sources of truth (the Optuna storage, study.json, space.yaml) are refused in one line naming the file,
  exit status 2, nothing created, never a traceback; a manifest that names another study's storage is refused,
  not followed.
- Derived files (pareto.csv, confirm.json, baselines.json, a trial's result.json / final.json, whose values the
  storage has) are recomputed or ignored, with a one-line warning naming the file where one is read; the printed
  Pareto front is the undamaged study's, and a value of the wrong type is never printed as a figure.
- .lock: missing is the normal case; damaged, it is a stale lock (taken over with a warning).
- mlflow.db: one line naming it, no traceback.
- A trial's checkpoint.pt (kept only while a trial runs, so damaged in a study stopped mid-trial): the trial
  starts over; the resumed study ends with the undamaged resume's front.

The studies are built once per module with the fake trial (tests/conftest.py) and copied fresh for each case;
the CLI runs in-process (Ray stays up between cases: cli's shutdown of it is patched out).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import ray
from conftest import QUICKSTART, fake_pretrain, fake_run_trial, logging_trial

from study import cli
from study.search.optimize.space import load_space
from study.search.study import resume_study, run_study

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NAME = "quickstart"
DAMAGES = ("missing", "empty", "truncated", "garbage", "wrong_type")
SOURCES = ("study.json", "space.yaml", "optuna.db")
FRONT_TRIAL = "trials/{front}"  # replaced by the first front trial's folder
# file -> (its place under the runs folder, valid content of the wrong shape)
FILES = {
    "study.json": (f"{NAME}/study.json", b'["quickstart", "optuna.db"]'),
    "space.yaml": (f"{NAME}/space.yaml", b"- study\n- trial\n- search\n"),
    "optuna.db": (f"{NAME}/optuna.db", None),  # wrong type: another sqlite database (MLflow's)
    ".lock": (f"{NAME}/.lock", b'["host", 1]'),
    "result.json": (f"{NAME}/{FRONT_TRIAL}/result.json", b'{"config": "tiny", "metrics": "0.7777"}'),
    "final.json": (f"{NAME}/{FRONT_TRIAL}/final.json", b"[1, 2]"),
    "confirm.json": (f"{NAME}/{FRONT_TRIAL}/confirm.json",
                     b'{"metrics": {"test_clean_acc": "0.9731", "test_robust_acc": [0.8642]}, "test_attack": 7}'),
    "pareto.csv": (f"{NAME}/pareto.csv", b"trial,params_kept\nabc,0.5555\n"),
    "baselines.json": (f"{NAME}/baselines.json",
                       b'[{"method": "lwm", "params_kept": "4321", "val_robust_acc": "0.6666"}]'),
    "mlflow.db": ("mlflow.db", None),  # wrong type: another sqlite database (Optuna's)
}
WRONG_FIGURES = ("0.7777", "0.9731", "0.8642", "4321", "0.6666", "0.5555")  # must never be printed
COMMANDS = ("report", "resume")
TEST_ATTACK = "PGD-50 x3 (planted)"


def _space(n_trials: int):
    return load_space(QUICKSTART, {"study.n_trials": n_trials, "study.max_concurrent": 1,
                                   "study.checkpoint_every_s": 0})


def _plant_derived(runs: Path) -> None:
    """What a real study's trials and final evaluation leave and the fake trial does not: a result.json per
    trial, confirm.json per front trial, baselines.json (valid, so that damaging them means something)."""
    import optuna

    from analysis import pareto

    root = runs / NAME
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{root / 'optuna.db'}")
    for t in study.trials:
        folder = root / "trials" / f"{t.number:04d}"
        metrics = {k: v for k, v in t.user_attrs.items() if isinstance(v, float)}
        (folder / "result.json").write_text(json.dumps({"config": {"name": f"{NAME}-{t.number:04d}"},
                                                        "metrics": metrics}))
    for i, t in enumerate(pareto.front_trials(study)):
        (root / "trials" / f"{t.number:04d}" / "confirm.json").write_text(json.dumps({
            "budget": {"points": 100}, "eps": 0.1, "test_attack": TEST_ATTACK,
            "metrics": {"test_clean_acc": 0.81 + i / 100, "test_robust_acc": 0.52 + i / 100, "test_points": 100.0}}))
    (root / "baselines.json").write_text(json.dumps([{"method": "lwm", "keep_fraction": 0.1, "params_kept": 1000.0,
                                                      "val_robust_acc": 0.4, "val_clean_acc": 0.6}]))


def _front(out: str) -> list[dict[str, str]]:
    """The rows of the printed Pareto table (columns cut at the dashed line's gaps)."""
    lines = out.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Pareto front of study")), None)
    assert start is not None, out
    i = next(j for j in range(start, len(lines)) if set(lines[j].strip()) <= {"-", " "} and lines[j].strip())
    spans = [m.span() for m in re.finditer(r"-+", lines[i])]
    header = lines[i - 1]
    cols = [header[a:b + 1 if k < len(spans) - 1 else None].strip() for k, (a, b) in enumerate(spans)]
    rows = []
    for line in lines[i + 1:]:
        if not line.strip() or line.startswith(("written to", "(not written")):
            break
        cells = [line[a:spans[k + 1][0] if k + 1 < len(spans) else None].strip() for k, (a, _) in enumerate(spans)]
        rows.append(dict(zip(cols, cells)))
    return rows


def _validation_front(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The front without the test columns (those come from the derived confirm.json)."""
    return [{k: v for k, v in r.items() if not k.startswith("test") and k != "mlflow_run_id"} for r in rows]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def studies(tmp_path_factory, local_ray):
    """A finished 3-trial study and a 3-trial study stopped while trial 1 trains (its checkpoint.pt on disk),
    with the fronts their undamaged copies print."""
    base = tmp_path_factory.mktemp("damaged")
    finished = base / "finished"
    run_study(_space(3), runs_dir=finished, run_trial=fake_run_trial, pretrain=fake_pretrain,
              final_eval=False)
    _plant_derived(finished)
    stopped = base / "stopped"
    trial = functools.partial(fake_run_trial, interrupt=(1, os.getpid(), str(base / "interrupted")))
    first = run_study(_space(3), runs_dir=stopped, run_trial=trial, pretrain=fake_pretrain, final_eval=False)
    assert first.status == "interrupted"
    assert (stopped / NAME / "trials" / "0001" / "checkpoint.pt").is_file()
    return {"finished": finished, "stopped": stopped}


@pytest.fixture
def cli_run(monkeypatch, capsys, caplog):
    """`study ...` in-process with the fake trial: (exit status, stdout, stderr and log records)."""
    import logging

    monkeypatch.setattr(cli, "_stop_ray", lambda: None)  # Ray stays up for the next case
    real = resume_study

    def resume(*args, **kw):
        return real(*args, **{**kw, "run_trial": kw.get("run_trial") or resume.trial, "pretrain": fake_pretrain})

    resume.trial = fake_run_trial
    monkeypatch.setattr("study.search.study.resume_study", resume)

    def run(argv: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            rc = cli.main(argv)
        out, err = capsys.readouterr()
        return rc, out, err + "\n" + caplog.text

    run.resume = resume
    return run


def _reference(studies, kind: str, command: str, tmp_path: Path, cli_run) -> list[dict[str, str]]:
    """The front the undamaged copy prints (computed once per study and command)."""
    key = (kind, command)
    if key not in _REFERENCE:
        runs = tmp_path / f"reference-{kind}-{command}"
        shutil.copytree(studies[kind], runs)
        rc, out, err = cli_run([command, NAME, "--runs-dir", str(runs)])
        assert rc == 0 and "Traceback" not in out + err, out + err
        _REFERENCE[key] = _front(out)
    return _REFERENCE[key]


_REFERENCE: dict[tuple[str, str], list[dict[str, str]]] = {}


def _damage(path: Path, how: str, wrong: bytes) -> None:
    if how == "missing":
        path.unlink(missing_ok=True)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\xff\xfe\x00" + random.Random(7).randbytes(1021))  # not UTF-8, not JSON, not sqlite
    else:
        path.write_bytes(wrong)


def _stale_lock(path: Path) -> None:
    """A lock a dead driver left (what truncating or retyping starts from)."""
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "start": "", "since": 0,
                                "command": "study run"}))


CASES = [pytest.param("finished", f, d, c, id=f"{c}-{f}-{d}") for f in FILES for d in DAMAGES for c in COMMANDS]
CASES += [pytest.param("stopped", f, d, "resume", id=f"resume-stopped-{f}-{d}")
          for f in ("checkpoint.pt", "final.json") for d in DAMAGES]
CASES += [pytest.param("finished", "study.json", "other_storage", c, id=f"{c}-study.json-other_storage")
          for c in COMMANDS]


@pytest.mark.slow
@pytest.mark.parametrize("kind,name,how,command", CASES)
def test_damaged_file(studies, tmp_path, cli_run, kind, name, how, command):
    import optuna
    import torch

    expected = _reference(studies, kind, command, tmp_path, cli_run)
    runs = tmp_path / "runs"
    shutil.copytree(studies[kind], runs)
    root = runs / NAME
    front = optuna.load_study(study_name=NAME, storage=f"sqlite:///{root / 'optuna.db'}").best_trials
    trial = f"{min(t.number for t in front):04d}" if kind == "finished" else "0001"
    rel = FILES[name][0] if name in FILES else f"{NAME}/trials/{{front}}/{name}"
    path = runs / rel.format(front=trial)
    wrong = FILES[name][1] if name in FILES else None
    if name == "optuna.db":
        wrong = (runs / "mlflow.db").read_bytes()
    elif name == "mlflow.db":
        wrong = (root / "optuna.db").read_bytes()
    elif name == "checkpoint.pt":
        import io

        buf = io.BytesIO()
        torch.save([1, 2], buf)  # loads weights-only, but is no resume state
        wrong = buf.getvalue()
    elif name == "final.json" and kind == "stopped":
        shutil.copy(root / "trials" / "0000" / "final.json", path)  # a complete one to truncate
    if name == ".lock" and how != "missing":
        _stale_lock(path)
    other = None
    if how == "other_storage":  # another study folder's storage (a copy of this one, elsewhere)
        other = tmp_path / "other"
        shutil.copytree(root, other / NAME)
        manifest = json.loads(path.read_text())
        path.write_text(json.dumps({**manifest, "storage": f"sqlite:///{other / NAME / 'optuna.db'}"}))
        before_other = _hashes(other)
    else:
        _damage(path, how, wrong)
    log = tmp_path / "starts.txt"
    cli_run.resume.trial = functools.partial(logging_trial, log=str(log), inner=fake_run_trial)
    before = _hashes(runs)

    rc, out, err = cli_run([command, NAME, "--runs-dir", str(runs)])

    text = out + "\n" + err
    assert "Traceback" not in text, text
    errors = [line for line in err.splitlines() if line.startswith("study: error:")]
    refused = name in SOURCES or (name == "mlflow.db" and command == "resume" and how not in ("missing", "empty"))
    # a damaged .lock: stale (taken over with a warning) or held / refused in one line; either is fine
    refused = refused or (name == ".lock" and how != "missing" and rc == 2)
    if refused:
        assert rc == 2 and len(errors) == 1, text
        assert str(path) in errors[0], errors[0]  # names the file (and what is wrong with it)
        assert _hashes(runs) == before, "a refused command changed the study folder"
        if other is not None:
            assert _hashes(other) == before_other, "the other study's storage was written to"
        return
    assert rc == 0 and not errors, text
    rows = _front(out)
    assert _validation_front(rows) == _validation_front(expected), (rows, expected)
    for figure in WRONG_FIGURES:
        assert figure not in out, f"{figure} (a value of the wrong type) printed:\n{out}"
    mentioned = [line for line in text.splitlines() if path.name in line]
    # the files these commands read in the driver (a trial's checkpoint.pt and final.json are read in its worker,
    # whose line goes to the worker's log: the start-over is checked instead)
    read = {"confirm.json", "result.json", "baselines.json", "mlflow.db"}
    if how != "missing" and name in read:
        assert mentioned, f"no line names {path}:\n{text}"
    if name == "confirm.json":  # the trial's test figures are dropped, not printed wrong
        assert [r.get("test_clean_acc", "") for r in rows if r["trial"] == str(int(trial))] == [""], rows
    if name == "checkpoint.pt" and how != "missing":
        assert f"{NAME}-0001 0" in log.read_text().splitlines()  # the damaged checkpoint's trial started over
    if name == "pareto.csv":
        assert "0.5555" not in path.read_text()  # recomputed


def test_a_journal_left_by_a_killed_writer_is_rolled_back_not_refused(tmp_path):
    """A driver SIGKILLed inside a sqlite transaction leaves a hot journal: the storage is fine once sqlite rolls
    it back, which the checks before a resume or report let it do (a read-only look would be refused). Found by
    tests/test_soak_kills.py's driver kills."""
    import subprocess

    import optuna

    from study.search.optimize.optuna_search import check_resumable

    db = tmp_path / "optuna.db"
    optuna.create_study(study_name=NAME, storage=f"sqlite:///{db}", directions=["minimize", "maximize"]).ask()
    code = ("import os, signal, sqlite3; c = sqlite3.connect(%r, isolation_level=None); c.execute('PRAGMA cache_size=1');"
            "c.execute('BEGIN'); c.execute('CREATE TABLE filler (x)');"
            "[c.execute('INSERT INTO filler VALUES (?)', (b'x' * 4000,)) for _ in range(300)];"
            "c.execute('UPDATE studies SET study_name = study_name'); os.kill(os.getpid(), signal.SIGKILL)") % str(db)
    subprocess.run([sys.executable, "-c", code], check=False)
    assert (tmp_path / "optuna.db-journal").is_file()  # the killed writer's hot journal
    check_resumable(f"sqlite:///{db}", NAME, [0])
    assert not (tmp_path / "optuna.db-journal").exists()  # rolled back
    assert len(optuna.load_study(study_name=NAME, storage=f"sqlite:///{db}").trials) == 1


# ---------------------------------------------------------------------------------------------------
# `study ui` on a copy of the finished study (its refusals: tests/test_ui.py).


@pytest.mark.slow
def test_ui_serves_a_copied_studys_own_artifacts(studies, tmp_path):
    """A copied study folder (with its runs folder's mlflow.db and mlartifacts/) shown by `study ui`, no repair
    step before: MLflow's server lists and sends the copy's artifacts, not the original's, and Ctrl-C stops it."""
    import signal
    import subprocess
    import time
    import urllib.error
    import urllib.request

    from conftest import ROOT
    from mlflow.tracking import MlflowClient

    runs = tmp_path / "moved" / "runs"
    shutil.copytree(studies["finished"], runs)
    original = _hashes(studies["finished"])
    artifact = sorted((runs / "mlartifacts" / NAME).glob("*/artifacts/trial_config.json"))[0]  # a trial run's
    run_id = artifact.parent.parent.name
    marker = json.dumps({"the copy's own": run_id}).encode()
    artifact.write_bytes(marker)  # the original's file says something else
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "study.cli", "ui", NAME, "--runs-dir", str(runs),
                                 "--port", str(port), "--no-browser"], stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 300
        while "MLflow UI of study" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        client = MlflowClient(tracking_uri=base)  # MLflow's REST API
        experiment = client.get_experiment_by_name(NAME).experiment_id
        assert f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning" in log.read_text()
        run = client.get_run(run_id)
        assert run.data.tags["run_role"] == "trial"
        assert "trial_config.json" in [a.path for a in client.list_artifacts(run_id)]
        # through the server, as its UI reads them
        with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_id={run_id}") as r:
            assert "trial_config.json" in [f["path"] for f in json.loads(r.read())["files"]]
        with urllib.request.urlopen(f"{base}/get-artifact?path=trial_config.json&run_uuid={run_id}") as r:
            assert r.read() == marker
        assert Path(client.download_artifacts(run_id, "trial_config.json", str(tmp_path))).read_bytes() == marker
        assert run.info.artifact_uri.startswith((runs / "mlartifacts" / NAME).resolve().as_uri())
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
        rc = proc.wait(timeout=60)
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text, text
    with pytest.raises(urllib.error.URLError):  # the server is gone with it
        urllib.request.urlopen(f"{base}/health", timeout=5)
    assert _hashes(studies["finished"]) == original  # the original study is untouched
