"""Benchmark 2: overhead of the pruning layers, i.e. the step time of the prune stage (HYDRA scores,
masks refreshed once per optimizer step) and of the fine-tune stage (fixed mask baked into the weights)
over the same dense step: same model, same batch, same PGD-10 loss, this project's loop throughout.

    python -m bench.prune_overhead [--device cpu|cuda] [--archs resnet18,vgg16_bn]

On CPU the models are narrowed (width 16) so the run takes seconds, not minutes: the masking work
(one top-k per layer per step, one weight x mask per step) scales with the parameter count, the
convolutions with parameters x pixels x batch, so the ratio depends on the batch more than on the width.
The three stages' repeats are interleaved in one process.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any, Callable

from bench import common
from bench.throughput import Spec

STAGES = ("dense", "prune", "finetune")


def default_specs(device: str, archs: list[str], batch: int = 0, repeats: int = 0) -> list[Spec]:
    cuda = device == "cuda"
    return [Spec(loops=STAGES, arch=a, stage="dense", device=device, width=0 if cuda else 16,
                 batch=batch or (256 if cuda else 32), batches_per_repeat=10 if cuda else 1,
                 repeats=repeats or (3 if cuda else 5), warmup=2 if cuda else 1) for a in archs]


def run(specs: list[Spec], log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    results = []
    for spec in specs:
        r = common.run_child("bench.throughput", asdict(spec))
        log(f"  {spec.arch:9s} width {spec.width or 'full'} batch {spec.batch}: "
            + ", ".join(f"{k} {v['step_s']:.3f} s/step" for k, v in r["loops"].items()))
        if r["errors"]:
            raise RuntimeError(f"prune overhead {spec.arch}: {r['errors']}")
        results.append(r)
    return results


def table(results: list[dict[str, Any]], machine: common.Machine) -> common.Table:
    headers = ["arch", "width", "batch", "dense s/step", "prune s/step", "prune over dense", "finetune s/step",
               "finetune over dense"]
    rows = []
    for r in results:
        sp, t = r["spec"], {k: v["step_s"] for k, v in r["loops"].items()}
        rows.append([sp["arch"], sp["width"] or "full", sp["batch"], f"{t['dense']:.3f}", f"{t['prune']:.3f}",
                     common.pct_over(t["prune"], t["dense"]), f"{t['finetune']:.3f}",
                     common.pct_over(t["finetune"], t["dense"])])
    first = results[0]["spec"]
    notes = [
        "PGD-10 adversarial-training step (eps 8/255, step 2/255) of study.trial.engine.train_epoch; keep fraction 0.1, "
        "per-layer top-k. dense = the plain model (no masked layers); prune = set_mode('scores'), weights "
        "frozen, scores and BatchNorm's affine parameters train, refresh_masks after every optimizer step; finetune = set_mode('fixed').",
        f"Median of {first['repeats']} interleaved repeats of {first['batches_per_repeat']} step(s) per stage after "
        f"{first['warmup']} warm-up repeat(s); one process per arch.",
        "Targets: finetune <= 5% slower than dense; prune <= 25% slower.",
    ]
    return common.Table("prune_overhead", f"2. Overhead of the pruning layers ({machine.device})", headers, rows, notes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.prune_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--archs", default="resnet18,vgg16_bn")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--repeats", type=int, default=0)
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    machine = common.describe_machine(device)
    print(table(run(default_specs(device, args.archs.split(","), args.batch, args.repeats)), machine).markdown())


if __name__ == "__main__":
    main()
