"""The report's PNG plots (matplotlib).

Each function takes plain inputs (the `analysis.recommend` points, `ParamAxis` / `TrialLine` rows, lists of
numbers) and writes one PNG. The figures are `matplotlib.figure.Figure`s (no pyplot state, no display needed)
with a constrained layout, so labels fit. Where trials are ranked, the best are the most visible: the parallel
and slice views colour them by Pareto rank, the front darkest and drawn last (`draw_order`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from analysis.recommend import LWM, Point, Reference

DPI = 110
GREY = "#9a9a9a"


def _figure(w: float = 7.5, h: float = 4.8) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def color_values(points: Sequence[Point], param: str | None) -> tuple[str, dict[str, Any]]:
    """How the front plot colours trials by `param`: ("none" | "category" | "number", details).
    category: {"values": {trial: label}, "labels": sorted labels}; number: {"values": {trial: x}, "log": bool}.
    Trials where a conditional parameter is inactive are absent from "values" (drawn grey)."""
    if not param:
        return "none", {}
    vals = {p.trial: p.params[param] for p in points if param in p.params}
    if not vals:
        return "none", {}
    nums = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals.values())
    if nums and len(set(vals.values())) > 1:
        xs = [float(v) for v in vals.values()]
        return "number", {"values": {k: float(v) for k, v in vals.items()},
                          "log": min(xs) > 0 and max(xs) / min(xs) >= 20}
    labels = sorted({str(v) for v in vals.values()})
    return "category", {"values": {k: str(v) for k, v in vals.items()}, "labels": labels}


def front_plot(path: Path, points: Sequence[Point], front_points: Sequence[Point], *, size_label: str,
               robust_label: str, color_by: str | None = None, dense: Reference | None = None,
               baselines: Sequence[Reference] = (), marks: Mapping[str, Point | None] = {},
               baseline_test_key: str | None = None, baseline_test_label: str = "",
               front_test_key: str | None = None, front_test_label: str = "") -> Path:
    """Size (log x) against robust accuracy: every trial coloured by `color_by`, the front as a step
    line, the dense model and the LWM baseline, AutoAttack-confirmed trials ringed with their test
    figure beside them, and the recommendations (`marks`: label -> point) annotated.

    `baseline_test_key`: the baselines' test figure drawn below their validation one (a test_* key, measured
    with the same attack as the front's drawn test figure); `front_test_key`: a further test figure of the
    front drawn for that comparison (e.g. test_pgd_acc when the baselines were confirmed with PGD only)."""
    import matplotlib as mpl
    import numpy as np

    fig = _figure()
    ax = fig.add_subplot()
    kind, info = color_values(points, color_by)
    cmap = mpl.colormaps["viridis"]
    norm = None
    if kind == "number":
        xs = list(info["values"].values())
        norm = (mpl.colors.LogNorm if info["log"] else mpl.colors.Normalize)(min(xs), max(xs))
    palette = {lab: mpl.colormaps["tab10"](i % 10) for i, lab in enumerate(info.get("labels", []))}

    def colour(p: Point) -> Any:
        v = info.get("values", {}).get(p.trial)
        if v is None:
            return GREY
        return cmap(norm(v)) if kind == "number" else palette[v]

    on_front = {p.trial for p in front_points}
    labelled = False
    for marker, lwm in (("o", False), ("s", True)):  # dominated trials first, the front's on top with a black edge
        for top in (False, True):
            group = [p for p in points if (p.method == LWM) == lwm and (p.trial in on_front) == top]
            if group:
                ax.scatter([p.size for p in group], [p.robust for p in group], c=[colour(p) for p in group],
                           marker=marker, s=44 if top else 32, edgecolors="black" if top else "white",
                           linewidths=0.8 if top else 0.5, zorder=3.5 if top else 3,
                           label="trials (LWM)" if lwm and not labelled else None)
                labelled = labelled or lwm
    if front_points:
        fx, fy = [p.size for p in front_points], [p.robust for p in front_points]
        ax.step(fx, fy, where="post", color="black", lw=1.2, zorder=2, label="Pareto front")
    confirmed = [p for p in front_points if p.autoattack_confirmed]
    if confirmed:
        ax.scatter([p.size for p in confirmed], [p.robust for p in confirmed], s=150, facecolors="none",
                   edgecolors="crimson", linewidths=1.4, zorder=4, label="AutoAttack-confirmed (test)")
        tested = [p for p in confirmed if isinstance(p.test.get("test_robust_acc"), (int, float))]
        for p in tested:
            ax.plot([p.size, p.size], [p.robust, p.test["test_robust_acc"]], ls=":", color="crimson", lw=1)
        if tested:
            ax.scatter([p.size for p in tested], [p.test["test_robust_acc"] for p in tested], marker="x",
                       color="crimson", zorder=4, label="test robust acc (worst of PGD, AutoAttack)")
    if front_test_key:
        extra = [p for p in front_points if finite(p.test.get(front_test_key))]
        for p in extra:
            ax.plot([p.size, p.size], [p.robust, p.test[front_test_key]], ls=":", color="crimson", lw=1)
        if extra:
            ax.scatter([p.size for p in extra], [p.test[front_test_key] for p in extra], marker="+", s=70,
                       color="crimson", zorder=4, label=front_test_label or f"front, {front_test_key}")
    if baselines:
        bs = sorted(baselines, key=lambda b: b.size)
        ax.plot([b.size for b in bs], [b.robust for b in bs], ls="--", marker="s", color="dimgray", ms=5,
                label=bs[0].label)
        tested = [b for b in bs if baseline_test_key and finite(b.test.get(baseline_test_key))]
        for b in tested:
            ax.plot([b.size, b.size], [b.robust, b.test[baseline_test_key]], ls=":", color="dimgray", lw=1)
        if tested:
            # the front's mark of the same figure: its usual x (AutoAttack-confirmed), else the + of front_test_key
            ax.scatter([b.size for b in tested], [b.test[baseline_test_key] for b in tested],
                       marker="+" if front_test_key else "x", s=70, color="dimgray", zorder=4,
                       label=baseline_test_label or f"LWM baseline, {baseline_test_key}")
    if dense is not None:
        ax.axhline(dense.robust, ls="--", color="tab:red", lw=1, zorder=1)
        ax.scatter([dense.size], [dense.robust], marker="*", s=160, color="tab:red", zorder=4, label=dense.label)
    for i, (label, p) in enumerate((k, v) for k, v in marks.items() if v is not None):
        ax.annotate(f"{label} (#{p.trial})", (p.size, p.robust), xytext=(12, -18 - 14 * i),
                    textcoords="offset points", fontsize=8, arrowprops={"arrowstyle": "->", "lw": 0.8})
    ax.set_xscale("log")
    ax.set_xlabel(f"{size_label} (log scale)")
    ax.set_ylabel(robust_label)
    ax.grid(True, which="both", alpha=0.25)
    total = next((p.total for p in points if p.total), None) or (dense.size if dense is not None else None)
    if total:
        sec = ax.secondary_xaxis("top", functions=(lambda x: total / np.maximum(x, 1e-12),
                                                   lambda c: total / np.maximum(c, 1e-12)))
        sec.set_xlabel("compression (x, dense / kept)")
    handles, labels = ax.get_legend_handles_labels()
    if kind == "category":
        from matplotlib.lines import Line2D

        handles += [Line2D([], [], ls="", marker="o", color=palette[lab]) for lab in info["labels"]]
        labels += [f"{color_by} = {lab}" for lab in info["labels"]]
    elif kind == "number":
        fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=color_by)
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="lower right", framealpha=0.85)
    return _save(fig, path)


def hypervolume_plot(path: Path, history: Sequence[tuple[int, float]]) -> Path:
    fig = _figure(6.5, 3.6)
    ax = fig.add_subplot()
    if history:
        ax.step([k for k, _ in history], [v for _, v in history], where="post", marker="o", ms=3)
    ax.set_xlabel("completed trials")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("hypervolume of the objectives")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def importance_plot(path: Path, importances: Mapping[str, Mapping[str, float]]) -> Path:
    """Grouped horizontal bars: one group per searched parameter, one bar per objective."""
    import numpy as np

    names = sorted({k for imp in importances.values() for k in imp},
                   key=lambda k: -max(imp.get(k, 0.0) for imp in importances.values()))
    fig = _figure(7.0, 1.2 + 0.45 * max(len(names), 1) * max(len(importances), 1) ** 0.5)
    ax = fig.add_subplot()
    height = 0.8 / max(len(importances), 1)
    y = np.arange(len(names))
    for i, (objective, imp) in enumerate(importances.items()):
        ax.barh(y + i * height, [imp.get(n, 0.0) for n in names], height=height, label=objective)
    ax.set_yticks(y + height * (len(importances) - 1) / 2, names)
    ax.invert_yaxis()
    ax.set_xlabel("importance (fANOVA, share of the objective's variance)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# The searched parameters against the objectives: parallel coordinates and slices, coloured by Pareto rank
# (rank 0, the front, darkest and drawn last; failed and pruned trials light grey, underneath).


@dataclass(frozen=True)
class ParamAxis:
    """One searched parameter: a number (log: drawn on a log scale) or a choice among `choices`."""
    key: str
    kind: str  # "number" | "category"
    log: bool = False
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrialLine:
    """One trial for the parallel and slice views: its searched values, its objectives (None unless COMPLETE)
    and its Pareto rank among the COMPLETE trials (None: failed or pruned)."""
    number: int
    params: Mapping[str, Any]
    values: Sequence[float] | None = None
    rank: int | None = None


FAILED_GREY = "#d4d4d4"
RANK_CMAP = "Blues"  # sequential: the darker, the better the rank
LIGHTEST, DARKEST = 0.35, 1.0  # the part of RANK_CMAP used: the worst rank still shows on white


def rank_colour(rank: int | None, worst: int) -> Any:
    """RGBA of a trial of Pareto rank `rank` when ranks go 0..worst: rank 0 darkest; None (failed, pruned): grey."""
    import matplotlib as mpl

    if rank is None:
        return mpl.colors.to_rgba(FAILED_GREY)
    shade = DARKEST - (DARKEST - LIGHTEST) * (rank / worst if worst > 0 else 0.0)
    return mpl.colormaps[RANK_CMAP](shade)


def draw_order(ranks: Sequence[int | None]) -> list[tuple[int, Any, float, int]]:
    """How the parallel and slice views draw trials of these Pareto ranks: [(index, rgba, line width, zorder)] in
    drawing order. Failed and pruned trials (rank None) first, light grey and thin; then the ranked ones, the worst
    rank first, each rank darker, wider and higher than the one before; rank 0 (the Pareto front) last and darkest."""
    worst = max((r for r in ranks if r is not None), default=0)
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i] is not None, -(ranks[i] if ranks[i] is not None else 0), i))
    out = []
    for i in order:
        r = ranks[i]
        if r is None:
            out.append((i, rank_colour(None, worst), 0.6, 1))
        else:
            closeness = 1.0 - (r / worst if worst > 0 else 0.0)  # 1 for the front
            out.append((i, rank_colour(r, worst), 0.8 + 1.2 * closeness, 2 + worst - r))
    return out


def short_label(value: Any, width: int = 16, lines: int = 2) -> str:
    """A tick or axis label on at most `lines` lines of `width` characters: broken after a dot where it can
    (prune.\\nkeep_fraction), else after an underscore or a space, else anywhere; cut with '…' beyond that."""
    import re

    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    for sep in (r"(?<=\.)", r"(?<=[._ ])"):
        parts = [t for t in re.split(sep, text) if t]
        if all(len(t) <= width for t in parts):
            break
    else:
        parts = [text[i:i + width] for i in range(0, len(text), width)]
    out = [""]
    for t in parts:
        if out[-1] and len(out[-1]) + len(t) > width:
            out.append("")
        out[-1] += t
    out = [line.strip() for line in out]
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: width - 1] + "…"
    return "\n".join(out)


def _axis_scale(axis: ParamAxis, values: Sequence[Any]) -> tuple[Callable[[Any], float], list[tuple[float, str]]]:
    """(value -> position in [0, 1] or nan, [(position, tick label)]) of one parallel axis."""
    import numpy as np

    if axis.kind == "category":
        choices = list(axis.choices) or sorted({str(v) for v in values})
        pos = {c: (i / (len(choices) - 1) if len(choices) > 1 else 0.5) for i, c in enumerate(choices)}
        step = max(1, math.ceil(len(choices) / 8))  # at most 8 labels on one axis
        ticks = [(pos[c], short_label(c)) for c in choices[::step]]
        return (lambda v: pos.get(str(v), float("nan"))), ticks
    nums = [float(v) for v in values if finite(v) and (not axis.log or v > 0)]
    if not nums:
        return (lambda v: float("nan")), []
    f = (lambda v: math.log10(v)) if axis.log else (lambda v: float(v))
    lo, hi = f(min(nums)), f(max(nums))
    span = hi - lo

    def place(v: Any) -> float:
        if not finite(v) or (axis.log and v <= 0):
            return float("nan")
        return (f(v) - lo) / span if span > 0 else 0.5

    marks = sorted({min(nums), max(nums)}) if span > 0 else [nums[0]]
    if span > 0:
        mid = 10 ** ((lo + hi) / 2) if axis.log else (lo + hi) / 2
        marks.insert(1, float(np.float64(mid)))
    return place, [(place(v), f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}") for v in marks]


def parallel_plot(path: Path, axes: Sequence[ParamAxis], lines: Sequence[TrialLine], objectives: Sequence[str],
                  modes: Sequence[str]) -> Path:
    """Parallel coordinates: one vertical axis per searched parameter, then one per objective; one line per trial,
    coloured and ordered by `draw_order` (the Pareto front darkest, on top; failed and pruned trials grey, below,
    ending at the last parameter axis)."""
    import numpy as np
    from matplotlib.lines import Line2D

    obj_axes = [ParamAxis(o, "number", log=_wide([ln.values[i] for ln in lines if ln.values is not None]))
                for i, o in enumerate(objectives)]
    every = list(axes) + obj_axes
    columns = [[ln.params.get(a.key) for ln in lines] for a in axes] + \
              [[ln.values[i] if ln.values is not None else None for ln in lines] for i in range(len(objectives))]
    scales = [_axis_scale(a, col) for a, col in zip(every, columns)]
    ys = np.array([[place(v) for v in col] for (place, _), col in zip(scales, columns)]).T  # (trials, axes)
    fig = _figure(max(7.5, 1.25 * len(every) + 1.5), 5.0)
    ax = fig.add_subplot()
    x = np.arange(len(every))
    ranks = [ln.rank for ln in lines]
    for i, colour, lw, z in draw_order(ranks):
        ax.plot(x, ys[i], color=colour, lw=lw, zorder=z, alpha=1.0 if ranks[i] == 0 else 0.85)
    for k, (_, ticks) in enumerate(scales):
        ax.axvline(k, color="black", lw=0.8, zorder=0)
        for y, label in ticks:
            ax.text(k + 0.04, y, label, fontsize=7, va="center", ha="left", zorder=1000,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    names = [short_label(a.key, 16) for a in axes] + \
            [short_label(f"{o} ({m})", 16) for o, m in zip(objectives, modes)]
    ax.set_xticks(x, names, fontsize=8)
    ax.set_xlim(-0.2, len(every) - 0.4)
    ax.set_ylim(-0.05, 1.05)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    worst = max((r for r in ranks if r is not None), default=0)
    handles = [Line2D([], [], color=rank_colour(0, worst), lw=2.0, label="Pareto rank 0 (the front)")]
    if worst > 0:
        handles.append(Line2D([], [], color=rank_colour(worst, worst), lw=0.8, label=f"Pareto rank {worst} (most dominated)"))
    if any(r is None for r in ranks):
        handles.append(Line2D([], [], color=FAILED_GREY, lw=0.6, label="failed / pruned"))
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize=8, frameon=False)
    return _save(fig, path)


def _wide(values: Sequence[float]) -> bool:
    """A positive figure spanning 20x or more (a size): drawn on a log scale."""
    nums = [float(v) for v in values if finite(v)]
    return bool(nums) and min(nums) > 0 and max(nums) / min(nums) >= 20


def slice_figure(axes: Sequence[ParamAxis], lines: Sequence[TrialLine], target: int, target_name: str) -> Any:
    """One panel per searched parameter: the objective number `target` against it, COMPLETE trials only, coloured
    and ordered by Pareto rank. Ticks are few (at most 4 on a number axis, no minor labels; choice labels wrapped,
    at most 8, rotated when crowded) so that none overlaps; the panels' layout is constrained."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    done = [ln for ln in lines if ln.values is not None]
    n = max(len(axes), 1)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = _figure(4.0 * ncols, 3.3 * nrows)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    order = draw_order([ln.rank for ln in done])
    for k, (ax, axis) in enumerate(zip(grid.flat, axes)):
        if axis.kind == "category":
            choices = list(axis.choices) or sorted({str(ln.params[axis.key]) for ln in done if axis.key in ln.params})
            pos = {c: i for i, c in enumerate(choices)}
            xs = [pos.get(str(ln.params.get(axis.key)), np.nan) if axis.key in ln.params else np.nan for ln in done]
            xs = [x + 0.12 * math.sin(2.4 * j) for j, x in enumerate(xs)]  # a fixed spread: equal choices stay apart
            step = max(1, math.ceil(len(choices) / 8))
            ax.set_xticks(range(0, len(choices), step), [short_label(c) for c in choices[::step]])
            ax.set_xlim(-0.5, len(choices) - 0.5)
            shown = choices[::step]
            longest = max((len(c) for c in shown), default=0)
            if len(shown) > 4:  # crowded: upright labels, each as wide as its lines
                for t in ax.get_xticklabels():
                    t.set(rotation=90, fontsize=7)
            elif longest > 8:
                for t in ax.get_xticklabels():
                    t.set(rotation=30, ha="right", rotation_mode="anchor", fontsize=7)
            else:
                ax.tick_params(axis="x", labelsize=7)
        else:
            xs = [float(ln.params[axis.key]) if finite(ln.params.get(axis.key)) else np.nan for ln in done]
            if axis.log:
                ax.set_xscale("log")
                pos = [x for x in xs if x > 0]
                decades = math.log10(max(pos) / min(pos)) if pos else 0.0
                # within about a decade the 1-2-5 ticks, else decades only (at most 4); never the minor ticks' labels
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades < 1.5 else (1.0,), numticks=4))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            else:
                ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
            ax.tick_params(axis="x", labelsize=7)
        for i, colour, _, z in order:
            ax.scatter([xs[i]], [done[i].values[target]], color=colour, s=22, zorder=z,
                       edgecolors="black" if done[i].rank == 0 else "none", linewidths=0.5)
        ax.set_xlabel(short_label(axis.key, 28, 1), fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.tick_params(axis="y", labelsize=7)
        if k % ncols == 0:
            ax.set_ylabel(target_name, fontsize=8)
        ax.grid(True, alpha=0.25)
    for ax in list(grid.flat)[len(axes):]:
        ax.set_visible(False)
    fig.suptitle("darker: better Pareto rank (black edge: the front)", fontsize=8)
    return fig


def slice_plot(path: Path, axes: Sequence[ParamAxis], lines: Sequence[TrialLine], target: int, target_name: str) -> Path:
    return _save(slice_figure(axes, lines, target, target_name), path)


def curves_plot(path: Path, curves: Mapping[int, Mapping[str, tuple[Sequence[float], Sequence[float], str]]]) -> Path:
    """Robust accuracy against eps, one panel per threat, one line per trial.
    curves: trial -> threat -> (eps, accuracy, eps unit)."""
    threats = sorted({t for c in curves.values() for t in c})
    fig = _figure(4.2 * max(len(threats), 1), 3.8)
    axes = fig.subplots(1, max(len(threats), 1), squeeze=False)[0]
    for ax, threat in zip(axes, threats):
        unit = ""
        for trial, per in sorted(curves.items()):
            if threat in per:
                eps, acc, unit = per[threat]
                ax.plot(eps, acc, marker="o", ms=3, label=f"#{trial}")
        ax.set_title(threat)
        ax.set_xlabel(f"eps ({unit})" if unit else "eps")
        ax.set_ylabel("robust accuracy (test)")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def preload() -> None:
    """Import what the report draws with (matplotlib, Optuna's fANOVA evaluator with scikit-learn's random
    forest: about 2 s of imports on a 2-core CPU); the study's driver does it in a thread while the trials
    train. Errors are left to the report itself."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
        import optuna.importance  # noqa: F401
    except Exception:  # noqa: BLE001 - the report says what is missing
        pass


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
