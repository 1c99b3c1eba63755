"""The search benchmark's machinery (analysis.experiments.search_benchmark runs it and writes the page): the
table of real trials as replicates per cell, the sampler arms, the ask/tell replay at a concurrency, hypervolumes
and the seed statistics. Tune-free and Ray-free: one replay takes seconds (the GP arm: ~20 s at 32 trials)."""
from __future__ import annotations

import functools
import heapq
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from analysis import pareto
from analysis.experiments import search_table

MODES = ("min", "max")
REF = (1.0, 0.0)
N_MAX = 64
STEP = 4
EPOCHS = search_table.EPOCHS["prune_stage.epochs"] + search_table.EPOCHS["finetune.epochs"]


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
            note="GPSampler (multi-objective: LogEHVI); 5 seeds, 32 trials: ~20 s per replay", max_seeds=5,
            n_max=32),
        Arm("stratified_tpe", _tpe, stratify=True, note="keep fraction stratified on a log scale, TPE for the rest"),
        Arm("stratified_tpe_plain", lambda seed: s.TPESampler(seed=seed), stratify=True,
            note="keep fraction stratified on a log scale, TPE with Optuna's defaults for the rest"),
        Arm("random+mf", lambda seed: s.RandomSampler(seed=seed), mf=True, note="random with rung stopping"),
        Arm("stratified_tpe_plain+mf", lambda seed: s.TPESampler(seed=seed), stratify=True, mf=True,
            note="stratified_tpe_plain with rung stopping"),
    ]
    return {a.name: a for a in out}


@functools.lru_cache(maxsize=1)
def _keep_param() -> Any:
    from study.search.optimize.space import load_space

    return next(p for p in load_space(search_table.SPACE).params if p.key == "prune.keep_fraction")


def stratum(i: int, shift: float) -> float:
    """keep_fraction of the i-th trial as `study.stratify` draws it (study.search.optimize.stratify)."""
    from study.search.optimize.stratify import stratified_value

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

    from study.search.optimize.rungs import RungRule
    from study.search.optimize.space import load_space

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = load_space(search_table.SPACE)
    rule = rule or RungRule.default()
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=arm.sampler(seed))
    rng = random.Random(10_007 * seed + concurrency)
    from study.search.optimize.stratify import shift_of

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
