"""What a study optimizes (`study.objectives`): final trial metrics that are safe to select on.

An objective is a size or validation figure of the trial (`OBJECTIVE_METRICS`) or a metric of the
robustness suite evaluated on the validation split (`robust.<threat>.<eps>`, `auc.<threat>`, ... with a
study.robustness section). A test-split figure is refused with the validation figure to use instead:
test figures exist only for the models the study chose (study.confirm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from study.errors import ConfigError, did_you_mean, unknown_key, unknown_value
from study.search.front.robust_settings import SUITE_FAMILIES, RobustnessSettings, canonical_metric, is_suite_name

# Final metrics of a trial (pipeline.TrialResult.metrics) that may serve as objectives: selection-safe
# ones only, i.e. sizes and validation figures. Test figures exist for chosen models only (study.confirm).
OBJECTIVE_METRICS = (
    "params_kept", "prunable_kept", "compression", "sparsity", "sparse_bytes",
    "val_robust_acc", "val_clean_acc",
)
MODES = ("min", "max")
# Names that are not selection-safe, with the validation figure to use instead.
_TEST_FIGURES = {"robust_acc": "val_robust_acc", "clean_acc": "val_clean_acc", "test_clean_acc": "val_clean_acc",
                 "test_robust_acc": "val_robust_acc", "test_pgd_acc": "val_robust_acc",
                 "test_autoattack_acc": "val_robust_acc"}


@dataclass(frozen=True)
class Objective:
    metric: str  # a final trial metric: one of OBJECTIVE_METRICS, or a suite metric (canonical name) of `robustness`
    mode: str  # "min" | "max"


DEFAULT_OBJECTIVES = (Objective("params_kept", "min"), Objective("val_robust_acc", "max"))


def parse_objectives(raw: Any, key: str = "study.objectives") -> tuple[Objective, ...]:
    """A list of {metric, mode}; suite metrics are checked against the robustness section afterwards
    (check_suite_objectives)."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(key, "expected a list of {metric: NAME, mode: min|max}")
    out = []
    for i, item in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(where, "expected {metric: NAME, mode: min|max}")
        for k in item:
            if k not in ("metric", "mode"):
                raise unknown_key(f"{where}.{k}", k, ("metric", "mode"))
        metric, mode = item.get("metric"), item.get("mode")
        if isinstance(metric, str):
            _refuse_test_metric(metric, where + ".metric")
        if not isinstance(metric, str) or (metric not in OBJECTIVE_METRICS and not is_suite_name(metric)):
            raise ConfigError(where + ".metric", f"unknown metric {metric!r}{did_you_mean(metric, OBJECTIVE_METRICS)}; "
                              f"valid choices: {', '.join(OBJECTIVE_METRICS)}, "
                              f"or with a study.robustness section {', '.join(SUITE_FAMILIES)}")
        if mode not in MODES:
            raise unknown_value(where + ".mode", mode, MODES, "mode")
        out.append(Objective(metric, mode))
    if len({o.metric for o in out}) != len(out):
        raise ConfigError(key, "an objective metric is listed twice")
    return tuple(out)


def _refuse_test_metric(metric: str, key: str) -> None:
    """Objectives select models, so they must never name a test-split figure."""
    instead = _TEST_FIGURES.get(metric)
    if instead is None and metric.startswith(("test.", "final.")):
        instead = metric.partition(".")[2]  # the suite's test figure -> its validation figure (search budget)
        if instead.startswith("autoattack."):  # AutoAttack runs on the front only; PGD + APGD-CE is the search's
            instead = "robust." + instead.partition(".")[2]
    elif instead is None and metric.startswith("test_"):
        instead = "val_robust_acc"
    if instead is not None:
        raise ConfigError(key, f"{metric!r} is a test-split figure, and selection uses validation: did you mean "
                          f"{instead}? (test figures are measured only for the chosen models: study.confirm)")


def check_suite_objectives(objectives: tuple[Objective, ...],
                           robustness: RobustnessSettings | None) -> tuple[Objective, ...]:
    """Suite metrics (robust.<t>.<eps>, auc.<t>, scenario.<t>.<eps>.r<r>) must be evaluated by the
    `robustness` section; they are renamed to the suite's own spelling (robust.l2.1.0 -> robust.l2.1).
    Error keys are relative to the study section (`objectives[1].metric`)."""
    out = []
    for i, o in enumerate(objectives):
        if o.metric in OBJECTIVE_METRICS:
            out.append(o)
            continue
        try:
            name = canonical_metric(o.metric, robustness)
        except ValueError as e:
            raise ConfigError(f"objectives[{i}].metric", f"{o.metric!r}: {e}") from None
        out.append(Objective(name, o.mode))
    if len({o.metric for o in out}) != len(out):
        raise ConfigError("objectives", "an objective metric is listed twice")
    return tuple(out)
