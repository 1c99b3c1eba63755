"""Robustness evaluation: threat models, evaluation attacks, curves, sanity checks, AutoAttack, transfer
and scenario views, behind one entry point (`evaluate_robustness`). See docs/robustness.md."""
from study.robustness.checks import Check
from study.robustness.curves import Curve
from study.robustness.suite import AutoAttackResult, EvalBudget, RobustnessReport, evaluate_robustness
from study.robustness.threats import Threat

__all__ = ["AutoAttackResult", "Check", "Curve", "EvalBudget", "RobustnessReport", "Threat", "evaluate_robustness"]
