"""Benchmark 1: PGD-10 adversarial-training throughput, this project's loop vs the reference-style loop.

    python -m bench.throughput [--device cpu|cuda] [--archs resnet18,vgg16_bn] [--stages prune,finetune]

Same architecture (the real resnet18 / vgg16_bn at 32x32, CIFAR-10 shapes), same synthetic batch, same
PGD-10 (eps 8/255, step 2/255), same keep fraction. Ours = `study.engine.train_epoch` with
`make_loss("pgd")` and `resolve_runtime("auto", "auto")` (bf16 + channels_last on CUDA, fp32 on CPU),
HYDRA masked layers from `study.pruning`; optionally `torch.compile` (CUDA only) as its own row.
Reference = `bench.reference` (sort-based top-k on every forward, backward over parameters inside the
attack, fp32 eager). Every row runs in its own process (clean allocator, clean peak memory).

Achieved TFLOP/s counts the work PGD-K training needs, (2K + 3) forward-equivalents per image with F
measured by torch's FLOP counter (REFERENCES.md, "Speed anchors"); extra work a loop does (the
reference's parameter gradients, its sorts) is not counted as useful.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from bench import common

EPS, STEP, STEPS = 8 / 255, 2 / 255, 10
KEEP_FRACTION = 0.1  # HYDRA's 90% sparsity
LOOPS = ("reference", "ours", "ours_compiled")


@dataclass(frozen=True)
class Spec:
    """One measured row: which loop trains which model in which stage, how long."""

    loop: str  # "reference" | "ours" | "ours_compiled"
    arch: str
    stage: str  # "dense" (plain model, no masked layers) | "prune" | "finetune"
    batch: int
    device: str
    width: int = 0  # 0 = the arch's real width
    batches_per_repeat: int = 1  # steps timed together (one device sync per repeat)
    repeats: int = 2
    warmup: int = 1  # warm-up repeats with a 1-step attack (same kernels and shapes, a fraction of the time)
    attack_steps: int = STEPS
    seed: int = 0


# ---------------------------------------------------------------------------------------------------
# Building the two loops


def synthetic_batch(spec: Spec, info: Any) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed)
    x = torch.rand(spec.batch, info.in_channels, info.image_size, info.image_size, generator=g)
    y = torch.randint(0, info.num_classes, (spec.batch,), generator=g)
    return x.to(spec.device), y.to(spec.device)


def _base_model(spec: Spec, info: Any) -> nn.Module:
    from study.models import create_model

    torch.manual_seed(spec.seed)
    return create_model(spec.arch, info, width=spec.width).to(spec.device)


def set_trainable(model: nn.Module, *, weights: bool, scores: bool, bn: bool) -> None:
    """The pipeline's freezing per stage (study.pipeline._set_trainable, restated for the benchmark)."""
    for module in model.modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, p in module.named_parameters(recurse=False):
            p.requires_grad_(scores if name == "scores" else bn if is_bn else weights)


def prepare_ours(model: nn.Module, stage: str, x: torch.Tensor) -> Callable[[], None] | None:
    """Make `model` what the pipeline trains in `stage`; returns the after-step hook (prune stage)."""
    from study import pruning

    if stage == "dense":
        return None
    pruning.make_prunable(model)
    pruning.init_scores(model, "ssi")
    pruning.refresh_masks(model, KEEP_FRACTION, "layer")
    if stage == "prune":
        pruning.set_mode(model, "scores")
        set_trainable(model, weights=False, scores=True, bn=False)
        return lambda: pruning.refresh_masks(model, KEEP_FRACTION, "layer")
    if stage == "finetune":
        pruning.set_mode(model, "fixed")
        set_trainable(model, weights=True, scores=False, bn=True)
        return None
    raise ValueError(f"unknown stage {stage!r}")


def ours_runner(spec: Spec, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[int], None]:
    """A function running `batches_per_repeat` steps of the project's loop with an n-step attack."""
    from study.attacks import AttackStrength
    from study.engine import resolve_runtime, train_epoch
    from study.losses import make_loss

    runtime = resolve_runtime(spec.device, "auto")
    after_step = prepare_ours(model, spec.stage, x)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained = model
    if spec.loop == "ours_compiled":
        trained = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    loss_fn = make_loss("pgd")
    gen = torch.Generator(device=spec.device).manual_seed(spec.seed)

    def run(steps: int) -> None:
        strength = AttackStrength(eps=EPS, steps=steps, step_size=STEP)
        train_epoch(trained, [(x, y)] * spec.batches_per_repeat, loss_fn, opt, sched, strength, runtime, gen,
                    after_step)

    return run


def reference_runner(spec: Spec, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[int], None]:
    from bench import reference

    if spec.stage == "dense":  # HYDRA pre-trains through its subnet layers with k = 1
        k = 1.0
    else:
        k = KEEP_FRACTION
    reference.make_reference(model, k)
    with torch.no_grad():  # the same ssi scores as ours
        for layer in reference.subnet_layers(model):
            fan_in = nn.init._calculate_fan_in_and_fan_out(layer.weight)[0]
            layer.popup_scores.copy_((6.0 / fan_in) ** 0.5 * layer.weight / layer.weight.abs().max())
    reference.set_stage(model, spec.stage)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)

    def run(steps: int) -> None:
        loss = None
        for _ in range(spec.batches_per_repeat):
            loss = reference.reference_train_step(model, x, y, opt, EPS, STEP, steps)
        float(loss)  # the reference reads its loss every step

    return run


