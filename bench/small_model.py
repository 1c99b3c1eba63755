"""Benchmark: a small model's training epoch on one GPU, one trial process alone and several sharing the GPU.

    python -m bench.small_model [--device cuda] [--procs 1,4] [--batch 256] [--data-root DIR]

Fashion-MNIST (all 54,000 training images after the 10% validation split), small_cnn, HYDRA's prune stage
(scores train under PGD-10 at eps 0.1, masks refreshed after every optimizer step) through the project's
own loop (study.trial.engine.train_epoch with the stage's step: on CUDA a captured graph). Per process: one
untimed epoch (CUDA's lazy initialisation, the graph's capture), then the timed epochs; evaluation is not part
of an epoch here. With n processes, each waits at a barrier after its untimed epoch, so the timed epochs
overlap; the aggregate images/s is the sum of the processes' rates (what `gpus_per_trial: 1/n` gives a study).
Plain processes, not Ray: what Ray adds (scheduling, no GPU partitioning) does not change the kernels' share.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench import common

KEEP_FRACTION, EPS, STEPS = 0.01, 0.1, 10  # the GPU check's trial: HYDRA 99% per layer, PGD-10 at eps 0.1


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from bench.throughput import set_trainable
    from study.trial import pruning
    from study.trial.attacks import AttackStrength
    from study.trial.config import DataConfig
    from study.trial.data import batches, load_dataset
    from study.trial.engine import resolve_runtime, train_epoch
    from study.trial.graphed import make_step
    from study.trial.losses import make_loss
    from study.trial.models import create_model

    t0 = time.perf_counter()
    runtime = resolve_runtime(spec["device"], "auto")
    cfg = DataConfig(name="fashion_mnist", root=spec["data_root"], batch_size=spec["batch"], val_fraction=0.1,
                     train_limit=spec.get("train_limit", 0))
    sp = load_dataset(cfg, runtime.device)
    torch.manual_seed(0)
    model = create_model("small_cnn", sp.info).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    pruning.make_prunable(model)
    pruning.init_scores(model, "ssi")
    pruning.refresh_masks(model, KEEP_FRACTION, "layer")
    pruning.set_mode(model, "scores")
    set_trainable(model, weights=False, scores=True, bn=True)  # HYDRA's prune stage
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss_fn = make_loss("pgd")
    gen = torch.Generator(device=runtime.device).manual_seed(0)
    fast = model
    if spec.get("compile"):
        from study.trial.engine import CompiledStep

        fast = CompiledStep(model)  # as the pipeline compiles (`compile: true`), inside the graph on CUDA
    step_fn = make_step(fast, loss_fn, runtime, gen, cuda_graphs=spec["graphs"])
    strength = AttackStrength(eps=EPS, steps=STEPS, step_size=2.5 / STEPS * EPS)
    refresh = lambda: pruning.refresh_masks(model, KEEP_FRACTION, "layer")  # noqa: E731

    def epoch() -> tuple[float, dict[str, float]]:
        common.sync(runtime.device)
        t = time.perf_counter()
        data = batches(sp.x_train, sp.y_train, spec["batch"], shuffle=True, generator=gen)
        m = train_epoch(fast, data, loss_fn, opt, sched, strength, runtime, gen, refresh, step_fn=step_fn)
        common.sync(runtime.device)
        return time.perf_counter() - t, m

    setup_s = time.perf_counter() - t0
    first_s, _ = epoch()
    if spec.get("barrier"):
        Path(spec["barrier"], f"ready-{os.getpid()}").touch()
        while len(list(Path(spec["barrier"]).glob("ready-*"))) < spec["procs"]:
            time.sleep(0.01)
    times, metrics = [], {}
    for _ in range(spec["epochs"]):
        s, metrics = epoch()
        times.append(s)
    # an evaluation pass, timed apart: the per-epoch validation the pipeline runs (PGD-10 on 512 points)
    from study.trial.evaluation import evaluate

    common.sync(runtime.device)
    t = time.perf_counter()
    evaluate(model, sp.x_val, sp.y_val, eps=EPS, steps=10, step_size=0.25, points=512, seed=0, batch_size=512)
    common.sync(runtime.device)
    eval_s = time.perf_counter() - t
    n = len(sp.y_train)
    return {"images": n, "setup_s": setup_s, "first_epoch_s": first_s, "epoch_s": common.median(times),
            "epoch_times": times, "images_s": n / common.median(times), "eval_s": eval_s,
            "train_loss": metrics.get("train_loss"), "replays": getattr(step_fn, "replays", 0)}


def run_group(spec: dict[str, Any], procs: int, timeout: float = 600) -> dict[str, Any]:
    """`procs` measuring processes at once on the same device; their timed epochs overlap (a barrier)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as barrier:
        child = {**spec, "procs": procs, "barrier": barrier if procs > 1 else ""}
        ps = [subprocess.Popen([sys.executable, "-m", "bench.small_model", "--child", json.dumps(child)], cwd=common.REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(procs)]
        outs = [p.communicate(timeout=timeout)[0] for p in ps]
    results = []
    for p, out in zip(ps, outs):
        line = next((ln for ln in reversed(out.splitlines()) if ln.startswith(common.RESULT_PREFIX)), None)
        if line is None:
            raise RuntimeError(f"bench.small_model child failed (exit {p.returncode}):\n" + "\n".join(out.splitlines()[-20:]))
        results.append(json.loads(line[len(common.RESULT_PREFIX):]))
    return {"procs": procs, "batch": spec["batch"], "graphs": spec["graphs"], "per_process": results,
            "images_s": sum(r["images_s"] for r in results)}


def run(device: str, data_root: str, procs: list[int], batches: list[int], graphs: list[bool], epochs: int = 2,
        log: Callable[[str], None] = print, train_limit: int = 0) -> list[dict[str, Any]]:
    out = []
    for b in batches:
        for g in graphs:
            for n in procs:
                r = run_group({"device": device, "data_root": data_root, "batch": b, "graphs": g, "epochs": epochs,
                               "train_limit": train_limit}, n)
                pp = r["per_process"]
                log(f"  small_cnn fashion_mnist batch {b} {'graph' if g else 'eager'} x{n}: epoch "
                    f"{common.median([x['epoch_s'] for x in pp]):.2f} s per process, {r['images_s']:.0f} img/s in all "
                    f"(first epoch {max(x['first_epoch_s'] for x in pp):.2f} s, eval {pp[0]['eval_s']:.2f} s)")
                out.append(r)
    return out


def table(results: list[dict[str, Any]], machine: common.Machine) -> common.Table:
    alone = {(r["batch"], r["graphs"]): r["images_s"] for r in results if r["procs"] == 1}
    rows = []
    for r in results:
        pp = r["per_process"]
        base = alone.get((r["batch"], r["graphs"]))
        rows.append([r["batch"], "CUDA graph" if r["graphs"] else "eager", r["procs"],
                     f"{common.median([x['epoch_s'] for x in pp]):.2f}", f"{r['images_s']:.0f}",
                     common.ratio(r["images_s"], base) if base and r["procs"] > 1 else "-",
                     f"{max(x['first_epoch_s'] for x in pp):.2f}", f"{pp[0]['eval_s']:.2f}"])
    headers = ["batch", "step", "processes on the GPU", "epoch s (per process)", "img/s (all processes)",
               "vs one process", "first epoch s (warm-up, capture)", "validation s (PGD-10, 512 points)"]
    notes = [f"Fashion-MNIST, 54,000 training images per epoch, small_cnn, HYDRA prune stage (keep {KEEP_FRACTION}, "
             f"per layer), PGD-{STEPS} at eps {EPS}; bf16 + channels_last on CUDA. Timed epochs: the median of each "
             "process's timed epochs after one untimed epoch; with several processes the timed epochs overlap "
             "(a barrier). Targets: one process <= 1.5 s per epoch; four together >= 2x one's images/s."]
    return common.Table("small_model", f"Small model, one GPU shared ({machine.device})", headers, rows, notes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.small_model", description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default="data")
    p.add_argument("--procs", default="1,4")
    p.add_argument("--batch", default="256")
    p.add_argument("--eager", action="store_true", help="also time the eager step")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=0, help="train on this many images (0 = all; a CPU smoke run)")
    args = p.parse_args(argv)
    if args.child:
        common.emit(measure(json.loads(args.child)))
        return
    device = common.resolve_device(args.device)
    machine = common.describe_machine(device)
    results = run(device, args.data_root, [int(n) for n in args.procs.split(",")], [int(b) for b in args.batch.split(",")],
                  [True, False] if args.eager else [True], args.epochs, train_limit=args.train_limit)
    print(table(results, machine).markdown())


if __name__ == "__main__":
    main()
