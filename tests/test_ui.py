"""`study ui NAME` (study.search.recording.ui): what it refuses before any server starts, in one line with
exit status 2 (no such study, a missing or damaged MLflow store, a store still naming another folder's artifacts,
a busy port), and the page it links. The server itself, on a copied study, is tested with the finished study of
tests/test_damaged_files.py (test_ui_serves_a_copied_studys_own_artifacts).
"""
from __future__ import annotations

import socket
import sqlite3
import sys
from pathlib import Path

import pytest
from conftest import QUICKSTART

from study import cli
from study.errors import UserError
from study.search.folder.layout import Manifest
from study.search.recording import ui

NAME = "quickstart"


def _study(runs):
    """A study folder with a manifest and space, and no MLflow store yet (nothing to serve)."""
    root = runs / NAME
    root.mkdir(parents=True)
    (root / "space.yaml").write_text(QUICKSTART.read_text())
    Manifest(name=NAME, space_file=str(QUICKSTART), storage=f"sqlite:///{root / 'optuna.db'}",
             tracking_uri=f"sqlite:///{runs / 'mlflow.db'}", runs_dir=str(runs)).save(root / "study.json")
    return root


def _ui(runs, capsys, name=NAME, *more):
    rc = cli.main(["ui", name, "--runs-dir", str(runs), "--no-browser", *more])
    _, err = capsys.readouterr()
    return rc, [line for line in err.splitlines() if line.strip()]


def test_a_missing_study_or_store_is_refused_in_one_line(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    rc, err = _ui(runs, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("study: error: no study named 'quickstart'"), err
    _study(runs)
    rc, err = _ui(runs, capsys)  # a server on a missing sqlite file would serve a new, empty store
    assert rc == 2 and len(err) == 1 and "mlflow.db does not exist" in err[0], err
    assert not (runs / "mlflow.db").exists()


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00 not sqlite" * 100, "optuna"])
def test_a_damaged_store_is_refused_in_one_line(tmp_path, capsys, content):
    runs = tmp_path / "runs"
    root = _study(runs)
    db = runs / "mlflow.db"
    if content == "optuna":  # a sqlite database, but not MLflow's
        with sqlite3.connect(root / "optuna.db") as con:
            con.execute("CREATE TABLE studies (study_id INTEGER)")
        db.write_bytes((root / "optuna.db").read_bytes())
    else:
        db.write_bytes(content)
    before = db.read_bytes()
    rc, err = _ui(runs, capsys)
    assert rc == 2 and len(err) == 1 and str(db) in err[0], err
    assert db.read_bytes() == before  # not migrated, not replaced


def test_a_store_that_could_not_follow_its_copy_is_refused(tmp_path):
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE experiments (name TEXT, artifact_location TEXT)")
        con.execute("INSERT INTO experiments VALUES (?, ?)", (NAME, "file:///elsewhere/runs/mlartifacts/quickstart"))
    with pytest.raises(UserError, match="could not be updated"):
        ui._check_location(db, NAME, tmp_path / "mlartifacts" / NAME)
    ui._check_location(db, NAME, Path("/elsewhere/runs/mlartifacts/quickstart"))  # its own: fine
    ui._check_location(db, "another", tmp_path / "mlartifacts" / "another")  # no runs yet: nothing to check


def test_a_busy_port_is_refused_and_the_page_is_the_experiments_runs_table():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"--port {port}: 127.0.0.1:{port} is not free"):
            ui.check_port("127.0.0.1", port)
    ui.check_port("127.0.0.1", port)  # free again
    assert ui._page("http://127.0.0.1:5001", "7") == \
        "http://127.0.0.1:5001/#/experiments/7/runs?workflowType=machine_learning"
    assert ui._url_host("0.0.0.0") == "127.0.0.1" and ui._url_host("::1") == "[::1]"
    assert ui.mlflow_command()[0].startswith(str(Path(sys.executable).parent))  # this environment's MLflow
