"""Threat models (RobustBench-style enum): what eps means, how distance is measured, how to project.

The enum is the one source of threat names (`THREATS`), and `AUTOATTACK_NORMS` of the threats standard
AutoAttack covers; study settings, the `study evaluate` flags and the suite all validate against them.
All images live in [0, 1] (float, NCHW); normalization is inside the model.
"""
from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor


class Threat(str, Enum):
    LINF = "linf"
    L2 = "l2"
    L0 = "l0"

    @classmethod
    def parse(cls, name: "str | Threat") -> "Threat":
        try:
            return cls(str(getattr(name, "value", name)).lower())
        except ValueError:
            valid = ", ".join(t.value for t in cls)
            raise ValueError(f"unknown threat model {name!r}; valid choices: {valid}") from None

    @property
    def unit(self) -> str:
        return {
            Threat.LINF: "max abs change of any value, pixel intensity in [0, 1] (8/255 = 0.0314)",
            Threat.L2: "Euclidean norm of the change over all C*H*W values in [0, 1]",
            Threat.L0: "pixels changed (all C channels of a changed pixel may change; k is an integer)",
        }[self]

    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-sample distance in this threat's unit."""
        d = (x_adv - x).detach()
        if self is Threat.LINF:
            return d.flatten(1).abs().amax(1)
        if self is Threat.L2:
            return d.flatten(1).norm(dim=1)
        return (d.abs().amax(dim=1) > 0).flatten(1).sum(1).to(x.dtype)  # any channel of the pixel changed

    def project(self, x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
        """Project onto {ball of radius eps around x} ∩ [0, 1] (exact for Linf/L0, box-then-ball for L2)."""
        d = (x_adv - x).detach()
        if self is Threat.LINF:
            d = d.clamp(-eps, eps)
        elif self is Threat.L2:
            d = (x + d).clamp(0, 1) - x
            n = d.flatten(1).norm(dim=1).clamp_min(1e-12)
            d = d * (eps / n).clamp(max=1.0).view(-1, *[1] * (x.dim() - 1))
        else:
            d = project_l0(d, x, int(eps))
        return (x + d).clamp(0, 1)

    def large_eps(self, x: Tensor) -> float:
        """A radius at which any input can be moved to the constant 0.5 image: accuracy must reach chance."""
        if self is Threat.LINF:
            return 0.5
        if self is Threat.L2:
            return 0.5 * math.sqrt(x[0].numel())
        return float(x.shape[-2] * x.shape[-1])

    def validate_eps(self, eps: list[float]) -> list[float]:
        if eps is None or len(eps) == 0:
            raise ValueError(f"threat {self.value!r}: an explicit, non-empty eps list is required (unit: {self.unit})")
        out = [float(e) for e in eps]
        for e in out:
            if not math.isfinite(e) or e < 0:
                raise ValueError(f"threat {self.value!r}: eps must be finite and >= 0, got {e}")
            if self is Threat.LINF and e > 1:
                raise ValueError(f"threat 'linf': eps {e} > 1 is outside [0, 1] pixel units (did you mean {e}/255?)")
            if self is Threat.L0 and e != int(e):
                raise ValueError(f"threat 'l0': eps is a pixel count and must be an integer, got {e}")
        if len(set(out)) != len(out):
            raise ValueError(f"threat {self.value!r}: duplicate eps in {out}")
        return sorted(out)


THREATS = tuple(t.value for t in Threat)  # linf, l2, l0
AUTOATTACK_NORMS = {Threat.LINF: "Linf", Threat.L2: "L2"}  # standard AutoAttack's norm argument per threat


def project_l0(d: Tensor, x: Tensor, k: int) -> Tensor:
    """Croce & Hein's PGD0 projection: clip d to the box, keep the k pixels whose (clipped) change is largest.

    A pixel's score is how much squared distance to the wanted perturbation is lost by zeroing it; topk
    (not a threshold) guarantees at most k pixels even with ties.
    """
    n, c = d.shape[:2]
    d = (x + d).clamp(0, 1) - x
    if k <= 0:
        return torch.zeros_like(d)
    score = d.square().sum(1).flatten(1)  # (n, H*W)
    if k >= score.shape[1]:
        return d
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(1, score.topk(k, dim=1).indices, True)
    return d * keep.view(n, 1, *d.shape[2:])
