"""The training step replayed as a CUDA graph (study.trial.graphed) against the eager step.

On a CPU the graph is `EmulatedGraph` (the captured function re-run on the static tensors, nothing computed
at capture kept): what it checks is the graphed step's own plumbing, the part that can be wrong on any
device: the batch, eps and step size copied into static tensors before each replay, the random-start noise
drawn from the trial's generator exactly as the eager attack draws it, the gradients handed to the optimizer,
the masked weights rebuilt from the live scores, the eager fallbacks (warm-up, an epoch's smaller last batch,
eps 0, a failed capture). Every case runs the same batches through an eager copy and a graphed copy of one
model and compares losses, parameters, BatchNorm statistics and the generator's state after every step.

On CUDA (skipped elsewhere, with the reason) the real capture is compared with eager: bf16 tolerances, and a
prune epoch's masks overlap with Jaccard >= 0.99 per layer.
"""
from __future__ import annotations

import copy
import logging
from collections import OrderedDict

import pytest
import torch
from torch import nn

from study.trial import pruning
from study.trial.attacks import AttackStrength, PresetNoise, pgd_linf
from study.trial.engine import Runtime, train_epoch
from study.trial.graphed import EagerStep, EmulatedGraph, GraphedStep, make_step
from study.trial.losses import make_loss

CPU = Runtime(device=torch.device("cpu"), bf16=False, channels_last=False)
KEEP = 0.3


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        c1=nn.Conv2d(1, 6, 3, padding=1), b1=nn.BatchNorm2d(6), r1=nn.ReLU(), c2=nn.Conv2d(6, 8, 3),
        b2=nn.BatchNorm2d(8), r2=nn.ReLU(), flat=nn.Flatten(), fc=nn.Linear(8 * 6 * 6, 10)))


def staged(stage: str) -> tuple[nn.Module, object]:
    """bn_net as the pipeline trains it in `stage`; returns (model, after-step hook)."""
    model = bn_net()
    if stage == "dense":
        return model, None
    pruning.make_prunable(model)
    pruning.init_scores(model, "ssi")  # signed scores: the STE's sign(scores) matters
    pruning.refresh_masks(model, KEEP, "layer")
    if stage == "prune":
        pruning.set_mode(model, "scores")
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("scores") or name.startswith("b"))  # scores + BatchNorm (HYDRA)
        return model, lambda m=model: pruning.refresh_masks(m, KEEP, "layer")
    pruning.set_mode(model, "fixed")
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith("scores"))
    return model, None


def batches(n_batches: int = 6, batch: int = 8, last: int = 5, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        b = last if i == n_batches - 1 else batch
        out.append((torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)))
    return out


def schedule(step: int) -> AttackStrength:
    """A warm-up: eps changes every step (the graph must read it from its static tensor)."""
    eps = 0.02 * (step + 1)
    return AttackStrength(eps=eps, steps=3, step_size=0.4 * eps)


