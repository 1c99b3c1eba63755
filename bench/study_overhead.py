"""Benchmark 3: overhead of the study machinery (Ray Tune + Optuna + MLflow) over plain function calls.

    python -m bench.study_overhead [--trials 3] [--space search_spaces/quickstart.yaml]

1. Ray start-up: `study.search.ray_cluster.start_ray` timed on its own (reported separately, paid once per study).
2. The study: `study.search.runner.run_study` of N trials, one at a time (max_concurrent 1), with Ray already up:
   pretraining as a Ray task, Tune trials, Optuna asks/tells, MLflow runs, checkpoints, the Pareto report.
3. The same work as plain calls in this process: `study.trial.pipeline.pretrain` once, then `run_trial` for
   each config the study ran (read back from its Optuna storage), same torch thread count.
overhead = study wall - plain wall; per trial it is a constant, so the table also projects the fraction
for trials of a minute (the target: < 5% for trials of a minute or more).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench import common

DEFAULT_SPACE = "search_spaces/quickstart.yaml"


# Short trials for a CPU run of a few minutes (the overhead per trial does not depend on the trial's length).
SHORT_TRIALS = {"trial.pretrain.epochs": 2, "trial.prune_stage.epochs": 1, "trial.finetune.epochs": 1}


def measure(space_file: str, n_trials: int, threads: int, workdir: Path, log: Callable[[str], None] = print,
            trial_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from study.search import layout, optuna_search, ray_cluster, runner
    from study.trial.pipeline import pretrain, run_trial
    from study.search.space import load_space
    from study.keys import NUMBER_KEY
    from study.search.trainable import build_config

    overrides = {"study.name": "bench_overhead", "study.n_trials": n_trials, "study.max_concurrent": 1,
                 "study.cpus_per_trial": threads, "study.gpus_per_trial": "auto", **(trial_overrides or {})}
    space = load_space(common.REPO / space_file, overrides)
    runs = workdir / "runs"

    t0 = time.perf_counter()
    ray_cluster.start_ray(num_cpus=max(threads, os.cpu_count() or 1))
    ray_start = time.perf_counter() - t0
    log(f"  Ray start-up {ray_start:.1f}s")

    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        outcome = runner.run_study(space, runs_dir=runs, fresh=True)
    study_s = time.perf_counter() - t0
    log(f"  study of {n_trials} trials: {study_s:.1f}s ({outcome.complete} complete, {outcome.failed} failed)")

    import ray

    t0 = time.perf_counter()
    ray.shutdown()
    ray_stop = time.perf_counter() - t0

    paths = layout.study_paths(runs, space.study.name)
    manifest = layout.Manifest.load(paths.manifest)
    study = optuna_search.load_optuna_study(manifest.storage, space.study.name)
    trials = sorted((t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"),
                    key=lambda t: t.number)
    fixed = {"name": "bench_plain", "cache_dir": str(workdir / "plain" / "pretrained"),
             "output_dir": str(workdir / "plain" / "trials")}
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pretrain(space.trial_config({}, fixed))
    pretrain_s = time.perf_counter() - t0
    trial_s = []
    for t in trials:
        cfg = build_config(space.trial, fixed, {**t.params, NUMBER_KEY: t.number})
        t1 = time.perf_counter()
        run_trial(cfg)
        trial_s.append(time.perf_counter() - t1)
    plain_s = time.perf_counter() - t0
    log(f"  plain calls: pretrain {pretrain_s:.1f}s + {len(trial_s)} trials {sum(trial_s):.1f}s = {plain_s:.1f}s")
    return {"ray_start_s": ray_start, "ray_stop_s": ray_stop, "study_s": study_s, "plain_s": plain_s,
            "pretrain_s": pretrain_s, "trial_s": trial_s, "n_trials": n_trials, "complete": outcome.complete,
            "failed": outcome.failed, "threads": threads, "space": space_file, "overrides": trial_overrides or {}}


def table(r: dict[str, Any], machine: common.Machine) -> common.Table:
    n = max(len(r["trial_s"]), 1)
    overhead = r["study_s"] - r["plain_s"]
    per_trial = overhead / n
    mean_trial = sum(r["trial_s"]) / n
    headers = ["trials", "mean trial (plain) s", "plain calls s", "study s (Ray up)", "overhead s",
               "overhead % of study", "overhead s / trial", "projected % for 60 s trials", "Ray start-up s"]
    rows = [[f"{r['complete']} of {r['n_trials']}", f"{mean_trial:.1f}", f"{r['plain_s']:.1f}", f"{r['study_s']:.1f}",
             f"{overhead:.1f}", f"{100 * overhead / r['study_s']:.1f}%", f"{per_trial:.1f}",
             f"{100 * per_trial / (60 + per_trial):.1f}%", f"{r['ray_start_s']:.1f} (+{r['ray_stop_s']:.1f} shutdown)"]]
    notes = [
        f"`{r['space']}` with study.n_trials={r['n_trials']}, max_concurrent=1, cpus_per_trial={r['threads']}"
        + "".join(f", {k}={v}" for k, v in r.get("overrides", {}).items()) + ": "
        "the study = study.search.runner.run_study (pretraining Ray task, Tune + OptunaSearch, MLflow sqlite tracking, "
        "per-epoch checkpoints, Pareto report) with Ray already started; plain = study.trial.pipeline.pretrain + run_trial "
        "per trial config in one process, same torch threads.",
        "The overhead per trial is roughly constant (Ray worker start, imports, checkpoint and MLflow writes), "
        "so its share falls with trial length; the projection is overhead per trial / (60 s + it). "
        "Target: < 5% for trials of a minute or more.",
    ]
    return common.Table("study_overhead", f"3. Overhead of the study machinery ({machine.device})", headers, rows, notes)


def run(trials: int, threads: int, space: str = DEFAULT_SPACE, log: Callable[[str], None] = print,
        short: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_study_") as d:
        return measure(space, trials, threads, Path(d), log, SHORT_TRIALS if short else None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.study_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPUs per trial (default: all cores)")
    p.add_argument("--space", default=DEFAULT_SPACE)
    p.add_argument("--short", action="store_true", help=f"shrink the trials: {SHORT_TRIALS}")
    args = p.parse_args(argv)
    threads = args.threads or (os.cpu_count() or 1)
    machine = common.describe_machine(common.resolve_device("auto"))
    print(table(run(args.trials, threads, args.space, short=args.short), machine).markdown())


if __name__ == "__main__":
    main()
