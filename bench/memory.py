"""Benchmark 4: peak memory per trial (GPU memory allocated on CUDA, the process's peak RSS on CPU).

    python -m bench.memory [--device cpu|cuda] [--archs resnet18,vgg16_bn]

One process per row, so each peak is that row's alone: a PGD-10 training step of this project's loop per
(arch, stage) at the throughput benchmark's batch (a trial's peak is its training step's: each attack
step frees its graph before the next, and evaluation runs without parameter gradients), and one whole
quickstart trial (`study.trial.pipeline.run_trial`, pretraining included). On CPU, RSS includes the Python
process itself; the baseline column is the same process's RSS after its imports.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from typing import Any, Callable

from bench import common
from bench.throughput import Spec

STAGES = ("dense", "prune", "finetune")
QUICKSTART = "search_spaces/quickstart.yaml"
# A quickstart trial shrunk to seconds; memory does not depend on the number of epochs.
QUICK_OVERRIDES = {"trial.pretrain.epochs": 1, "trial.prune_stage.epochs": 1, "trial.finetune.epochs": 1}


def trial_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one whole quickstart trial in this process and report its peak memory."""
    base = common.rss_peak_bytes()
    import torch

    from study.trial.pipeline import run_trial
    from study.search.optimize.space import load_space

    base = max(base, common.rss_peak_bytes())
    device = spec["device"]
    common.reset_peak_memory(device)
    space = load_space(common.REPO / QUICKSTART, QUICK_OVERRIDES)
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as d:
        cfg = space.trial_config({}, {"cache_dir": f"{d}/pretrained", "output_dir": f"{d}/trials",
                                      "device": device})
        torch.manual_seed(0)
        run_trial(cfg)
    return {"peak_mem": common.peak_memory_bytes(device), "base_mem": base if device == "cpu" else 0}


def step_specs(device: str, archs: list[str], batch: int = 0) -> list[Spec]:
    cuda = device == "cuda"
    return [Spec(loops=(stage,), arch=a, stage=stage, device=device, batch=batch or (256 if cuda else 8),
                 repeats=1, warmup=0, attack_steps=10 if cuda else 2) for a in archs for stage in STAGES]


def run(device: str, archs: list[str], batch: int = 0, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    rows = []
    for spec in step_specs(device, archs, batch):
        r = common.run_child("bench.throughput", asdict(spec))
        if r["errors"]:
            raise RuntimeError(f"memory {spec.arch}/{spec.stage}: {r['errors']}")
        rows.append({"what": f"{spec.arch} {spec.stage} step", "batch": spec.batch, "attack_steps": spec.attack_steps,
                     "peak_mem": r["peak_mem"], "base_mem": r["base_mem"] if device == "cpu" else 0})
        log(f"  {rows[-1]['what']}: peak {common.mib(r['peak_mem'])}")
    r = common.run_child("bench.memory", {"device": device})
    rows.append({"what": "quickstart trial (small_cnn, digits, run_trial)", "batch": 64, "attack_steps": "3/5",
                 "peak_mem": r["peak_mem"], "base_mem": r["base_mem"]})
    log(f"  {rows[-1]['what']}: peak {common.mib(r['peak_mem'])}")
    return rows


def table(rows: list[dict[str, Any]], machine: common.Machine) -> common.Table:
    cpu = machine.device == "cpu"
    kind = "peak RSS" if cpu else "peak GPU memory"
    headers = ["what", "batch", kind] + (["RSS after imports", "increase"] if cpu else [])
    body = []
    for r in rows:
        row = [r["what"], r["batch"], common.mib(r["peak_mem"])]
        if cpu:
            row += [common.mib(r["base_mem"]), common.mib(r["peak_mem"] - r["base_mem"])]
        body.append(row)
    steps = {r["attack_steps"] for r in rows[:-1]}
    notes = [
        f"{'process peak RSS (VmHWM of /proc/self/status)' if cpu else 'torch.cuda.max_memory_allocated'}, one process per row.",
        f"Training-step rows: the arch at full width, CIFAR-10 shapes, PGD with {', '.join(map(str, steps))} attack "
        "step(s) (the peak does not grow with K: each attack step's graph is freed before the next), "
        "keep fraction 0.1.",
        "Quickstart trial: search_spaces/quickstart.yaml with 1 epoch per stage, pretraining and evaluation included.",
    ]
    return common.Table("memory", f"4. Peak memory per trial ({machine.device})", headers, body, notes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto")
    p.add_argument("--archs", default="resnet18,vgg16_bn")
    p.add_argument("--batch", type=int, default=0)
    args = p.parse_args(argv)
    if args.child:
        common.emit(trial_child(json.loads(args.child)))
        return
    device = common.resolve_device(args.device)
    machine = common.describe_machine(device)
    print(table(run(device, args.archs.split(","), args.batch), machine).markdown())


if __name__ == "__main__":
    main()
