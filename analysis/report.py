"""`study report`: PNG plots and one self-contained HTML page per study, in runs/<study>/report/.

    from analysis.report import write_report
    index = write_report(paths.root, optuna_study, space, manifest, tracker, within_points=1.0)

Reads only: the Optuna study (any state: a running study shows its COMPLETE trials), the trial folders
(trials/<n>/result.json, confirm.json with the test_* figures of a confirmed front model,
robustness_final.json with the final robustness curves), the dense checkpoint's pretraining history
(pretrained/<key>.pt), an optional baselines.json (written by hand, or by study.baselines with the LWM
baseline's validation and test figures: study.search.front.baselines), and MLflow for run ids Optuna lacks. Writes only
into report/ (and, given a tracker, the same files as artifacts of the study's parent MLflow run with
the front's summary as its metrics and tags). Every selection uses validation figures; test figures are
shown beside them, never used to choose.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from analysis import pareto, plots
from analysis.recommend import best_at_compression, knee, smallest_within
from analysis.report_data import Recommendation, ReportData, TestComparison, collect, mlflow_run_ids, test_comparison  # noqa: F401 - re-exported
from analysis.report_page import render
from study.keys import study_run_key

log = logging.getLogger("analysis.report")

REPORT_DIR = "report"
COMPRESSIONS = (10, 100)  # the parent run's "best robust accuracy at Nx compression"


def recommend(data: ReportData, within_points: float = 1.0) -> Recommendation:
    note = ""
    ref = data.dense.robust if data.dense is not None else None
    if ref is not None and data.robust_metric != "val_robust_acc":
        note = (f"the dense figure is val_robust_acc, the objective is {data.robust_metric}: "
                "no model is compared with the dense one")
        ref = None
    within = smallest_within(data.front, ref, within_points) if ref is not None else None
    if ref is None and not note:
        note = "no dense figure (pretrained checkpoint without a history): only the knee is recommended"
    elif ref is not None and within is None:
        note = f"no trial is within {within_points:g} points of the dense model's {ref:.4f}"
    return Recommendation(knee(data.front), within, within_points, ref, note)


def summary(data: ReportData, rec: Recommendation) -> tuple[dict[str, float], dict[str, str]]:
    """The parent run's front summary (metrics, tags), so studies compare in MLflow's experiment table."""
    r = data.robust_metric
    metrics: dict[str, float] = {"hypervolume": data.hv_history[-1][1] if data.hv_history else 0.0}
    for factor in COMPRESSIONS:
        best = best_at_compression(data.points, factor)
        if best is not None:
            metrics[f"best_{r}_{factor}x"] = best.robust
    tags: dict[str, str] = {"report": f"{REPORT_DIR}/index.html"}
    if rec.knee is not None:
        metrics["knee_trial"] = float(rec.knee.trial)
        tags["knee_run_id"] = rec.knee.run_id
    chosen = rec.chosen
    if chosen is not None:
        metrics.update({"recommended_trial": float(chosen.trial), f"recommended_{r}": chosen.robust,
                        f"recommended_{data.size_metric}": chosen.size})
        if chosen.compression:
            metrics["recommended_compression"] = chosen.compression
        tags.update({"recommended_run_id": chosen.run_id, "recommended_model": chosen.model_path,
                     "recommendation": (f"smallest within {rec.within_points:g} points of the dense model"
                                        if rec.within is not None else "knee of the front")})
    if rec.reference is not None:
        metrics[f"dense_{r}"] = rec.reference
    return metrics, tags


# ---------------------------------------------------------------------------------------------------
# Plots.


def importances(optuna_study: Any, objectives: Sequence[str]) -> tuple[dict[str, dict[str, float]], str]:
    """fANOVA importances of the searched parameters per objective ({} and the reason when impossible)."""
    import optuna

    out = {}
    try:
        for i, name in enumerate(objectives):
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            imp = optuna.importance.get_param_importances(optuna_study, evaluator=evaluator,
                                                          target=lambda t, i=i: t.values[i])
            out[name] = {k: float(v) for k, v in imp.items()}
    except Exception as e:  # too few or too uniform trials: the report says why instead of a picture
        return {}, f"{type(e).__name__}: {e}"
    if not any(out.values()):
        return {}, "no parameter was searched in every completed trial"
    return out, ""


def pick_color_param(space: Any, imps: Mapping[str, Mapping[str, float]], robust: str) -> str | None:
    """Colour the front by the parameter that matters most for robustness (keep_fraction aside: the
    x axis shows it), else the first searched choice, else the first searched parameter."""
    ranked = [k for k, _ in sorted((imps.get(robust) or {}).items(), key=lambda kv: -kv[1]) if k != "prune.keep_fraction"]
    if ranked:
        return ranked[0]
    choices = [p.key for p in space.params if p.kind == "choice"]
    keys = [p.key for p in space.params if p.key != "prune.keep_fraction"]
    return (choices or keys or [None])[0]


def front_plot_inputs(data: ReportData, rec: Recommendation, color: str | None) -> dict[str, Any]:
    """The keyword arguments of plots.front_plot: the trials, the front, the dense model, the baselines (their
    validation figures on the plot's axis, their test figure where it is comparable with the front's)."""
    cmp = test_comparison(data)
    marks = {"knee": rec.knee, f"smallest within {rec.within_points:g} pts of dense": rec.within}
    return {"points": data.points, "front_points": data.front, "size_label": data.size_metric,
            "robust_label": f"{data.robust_metric} (validation)", "color_by": color,
            "dense": data.dense if data.dense and math.isfinite(data.dense.size) else None,
            "baselines": data.baselines, "marks": marks,
            "baseline_test_key": cmp.key, "baseline_test_label": cmp.label,
            "front_test_key": cmp.front_key, "front_test_label": cmp.front_label}


def draw(data: ReportData, rec: Recommendation, out: Path, optuna_study: Any, space: Any,
         color_by: str | None = None) -> dict[str, Any]:
    """Every PNG of the report; returns {name: path or the reason it is missing, "importances": ...}."""
    import optuna

    drawn: dict[str, Any] = {}
    imps, why = importances(optuna_study, data.objectives)
    drawn["importances"], drawn["importances_note"] = imps, why
    color = color_by or pick_color_param(space, imps, data.robust_metric)
    drawn["color_by"] = color
    drawn["front"] = plots.front_plot(out / "front.png", **front_plot_inputs(data, rec, color))
    drawn["hypervolume"] = plots.hypervolume_plot(out / "hypervolume.png", data.hv_history)
    drawn["importance"] = plots.importance_plot(out / "importance.png", imps) if imps else why
    ri = data.objectives.index(data.robust_metric)
    vm = optuna.visualization.matplotlib
    target = {"target": lambda t: t.values[ri], "target_name": data.robust_metric}
    for name, fn in (("parallel", vm.plot_parallel_coordinate), ("slice", vm.plot_slice)):
        if len(data.points) < 2:
            drawn[name] = "fewer than two completed trials"
            continue
        try:
            drawn[name] = plots.optuna_plot(out / f"{name}.png", lambda fn=fn: fn(optuna_study, **target))
        except Exception as e:  # an Optuna view that cannot draw this study loses one picture, not the report
            drawn[name] = f"{type(e).__name__}: {e}"
    drawn["curves"] = plots.curves_plot(out / "curves.png", data.curves) if data.curves else \
        "no front trial has a final robustness evaluation (study.robustness; trials/<n>/robustness_final.json)"
    return drawn


# ---------------------------------------------------------------------------------------------------
# The entry point.


def write_report(study_root: Path, optuna_study: Any, space: Any, manifest: Any, tracker: Any = None,
                 within_points: float = 1.0, color_by: str | None = None) -> Path:
    """Write runs/<study>/report/ (PNGs + index.html with the images inlined) and, given a tracker,
    log it to the study's parent MLflow run with the front's summary. Returns index.html's path."""
    root = Path(study_root)
    out = root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.png"), out / "index.html", out / "summary.json"]:  # a rerun leaves no stale picture
        old.unlink(missing_ok=True)
    parent = getattr(manifest, "parent_run_id", "") or _parent_run(tracker, space.study.name)
    data = collect(root, optuna_study, space, mlflow_run_ids(tracker, space.study.name, parent))
    rec = recommend(data, within_points)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Optuna's views warn about trials they leave out
        drawn = draw(data, rec, out, optuna_study, space, color_by)
    rows = pareto.front_rows(optuna_study, data.objectives)
    index = out / "index.html"
    tmp = index.with_suffix(".tmp")
    space_file = root / "space.yaml" if (root / "space.yaml").is_file() else Path(getattr(space, "path", "space.yaml"))
    p = space.base_config().prune  # the study's fixed prune.method / keep_fraction, for the baselines' configs
    defaults = {"prune.method": p.method, "prune.keep_fraction": p.keep_fraction}
    tmp.write_text(render(data, rec, drawn, rows, str(space_file), defaults))
    tmp.replace(index)
    metrics, tags = summary(data, rec)
    (out / "summary.json").write_text(json.dumps({"metrics": metrics, "tags": tags}, indent=2))
    if tracker is not None and parent:
        log_report(tracker, parent, out, metrics, tags, data, space)
    return index


