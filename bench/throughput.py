"""Benchmark 1: PGD-10 adversarial-training throughput, this project's loop vs the reference-style loop.

    python -m bench.throughput [--device cpu|cuda] [--archs resnet18,vgg16_bn] [--stages prune,finetune]

Same architecture (the real resnet18 / vgg16_bn at 32x32, CIFAR-10 shapes), same synthetic batch, same
PGD-10 (eps 8/255, step 2/255), same keep fraction. Ours = `study.trial.engine.train_epoch` with
`make_loss("pgd")` and `resolve_runtime("auto", "auto")` (bf16 + channels_last on CUDA, fp32 on CPU),
HYDRA masked layers from `study.trial.pruning`; optionally `torch.compile` (study.trial.engine.CompiledStep, as
the pipeline compiles; default on CUDA, `--compile` on CPU) as its own row.
Reference = `bench.reference` (sort-based top-k on every forward, backward over parameters inside the
attack, fp32 eager). Every row runs in its own process (clean allocator, clean peak memory).

Achieved TFLOP/s counts the work PGD-K training needs, (2K + 3) forward-equivalents per image with F
measured by torch's FLOP counter (REFERENCES.md, "Speed anchors"); extra work a loop does (the
reference's parameter gradients, its sorts) is not counted as useful.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from bench import common

EPS, STEP, STEPS = 8 / 255, 2 / 255, 10
KEEP_FRACTION = 0.1  # HYDRA's 90% sparsity
LOOPS = ("reference", "ours_eager", "ours", "ours_compiled", "ours_bf16")


@dataclass(frozen=True)
class Spec:
    """One measured row: which loops train which model in which stage, how long.

    The loops of a row run in one process, their timed repeats interleaved (ref, ours, ref, ours, ...),
    so load from anything else on the machine falls on both alike.
    """

    loops: tuple[str, ...]  # from LOOPS; "dense" / "prune" / "finetune" for bench.prune_overhead
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
    from study.trial.models import create_model

    torch.manual_seed(spec.seed)
    return create_model(spec.arch, info, width=spec.width).to(spec.device)


def set_trainable(model: nn.Module, *, weights: bool, scores: bool, bn: bool) -> None:
    """The pipeline's freezing per stage (study.trial.pipeline._set_trainable, restated for the benchmark)."""
    for module in model.modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, p in module.named_parameters(recurse=False):
            p.requires_grad_(scores if name == "scores" else bn if is_bn else weights)


def prepare_ours(model: nn.Module, stage: str) -> Callable[[], None] | None:
    """Make `model` what the pipeline trains in `stage`; returns the after-step hook (prune stage)."""
    from study.trial import pruning

    if stage == "dense":
        return None
    pruning.make_prunable(model)
    pruning.init_scores(model, "ssi")
    pruning.refresh_masks(model, KEEP_FRACTION, "layer")
    if stage == "prune":
        pruning.set_mode(model, "scores")
        set_trainable(model, weights=False, scores=True, bn=True)  # as the pipeline (prune.train_bn) and HYDRA
        return lambda: pruning.refresh_masks(model, KEEP_FRACTION, "layer")
    if stage == "finetune":
        pruning.set_mode(model, "fixed")
        set_trainable(model, weights=True, scores=False, bn=True)
        return None
    raise ValueError(f"unknown stage {stage!r}")


def ours_runner(spec: Spec, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[int], None]:
    """A function running `batches_per_repeat` steps of the project's loop with an n-step attack."""
    from study.trial.attacks import AttackStrength
    from study.trial.engine import resolve_runtime, train_epoch
    from study.trial.losses import make_loss

    from study.trial.graphed import make_step

    runtime = resolve_runtime(spec.device, "bf16" if spec.loops == ("ours_bf16",) else "auto")
    after_step = prepare_ours(model, spec.stage)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained = model
    if spec.loops == ("ours_compiled",):
        from study.trial.engine import CompiledStep

        trained = CompiledStep(model)  # what the pipeline compiles (masked weights built before the graph)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    loss_fn = make_loss("pgd")
    gen = torch.Generator(device=spec.device).manual_seed(spec.seed)
    # as the pipeline trains: one step object per stage (on CUDA a graph captured once and replayed), except
    # ours_eager, the same loop with every step run eagerly
    step_fn = make_step(trained, loss_fn, runtime, gen, cuda_graphs=spec.loops != ("ours_eager",))

    def run(steps: int) -> None:
        strength = AttackStrength(eps=EPS, steps=steps, step_size=STEP)
        train_epoch(trained, [(x, y)] * spec.batches_per_repeat, loss_fn, opt, sched, strength, runtime, gen,
                    after_step, step_fn=step_fn)

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


