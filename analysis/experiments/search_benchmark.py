"""Which sampler finds the size-vs-robustness front best at equal cost? A tabular benchmark, many seeds.

    python -m analysis.experiments.search_benchmark            # every arm, 20 seeds, concurrency 2 and 8
    python -m analysis.experiments.search_benchmark --quick    # 3 arms, 2 seeds, 16 trials (CI smoke run)

The table (docs/results/search_table.csv, made by analysis.experiments.search_table) holds real trials of the
quickstart space at snapped levels, each cell with 2 trial seeds and its per-epoch validation figures. A replay
runs a sampler against it through Optuna's ask/tell with the quickstart's real search space
(study.search.optimize.space: the same suggest calls a study makes): it keeps `concurrency` trials in flight (several
asked before any is told, as Ray Tune runs them), snaps each suggestion to the table's levels, draws one of the
cell's replicate trials (the measured trial-to-trial noise) and finishes it after the trial's own measured
wall time, epoch by epoch. Each arm x seed x concurrency is one replay of up to `N_MAX` trials.

Multi-fidelity (`+mf` arms, study.search.optimize.rungs.RungRule: the same rule a study applies): at each rung (an
epoch boundary) a trial is stopped when at least `min_dominating` completed trials dominate its (size, that
epoch's validation robust accuracy) at the same epoch. A stopped trial is PRUNED in Optuna: it counts toward
n_trials and its epochs toward epochs_used, and it never enters a front.

Hypervolume (moocore) of (params_kept / params_total: min, val_robust_acc: max) against the reference (1, 0), of
the COMPLETE trials so far; `test_hypervolume`: the same trials' validation front, its points taken at the
trials' test figures (PGD-10 on the whole test split), so the test split never selects. Rows: one per arm x seed
x concurrency x budget point (every `STEP` finished trials), with epochs_used = the epochs of every finished
trial (complete or pruned).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from analysis.experiments import common, search_table
from analysis.experiments.common import ROOT
from analysis.experiments.search_replay import (EPOCHS, N_MAX, Arm, Trace, Trial, arms, diff_ci, hv_at_epochs,
                                                hypervolumes, load_table, mean_ci, replay, rows_of)

KEY = "search_benchmark"
MODULE = "analysis.experiments.search_benchmark"
OUT = ROOT / "docs" / "results" / "search_benchmark.csv"
E2E_OUT = ROOT / "docs" / "results" / "search_benchmark_e2e.csv"
CONCURRENCY = (2, 8)
SEEDS = 30
COLUMNS = ["arm", "seed", "concurrency", "n_trials", "epochs_used", "n_pruned", "val_hypervolume",
           "test_hypervolume"]


def summarize(rows: Sequence[Mapping[str, Any]], traces: Mapping[tuple, Trace], default: str,
              n_seeds: int) -> dict[str, Any]:
    """The figures the page and the pass/fail lines read."""
    by: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        by[(r["arm"], r["concurrency"], r["n_trials"])].append(float(r["val_hypervolume"]))
    out: dict[str, Any] = {"by": by, "verdicts": []}
    for c in sorted({k[1] for k in by}):
        d, lo, hi = diff_ci(by[("default", c, 32)], by[("random", c, 32)]) if by.get(("default", c, 32)) else (
            float("nan"),) * 3
        out["verdicts"].append((f"default - random at 32 trials, concurrency {c}", d, lo, hi))
        if by.get(("random", c, 64)) and by.get(("default", c, 32)):
            d2, lo2, hi2 = diff_ci(by[("default", c, 32)], by[("random", c, 64)])
            out["verdicts"].append((f"default at 32 - random at 64, concurrency {c}", d2, lo2, hi2))
        if ("default+mf", 0, c) in traces and ("default", 0, c) in traces:
            budget = 32 * EPOCHS
            a = [hv_at_epochs(traces[("default+mf", s, c)], budget) for s in range(n_seeds)]
            b = [hv_at_epochs(traces[("default", s, c)], budget) for s in range(n_seeds)]
            d3, lo3, hi3 = diff_ci(a, b)
            out["verdicts"].append((f"default+mf - default at {budget} epochs, concurrency {c}", d3, lo3, hi3))
    return out


def e2e_lines(e2e: Sequence[Mapping[str, Any]], by: Mapping[tuple, list[float]]) -> list[str]:
    """The end-to-end studies beside the benchmark, and whether they agree with it."""
    lines = ["**End to end** (real `study run`s: the same space and trial settings, 32 trials, two at a time, "
             f"seeds {', '.join(str(s) for s in E2E_SEEDS)}):", "", "| arm | hypervolume per seed | mean (SE) | "
             "benchmark at 32 trials, concurrency 2 (95% band) |", "|---|---|---|---|"]
    agree, means = True, {}
    for arm in dict.fromkeys(r["arm"] for r in e2e):
        vals = [float(r["val_hypervolume"]) for r in e2e if r["arm"] == arm]
        m = float(np.mean(vals))
        se = float(np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else 0.0
        bm, bh = mean_ci(by.get((arm, 2, 32), []) or [float("nan")])
        inside = abs(m - bm) <= bh + se
        agree &= inside
        means[arm] = (m, bm)
        lines.append(f"| {arm} | {', '.join(f'{v:.3f}' for v in vals)} | {m:.3f} ({se:.3f}) | {bm:.3f} ± {bh:.3f}: "
                     f"{'inside' if inside else 'OUTSIDE'} the band widened by the SE |")
    if {"default", "random"} <= set(means):
        same = (means["default"][0] > means["random"][0]) == (means["default"][1] > means["random"][1])
        agree &= same
        lines += ["", f"Ordering of default and random: {'the same' if same else 'DIFFERENT'} end to end and on the "
                  f"benchmark. The end-to-end check {'agrees' if agree else 'does NOT agree'} with the benchmark "
                  "(the criterion: the same ordering, and each arm's end-to-end mean inside the benchmark's 95% band "
                  "widened by the end-to-end standard error). The difference default - random: "
                  f"{means['default'][0] - means['random'][0]:+.4f} end to end, "
                  f"{means['default'][1] - means['random'][1]:+.4f} on the benchmark."]
    return lines + [""]


PLOT = ROOT / "docs" / "results" / "search_benchmark.png"
PLOTTED = ("random", "default", "default+mf", "tpe_plain", "nsga2_p4")


def plot(traces: Mapping[tuple, Trace], path: Path = PLOT) -> Path:
    """Validation hypervolume against trials and against epochs, mean and 95% band over seeds, per concurrency."""
    plt = common.pyplot()
    fig, axes = plt.subplots(2, len(CONCURRENCY), figsize=(11, 7.5), constrained_layout=True, squeeze=False)
    for col, c in enumerate(CONCURRENCY):
        for name in PLOTTED:
            seeds = sorted(sd for (nm, sd, cc) in traces if nm == name and cc == c)
            if len(seeds) < 2:
                continue
            for row, (xs, label) in enumerate(((list(range(8, N_MAX + 1, 2)), "trials finished"),
                                               (list(range(48, N_MAX * EPOCHS + 1, 12)), "epochs used"))):
                per_seed = np.array([[_hv_at(traces[(name, sd, c)], x, by_epochs=row == 1) for x in xs]
                                     for sd in seeds])
                m = per_seed.mean(0)
                h = np.array([mean_ci(per_seed[:, i])[1] for i in range(len(xs))])
                ax = axes[row][col]
                ax.plot(xs, m, label=name, lw=2.2 if name == "default" else 1.2)
                ax.fill_between(xs, m - h, m + h, alpha=0.15)
                ax.set_xlabel(label)
                ax.set_ylabel("validation hypervolume")
                ax.set_title(f"concurrency {c}: against {label}")
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _hv_at(trace: Trace, x: int, by_epochs: bool) -> float:
    if by_epochs:
        return hv_at_epochs(trace, x)
    done = [t for _, ok, _, t in trace.finished[:x] if ok]
    return hypervolumes(done)[0]


def write_page(rows: Sequence[Mapping[str, Any]], traces: Mapping[tuple, Trace], arm_list: Sequence[Arm],
               default: str, n_seeds: int, command: str, wall_s: float, started: datetime,
               e2e: Sequence[Mapping[str, Any]] = ()) -> Path:
    s = summarize(rows, traces, default, n_seeds)
    by = s["by"]
    lines = [common.stamp(command, range(n_seeds), wall_s, started), "",
             f"Table: docs/results/search_table.csv ({sum(len(v) for v in load_table().values())} real trials of "
             "the quickstart space at snapped levels, 2 trial seeds per cell; `python -m "
             "analysis.experiments.search_table`). Replays: Optuna ask/tell with the study's own search space, "
             f"{n_seeds} seeds per arm, concurrency {' and '.join(map(str, CONCURRENCY))}. Hypervolume of "
             "(kept fraction: min, validation PGD-10 robust accuracy: max) against (1, 0); test hypervolume: the "
             "validation front at its test figures (PGD-10, whole test split).", "",
             f"The arm named `default` is `{default}`, what `study.sampler` defaults to and the shipped spaces use.", "",
             f"![hypervolume against trials and epochs](results/{plot(traces).name})", ""]
    for c in CONCURRENCY:
        lines += [f"**Concurrency {c}**: mean validation hypervolume (95% interval half-width) against trials", "",
                  "| arm | " + " | ".join(f"{n} trials" for n in (8, 16, 32, 64)) + " | test HV at 32 |",
                  "|---|" + "---|" * 5]
        for arm in arm_list:
            name = label_of(arm.name)
            cells = []
            for n in (8, 16, 32, 64):
                v = by.get((name, c, n))
                cells.append(common.pm(*mean_ci(v), digits=3) if v else "")
            tv = [float(r["test_hypervolume"]) for r in rows if r["arm"] == name and r["concurrency"] == c
                  and r["n_trials"] == 32]
            cells.append(f"{np.mean(tv):.3f}" if tv else "")
            lines.append(f"| {name} ({arm.note}) | " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"Against epochs (equal compute, concurrency {c}): validation hypervolume of the trials finished "
                  "within the budget", "", "| arm | " + " | ".join(f"{e} epochs" for e in (48, 96, 192, 384)) + " |",
                  "|---|---|---|---|---|"]
        for arm in arm_list:
            name = label_of(arm.name)
            if (name, 0, c) not in traces:
                continue
            seeds = [sd for (nm, sd, cc) in traces if nm == name and cc == c]
            cells = [common.pm(*mean_ci([hv_at_epochs(traces[(name, sd, c)], e) for sd in seeds]), digits=3)
                     if e <= max(sum(ep for ep, *_ in traces[(name, sd, c)].finished) for sd in seeds) else ""
                     for e in (48, 96, 192, 384)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if e2e:
        lines += e2e_lines(e2e, by)
    lines += ["Verdicts (mean difference over seeds, 95% t-interval paired by seed):", ""]
    for text, d, lo, hi in s["verdicts"]:
        verdict = "above zero" if lo > 0 else ("below zero" if hi < 0 else "includes zero")
        lines.append(f"- {text}: {d:+.4f} [{lo:+.4f}, {hi:+.4f}]: {verdict}")
    return common.update_section(ROOT / "docs" / common.RESULTS_PAGE, KEY,
                                 "## Search benchmark: samplers on a table of real trials\n\n" + "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------
# The end-to-end check: real `study run`s of the same space and table settings.

STUDY_SAMPLERS = {  # arm -> (study.sampler, study.sampler_options, study.stratify) of a study that runs it
    "random": ("random", {}, ""),
    "tpe": ("tpe", {"multivariate": True, "group": True, "constant_liar": True}, ""),
    "tpe_plain": ("tpe", {}, ""),
    "nsga2_p4": ("nsga2", {"population_size": 4}, ""),
    "nsga2_p8": ("nsga2", {"population_size": 8}, ""),
    "nsga2_p16": ("nsga2", {"population_size": 16}, ""),
    "gp": ("gp", {}, ""),
    "stratified_tpe": ("tpe", {"multivariate": True, "group": True, "constant_liar": True}, "prune.keep_fraction"),
    "stratified_tpe_plain": ("tpe", {}, "prune.keep_fraction"),
}


def arm_space(arm: str, folder: Path) -> Path:
    """The quickstart space with the arm's sampler (a --set merges into sampler_options, never replaces it)."""
    import yaml

    raw = yaml.safe_load(search_table.SPACE.read_text())
    raw["study"]["sampler"], raw["study"]["sampler_options"], raw["study"]["stratify"] = STUDY_SAMPLERS[arm]
    path = folder / f"space_{arm}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# search_spaces/quickstart.yaml with the {arm} arm's sampler ({MODULE})\n"
                    + yaml.safe_dump(raw, sort_keys=False))
    return path