def _parent_run(tracker: Any, study: str) -> str:
    if tracker is None:
        return ""
    try:
        run = tracker.find_run(study_run_key(study))
    except Exception as e:
        log.warning("report: cannot read MLflow (%s)", e)
        return ""
    return run.info.run_id if run is not None else ""


def log_report(tracker: Any, run_id: str, folder: Path, metrics: Mapping[str, float], tags: Mapping[str, str],
               data: ReportData, space: Any) -> None:
    """The report's files as artifacts (report/...) of the parent run, its summary as metrics and tags,
    and the experiment's and the run's description. A tracking store that refuses loses the MLflow
    copy, not the report."""
    from study.search.recording.tracking import NOTE_TAG, describe_experiment, study_description

    settings = dataclasses.asdict(space.study)
    best = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("best_"))
    extra = (f"Front: {len(data.front)} models, hypervolume {metrics.get('hypervolume', 0.0):.4g}"
             + (f"; {best}" if best else "")
             + (f"; recommended trial {int(metrics['recommended_trial'])} ({tags.get('recommendation')}, "
                f"MLflow run {tags.get('recommended_run_id') or '?'})" if "recommended_trial" in metrics else "")
             + f". Report: artifacts of the study run, {REPORT_DIR}/index.html.")
    try:
        tracker.log_folder(run_id, folder, REPORT_DIR)
        tracker.log_batch(run_id, metrics=metrics, tags={**tags, NOTE_TAG: study_description(settings, extra=extra)})
        describe_experiment(tracker, settings, getattr(space, "path", None), extra=extra)
    except Exception as e:
        log.warning("report: could not log the report to MLflow run %s: %s", run_id, e)
