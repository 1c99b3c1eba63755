"""One driver per study: runs/<study>/.lock, taken by `study run | resume` (and checked by --fresh
before it wipes anything), released when the driver exits.

The lock is a JSON file {host, pid, start (the process's start time, to tell a reused pid), since
(wall-clock time it was taken), command}. A lock is stale, and taken over with a log line, when its host
is this host and its process is gone (or the pid now belongs to another process). A lock held on another
host is never taken over: the user removes it once that driver is known to be gone.

For a study on an object store the lock is the object `<study>/.lock` in the bucket (so drivers on other
machines see it). Object stores have no exclusive create: two drivers started within the same second can
both pass the check; the lock guards against the usual case, a second `study resume` while one runs.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from study.errors import UserError

log = logging.getLogger("study.search")
LOCK_FILE = ".lock"


def _process_start(pid: int) -> str:
    """The start time of a process as the kernel counts it (clock ticks since boot), '' where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat: starttime
    except (OSError, IndexError):
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StudyLock:
    def __init__(self, root: Path, store: Any = None):
        self.path = Path(root) / LOCK_FILE
        self.store = store  # study.search.store.Store of an object-store study, else None
        self.held = False

    def _read(self) -> str:
        if self.store is not None:
            return self.store.read_text(LOCK_FILE)
        return self.path.read_text()

    def _where(self) -> str:
        return self.store.url(LOCK_FILE) if self.store is not None else str(self.path)

    def _unlink(self) -> None:
        if self.store is not None:
            self.store.delete(LOCK_FILE)
        else:
            self.path.unlink(missing_ok=True)

    def _create(self, record: dict) -> None:
        """Create the lock, FileExistsError if there is one."""
        if self.store is not None:
            if self.store.is_file(LOCK_FILE):
                raise FileExistsError(self._where())
            self.store.write_text(LOCK_FILE, json.dumps(record))
            return
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)

    def holder(self) -> dict[str, Any] | None:
        """The lock's record, None when there is none or it is stale."""
        try:
            data = json.loads(self._read())
            if not isinstance(data, dict):
                raise ValueError
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("%s is unreadable: treated as stale", self._where())
            return None
        if data.get("host") != socket.gethostname():
            return data  # another machine: cannot be checked
        pid = int(data.get("pid", 0) or 0)
        if pid <= 0 or not _alive(pid):
            return None
        start = _process_start(pid)
        if data.get("start") and start and data["start"] != start:
            return None  # the pid was reused by another process
        return data

    def refuse_if_held(self) -> None:
        data = self.holder()
        if data is not None and not (self.held and data.get("pid") == os.getpid()):
            raise UserError(self.message(data))

    def message(self, data: dict[str, Any]) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(data.get("since", 0) or 0)))
        folder = self.store.uri if self.store is not None else self.path.parent
        return (f"study folder {folder} is in use by another driver: host {data.get('host')}, pid "
                f"{data.get('pid')}, since {since} ({data.get('command', '?')}); wait for it to end, or remove "
                f"{self._where()} once that driver is known to be gone")

    def acquire(self, command: str | None = None) -> "StudyLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
                  "since": time.time(), "command": command or " ".join(sys.argv)[:300]}
        for _ in range(3):
            try:
                self._create(record)
            except FileExistsError:
                data = self.holder()
                if data is not None:
                    raise UserError(self.message(data)) from None
                log.warning("taking over the stale lock %s", self._where())
                self._unlink()
                continue
            except OSError as e:
                raise UserError(f"{self._where()}: cannot lock the study folder ({e.strerror or e})") from None
            self.held = True
            return self
        raise UserError(f"{self.path}: could not take the lock (another driver keeps taking it)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            data = json.loads(self._read())
            if data.get("pid") == os.getpid() and data.get("host") == socket.gethostname():
                self._unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "StudyLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