def build(loop: str, spec: Spec, x: torch.Tensor, y: torch.Tensor) -> Callable[[int], None]:
    """The step function of `loop` on a fresh copy of the row's model (same seed, same weights)."""
    from study.trial.data import dataset_info

    model = _base_model(spec, dataset_info("cifar10"))
    if loop == "reference":
        return reference_runner(spec, model, x, y)
    if loop in ("ours_eager", "ours", "ours_compiled", "ours_bf16"):
        return ours_runner(replace(spec, loops=(loop,)), model, x, y)
    if loop in ("dense", "prune", "finetune"):  # bench.prune_overhead: ours, per stage
        return ours_runner(replace(spec, loops=("ours",), stage=loop), model, x, y)
    raise ValueError(f"unknown loop {loop!r}; valid: {', '.join(LOOPS)}, dense, prune, finetune")


def measure(spec: Spec) -> dict[str, Any]:
    """Time every loop of one row in this process: seconds per step, images/s (and peak memory)."""
    from study.trial.data import dataset_info

    base_mem = common.rss_peak_bytes()  # after the imports, before any model or batch
    x, y = synthetic_batch(spec, dataset_info("cifar10"))
    common.reset_peak_memory(spec.device)
    runs, errors = {}, {}
    for loop in spec.loops:
        try:
            runs[loop] = build(loop, spec, x, y)
            # the CUDA graph is captured (and compile settles) on the timed attack: a graph of a 1-step attack
            # would not be replayed for 10 steps
            settle = loop == "ours_compiled" or (loop == "ours" and spec.device == "cuda")
            for _ in range(spec.warmup):
                runs[loop](spec.attack_steps if settle else 1)
            if loop == "ours_compiled":
                runs[loop](spec.attack_steps)
        except Exception as e:  # noqa: BLE001 - a loop that cannot run (compile on an odd stack) is reported
            runs.pop(loop, None)
            errors[loop] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    times: dict[str, list[float]] = {loop: [] for loop in runs}
    for _ in range(spec.repeats):
        for loop, fn in runs.items():
            times[loop] += common.time_repeats(lambda: fn(spec.attack_steps), spec.device, warmup=0, repeats=1)
    out = {}
    for loop, ts in times.items():
        step_s = common.median(ts) / spec.batches_per_repeat
        out[loop] = {"times": ts, "step_s": step_s, "images_s": spec.batch / step_s}
    return {"spec": asdict(spec), "loops": out, "errors": errors, "peak_mem": common.peak_memory_bytes(spec.device),
            "base_mem": base_mem}


