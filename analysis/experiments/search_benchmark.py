"""Which sampler finds the size-vs-robustness front best at equal cost? A tabular benchmark, many seeds.

    python -m analysis.experiments.search_benchmark            # every arm, 20 seeds, concurrency 2 and 8
    python -m analysis.experiments.search_benchmark --quick    # 3 arms, 2 seeds, 16 trials (CI smoke run)

The table (docs/results/search_table.csv, made by analysis.experiments.search_table) holds real trials of the
quickstart space at snapped levels, each cell with 2 trial seeds and its per-epoch validation figures. A replay
runs a sampler against it through Optuna's ask/tell with the quickstart's real search space
(study.search.space: the same suggest calls a study makes): it keeps `concurrency` trials in flight (several
asked before any is told, as Ray Tune runs them), snaps each suggestion to the table's levels, draws one of the
cell's replicate trials (the measured trial-to-trial noise) and finishes it after the trial's own measured
wall time, epoch by epoch. Each arm x seed x concurrency is one replay of up to `N_MAX` trials.

Multi-fidelity (`+mf` arms, study.search.rungs.RungRule: the same rule a study applies): at each rung (an
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
import functools
import heapq
import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from analysis import pareto
from analysis.experiments import common, search_table
from analysis.experiments.common import ROOT

KEY = "search_benchmark"
MODULE = "analysis.experiments.search_benchmark"
OUT = ROOT / "docs" / "results" / "search_benchmark.csv"
E2E_OUT = ROOT / "docs" / "results" / "search_benchmark_e2e.csv"
MODES = ("min", "max")
REF = (1.0, 0.0)
N_MAX = 64
STEP = 4
CONCURRENCY = (2, 8)
SEEDS = 30
EPOCHS = search_table.EPOCHS["prune_stage.epochs"] + search_table.EPOCHS["finetune.epochs"]
COLUMNS = ["arm", "seed", "concurrency", "n_trials", "epochs_used", "n_pruned", "val_hypervolume",
           "test_hypervolume"]


# ---------------------------------------------------------------------------------------------------
# The table.


@dataclass(frozen=True)
class Trial:
    size: float  # params_kept / params_total
    val: float
    test: float
    per_epoch: tuple[float, ...]  # validation robust accuracy after each epoch
    wall_s: float


def load_table(path: Path = search_table.TABLE) -> dict[tuple, list[Trial]]:
    """cell (the LEVELS keys' values as text) -> its replicate trials."""
    out: dict[tuple, list[Trial]] = defaultdict(list)
    for row in search_table.read_table(path):
        per_epoch = tuple(float(row[f"e{i}_val_robust_acc"]) for i in range(1, EPOCHS + 1)
                          if row.get(f"e{i}_val_robust_acc", "") != "")
        out[_cell_key(row)].append(Trial(size=int(row["params_kept"]) / int(row["params_total"]),
                                         val=float(row["val_robust_acc"]), test=float(row["test_robust_acc"]),
                                         per_epoch=per_epoch, wall_s=float(row["wall_s"])))
    if not out:
        raise SystemExit(f"{path}: no trials (make it with `python -m analysis.experiments.search_table`)")
    return dict(out)


def _cell_key(values: Mapping[str, Any]) -> tuple:
    return tuple(search_table._text(_num(values.get(k, ""))) for k in search_table.LEVELS)


def _num(v: Any) -> Any:
    if isinstance(v, str) and v not in ("",):
        try:
            f = float(v)
        except ValueError:
            return v
        return int(f) if f.is_integer() and "." not in v else f
    return v


def lookup(table: Mapping[tuple, list[Trial]], params: Mapping[str, Any]) -> list[Trial]:
    """The replicates of the cell a sampler's suggestion snaps to."""
    snapped = {k: search_table.snap(k, params.get(k, "")) for k in search_table.LEVELS}
    key = _cell_key(snapped)
    if key not in table:
        raise KeyError(f"the table lacks the cell {snapped} (is it complete?)")
    return table[key]


# ---------------------------------------------------------------------------------------------------
# Arms.


@dataclass(frozen=True)
class Arm:
    name: str
    sampler: Callable[[int], Any]
    mf: bool = False
    stratify: bool = False  # keep_fraction from a shifted low-discrepancy log grid, the rest by the sampler
    note: str = ""
    max_seeds: int = 0  # fewer seeds / trials for an arm whose sampler is slow (0: the run's)
    n_max: int = 0


def _tpe(seed: int) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)