def measure(spec: Spec) -> dict[str, Any]:
    """Time one row in this process: seconds per repeat, images/s, peak memory."""
    from study.data import dataset_info

    info = dataset_info("cifar10")
    x, y = synthetic_batch(spec, info)
    common.reset_peak_memory(spec.device)
    model = _base_model(spec, info)
    build = reference_runner if spec.loop == "reference" else ours_runner
    run = build(spec, model, x, y)
    for _ in range(spec.warmup):
        run(1)
    if spec.loop == "ours_compiled":
        run(spec.attack_steps)  # compile settles on the timed shapes too
    times = common.time_repeats(lambda: run(spec.attack_steps), spec.device, warmup=0, repeats=spec.repeats)
    step_s = common.median(times) / spec.batches_per_repeat
    return {"spec": asdict(spec), "times": times, "step_s": step_s, "images_s": spec.batch / step_s,
            "peak_mem": common.peak_memory_bytes(spec.device)}


def forward_flops(arch: str, width: int = 0) -> float:
    """FLOPs of one forward pass of one 32x32 image (torch's FLOP counter; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    from study.data import dataset_info
    from study.models import create_model

    info = dataset_info("cifar10")
    model = create_model(arch, info, width=width)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, info.in_channels, info.image_size, info.image_size))
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------
# The table


def default_specs(device: str, archs: list[str], stages: list[str], compile_: bool) -> list[Spec]:
    cuda = device == "cuda"
    base = dict(device=device, batch=256 if cuda else 16, batches_per_repeat=10 if cuda else 1,
                repeats=3 if cuda else 2, warmup=2 if cuda else 1)
    loops = ["reference", "ours"] + (["ours_compiled"] if cuda and compile_ else [])
    return [Spec(loop=loop, arch=a, stage=s, **base) for a in archs for s in stages for loop in loops]


def table(results: list[dict[str, Any]], machine: common.Machine) -> common.Table:
    cuda = machine.device != "cpu"
    by = {(r["spec"]["arch"], r["spec"]["stage"], r["spec"]["loop"]): r for r in results}
    flops = {a: forward_flops(a) for a in sorted({r["spec"]["arch"] for r in results})}
    headers = ["arch", "stage", "batch", "reference img/s", "ours img/s", "ours / reference"]
    if any(k[2] == "ours_compiled" for k in by):
        headers += ["ours+compile img/s", "compiled / reference"]
    headers += ["ours TFLOP/s", f"ours % of {machine.matmul_dtype} matmul"]
    rows = []
    for (arch, stage) in dict.fromkeys((k[0], k[1]) for k in by):
        ref, ours = by.get((arch, stage, "reference")), by.get((arch, stage, "ours"))
        comp = by.get((arch, stage, "ours_compiled"))
        best = max((r for r in (ours, comp) if r), key=lambda r: r["images_s"])
        useful = (2 * STEPS + 3) * flops[arch]  # per image
        tflops = best["images_s"] * useful / 1e12
        row = [arch, stage, best["spec"]["batch"], f"{ref['images_s']:.1f}" if ref else "-",
               f"{ours['images_s']:.1f}" if ours else "-",
               common.ratio(ours["images_s"], ref["images_s"]) if ours and ref else "-"]
        if "ours+compile img/s" in headers:
            row += [f"{comp['images_s']:.1f}" if comp else "-",
                    common.ratio(comp["images_s"], ref["images_s"]) if comp and ref else "-"]
        row += [f"{tflops:.3g}", f"{100 * tflops / machine.matmul_tflops:.1f}%"]
        rows.append(row)
    target = ("GPU targets: ours >= 5x reference on resnet18, >= 30% of the measured bf16 matmul rate"
              if cuda else "CPU target: ours >= 2x reference")
    notes = [
        f"PGD-{STEPS} adversarial training (eps 8/255, step 2/255), keep fraction {KEEP_FRACTION} (90% pruned); "
        "synthetic CIFAR-10-shaped batches already on the device; the real architectures at 32x32 (width unchanged).",
        "prune = HYDRA score training (weights and BatchNorm frozen, masks refreshed after each optimizer step); "
        "finetune = fixed mask, weights train.",
        "reference = sort-based top-k on every forward, loss.backward() over parameters inside the attack, fp32 eager "
        "(bench/reference.py); ours = study.engine.train_epoch + make_loss('pgd') + resolve_runtime('auto','auto').",
        f"TFLOP/s = images/s x (2K+3) F with K={STEPS} and F per image from torch's FLOP counter: "
        + ", ".join(f"{a} {f / 1e9:.2f} GFLOP" for a, f in flops.items())
        + f"; measured {machine.matmul_dtype} matmul rate {machine.matmul_tflops:.3g} TFLOP/s.",
        f"Each row: median of {results[0]['spec']['repeats']} repeats of {results[0]['spec']['batches_per_repeat']} "
        f"step(s) after {results[0]['spec']['warmup']} warm-up repeat(s), one process per row.",
        target + ".",
    ]
    return common.Table("throughput", f"1. PGD-{STEPS} training throughput ({machine.device})", headers, rows, notes)


def run(device: str, archs: list[str], stages: list[str], compile_: bool = True,
        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Measure every row (each in its own process); `table` turns the results into the printed table."""
    results = []
    for spec in default_specs(device, archs, stages, compile_):
        r = common.run_child("bench.throughput", asdict(spec))
        log(f"  {spec.arch:9s} {spec.stage:8s} {spec.loop:13s} batch {spec.batch}: "
            f"{r['images_s']:.1f} img/s ({r['step_s']:.3f} s/step)")
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto")
    p.add_argument("--archs", default="resnet18,vgg16_bn")
    p.add_argument("--stages", default="prune")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        common.emit(measure(Spec(**json.loads(args.child))))
        return
    device = common.resolve_device(args.device)
    machine = common.describe_machine(device)
    results = run(device, args.archs.split(","), args.stages.split(","), not args.no_compile)
    print(table(results, machine).markdown())


if __name__ == "__main__":
    main()
