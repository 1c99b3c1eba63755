"""Robustness curves: robust accuracy over eps on fixed points, their monotone envelopes and the AUC."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Curve:
    """Robust accuracy of one threat model on the fixed evaluation points.

    robust_acc: raw, per eps: share of points classified correctly under every curve attack (attacks.CURVE) run at
      that eps (the figure papers report; the sanity checks use it).
    robust_acc_nested: per point, an adversarial example found at eps' <= eps also counts at eps (the
      balls nest), so this is a valid, stronger estimate and non-increasing by construction. It is <= the
      running minimum of the raw curve.
    per_attack: raw accuracy of each attack alone.
    """
    threat: str
    unit: str
    eps: list[float]
    robust_acc: list[float]
    robust_acc_nested: list[float]
    per_attack: dict[str, list[float]] = field(default_factory=dict)
    auc: float = 0.0

    @property
    def running_min(self) -> list[float]:
        out, lo = [], float("inf")
        for a in self.robust_acc:
            lo = min(lo, a)
            out.append(lo)
        return out

    def at(self, eps: float) -> float:
        return self.robust_acc[self.eps.index(eps)]


def nested(robust: Tensor) -> Tensor:
    """robust: (n_eps, n_points) bool over increasing eps -> a point is robust at eps only if it is robust
    at every eps' <= eps."""
    return robust.int().cummin(dim=0).values.bool()


def from_flags(threat: str, unit: str, eps: list[float], robust: Tensor,
               per_attack: dict[str, list[float]] | None = None) -> Curve:
    """Curve from per-eps, per-point robust flags (n_eps, n_points), eps increasing."""
    raw = robust.float().mean(1).tolist()
    nest = nested(robust).float().mean(1).tolist()
    return Curve(threat, unit, list(eps), raw, nest, per_attack or {}, auc=area(eps, raw))


def from_distances(eps: list[float], distances: Tensor, correct: Tensor) -> list[float]:
    """Minimum-norm attacks: a point is robust at eps when it is classified right and the smallest
    adversarial distance found exceeds eps (inf where none was found). Non-increasing by construction."""
    return [float((correct & (distances > e)).float().mean()) for e in eps]


def area(eps: list[float], acc: list[float]) -> float:
    """Trapezoid area under acc(eps), divided by the eps range: the mean robust accuracy over [min, max]
    eps, in [0, 1]; a one-point curve gives that point's accuracy."""
    if len(eps) == 1:
        return float(acc[0])
    a = sum((e1 - e0) * (a0 + a1) / 2 for e0, e1, a0, a1 in zip(eps, eps[1:], acc, acc[1:]))
    return float(a / (eps[-1] - eps[0]))
