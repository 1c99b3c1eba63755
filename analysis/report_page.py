"""The study report's HTML page (analysis.report draws the plots and calls `render`): tables, images
inlined as data URIs, no JavaScript."""
from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from analysis.recommend import KNEE_RULE, NOISE_SE, Point, baseline_configs, noise_gap, set_args, within_rule
from analysis.report_data import BASELINES_FILE, Importances, Recommendation, ReportData, test_comparison

# ---------------------------------------------------------------------------------------------------
# The page.

# Read at 1,280 px and narrower: the text column is at most 1,100 px; a table wider than it scrolls sideways inside
# its own container (div.scroll) instead of being cut off or widening the page; long paths and run ids break; images
# shrink to the column.
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         ".scroll{max-width:100%;overflow-x:auto;margin:0.5em 0}"
         "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}"
         "td code{word-break:break-all}"
         "th{background:#f2f2f2}img{max-width:100%;height:auto}figure{margin:1em 0;max-width:100%}"
         ".note,.missing{color:#555}figcaption{font-size:0.85em;color:#444}")


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
    return f"<div class=scroll><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>"


class _Raw(str):
    """Table cell HTML that is already escaped."""


def _se_cell(p: Point) -> str:
    return f"{p.se:.3f} (n={p.val_points:.0f})" if p.se is not None else "–"


def _point_cells(p: Point) -> list[Any]:
    aa = "yes" if p.autoattack_confirmed else ("no" if p.test else "–")
    return [p.trial, p.size, p.compression, p.robust, _se_cell(p), p.clean, p.test.get("test_robust_acc"), aa,
            _Raw(f"<code>{html.escape(p.run_id)}</code>" if p.run_id else "–"),
            _Raw(f"<code>{html.escape(p.model_path)}</code>" if p.model_path else "–")]


def render(data: ReportData, rec: Recommendation, drawn: Mapping[str, Any], front_rows: Sequence[Mapping[str, Any]],
           space_file: str = "space.yaml", defaults: Mapping[str, Any] = {}) -> str:
    s, r = data.size_metric, data.robust_metric
    head = ["trial", s, "compression", f"{r} (val)", "SE (val points)", "val_clean_acc", "test_robust_acc", "AutoAttack", "MLflow run", "model"]
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
             recommendation_text(data, rec),
             "<h2>Size against robustness</h2>",
             _img(drawn["front"], "size against robust accuracy",
                  f"Every completed trial, coloured by <code>{html.escape(str(drawn.get('color_by')))}</code>; the "
                  "Pareto front as a step line; ringed: AutoAttack-confirmed front models (x: their test figure)"
                  + ("; grey squares: the LWM baseline at the front's sizes (validation; its test marks as the legend "
                     "says, see below)" if data.baselines else "") + "."),
             "<h2>Pareto front</h2>", _table(head, [_point_cells(p) for p in data.front]),
             _attack_note(data),
             "<h2>LWM baseline</h2>", _baseline_section(data, front_rows, space_file, defaults),
             "<h2>Hypervolume</h2>", _img(drawn["hypervolume"], "hypervolume", "Hypervolume of the objectives "
                                          "against completed trials (reference: 0 accuracy, 1.1 x the largest size)."),
             "<h2>Parameter importances</h2>",
             importance_section(drawn),
             "<h2>Searched parameters</h2>",
             _img(drawn["parallel"], "parallel coordinates",
                  "Parallel coordinates: the searched parameters, then the objectives; one line per trial, coloured by "
                  "Pareto rank (non-dominated sorting of the objectives): rank 0, the front, darkest and drawn on top; "
                  "each further rank lighter and below it; failed and pruned trials light grey, underneath."),
             _img(drawn["slice"], "slice", f"Slice view: <code>{html.escape(r)}</code> against each searched parameter "
                  "(completed trials, coloured by Pareto rank as above; black edge: the front)."),
             "<h2>Robustness curves</h2>",
             _img(drawn["curves"], "robustness curves", "Final evaluation (test split) of the front trials, per threat.")]
    style = STYLE
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>Study {html.escape(data.name)}: report"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _attack_note(data: ReportData) -> str:
    texts = sorted({str(p.test["test_attack"]) for p in data.front if p.test.get("test_attack")})
    return (f"<p class=note>Test figures (chosen models only): {html.escape('; '.join(texts))}.</p>" if texts else
            "<p class=note>No front model has test figures yet (trials/&lt;n&gt;/confirm.json).</p>")


