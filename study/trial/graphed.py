"""The training step (every attack iteration, the loss, the backward pass) replayed as one CUDA graph.

A PGD-10 step of resnet18 at batch 256 is about 4,000 kernel launches; eagerly, the GPU waits on Python for
about half of each step. Captured once and replayed, the step costs one launch. What may change between
replays lives in static device tensors, filled before each replay without a host sync: the batch, the attack's
eps and step size (a stage's eps schedule advances per step), and the random-start noise, drawn from the
trial's generator exactly as the eager attack draws it (so both consume the same random numbers). The optimizer
step, the learning-rate schedule and HYDRA's mask refresh stay eager (a few multi-tensor kernels): learning
rates, resume and the optimizer's state dict work unchanged.

Replayed only where the step is the same graph: the captured batch shape (an epoch's smaller last batch runs
eagerly) and attack steps, and eps > 0 (eager skips the attack at eps 0). The first `warmup` steps of a
stage run eagerly (CUDA initialises its libraries lazily; torch wants warm-up before a capture), on a side
stream as torch's documentation asks. A capture that fails falls back to eager for the rest of the stage,
with one warning.

On a CPU there is no graph: `TrainStep` is eager there. `EmulatedGraph` re-runs the captured function on the
static tensors and undoes what the capture itself computed, so that the static-tensor plumbing can be checked
against eager on a CPU (tests only).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from study.trial.attacks import AttackStrength, PresetNoise
from study.trial.pruning import masked_layers

log = logging.getLogger(__name__)

StepOutput = tuple[torch.Tensor, torch.Tensor]  # (loss, logits); the parameters' .grad hold the gradients


class EagerStep:
    """One training step's forward and backward, run eagerly (the reference every replay must match)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, runtime, generator: torch.Generator | None):
        self.model, self.loss_fn, self.runtime, self.generator = model, loss_fn, runtime, generator
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.replays = 0  # steps that ran as a graph replay (0 here)
        self.cast_cache = True  # autocast's cache of weight casts (off in a graphed step's every step)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, strength: AttackStrength) -> StepOutput:
        for p in self.params:
            p.grad = None
        with self.runtime.autocast(cache=self.cast_cache):
            loss, logits = self.loss_fn(self.model, x, y, strength, self.generator)
        loss.backward()
        return loss, logits