def forward_flops(arch: str, width: int = 0) -> float:
    """FLOPs of one forward pass of one 32x32 image (torch's FLOP counter; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    from study.trial.data import dataset_info
    from study.trial.models import create_model

    info = dataset_info("cifar10")
    model = create_model(arch, info, width=width)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, info.in_channels, info.image_size, info.image_size))
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------
# The table


CPU_BATCHES = (32, 128)  # the batch sizes people train with; a ratio holds for its batch only
GPU_BATCHES = (256,)


def cpu_bf16(device: str) -> bool:
    """A CPU row also times ours with bf16 autocast (`precision: bf16`) where the CPU has native bf16 (oneDNN)."""
    if device != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_specs(device: str, archs: list[str], stages: list[str], compile_: bool, batch: int = 0,
                  repeats: int = 0, batches: tuple[int, ...] = ()) -> list[Spec]:
    """One row per arch x stage x batch. CPU: batch 32 (2 timed repeats) and 128 (1: a reference step of
    resnet18 takes about a minute there); CUDA: batch 256, 10 steps per repeat, torch.compile rows."""
    cuda = device == "cuda"
    loops = (("reference",) + (("ours_eager",) if cuda else ()) + ("ours",) + (("ours_compiled",) if compile_ else ())
             + (("ours_bf16",) if cpu_bf16(device) else ()))
    sizes = batches or ((batch,) if batch else GPU_BATCHES if cuda else CPU_BATCHES)
    return [Spec(loops=loops, arch=a, stage=s, device=device, batch=b, batches_per_repeat=10 if cuda else 1,
                 repeats=repeats or (3 if cuda else 2 if b <= 32 else 1), warmup=2 if cuda else 1)
            for a in archs for s in stages for b in sizes]


def gpu_specs(archs: list[str], compile_: bool) -> list[Spec]:
    """CUDA: every arch x {prune, finetune} at batch 256 (reference, eager, CUDA graph), torch.compile (with
    the graph) on the first arch's prune row only (compiling costs a minute per model), and the first arch's
    prune stage at batch 1024 (eager and graph: the rate a larger batch reaches)."""
    rows = [Spec(loops=("reference", "ours_eager", "ours") + (("ours_compiled",) if compile_ and (a, s) == (archs[0], "prune")
                                                             else ()),
                 arch=a, stage=s, device="cuda", batch=256, batches_per_repeat=10, repeats=3, warmup=1)
            for a in archs for s in ("prune", "finetune")]
    rows.append(Spec(loops=("ours_eager", "ours"), arch=archs[0], stage="prune", device="cuda", batch=1024,
                     batches_per_repeat=5, repeats=3, warmup=1))
    return rows


def table(results: list[dict[str, Any]], machine: common.Machine) -> common.Table:
    cuda = machine.device != "cpu"
    flops = {a: forward_flops(a) for a in dict.fromkeys(r["spec"]["arch"] for r in results)}
    compiled = any("ours_compiled" in r["spec"]["loops"] for r in results)
    bf16 = any("ours_bf16" in r["spec"]["loops"] for r in results)
    eager = any("ours_eager" in r["spec"]["loops"] for r in results)
    headers = ["arch", "stage", "batch", "reference img/s"]
    if eager:
        headers += ["ours eager img/s", "eager / reference"]
    headers += ["ours img/s" + (" (CUDA graph)" if cuda else ""), "ours / reference"]
    if compiled:
        headers += ["ours+compile img/s", "compiled / reference"]
    if bf16:
        headers += ["ours bf16 img/s", "bf16 / reference"]
    headers += ["best TFLOP/s", f"best % of {machine.matmul_dtype} matmul"]
    rows = []
    for r in results:
        sp, loops = r["spec"], r["loops"]
        ref, eag, ours, comp, half = (loops.get(k) for k in ("reference", "ours_eager", "ours", "ours_compiled",
                                                             "ours_bf16"))

        def img(x: dict | None, name: str) -> str:
            return f"{x['images_s']:.2f}" if x else ("failed" if name in r["errors"] else "-")

        def rat(x: dict | None) -> str:
            return common.ratio(x["images_s"], ref["images_s"]) if x and ref else "-"

        row = [sp["arch"], sp["stage"], sp["batch"], img(ref, "reference")]
        if eager:
            row += [img(eag, "ours_eager"), rat(eag)]
        row += [img(ours, "ours"), rat(ours)]
        if compiled:
            row += [img(comp, "ours_compiled"), rat(comp)]
        if bf16:
            row += [img(half, "ours_bf16"), rat(half)]
        mine = [x for x in ((eag, ours, comp) if cuda else (ours, comp)) if x]  # CPU: the matmul rate is fp32's
        if mine:
            tflops = max(x["images_s"] for x in mine) * (2 * STEPS + 3) * flops[sp["arch"]] / 1e12
            row += [f"{tflops:.3g}", f"{100 * tflops / machine.matmul_tflops:.1f}%"]
        else:
            row += ["-", "-"]
        rows.append(row)
    first = results[0]["spec"]
    repeats_text = ", ".join(sorted({f"batch {r['spec']['batch']}: {r['spec']['repeats']}" for r in results}))
    target = ("GPU targets: ours >= 5x reference at batch 256, and at batch 256 at least eager's batch-1024 rate; "
              "the compiled row at least as fast as eager; 25% of the measured bf16 matmul rate is the goal beyond"
              if cuda else "CPU target: ours >= 2x reference")
    notes = [
        f"PGD-{STEPS} adversarial training (eps 8/255, step 2/255), keep fraction {KEEP_FRACTION} (90% pruned); "
        "synthetic CIFAR-10-shaped batches already on the device; the real architectures at 32x32 (width unchanged).",
        "prune = HYDRA score training (weights frozen, scores and BatchNorm's affine parameters train, masks refreshed "
        "after each optimizer step); "
        "finetune = fixed mask, weights train; dense = plain model.",
        "reference = sort-based top-k on every forward, loss.backward() over parameters inside the attack, fp32 eager "
        "(bench/reference.py); ours = study.trial.engine.train_epoch + make_loss('pgd') + resolve_runtime('auto','auto')"
        + (" (bf16 autocast, channels_last), its step replayed as a CUDA graph (study.trial.graphed); ours eager = "
           "the same loop with `cuda_graphs: false`; ours+compile = torch.compile of the model inside the graph"
           if cuda else " (fp32)") + "."
        + (" ours bf16 = the same with `precision: bf16` (bf16 autocast on the CPU, which has native bf16); its "
           "numerics are checked against fp32 in tests/test_fast_path.py." if bf16 else ""),
        f"TFLOP/s = images/s x (2K+3) F with K={STEPS} and F per image from torch's FLOP counter ("
        + ", ".join(f"{a} {f / 1e9:.2f} GFLOP" for a, f in flops.items())
        + f"); measured {machine.matmul_dtype} matmul rate {machine.matmul_tflops:.3g} TFLOP/s.",
        f"Each row: one process; per loop {first['warmup']} warm-up repeat(s) with a 1-step attack (the CUDA-graph "
        "and compiled loops: with the timed attack, which the graph is captured on), then the "
        f"median of the row's timed repeats ({repeats_text}) "
        f"of {first['batches_per_repeat']} step(s), the loops' repeats interleaved. Each ratio holds for its row's batch size.",
        target + ".",
    ]
    errors = {f"{r['spec']['arch']}/{r['spec']['stage']}/{k}": v for r in results for k, v in r["errors"].items()}
    notes += [f"{k} failed: {v}" for k, v in errors.items()]
    return common.Table("throughput", f"1. PGD-{STEPS} training throughput ({machine.device})", headers, rows, notes)


def run(specs: list[Spec], log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Measure every row (each in its own process); `table` turns the results into the printed table."""
    results = []
    for spec in specs:
        r = common.run_child("bench.throughput", asdict(spec))
        for loop, x in r["loops"].items():
            log(f"  {spec.arch:9s} {spec.stage:8s} {loop:13s} batch {spec.batch}: "
                f"{x['images_s']:.2f} img/s ({x['step_s']:.3f} s/step)")
        for loop, err in r["errors"].items():
            log(f"  {spec.arch:9s} {spec.stage:8s} {loop:13s} FAILED: {err}")
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto")
    p.add_argument("--archs", default="resnet18,vgg16_bn")
    p.add_argument("--stages", default="prune")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (CUDA)")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows on CPU too (inductor)")
    p.add_argument("--batch", type=int, default=0, help="one batch size (default: 256 on CUDA, 32 and 128 on CPU)")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats per loop (default: 3 on CUDA, 2 on CPU)")
    args = p.parse_args(argv)
    if args.child:
        d = json.loads(args.child)
        common.emit(measure(Spec(**{**d, "loops": tuple(d["loops"])})))
        return
    device = common.resolve_device(args.device)
    machine = common.describe_machine(device)
    compile_ = not args.no_compile if device == "cuda" else args.compile
    results = run(default_specs(device, args.archs.split(","), args.stages.split(","), compile_,
                                args.batch, args.repeats))
    print(table(results, machine).markdown())


if __name__ == "__main__":
    main()
