"""The report's PNG plots (matplotlib).

Each function takes plain inputs (the `analysis.recommend` points, `ParamAxis` / `TrialLine` rows, lists of
numbers) and writes one PNG. The figures are `matplotlib.figure.Figure`s (no pyplot state, no display needed)
with a constrained layout, so labels fit. Where trials are ranked, the best are the most visible: the parallel
and slice views (analysis.plots_trials) colour them by Pareto rank, the front darkest and drawn last.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

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
