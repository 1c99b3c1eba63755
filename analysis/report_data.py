"""What the study report reads: the Optuna study, the trial folders, the dense checkpoint's history, an
optional baselines.json and MLflow run ids. Nothing here writes.

Per trial folder (trials/<n>/): result.json (final metrics, a fallback for Optuna's user attrs),
model.pt, confirm.json (the test_* figures of a confirmed front model: flat or under "metrics"),
robustness_final.json (the final robustness suite: curves per threat).
"""
from __future__ import annotations

import functools
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from analysis import pareto
from study.keys import NUMBER_KEY
from analysis.plots import finite
from analysis.recommend import LWM, Point, Reference, front, hypervolume_history

log = logging.getLogger("analysis.report")

CONFIRM_FILE = "confirm.json"  # the test_* figures of a confirmed front model
FINAL_FILE = "robustness_final.json"  # the final robustness suite of a front model
# The LWM baseline: [{method, keep_fraction, params_kept, val_robust_acc, val_clean_acc, ...}], written by hand or
# by study.baselines (study.search.front.baselines), which adds every val metric, for_trials, the test figures
# (test_clean_acc, test_pgd_acc, test_autoattack_acc, test_robust_acc, test_points), test_attack and budget.
BASELINES_FILE = "baselines.json"
SIZE_TOTALS = {"params_kept": "params_total", "prunable_kept": "prunable_total", "sparse_bytes": "dense_bytes"}


class ReportError(ValueError):
    """The study cannot be reported (e.g. no size or no robustness objective)."""


@dataclass
class ReportData:
    name: str
    objectives: list[str]
    modes: list[str]
    size_metric: str
    robust_metric: str
    points: list[Point]
    front: list[Point]
    counts: dict[str, int]
    dense: Reference | None = None
    baselines: list[Reference] = field(default_factory=list)
    baseline_source: str = ""
    hv_history: list[tuple[int, float]] = field(default_factory=list)
    curves: dict[int, dict[str, tuple[list[float], list[float], str]]] = field(default_factory=dict)


SIZE_METRICS = ("params_kept", "sparse_bytes", "prunable_kept")


def axes_of(objectives: Sequence[str], modes: Sequence[str]) -> tuple[str, str]:
    """The size objective (a minimized size metric, else the first minimized objective) and the
    robustness objective (the first maximized one naming robustness, else the first maximized)."""
    mins = [m for m, d in zip(objectives, modes) if d == "min"]
    maxs = [m for m, d in zip(objectives, modes) if d == "max"]
    if not mins or not maxs:
        raise ReportError(f"the report needs a minimized size and a maximized robustness objective; "
                          f"the study has {list(zip(objectives, modes))}")
    size = next((m for m in mins if m in SIZE_METRICS), mins[0])
    robust = next((m for m in maxs if "robust" in m or m.startswith(("auc.", "scenario."))), maxs[0])
    return size, robust