def arms() -> dict[str, Arm]:
    import optuna

    s = optuna.samplers
    out = [
        Arm("random", lambda seed: s.RandomSampler(seed=seed), note="Optuna's RandomSampler"),
        Arm("tpe", _tpe, note="TPE, multivariate, group=True, constant liar"),
        Arm("tpe_plain", lambda seed: s.TPESampler(seed=seed), note="TPE with Optuna's defaults"),
        Arm("nsga2_p4", lambda seed: s.NSGAIISampler(seed=seed, population_size=4), note="NSGA-II, population 4"),
        Arm("nsga2_p8", lambda seed: s.NSGAIISampler(seed=seed, population_size=8), note="NSGA-II, population 8"),
        Arm("nsga2_p16", lambda seed: s.NSGAIISampler(seed=seed, population_size=16),
            note="NSGA-II, population 16"),
        Arm("gp", lambda seed: s.GPSampler(seed=seed, warn_independent_sampling=False),
            note="GPSampler (multi-objective: LogEHVI); 5 seeds, 32 trials: ~80 s of CPU per replay", max_seeds=5,
            n_max=32),
        Arm("stratified_tpe", _tpe, stratify=True, note="keep fraction stratified on a log scale, TPE for the rest"),
        Arm("random+mf", lambda seed: s.RandomSampler(seed=seed), mf=True, note="random with rung stopping"),
        Arm("tpe+mf", _tpe, mf=True, note="tpe with rung stopping"),
    ]
    return {a.name: a for a in out}


@functools.lru_cache(maxsize=1)
def _keep_param() -> Any:
    from study.search.space import load_space

    return next(p for p in load_space(search_table.SPACE).params if p.key == "prune.keep_fraction")


def stratum(i: int, shift: float) -> float:
    """keep_fraction of the i-th trial as `study.stratify` draws it (study.search.stratify)."""
    from study.search.stratify import stratified_value

    return stratified_value(_keep_param(), i, shift)


# ---------------------------------------------------------------------------------------------------
# The replay.


@dataclass
class Trace:
    """What one replay saw, in the order trials finished."""
    finished: list[tuple[int, bool, float, Trial]] = field(default_factory=list)  # (epochs, complete, t, trial)


def replay(arm: Arm, seed: int, concurrency: int, table: Mapping[tuple, list[Trial]], n_max: int = N_MAX,
           rule: Any = None) -> Trace:
    import optuna
    from optuna.trial import TrialState

    from study.search.rungs import RungRule
    from study.search.space import load_space

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = load_space(search_table.SPACE)
    rule = rule or RungRule.default()
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=arm.sampler(seed))
    rng = random.Random(10_007 * seed + concurrency)
    from study.search.stratify import shift_of

    shift = shift_of(seed)
    events: list[tuple[float, int, int]] = []  # (time, tiebreak, trial number)
    running: dict[int, tuple[Any, Trial, int]] = {}  # number -> (optuna trial, table trial, epochs done)
    completed: list[Trial] = []
    trace = Trace()
    asked = 0

    def start(now: float) -> None:
        nonlocal asked
        if arm.stratify:
            study.enqueue_trial({"prune.keep_fraction": stratum(asked, shift)}, skip_if_exists=False)
        t = study.ask()
        params = space.suggest(t)
        pick = rng.choice(lookup(table, params))
        running[t.number] = (t, pick, 0)
        heapq.heappush(events, (now + pick.wall_s / EPOCHS, asked, t.number))
        asked += 1

    for _ in range(min(concurrency, n_max)):
        start(0.0)
    while events:
        now, _, number = heapq.heappop(events)
        t, pick, done = running[number]
        done += 1
        if done == EPOCHS:
            study.tell(t, [pick.size, pick.val])
            completed.append(pick)
            trace.finished.append((done, True, now, pick))
        elif arm.mf and rule.stops(done, pick.size, pick.per_epoch[done - 1],
                                   [(c.size, c.per_epoch[done - 1]) for c in completed]):
            study.tell(t, state=TrialState.PRUNED)
            trace.finished.append((done, False, now, pick))
        else:
            running[number] = (t, pick, done)
            heapq.heappush(events, (now + pick.wall_s / EPOCHS, number, number))
            continue
        del running[number]
        if asked < n_max:
            start(now)
    return trace


def hypervolumes(trials: Sequence[Trial]) -> tuple[float, float]:
    """(validation hypervolume, test hypervolume of the validation front) of COMPLETE trials."""
    if not trials:
        return 0.0, 0.0
    val = np.array([(t.size, t.val) for t in trials])
    front = pareto.non_dominated(val, MODES)
    test = np.array([(t.size, t.test) for t, keep in zip(trials, front) if keep])
    return pareto.hypervolume(val, MODES, REF), pareto.hypervolume(test, MODES, REF)


