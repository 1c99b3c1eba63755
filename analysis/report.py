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

from analysis import pareto, plots, plots_trials
from analysis.recommend import best_at_compression, knee, smallest_within
from analysis.report_data import Importances, Recommendation, ReportData, TestComparison, collect, mlflow_run_ids, test_comparison  # noqa: F401 - re-exported
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


# Importances need enough trials to say anything: fANOVA fits a random forest to the trials, and on a handful of
# them it ranks parameters by chance.
IMPORTANCE_MIN_TRIALS = 20
# The size figures a trial reports (study.trial.pruning.SizeReport, read from the exported weights): the kept ones
# are set by the pruning's keep fraction (and its scope, and the model where those are searched), the dense totals by
# the model alone. Their importances would only restate how they are computed: the report says so instead.
KEPT_SIZE_METRICS = ("params_kept", "prunable_kept", "sparsity", "compression", "sparse_bytes")
DENSE_SIZE_METRICS = ("params_total", "prunable_total", "dense_bytes")
PRUNE_SIZE_KEYS = ("prune.keep_fraction", "prune.scope")
MODEL_SIZE_KEYS = ("model.arch", "model.width")


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def size_note(objective: str, searched: Sequence[str]) -> str | None:
    """For a size objective (set by construction), the sentence naming what sets it; None for any other objective."""
    if objective in KEPT_SIZE_METRICS:
        keys = [k for k in PRUNE_SIZE_KEYS + MODEL_SIZE_KEYS if k in searched]
        if "prune.keep_fraction" not in keys:
            keys.insert(0, "prune.keep_fraction (fixed in this study)")
    elif objective in DENSE_SIZE_METRICS:
        keys = [k for k in MODEL_SIZE_KEYS if k in searched] or ["the model (fixed in this study)"]
    else:
        return None
    return f"{objective} is set by {_and(keys)}: no importance is computed"


def importances(optuna_study: Any, objectives: Sequence[str], min_trials: int = IMPORTANCE_MIN_TRIALS) -> Importances:
    """fANOVA importances (Optuna's public optuna.importance API, seed 0) of the searched parameters for each
    objective that is not a size set by construction, once the study has `min_trials` COMPLETE trials."""
    import optuna

    complete = pareto.complete_trials(optuna_study)
    searched = sorted({k for t in optuna_study.get_trials(deepcopy=False) for k in t.params})
    out = Importances({}, {}, len(complete), min_trials)
    for name in objectives:
        note = size_note(name, searched)
        if note:
            out.notes[name] = note
    if out.too_few:
        return out
    for i, name in enumerate(objectives):
        if name in out.notes:
            continue
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            imp = optuna.importance.get_param_importances(optuna_study, evaluator=evaluator,
                                                          target=lambda t, i=i: t.values[i])
        except Exception as e:  # e.g. no parameter searched in every trial: the page says why instead of a picture
            out.notes[name] = f"no importance for {name} ({type(e).__name__}: {e})"
            continue
        if imp:
            out.values[name] = {k: float(v) for k, v in sorted(imp.items(), key=lambda kv: -kv[1])}
        else:
            out.notes[name] = f"no importance for {name}: no parameter was searched in every completed trial"
    return out


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


def search_lines(optuna_study: Any, modes: Sequence[str]) -> tuple[list[plots_trials.ParamAxis], list[plots_trials.TrialLine]]:
    """The parallel and slice views' inputs: the searched parameters (from Optuna's distributions, in the order
    they first appear) and one line per COMPLETE (with its Pareto rank), FAIL or PRUNED trial."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    complete = pareto.complete_trials(optuna_study)
    ranks = dict(zip((t.number for t in complete),
                     pareto.pareto_ranks([t.values for t in complete], modes).tolist())) if complete else {}
    shown = [t for t in optuna_study.get_trials(deepcopy=False)
             if t.number in ranks or (t.state in (TrialState.FAIL, TrialState.PRUNED) and t.params)]
    dists: dict[str, Any] = {}
    for t in shown:
        for k, d in t.distributions.items():
            dists.setdefault(k, d)
    axes = [plots_trials.ParamAxis(k, "category", choices=tuple(str(c) for c in d.choices))
            if isinstance(d, CategoricalDistribution) else plots_trials.ParamAxis(k, "number", log=bool(getattr(d, "log", False)))
            for k, d in dists.items()]
    lines = [plots_trials.TrialLine(t.number, dict(t.params), list(t.values) if t.number in ranks else None, ranks.get(t.number))
             for t in shown]
    return axes, lines


def draw(data: ReportData, rec: Recommendation, out: Path, optuna_study: Any, space: Any,
         color_by: str | None = None) -> dict[str, Any]:
    """Every PNG of the report; returns {name: path or the reason it is missing, "importances": ...}."""
    drawn: dict[str, Any] = {}
    imp = importances(optuna_study, data.objectives)
    drawn["importances"], drawn["importance_info"] = imp.values, imp
    color = color_by or pick_color_param(space, imp.values, data.robust_metric)
    drawn["color_by"] = color
    drawn["front"] = plots.front_plot(out / "front.png", **front_plot_inputs(data, rec, color))
    drawn["hypervolume"] = plots.hypervolume_plot(out / "hypervolume.png", data.hv_history)
    drawn["importance"] = plots.importance_plot(out / "importance.png", imp.values) if imp.values else imp.reason
    axes, lines = search_lines(optuna_study, data.modes)
    ri = data.objectives.index(data.robust_metric)
    views = (("parallel", lambda p: plots_trials.parallel_plot(p, axes, lines, data.objectives, data.modes)),
             ("slice", lambda p: plots_trials.slice_plot(p, axes, lines, ri, data.robust_metric)))
    for name, fn in views:
        if len(data.points) < 2:
            drawn[name] = "fewer than two completed trials"
            continue
        if not axes:
            drawn[name] = "no searched parameter"
            continue
        try:
            drawn[name] = fn(out / f"{name}.png")
        except Exception as e:  # a view that cannot draw this study loses one picture, not the report
            log.warning("report: %s.png not drawn: %s: %s", name, type(e).__name__, e)
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
        warnings.simplefilter("ignore", UserWarning)  # matplotlib and Optuna warn about what they leave out
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
    """The report's files as artifacts (report/...) of the parent run, its summary as metrics (each only
    when its value changed: a repeated report adds no history) and tags, and the experiment's and the
    run's description. A tracking store that refuses loses the MLflow copy, not the report."""
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
        tracker.log_summary(run_id, metrics, tags={**tags, NOTE_TAG: study_description(settings, extra=extra)})
        describe_experiment(tracker, settings, getattr(space, "path", None), extra=extra)
    except Exception as e:
        log.warning("report: could not log the report to MLflow run %s: %s", run_id, e)
    if tags.get("recommended_run_id"):  # the Model Registry: models:/<study>@recommended
        from study.trial.mlflow_model import register_recommended

        try:
            version = register_recommended(tracker.client, tracker.experiment_id, space.study.name,
                                           tags["recommended_run_id"], [p.run_id for p in data.front if p.run_id],
                                           tracking_uri=tracker.tracking_uri)
        except Exception as e:  # noqa: BLE001 - a registry that refuses loses the alias, not the report
            log.warning("report: could not register the recommended model: %s", e)
        else:
            if version is None:  # e.g. a bucket study whose runs reference their models (model_by_reference)
                log.info("report: the recommended trial's MLflow run has no logged model: nothing registered")
            else:
                print(f"recommended model registered: models:/{space.study.name}@recommended (version {version})",
                      flush=True)
