"""One driver per study: runs/<study>/.lock, taken by `study run | resume` (and checked by --fresh
before it wipes anything), released when the driver exits.

The lock is a JSON file {host, pid, start (the process's start time, to tell a reused pid), since
(wall-clock time it was taken), command, token}. A lock is stale, and taken over with a log line, when its
host is this host and its process is gone (or the pid now belongs to another process). A lock held on
another host is never taken over: the user removes it once that driver is known to be gone. A lock that
does not parse is being written (or is damaged): it is waited for briefly, then refused as held, never
taken for stale.

Why a takeover is atomic on a local file system. Taking a stale lock is read, judge, remove, create: two
drivers that judge the same stale lock both remove "it" and the second removes the first one's new lock.
So every acquire runs under an exclusive `fcntl.flock` on `.lock.guard`, a file beside the lock that is
never removed: the kernel lets one process at a time through and drops the flock when its holder dies,
so the guard itself can never go stale. A lock is replaced only by its owner (release) or by the holder of
the guard, so the lock one guard holder judged stale is still the one it removes. The lock file itself
is published whole: the record is written to a private temporary file and hard-linked to `.lock`
(link() fails atomically when `.lock` exists), so no reader sees a half-written lock. Where the file
system has no flock (some network mounts) the takeover falls back to check-remove-create, with a warning.

For a study on an object store the lock is the object `<study>/.lock` in the bucket (so drivers on other
machines see it). On S3 it is created with a conditional write (`put_object(IfNoneMatch='*')`: refused when
the object exists) and a stale one is replaced with `put_object(IfMatch=<its ETag>)` (refused when someone
replaced it since it was read), so two drivers never both hold it. Stores without conditional writes
(gs://, an S3-compatible server answering NotImplemented) fall back to check-then-write, where two drivers
started within the same second can both pass (docs/reliability.md).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from study.errors import UserError

log = logging.getLogger("study.search")
LOCK_FILE = ".lock"
GUARD_FILE = ".lock.guard"
BEING_WRITTEN_WAIT_S = 2.0  # how long an unparseable lock is re-read before it is refused as held
GUARD_WAIT_S = 30.0  # how long acquire() waits for another acquire() to leave the guard


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


def _parse(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict) or "pid" not in data or "host" not in data:
        raise ValueError("not a lock record")
    return data


def _flock_within(fd: int, seconds: float, guard: Path) -> None:
    """An exclusive flock on `fd`, waited for up to `seconds` (its holders keep it for milliseconds)."""
    import fcntl

    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise UserError(f"{guard}: another process has held it for {seconds:g} s while taking the study "
                                "lock; is a driver stopped (kill -STOP)?") from None
            time.sleep(0.005)


class StudyLock:
    def __init__(self, root: Path, store: Any = None):
        self.path = Path(root) / LOCK_FILE
        self.store = store  # study.search.folder.store.Store of an object-store study, else None
        self.held = False
        self._s3: Any = None  # study.search.folder.lock_s3.S3Lock where the store is S3 and allows conditional writes

    # --- reading ---------------------------------------------------------------------------------------

    def _read(self) -> str:
        if self.store is not None:
            return self.store.read_text(LOCK_FILE)
        return self.path.read_text()

    def _where(self) -> str:
        return self.store.url(LOCK_FILE) if self.store is not None else str(self.path)

    def _record(self) -> dict[str, Any] | None:
        """The lock's record as written, None when there is none. One that does not parse is re-read for
        up to BEING_WRITTEN_WAIT_S (a writer of an older release may be half-way), then reported as
        {'unreadable': reason}: held, never stale."""
        deadline = time.monotonic() + BEING_WRITTEN_WAIT_S
        while True:
            try:
                return _parse(self._read())
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as e:  # e.g. no permission: not a lock that can be judged stale
                return {"unreadable": e.strerror or str(e)}
            except ValueError as e:  # UnicodeDecodeError included
                if time.monotonic() >= deadline:
                    return {"unreadable": str(e) or type(e).__name__}
            time.sleep(0.05)

    def _judge(self, data: dict[str, Any] | None) -> dict[str, Any] | None:
        """`data` when it holds the study, None when absent or stale."""
        if data is None or "unreadable" in data:
            return data
        if data.get("host") != socket.gethostname():
            return data  # another machine: cannot be checked
        pid = int(data.get("pid", 0) or 0)
        if pid <= 0 or not _alive(pid):
            return None
        start = _process_start(pid)
        if data.get("start") and start and data["start"] != start:
            return None  # the pid was reused by another process
        return data

    def holder(self) -> dict[str, Any] | None:
        """The lock's record, None when there is none or it is stale ({'unreadable': ...} when it does not
        parse: being written, or damaged)."""
        return self._judge(self._record())

    def refuse_if_held(self) -> None:
        data = self.holder()
        if data is not None and not (self.held and data.get("pid") == os.getpid()):
            raise UserError(self.message(data))

    def message(self, data: dict[str, Any]) -> str:
        if "unreadable" in data:
            return (f"{self._where()} is being written by another driver or is damaged (not a lock record: "
                    f"{data['unreadable']}); wait, or remove it once no driver is known to use this study")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(data.get("since", 0) or 0)))
        folder = self.store.uri if self.store is not None else self.path.parent
        return (f"study folder {folder} is in use by another driver: host {data.get('host')}, pid "
                f"{data.get('pid')}, since {since} ({data.get('command', '?')}); wait for it to end, or remove "
                f"{self._where()} once that driver is known to be gone")

    # --- acquiring -------------------------------------------------------------------------------------

    def acquire(self, command: str | None = None) -> "StudyLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
                  "since": time.time(), "command": command or " ".join(sys.argv)[:300], "token": uuid.uuid4().hex}
        try:
            if self.store is not None:
                self._acquire_store(record)
            else:
                with self._guard():
                    self._acquire_local(record)
        except OSError as e:
            raise UserError(f"{self._where()}: cannot lock the study folder ({e.strerror or e})") from None
        self.held = True
        return self

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """An exclusive flock on GUARD_FILE for the duration (see the module's docstring)."""
        guard = self.path.parent / GUARD_FILE
        while True:
            fd = os.open(guard, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _flock_within(fd, GUARD_WAIT_S, guard)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF):
                    raise
                log.warning("%s: no file locks on this file system: taking over a stale lock is not atomic", guard)
                yield
                return
            try:  # the folder may have been wiped (and the guard re-made by another process) meanwhile
                same = os.path.samestat(os.fstat(fd), os.stat(guard))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            yield
        finally:
            os.close(fd)  # drops the flock

    def _acquire_local(self, record: dict) -> None:
        for _ in range(3):
            try:
                self._publish(record)
                return
            except FileExistsError:
                data = self.holder()
                if data is not None:
                    raise UserError(self.message(data)) from None
                log.warning("taking over the stale lock %s", self._where())
                self.path.unlink(missing_ok=True)
        raise UserError(f"{self.path}: could not take the lock (another driver keeps taking it)")

    def _publish(self, record: dict) -> None:
        """Create the lock whole (a private temporary file hard-linked to it); FileExistsError if there is one."""
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.{record['token'][:8]}.tmp")
        with open(tmp, "w") as f:  # on disk before it is linked: a crash never leaves an empty lock
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError as e:  # a file system without hard links: exclusive create, then write
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
        finally:
            tmp.unlink(missing_ok=True)

    def _acquire_store(self, record: dict) -> None:
        from study.search.folder.lock_s3 import S3Lock

        self._s3 = S3Lock.of(self.store, LOCK_FILE)
        if self._s3 is not None and self._s3.acquire(record, self._judge, self.message):
            return
        self._s3 = None  # no conditional writes here: check, then write (docs/reliability.md)
        for _ in range(3):
            data = self.holder()
            if data is not None:
                raise UserError(self.message(data))
            if self.store.is_file(LOCK_FILE):
                log.warning("taking over the stale lock %s", self._where())
            self.store.write_text(LOCK_FILE, json.dumps(record))
            if self._record() == record:
                return
        raise UserError(f"{self._where()}: could not take the lock (another driver keeps taking it)")

    # --- releasing -------------------------------------------------------------------------------------

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            data = json.loads(self._read())
            if data.get("pid") == os.getpid() and data.get("host") == socket.gethostname():
                if self.store is not None:
                    self.store.delete(LOCK_FILE)
                else:
                    self.path.unlink(missing_ok=True)
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "StudyLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
