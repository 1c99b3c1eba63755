"""Scenario view (Merkle et al. 2021) and transfer attacks.

Scenario: if a fraction r of the inputs a deployed model sees are adversarial (at one eps), its
accuracy is (1 - r) * clean + r * robust. Which compression is best depends on r.

Transfer: adversarial examples crafted on a reference model (the dense one) and fed to the evaluated
model (the pruned one): a black-box threat that pruning from a public dense model makes realistic.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from study.robustness.attacks import PRIMARY, attack, correct
from study.robustness.threats import Threat


def aggregated_accuracy(clean: float, robust: float, r: float) -> float:
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"scenario fraction r must be in [0, 1], got {r}")
    return (1.0 - r) * clean + r * robust


@dataclass(frozen=True)
class ScenarioRow:
    threat: str
    eps: float
    r: float           # fraction of adversarial inputs
    accuracy: float    # (1 - r) * clean + r * robust(eps)


def scenario_table(clean: float, curves: dict[str, tuple[list[float], list[float]]],
                   rs: list[float]) -> list[ScenarioRow]:
    """One row per (threat, eps, r); curves maps threat -> (eps list, robust accuracy list)."""
    return [ScenarioRow(t, e, r, aggregated_accuracy(clean, a, r))
            for t, (eps, acc) in curves.items() for e, a in zip(eps, acc) for r in rs]


@dataclass(frozen=True)
class TransferResult:
    threat: str
    attack: str
    eps: list[float]
    source_acc: list[float]   # reference model on its own (white-box) adversarial examples
    target_acc: list[float]   # evaluated model on the same examples


def transfer(reference: nn.Module, model: nn.Module, x: Tensor, y: Tensor, threat: Threat, eps: list[float],
             **attack_kw) -> TransferResult:
    """Craft with the threat's primary attack on `reference`, evaluate both models on the result."""
    name, src, tgt = PRIMARY[threat], [], []
    bs = attack_kw.get("batch_size", 256)
    for e in eps:
        x_adv = attack(name, reference, x, y, e, **attack_kw)
        src.append(float(correct(reference, x_adv, y, bs).float().mean()))
        tgt.append(float(correct(model, x_adv, y, bs).float().mean()))
    return TransferResult(threat.value, name, list(eps), src, tgt)
