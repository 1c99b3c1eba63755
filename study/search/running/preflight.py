"""Checks made before a study creates anything (one line, exit status 2 through study.cli): the runs folder
(a local one exists or can be made, is a folder, is writable, and no name in its path is longer than the
file system allows; an object-store bucket must exist and accept these credentials), the data set is on
disk, the MLflow tracking URI has a scheme MLflow stores runs in and answers, the Optuna storage's driver
imports and it connects (a sqlite file, and the folder SQLite writes its journal in, must be writable), the
Ray address answers, and a trial's resources fit the cluster. None of them creates a file or a folder."""
from __future__ import annotations

import logging
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from study.errors import UserError

log = logging.getLogger("study.search")
PROBE_TIMEOUT_S = 5.0
AUTOSCALER_WAIT_S = 900.0  # study.autoscaler_wait_s's default: a GPU node's boot and image pull take minutes
POLL_S = 5.0  # how often the resource check looks at the cluster again
PROGRESS_EVERY_S = 30.0  # a progress line while it waits for the autoscaler


def check_data(space: Any) -> None:
    """Load the study's data set once in the driver, on CPU (raises study.trial.data.DataError)."""
    from study.trial.data import load_dataset

    load_dataset(space.base_config().data, "cpu")


# Tracking URI schemes MLflow stores runs in (a path without a scheme is a file store; a database scheme may
# name its driver: postgresql+psycopg://...).
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def check_tracking(uri: str) -> None:
    """The tracking URI's scheme must be one MLflow stores runs in; a local store's folder must be writable;
    an http(s) tracking server must answer within a few seconds (MLflow itself retries for minutes)."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme and scheme not in TRACKING_SCHEMES:
        raise UserError(f"--tracking-uri {_hide_password(uri)}: MLflow cannot store runs at a {scheme}:// URI; use "
                        f"one of {', '.join(s + '://' for s in TRACKING_SCHEMES)} or a folder (default: "
                        "sqlite:///<runs-dir>/mlflow.db)")
    if scheme == "sqlite":
        check_sqlite_file(uri, "--tracking-uri")
    elif scheme in ("", "file") and not uri.startswith("databricks"):
        folder = uri[len("file://"):] if scheme == "file" else uri
        check_local_dir(folder, f"--tracking-uri {uri}")
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


def check_local_dir(path: str | os.PathLike, what: str, write: bool = True) -> None:
    """A folder the study writes in (or will make): no name on its path longer than the file system allows
    (PC_NAME_MAX), what exists of it a folder (not a file), and the deepest existing part writable. Nothing
    is created (os.access honours permissions, capabilities and read-only mounts)."""
    absolute = Path(os.path.abspath(Path(path).expanduser()))
    existing, missing = Path(absolute.anchor), False
    for part in absolute.parts[1:]:
        limit = os.pathconf(existing, "PC_NAME_MAX")
        size = len(os.fsencode(part))
        if size > limit:
            raise UserError(f"{what}: the name {part[:24]}... is {size} bytes long; the file system of {existing} "
                            f"allows {limit}")
        if missing:
            continue
        nxt = existing / part
        if not nxt.exists():
            missing = True
        elif not nxt.is_dir():
            raise UserError(f"{what}: {nxt} is a file, not a folder")
        else:
            existing = nxt
    if write and not os.access(existing, os.W_OK | os.X_OK):
        made = "" if existing == absolute else f" (where {absolute.relative_to(existing)} would be made)"
        raise UserError(f"{what}: {existing} is not writable{made}; choose a folder you can write to")


def check_sqlite_file(url: str, what: str, kind: str = "database file") -> None:
    """A sqlite URL's file (or an Optuna journal file) must be a writable file or creatable, in a writable
    folder: SQLite writes its rollback journal (-journal, -wal) beside the database, the journal storage its
    lock file beside the journal."""
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else "" if url.startswith("sqlite:") else url
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        return
    file = Path(path).expanduser()
    shown = f"{what} {url}"
    check_local_dir(file.parent, shown)
    if file.is_dir():
        raise UserError(f"{shown}: {file} is a folder, not a {kind}")
    if file.exists() and not os.access(file, os.R_OK | os.W_OK):
        raise UserError(f"{shown}: the {kind} {file} is not writable")


def check_runs_dir(runs_dir: Any, write: bool = True) -> None:
    """--runs-dir: a local folder, or an object-store URI whose bucket exists and that these credentials can
    read (and write, with `write`); study.search.folder.store.check."""
    text = str(runs_dir)
    if "://" not in text:
        check_local_dir(text, f"--runs-dir {text}", write=write)
        return
    from study.search.folder import store

    store.check(text.rstrip("/"), write=write)


def check_storage(url: str) -> None:
    """A database URL's driver must import and the database must accept a connection. A journal file on an
    object store is refused: Optuna's journal needs file locks, which object stores lack."""
    from study.search.folder.store import is_remote

    journal = url[len("journal:"):] if url.startswith("journal:") else url if "://" not in url or is_remote(url) else ""
    if journal and is_remote(journal):
        raise UserError(f"--storage {url}: an Optuna journal file needs file locks, which an object store does not "
                        "have; use a database URL (postgresql://..., mysql://...) or a sqlite file on the driver's "
                        "disk (the default for an object-store --runs-dir)")
    if url.startswith("sqlite:"):
        check_sqlite_file(url, "--storage")
        return
    if journal:
        check_sqlite_file(journal, "--storage", kind="journal file")
        return
    if "://" not in url:
        return
    import sqlalchemy
    from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError

    shown = _hide_password(url)
    try:
        engine = sqlalchemy.create_engine(url, **_timeout_args(url))
    except (ImportError, ModuleNotFoundError) as e:
        name = getattr(e, "name", None) or str(e)
        raise UserError(f"--storage {shown}: the database driver is not installed ({name}); "
                        f"install it (e.g. pip install {_driver_package(url, name)})") from None
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


