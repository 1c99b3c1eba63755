"""`study ui NAME`: the study's own MLflow store in MLflow's UI, on this machine, until Ctrl-C.

    study ui quickstart                      http://127.0.0.1:5000/#/experiments/<id>/runs?workflowType=machine_learning
    study ui quickstart --port 5001 --no-browser

The study is found as every command finds it (study.search.study: the folder under --runs-dir, its manifest's
tracking URI). Before MLflow's server starts:
- a missing study, a missing or damaged local MLflow store (study_mlflow.store_problem) is refused in one line
  (a server on a missing sqlite file would serve a new, empty store);
- a local store copied or moved with its runs folder gets its artifact locations pointed at this folder
  (study_mlflow.relocate_artifacts, as `study report` does), so the UI shows the copy's own artifacts, never
  the original's; a store that cannot be updated (read-only) is refused rather than shown with the original's.
Then `mlflow server` (the venv's, beside this Python) serves the store with one worker on --host/--port (MLflow's
GenAI job runner off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says otherwise), the runs view of the study's
experiment is printed (and opened in a browser unless --no-browser), and Ctrl-C (or SIGTERM) stops the server.
A study whose tracking URI is an MLflow server already is not served again: its page is printed.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from pathlib import Path
from typing import Any

from study.errors import ConfigError, UserError

READY_TIMEOUT_S = 180.0  # MLflow's first start on a busy machine imports a lot
STOP_TIMEOUT_S = 20.0


def serve(name: str, runs_dir: str | Path = "runs", host: str = "127.0.0.1", port: int = 5000,
          browser: bool = True) -> int:
    """Serve the study's MLflow store until Ctrl-C; returns the exit status (0: stopped by the user)."""
    if not 1 <= port <= 65535:
        raise ConfigError("--port", f"{port} is out of range; must be in [1, 65535]")
    uri, experiment, artifacts = prepare(name, runs_dir)
    if uri.startswith(("http://", "https://")):  # the study logged to a server: it is up (or not) already
        print(f"study {name!r} is recorded in the MLflow server {uri}; its runs: "
              f"{_page(uri.rstrip('/'), experiment_id(uri.rstrip('/'), experiment))}", flush=True)
        return 0
    check_port(host, port)
    base = f"http://{_url_host(host)}:{port}"
    proc = start_server(uri, host, port, artifacts)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill <pid>` stops it as cleanly as Ctrl-C
    try:
        wait_ready(proc, base)
        url = _page(base, experiment_id(base, experiment))
        print(f"MLflow UI of study {name!r}: {url}\n(serving {uri}; Ctrl-C stops it)", flush=True)
        if browser:
            webbrowser.open(url)
        status = proc.wait()
        print(f"study: the MLflow server stopped on its own (exit status {status})", file=sys.stderr, flush=True)
        return status or 1
    except KeyboardInterrupt:
        print("\nstopping the MLflow server ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_server(proc)


def prepare(name: str, runs_dir: str | Path) -> tuple[str, str, str | None]:
    """The study's tracking URI, experiment name and (for a local store) artifact folder, once the store is
    checked and its artifact locations point at this study folder."""
    from study.search.folder.layout import sqlite_file
    from study.search.recording import study_mlflow
    from study.search.study import Study, _open

    try:
        paths, manifest, space = _open(name, runs_dir)
    except ConfigError as e:  # no such study: one line
        raise UserError(str(e)) from None
    uri = manifest.tracking_uri
    if not uri.startswith("sqlite:"):
        return uri, name, None
    db = sqlite_file(uri)
    if not db.is_file() or db.stat().st_size == 0:
        where = " (an object-store study's MLflow store stays on the machine that ran it)" if paths.remote else ""
        raise UserError(f"study {name!r}: its MLflow store {db} does not exist or is empty{where}: nothing to show")
    problem = study_mlflow.store_problem(uri)
    if problem:
        raise UserError(f"study {name!r}: {problem}; restore it from a copy of the study's runs folder")
    if paths.remote:  # its artifacts are in the bucket, named by their URIs
        return uri, name, None
    study_mlflow.relocate_artifacts(Study(space, paths, manifest))
    artifacts = Path(manifest.runs_dir) / "mlartifacts"
    _check_location(db, name, artifacts / name)
    return uri, name, str(artifacts)


def _check_location(db: Path, experiment: str, own: Path) -> None:
    """After relocation the experiment's artifacts are this folder's: a store still naming another study
    folder's (relocation failed: a read-only copy) is refused, never shown with the original's artifacts."""
    import sqlite3

    try:
        with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True) as con:
            row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)).fetchone()
    except sqlite3.Error as e:
        raise UserError(f"the MLflow store {db} is not readable ({e})") from None
    location = str(row[0]) if row and row[0] else ""
    if not location.endswith(f"/mlartifacts/{experiment}"):
        return  # no runs yet, or artifacts the user put elsewhere on purpose
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(location).path)) if location.startswith("file:") \
        else Path(location)
    if path.resolve() != own.resolve():
        raise UserError(f"the MLflow store {db} names {location} as the artifacts of {experiment!r}, not this "
                        f"study's {own}, and could not be updated (is it read-only?); copy it somewhere writable")


def check_port(host: str, port: int) -> None:
    """The port must be free: refused in one line rather than a server that dies on start."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
        try:
            s.bind(address)
        except OSError as e:
            raise UserError(f"--port {port}: {host}:{port} is not free ({e.strerror}); choose another with "
                            f"--port") from None


def mlflow_command() -> list[str]:
    """The MLflow CLI of this Python's environment (the venv's bin beside sys.executable)."""
    exe = Path(sys.executable).parent / "mlflow"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "mlflow"]


def start_server(uri: str, host: str, port: int, artifacts: str | None) -> subprocess.Popen:
    """`mlflow server` on the store, one worker, in a session of its own (stop_server stops it and its worker)."""
    cmd = [*mlflow_command(), "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]
    if artifacts:  # where anything new through the UI goes (the runs' own artifacts are named by their runs)
        cmd += ["--artifacts-destination", artifacts]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION":
           os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def wait_ready(proc: subprocess.Popen, base: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the MLflow server exited before it answered (exit status {proc.returncode}; its "
                            "messages are above)")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise UserError(f"the MLflow server did not answer at {base} within {timeout:.0f} s")


def experiment_id(base: str, experiment: str) -> str | None:
    """The experiment's id through the server's REST API; None when the store has no such experiment."""
    query = urllib.parse.urlencode({"experiment_name": experiment})
    try:
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=30) as r:
            return str(json.loads(r.read())["experiment"]["experiment_id"])
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


def stop_server(proc: subprocess.Popen) -> None:
    """SIGINT (MLflow passes it to its worker: a graceful shutdown), then whatever is left of its session."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _group_alive(proc.pid) and time.monotonic() < deadline:  # its worker, still shutting down
        time.sleep(0.1)
    _kill_group(proc.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):  # every interface: this machine's own address for the link
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _page(base: str, experiment: str | None) -> str:
    from study.search.console import mlflow_page

    return mlflow_page(experiment, base)