def train(model: nn.Module, after_step, step_fn, data, loss: str, strength=schedule) -> list[dict]:
    """The engine's loop one batch at a time, recording the state after every step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trace = []
    for i, batch in enumerate(data):
        m = train_epoch(model, [batch], make_loss(loss), opt, sched, strength, CPU, step_fn.generator, after_step,
                        first_step=i, step_fn=step_fn)
        trace.append({"loss": m["train_loss"], "acc": m["train_acc"],
                      "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                      "rng": step_fn.generator.get_state()})
    return trace


def eager_and_graphed(stage: str, loss: str, data=None, strength=schedule, graph_factory=EmulatedGraph, warmup=1):
    data = data or batches()
    model_e, hook_e = staged(stage)
    model_g, hook_g = staged(stage)
    eager = EagerStep(model_e, make_loss(loss), CPU, torch.Generator().manual_seed(7))
    graphed = GraphedStep(model_g, make_loss(loss), CPU, torch.Generator().manual_seed(7), warmup=warmup,
                          graph_factory=graph_factory)
    return train(model_e, hook_e, eager, data, loss, strength), train(model_g, hook_g, graphed, data, loss, strength), graphed


def assert_same(te: list[dict], tg: list[dict]) -> None:
    for i, (e, g) in enumerate(zip(te, tg)):
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-5, abs=1e-6), f"step {i}: loss"
        assert g["acc"] == e["acc"], f"step {i}: accuracy"
        assert torch.equal(g["rng"], e["rng"]), f"step {i}: the generator's state differs (noise drawn differently)"
        for k, v in e["state"].items():
            torch.testing.assert_close(g["state"][k], v, rtol=1e-5, atol=1e-6, msg=f"step {i}: {k}")


@pytest.mark.parametrize("loss", ["pgd", "trades", "fgsm_rs"])
@pytest.mark.parametrize("stage", ["dense", "prune", "finetune"])
def test_replayed_step_matches_eager_step_by_step(stage, loss):
    te, tg, graphed = eager_and_graphed(stage, loss)
    # 1 warm-up step eager, 4 replays, the last (smaller) batch eager again
    assert graphed.graph is not None and graphed.replays == 4 and graphed.eager_steps == 2
    assert_same(te, tg)
    if stage == "finetune":  # the gradient hook ran in the replays: pruned weights stay exactly zero
        for name, layer in pruning.masked_layers(staged("finetune")[0]):
            assert torch.all(tg[-1]["state"][f"{name}.weight"][layer.mask == 0] == 0)


def test_prune_stage_masks_follow_the_scores_trained_in_replays():
    te, tg, graphed = eager_and_graphed("prune", "pgd")
    first, last = tg[0]["state"], tg[-1]["state"]
    assert graphed.replays == 4
    # the scores trained (their gradients reached the optimizer through the graph's static gradients)
    assert any(not torch.equal(first[k], last[k]) for k in first if k.endswith("scores"))
    for k in first:
        if k.endswith("mask"):
            torch.testing.assert_close(last[k], te[-1]["state"][k])


def test_eps_zero_and_other_attack_steps_run_eagerly():
    def strength(step):
        if step == 2:
            return AttackStrength(eps=0.0, steps=3, step_size=0.0)
        if step == 3:
            return AttackStrength(eps=0.05, steps=2, step_size=0.02)  # not the captured number of steps
        return schedule(step)

    te, tg, graphed = eager_and_graphed("prune", "pgd", data=batches(6, last=8), strength=strength)
    assert graphed.replays == 3 and graphed.eager_steps == 3  # warm-up, eps 0, 2 steps
    assert_same(te, tg)


class FailingGraph(EmulatedGraph):
    def capture(self, fn, model):
        super().capture(fn, model)  # recorded (nothing kept), then an operation a graph cannot hold
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_falls_back_to_eager_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="study.trial.graphed"):
        te, tg, graphed = eager_and_graphed("prune", "pgd", graph_factory=FailingGraph)
    assert graphed.failed and graphed.graph is None and graphed.replays == 0 and graphed.eager_steps == 6
    warnings = [r for r in caplog.records if "capture" in r.getMessage()]
    assert len(warnings) == 1 and "runs eagerly" in warnings[0].getMessage()
    assert_same(te, tg)


def test_a_compiled_model_is_not_recompiled_by_the_capture():
    """The warm-up steps run under the capture's autocast settings (no cast cache): torch.compile guards on
    them, and a recompile inside a CUDA graph capture breaks it (inductor draws random numbers there)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(len(compiles))
        return gm.forward

    model, hook = staged("finetune")
    bf16 = Runtime(device=torch.device("cpu"), bf16=True, channels_last=False)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    step = GraphedStep(compiled, make_loss("pgd"), bf16, torch.Generator().manual_seed(7), warmup=2,
                       graph_factory=EmulatedGraph)
    data = batches(5, last=8)
    for i, (x, y) in enumerate(data[:2]):  # warm-up: every graph the step needs is compiled here
        step(x, y, schedule(i))
    after_warmup = len(compiles)
    assert after_warmup > 0
    for i, (x, y) in enumerate(data[2:], start=2):
        step(x, y, schedule(i))
    assert step.graph is not None and step.replays == 3
    assert len(compiles) == after_warmup, "the capture (or a replay) compiled again"
    torch._dynamo.reset()


