"""Library lines kept out of a study's log (study.search.running.quiet): alembic's and MLflow's on a new
sqlite store, matplotlib's font cache, Ray's token-authentication notice; their real warnings stay."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from study.search.running import quiet

ROOT = Path(__file__).resolve().parents[1]

# A study's driver as run from Python (no `study` command): logging at INFO, then the MLflow warm-up, a new
# sqlite store opened through the Tracker, and matplotlib building its font cache in a new folder.
STORE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from study.search.running import warmup
from study.search.recording.tracking import Tracker
uri = sys.argv[1]
warmup.start_mlflow(uri)
warmup.open_mlflow(uri)
print("experiment", Tracker(uri, "quiet").experiment_id)
import matplotlib.font_manager
logging.getLogger("alembic.runtime.migration").warning("a real alembic warning")
logging.getLogger("matplotlib.font_manager").error("a real font error")
"""
NOISE = ("alembic", "setup plugin", "Running upgrade", "Context impl", "Creating initial MLflow database tables",
         "Updating database tables", "fontManager", "font cache")


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "MPLCONFIGDIR")}
    env.update(PYTHONPATH=str(ROOT), **more)
    return env


def test_a_new_mlflow_store_and_font_cache_leave_no_routine_lines(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = subprocess.run([sys.executable, "-c", STORE, uri], capture_output=True, text=True, timeout=300,
                         env=_env(MPLCONFIGDIR=str(tmp_path / "mpl")), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "experiment" in run.stdout and (tmp_path / "mlflow.db").is_file()
    assert (tmp_path / "mpl").is_dir()  # matplotlib did build its font cache there
    lines = run.stderr.splitlines()
    real = [ln for ln in lines if "a real alembic warning" in ln or "a real font error" in ln]
    assert len(real) == 2, run.stderr  # warnings and errors of those loggers still reach the log
    noise = [ln for ln in lines if ln not in real and any(word in ln for word in NOISE)]
    assert not noise, noise


def test_matplotlib_gets_a_writable_folder_only_where_its_own_is_not(tmp_path, monkeypatch):
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert quiet.matplotlib_dir() is None and "MPLCONFIGDIR" not in os.environ  # ~/.config/matplotlib can be made
    (tmp_path / "config").write_text("")  # a file where the folder would be: matplotlib cannot use it
    assert quiet.matplotlib_dir() == str(tmp_path / "cache" / "matplotlib")
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path / "cache" / "matplotlib")
    assert quiet.matplotlib_dir() is None  # set once: kept


def test_ray_auth_is_said_explicitly_only_for_a_local_ray_before_ray_is_imported(monkeypatch):
    monkeypatch.delenv(quiet.AUTH_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "ray", sys.modules.get("ray") or object())  # imported: too late
    assert not quiet.local_ray_auth(joins_cluster=False) and quiet.AUTH_ENV not in os.environ
    monkeypatch.delitem(sys.modules, "ray")
    assert not quiet.local_ray_auth(joins_cluster=True) and quiet.AUTH_ENV not in os.environ
    monkeypatch.setenv(quiet.AUTH_ENV, "disabled")
    assert not quiet.local_ray_auth(joins_cluster=False) and os.environ[quiet.AUTH_ENV] == "disabled"
    monkeypatch.delenv(quiet.AUTH_ENV)
    assert quiet.local_ray_auth(joins_cluster=False) and os.environ[quiet.AUTH_ENV] == "token"


LOCAL_RAY = """
from study.search.running.ray_cluster import start_ray
start_ray(num_cpus=1)  # imports ray
import ray
print("task", ray.get(ray.remote(lambda: 7).remote()))
ray.shutdown()
"""


def test_a_local_ray_starts_with_token_auth_and_without_its_warning(tmp_path):
    run = subprocess.run([sys.executable, "-c", LOCAL_RAY], capture_output=True, text=True, timeout=300,
                         env=_env(RAY_USAGE_STATS_ENABLED="0"), cwd=tmp_path)
    assert run.returncode == 0 and "task 7" in run.stdout, run.stderr
    assert "Token authentication" not in run.stderr, run.stderr
