"""Multi-fidelity for a front: stop a trial at a rung when enough completed trials dominate it there.

A rung is an epoch boundary (the trial's n-th reported epoch, counted over its prune and fine-tune stages).
At a rung, the trial's point is its objectives with each accuracy taken at that epoch (its size is fixed from
the start: HYDRA's masks keep `keep_fraction` of the weights from the first step), and the completed trials'
points are theirs at the same epoch. When at least `min_dominating` of them dominate it (no worse in every
objective, better in one), the trial is stopped: the study records it PRUNED (never COMPLETE, never in the
front; it counts toward n_trials).

Single-objective successive halving asks "is this trial in the top 1/eta at this rung?"; for a front the
question is "could this trial still reach the front?", and a point dominated by several finished trials at the
same epoch is unlikely to. The rule reads completed trials only, so the first trials always run in full.
The default (rungs at 1/3 and 2/3 of a trial's epochs, 3 dominating trials) is what the search benchmark
measured (docs/results.md, "Search benchmark").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class RungRule:
    rungs: tuple[int, ...]  # 1-based epoch counts at which a trial is judged; () = never stop a trial
    min_dominating: int = 3

    def __post_init__(self) -> None:
        if any(int(r) != r or r < 1 for r in self.rungs):
            raise ValueError(f"rungs must be positive epoch counts, got {list(self.rungs)}")
        if self.min_dominating < 1:
            raise ValueError(f"min_dominating must be >= 1, got {self.min_dominating}")

    @classmethod
    def default(cls, epochs: int = 6) -> "RungRule":
        """Rungs at 1/3 and 2/3 of a trial's `epochs` (distinct, before the last), 3 dominating trials."""
        rungs = sorted({max(1, round(epochs * f)) for f in (1 / 3, 2 / 3)} - {epochs})
        return cls(tuple(rungs), 3)

    def stops(self, epoch: int, size: float, value: float, completed: Sequence[tuple[float, float]]) -> bool:
        """Two objectives (size: min, accuracy: max), as the search benchmark replays them."""
        return self.stops_point(epoch, (size, value), completed, ("min", "max"))

    def stops_point(self, epoch: int, point: Sequence[float], completed: Sequence[Sequence[float]],
                    modes: Sequence[str]) -> bool:
        """Whether a trial at `epoch` with objectives `point` is stopped, given the completed trials' points at
        the same epoch (`modes`: "min"/"max" per objective)."""
        if epoch not in self.rungs or len(completed) < self.min_dominating:
            return False
        sign = [1.0 if m in ("min", "minimize") else -1.0 for m in modes]
        mine = [s * v for s, v in zip(sign, point)]
        count = 0
        for other in completed:
            theirs = [s * v for s, v in zip(sign, other)]
            if all(t <= m for t, m in zip(theirs, mine)) and any(t < m for t, m in zip(theirs, mine)):
                count += 1
                if count >= self.min_dominating:
                    return True
        return False


def parse_rungs(raw: Any, key: str = "study.early_stop") -> RungRule | None:
    """`study.early_stop`: false/absent = off; {rungs: [epoch counts], min_dominating: n} = on."""
    from study.errors import ConfigError

    if raw in (None, False):
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"expected false or {{rungs: [epoch counts], min_dominating: n}}, got {raw!r}")
    unknown = set(raw) - {"rungs", "min_dominating"}
    if unknown:
        raise ConfigError(key, f"unknown keys {sorted(unknown)} (allowed: rungs, min_dominating)")
    rungs = raw.get("rungs")
    if not isinstance(rungs, list) or not rungs or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rungs):
        raise ConfigError(f"{key}.rungs", f"expected a non-empty list of epoch counts (>= 1), got {rungs!r}")
    n = raw.get("min_dominating", 3)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{key}.min_dominating", f"expected an integer >= 1, got {n!r}")
    return RungRule(tuple(sorted(set(rungs))), n)