def test_preset_noise_is_what_the_eager_attack_draws():
    """The graphed step fills its noise with uniform_ from the generator; the eager attack calls torch.rand."""
    x = torch.rand(4, 1, 8, 8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    drawn = torch.rand(x.shape, generator=g1, dtype=x.dtype)
    preset = PresetNoise(torch.zeros_like(x))
    preset.tensor.uniform_(0, 1, generator=g2)
    assert torch.equal(drawn, preset.tensor) and torch.equal(g1.get_state(), g2.get_state())
    model = bn_net().eval()
    y = torch.randint(0, 10, (4,))
    s = AttackStrength(eps=0.1, steps=2, step_size=0.04)
    a = pgd_linf(model, x, y, s, generator=torch.Generator().manual_seed(3))
    b = pgd_linf(model, x, y, AttackStrength(torch.tensor(0.1), 2, torch.tensor(0.04)), generator=preset)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert preset.draws == 1


def test_make_step_is_eager_on_cpu_and_when_graphs_are_off():
    model = bn_net()
    assert type(make_step(model, make_loss("pgd"), CPU, None)) is EagerStep
    cuda = Runtime(device=torch.device("cuda"), bf16=True, channels_last=True)
    assert type(make_step(model, make_loss("pgd"), cuda, None, cuda_graphs=False)) is EagerStep
    assert type(make_step(model, make_loss("pgd"), cuda, None)) is GraphedStep


# ---------------------------------------------------------------------------------------------------
# The real capture, where CUDA is present

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return (a & b).sum().item() / max((a | b).sum().item(), 1)


@needs_cuda
@pytest.mark.parametrize("loss", ["pgd", "trades"])
def test_cuda_graph_prune_epoch_matches_eager(loss):
    from study.trial.models import create_model
    from study.trial.data import dataset_info

    dev = torch.device("cuda")
    runtime = Runtime(device=dev, bf16=True, channels_last=True)
    torch.manual_seed(0)
    base = create_model("resnet18", dataset_info("cifar10")).to(dev).to(memory_format=torch.channels_last)
    g = torch.Generator(device=dev).manual_seed(0)
    data = [(torch.rand(64, 3, 32, 32, device=dev, generator=g), torch.randint(0, 10, (64,), device=dev, generator=g))
            for _ in range(12)]
    results = {}
    for name, graphs in (("eager", False), ("graphed", True)):
        model = copy.deepcopy(base)
        pruning.make_prunable(model)
        pruning.init_scores(model, "ssi")
        pruning.refresh_masks(model, 0.1, "layer")
        pruning.set_mode(model, "scores")
        for pname, p in model.named_parameters():
            p.requires_grad_(pname.endswith("scores"))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        gen = torch.Generator(device=dev).manual_seed(1)
        step_fn = make_step(model, make_loss(loss), runtime, gen, cuda_graphs=graphs)
        refresh = lambda m=model: pruning.refresh_masks(m, 0.1, "layer")  # noqa: E731
        m = train_epoch(model, data, make_loss(loss), opt, sched, lambda s: AttackStrength(8 / 255 * (s + 1) / 12, 5,
                        2 / 255), runtime, gen, refresh, step_fn=step_fn)
        results[name] = (m, {n: l.mask.clone() for n, l in pruning.masked_layers(model)}, step_fn)
    (me, masks_e, _), (mg, masks_g, step_g) = results["eager"], results["graphed"]
    assert step_g.replays == 12 - 3  # 3 warm-up steps, then every step replayed
    assert mg["train_loss"] == pytest.approx(me["train_loss"], rel=0.05)
    for name in masks_e:
        assert jaccard(masks_e[name], masks_g[name]) >= 0.99, name