def _baseline_section(data: ReportData, front_rows: Sequence[Mapping[str, Any]], space_file: str,
                      defaults: Mapping[str, Any] = {}) -> str:
    s, r = data.size_metric, data.robust_metric
    if data.baselines and not any(b.test for b in data.baselines):  # the study's LWM trials, or a hand-written file
        return (f"<p>From {html.escape(data.baseline_source)}, drawn as grey squares on the plot.</p>" +
                _table(["method", "keep_fraction", s, r, "val_clean_acc"],
                       [[b.method, b.keep_fraction, b.size, b.robust, b.clean] for b in data.baselines]))
    if data.baselines:
        cmp = test_comparison(data)
        by_trial = {p.trial: p for p in data.front}
        rows = []
        for b in sorted(data.baselines, key=lambda b: b.size):
            fronts = [by_trial[n] for n in b.for_trials if n in by_trial]
            front_test = [p.test.get(cmp.key or "test_robust_acc") for p in fronts]
            rows.append([", ".join(str(p.trial) for p in fronts) or "–", b.method, b.keep_fraction, b.size,
                         "/".join(_f(p.size) for p in fronts) or "–", b.robust, "/".join(_f(p.robust) for p in fronts) or "–",
                         b.clean, b.test.get("test_clean_acc"), b.test.get("test_robust_acc"), b.test.get("test_pgd_acc"),
                         "/".join(_f(v) for v in front_test) or "–", b.test.get("test_attack", ""),
                         _Raw(f"<code>{html.escape(b.model_path)}</code>" if b.model_path else "–")])
        key = cmp.key or "test_robust_acc"
        head = ["front trials", "method", "keep_fraction", f"{s} (LWM)", f"{s} (front)", f"{r} (LWM)",
                f"{r} (front)", "val_clean_acc (LWM)", "test_clean_acc (LWM)", "test_robust_acc (LWM)",
                "test_pgd_acc (LWM)", f"{key} (front)", "test attack (LWM)", "model"]
        return (f"<p>From {html.escape(data.baseline_source)} (<code>study.baselines</code>): one LWM run per distinct "
                "front configuration (same keep fraction, attack and fine-tuning; magnitude masks, no score training), "
                "validated as the trials are and confirmed on the test split. Grey squares on the plot: their "
                "validation figures" + (f"; grey {'+' if cmp.front_key else 'x'}: their {key}" if cmp.key else "")
                + ".</p>" + _table(head, rows) + (f"<p class=note>{cmp.note}</p>" if cmp.note else ""))
    needed = baseline_configs(front_rows, defaults)
    if not needed:
        return "<p>No LWM baseline and no front to run one for.</p>"
    rows = [[", ".join(map(str, n["for_trials"])), _Raw(f"<code>study trial {html.escape(space_file)} {html.escape(set_args(n['overrides']))}</code>")]
            for n in needed]
    return (f"<p>This study has no LWM trials and no {BASELINES_FILE}. Set <code>study.baselines: true</code> to run "
            f"the LWM baseline at the front's sizes with the study, or run these (then list their results in "
            f"{BASELINES_FILE}):</p>" + _table(["front trials", "command"], rows))


