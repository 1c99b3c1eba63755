"""The study lock (study.search.folder.lock) under races: drivers that start together on a stale lock never hold
it together, and a lock that is being written is never taken for stale.

The race: a lock left by a dead driver; 4 processes released by one barrier all call acquire(); whoever gets
the lock creates a witness file with O_EXCL (failing when another holder's witness is there), holds the
lock a moment, then removes the witness and releases. 50 races here, 1,000 in the soak test (make soak).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import socket
import time
from pathlib import Path

import pytest

WORKERS = 4
HOLD_S = 0.02
JITTER_S = 0.001


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _stale_record(pid: int) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": pid, "start": "1", "since": 0, "command": "dead"})


def _racer(root: str, races: int, start: mp.Barrier, done: mp.Barrier, out: mp.Queue) -> None:
    from study.errors import UserError
    from study.search.folder.lock import StudyLock

    witness = Path(root) / "holder"
    held = overlaps = 0
    jitter = random.Random(os.getpid())
    for _ in range(races):
        start.wait()
        time.sleep(jitter.uniform(0, JITTER_S))  # spreads the interleavings of the racers' steps
        try:
            lock = StudyLock(Path(root)).acquire("race")
        except UserError:
            lock = None
        if lock is not None:
            held += 1
            try:
                fd = os.open(witness, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
                mine = True
            except FileExistsError:
                overlaps += 1
                mine = False
            time.sleep(HOLD_S)
            if mine:
                witness.unlink()
            lock.release()
        done.wait()  # the parent plants the next stale lock between `done` and the next `start`
        done.wait()
    out.put((held, overlaps))


def _race(tmp_path: Path, races: int) -> tuple[int, int]:
    """(locks taken, overlapping holders) over `races` races of WORKERS processes."""
    ctx = mp.get_context("fork")
    start, done, out = ctx.Barrier(WORKERS), ctx.Barrier(WORKERS + 1), ctx.Queue()
    root = tmp_path / "study"
    root.mkdir()
    (root / ".lock").write_text(_stale_record(_dead_pid()))
    procs = [ctx.Process(target=_racer, args=(str(root), races, start, done, out)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        for _ in range(races):
            done.wait(timeout=60)
            assert not (root / ".lock").exists(), "a holder did not release the lock"
            (root / ".lock").write_text(_stale_record(_dead_pid()))
            done.wait(timeout=60)
        results = [out.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return sum(h for h, _ in results), sum(o for _, o in results)


def test_racing_drivers_never_hold_a_stale_lock_together(tmp_path):
    held, overlaps = _race(tmp_path, 50)
    assert overlaps == 0, f"{overlaps} overlapping holders in 50 races"
    assert held >= 50  # every race has a winner (a loser may take it after the winner released)


@pytest.mark.soak
def test_racing_drivers_never_hold_a_stale_lock_together_soak(tmp_path):
    held, overlaps = _race(tmp_path, 1000)
    assert overlaps == 0, f"{overlaps} overlapping holders in 1000 races"
    assert held >= 1000


def test_a_half_written_lock_is_held_not_stale(tmp_path, monkeypatch):
    """A lock another driver is still writing (empty, or JSON cut short) is waited for, then refused in one
    line; it is never taken over. Once complete and stale, it is taken over."""
    from study.errors import UserError
    from study.search.folder import lock as lock_mod
    from study.search.folder.lock import StudyLock

    monkeypatch.setattr(lock_mod, "BEING_WRITTEN_WAIT_S", 0.3, raising=False)
    root = tmp_path / "study"
    root.mkdir()
    full = _stale_record(_dead_pid())
    for partial in ("", full[: len(full) // 2]):
        (root / ".lock").write_text(partial)
        t0 = time.monotonic()
        with pytest.raises(UserError, match="is being written by another driver or is damaged") as e:
            StudyLock(root).acquire("second")
        assert time.monotonic() - t0 >= 0.3  # waited for the writer first
        assert "\n" not in str(e.value)
        assert (root / ".lock").read_text() == partial  # untouched
        with pytest.raises(UserError, match="being written"):
            StudyLock(root).refuse_if_held()
    (root / ".lock").write_text(full)  # the writer finished (and its driver is gone): stale
    with StudyLock(root).acquire("third"):
        assert json.loads((root / ".lock").read_text())["command"] == "third"


def test_a_lock_being_written_is_taken_once_complete(tmp_path, monkeypatch):
    """The writer completes its lock while a second driver waits: the second is refused as the writer's
    lock is live."""
    import threading

    from study.errors import UserError
    from study.search.folder.lock import StudyLock

    root = tmp_path / "study"
    root.mkdir()
    (root / ".lock").write_text('{"host": ')
    live = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": "", "since": 0, "command": "w"})
    threading.Timer(0.3, lambda: (root / ".lock").write_text(live)).start()
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):
        StudyLock(root).acquire("second")


def test_a_process_stuck_inside_the_guard_is_refused_after_a_while(tmp_path, monkeypatch):
    """The guard is held for milliseconds by an acquire(); one held longer (a driver stopped mid-acquire) makes
    the next acquire() give up in one line instead of waiting for ever."""
    import fcntl

    from study.errors import UserError
    from study.search.folder import lock as lock_mod
    from study.search.folder.lock import GUARD_FILE, StudyLock

    monkeypatch.setattr(lock_mod, "GUARD_WAIT_S", 0.3)
    root = tmp_path / "study"
    root.mkdir()
    with open(root / GUARD_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another process has held it for 0.3 s"):
            StudyLock(root).acquire("waiting")
        assert not (root / ".lock").exists()
    with StudyLock(root).acquire("after"):  # released: taken at once
        assert json.loads((root / ".lock").read_text())["command"] == "after"