def read_json(path: Path, shape: type = dict) -> Any | None:
    """A derived JSON file of the study folder (None when absent); a damaged one, or one of another shape than
    `shape`, reads as absent with a one-line warning naming it (once per file and damage)."""
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, shape):
            raise ValueError(f"a JSON {type(data).__name__}, not a {shape.__name__}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _warn_damaged(str(path), first)
        return None
    return data


@functools.lru_cache(maxsize=256)
def _warn_damaged(path: str, reason: str) -> None:
    log.warning("%s is damaged (%s): ignored; the study's figures come from its Optuna storage", path, reason)


def finite_figures(values: Mapping[str, Any], path: Path) -> dict[str, float]:
    """The finite numbers of `values`; another value is left out with a warning naming `path` (a figure of
    the wrong type is never shown as one)."""
    bad = sorted(k for k, v in values.items() if not finite(v))
    if bad:
        _warn_damaged(str(path), f"not a finite number: {', '.join(bad)}")
    return {k: float(v) for k, v in values.items() if finite(v)}


def _json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def _trial_folder(root: Path, number: int) -> Path:
    return root / "trials" / f"{number:04d}"


def confirmed_figures(folder: Path, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """test_* figures of a trial: Optuna user attrs, overridden by confirm.json (flat, or under "metrics")."""
    out = {k: v for k, v in attrs.items() if k.startswith("test_")}
    path = folder / CONFIRM_FILE
    data = _json(path) or {}
    for source in (data, data.get("metrics") if isinstance(data.get("metrics"), dict) else {}):
        out.update(finite_figures({k: v for k, v in source.items() if k.startswith("test_") and k != "test_attack"},
                                  path))
        if isinstance(source.get("test_attack"), str):
            out["test_attack"] = source["test_attack"]
    return out


def confirm_budget(folder: Path) -> dict[str, Any]:
    """The settings a front model was confirmed with (confirm.json's "budget"; {} when unknown)."""
    budget = (_json(folder / CONFIRM_FILE) or {}).get("budget")
    return dict(budget) if isinstance(budget, dict) else {}


def trial_point(t: Any, root: Path, objectives: Sequence[str], size: str, robust: str, default_method: str,
                run_ids: Mapping[int, str] = {}) -> Point:
    folder = _trial_folder(root, t.number)
    attrs = dict(t.user_attrs)
    path = folder / "result.json"
    result = _json(path) or {}
    metrics = result.get("metrics") or {}
    if not isinstance(metrics, dict):
        _warn_damaged(str(path), "its metrics are not a JSON object")
        metrics = {}
    for k, v in finite_figures(metrics, path).items():
        attrs.setdefault(k, v)
    values = {**attrs, **dict(zip(objectives, t.values))}
    total = values.get(SIZE_TOTALS.get(size, ""))
    clean = values.get("val_clean_acc")
    model = folder / "model.pt"
    n = values.get("val_points")  # the binomial standard error applies to an accuracy on n points, not to an AUC
    return Point(trial=t.number, size=float(values[size]), robust=float(values[robust]),
                 clean=float(clean) if finite(clean) else None,
                 total=float(total) if finite(total) and total > 0 else None,
                 params=dict(t.params), method=str(t.params.get("prune.method", default_method)),
                 run_id=str(attrs.get("mlflow_run_id") or run_ids.get(t.number, "")),
                 model_path=str(model) if model.is_file() else "", test=confirmed_figures(folder, attrs),
                 test_budget=confirm_budget(folder),
                 val_points=float(n) if robust.endswith("_acc") and finite(n) and n >= 1 else None)


def dense_reference(root: Path, space: Any, total: float | None) -> Reference | None:
    """The dense model's last pretraining epoch (val_robust_acc / val_clean_acc with the cheap per-epoch
    budget), from its checkpoint's history; None when there is no readable checkpoint with one."""
    cfg = space.base_config()
    key = cfg.pretrain_key()
    candidates = [Path(cfg.pretrained)] if cfg.pretrained else []
    if "cache_dir" in space.trial:
        candidates.append(Path(cfg.cache_dir) / f"{key}.pt")
    candidates.append(root / "pretrained" / f"{key}.pt")
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None
    try:
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a checkpoint we can read: the report goes on without the dense figure
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.warning("report: cannot read the dense checkpoint %s (%s); no dense reference", path, first)
        return None
    history = ckpt.get("history") if isinstance(ckpt, dict) else None
    last = next((h for h in reversed(history or []) if isinstance(h, dict) and finite(h.get("val_robust_acc"))), None)
    if last is None:
        return None
    clean = last.get("val_clean_acc")
    return Reference(label="dense model (last pretraining epoch, per-epoch val budget)",
                     size=float(total) if total else float("nan"), robust=float(last["val_robust_acc"]),
                     clean=float(clean) if finite(clean) else None, method="dense")


def read_baselines(root: Path, size: str, robust: str) -> list[Reference]:
    """baselines.json in the study folder: a list of {method, keep_fraction, params_kept, val_robust_acc,
    val_clean_acc} (by hand), or study.baselines' entries, which add test_* figures, test_attack, budget and
    for_trials; entries lacking the two axes are skipped with a warning."""
    path = root / BASELINES_FILE
    if not path.is_file():
        return []
    rows = read_json(path, list)
    out = []
    for row in rows or []:
        s, r = (row.get(size, row.get("params_kept")), row.get(robust, row.get("val_robust_acc"))) if isinstance(row, dict) else (None, None)
        if not (finite(s) and finite(r)):
            log.warning("report: %s: entry %r lacks %s / %s; skipped", path, row, size, robust)
            continue
        method = str(row.get("method", LWM))
        test = {k: v for k, v in row.items() if k.startswith("test_") and (finite(v) or k == "test_attack")}
        budget = row.get("budget") if isinstance(row.get("budget"), dict) else {}
        trials = tuple(int(n) for n in row.get("for_trials") or () if isinstance(n, int))
        model = row.get("model") if isinstance(row.get("model"), str) else ""
        clean = row.get("val_clean_acc")
        out.append(Reference(label=f"{method.upper()} baseline, validation ({BASELINES_FILE})", size=float(s), robust=float(r),
                             clean=float(clean) if finite(clean) else None, method=method,
                             keep_fraction=row.get("keep_fraction"), test=test, test_budget=budget,
                             for_trials=trials, model_path=str(root / model) if model else ""))
    return out


def final_curves(folder: Path) -> dict[str, tuple[list[float], list[float], str]]:
    data = _json(folder / FINAL_FILE) or {}
    report = data.get("report") if isinstance(data.get("report"), dict) else {}
    curves = report.get("curves") if isinstance(report.get("curves"), dict) else {}
    return {t: (list(c["eps"]), list(c["robust_acc"]), str(c.get("unit", ""))) for t, c in curves.items()
            if isinstance(c, dict) and c.get("eps") and len(c.get("robust_acc") or []) == len(c["eps"])}


def mlflow_run_ids(tracker: Any, study: str, parent_run_id: str) -> dict[int, str]:
    """Optuna number -> nested MLflow run id, for trials whose Optuna record lacks the link."""
    if tracker is None or not parent_run_id:
        return {}
    try:
        runs = tracker.client.search_runs([tracker.experiment_id], filter_string=
                                          f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.study = '{study}'")
    except Exception as e:
        log.warning("report: cannot read MLflow runs (%s)", e)
        return {}
    return {int(r.data.tags[NUMBER_KEY]): r.info.run_id for r in runs
            if str(r.data.tags.get(NUMBER_KEY, "")).lstrip("-").isdigit()}


def collect(root: Path, optuna_study: Any, space: Any, run_ids: Mapping[int, str] = {}) -> ReportData:
    from optuna.trial import TrialState

    objectives = list(optuna_study.metric_names or space.study.metrics)
    modes = ["max" if d.name == "MAXIMIZE" else "min" for d in optuna_study.directions]
    size, robust = axes_of(objectives, modes)
    trials = optuna_study.get_trials(deepcopy=False)
    complete = pareto.complete_trials(optuna_study)
    default_method = str((space.trial.get("prune") or {}).get("method", "hydra"))
    points = [trial_point(t, root, objectives, size, robust, default_method, run_ids) for t in complete]
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    data = ReportData(space.study.name, objectives, modes, size, robust, points, front(points), counts)
    total = next((p.total for p in points if p.total), None)
    data.dense = dense_reference(root, space, total)
    lwm = [p for p in points if p.method == LWM]
    listed = read_baselines(root, size, robust)
    computed = [b for b in listed if finite(b.test.get("test_robust_acc"))]  # study.baselines: with test figures
    if computed:
        data.baselines, data.baseline_source = computed, BASELINES_FILE
    elif lwm and len(lwm) < len(points):
        data.baselines = [Reference("LWM trials of this study", p.size, p.robust, p.clean, LWM,
                                    p.params.get("prune.keep_fraction")) for p in front(lwm)]
        data.baseline_source = "the study's LWM trials (their own front)"
    elif not lwm:
        data.baselines = listed
        data.baseline_source = BASELINES_FILE if data.baselines else ""
    data.hv_history = hypervolume_history(complete, modes)
    for p in data.front:
        c = final_curves(_trial_folder(root, p.trial))
        if c:
            data.curves[p.trial] = c
    return data


# ---------------------------------------------------------------------------------------------------
# What the report recommends and compares (decided from the data above; drawn by analysis.report).


@dataclass
class Recommendation:
    knee: Point | None
    within: Point | None  # smallest within `within_points` of the dense model (None: no dense figure or none close)
    within_points: float
    reference: float | None  # the dense robust accuracy the `within` choice compares with
    note: str = ""

    @property
    def chosen(self) -> Point | None:
        return self.within or self.knee


@dataclass
class Importances:
    """fANOVA importances of the searched parameters, where the data supports them."""
    values: dict[str, dict[str, float]]  # objective -> {parameter: importance}, most important first
    notes: dict[str, str]  # objective -> why it has none (a size objective set by construction; an error)
    complete: int  # COMPLETE trials of the study
    needed: int  # the fewest COMPLETE trials importances are computed on

    @property
    def too_few(self) -> bool:
        return self.complete < self.needed

    @property
    def reason(self) -> str:
        """Why there is no picture (when `values` is empty)."""
        if self.too_few:
            return f"importance needs >= {self.needed} completed trials; this study has {self.complete}"
        return "; ".join(self.notes.values()) or "no objective to compute importances for"


@dataclass
class TestComparison:
    """Which test figure puts the LWM baselines beside the front on the plot: measured on the same split (test)
    with the same attack, or none."""
    key: str | None  # the baselines' figure drawn (test_robust_acc, test_pgd_acc); None: not drawn
    front_key: str | None  # the front's same figure, drawn as well (None: the plot's usual test marks are it)
    label: str = ""  # legend of the baselines' test marks (names the attack)
    front_label: str = ""
    note: str = ""  # for the page: what is compared with what


def _budget_key(b: Mapping[str, Any], drop: Sequence[str] = ()) -> str:
    return json.dumps({k: v for k, v in b.items() if k not in drop}, sort_keys=True)


def test_comparison(data: ReportData) -> TestComparison:
    """The baselines' test figure comparable with the front's: the same confirmation settings -> test_robust_acc
    (the front's marks are its AutoAttack-confirmed test figures); the baselines confirmed with the front's PGD
    but without AutoAttack (study.baselines.confirm: {autoattack: false}) -> test_pgd_acc, for both."""
    tested = [b for b in data.baselines if isinstance(b.test.get("test_robust_acc"), (int, float))]
    if not tested:
        return TestComparison(None, None)
    front = [p for p in data.front if isinstance(p.test.get("test_robust_acc"), (int, float)) and p.test_budget]
    if not front:
        return TestComparison(None, None, note="The front has no test figures (trials/&lt;n&gt;/confirm.json): the "
                              "baselines' test figures are in the table only.")
    fb = {_budget_key(p.test_budget) for p in front}
    bb = {_budget_key(b.test_budget) for b in tested}
    attack = html.escape(str(tested[0].test.get("test_attack", "")))
    if len(fb) == 1 and bb == fb:
        aa = bool(front[0].test_budget.get("autoattack"))
        what = "worst of PGD, AutoAttack" if aa else "PGD, no AutoAttack"
        return TestComparison("test_robust_acc", None if aa else "test_robust_acc",
                              f"LWM baseline, test robust acc ({what})", f"front, test robust acc ({what})",
                              f"Test figures of the front and the baselines: the same attack ({attack}).")
    pgd = {_budget_key(p.test_budget, ("autoattack",)) for p in front}
    if len(pgd) == 1 and {_budget_key(b.test_budget, ("autoattack",)) for b in tested} == pgd \
            and not any(b.test_budget.get("autoattack") for b in tested):
        return TestComparison("test_pgd_acc", "test_pgd_acc", "LWM baseline, test PGD acc (no AutoAttack)",
                              "front, test PGD acc (the baselines' attack)",
                              f"The baselines were confirmed with PGD only ({attack}): they are compared with the "
                              "front's PGD figure on the same test points (test_pgd_acc, the + marks), not with its "
                              "AutoAttack-confirmed one.")
    return TestComparison(None, None, note=f"The baselines were confirmed with another attack than the front ({attack}): "
                          "their test figures are in the table, not on the plot.")
