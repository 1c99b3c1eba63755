"""Sanity checks for an attack-based evaluation (Carlini et al. 2019, "On evaluating adversarial
robustness", section 5 checklist). Each one is a pure function of measured accuracies, so it can be
tested without attacking anything. A failed check does not prove gradient masking; it says the numbers
must not be trusted until someone looks (the report is marked `suspect`).

All comparisons are paired (same fixed points, same seeds); `tolerance(n)` is the noise allowed:
2 points or 2 percentage points, whichever is larger.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str      # e.g. "monotone.linf"
    passed: bool
    detail: str    # the numbers the verdict rests on, for a human


def tolerance(n: int) -> float:
    return max(2.0 / max(n, 1), 0.02)


def monotone(threat: str, eps: list[float], acc: list[float], n: int) -> Check:
    """(1) Raw robust accuracy does not rise with eps (beyond noise)."""
    tol = tolerance(n)
    rises = [(e0, a0, e1, a1) for e0, e1, a0, a1 in zip(eps, eps[1:], acc, acc[1:]) if a1 > a0 + tol]
    detail = "; ".join(f"acc {a0:.3f} at eps {e0:g} rises to {a1:.3f} at eps {e1:g}" for e0, a0, e1, a1 in rises)
    return Check(f"monotone.{threat}", not rises, detail or f"non-increasing over {len(eps)} eps (tol {tol:.3f})")


def reaches_chance(threat: str, eps: float, acc: float, chance: float, n: int) -> Check:
    """(2) At an eps that lets any input become the constant grey image, accuracy is at chance or below."""
    tol = tolerance(n)
    ok = acc <= chance + tol
    return Check(f"chance.{threat}", ok, f"acc {acc:.3f} at eps {eps:g} vs chance level {chance:.3f} (tol {tol:.3f})")


def more_effort(threat: str, eps: float, acc: float, acc_strong: float, effort: str, n: int,
                curve_acc: float | None = None) -> Check:
    """(3) More steps / restarts do not raise robust accuracy beyond noise. The stronger run falling
    clearly below the curve's figure (curve_acc, default acc) is noted, not failed: the attack had not
    converged and the curve overestimates robustness."""
    tol = tolerance(n)
    ok = acc_strong <= acc + tol
    low = acc_strong < (acc if curve_acc is None else curve_acc) - tol
    note = "; not converged: the curve overestimates robustness, raise steps/restarts" if low else ""
    return Check(f"effort.{threat}", ok,
                 f"eps {eps:g}: acc {acc:.3f} -> {acc_strong:.3f} with {effort} (tol {tol:.3f}){note}")


def black_box(threat: str, eps: float, acc_white: float, acc_black: float, attack: str, n: int) -> Check:
    """(4) A black-box attack is not clearly stronger than the white-box ones."""
    tol = tolerance(n)
    ok = acc_black >= acc_white - tol
    return Check(f"black_box.{threat}", ok,
                 f"eps {eps:g}: white-box acc {acc_white:.3f}, {attack} acc {acc_black:.3f} (tol {tol:.3f})")


def eps_zero(threat: str, clean: float, acc0: float) -> Check:
    """(5) Robust accuracy at eps 0 equals clean accuracy exactly (same points: a difference means a
    randomized or batch-dependent model, or a broken attack pipeline)."""
    ok = abs(acc0 - clean) < 1e-9
    return Check(f"eps0.{threat}", ok, f"clean {clean:.4f}, robust at eps 0 {acc0:.4f}")


def skipped(name: str, why: str) -> Check:
    return Check(name, True, f"skipped: {why}")
