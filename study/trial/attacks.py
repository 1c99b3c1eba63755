"""Training-time attacks and the attack-strength schedule.

The training attack is written here rather than taken from torchattacks because it sits in the hot loop:
it differentiates w.r.t. the input only (`torch.autograd.grad(loss, x)`), runs under the caller's autocast,
never toggles the model's train/eval mode behind the caller's back, never touches the global RNG (noise
comes from the trial's generator) and never synchronises with the host. Evaluation uses torchattacks
(`study.trial.evaluation`, `study.robustness`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from study.registry import Registry

if TYPE_CHECKING:  # type hints only: config looks the registries up by name, and they never import it
    from study.trial.config import AttackConfig

# eps as a fraction of the target, given progress t in [0, 1] through a stage (its optimizer steps) and a
# warm-up fraction w of those steps.
EpsSchedule = Callable[[float, float], float]
EPS_SCHEDULES: Registry[EpsSchedule] = Registry("eps schedule")


@EPS_SCHEDULES.register("constant")
def _constant(t: float, w: float) -> float:
    return 1.0


@EPS_SCHEDULES.register("linear")
def _linear(t: float, w: float) -> float:
    """Linear warm-up from 0 to the target over the first w of the stage, then constant."""
    return 1.0 if w <= 0 else min(1.0, t / w)


@EPS_SCHEDULES.register("cosine")
def _cosine(t: float, w: float) -> float:
    """Half-cosine ramp from 0 to the target over the first w of the stage, then constant."""
    return 1.0 if w <= 0 or t >= w else 0.5 * (1.0 - math.cos(math.pi * t / w))


@EPS_SCHEDULES.register("step")
def _step(t: float, w: float) -> float:
    """Half the target for the first w of the stage, then the target."""
    return 0.5 if t < w else 1.0


@dataclass(frozen=True)
class AttackStrength:
    """The attack at one point of training: Linf radius, steps and absolute step size.

    eps and step_size are floats, or 0-d device tensors in a step replayed as a CUDA graph
    (study.trial.graphed), whose values are filled in before each replay."""

    eps: float | torch.Tensor
    steps: int
    step_size: float | torch.Tensor


class PresetNoise:
    """Random-start noise drawn ahead of time, handed to `pgd_linf` in place of a generator.

    A captured CUDA graph cannot draw from the trial's generator; the graphed step fills `tensor` from it
    before each replay (the values `torch.rand` would have drawn) and counts the draws while capturing.
    """

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.draws = 0

    def take(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.tensor.shape:
            raise ValueError(f"preset noise of shape {tuple(self.tensor.shape)} for inputs {tuple(x.shape)}")
        self.draws += 1
        return self.tensor.to(x.dtype)


def relative_step_size(cfg: AttackConfig) -> float:
    """PGD step size relative to eps: the configured value, or 0 = auto = 2.5 / steps (Madry/HYDRA travel:
    10 steps of 0.25 eps, 2.5 eps in all). With steps = 1 auto is 2.5 eps, clipped to the ball: FGSM-like."""
    return cfg.step_size if cfg.step_size > 0 else 2.5 / cfg.steps


def strength_at(cfg: AttackConfig, progress: float, *, warmup: bool = True) -> AttackStrength:
    """The attack strength at `progress` in [0, 1] through a stage; `warmup=False` gives the target eps."""
    frac = EPS_SCHEDULES.get(cfg.schedule)(min(max(progress, 0.0), 1.0), cfg.warmup_fraction) if warmup else 1.0
    eps = min(1.0, cfg.eps * cfg.eps_multiplier * frac)
    return AttackStrength(eps=eps, steps=cfg.steps, step_size=relative_step_size(cfg) * eps)


def stage_schedule(cfg: AttackConfig, total_steps: int, *, warmup: bool = True) -> Callable[[int], AttackStrength]:
    """The attack strength of optimizer step `step` (0-based, counted over the whole stage).

    eps advances per optimizer step, not per epoch: progress = (step + 1) / total_steps, so the warm-up
    spans `warmup_fraction` of the stage's steps and even the first step of a warming-up stage trains at a
    non-zero eps (the value the schedule reaches at the end of that step); the last step is at the target.
    Pure host arithmetic on Python ints: no device sync, and a resumed stage sees exactly the same values.
    """
    total = max(1, total_steps)
    if not warmup:
        fixed = strength_at(cfg, 1.0, warmup=False)
        return lambda step: fixed
    return lambda step: strength_at(cfg, (step + 1) / total)


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    strength: AttackStrength,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    random_start: bool = True,
    generator: torch.Generator | PresetNoise | None = None,
) -> torch.Tensor:
    """Linf PGD (Madry et al.): adversarial images in the eps-ball around x and inside [0, 1].

    `loss_fn(logits, y)` is maximised (default: cross-entropy). Gradients are taken w.r.t. the input only.
    The random start is uniform in the ball, drawn from `generator` (or taken from a `PresetNoise`).
    """
    eps, alpha = strength.eps, strength.step_size
    x = x.detach()
    if not torch.is_tensor(eps) and eps <= 0:  # a tensor eps (graph replay) is never 0: see study.trial.graphed
        return x.clone()
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target))
    if random_start:
        if isinstance(generator, PresetNoise):
            noise = generator.take(x)
        else:
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        delta = (2 * noise - 1) * eps
    else:
        delta = torch.zeros_like(x)
    x_adv = (x + delta).clamp_(0, 1)
    for _ in range(strength.steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()
