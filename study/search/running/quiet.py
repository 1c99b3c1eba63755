"""Library lines that say nothing a study's user acts on, kept out of its log; their warnings stay.

- alembic (the sqlite schema migrations of MLflow's and Optuna's stores): seven "setup plugin ..." lines
  when alembic is first imported, then "Context impl SQLiteImpl", "Running upgrade ..." per migration: INFO.
- mlflow.store.db.utils: "Creating initial MLflow database tables...", "Updating database tables": INFO.
- matplotlib.font_manager: "generated new fontManager" (INFO) and "Matplotlib is building the font cache"
  (a WARNING that only says it takes a while). Where matplotlib's own folder (~/.config/matplotlib) cannot
  be written, MPLCONFIGDIR points at one under the user's cache (else matplotlib warns and builds its font
  cache again in a new temporary folder in every process): `matplotlib_dir`.
- Ray's "Token authentication is enabled for this Ray cluster" warning, printed when a local Ray starts
  with RAY_AUTH_MODE unset (Ray's default for a local cluster is token authentication, and it says so).
  `local_ray_auth` sets RAY_AUTH_MODE=token, the same choice made explicitly, which Ray does not warn about;
  only before `import ray` (Ray reads the mode when it is imported: set later, the driver would keep
  "disabled" and its own cluster would refuse it) and only for a Ray the study starts itself (joining a
  cluster follows that cluster's mode). A user's RAY_AUTH_MODE is kept.

`quiet_loggers` runs where a study's process starts: the `study` command (study.cli) and the MLflow warm-up
(study.search.running.warmup, the first to import alembic), so a study run from Python is quiet too.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

QUIET_LOGGERS = {"alembic": logging.WARNING, "mlflow.store.db.utils": logging.WARNING,
                 "matplotlib.font_manager": logging.ERROR}
AUTH_ENV = "RAY_AUTH_MODE"


def quiet_loggers() -> None:
    """The loggers above at their level (a stricter level set elsewhere is kept)."""
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.level < level:
            logger.setLevel(level)


def quiet_libraries() -> None:
    """Everything here that a process can do at its start (before matplotlib is imported)."""
    quiet_loggers()
    matplotlib_dir()


def _writable(folder: Path) -> bool:
    """`folder` can be written, or made: its nearest existing ancestor can be written."""
    for path in (folder, *folder.parents):
        if path.exists():
            return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
    return False


def matplotlib_dir() -> str | None:
    """MPLCONFIGDIR set to <user cache>/matplotlib (or a folder of this user under the temporary folder)
    where matplotlib's default folder cannot be written and MPLCONFIGDIR is unset; returns the folder set."""
    if os.environ.get("MPLCONFIGDIR"):
        return None
    try:
        home = Path.home()
    except (KeyError, RuntimeError):  # no home folder known
        home = None
    config = os.environ.get("XDG_CONFIG_HOME") or (home / ".config" if home else None)
    if config and _writable(Path(config) / "matplotlib"):
        return None
    cache = os.environ.get("XDG_CACHE_HOME") or (home / ".cache" if home else None)
    user = os.getuid() if hasattr(os, "getuid") else "user"
    for folder in ([Path(cache) / "matplotlib"] if cache else []) + [Path(tempfile.gettempdir()) / f"matplotlib-{user}"]:
        if _writable(folder):
            os.environ["MPLCONFIGDIR"] = str(folder)
            return str(folder)
    return None


def local_ray_auth(joins_cluster: bool) -> bool:
    """RAY_AUTH_MODE=token for a local Ray this process starts, before `import ray`. True when set here."""
    if joins_cluster or "ray" in sys.modules or AUTH_ENV in os.environ:
        return False
    os.environ[AUTH_ENV] = "token"
    return True
