"""Which pruned model to ship: the size-vs-robustness front of a study and two recommendations on it.

Pure functions on `Point`s (one per COMPLETE trial), so the logic is tested on fake Optuna trials.
Everything here is on validation figures (the study's objectives): model selection never sees test.

- knee: the front point farthest above the chord between the front's two ends, with size on a log
  axis and both axes scaled to [0, 1] (Das 1999's "knee": the largest bulge, where a further size
  reduction starts to cost disproportionately much robustness). Fewer than three front points, or a
  front with no bulge: the point nearest the ideal corner (smallest size, best robustness); a tie (two
  points are always equally near) goes to the more robust one: no robustness is given up on no evidence.
- smallest within X points: the smallest model whose robust accuracy is at least the dense model's
  minus X percentage points (it is always on the front: anything dominating it qualifies too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from analysis import pareto

LWM = "lwm"


@dataclass(frozen=True)
class Point:
    """One COMPLETE trial seen along the report's two axes."""
    trial: int
    size: float  # the size objective (params_kept by default), minimized
    robust: float  # the robustness objective (val_robust_acc by default), maximized
    clean: float | None = None  # val_clean_acc
    total: float | None = None  # the dense size on the same scale (params_total), for compression
    params: Mapping[str, Any] = field(default_factory=dict)  # the searched values
    method: str = "hydra"  # prune.method
    run_id: str = ""  # the trial's nested MLflow run
    model_path: str = ""  # trials/<n>/model.pt where it exists
    test: Mapping[str, Any] = field(default_factory=dict)  # test_* figures of a confirmed front model
    test_budget: Mapping[str, Any] = field(default_factory=dict)  # its confirmation's settings (confirm.json)
    val_points: float | None = None  # the validation points its robust accuracy was measured on (metric val_points)

    @property
    def compression(self) -> float | None:
        return self.total / self.size if self.total and self.size > 0 else None

    @property
    def autoattack_confirmed(self) -> bool:
        """The test figure of this model includes standard AutoAttack (test_autoattack_acc is a number)."""
        v = self.test.get("test_autoattack_acc")
        return isinstance(v, (int, float)) and math.isfinite(v)

    @property
    def se(self) -> float | None:
        """The standard error of the robust accuracy from its validation points (None when unknown)."""
        return standard_error(self.robust, self.val_points)


@dataclass(frozen=True)
class Reference:
    """A model that is not a trial of the study: the dense model, or an LWM baseline from baselines.json."""
    label: str
    size: float
    robust: float
    clean: float | None = None
    method: str = "dense"
    keep_fraction: float | None = None
    test: Mapping[str, Any] = field(default_factory=dict)  # test_* figures and test_attack (study.baselines)
    test_budget: Mapping[str, Any] = field(default_factory=dict)  # the settings of that test confirmation
    for_trials: tuple[int, ...] = ()  # the front trials this baseline is the same-size counterpart of
    model_path: str = ""


def front(points: Sequence[Point]) -> list[Point]:
    """The non-dominated points (min size, max robust), smallest first. Equal points are all kept."""
    if not points:
        return []
    mask = pareto.non_dominated([[p.size, p.robust] for p in points], ["min", "max"])
    return sorted((p for p, keep in zip(points, mask) if keep), key=lambda p: (p.size, -p.robust, p.trial))


def _scaled(points: Sequence[Point]) -> np.ndarray:
    """(n, 2): log10 size and robust accuracy, each scaled to [0, 1] over `points` (0 where constant)."""
    xy = np.array([[math.log10(max(p.size, 1e-12)), p.robust] for p in points], dtype=float)
    lo, span = xy.min(0), np.ptp(xy, 0)
    return np.where(span > 0, (xy - lo) / np.where(span > 0, span, 1.0), 0.0)


def knee(front_points: Sequence[Point]) -> Point | None:
    """The knee of a front (sorted smallest first, as `front` returns it); None for an empty front."""
    pts = list(front_points)
    if not pts:
        return None
    xy = _scaled(pts)
    if len(pts) >= 3:
        a, b = xy[0], xy[-1]  # smallest (least robust) and largest (most robust) ends
        d = b - a
        # signed distance above the chord (positive: towards the ideal corner, small and robust)
        dist = (d[0] * (xy[:, 1] - a[1]) - d[1] * (xy[:, 0] - a[0])) / max(float(np.hypot(*d)), 1e-12)
        i = int(np.argmax(dist))
        if dist[i] > 1e-9:
            return pts[i]
    gap = np.hypot(xy[:, 0], 1.0 - xy[:, 1])  # distance to the ideal corner (0, 1)
    return min(zip(gap, pts), key=lambda gp: (round(float(gp[0]), 9), -gp[1].robust))[1]


def smallest_within(points: Iterable[Point], reference: float, within_points: float) -> Point | None:
    """The smallest point with robust >= reference - within_points / 100 (ties: the more robust)."""
    floor = reference - within_points / 100.0
    ok = [p for p in points if p.robust >= floor - 1e-12]
    return min(ok, key=lambda p: (p.size, -p.robust, p.trial)) if ok else None


# The rules in words, for the report page.
KNEE_RULE = ("the knee of the front: the front model farthest above the straight line joining the front's smallest "
             "and its largest model, with size on a log axis and both axes scaled to [0, 1] (where a further size cut "
             "starts to cost disproportionately much robust accuracy); with fewer than three front models, or none above "
             "that line, the front model nearest the ideal corner (smallest size, highest robust accuracy)")


