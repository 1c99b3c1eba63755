"""Progress of a long evaluation: points done of a total, the seconds so far and an estimate of the rest.

An evaluation (the front's confirmation, study.search.front.robust_eval.confirm; AutoAttack,
study.robustness.autoattack) hands an `Update` to a `Sink`, any callable, after every batch of points;
`throttled(sink, every_s)` passes on at most one update per `every_s` seconds, and a phase's first (what
runs now) and last ones always. Who prints them: study.search.console.print_progress, in the study's driver, fed from the
Ray tasks that evaluate the front by study.search.front.progress; `printer(prefix)` elsewhere (`study
evaluate`). One line per update on stderr, at most every EVERY_TTY_S seconds on a terminal and every
EVERY_LOG_S seconds when stderr goes to a file (`interval`).

Standard AutoAttack runs four attacks one after the other, each on the points still robust, so its ETA
weighs the attacks left by their cost per point (AA_COST, measured on a CPU: APGD-T's 9 target classes,
FAB-T's 9, Square's 5000 queries) and scales that by the time the batches done so far took.
"""
from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

EVERY_TTY_S = 10.0
EVERY_LOG_S = 30.0


@dataclass(frozen=True)
class Update:
    what: str                    # the phase, e.g. "PGD-50 x3 restarts Linf eps=0.1"
    done: int                    # points done (of this phase, or of AutoAttack's current attack)
    total: int
    elapsed_s: float             # since the phase started
    eta_s: float | None = None   # seconds left, estimated; None: nothing to estimate from yet
    final: bool = False          # the phase's last update
    first: bool = False          # the phase's first update (0 points: what runs now)

    def text(self) -> str:
        """e.g. "AutoAttack standard Linf eps=0.1: 256/360 points, 41 s, ETA 17 s"."""
        if self.final:
            return f"{self.what}: {self.done}/{self.total} points in {duration(self.elapsed_s)}"
        eta = f", ETA {duration(self.eta_s)}" if self.eta_s is not None else ""
        return f"{self.what}: {self.done}/{self.total} points, {duration(self.elapsed_s)}{eta}"


Sink = Callable[[Update], None]


def duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def throttled(sink: Sink, every_s: float, clock: Callable[[], float] = time.monotonic) -> Sink:
    """`sink`, passed at most one update per `every_s` seconds; a phase's first and final ones always."""
    last = [float("-inf")]

    def send(update: Update) -> None:
        now = clock()
        if update.first or update.final or now - last[0] >= every_s:
            last[0] = now
            sink(update)

    return send


def interval(stream: Any = None) -> float:
    """Seconds between two progress lines: fewer lines when `stream` (stderr) is not a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return EVERY_TTY_S if stream.isatty() else EVERY_LOG_S
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return EVERY_LOG_S


def printer(prefix: str, every_s: float | None = None, stream: Any = None) -> Sink:
    """A Sink printing "<prefix>: <update>" lines to `stream` (stderr), throttled (`interval`)."""
    out = sys.stderr if stream is None else stream

    def show(update: Update) -> None:
        print(f"{prefix}: {update.text()}", file=out, flush=True)

    return throttled(show, interval(out) if every_s is None else every_s)


class Meter:
    """One phase over `total` points: `update(done)` after each batch (ETA: the rate so far), `finish()`."""

    def __init__(self, sink: Sink | None, what: str, total: int, clock: Callable[[], float] = time.monotonic):
        self.sink, self.what, self.total, self.clock = sink, what, total, clock
        self.start = clock()
        if sink is not None:
            sink(Update(what, 0, total, 0.0, first=True))

    def elapsed(self) -> float:
        return self.clock() - self.start

    def update(self, done: int) -> None:
        elapsed = self.elapsed()
        eta = elapsed / done * (self.total - done) if done > 0 else None
        self._send(done, eta)

    def finish(self) -> None:
        if self.sink is not None:
            self.sink(Update(self.what, self.total, self.total, self.elapsed(), 0.0, final=True))

    def _send(self, done: int, eta: float | None, what: str | None = None, total: int | None = None) -> None:
        if self.sink is not None:
            self.sink(Update(what or self.what, done, self.total if total is None else total, self.elapsed(), eta))


# Seconds per point of each AutoAttack attack relative to APGD-CE (100 iterations), standard version, measured
# on a CPU with a small CNN; an attack not listed counts as AA_COST_OTHER.
AA_COST = {"apgd-ce": 1.0, "apgd-dlr": 1.0, "apgd-t": 10.0, "fab": 2.0, "fab-t": 18.0, "square": 22.0}
AA_COST_OTHER = 10.0
_RUNNING = re.compile(r"running (\S+)$")
_BATCH = re.compile(r"(\S+) - (\d+)/(\d+) - (\d+) out of (\d+) successfully perturbed$")
_NONE_LEFT = re.compile(r"no robust datapoints left")


class AutoAttackMeter(logging.Handler):
    """AutoAttack's own progress (its `auto-attack` logger at DEBUG: "running apgd-t", then per batch
    "apgd-t - 2/3 - 4 out of 16 successfully perturbed") as Updates: per attack, the points it has attacked
    of those still robust when it started; the ETA covers the attacks left (AA_COST). `robust`: the points
    the model classifies right (AutoAttack attacks only those). A line it cannot read is ignored: the
    evaluation never depends on it."""

    def __init__(self, meter: Meter, attacks: Sequence[str], robust: int):
        super().__init__(logging.DEBUG)
        self.meter, self.attacks, self.robust = meter, list(attacks), robust
        self.attack: str | None = None
        self.done = self.total = 0
        self.weight_done = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._read(record.getMessage())
        except Exception:  # noqa: BLE001 - progress must never break the evaluation
            pass

    def _read(self, msg: str) -> None:
        if _NONE_LEFT.search(msg):
            self.robust = 0
            return
        m = _RUNNING.search(msg)
        if m and m.group(1) in self.attacks:
            self.attack, self.done, self.total = m.group(1), 0, self.robust
            if self.robust > 0:  # else AutoAttack stops here: "no robust datapoints left"
                self._send()
            return
        m = _BATCH.search(msg)
        if m and m.group(1) == self.attack:
            fooled, size = int(m.group(4)), int(m.group(5))
            self.done += size
            self.robust -= fooled
            if m.group(2) == m.group(3):  # the attack's last batch
                self.total = self.done
            self.total = max(self.total, self.done)
            self.weight_done += size * _cost(self.attack)
            self._send()

    def eta(self) -> float | None:
        if self.weight_done <= 0 or self.attack is None:
            return None
        later = self.attacks[self.attacks.index(self.attack) + 1:]
        left = (self.total - self.done) * _cost(self.attack) + self.robust * sum(_cost(a) for a in later)
        return self.meter.elapsed() / self.weight_done * left

    def _send(self) -> None:
        assert self.attack is not None
        i = self.attacks.index(self.attack) + 1
        what = f"{self.meter.what}, {self.attack} ({i}/{len(self.attacks)})"
        self.meter._send(self.done, self.eta(), what=what, total=self.total)


def _cost(attack: str) -> float:
    return AA_COST.get(attack, AA_COST_OTHER)
