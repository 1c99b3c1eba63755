"""`study report`: PNG plots and one self-contained HTML page per study, in runs/<study>/report/.

    from analysis.report import write_report
    index = write_report(paths.root, optuna_study, space, manifest, tracker, within_points=1.0)

Reads only: the Optuna study (any state: a running study shows its COMPLETE trials), the trial folders
(trials/<n>/result.json, confirm.json with the test_* figures of a confirmed front model,
robustness_final.json with the final robustness curves), the dense checkpoint's pretraining history
(pretrained/<key>.pt), an optional baselines.json, and MLflow for run ids Optuna lacks. Writes only
into report/ (and, given a tracker, the same files as artifacts of the study's parent MLflow run with
the front's summary as its metrics and tags). Every selection uses validation figures; test figures are
shown beside them, never used to choose.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import html
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from analysis import pareto, plots
from analysis.recommend import Point, baseline_configs, best_at_compression, knee, set_args, smallest_within
from analysis.report_data import BASELINES_FILE, ReportData, collect, mlflow_run_ids
from study.keys import study_run_key

log = logging.getLogger("analysis.report")

REPORT_DIR = "report"
COMPRESSIONS = (10, 100)  # the parent run's "best robust accuracy at Nx compression"


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


def draw(data: ReportData, rec: Recommendation, out: Path, optuna_study: Any, space: Any,
         color_by: str | None = None) -> dict[str, Any]:
    """Every PNG of the report; returns {name: path or the reason it is missing, "importances": ...}."""
    import optuna

    drawn: dict[str, Any] = {}
    imps, why = importances(optuna_study, data.objectives)
    drawn["importances"], drawn["importances_note"] = imps, why
    color = color_by or pick_color_param(space, imps, data.robust_metric)
    drawn["color_by"] = color
    marks = {"knee": rec.knee, f"smallest within {rec.within_points:g} pts of dense": rec.within}
    drawn["front"] = plots.front_plot(out / "front.png", data.points, data.front, size_label=data.size_metric,
                                      robust_label=f"{data.robust_metric} (validation)", color_by=color,
                                      dense=data.dense if data.dense and math.isfinite(data.dense.size) else None,
                                      baselines=data.baselines, marks=marks)
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
# The page.


def _f(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
    return html.escape(str(v))


def _img(path: Any, alt: str, caption: str) -> str:
    if not isinstance(path, Path):
        return f"<p class=missing>{html.escape(alt)}: not drawn ({html.escape(str(path))})</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(alt)}\">"
            f"<figcaption>{caption} <a href=\"{path.name}\">{path.name}</a></figcaption></figure>")


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _f(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """Table cell HTML that is already escaped."""


def _point_cells(p: Point) -> list[Any]:
    aa = "yes" if p.autoattack_confirmed else ("no" if p.test else "–")
    return [p.trial, p.size, p.compression, p.robust, p.clean, p.test.get("test_robust_acc"), aa,
            _Raw(f"<code>{html.escape(p.run_id)}</code>" if p.run_id else "–"),
            _Raw(f"<code>{html.escape(p.model_path)}</code>" if p.model_path else "–")]


def render(data: ReportData, rec: Recommendation, drawn: Mapping[str, Any], front_rows: Sequence[Mapping[str, Any]],
           space_file: str = "space.yaml") -> str:
    s, r = data.size_metric, data.robust_metric
    head = ["trial", s, "compression", f"{r} (val)", "val_clean_acc", "test_robust_acc", "AutoAttack", "MLflow run", "model"]
    recs = [[_Raw(label), *_point_cells(p)] for label, p in
            ((f"smallest within {rec.within_points:g} points of dense", rec.within), ("knee of the front", rec.knee))
            if p is not None]
    c = data.counts
    parts = [f"<h1>Study <code>{html.escape(data.name)}</code></h1>",
             f"<p>Objectives: {', '.join(f'<code>{html.escape(o)}</code> ({m})' for o, m in zip(data.objectives, data.modes))}. "
             f"Trials: {c.get('complete', 0)} complete, {c.get('fail', 0)} failed, {c.get('running', 0)} running. "
             f"Hypervolume {_f(data.hv_history[-1][1] if data.hv_history else 0.0)}. "
             f"Generated {_dt.datetime.now().isoformat(timespec='seconds')}.</p>",
             "<h2>Recommended model</h2>",
             _table(["choice", *head], recs) if recs else "<p>No COMPLETE trial yet.</p>",
             f"<p class=note>Chosen on validation figures only. Dense reference: "
             f"{_f(rec.reference) if rec.reference is not None else 'none'} "
             f"({html.escape(data.dense.label) if data.dense else 'no dense checkpoint history'}). "
             f"{html.escape(rec.note)}</p>",
             "<h2>Size against robustness</h2>",
             _img(drawn["front"], "size against robust accuracy",
                  f"Every completed trial, coloured by <code>{html.escape(str(drawn.get('color_by')))}</code>; the "
                  "Pareto front as a step line; ringed: AutoAttack-confirmed front models (x: their test figure)."),
             "<h2>Pareto front</h2>", _table(head, [_point_cells(p) for p in data.front]),
             _attack_note(data),
             "<h2>LWM baseline</h2>", _baseline_section(data, front_rows, space_file),
             "<h2>Hypervolume</h2>", _img(drawn["hypervolume"], "hypervolume", "Hypervolume of the objectives "
                                          "against completed trials (reference: 0 accuracy, 1.1 x the largest size)."),
             "<h2>Parameter importances</h2>",
             _img(drawn["importance"], "importances", "fANOVA importance per objective (Optuna)."),
             _importance_table(drawn.get("importances") or {}),
             "<h2>Searched parameters</h2>",
             _img(drawn["parallel"], "parallel coordinates", f"Parallel coordinates against <code>{html.escape(r)}</code>."),
             _img(drawn["slice"], "slice", f"Slice view: <code>{html.escape(r)}</code> against each searched parameter."),
             "<h2>Robustness curves</h2>",
             _img(drawn["curves"], "robustness curves", "Final evaluation (test split) of the front trials, per threat.")]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
             "th{background:#f2f2f2}img{max-width:100%;height:auto}figure{margin:1em 0}.note,.missing{color:#555}"
             "figcaption{font-size:0.85em;color:#444}")
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>Study {html.escape(data.name)}: report"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _attack_note(data: ReportData) -> str:
    texts = sorted({str(p.test["test_attack"]) for p in data.front if p.test.get("test_attack")})
    return (f"<p class=note>Test figures (chosen models only): {html.escape('; '.join(texts))}.</p>" if texts else
            "<p class=note>No front model has test figures yet (trials/&lt;n&gt;/confirm.json).</p>")


def _baseline_section(data: ReportData, front_rows: Sequence[Mapping[str, Any]], space_file: str) -> str:
    if data.baselines:
        return (f"<p>From {html.escape(data.baseline_source)}, drawn as grey squares on the plot.</p>" +
                _table(["method", "keep_fraction", data.size_metric, data.robust_metric, "val_clean_acc"],
                       [[b.method, b.keep_fraction, b.size, b.robust, b.clean] for b in data.baselines]))
    needed = baseline_configs(front_rows)
    if not needed:
        return "<p>No LWM baseline and no front to run one for.</p>"
    rows = [[", ".join(map(str, n["for_trials"])), _Raw(f"<code>study trial {html.escape(space_file)} {html.escape(set_args(n['overrides']))}</code>")]
            for n in needed]
    return (f"<p>This study has no LWM trials and no {BASELINES_FILE}. The LWM runs at the front's sizes "
            f"(then list their results in {BASELINES_FILE}):</p>" + _table(["front trials", "command"], rows))


def _importance_table(imps: Mapping[str, Mapping[str, float]]) -> str:
    if not imps:
        return ""
    names = sorted({k for v in imps.values() for k in v})
    return _table(["parameter", *imps], [[n, *(imps[o].get(n) for o in imps)] for n in names])


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
    tmp.write_text(render(data, rec, drawn, rows, str(space_file)))
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
    from study.search.tracking import NOTE_TAG, describe_experiment, study_description

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
