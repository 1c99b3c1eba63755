"""Experiment 2: does the multi-objective search beat random search and a hand-written grid at equal cost?

This module is over 400 lines because it is one experiment read top to bottom: the arms, the grid file, hypervolume curves, test fronts and the written answer; splitting it would scatter one protocol over files.

    make experiment-search                                         # = python -m analysis.experiments.search_efficiency
    python -m analysis.experiments.search_efficiency --quick       # smoke run: 2 trials per arm, tiny budgets (CI)

The quickstart study (search_spaces/quickstart.yaml: digits, small CNN, 6 searched keys) with the same trial
budget N for every arm, N = the grid's size (32):
- nsga2:  NSGA-II, population 4 (the quickstart's sampler until the search benchmark), `study run` with study.seed = the search seed;
- tpe:    multi-objective TPE (Optuna's defaults: 10 random start-up trials), the same;
- random: Optuna's random sampler, the same;
- grid:   the grid a user writes by hand, Merkle-style: keep fraction {0.02, 0.05, 0.1, 0.25} x score init
          {ssi, snip} x attack schedule {constant, linear, cosine, step}, the other keys fixed (PGD-3, eps
          multiplier 1, warm-up 0.3). No sampler of this project walks a grid, so every grid cell is its own
          `study run` (n_trials 1, each search key narrowed to the cell's value); the grid's cells are
          deterministic, so they run once and a search seed is an order of the cells (a seeded permutation,
          what Optuna's GridSampler does with its seed). The grid file is saved beside the results.
Three search seeds per arm; every study shares one dense model (one trial.cache_dir). All runs are real
studies (Ray Tune + Optuna + MLflow) under runs/experiments/search_efficiency/.

Hypervolume (moocore) of (params_kept / params_total: min, val_robust_acc: max) against the fixed reference
point (1, 0), so it lies in [0, 1]; after each completed trial, in completion order. Validation selects (the
search sees val figures only); the test split reports: each study's Pareto front is confirmed on the test
split by the study itself (PGD-50 x3 restarts on all 360 test images; --autoattack adds standard AutoAttack),
and the test hypervolume of the front is reported beside the validation one.

Cost: 9 studies of 32 trials (about 5 minutes each: a trial takes ~13 s, two at a time) and 32 one-trial grid
studies (~45 s each, most of it starting Ray and MLflow): an estimated 1.2-1.5 hours on the 2-core development
machine (a full-size grid cell measured 44 s, its trial 13 s).

Writes docs/results.md (its section), docs/results/search_efficiency{,_curves,_trials}.csv,
search_efficiency_hv.png, search_efficiency_fronts.png and search_efficiency_grid.yaml. Studies finished
with the same settings are reused (rerun after an interruption; --fresh recomputes).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from analysis import pareto
from analysis.experiments import common
from analysis.experiments.common import ROOT

KEY = "search_efficiency"
MODULE = "analysis.experiments.search_efficiency"
SPACE = ROOT / "search_spaces" / "quickstart.yaml"
SAMPLERS = {  # arm -> the --set lines that choose its sampler (the rest of quickstart.yaml as shipped)
    "nsga2": ["study.sampler=nsga2", "study.sampler_options={population_size: 4}", 'study.stratify=""'],
    "tpe": ["study.sampler=tpe", "study.sampler_options=null", 'study.stratify=""'],  # Optuna's defaults
    "random": ["study.sampler=random", "study.sampler_options=null", 'study.stratify=""'],
}
ARMS = (*SAMPLERS, "grid")
LABELS = {"nsga2": "NSGA-II (population 4)", "tpe": "TPE", "random": "random", "grid": "hand-written grid"}
COLORS = {"nsga2": "tab:blue", "tpe": "tab:purple", "random": "tab:orange", "grid": "tab:green"}
MODES = ("min", "max")  # (params_kept / params_total, val_robust_acc)
REFERENCE = (1.0, 0.0)  # the dense model's size, zero robust accuracy: hypervolume in [0, 1]


@dataclass(frozen=True)
class Sizing:
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ARMS
    grid: tuple[tuple[str, tuple], ...] = (
        ("prune.keep_fraction", (0.02, 0.05, 0.1, 0.25)),
        ("prune.score_init", ("ssi", "snip")),
        ("attack.schedule", ("constant", "linear", "cosine", "step")),
    )
    grid_fixed: tuple[tuple[str, Any], ...] = (("attack.steps", 3), ("attack.eps_multiplier", 1.0),
                                               ("attack.warmup_fraction", 0.3))
    test_points: int = 0  # study.confirm: 0 = all 360 test images
    test_steps: int = 50
    test_restarts: int = 3
    autoattack: bool = False
    sets: tuple[str, ...] = ()  # --set overrides of every study (quickstart.yaml keys)

    @property
    def n_trials(self) -> int:
        return math.prod(len(v) for _, v in self.grid)


QUICK = Sizing(seeds=(0,), grid=(("prune.keep_fraction", (0.05, 0.2)), ("prune.score_init", ("ssi",)),
                                 ("attack.schedule", ("constant",))),
               test_points=32, test_steps=5, test_restarts=1,
               sets=("trial.data.train_limit=256", "trial.pretrain.epochs=1", "trial.prune_stage.epochs=1",
                     "trial.finetune.epochs=1", "trial.eval.steps=3", "trial.eval.val_points=64",
                     "trial.eval.val_steps=2"))


def settings_tag(z: Sizing) -> str:
    text = json.dumps([SPACE.read_text(), list(z.sets), repr(z.grid), repr(z.grid_fixed), z.test_points,
                       z.test_steps, z.test_restarts, z.autoattack])
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def common_sets(z: Sizing, work: Path, n_trials: int) -> list[str]:
    return [f"study.n_trials={n_trials}", f"trial.cache_dir={work / 'pretrained'}",
            f"study.confirm.points={z.test_points}", f"study.confirm.steps={z.test_steps}",
            f"study.confirm.restarts={z.test_restarts}", f"study.confirm.autoattack={str(z.autoattack).lower()}",
            *z.sets]


def grid_space(z: Sizing, path: Path) -> Path:
    """quickstart.yaml with its search section replaced by the hand-written grid (fixed values for the
    keys the grid leaves out). `study run` of this file samples the grid at random; the experiment runs it
    cell by cell."""
    raw = yaml.safe_load(SPACE.read_text())
    trial = raw.setdefault("trial", {})
    for key, value in z.grid_fixed:
        section, leaf = key.split(".", 1)
        trial.setdefault(section, {})[leaf] = value
    raw["study"] = {**raw.get("study", {}), "name": "quickstart_grid", "sampler": "random", "sampler_options": {},
                    "stratify": "", "n_trials": z.n_trials}
    raw["search"] = {key: {"choice": list(values)} for key, values in z.grid}
    head = (f"# The hand-written grid of the search-efficiency experiment ({MODULE}), made from\n"
            f"# search_spaces/quickstart.yaml: {' x '.join(str(len(v)) for _, v in z.grid)} = {z.n_trials} cells, "
            f"the other keys fixed.\n# The experiment runs each cell as its own study (no grid sampler in this project).\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------
# Running the arms.


@dataclass
class Point:
    """One trial, as the hypervolume sees it."""
    number: int
    state: str
    params: dict
    size: float  # params_kept / params_total
    val_robust: float
    val_clean: float
    test_robust: float = math.nan  # front trials only (the study's confirmation)
    test_clean: float = math.nan


def trial_points(runs: Path, name: str) -> list[Point]:
    """The study's finished trials in completion order, with their confirmed test figures where present."""
    study = common.load_study(runs, name)
    done = [t for t in study.trials if t.state.is_finished()]
    out = []
    for t in sorted(done, key=lambda t: (t.datetime_complete or t.datetime_start, t.number)):
        m = common.trial_metrics(t)
        ok = t.state.name == "COMPLETE" and m.get("params_total", 0) > 0
        p = Point(t.number, t.state.name, dict(t.params),
                  m["params_kept"] / m["params_total"] if ok else math.nan,
                  m.get("val_robust_acc", math.nan) if ok else math.nan, m.get("val_clean_acc", math.nan) if ok else math.nan)
        confirm = common.read_json(common.trial_folder(runs, name, t.number) / "confirm.json")
        if confirm is not None:
            p.test_robust, p.test_clean = confirm["metrics"]["test_robust_acc"], confirm["metrics"]["test_clean_acc"]
        out.append(p)
    return out


