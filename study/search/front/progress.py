"""Progress lines of the front's test-split evaluation, from its Ray tasks to the driver's terminal.

Each front trial is evaluated by a Ray task (study.search.front.evaluate), several at once; what a task
prints itself would reach the driver's terminal prefixed by Ray and, trial numbers aside, folded together
by Ray's log deduplication. So a task hands its progress (study.robustness.progress.Update, per batch of
points, throttled) to a `TrialSink`, which puts it in a Ray queue (ray.util.queue.Queue, an actor of no
CPU); the driver reads the queue while it waits for the tasks (`Board.get`) and prints each update as one
line (study.search.console.print_progress):

    [study] confirming trial 12 (2/3): AutoAttack standard Linf eps=0.1, apgd-t (2/4): 256/300 points, 41 s, ETA 17 s

At most one line per trial every 10 s on a terminal, every 30 s when stderr goes to a file
(study.robustness.progress.interval), plus each phase's last line. Progress is never worth a failed evaluation: a queue that cannot be
made or reached means no progress lines, nothing else.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from study.robustness.progress import Sink, Update, interval, throttled

log = logging.getLogger("study.search")
POLL_S = 0.5  # how often the driver looks at the queue while it waits


class TrialSink:
    """Picklable (it travels with the task): `part(name)` is the Sink of one part of the trial's evaluation
    ("confirming", "robustness suite on"), throttled to `every_s`, into the driver's queue."""

    def __init__(self, queue: Any, number: int, every_s: float):
        self.queue, self.number, self.every_s = queue, number, every_s

    def part(self, name: str) -> Sink:
        return throttled(lambda update: self._put(name, update), self.every_s)

    def _put(self, name: str, update: Update) -> None:
        try:
            self.queue.put_nowait((self.number, name, update))
        except Exception:  # noqa: BLE001 - a lost progress line, never a failed evaluation
            pass


class Board:
    """The driver's side: a queue, a TrialSink per trial, and `get(ref)`: ray.get that prints the
    progress lines of every trial while it waits. `show(label, update)` prints one line."""

    def __init__(self, numbers: Sequence[int], show: Callable[[str, Update], None], every: float | None = None):
        from ray.util.queue import Queue

        self.show, self.every = show, interval() if every is None else every
        self.index = {n: i for i, n in enumerate(numbers, 1)}
        try:
            self.queue: Any = Queue(actor_options={"num_cpus": 0})
        except Exception as e:  # noqa: BLE001
            log.warning("test-split evaluation: no progress lines (%s)", e)
            self.queue = None

    def sink(self, number: int) -> TrialSink | None:
        return TrialSink(self.queue, number, self.every) if self.queue is not None else None

    def get(self, ref: Any) -> Any:
        """ray.get(ref), printing the progress lines that arrive meanwhile."""
        import ray

        while True:
            ready, _ = ray.wait([ref], timeout=POLL_S)
            self.drain()
            if ready:
                return ray.get(ref)

    def drain(self) -> None:
        if self.queue is None:
            return
        try:
            waiting = self.queue.qsize()
            events = self.queue.get_nowait_batch(waiting) if waiting else []
        except Exception as e:  # noqa: BLE001
            log.warning("test-split evaluation: no more progress lines (%s)", e)
            self.queue = None
            return
        for number, part, update in events:
            self.show(f"{part} trial {number} ({self.index.get(number, '?')}/{len(self.index)})", update)

    def close(self) -> None:
        if self.queue is not None:
            try:
                self.queue.shutdown(force=True)
            except Exception:  # noqa: BLE001
                pass
            self.queue = None