def recommendation_text(data: ReportData, rec: Recommendation) -> str:
    """The recommendation's rules in words, the validation noise of each candidate's robust accuracy (the binomial
    standard error sqrt(p (1 - p) / n) on its n validation points) and, for the candidates and their neighbours on
    the front, whether their robust accuracies are told apart by that noise."""
    if rec.knee is None:
        return ""
    r = html.escape(data.robust_metric)
    within_label = f"smallest within {rec.within_points:g} points of dense"
    out = [f"<p>How the models are chosen. <b>{within_label}</b>: {html.escape(within_rule(rec.within_points))}; "
           f"used when there is a dense figure and such a model. <b>Knee of the front</b>: {html.escape(KNEE_RULE)}. "
           f"Recommended: {'the smallest within the tolerance' if rec.within is not None else 'the knee'} "
           f"(trial {rec.chosen.trial}).</p>"]
    candidates = [(within_label, rec.within), ("knee of the front", rec.knee)]
    candidates = [(label, p) for i, (label, p) in enumerate(candidates)
                  if p is not None and all(q is None or q.trial != p.trial for _, q in candidates[:i])]
    if not data.robust_metric.endswith("_acc"):
        out.append(f"<p class=note>The robustness objective <code>{r}</code> is not an accuracy on a number of points: "
                   "the report gives it no binomial standard error.</p>")
        return "\n".join(out)
    if any(p.se is None for _, p in candidates):
        out.append(f"<p class=note>Validation noise unknown: the trials record no <code>val_points</code>, so the "
                   f"standard error of their {r} cannot be given.</p>")
        return "\n".join(out)
    noise = "; ".join(f"trial {p.trial} ({html.escape(label)}): {p.robust:.3f} ± {p.se:.3f} on {p.val_points:.0f} "
                      "validation points" for label, p in candidates)
    out.append(f"<p>Validation noise: a robust accuracy p measured on n validation points has a standard error "
               f"SE = sqrt(p (1 - p) / n); {noise}. Two models are told apart only when their {r} differ by more "
               f"than {NOISE_SE:g} standard errors of the difference, {NOISE_SE:g} sqrt(SE<sub>1</sub><sup>2</sup> + "
               "SE<sub>2</sub><sup>2</sup>).</p>")
    pairs: list[tuple[str, Point, str, Point]] = []
    if len(candidates) == 2:
        pairs.append((*candidates[0], *candidates[1]))
    front = list(data.front)
    for label, p in candidates:
        i = next((k for k, q in enumerate(front) if q.trial == p.trial), None)
        if i is None:
            continue
        for j, side in ((i - 1, "the next smaller front model"), (i + 1, "the next larger front model")):
            if 0 <= j < len(front) and front[j].se is not None:
                pairs.append((label, p, side, front[j]))
    seen: set[frozenset[int]] = set()
    items = []
    for la, a, lb, b in pairs:
        key = frozenset((a.trial, b.trial))
        if key in seen or a.trial == b.trial:
            continue
        seen.add(key)
        diff, bound = noise_gap(a, b)
        ns = sorted({f"{a.val_points:.0f}", f"{b.val_points:.0f}"}, key=float)
        on = f"on {' and '.join(ns)} validation points"
        head = (f"Trial {a.trial} ({html.escape(la)}, {a.robust:.3f} ± {a.se:.3f}) and trial {b.trial} "
                f"({html.escape(lb)}, {b.robust:.3f} ± {b.se:.3f}) differ by {diff:.3f}")
        if diff <= bound:
            items.append(f"<li>{head}, within {NOISE_SE:g} standard errors of the difference ({bound:.3f}): "
                         f"<b>not distinguishable {on}</b>.</li>")
        else:
            items.append(f"<li>{head}, more than {NOISE_SE:g} standard errors of the difference ({bound:.3f}): "
                         f"distinguishable {on}.</li>")
    if items:
        out.append("<ul>" + "".join(items) + "</ul>")
    chosen = rec.within
    if chosen is not None and chosen.se is not None and rec.within_points / 100.0 < NOISE_SE * chosen.se:
        out.append(f"<p class=note>The tolerance, {rec.within_points:g} points, is less than {NOISE_SE:g} standard "
                   f"errors of one model's {r} ({100 * NOISE_SE * chosen.se:.1f} points for trial {chosen.trial}): "
                   "which models fall within it is decided by validation noise as much as by the models.</p>")
    return "\n".join(out)


def importance_section(drawn: Mapping[str, Any]) -> str:
    """The importances where the data supports them; otherwise the page says why there are none (too few completed
    trials, or a size objective that one parameter sets by construction)."""
    imp = drawn.get("importance_info")
    if not isinstance(imp, Importances):
        return _img(drawn.get("importance", "not computed"), "importances", "fANOVA importance per objective (Optuna).")
    out = []
    if imp.too_few:
        out.append(f"<p class=missing>{html.escape(imp.reason)}: no importance is computed or drawn.</p>")
    out += [f"<p class=note>{html.escape(note)}.</p>" for note in imp.notes.values()]
    if imp.values:
        out.append(_img(drawn["importance"], "importances",
                        f"fANOVA importance per objective (Optuna, seed 0) on {imp.complete} completed trials; the "
                        "importances of one objective sum to 1."))
        out += [f"<p>Most important for <code>{html.escape(o)}</code>: <code>{html.escape(next(iter(v)))}</code> "
                f"({v[next(iter(v))]:.2f}).</p>" for o, v in imp.values.items() if v]
        out.append(_importance_table(imp.values))
    return "\n".join(out)


def _importance_table(imps: Mapping[str, Mapping[str, float]]) -> str:
    if not imps:
        return ""
    names = sorted({k for v in imps.values() for k in v})
    return _table(["parameter", *imps], [[n, *(imps[o].get(n) for o in imps)] for n in names])
