"""Standard AutoAttack (Croce & Hein 2020) through `pyautoattack` (import name `pyautoattack`):
APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries), 100 iterations each.
torchattacks' own `AutoAttack` is NOT the standard one and is not used.
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator

import torch
from torch import Tensor, nn

from study.robustness.attacks import correct, seeded
from study.robustness.progress import AutoAttackMeter, Meter, Sink
from study.robustness.threats import AUTOATTACK_NORMS as NORMS
from study.robustness.threats import Threat


def autoattack(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, eps: float, *, seed: int = 0,
               batch_size: int = 256, progress: Sink | None = None) -> tuple[Tensor, list[str]]:
    """Per-point robust flags under standard AutoAttack at eps (x_adv re-checked after projection), and
    AutoAttack's own warnings (zero gradients, Square beating APGD, randomness: its flags_doc.md), one
    line per kind of warning. `progress`: per batch of points, an Update (study.robustness.progress)."""
    if threat not in NORMS:
        raise ValueError(f"AutoAttack covers {', '.join(t.value for t in NORMS)}, not {threat.value!r}")
    if eps == 0:
        return correct(model, x, y, batch_size), []
    from pyautoattack import AutoAttack

    with seeded(seed, x.device), _collect("auto-attack") as messages:
        aa = AutoAttack(model, norm=NORMS[threat], eps=eps, version="standard", seed=seed, device=x.device)
        with _progress(progress, f"AutoAttack standard {NORMS[threat]} eps={eps:g}", aa.attacks_to_run,
                       model, x, y, batch_size):
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    return correct(model, threat.project(x_adv.to(x.dtype), x, eps), y, batch_size), messages


@contextlib.contextmanager
def _progress(sink: Sink | None, what: str, attacks: list[str], model: nn.Module, x: Tensor, y: Tensor,
              batch_size: int) -> Iterator[None]:
    """AutoAttack's DEBUG progress lines, read by an AutoAttackMeter while it runs (inside `_collect`: the
    logger does not propagate, so nothing more reaches the log)."""
    if sink is None:
        yield
        return
    with torch.no_grad():
        robust = int(correct(model, x, y, batch_size).sum())  # what AutoAttack attacks: the points classified right
    meter = Meter(sink, what, len(x))
    log, handler = logging.getLogger("auto-attack"), AutoAttackMeter(meter, attacks, robust)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    meter.finish()


@contextlib.contextmanager
def _collect(logger_name: str) -> Iterator[list[str]]:
    """Route a logger's warnings into a list (first message of each kind) instead of stderr."""
    log, seen, out = logging.getLogger(logger_name), set(), []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            kind = re.sub(r"[\d.]+", "#", msg)
            if kind not in seen:
                seen.add(kind)
                out.append(msg)

    handler, propagate, level = Handler(logging.WARNING), log.propagate, log.level
    log.addHandler(handler)
    log.propagate, log.level = False, logging.WARNING
    try:
        yield out
    finally:
        log.removeHandler(handler)
        log.propagate, log.level = propagate, level
