"""Seeded clean and PGD-Linf robust accuracy of a trial's model (torchattacks' PGD, with restarts).

torchattacks switches the model to eval mode and draws its random start from the global RNG: both are
contained here (the caller's mode and RNG state are restored), so evaluation never leaks into training.
The full multi-threat suite (L0/L2/Linf curves, AutoAttack, sanity checks) is `study.robustness`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torchattacks
from torch import nn


AUTO_TRAVEL = 2.5  # auto step: 2.5 * eps / steps, so the steps travel 2.5 eps in all (Madry et al.; HYDRA)


def relative_step(step_size: float, steps: int) -> float:
    """PGD step relative to eps: `step_size` as given, or 0 = auto = 2.5 / steps."""
    if step_size < 0 or steps < 1:
        raise ValueError(f"step_size must be >= 0 (0 = auto) and steps >= 1, got {step_size}, {steps}")
    return step_size if step_size > 0 else AUTO_TRAVEL / steps


def step_text(step_size: float, steps: int) -> str:
    """The step as a budget names it: `2.5*eps/50` (auto) or `0.1*eps`."""
    return f"{AUTO_TRAVEL:g}*eps/{steps}" if step_size <= 0 else f"{step_size:g}*eps"


@dataclass(frozen=True)
class Accuracy:
    clean: float
    robust: float
    points: int


def subset(x: torch.Tensor, y: torch.Tensor, points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `points` of a seeded permutation (0 or >= len: all points, in order)."""
    if points <= 0 or points >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:points].to(x.device)
    return x[idx], y[idx]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, points: int = 0, seed: int = 0,
             **pgd: Any) -> Accuracy:
    """Clean and robust accuracy; robust = correct under every restart of PGD (per-point worst case).

    `pgd`: pgd_flags' eps, steps, step_size (relative to eps, 0 = auto: `relative_step`), restarts,
    batch_size. The same seeded points (`points` of them, 0 = all) are used for clean and robust figures.
    """
    x, y = subset(x, y, points, seed)
    ok, still = pgd_flags(model, x, y, seed=seed, **pgd)
    n = max(len(x), 1)
    return Accuracy(clean=int(ok.sum()) / n, robust=int(still.sum()) / n, points=len(x))


def pgd_flags(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float = 0.0,
    restarts: int = 1,
    seed: int = 0,
    batch_size: int = 512,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point flags (clean correct, correct under every PGD restart) on all of x. `on_batch(done)`:
    called after each batch with the points done so far (a progress line)."""
    if eps < 0:
        raise ValueError("evaluation eps must be given and >= 0")
    alpha = relative_step(step_size, steps) * eps
    was_training = model.training
    model.eval()
    clean, robust = [], []
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
            for i in range(0, len(x), batch_size):
                xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                with torch.no_grad():
                    ok = model(xb).argmax(1) == yb
                still = ok.clone()
                if eps > 0:
                    for _ in range(restarts):
                        idx = still.nonzero().squeeze(1)
                        if len(idx) == 0:
                            break
                        adv = attack(xb[idx], yb[idx])
                        with torch.no_grad():
                            still[idx] = model(adv).argmax(1) == yb[idx]
                clean.append(ok)
                robust.append(still)
                if on_batch is not None:
                    on_batch(min(i + batch_size, len(x)))
    finally:
        model.train(was_training)
    empty = torch.zeros(0, dtype=torch.bool, device=x.device)
    return (torch.cat(clean) if clean else empty), (torch.cat(robust) if robust else empty)
