"""Benchmark 3: overhead of the study machinery (Ray Tune + Optuna + MLflow) over a plain parallel script.

    python -m bench.study_overhead [--trials 8] [--space search_spaces/quickstart.yaml] [--short] [--repeats 3]
                                   [--no-quickstart]

1. The study: `study.search.study.run_study` of N trials with the space's own concurrency and CPUs per trial
   (the quickstart: 2 trials at a time, 1 CPU each), as `study run --fresh` calls it: Ray's start-up and
   shutdown included, without the front's test-split evaluation (study.confirm, study.baselines: work, not
   machinery): the pretraining, Tune trials, Optuna asks/tells, MLflow runs, resume checkpoints, the
   Pareto front and the report.
2. The plain script doing the same work: `study.trial.pipeline.pretrain` in this process, then `run_trial` for
   each config the study ran (read back from its Optuna storage, in trial order) on a pool of as many worker
   processes as the study ran trials at once, with the same torch threads. The pool starts with the clock,
   while this process pretrains: its processes import torch and the pipeline as the study's Ray workers do
   (that is what any parallel script pays; it needs no Ray).
3. Pairs 1-2 are repeated (3 times by default) and the pair with the median overhead is shown.
4. The whole quickstart (`study run --fresh search_spaces/quickstart.yaml` in a new runs folder, what
   `make quickstart` runs), timed once: the overhead is also shown as a share of its wall.

overhead = study wall - plain wall. The study's wall is split at three instants (the dense model written and
the last trial's end, both measured in the workers; run_study's return), so the phases sum to it; the per-trial lines below them are
measured inside the Tune workers (each trial's start, end and the seconds spent in its per-epoch reports)
and the driver (Tune's experiment snapshots, the MLflow callback and the Optuna searcher, wrapped with timers).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

from bench import common

DEFAULT_SPACE = QUICKSTART = "search_spaces/quickstart.yaml"
DEFAULT_TRIALS = 8  # the quickstart's
DEFAULT_REPEATS = 3  # study/plain pairs: one pair's overhead varies by seconds on a shared 2-core machine

# Short trials for a quick run (the overhead per trial barely depends on the trial's length).
SHORT_TRIALS = {"trial.pretrain.epochs": 2, "trial.prune_stage.epochs": 1, "trial.finetune.epochs": 1}


# ---------------------------------------------------------------------------------------------------
# Timing inside the Ray workers (these functions travel to them by value) and in the driver.


def timed_trial(cfg, *, on_epoch=None, resume_state=None, log: str):
    """The pipeline's run_trial in a Tune worker: its wall-clock start and end and the seconds spent in
    `on_epoch` (the trainable's per-epoch report + checkpoint), appended to `log` as one JSON line."""
    from study.trial.pipeline import run_trial

    start, spent = time.time(), {"report_s": 0.0, "epochs": 0}

    def hook(report):
        t0 = time.perf_counter()
        on_epoch(report)
        spent["report_s"] += time.perf_counter() - t0
        spent["epochs"] += 1

    result = run_trial(cfg, on_epoch=hook if on_epoch is not None else None, resume_state=resume_state)
    with open(log, "a") as f:
        f.write(json.dumps({"kind": "trial", "name": cfg.name, "start": start, "end": time.time(),
                            "pid": os.getpid(), **spent}) + "\n")
    return result


def timed_pretrain(cfg, *, log: str):
    """The pipeline's pretrain where the study runs it (a process spawned by the driver, or a Ray task), its end appended to `log`."""
    from study.trial.pipeline import pretrain

    start = time.time()
    path = pretrain(cfg)
    with open(log, "a") as f:
        f.write(json.dumps({"kind": "pretrain", "start": start, "end": time.time(), "pid": os.getpid()}) + "\n")
    return path


class DriverTimers:
    """Wraps methods of classes in this process with wall-clock timers (seconds and calls per name)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.marks: dict[str, list[tuple[float, float]]] = {}
        self._undo: list[tuple[type, str, Any]] = []

    def wrap(self, cls: type, method: str, name: str) -> None:
        original = cls.__dict__.get(method)
        if original is None:
            return
        timers = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0 = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                t1 = time.time()
                timers.seconds[name] = timers.seconds.get(name, 0.0) + (t1 - t0)
                timers.calls[name] = timers.calls.get(name, 0) + 1
                timers.marks.setdefault(name, []).append((t0, t1))

        setattr(cls, method, timed)
        self._undo.append((cls, method, original))

    def restore(self) -> None:
        for cls, method, original in reversed(self._undo):
            setattr(cls, method, original)
        self._undo.clear()


def _wrap_driver(timers: DriverTimers) -> None:
    from ray import tune
    from ray.tune.execution.tune_controller import TuneController

    from study.search.optimize.searcher import StudySearch
    from study.search.recording import trial_callback
    from study.search.study import Study

    timers.wrap(Study, "finish", "finish")
    timers.wrap(tune.Tuner, "fit", "fit")
    timers.wrap(TuneController, "checkpoint", "snapshot")  # called every controller step; writes when due
    for m in ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error"):
        timers.wrap(trial_callback.MlflowTrialCallback, m, "mlflow")
    for m in ("suggest", "on_trial_complete"):
        timers.wrap(StudySearch, m, "optuna")


# ---------------------------------------------------------------------------------------------------
# The measurement


def _space(space_file: str, n_trials: int, overrides: dict[str, Any], name: str) -> Any:
    from study.search.optimize.space import load_space

    return load_space(common.REPO / space_file, {"study.name": name, "study.n_trials": n_trials, **overrides})


def study_run(space_file: str, n_trials: int, folder: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    from study.search.folder import layout
    from study.search.optimize import optuna_search
    from study.search.study import run_study

    space = _space(space_file, n_trials, overrides, "bench_overhead")
    folder.mkdir(parents=True, exist_ok=True)
    events = folder / "events.jsonl"
    timers = DriverTimers()
    _wrap_driver(timers)
    out = io.StringIO()
    import ray

    t0 = time.time()
    try:
        with contextlib.redirect_stdout(out):
            outcome = run_study(space, runs_dir=folder / "runs", fresh=True, final_eval=False,
                                num_cpus=os.cpu_count() or 1,
                                run_trial=functools.partial(timed_trial, log=str(events)),
                                pretrain=functools.partial(timed_pretrain, log=str(events)))
        returned = time.time()
        ray.shutdown()  # what `study run` does at its exit
    finally:
        timers.restore()
    t1 = time.time()
    paths = layout.study_paths(folder / "runs", space.study.name)
    manifest = layout.Manifest.load(paths.manifest)
    study = optuna_search.load_optuna_study(manifest.storage, space.study.name)
    configs = [{**t.params, "number": t.number} for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
               if t.state.name == "COMPLETE"]
    lines = [json.loads(line) for line in events.read_text().splitlines() if line.strip()] if events.is_file() else []
    return {"study_s": t1 - t0, "complete": outcome.complete, "failed": outcome.failed, "configs": configs,
            "start": t0, "end": t1, "returned": returned, "fit": timers.marks.get("fit", [(t0, t0)])[0],
            "trials": sorted((e for e in lines if e["kind"] == "trial"), key=lambda e: e["start"]),
            "pretrain": next((e for e in lines if e["kind"] == "pretrain"), None),
            "driver_s": timers.seconds, "driver_calls": timers.calls,
            "concurrency": space.study.max_concurrent, "cpus_per_trial": space.study.cpus_per_trial}


def _pool_init(threads: int) -> None:
    import torch

    import study.trial.pipeline  # noqa: F401  (imports paid before the clock, as in a Ray worker)

    torch.set_num_threads(threads)


def _pool_warm(_: int) -> int:
    time.sleep(0.2)  # long enough that every pool process takes one
    return os.getpid()


def _pool_trial(space_file: str, overrides: dict[str, Any], fixed: dict[str, Any], params: dict[str, Any]) -> float:
    from study.keys import NUMBER_KEY
    from study.search.running.trainable import build_config
    from study.trial.pipeline import run_trial

    space = _space(space_file, 1, overrides, "bench_plain")
    cfg = build_config(space.trial, fixed, {**{k: v for k, v in params.items() if k != "number"},
                                            NUMBER_KEY: params["number"]})
    t0 = time.perf_counter()
    run_trial(cfg)
    return time.perf_counter() - t0


def plain_calls(space_file: str, overrides: dict[str, Any], configs: list[dict[str, Any]], workers: int,
                threads: int, folder: Path) -> dict[str, Any]:
    """A plain parallel script: when the clock starts, a pool of `workers` processes is started (each imports
    torch and the pipeline, as a Ray worker does) while this process pretrains; then run_trial per config."""
    import multiprocessing

    import torch

    from study.trial.pipeline import pretrain

    space = _space(space_file, 1, overrides, "bench_plain")
    fixed = {"name": "bench_plain", "cache_dir": str(folder / "pretrained"), "output_dir": str(folder / "trials")}
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_pool_init,
                             initargs=(threads,)) as pool:
        warm = [pool.submit(_pool_warm, i) for i in range(workers)]  # starts the processes now
        pretrain(space.trial_config({}, fixed))
        pretrain_s = time.perf_counter() - t0
        for f in warm:
            f.result()
        pool_s = time.perf_counter() - t0
        trial_s = list(pool.map(functools.partial(_pool_trial, space_file, overrides, fixed), configs))
        plain_s = time.perf_counter() - t0
    return {"pretrain_s": pretrain_s, "pool_ready_s": pool_s, "trial_s": trial_s, "plain_s": plain_s}


def measure(space_file: str, n_trials: int, workdir: Path, log: Callable[[str], None] = print,
            overrides: dict[str, Any] | None = None, repeats: int = DEFAULT_REPEATS) -> dict[str, Any]:
    """`repeats` pairs (study, then the plain script); the pair with the median overhead is the result, every
    pair's totals ride along (`pairs`)."""
    import ray

    overrides = dict(overrides or {})
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # timed_trial/timed_pretrain run in the workers
    pairs = []
    for i in range(repeats):
        s = study_run(space_file, n_trials, workdir / f"study{i}", overrides)
        log(f"  [{i + 1}/{repeats}] study of {n_trials} trials ({s['concurrency']} at a time, {s['cpus_per_trial']:g} "
            f"CPU each): {s['study_s']:.1f}s ({s['complete']} complete, {s['failed']} failed)")
        p = plain_calls(space_file, overrides, s["configs"], s["concurrency"], max(1, int(s["cpus_per_trial"])),
                        workdir / f"plain{i}")
        log(f"  [{i + 1}/{repeats}] plain script: pretrain {p['pretrain_s']:.1f}s, then {len(p['trial_s'])} trials on "
            f"{s['concurrency']} processes: {p['plain_s']:.1f}s in all")
        pairs.append({**{k: v for k, v in s.items() if k != "configs"}, **p})
    ranked = sorted(pairs, key=lambda r: r["study_s"] - r["plain_s"])
    chosen = ranked[len(ranked) // 2]
    return {**chosen, "pairs": [{"study_s": r["study_s"], "plain_s": r["plain_s"]} for r in pairs],
            "n_trials": n_trials, "space": space_file, "overrides": overrides}


def quickstart_wall(workdir: Path, log: Callable[[str], None] = print) -> float:
    """`study run --fresh search_spaces/quickstart.yaml` (what `make quickstart` runs) in a new runs folder:
    the whole command's wall, pretraining, the test-split confirmation and the baselines included."""
    import subprocess

    runs = workdir / "quickstart_runs"
    cmd = [sys.executable, "-m", "study.cli", "run", "--fresh", str(common.REPO / QUICKSTART), "--runs-dir", str(runs)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"the quickstart failed (rc {done.returncode}): {done.stderr[-2000:]}")
    log(f"  the quickstart (study run --fresh {QUICKSTART}): {wall:.1f}s")
    return wall


# ---------------------------------------------------------------------------------------------------
# The table


def _s(x: float) -> str:
    return f"{x:.2f}" if abs(x) < 1 else f"{x:.1f}"


def phases(r: dict[str, Any]) -> dict[str, float]:
    """The study's wall split where the plain script's is (dense model written, last trial ended), and where
    run_study returned (Ray's shutdown after it)."""
    start, end = r["start"], r["end"]
    returned = r.get("returned", end)
    dense = r["pretrain"]["end"] if r.get("pretrain") else start
    last = max((t["end"] for t in r["trials"]), default=dense)
    return {"pretrain": dense - start, "trials": last - dense, "after": returned - last, "shutdown": end - returned}


def per_trial(r: dict[str, Any]) -> dict[str, float]:
    trials, n = r["trials"], max(len(r["trials"]), 1)
    dense = r["pretrain"]["end"] if r.get("pretrain") else r["start"]
    by_pid: dict[int, list[dict]] = {}
    for t in trials:
        by_pid.setdefault(t["pid"], []).append(t)
    gaps = [b["start"] - a["end"] for ts in by_pid.values() for a, b in zip(ts, ts[1:])]
    first = [ts[0]["start"] - max(dense, r["fit"][0]) for ts in by_pid.values()]
    return {"worker_trial": sum(t["end"] - t["start"] for t in trials) / n,
            "plain_trial": sum(r["trial_s"]) / max(len(r["trial_s"]), 1),
            "report": sum(t["report_s"] for t in trials) / n,
            "gap": sum(gaps) / len(gaps) if gaps else 0.0,
            "first": sum(first) / len(first) if first else 0.0, "workers": len(by_pid)}


def table(r: dict[str, Any], machine: common.Machine) -> common.Table:
    n = max(len(r["trial_s"]), 1)
    overhead = r["study_s"] - r["plain_s"]
    ph, pt = phases(r), per_trial(r)
    plain_trials = r["plain_s"] - r["pretrain_s"]
    quickstart = r.get("quickstart_s")
    headers = ["", "study s", "plain script s", "overhead s", "overhead s / trial", "% of study wall"]
    if quickstart:
        headers.append("% of the quickstart's wall")

    def row(what: str, study: float, plain: float | None) -> list[str]:
        o = study - (plain or 0.0)
        cells = [what, _s(study), "" if plain is None else _s(plain), _s(o), _s(o / n), f"{100 * o / r['study_s']:.1f}%"]
        return cells + [f"{100 * o / quickstart:.1f}%"] if quickstart else cells

    rows = [row(f"**total**: {r['complete']} of {r['n_trials']} trials", r["study_s"], r["plain_s"]),
            row("start -> dense model written (Ray start-up, set-up, pretraining, workers start)", ph["pretrain"],
                r["pretrain_s"]),
            row(f"dense model -> last trial ends (trials, {r['concurrency']} at a time)", ph["trials"], plain_trials),
            row("last trial -> study returns (Pareto front, report, MLflow)", ph["after"], 0.0),
            row("study returns -> Ray shut down", ph["shutdown"], 0.0)]
    detail = [
        ("mean trial in a Tune worker vs the plain script's", f"{pt['worker_trial']:.2f} vs {pt['plain_trial']:.2f}"),
        ("of which per-epoch reports (+ checkpoints when due; in the worker)", f"{pt['report']:.2f}"),
        (f"first trial's start after the dense model, per worker ({pt['workers']} workers: Ray worker start, imports)",
         f"{pt['first']:.2f}"),
        ("gap between a worker's consecutive trials (Tune, Optuna ask/tell, MLflow runs)", f"{pt['gap']:.2f}"),
    ] + [(f"driver, whole study: {what}", f"{r['driver_s'].get(key, 0.0):.2f} ({r['driver_calls'].get(key, 0)} calls)")
         for key, what in (("snapshot", "Tune experiment snapshots"), ("mlflow", "MLflow callback"),
                           ("optuna", "Optuna searcher"))]
    rows += [[what, value] + [""] * (len(headers) - 2) for what, value in detail]
    over = dict(r.get("overrides") or {})
    notes = [
        f"`{r['space']}` with study.n_trials={r['n_trials']}" + "".join(f", {k}={v}" for k, v in over.items())
        + f" ({r['concurrency']} trials at a time, {r['cpus_per_trial']:g} CPU each), no final evaluation: the study = "
        "study.search.study.run_study (pretraining: in a process spawned by the driver on a one-machine CPU study, study.search.running.dense; "
        "Tune + Optuna, MLflow sqlite tracking, resume checkpoints by time (study.checkpoint_every_s: 60 s, so none in "
        "these trials), Pareto front + report), Ray's start-up and "
        "shutdown included; the plain script = study.trial.pipeline.pretrain "
        f"in one process while a pool of {r['concurrency']} worker processes starts (spawn + imports: ready after "
        f"{r.get('pool_ready_s', 0):.1f} s), then run_trial per trial config on the pool, same torch threads.",
        "The four phases sum to the total (split at the dense model's write and the last trial's end, both measured "
        "in the workers, and where run_study returned); the lines below them are per trial unless they say otherwise.",
    ]
    pairs = r.get("pairs") or []
    if len(pairs) > 1:
        notes.append(f"{len(pairs)} study/plain pairs, run one after the other; the table is the pair with the median "
                     "overhead. Every pair (study s / plain s = overhead s): "
                     + "; ".join(f"{p['study_s']:.1f} / {p['plain_s']:.1f} = {p['study_s'] - p['plain_s']:.1f}"
                                 for p in pairs) + ".")
    if quickstart:
        notes.append(f"The quickstart's wall: `study run --fresh {QUICKSTART}` (what `make quickstart` runs: pretraining, "
                     f"the search, the front's test-split confirmation with AutoAttack and the LWM baselines) in a new "
                     f"runs folder, measured in the same run: {quickstart:.1f} s.")
    notes.append("Targets: overhead < 1 s per trial and < 5% of the quickstart's wall.")
    return common.Table("study_overhead", f"3. Overhead of the study machinery ({machine.device})", headers, rows, notes)


def run(trials: int, space: str = DEFAULT_SPACE, log: Callable[[str], None] = print, short: bool = False,
        repeats: int = DEFAULT_REPEATS, quickstart: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_study_") as d:
        r = measure(space, trials, Path(d), log, SHORT_TRIALS if short else None, repeats)
        if quickstart:
            r["quickstart_s"] = quickstart_wall(Path(d), log)
        return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.study_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS)
    p.add_argument("--space", default=DEFAULT_SPACE)
    p.add_argument("--short", action="store_true", help=f"shrink the trials: {SHORT_TRIALS}")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="study/plain pairs (the median is shown)")
    p.add_argument("--no-quickstart", action="store_true", help="skip timing the whole quickstart")
    args = p.parse_args(argv)
    machine = common.describe_machine(common.resolve_device("auto"))
    r = run(args.trials, args.space, short=args.short, repeats=args.repeats, quickstart=not args.no_quickstart)
    print(table(r, machine).markdown())


if __name__ == "__main__":
    main()
