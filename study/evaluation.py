"""Seeded clean and PGD-Linf robust accuracy of a trial's model (torchattacks' PGD, with restarts).

torchattacks switches the model to eval mode and draws its random start from the global RNG: both are
contained here (the caller's mode and RNG state are restored), so evaluation never leaks into training.
The full multi-threat suite (L0/L2/Linf curves, AutoAttack, sanity checks) is `study.robustness`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torchattacks
from torch import nn


@dataclass(frozen=True)
class Accuracy:
    clean: float
    robust: float
    points: int


def _subset(x: torch.Tensor, y: torch.Tensor, points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if points <= 0 or points >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:points].to(x.device)
    return x[idx], y[idx]


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    restarts: int = 1,
    points: int = 0,
    seed: int = 0,
    batch_size: int = 512,
) -> Accuracy:
    """Clean and robust accuracy; robust = correct under every restart of PGD (per-point worst case).

    `step_size` is relative to eps. The same seeded points are used for clean and robust figures.
    """
    if eps < 0:
        raise ValueError("evaluation eps must be given and >= 0")
    x, y = _subset(x, y, points, seed)
    was_training = model.training
    model.eval()
    clean = robust = 0
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            attack = torchattacks.PGD(model, eps=eps, alpha=step_size * eps, steps=steps, random_start=True)
            for i in range(0, len(x), batch_size):
                xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                with torch.no_grad():
                    ok = model(xb).argmax(1) == yb
                clean += int(ok.sum())
                still = ok.clone()
                if eps > 0:
                    for _ in range(restarts):
                        idx = still.nonzero().squeeze(1)
                        if len(idx) == 0:
                            break
                        adv = attack(xb[idx], yb[idx])
                        with torch.no_grad():
                            still[idx] = model(adv).argmax(1) == yb[idx]
                robust += int(still.sum())
    finally:
        model.train(was_training)
    n = max(len(x), 1)
    return Accuracy(clean=clean / n, robust=robust / n, points=len(x))