E2E_SEEDS = (0, 1, 2)
E2E_TRIALS = 32


def end_to_end(arm_names: Sequence[str], seeds: Sequence[int] = E2E_SEEDS, n_trials: int = E2E_TRIALS,
               quick: bool = False) -> list[dict[str, Any]]:
    """Each arm x seed as a real study (Ray Tune + Optuna + MLflow, the table's trial settings, two trials at a
    time, no test-split confirmation); its validation hypervolume after `n_trials` trials. Finished studies are
    reused (rerun after an interruption)."""
    work = ROOT / "runs" / "experiments" / KEY
    table_sets = [f"trial.{k}={v}" for k, v in search_table.TABLE_SETTINGS.items()]
    if quick:
        table_sets += [f"trial.{k}={v}" for k, v in search_table.QUICK_SETTINGS.items()]
    out = []
    for arm in arm_names:
        base = arm.removesuffix("+mf")
        space = arm_space(base, work)
        sets = [*table_sets, f"study.n_trials={n_trials}", "study.max_concurrent=2",
                f"trial.cache_dir={ROOT / 'runs' / 'pretrained'}"]
        if arm.endswith("+mf"):
            sets.append("study.early_stop={rungs: [2, 4], min_dominating: 3}")
        for seed in seeds:
            name = f"{KEY}_{arm.replace('+', '_')}_{seed}" + ("_quick" if quick else "")
            if not common.study_finished(work, name, need_confirm=False):
                common.study_run(space, name, work, [*sets, f"study.seed={seed}"],
                                 work / "logs" / f"{name}.log", final_eval=False, num_cpus=2)
            study = common.load_study(work, name)
            done = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.datetime_complete)
            trials = [Trial(size=t.values[0] / common.trial_metrics(t)["params_total"], val=t.values[1], test=0.0,
                            per_epoch=(), wall_s=0.0) for t in done]
            val, _ = hypervolumes(trials)
            out.append({"arm": label_of(arm), "seed": seed, "concurrency": 2,
                        "n_trials": len(study.trials), "val_hypervolume": round(val, 5),
                        "wall_s": round(common.recorded_wall(work, name), 1)})
            common.log_line(f"end-to-end {arm} seed {seed}: hypervolume {val:.4f} ({len(done)} complete)")
    return out


