"""Benchmark: where a PGD-10 prune step of resnet18 spends its time on the GPU (torch.profiler).

    python -m bench.profile_step [--batch 256]

For the eager step and the step replayed as a CUDA graph: CUDA kernels per optimizer step, the share of the
step's wall time the GPU spends in kernels ("busy"), and the kernel time by family (convolutions, BatchNorm,
elementwise, reductions, top-k/sort, matmul, other). Kernels launched by a graph replay are traced one by one.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import Any, Callable

from bench import common

FAMILIES = (  # first match wins; lower-case substrings of kernel names
    ("BatchNorm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford")),
    ("convolution", ("conv", "implicit", "xmma", "cudnn", "sm90_", "wgrad", "dgrad", "fprop")),
    ("matmul", ("gemm", "cublas", "cutlass")),
    ("top-k / sort", ("topk", "sort", "radix", "select")),
    ("reduction", ("reduce", "sum_", "norm_kernel")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "fill", "copy", "index", "foreach", "where", "sign",
                     "clamp", "add", "mul")),
)


def family(name: str) -> str:
    low = name.lower()
    return next((fam for fam, keys in FAMILIES if any(k in low for k in keys)), "other")


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.throughput import Spec, build, synthetic_batch
    from study.trial.data import dataset_info

    out = {}
    for loop in ("ours_eager", "ours"):
        s = Spec(loops=(loop,), arch=spec["arch"], stage="prune", batch=spec["batch"], device="cuda",
                 batches_per_repeat=spec["steps"])
        x, y = synthetic_batch(s, dataset_info("cifar10"))
        fn = build(loop, s, x, y)
        fn(10)
        fn(10)  # warm-up; the graph is captured in the first call
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            fn(10)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.device_time for e in kernels)  # kernel time (microseconds)
        fam: Counter[str] = Counter()
        for e in kernels:
            fam[family(e.name)] += e.device_time
        out[loop] = {"wall_ms_per_step": 1e3 * wall / s.batches_per_repeat, "kernels_per_step": len(kernels) / s.batches_per_repeat,
                     "busy_share": busy_us / 1e6 / wall, "kernel_ms_per_step": busy_us / 1e3 / s.batches_per_repeat,
                     "families": {k: v / max(busy_us, 1e-9) for k, v in fam.most_common()},
                     "top_kernels": [(e.key[:90], e.self_device_time_total / 1e3 / s.batches_per_repeat)
                                     for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:8]]}
    return {"spec": spec, "loops": out}


def run(arch: str = "resnet18", batch: int = 256, steps: int = 5, log: Callable[[str], None] = print) -> dict[str, Any]:
    r = common.run_child("bench.profile_step", {"arch": arch, "batch": batch, "steps": steps})
    for loop, p in r["loops"].items():
        fams = ", ".join(f"{k} {100 * v:.0f}%" for k, v in p["families"].items())
        log(f"  {arch} prune batch {batch} {loop}: {p['kernels_per_step']:.0f} kernels/step, "
            f"{p['wall_ms_per_step']:.1f} ms/step, GPU busy {100 * p['busy_share']:.0f}% | {fams}")
    return r


def table(result: dict[str, Any], machine: common.Machine) -> common.Table:
    sp = result["spec"]
    rows = []
    for loop, p in result["loops"].items():
        rows.append(["eager" if loop == "ours_eager" else "CUDA graph", f"{p['wall_ms_per_step']:.1f}",
                     f"{p['kernel_ms_per_step']:.1f}", f"{p['kernels_per_step']:.0f}", f"{100 * p['busy_share']:.0f}%",
                     "; ".join(f"{k} {100 * v:.0f}%" for k, v in p["families"].items())])
    headers = ["step", "wall ms/step", "kernel ms/step", "CUDA kernels/step", "GPU busy", "kernel time by family"]
    top = result["loops"].get("ours", {}).get("top_kernels", [])
    notes = [f"{sp['arch']}, HYDRA prune stage, PGD-10, batch {sp['batch']}, bf16 + channels_last; torch.profiler over "
             f"{sp['steps']} steps after warm-up. GPU busy = kernel time / wall time.",
             "Top kernels (CUDA graph), ms per step: " + "; ".join(f"{n} {t:.2f}" for n, t in top)]
    return common.Table("profile", f"Where a step's GPU time goes ({machine.device})", headers, rows, notes)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args(argv)
    if args.child:
        common.emit(measure(json.loads(args.child)))
        return
    machine = common.describe_machine("cuda")
    print(table(run(args.arch, args.batch), machine).markdown())


if __name__ == "__main__":
    main()
