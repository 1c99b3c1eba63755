"""Checks before anything starts (study.search.running.preflight, study.trial.strict_yaml): each mistake is one line on
stderr, exit status 2, no traceback, nothing created (no runs folder contents, no mlflow.db) and Ray never
started (ray.init is replaced by a function that fails the test)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import QUICKSTART, ROOT


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    def boom(*a, **k):
        raise AssertionError("ray.init was called: a check ran after Ray started")

    monkeypatch.setattr(ray, "init", boom)
    yield
    assert not ray.is_initialized()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.is_dir() else []


def _refused(tmp_path: Path, capsys, argv: list[str], expect: str) -> str:
    """Run `study <argv>` in this process: exit 2, one line naming `expect`, nothing new under tmp_path."""
    from study.cli import main

    before = _files(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("study: error: ") and expect in lines[0], lines[0]
    assert _files(tmp_path) == before  # no runs folder, no study folder, no mlflow.db, no optuna.db
    return lines[0]


def _run(tmp_path: Path, *more: str, space: Path = QUICKSTART) -> list[str]:
    return ["run", str(space), "--runs-dir", str(tmp_path / "runs"), *more]


# --- the runs folder, the Optuna storage, the MLflow store ---------------------------------------------


def test_runs_dir_that_is_a_file_or_under_a_file_is_refused(tmp_path, capsys, no_ray):
    (tmp_path / "plain.txt").write_text("x")
    line = _refused(tmp_path, capsys, ["run", str(QUICKSTART), "--runs-dir", str(tmp_path / "plain.txt")],
                    "is a file, not a folder")
    assert "--runs-dir" in line
    _refused(tmp_path, capsys, ["run", str(QUICKSTART), "--runs-dir", str(tmp_path / "plain.txt" / "runs")],
             f"{tmp_path / 'plain.txt'} is a file, not a folder")


def test_runs_dir_with_a_name_longer_than_the_file_system_allows_is_refused(tmp_path, capsys, no_ray):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    line = _refused(tmp_path, capsys, ["run", str(QUICKSTART), "--runs-dir", str(tmp_path / ("r" * (limit + 1)) / "x")],
                    f"is {limit + 1} bytes long; the file system of {tmp_path} allows {limit}")
    assert line.startswith("study: error: --runs-dir")


def test_sqlite_storage_that_is_a_folder_or_under_a_file_is_refused(tmp_path, capsys, no_ray):
    (tmp_path / "db").mkdir()
    _refused(tmp_path, capsys, _run(tmp_path, "--storage", f"sqlite:///{tmp_path / 'db'}"), "is a folder, not a database")
    (tmp_path / "plain.txt").write_text("x")
    _refused(tmp_path, capsys, _run(tmp_path, "--storage", f"sqlite:///{tmp_path / 'plain.txt' / 'o.db'}"),
             "is a file, not a folder")


@pytest.mark.parametrize("uri", ["ftp://x", "s3://bucket/mlruns", "gopher://host/x"])
def test_tracking_uri_of_a_scheme_mlflow_cannot_store_runs_in_is_refused(tmp_path, capsys, no_ray, uri):
    line = _refused(tmp_path, capsys, _run(tmp_path, "--tracking-uri", uri), "MLflow cannot store runs at a")
    assert line.startswith(f"study: error: --tracking-uri {uri}:") and "sqlite://" in line


def test_missing_postgresql_driver_names_the_package_sqlalchemy_imports(tmp_path, capsys, no_ray):
    line = _refused(tmp_path, capsys, _run(tmp_path, "--storage", "postgresql://u@127.0.0.1/x"),
                    "driver is not installed (psycopg)")
    assert "pip install 'psycopg[binary]'" in line and "psycopg2" not in line


# --- unwritable places: root ignores permissions, so the command runs without CAP_DAC_OVERRIDE ---------


def _without_dac_override() -> list[str]:
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): permissions cannot be enforced")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


def _refused_unprivileged(tmp_path: Path, argv: list[str], expect: str) -> str:
    before = _files(tmp_path)
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT)}
    code = "import ray, sys\nfrom study.cli import main\n" \
           "def boom(*a, **k): raise AssertionError('ray.init was called')\nray.init = boom\nsys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([*_without_dac_override(), sys.executable, "-c", code, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("study: error: ")]
    assert len(errors) == 1 and expect in errors[0], lines
    assert _files(tmp_path) == before
    return errors[0]


@pytest.mark.slow
def test_unwritable_runs_dir_sqlite_file_and_journal_folder_are_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "optuna.db").write_bytes(b"")
    (locked / "optuna.db").chmod(0o444)
    locked.chmod(0o555)
    writable = tmp_path / "writable"
    writable.mkdir()
    (writable / "ro.db").write_bytes(b"")
    (writable / "ro.db").chmod(0o444)
    try:
        _refused_unprivileged(tmp_path, ["run", str(QUICKSTART), "--runs-dir", str(locked / "runs")],
                              f"--runs-dir {locked / 'runs'}: {locked} is not writable")
        # the database file itself is read-only
        _refused_unprivileged(tmp_path, ["run", str(QUICKSTART), "--runs-dir", str(writable / "runs"),
                                         "--storage", f"sqlite:///{writable / 'ro.db'}"],
                              f"the database file {writable / 'ro.db'} is not writable")
        # the database file could be written but its folder (where SQLite's journal goes) cannot
        (locked / "optuna.db").chmod(0o666)
        _refused_unprivileged(tmp_path, ["run", str(QUICKSTART), "--runs-dir", str(writable / "runs"),
                                         "--storage", f"sqlite:///{locked / 'optuna.db'}"],
                              f"--storage sqlite:///{locked / 'optuna.db'}: {locked} is not writable")
    finally:
        locked.chmod(0o755)


# --- the search-space file and --set ---------------------------------------------------------------------


def _space_file(tmp_path: Path, edit=None, text: str | None = None) -> Path:
    raw = yaml.safe_load(QUICKSTART.read_text())
    if edit:
        edit(raw)
    path = tmp_path / "space.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("where, value", [("attack", float("nan")), ("finetune", float("inf"))])
def test_non_finite_number_in_a_space_file_is_refused(tmp_path, capsys, no_ray, where, value):
    def edit(raw):
        raw["study"]["time_budget_s"] = value if where == "finetune" else 0
        raw["trial"].setdefault("attack", {})["eps"] = value if where == "attack" else 0.1

    space = _space_file(tmp_path, edit)
    key = "trial.attack.eps" if where == "attack" else "study.time_budget_s"
    line = _refused(tmp_path, capsys, _run(tmp_path, space=space), f"{key}: {value!r} is not a finite number")
    assert str(space) in line


@pytest.mark.parametrize("override", ["trial.attack.eps=.nan", "study.time_budget_s=.inf",
                                      "search.attack.steps={choice: [1, .inf]}"])
def test_non_finite_number_in_a_set_override_is_refused(tmp_path, capsys, no_ray, override):
    key = override.split("=", 1)[0]
    _refused(tmp_path, capsys, _run(tmp_path, "--set", override), f"--set {key}")


def test_non_finite_override_of_a_trial_is_refused(tmp_path, capsys):
    config = tmp_path / "trial.yaml"
    config.write_text("data: {name: digits}\n")
    _refused(tmp_path, capsys, ["trial", str(config), "--set", "attack.eps=.nan", "--output", str(tmp_path / "o")],
             "--set attack.eps: nan is not a finite number")


def test_duplicate_key_in_a_space_file_is_refused_naming_key_and_lines(tmp_path, capsys, no_ray):
    text = QUICKSTART.read_text()
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("n_trials:"))
    lines.insert(at + 1, lines[at].split("n_trials:")[0] + "n_trials: 99")
    space = _space_file(tmp_path, text="\n".join(lines) + "\n")
    line = _refused(tmp_path, capsys, _run(tmp_path, space=space),
                    f"n_trials: duplicate key at line {at + 2} (first at line {at + 1})")
    assert str(space) in line


def test_duplicate_key_in_a_flow_mapping_of_a_set_override_is_refused(tmp_path, capsys, no_ray):
    _refused(tmp_path, capsys, _run(tmp_path, "--set", "search.attack.steps={int: [1, 3], int: [1, 5]}"),
             "int: duplicate key")


def test_yaml_anchors_and_merge_keys_still_load(tmp_path):
    from study.trial.strict_yaml import loads

    assert loads("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n") == {"base": {"x": 1, "y": 2},
                                                                          "other": {"x": 1, "y": 3}}


@pytest.mark.parametrize("content, expect", [
    (QUICKSTART.read_text().replace("study:", "# caf\xe9\nstudy:", 1).encode("latin-1"), "not UTF-8 text (byte 0xe9"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file (a NUL byte at offset 8)"),
    (QUICKSTART.read_text().encode("utf-16"), "not a text file"),
])
def test_non_utf8_or_binary_space_file_is_refused(tmp_path, capsys, no_ray, content, expect):
    space = tmp_path / "space.yaml"
    space.write_bytes(content)
    line = _refused(tmp_path, capsys, _run(tmp_path, space=space), expect)
    assert str(space) in line


def test_a_utf8_space_file_with_a_bom_and_accents_loads(tmp_path):
    from study.search.optimize.space import load_space

    space = tmp_path / "space.yaml"
    space.write_bytes(b"\xef\xbb\xbf" + QUICKSTART.read_text().replace("study:", "# café\nstudy:", 1).encode())
    assert load_space(space).study.name == "quickstart"