def rows_of(arm: str, seed: int, concurrency: int, trace: Trace, step: int = STEP) -> list[dict[str, Any]]:
    rows, epochs, pruned, done = [], 0, 0, []
    for i, (ep, complete, _, trial) in enumerate(trace.finished, start=1):
        epochs += ep
        pruned += not complete
        if complete:
            done.append(trial)
        if i % step == 0 or i == len(trace.finished):
            val, test = hypervolumes(done)
            rows.append({"arm": arm, "seed": seed, "concurrency": concurrency, "n_trials": i,
                         "epochs_used": epochs, "n_pruned": pruned, "val_hypervolume": round(val, 5),
                         "test_hypervolume": round(test, 5)})
    return rows


def hv_at_epochs(trace: Trace, budget: int) -> float:
    """Validation hypervolume of the trials finished within `budget` epochs (equal compute)."""
    done, epochs = [], 0
    for ep, complete, _, trial in trace.finished:
        if epochs + ep > budget:
            break
        epochs += ep
        if complete:
            done.append(trial)
    return hypervolumes(done)[0]


# ---------------------------------------------------------------------------------------------------
# Statistics and the page.


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    n = len(values)
    m = float(np.mean(values))
    if n < 2:
        return m, float("nan")
    from scipy import stats

    return m, float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def diff_ci(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of a - b over seeds and its 95% t-interval, paired by seed: the arms' replays of one seed share
    their random numbers (the same replicate draws in the same order, the same first random trials), so the
    per-seed difference is what varies."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    m = float(d.mean())
    if len(d) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return m, m - h, m + h


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
                  f"benchmark. The end-to-end check {'agrees' if agree else 'does NOT agree'} with the benchmark."]
    return lines + [""]


def write_page(rows: Sequence[Mapping[str, Any]], traces: Mapping[tuple, Trace], arm_list: Sequence[Arm],
               default: str, n_seeds: int, command: str, wall_s: float, started: datetime,
               e2e: Sequence[Mapping[str, Any]] = ()) -> Path:
    s = summarize(rows, traces, default, n_seeds)
    by = s["by"]
    lines = [common.stamp(command, range(n_seeds), wall_s, started) + ".", "",
             f"Table: docs/results/search_table.csv ({sum(len(v) for v in load_table().values())} real trials of "
             "the quickstart space at snapped levels, 2 trial seeds per cell; `python -m "
             "analysis.experiments.search_table`). Replays: Optuna ask/tell with the study's own search space, "
             f"{n_seeds} seeds per arm, concurrency {' and '.join(map(str, CONCURRENCY))}. Hypervolume of "
             "(kept fraction: min, validation PGD-10 robust accuracy: max) against (1, 0); test hypervolume: the "
             "validation front at its test figures (PGD-10, whole test split).", "",
             f"The arm named `default` is `{default}`, what `study.sampler` defaults to and the shipped spaces use.", ""]
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

STUDY_SAMPLERS = {  # arm -> (study.sampler, study.sampler_options) of a study that runs it
    "random": ("random", {}),
    "tpe": ("tpe", {"multivariate": True, "group": True, "constant_liar": True}),
    "tpe_plain": ("tpe", {}),
    "nsga2_p4": ("nsga2", {"population_size": 4}),
    "nsga2_p8": ("nsga2", {"population_size": 8}),
    "nsga2_p16": ("nsga2", {"population_size": 16}),
    "gp": ("gp", {}),
}


def arm_space(arm: str, folder: Path) -> Path:
    """The quickstart space with the arm's sampler (a --set merges into sampler_options, never replaces it)."""
    import yaml

    raw = yaml.safe_load(search_table.SPACE.read_text())
    raw["study"]["sampler"], raw["study"]["sampler_options"] = STUDY_SAMPLERS[arm]
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


DEFAULT_ARM = "tpe"  # what `study.sampler` defaults to (study.search.space): the winner of this benchmark


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
            common.log_line(f"{label:16s} {n_seeds} seeds x {len(concurrency)} concurrency levels: "
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
    rows, traces = run(names, args.seeds, CONCURRENCY, N_MAX, args.out or OUT)
    e2e = [] if args.no_end_to_end else end_to_end([DEFAULT_ARM, "random"])
    if e2e:
        common.write_csv(E2E_OUT, e2e)
    page = write_page(rows, traces, [arms()[n] for n in names], DEFAULT_ARM, args.seeds,
                      common.command_line(MODULE, argv), time.time() - t0, started, e2e)
    print(f"wrote {args.out or OUT} and {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