DEFAULT_ARM = "stratified_tpe_plain"  # what `study.sampler` defaults to (study.search.optimize.space): the winner of this benchmark


def label_of(name: str) -> str:
    """The arm's name in the CSV and on the page: the default arm is `default` (and `default+mf`)."""
    base, mf = name.removesuffix("+mf"), name.endswith("+mf")
    return ("default" if base == DEFAULT_ARM else base) + ("+mf" if mf else "")


def run(arm_names: Sequence[str], n_seeds: int, concurrency: Sequence[int], n_max: int, out: Path | None,
        log: bool = True) -> tuple[list[dict[str, Any]], dict[tuple, Trace]]:
    table = load_table()
    all_arms = arms()
    rows: list[dict[str, Any]] = []
    traces: dict[tuple, Trace] = {}
    for name in arm_names:
        arm = all_arms[name]
        label = label_of(name)
        t0 = time.time()
        for c in concurrency:
            for seed in range(min(n_seeds, arm.max_seeds or n_seeds)):
                n = min(n_max, arm.n_max or n_max)
                n = n * 2 if arm.mf else n  # stopped trials are cheap: run on to equal epochs
                trace = replay(arm, seed, c, table, n_max=n)
                traces[(label, seed, c)] = trace
                rows += [r for r in rows_of(label, seed, c, trace) if r["n_trials"] <= n]
        if log:
            common.log_line(f"{label:16s} {min(n_seeds, arm.max_seeds or n_seeds)} seeds x {len(concurrency)} "
                            f"concurrency levels: "
                            f"{time.time() - t0:.0f} s")
    if out is not None:
        common.write_csv(out, rows, COLUMNS)
    return rows, traces


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 arms, 2 seeds, 16 trials; writes only --out")
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--arms", nargs="*", default=None, help="a subset of the arms (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-end-to-end", action="store_true",
                    help="skip the real studies (3 seeds x {default, random}, ~5 min each; reused when finished)")
    args = ap.parse_args(argv)
    started, t0 = datetime.now(timezone.utc), time.time()
    if args.quick:
        names = args.arms or ["random", DEFAULT_ARM, f"{DEFAULT_ARM}+mf"]
        run(names, 2, CONCURRENCY, 16, args.out)
        return 0
    names = args.arms or list(arms())
    # the real studies (subprocesses) run in a thread beside the replays (this process)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pending = None if args.no_end_to_end else pool.submit(end_to_end, [DEFAULT_ARM, "random"])
        rows, traces = run(names, args.seeds, CONCURRENCY, N_MAX, args.out or OUT)
        e2e = pending.result() if pending is not None else []
    if e2e:
        common.write_csv(E2E_OUT, e2e)
    page = write_page(rows, traces, [arms()[n] for n in names], DEFAULT_ARM, args.seeds,
                      common.command_line(MODULE, argv), time.time() - t0, started, e2e)
    print(f"wrote {args.out or OUT} and {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