# pip packages of the driver modules SQLAlchemy imports (SQLAlchemy 2.1's postgresql:// imports psycopg 3).
DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pymysql": "pymysql", "asyncpg": "asyncpg", "pg8000": "pg8000", "pyodbc": "pyodbc"}


def _driver_package(url: str, module: str = "") -> str:
    """The package that provides the missing driver `module` of `url` (SQLAlchemy's name for it)."""
    if module.split(".")[0] in DRIVER_PACKAGES:
        return DRIVER_PACKAGES[module.split(".")[0]]
    scheme = url.split("://", 1)[0]
    if "+" in scheme:
        return scheme.split("+", 1)[1]
    return {"postgresql": DRIVER_PACKAGES["psycopg"], "mysql": "mysqlclient"}.get(scheme, scheme)


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


def check_resources(cpus: float, gpus: float, joined: bool, wait_s: float = AUTOSCALER_WAIT_S, *,
                    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """One trial's resources must fit the cluster: at once on a local Ray; on a joined cluster the autoscaler
    is asked for them (`ray.autoscaler.sdk.request_resources`, one bundle of a trial's CPUs and GPUs) and
    given `wait_s` seconds (study.autoscaler_wait_s) to add the nodes, with a progress line every
    PROGRESS_EVERY_S seconds. The request is cleared afterwards whatever happened: Tune's own demand keeps
    the nodes once trials run, and a refused study leaves no request behind that keeps GPU nodes billed."""
    import ray

    need = {kind: amount for kind, amount in (("CPU", cpus), ("GPU", gpus)) if amount > 0}
    have = ray.cluster_resources()
    if not _short(need, have):
        return
    if not joined:
        raise UserError(_too_big(need, have, ""))
    from ray.autoscaler.sdk import request_resources

    start = clock()
    request_resources(bundles=[need])
    try:
        print(f"[study] asked the autoscaler for a trial's {_text(need)} (the cluster has "
              f"{_text(have, ('CPU', 'GPU'))}); waiting up to {wait_s:g} s (study.autoscaler_wait_s)", flush=True)
        shown = start
        while True:
            have = ray.cluster_resources()
            now = clock()
            if not _short(need, have):
                print(f"[study] the Ray cluster has {_text(have, ('CPU', 'GPU'))} after {now - start:.0f} s: "
                      "a trial fits", flush=True)
                return
            if now - start >= wait_s:
                raise UserError(_too_big(need, have, f" after waiting {wait_s:g} s for the autoscaler (asked for "
                                         f"{_text(need)}; study.autoscaler_wait_s)"))
            if now - shown >= PROGRESS_EVERY_S:
                shown = now
                print(f"[study] waiting for the autoscaler to add {_text(_short(need, have))} for a trial "
                      f"({_text(need)}): {now - start:.0f} s of {wait_s:g} s so far; the cluster has "
                      f"{_text(have, ('CPU', 'GPU'))}", flush=True)
            sleep(min(POLL_S, max(0.0, wait_s - (now - start))))
    finally:
        request_resources(bundles=[])


def _short(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    """What of `need` the cluster's resources `have` lack (their totals, not what is free now)."""
    return {kind: amount for kind, amount in need.items() if amount > have.get(kind, 0)}


def _text(resources: dict[str, float], kinds: tuple[str, ...] = ()) -> str:
    """`1 CPU, 1 GPU`: the `kinds` given (default: those in `resources`), CPU first."""
    kinds = kinds or tuple(k for k in ("CPU", "GPU") if k in resources)
    return ", ".join(f"{resources.get(kind, 0):g} {kind}" for kind in kinds)


def _too_big(need: dict[str, float], have: dict[str, float], waited: str) -> str:
    short = " and ".join(f"{amount:g} {kind}" for kind, amount in _short(need, have).items())
    hint = ("; check `ray status` and the autoscaler's node types, wait longer (--set study.autoscaler_wait_s=...) "
            "or lower them (--set study.gpus_per_trial=...)" if waited else "; lower them (--set study.cpus_per_trial=...)")
    return (f"study.cpus_per_trial/gpus_per_trial: a trial needs {short} but the Ray cluster has "
            f"{_text(have, ('CPU', 'GPU'))} in all{waited}{hint}")
