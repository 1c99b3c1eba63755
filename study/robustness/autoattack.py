"""Standard AutoAttack (Croce & Hein 2020) through `pyautoattack` (import name `pyautoattack`):
APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries), 100 iterations each.
torchattacks' own `AutoAttack` is NOT the standard one and is not used.
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator

from torch import Tensor, nn

from study.robustness.attacks import correct, seeded
from study.robustness.threats import AUTOATTACK_NORMS as NORMS
from study.robustness.threats import Threat


def autoattack(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, eps: float, *, seed: int = 0,
               batch_size: int = 256) -> tuple[Tensor, list[str]]:
    """Per-point robust flags under standard AutoAttack at eps (x_adv re-checked after projection), and
    AutoAttack's own warnings (zero gradients, Square beating APGD, randomness: its flags_doc.md), one
    line per kind of warning."""
    if threat not in NORMS:
        raise ValueError(f"AutoAttack covers {', '.join(t.value for t in NORMS)}, not {threat.value!r}")
    if eps == 0:
        return correct(model, x, y, batch_size), []
    from pyautoattack import AutoAttack

    with seeded(seed, x.device), _collect("auto-attack") as messages:
        aa = AutoAttack(model, norm=NORMS[threat], eps=eps, version="standard", seed=seed, device=x.device)
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    return correct(model, threat.project(x_adv.to(x.dtype), x, eps), y, batch_size), messages


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
