"""The report's views of the searched parameters against the objectives: parallel coordinates and slices,
coloured by Pareto rank (rank 0, the front, darkest and drawn last; failed and pruned trials light grey,
underneath). Plain inputs (`ParamAxis` / `TrialLine` rows); each view writes one PNG (analysis.plots' figure
conventions: matplotlib Figures, constrained layout)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from analysis.plots import _figure, _save, finite

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