def within_rule(within_points: float) -> str:
    return (f"the smallest model whose validation robust accuracy is at least the dense model's minus "
            f"{within_points:g} percentage points (it is on the front)")


NOISE_SE = 2.0  # two accuracies closer than this many standard errors of their difference are not told apart


def standard_error(acc: float | None, n: float | None) -> float | None:
    """sqrt(p (1 - p) / n): the binomial standard error of an accuracy p measured on n points (None when
    either is unknown or n < 1)."""
    if acc is None or n is None or not (math.isfinite(acc) and math.isfinite(n)) or n < 1:
        return None
    p = min(max(float(acc), 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / float(n))


def noise_gap(a: Point, b: Point) -> tuple[float, float] | None:
    """(|a.robust - b.robust|, NOISE_SE x the standard error of that difference, sqrt(se_a^2 + se_b^2)); None
    when either has no val_points. The two are not distinguishable when the first is at most the second."""
    if a.se is None or b.se is None:
        return None
    return abs(a.robust - b.robust), NOISE_SE * math.hypot(a.se, b.se)


def within_noise(a: Point, b: Point) -> bool | None:
    """Whether two models' robust accuracies are within NOISE_SE standard errors of their difference (None: unknown)."""
    gap = noise_gap(a, b)
    return None if gap is None else gap[0] <= gap[1]


def best_at_compression(points: Iterable[Point], factor: float) -> Point | None:
    """The most robust point compressed at least `factor` times (None when none is)."""
    ok = [p for p in points if p.compression is not None and p.compression >= factor * (1 - 1e-9)]
    return max(ok, key=lambda p: (p.robust, -p.size, -p.trial)) if ok else None


def hypervolume_history(trials: Sequence[Any], modes: Sequence[str]) -> list[tuple[int, float]]:
    """(completed trials so far, hypervolume of their values) in completion order, against the
    reference of all of them (so the last value equals `pareto.study_hypervolume`)."""
    done = [t for t in trials if t.values is not None and all(math.isfinite(v) for v in t.values)]
    done.sort(key=lambda t: (t.datetime_complete is None, t.datetime_complete or 0, t.number))
    if not done:
        return []
    values = [t.values for t in done]
    ref = pareto.default_reference(values, modes)
    return [(k, pareto.hypervolume(values[:k], modes, ref)) for k in range(1, len(done) + 1)]


# ---------------------------------------------------------------------------------------------------
# The LWM baseline at the front's sizes.


# What LWM does not use (it sets the mask from weight magnitudes, without score training): left out of a
# baseline's config, so front trials differing only there share one baseline run.
LWM_UNUSED = ("prune.method", "prune.score_init", "prune.train_bn")
LWM_UNUSED_SECTIONS = ("prune_stage.",)


def config_keys() -> frozenset[str]:
    """Every dotted trial config key (`prune.keep_fraction`, `attack.schedule`, ...): a row's searched values."""
    from study.trial.config import TrialConfig, flatten

    return frozenset(flatten(TrialConfig().to_dict()))


def baseline_configs(front_rows: Sequence[Mapping[str, Any]], defaults: Mapping[str, Any] = {}) -> list[dict[str, Any]]:
    """The LWM trials a fair baseline needs: one per distinct front configuration, prune.method=lwm with the same
    keep fraction and every other searched value LWM uses (attack schedule, fine-tuning, eval, ...); score_init,
    train_bn and the prune stage drop out (no score training). Rows are `pareto.front_rows` rows (the searched
    values as dotted columns; metric columns are never mistaken for them). `defaults`: the study's fixed
    `prune.method` and `prune.keep_fraction` (dotted keys), for rows that do not search them.

    The keep fraction is the row's searched one, else the study's fixed one, else prunable_kept/prunable_total.
    Returns [{"for_trials": [numbers], "overrides": {dotted key: value}}], in the rows' order; rows of LWM or
    dense trials, and rows without a keep fraction, are skipped.
    """
    keys = config_keys()
    out: list[dict[str, Any]] = []
    seen: dict[tuple, dict[str, Any]] = {}
    for row in front_rows:
        if row.get("prune.method", defaults.get("prune.method")) in (LWM, "dense"):
            continue  # already an LWM trial, or an unpruned one
        keep = row.get("prune.keep_fraction", defaults.get("prune.keep_fraction"))
        if keep is None and row.get("prunable_total"):
            keep = float(row["prunable_kept"]) / float(row["prunable_total"])
        if keep is None:
            continue
        overrides = {k: v for k, v in row.items() if k in keys and k not in LWM_UNUSED
                     and not k.startswith(LWM_UNUSED_SECTIONS)}
        overrides.update({"prune.method": LWM, "prune.keep_fraction": float(keep)})
        overrides = dict(sorted(overrides.items()))
        key = tuple((k, repr(v)) for k, v in overrides.items())
        if key in seen:
            seen[key]["for_trials"].append(row["trial"])
            continue
        entry = {"for_trials": [row["trial"]], "overrides": overrides}
        seen[key] = entry
        out.append(entry)
    return out


def set_args(overrides: Mapping[str, Any]) -> str:
    """`--set k=v` arguments of `study trial` for one baseline config."""
    return " ".join(f"--set {k}={v:.6g}" if isinstance(v, float) else f"--set {k}={v}" for k, v in overrides.items())
