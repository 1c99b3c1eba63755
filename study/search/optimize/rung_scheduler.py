"""`RungScheduler`: `study.early_stop` (study.search.optimize.rungs.RungRule) through Tune's scheduler interface.

Every epoch report of a trial carries its objectives at that epoch (the trainable adds the size ones); the
scheduler keeps them per trial and, when a trial completes (its final report, no failure), files its epoch
points as a completed trial's. At a rung it returns STOP for a trial that enough completed trials dominate at
the same epoch. Tune then ends the trial before its final report, which StudySearch records as PRUNED in
Optuna and the MLflow callback as a KILLED run; both take the reason from `reasons`, so the three records say
the same thing.

A resumed study builds a new scheduler: `add_completed` gives it the per-epoch figures of the trials completed
before (read from their result.json histories, JSON only), so the rule judges against every completed trial
of the study, not only this driver's.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from study.keys import FAIL_KEY
from study.search.optimize.rungs import RungRule

log = logging.getLogger("study.search")


class RungScheduler(FIFOScheduler):
    def __init__(self, rule: RungRule, metrics: Sequence[str], modes: Sequence[str]):
        super().__init__()
        self.rule, self.metrics, self.modes = rule, list(metrics), list(modes)
        self.points: dict[str, dict[int, tuple[float, ...]]] = {}  # Tune trial id -> epoch step -> point
        self.completed: dict[int, list[tuple[float, ...]]] = {}  # epoch step -> completed trials' points
        self.reasons: dict[str, str] = {}  # Tune trial id -> why it was stopped

    def point_of(self, record: Mapping[str, Any]) -> tuple[float, ...] | None:
        values = [record.get(m) for m in self.metrics]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return None
        return tuple(float(v) for v in values)

    def add_completed(self, history: Sequence[Mapping[str, Any]], final: Mapping[str, Any]) -> None:
        """A completed trial's epoch points: each epoch's figures, the final ones where an epoch lacks an
        objective (sizes: fixed for a trial's whole run)."""
        for step, record in enumerate(history, start=1):
            point = self.point_of({**final, **record})
            if point is not None:
                self.completed.setdefault(step, []).append(point)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("final"):
            return TrialScheduler.CONTINUE
        step, point = result.get("step"), self.point_of(result)
        if not isinstance(step, int) or point is None:
            return TrialScheduler.CONTINUE
        self.points.setdefault(trial.trial_id, {})[step] = point
        others = self.completed.get(step, [])
        if self.rule.stops_point(step, point, others, self.modes):
            shown = ", ".join(f"{m} {v:.4g}" for m, v in zip(self.metrics, point))
            self.reasons[trial.trial_id] = (
                f"stopped at rung epoch {step} (study.early_stop): {shown} is dominated at that epoch by at least "
                f"{self.rule.min_dominating} completed trials")
            log.info("trial %s: %s", trial.trial_id, self.reasons[trial.trial_id])
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        points = self.points.pop(trial.trial_id, {})
        if result and result.get("final") and not result.get(FAIL_KEY):
            for step, point in points.items():
                self.completed.setdefault(step, []).append(point)
        super().on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.points.pop(trial.trial_id, None)
        super().on_trial_error(tune_controller, trial)

    def debug_string(self) -> str:
        return f"RungScheduler: rungs at epochs {list(self.rule.rungs)}, {self.rule.min_dominating} dominating trials"
