"""Robust training objectives, handed to the one train loop (study.trial.engine) as functions.

Each loss takes (model, x, y, strength, generator) and returns (loss, logits used for the training
accuracy). Attacks run with the model in train mode (the batch statistics the loss will see) but with
BatchNorm's running statistics frozen, so K attack passes do not pollute them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from study.trial.attacks import AttackStrength, pgd_linf
from study.registry import Registry

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor, AttackStrength, torch.Generator | None],
                tuple[torch.Tensor, torch.Tensor]]
LOSSES: Registry[Callable[..., Loss]] = Registry("robust loss")


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm keeps normalising with batch statistics but stops updating its running averages."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def _adversarial_ce(attack_strength: Callable[[AttackStrength], AttackStrength]) -> Loss:
    """Cross-entropy on PGD examples crafted with `attack_strength(strength)`."""

    def loss(model, x, y, strength, generator):
        with frozen_bn_stats(model):
            x_adv = pgd_linf(model, x, y, attack_strength(strength), generator=generator)
        logits = model(x_adv)
        return F.cross_entropy(logits, y), logits

    return loss


@LOSSES.register("pgd")
def pgd_at(**_: float) -> Loss:
    """Madry et al.: cross-entropy on PGD examples."""
    return _adversarial_ce(lambda strength: strength)


@LOSSES.register("trades")
def trades(beta: float = 6.0, **_: float) -> Loss:
    """Zhang et al. 2019: CE(f(x), y) + beta * KL(p(x) || p(x_adv)); the attack maximises that KL term."""

    def loss(model, x, y, strength, generator):
        with frozen_bn_stats(model):
            with torch.no_grad():
                p_clean = F.softmax(model(x).float(), dim=1)
            kl = lambda logits, p: F.kl_div(F.log_softmax(logits.float(), dim=1), p, reduction="batchmean")  # noqa: E731
            x_adv = pgd_linf(model, x, p_clean, strength, loss_fn=kl, generator=generator)
        logits = model(x)
        robust = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), F.softmax(logits.float(), dim=1),
                          reduction="batchmean")
        return F.cross_entropy(logits, y) + beta * robust, logits

    return loss


@LOSSES.register("fgsm_rs")
def fgsm_rs(**_: float) -> Loss:
    """Wong et al. 2020 ("fast is better than free"): one FGSM step of 1.25 eps from a random start."""

    return _adversarial_ce(lambda strength: AttackStrength(eps=strength.eps, steps=1, step_size=1.25 * strength.eps))


@LOSSES.register("natural")
def natural(**_: float) -> Loss:
    def loss(model, x, y, strength, generator):
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    return loss


def make_loss(name: str, trades_beta: float = 6.0) -> Loss:
    return LOSSES.get(name)(beta=trades_beta)