def run_sampler(arm: str, seed: int, z: Sizing, tag: str, work: Path, fresh: bool) -> tuple[list[Point], float, str]:
    runs, name = work / "runs", f"se{tag}-{arm}-s{seed}"
    reused = not fresh and common.study_finished(runs, name)
    if reused:
        wall = common.recorded_wall(runs, name)
    else:
        sets = [*SAMPLERS[arm], f"study.seed={seed}", *common_sets(z, work, z.n_trials)]
        wall = common.study_run(SPACE, name, runs, sets, work / "logs" / f"{name}.log")
    points = trial_points(runs, name)
    common.log_line(f"{arm} seed {seed}: {len(points)} trials, hypervolume {hv(points):.4f}"
                    + (" (reused)" if reused else f" ({wall:.0f} s)"))
    return points, wall, name


def run_grid(z: Sizing, tag: str, work: Path, fresh: bool, space: Path) -> tuple[list[Point], float]:
    """Every grid cell as its own one-trial study; the points in the grid's written order."""
    runs, points, wall = work / "runs", [], 0.0
    keys = [k for k, _ in z.grid]
    for i, values in enumerate(itertools.product(*(v for _, v in z.grid))):
        name = f"se{tag}-grid-{i:02d}"
        if fresh or not common.study_finished(runs, name):
            sets = [*(f"search.{k}.choice=[{v!r}]" if isinstance(v, float) else f"search.{k}.choice=[{v}]"
                      for k, v in zip(keys, values)), *common_sets(z, work, 1)]
            wall += common.study_run(space, name, runs, sets, work / "logs" / f"{name}.log")
        else:
            wall += common.recorded_wall(runs, name)
        (p,) = trial_points(runs, name)
        p.number = i
        points.append(p)
        common.log_line(f"grid cell {i + 1}/{z.n_trials} {dict(zip(keys, values))}: size {p.size:.3f}, "
                        f"val robust {p.val_robust:.3f}")
    return points, wall