class CudaGraph:
    """torch.cuda.CUDAGraph: capture records the kernels without running them; replay runs them."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], StepOutput], model: nn.Module) -> StepOutput:
        # thread_local: a trial runs in Tune's function-trainable thread; CUDA calls another thread of the
        # worker might make meanwhile must not invalidate this thread's capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class EmulatedGraph:
    """A CPU stand-in with a CUDA graph's semantics, for tests: outputs are static tensors that each replay
    overwrites, and capturing runs nothing that stays (the model's buffers, e.g. BatchNorm's running
    statistics, are put back after the function ran once to build the outputs)."""

    def __init__(self) -> None:
        self.fn: Callable[[], StepOutput] | None = None
        self.outputs: StepOutput | None = None
        self.grads: list[tuple[nn.Parameter, torch.Tensor]] = []

    def capture(self, fn: Callable[[], StepOutput], model: nn.Module) -> StepOutput:
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.fn, self.outputs = fn, tuple(t.detach().clone() for t in fn())
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        params = [p for p in model.parameters() if p.grad is not None]
        self.grads = [(p, p.grad.detach().clone()) for p in params]  # static gradient tensors
        for p, g in self.grads:
            p.grad = g
        return self.outputs

    def replay(self) -> None:
        # A replay writes the static gradient tensors; it does not touch what `.grad` currently points at.
        current = [p.grad for p, _ in self.grads]
        for p, _ in self.grads:
            p.grad = None
        fresh = self.fn()
        for static, new in zip(self.outputs, fresh):
            static.copy_(new.detach())
        for (p, g), before in zip(self.grads, current):
            g.copy_(p.grad)
            p.grad = before


class GraphedStep(EagerStep):
    """The step captured once per stage and replayed (see the module's docstring)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, runtime, generator: torch.Generator | None, *,
                 warmup: int = 3, graph_factory: Callable[[], object] | None = None):
        super().__init__(model, loss_fn, runtime, generator)
        self.warmup = warmup
        self.graph_factory = graph_factory or CudaGraph
        self.graph = None
        self.failed = False
        self.eager_steps = 0
        self._cuda = runtime.device.type == "cuda" and graph_factory is None
        # The eager steps run under the capture's autocast settings: torch.compile guards on them, and a model
        # compiled under other settings would recompile inside the capture (inductor's autotuning draws random
        # numbers there, which breaks the capture and leaves CUDA's generator unusable: seen on an H200).
        self.cast_cache = False

    def __call__(self, x: torch.Tensor, y: torch.Tensor, strength: AttackStrength) -> StepOutput:
        if self.failed or not self._replayable(x, strength):
            return self._eager(x, y, strength)
        if self.graph is None:
            if self.eager_steps < self.warmup:
                return self._eager(x, y, strength)
            self._capture(x, y, strength)
            if self.graph is None:
                return self._eager(x, y, strength)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.eps.fill_(strength.eps)
        self.step_size.fill_(strength.step_size)
        if self.noise.draws:  # the values the eager attack's torch.rand would draw from the generator
            self.noise.tensor.uniform_(0, 1, generator=self.generator)
        self.graph.replay()
        for p, g in self.grads:
            p.grad = g
        self.replays += 1
        return self.loss, self.logits

    def _replayable(self, x: torch.Tensor, strength: AttackStrength) -> bool:
        if strength.eps <= 0:
            return False  # eager skips the attack at eps 0; a replay would run it (same x_adv, more BN counts)
        if self.graph is None:
            return True
        return x.shape == self.static_x.shape and strength.steps == self.steps

    def _eager(self, x: torch.Tensor, y: torch.Tensor, strength: AttackStrength) -> StepOutput:
        self.eager_steps += 1
        if not self._cuda:
            return super().__call__(x, y, strength)
        side = torch.cuda.Stream()  # torch's advice for the steps before a capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = super().__call__(x, y, strength)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, x: torch.Tensor, y: torch.Tensor, strength: AttackStrength) -> None:
        self.static_x = x.clone()  # same memory format (channels_last on CUDA)
        self.static_y = y.clone()
        self.eps = torch.zeros((), device=x.device, dtype=torch.float32)
        self.step_size = torch.zeros((), device=x.device, dtype=torch.float32)
        self.noise = PresetNoise(torch.zeros_like(x, memory_format=torch.contiguous_format))
        self.steps = strength.steps
        static = AttackStrength(eps=self.eps, steps=strength.steps, step_size=self.step_size)

        def body() -> StepOutput:
            with self.runtime.autocast(cache=self.cast_cache):  # off: autocast's cast cache must stay out of a graph
                loss, logits = self.loss_fn(self.model, self.static_x, self.static_y, static, self.noise)
            loss.backward()
            return loss.detach(), logits.detach()

        for p in self.params:
            p.grad = None  # the capture allocates the gradients in the graph's memory: replays write them
        _invalidate_masks(self.model)  # the masked weights are built inside the graph, from the live scores
        graph = self.graph_factory()
        try:
            self.loss, self.logits = graph.capture(body, self.model)
            if self.noise.draws > 1:
                raise RuntimeError(f"the loss drew random-start noise {self.noise.draws} times; one is supported")
        except Exception as e:  # noqa: BLE001 - any capture failure: the stage goes on eagerly
            self.failed = True
            for p in self.params:
                p.grad = None
            log.warning("CUDA graph capture of the training step failed (%s: %s); this stage runs eagerly",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return
        finally:
            _invalidate_masks(self.model)  # no eager forward may reuse a weight built in the graph's memory
        self.grads = [(p, p.grad) for p in self.params if p.grad is not None]
        self.graph = graph


def _invalidate_masks(model: nn.Module) -> None:
    for _, layer in masked_layers(model):
        layer.invalidate()


def make_step(model: nn.Module, loss_fn: Callable, runtime, generator: torch.Generator | None, *,
              cuda_graphs: bool = True) -> EagerStep:
    """The step a stage trains with: graphed on CUDA (unless `cuda_graphs` is off), eager elsewhere."""
    if cuda_graphs and runtime.device.type == "cuda":
        return GraphedStep(model, loss_fn, runtime, generator)
    return EagerStep(model, loss_fn, runtime, generator)
