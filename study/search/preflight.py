"""Checks made before a study creates anything (one line, exit status 2 through study.cli): the runs folder
(an object-store bucket must exist and accept these credentials), the data set
is on disk, the MLflow tracking URI answers, the Optuna storage's driver imports and it connects, the
Ray address answers, and a trial's resources fit the cluster."""
from __future__ import annotations

import logging
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from study.errors import UserError

log = logging.getLogger("study.search")
PROBE_TIMEOUT_S = 5.0
AUTOSCALER_WAIT_S = 60.0


def check_data(space: Any) -> None:
    """Load the study's data set once in the driver, on CPU (raises study.trial.data.DataError)."""
    from study.trial.data import load_dataset

    load_dataset(space.base_config().data, "cpu")


def check_tracking(uri: str) -> None:
    """An http(s) tracking server must answer within a few seconds (MLflow itself retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as r:  # noqa: S310 - the user's own URI
            r.read(64)
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            raise UserError(f"--tracking-uri {uri}: the MLflow server answers {e.code} {e.reason} at {url}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"--tracking-uri {uri}: no MLflow server answers ({reason}); start it, or leave "
                        "--tracking-uri out for the local store runs/mlflow.db") from None


def check_runs_dir(runs_dir: Any, write: bool = True) -> None:
    """--runs-dir: a local folder, or an object-store URI whose bucket exists and that these credentials can
    read (and write, with `write`); study.search.store.check."""
    text = str(runs_dir)
    if "://" not in text:
        return
    from study.search import store

    store.check(text.rstrip("/"), write=write)


def check_storage(url: str) -> None:
    """A database URL's driver must import and the database must accept a connection. A journal file on an
    object store is refused: Optuna's journal needs file locks, which object stores lack."""
    from study.search.store import is_remote

    journal = url[len("journal:"):] if url.startswith("journal:") else url if "://" not in url or is_remote(url) else ""
    if journal and is_remote(journal):
        raise UserError(f"--storage {url}: an Optuna journal file needs file locks, which an object store does not "
                        "have; use a database URL (postgresql://..., mysql://...) or a sqlite file on the driver's "
                        "disk (the default for an object-store --runs-dir)")
    if "://" not in url or url.startswith(("sqlite:", "journal:")):
        return
    import sqlalchemy
    from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError

    shown = _hide_password(url)
    try:
        engine = sqlalchemy.create_engine(url, **_timeout_args(url))
    except (ImportError, ModuleNotFoundError) as e:
        name = getattr(e, "name", None) or str(e)
        raise UserError(f"--storage {shown}: the database driver is not installed ({name}); "
                        f"install it (e.g. pip install {_driver_package(url)})") from None
    except NoSuchModuleError as e:
        raise UserError(f"--storage {shown}: unknown database dialect ({e})") from None
    except (SQLAlchemyError, ValueError) as e:
        raise UserError(f"--storage {shown}: not a usable database URL ({e})") from None
    try:
        with engine.connect():
            pass
    except (SQLAlchemyError, OSError) as e:
        first = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise UserError(f"--storage {shown}: cannot connect ({first[0] if first else type(e).__name__})") from None
    finally:
        engine.dispose()


def _timeout_args(url: str) -> dict:
    if url.startswith(("postgresql", "postgres")):
        return {"connect_args": {"connect_timeout": int(PROBE_TIMEOUT_S)}}
    if url.startswith("mysql"):
        return {"connect_args": {"connect_timeout": int(PROBE_TIMEOUT_S)}}
    return {}


def _driver_package(url: str) -> str:
    scheme = url.split("://", 1)[0]
    if "+" in scheme:
        return scheme.split("+", 1)[1]
    return {"postgresql": "psycopg2-binary", "postgres": "psycopg2-binary", "mysql": "mysqlclient"}.get(scheme, scheme)


def _hide_password(url: str) -> str:
    head, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return head + sep + (creds + at if at else "") + host


def check_num_cpus(num_cpus: int | None) -> None:
    if num_cpus is not None and num_cpus < 1:
        raise UserError(f"--num-cpus {num_cpus}: a local Ray needs at least 1 CPU")


def check_address(address: str | None) -> None:
    """A Ray address (host:port or ray://host:port) must accept a TCP connection within a few seconds."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: not a Ray address (host:port or ray://host:port)")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        raise UserError(f"--address {address}: no Ray cluster answers ({e.strerror or e}); start it "
                        f"(ray start --head) or leave --address out for a local Ray") from None


def check_resources(cpus: float, gpus: float, joined: bool) -> None:
    """One trial's resources must fit the cluster: at once on a local Ray, within AUTOSCALER_WAIT_S on a
    joined cluster (an autoscaler may add nodes)."""
    import ray

    deadline = time.monotonic() + (AUTOSCALER_WAIT_S if joined else 0)
    while True:
        have = ray.cluster_resources()
        short = [f"{need:g} {kind}" for kind, need in (("CPU", cpus), ("GPU", gpus)) if need > have.get(kind, 0)]
        if not short:
            return
        if time.monotonic() >= deadline:
            total = f"{have.get('CPU', 0):g} CPU, {have.get('GPU', 0):g} GPU"
            waited = f" after waiting {AUTOSCALER_WAIT_S:g} s for the autoscaler" if joined else ""
            raise UserError(f"study.cpus_per_trial/gpus_per_trial: a trial needs {' and '.join(short)} but the Ray "
                            f"cluster has {total} in all{waited}; lower them (--set study.cpus_per_trial=...)")
        log.info("waiting for the Ray cluster to offer %s ...", ", ".join(short))
        time.sleep(5)