# ---------------------------------------------------------------------------------------------------
# Hypervolume.


def hv(points: Sequence[Point], test: bool = False) -> float:
    vals = [(p.size, p.test_robust if test else p.val_robust) for p in points
            if math.isfinite(p.size) and math.isfinite(p.test_robust if test else p.val_robust)]
    return pareto.hypervolume(np.array(vals).reshape(-1, 2), MODES, REFERENCE) if vals else 0.0


def curve(points: Sequence[Point]) -> list[float]:
    """Hypervolume after each completed (finished) trial, in order."""
    return [hv(points[:k]) for k in range(1, len(points) + 1)]


def on_front(points: Sequence[Point]) -> list[bool]:
    ok = [math.isfinite(p.size) and math.isfinite(p.val_robust) for p in points]
    vals = np.array([(p.size, p.val_robust) for p, good in zip(points, ok) if good]).reshape(-1, 2)
    front = iter(pareto.non_dominated(vals, MODES)) if len(vals) else iter(())
    return [bool(next(front)) if good else False for good in ok]


def front_test_hv(points: Sequence[Point]) -> float:
    """Test hypervolume of the validation front (the models the study chose), from their confirmed figures."""
    return hv([p for p, f in zip(points, on_front(points)) if f], test=True)


def first_reaching(values: Sequence[float], target: float) -> int | None:
    return next((k for k, v in enumerate(values, 1) if v >= target - 1e-12), None)


# ---------------------------------------------------------------------------------------------------
# Tables, plots, verdict, page.


@dataclass
class Arm:
    arm: str
    seed: int
    points: list[Point]  # in the order they completed (grid: the seed's permutation)
    wall_s: float
    study: str

    @property
    def curve(self) -> list[float]:
        return curve(self.points)


def summary_rows(arms: list[Arm], grid_hv: float) -> list[dict[str, Any]]:
    rows = []
    for a in arms:
        c = a.curve
        rows.append({"arm": a.arm, "seed": a.seed, "n_trials": len(a.points),
                     "complete": sum(p.state == "COMPLETE" for p in a.points),
                     "failed": sum(p.state != "COMPLETE" for p in a.points),
                     "hv_val": c[-1] if c else 0.0, "hv_test_front": front_test_hv(a.points),
                     "front_size": sum(on_front(a.points)), "trials_to_grid_hv": first_reaching(c, grid_hv),
                     "wall_s": round(a.wall_s, 1), "study": a.study})
    return rows


