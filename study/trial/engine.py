"""The one train loop. Natural, PGD-AT, TRADES and FGSM-RS are losses handed to it; the attack strength is
a function of the optimizer step within the stage (eps schedules advance per step); what happens after an
optimizer step (HYDRA's mask refresh) is a hook. Metrics accumulate on the device and are read once per
epoch: no host sync in the inner loop.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import torch
from torch import nn

from study.trial.attacks import AttackStrength
from study.trial.graphed import EagerStep
from study.trial.losses import Loss
from study.trial.pruning import masked_layers

if TYPE_CHECKING:  # type hints only: config looks the registries up by name, and they never import it
    from study.trial.config import StageConfig


class TrialFailed(RuntimeError):
    """The trial cannot go on (a NaN or infinite loss): recorded as failed, the study continues."""


@dataclass
class Runtime:
    """Where and how tensors compute: chosen once per trial."""

    device: torch.device
    bf16: bool  # autocast to bfloat16 (on the runtime's device: CUDA or CPU)
    channels_last: bool

    def autocast(self, cache: bool = True) -> contextlib.AbstractContextManager:
        """bf16 autocast when asked; `cache=False` inside a CUDA graph capture (torch's rule for graphs)."""
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=cache)
        return contextlib.nullcontext()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def resolve_runtime(device: str, precision: str) -> Runtime:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but CUDA is not available on this machine")
    dev = torch.device(device)
    bf16 = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
    return Runtime(device=dev, bf16=bf16, channels_last=dev.type == "cuda")


# Graphs the training step may need in one process: per stage (dense pretraining, HYDRA's scores, fixed-mask
# fine-tuning) one per kind of forward (attack / loss, and TRADES' no-grad clean pass) per batch shape (full,
# the epoch's last): 3 x 3 x 2 = 18. Beyond torch's default limit (8), after which it silently runs eagerly.
RECOMPILE_LIMIT = 32


class CompiledStep(nn.Module):
    """`torch.compile(model)` for the training step (inductor: CUDA or CPU), the masked weights built first.

    HYDRA's masked weight is built once per optimizer step and reused by every attack forward (see
    `study.trial.pruning.MaskedMixin.effective_weight`). Built inside a compiled graph it would be an output
    of that graph's single autograd node, whose saved tensors the first attack's `autograd.grad(loss, x)`
    frees, so the step's `loss.backward()` would fail ("backward through the graph a second time"). Built
    here, eagerly and under the caller's grad mode and autocast, it is an input of the compiled graphs. The
    uncompiled `model` (same parameters) stays the one saved and evaluated.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        # Static shapes: the full batch and an epoch's last (smaller) batch get a graph each, rather than the
        # full batch falling onto a dynamic-shape graph after the first short batch.
        try:
            self.compiled = torch.compile(model, dynamic=False, recompile_limit=RECOMPILE_LIMIT)
        except TypeError:  # an older torch: no per-call limit, raise the global one
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
            self.compiled = torch.compile(model, dynamic=False)
        self._masked = [layer for _, layer in masked_layers(model)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._masked:
            layer.effective_weight()  # a no-op unless in scores mode with no weight cached for this key
        return self.compiled(x)


def make_optimizer(params: Iterable[nn.Parameter], stage: StageConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if stage.optimizer == "sgd":
        return torch.optim.SGD(params, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay,
                               nesterov=stage.momentum > 0)
    if stage.optimizer == "adam":
        return torch.optim.Adam(params, lr=stage.lr, weight_decay=stage.weight_decay)
    raise ValueError(f"unknown optimizer {stage.optimizer!r}")


def make_scheduler(opt: torch.optim.Optimizer, stage: StageConfig, steps_per_epoch: int):
    """Learning-rate schedule stepped once per optimizer step."""
    total = max(1, stage.epochs * steps_per_epoch)
    if stage.lr_schedule == "cosine":
        fn = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    elif stage.lr_schedule == "step":
        fn = lambda step: 0.1 ** (int(step >= 0.5 * total) + int(step >= 0.75 * total))  # noqa: E731
    else:
        fn = lambda step: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Loss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    strength: AttackStrength | Callable[[int], AttackStrength],
    runtime: Runtime,
    generator: torch.Generator | None = None,
    after_step: Callable[[], None] | None = None,
    *,
    first_step: int = 0,
    step_fn: EagerStep | None = None,
) -> dict[str, float]:
    """One epoch of robust training; returns mean loss and accuracy (on the examples trained on).

    `strength` is either fixed or a function of the optimizer step within the stage (0-based); this
    epoch's first batch is step `first_step`, so a stage passes `(epoch - 1) * steps_per_epoch` and a resumed
    stage continues the schedule exactly. The reported `eps` is the one of the epoch's LAST step (the
    schedule's value at the end of the epoch; mid warm-up the epoch trained at eps up to that value).
    """
    schedule = strength if callable(strength) else (lambda step, fixed=strength: fixed)
    step_fn = step_fn or EagerStep(model, loss_fn, runtime, generator)
    model.train()
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    seen = 0
    step = first_step
    current = schedule(step)
    for x, y in batches:
        current = schedule(step)  # host arithmetic only: no sync
        loss, logits = step_fn(runtime.prepare(x), y, current)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        loss_sum += loss.detach().float() * y.numel()
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.numel()
        step += 1
    mean_loss = (loss_sum / max(seen, 1)).item()
    if not math.isfinite(mean_loss):
        raise TrialFailed(f"training loss is {mean_loss} (eps {current.eps:.4g}, lr {scheduler.get_last_lr()[0]:.3g})")
    return {"train_loss": mean_loss, "train_acc": correct.item() / max(seen, 1), "lr": scheduler.get_last_lr()[0],
            "eps": current.eps}