def arm_stats(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm]
        reach = [r["trials_to_grid_hv"] for r in rs]
        out[arm] = {"hv": common.spread([r["hv_val"] for r in rs]), "hv_test": common.spread([r["hv_test_front"] for r in rs]),
                    "values": [r["hv_val"] for r in rs], "reach": reach, "n": len(rs),
                    "front": common.spread([r["front_size"] for r in rs]),
                    "wall": common.spread([r["wall_s"] for r in rs])["mean"]}
    return out


def verdict(stats: dict[str, dict[str, Any]], n: int) -> str:
    """The answer in plain words: each shipped search against random and the grid, by mean final
    hypervolume, with whether the gap holds in every seed."""
    lines, every_yes = [], True
    for search in (a for a in ("nsga2", "tpe") if a in stats):
        s = stats[search]
        parts, beats_all, behind = [], True, False
        for base in (b for b in ("random", "grid") if b in stats):
            b = stats[base]
            diff = s["hv"]["mean"] - b["hv"]["mean"]
            rel = 100 * diff / b["hv"]["mean"] if b["hv"]["mean"] > 0 else math.nan
            every = min(s["values"]) > max(b["values"])
            beats_all &= every
            behind |= diff < 0
            how = ("one seed each" if len(s["values"]) < 2 or len(b["values"]) < 2 else "higher in every seed"
                   if every else "lower in every seed" if max(s["values"]) < min(b["values"]) else "the seed ranges overlap")
            parts.append(f"{LABELS[base]} {b['hv']['mean']:.4f} ({diff:+.4f}, {rel:+.1f}%; {how})")
        answer = "Yes" if beats_all else "No" if behind else "Not clearly"
        every_yes &= beats_all
        lines.append(f"- **{LABELS[search]}: {answer}.** Final validation hypervolume after {n} trials "
                     f"{s['hv']['mean']:.4f} (seeds {', '.join(f'{v:.4f}' for v in s['values'])}) against "
                     + "; ".join(parts) + ".")
    reach = {a: st["reach"] for a, st in stats.items() if a != "grid"}
    if "grid" in stats and reach:
        lines.append("- Trials to reach the whole grid's hypervolume (per seed; '-' = not within the budget): "
                     + "; ".join(f"{LABELS[a]} {', '.join(str(k) if k else '-' for k in r)}" for a, r in reach.items())
                     + ".")
    if not every_yes:
        lines.append(f"- Where a search does not beat a baseline: with {n} trials NSGA-II (population 4) runs "
                     f"only {n // 4} generations and TPE {max(0, n - 10)} model-based proposals, two trials run at "
                     "once (each proposal misses the trial still running), and the robust accuracy of one trial "
                     "varies with its seed by about the gaps above. A larger budget, more seeds, or a harder "
                     "space (more keys, where a grid's cost multiplies) would separate them.")
    return "\n".join(lines)


def plot_curves(arms: list[Arm], path: Path) -> Path:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in dict.fromkeys(a.arm for a in arms):
        curves = [a.curve for a in arms if a.arm == arm]
        n = min(len(c) for c in curves)
        if n == 0:
            continue
        c = np.array([cv[:n] for cv in curves])
        k = np.arange(1, n + 1)
        ax.plot(k, c.mean(0), color=COLORS[arm], label=f"{LABELS[arm]} (mean of {len(curves)})")
        ax.fill_between(k, c.min(0), c.max(0), color=COLORS[arm], alpha=0.15, lw=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("completed trials")
    ax.set_ylabel("hypervolume (validation)")
    ax.set_title("(params kept / total: min, val robust acc: max), reference (1, 0)\nline: mean over search seeds, "
                 "band: min to max", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fronts(arms: list[Arm], path: Path) -> Path:
    """The final fronts of every arm and seed: validation (what the search saw) and test (confirmed)."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, test in zip(axes, (False, True)):
        seen = set()
        for a in arms:
            front = [p for p, f in zip(a.points, on_front(a.points)) if f]
            pts = sorted((p.size, p.test_robust if test else p.val_robust) for p in front)
            pts = [q for q in pts if math.isfinite(q[1])]
            if not pts:
                continue
            xs, ys = zip(*pts)
            label = None if a.arm in seen else LABELS[a.arm]
            seen.add(a.arm)
            ax.step(xs, ys, where="post", color=COLORS[a.arm], alpha=0.7, lw=1.2, label=label)
            ax.plot(xs, ys, "o", color=COLORS[a.arm], ms=3, alpha=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("params kept / params total")
        ax.set_title("validation fronts (selection)" if not test else "the same models on the TEST split")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("robust accuracy (PGD)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def trial_rows(arms: list[Arm]) -> list[dict[str, Any]]:
    rows = []
    for a in arms:
        for order, (p, f) in enumerate(zip(a.points, on_front(a.points)), 1):
            rows.append({"arm": a.arm, "seed": a.seed, "order": order, "trial": p.number, "state": p.state,
                         **{f"param.{k}": v for k, v in p.params.items()}, "size": p.size, "val_robust_acc": p.val_robust,
                         "val_clean_acc": p.val_clean, "on_front": f, "test_robust_acc": p.test_robust,
                         "test_clean_acc": p.test_clean, "study": a.study})
    return rows


def markdown(z: Sizing, quick: bool, stats: dict, rows: list[dict], command: str, wall: float, started: datetime,
             files: dict[str, Path], out: Path, attack: str, compute: float) -> str:
    rel = lambda p: p.relative_to(out).as_posix()  # noqa: E731
    table = common.md_table([{"arm": a, **st} for a, st in stats.items()], [
        ("arm", lambda r: LABELS[r["arm"]]), ("seeds", "n"),
        ("hypervolume after N (val)", lambda r: common.pm(r["hv"]["mean"], r["hv"]["std"], 4)),
        ("min-max", lambda r: f"{r['hv']['min']:.4f}-{r['hv']['max']:.4f}"),
        ("front's test hypervolume", lambda r: common.pm(r["hv_test"]["mean"], r["hv_test"]["std"], 4)),
        ("front size", lambda r: f"{r['front']['mean']:.1f}"),
        ("trials to the grid's HV", lambda r: ", ".join(str(k) if k else "-" for k in r["reach"])),
        ("wall per search", lambda r: f"{r['wall'] / 60:.1f} min" if math.isfinite(r["wall"]) else "-"),
    ])
    grid = " x ".join(f"{k} {{{', '.join(map(str, v))}}}" for k, v in z.grid)
    fixed = ", ".join(f"{k} = {v}" for k, v in z.grid_fixed)
    parts = ["## Experiment 2: search efficiency on digits (NSGA-II, TPE, random, grid)"]
    if quick:
        parts.append(common.QUICK_BANNER)
    parts += [common.stamp(command, z.seeds, wall, started, compute),
              f"Study: search_spaces/quickstart.yaml (digits, small CNN) with N = {z.n_trials} trials per arm and search "
              f"seed, {len(z.seeds)} search seed(s) per arm, one shared dense model. Grid: {grid}; fixed: {fixed} "
              f"([the grid file]({rel(files['grid'])})); its cells run once, each as a one-trial study, and a search "
              "seed orders them (Optuna's GridSampler shuffles its grid by its seed the same way). Hypervolume: "
              "moocore, (params kept / params total, minimized; validation robust accuracy, maximized), reference "
              "point (1, 0), after each completed trial. For one seed the three samplers start from the same random "
              "trials (each begins with Optuna's RandomSampler of that seed: NSGA-II's first population of 4, TPE's "
              "10 start-up trials), so their differences come from the later, model-based proposals. Test: every "
              "study's Pareto front confirmed by the study "
              f"itself on the test split ({attack}); 'front's test hypervolume' is those models' test figures.",
              table, f"![hypervolume against completed trials]({rel(files['hv'])})",
              f"![final fronts]({rel(files['fronts'])})",
              "**Does the search beat random and the grid at equal cost?**\n\n" + verdict(stats, z.n_trials),
              "Data: " + ", ".join(f"[{files[k].name}]({rel(files[k])})" for k in ("summary", "curves", "trials")) + "."]
    return "\n\n".join(p.rstrip() for p in parts) + "\n"


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Sizing]:
    p = argparse.ArgumentParser(prog=MODULE, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 trials per arm, one seed, tiny budgets (not results)")
    p.add_argument("--seeds", type=int, nargs="+", help="search seeds (study.seed; the grid: its order)")
    p.add_argument("--arms", nargs="+", choices=ARMS)
    p.add_argument("--autoattack", action="store_true", help="add standard AutoAttack to the test-split confirmation")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of search_spaces/quickstart.yaml in every study")
    p.add_argument("--out", default=str(ROOT / "docs"), help="folder of results.md (and results/ for CSVs, plots)")
    p.add_argument("--work", default=str(ROOT / "runs" / "experiments" / KEY), help="the studies, dense cache, logs")
    p.add_argument("--fresh", action="store_true", help="recompute studies already finished with the same settings")
    args = p.parse_args(argv)
    z = QUICK if args.quick else Sizing()
    z = replace(z, seeds=tuple(args.seeds or z.seeds), arms=tuple(args.arms or z.arms), sets=(*z.sets, *args.set),
                autoattack=args.autoattack or z.autoattack)
    return args, z


def main(argv: Sequence[str] | None = None) -> int:
    args, z = parse_args(argv)
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    assets = out / common.ASSETS
    tag = settings_tag(z)
    common.log_line(f"{len(z.arms)} arms x {len(z.seeds)} seeds, N = {z.n_trials} (settings {tag}); logs in {work / 'logs'}")
    files = {"grid": grid_space(z, assets / f"{KEY}_grid.yaml")}
    arms: list[Arm] = []
    try:
        for arm in (a for a in z.arms if a != "grid"):
            for seed in z.seeds:
                points, wall, name = run_sampler(arm, seed, z, tag, work, args.fresh)
                arms.append(Arm(arm, seed, points, wall, name))
        if "grid" in z.arms:
            cells, wall = run_grid(z, tag, work, args.fresh, grid_space(z, work / "grid.yaml"))
            for seed in z.seeds:
                order = np.random.default_rng(seed).permutation(len(cells))
                arms.append(Arm("grid", seed, [cells[i] for i in order], wall, f"se{tag}-grid-*"))
    except common.StudyFailed as e:
        print(f"{MODULE}: error: {e}", file=sys.stderr)
        return 1
    grid_hv = hv(next((a.points for a in arms if a.arm == "grid"), []))
    summary = summary_rows(arms, grid_hv if "grid" in z.arms else math.inf)
    stats = arm_stats(summary)
    curves = [{"arm": a.arm, "seed": a.seed, "trials": k, "hypervolume": v} for a in arms for k, v in enumerate(a.curve, 1)]
    files |= {"summary": common.write_csv(assets / f"{KEY}.csv", summary),
              "curves": common.write_csv(assets / f"{KEY}_curves.csv", curves),
              "trials": common.write_csv(assets / f"{KEY}_trials.csv", trial_rows(arms)),
              "hv": plot_curves(arms, assets / f"{KEY}_hv.png"),
              "fronts": plot_fronts(arms, assets / f"{KEY}_fronts.png")}
    attack = attack_text(work / "runs", [a.study for a in arms if a.arm != "grid"] + [f"se{tag}-grid-00"])
    wall = time.perf_counter() - t0
    compute = sum(a.wall_s for a in arms if a.arm != "grid") + next((a.wall_s for a in arms if a.arm == "grid"), 0.0)
    text = markdown(z, args.quick, stats, summary, common.command_line(MODULE, argv), wall, started, files, out, attack,
                    compute)
    page = common.update_section(out / common.RESULTS_PAGE, KEY, text)
    common.log_line(f"wrote {page} and {len(files)} files under {assets} in {wall / 60:.1f} min")
    return 0


def attack_text(runs: Path, names: Sequence[str]) -> str:
    for name in names:
        for path in sorted((runs / name).glob("trials/*/confirm.json")):
            return json.loads(path.read_text())["test_attack"]
    return "no front confirmed"


if __name__ == "__main__":
    sys.exit(main())
