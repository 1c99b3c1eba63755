"""Masked layers, importance-score inits, top-k masks (per layer or global), export and size figures.

HYDRA (Sehwag et al. 2020): every conv and linear layer gets a score tensor shaped like its weight; the
forward pass uses `weight * mask(|scores|)` where the mask keeps the top-k |scores|, with a straight-through
(identity) gradient through the top-k onto |scores|, hence d/dscores = sign(scores) * weight * upstream.
Masks change only when scores change, so they are computed once per optimizer step (`refresh_masks`),
never once per attack iteration. With a fixed mask (fine-tuning, LWM, random)
the mask is baked into the weights as hard zeros and a gradient hook keeps them zero, so the layer costs
what a dense layer costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from study.registry import Registry

MODES = ("dense", "scores", "fixed")


def autocast_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype an active autocast casts `weight` to in a conv or linear (both lower-precision ops), or
    None when it leaves it alone: autocast off, or a weight it never casts (float64, already that dtype)."""
    device = weight.device.type
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if weight.dtype in (dtype, torch.float64) or not weight.is_floating_point() else dtype


class MaskedMixin:
    """State shared by masked conv and linear layers.

    mode "dense": plain weight (pretraining). mode "scores": weight * STE(mask) with `scores` trainable
    (prune stage). mode "fixed": the mask is baked into `weight` and its gradient is masked (fine-tune).
    """

    weight: nn.Parameter

    def _init_masking(self) -> None:
        self.scores = nn.Parameter(torch.ones_like(self.weight), requires_grad=False)
        self.register_buffer("mask", torch.ones_like(self.weight))
        self.mode = "dense"
        self._hook = None
        self._cache: tuple[tuple[bool, torch.dtype | None], torch.Tensor] | None = None

    def effective_weight(self) -> torch.Tensor:
        if self.mode != "scores":
            return self.weight
        # Built once per mask refresh (i.e. once per optimizer step), reused by every attack iteration;
        # attack steps differentiate w.r.t. the input only, so they never traverse (or free) this graph.
        # Keyed by grad mode and the autocast dtype: under bf16 autocast the cached tensor is the bf16 copy,
        # cast once per step instead of once per forward (autocast caches casts of leaf weights only, and
        # the masked weight is not a leaf). Same values and gradients as autocast casting it itself.
        key = (torch.is_grad_enabled(), autocast_dtype(self.weight))
        if self._cache is None or self._cache[0] != key:
            # HYDRA's `weight * GetSubnet.apply(scores.abs(), k)`: value weight * mask, identity backward
            # through the top-k onto |scores|, so d/dscores = sign(scores) * weight * upstream (sign(0) = 0,
            # as in torch's abs backward). The sign matters: ssi scores are signed.
            a = self.scores.abs()
            w = self.weight * (self.mask + (a - a.detach()))
            self._cache = (key, w if key[1] is None else w.to(key[1]))
        return self._cache[1]

    def invalidate(self) -> None:
        self._cache = None

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown masking mode {mode!r}; valid: {', '.join(MODES)}")
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.invalidate()
        if mode == "fixed":
            with torch.no_grad():
                self.weight.mul_(self.mask)
            self.weight.requires_grad_(True)  # fixed mode is the fine-tune stage: weights train, zeros stay
            self._hook = self.weight.register_hook(lambda g, m=self.mask: g * m)
        self.mode = mode


class MaskedConv2d(MaskedMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class MaskedLinear(MaskedMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


def make_prunable(model: nn.Module) -> nn.Module:
    """Swap every nn.Conv2d / nn.Linear for its masked twin in place (weights shared, mode dense)."""
    for name, child in list(model.named_children()):
        if type(child) is nn.Conv2d:
            new = MaskedConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                               child.padding, child.dilation, child.groups, child.bias is not None,
                               child.padding_mode, device=child.weight.device, dtype=child.weight.dtype)
        elif type(child) is nn.Linear:
            new = MaskedLinear(child.in_features, child.out_features, child.bias is not None,
                               device=child.weight.device, dtype=child.weight.dtype)
        else:
            make_prunable(child)
            continue
        new.weight = child.weight
        if child.bias is not None:
            new.bias = child.bias
        new._init_masking()
        setattr(model, name, new)
    return model


def masked_layers(model: nn.Module) -> Iterator[tuple[str, MaskedMixin]]:
    for name, m in model.named_modules():
        if isinstance(m, MaskedMixin):
            yield name, m


def set_mode(model: nn.Module, mode: str) -> None:
    for _, layer in masked_layers(model):
        layer.set_mode(mode)


# ---------------------------------------------------------------------------------------------------
# Top-k masks


def keep_count(numel: int, keep_fraction: float) -> int:
    """Weights kept out of `numel`: round(k * n), at least one (a layer never disappears)."""
    return max(1, min(numel, int(round(keep_fraction * numel))))


def _topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k ones at the k largest values (ties broken by index, so the count is exact)."""
    flat = values.flatten()
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat, k, sorted=False).indices] = 1.0
    return mask.view_as(values)


@torch.no_grad()
def compute_masks(values: list[torch.Tensor], keep_fraction: float, scope: str) -> list[torch.Tensor]:
    """Masks keeping the largest |values|: k of each tensor ("layer") or k of all together ("global")."""
    if scope == "layer":
        return [_topk_mask(v.abs(), keep_count(v.numel(), keep_fraction)) for v in values]
    if scope == "global":
        flat = torch.cat([v.abs().flatten().float() for v in values])
        mask = _topk_mask(flat, keep_count(flat.numel(), keep_fraction))
        return [m.view_as(v).to(v.dtype) for m, v in zip(mask.split([v.numel() for v in values]), values)]
    raise ValueError(f"unknown pruning scope {scope!r}; valid: layer, global")


@torch.no_grad()
def refresh_masks(model: nn.Module, keep_fraction: float, scope: str) -> None:
    """Recompute every layer's mask from its scores (once per optimizer step in the prune stage)."""
    layers = [m for _, m in masked_layers(model)]
    for layer, mask in zip(layers, compute_masks([m.scores for m in layers], keep_fraction, scope)):
        layer.mask.copy_(mask)
        layer.invalidate()


# ---------------------------------------------------------------------------------------------------
# Score initialisations


ScoreInit = Callable[[nn.Module, "SnipBatch | None"], None]
SCORE_INITS: Registry[ScoreInit] = Registry("score init")


@dataclass
class SnipBatch:
    """What SNIP needs: one batch and the loss to differentiate."""

    x: torch.Tensor
    y: torch.Tensor
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def _fill_each(fill: Callable[[torch.Tensor, torch.Tensor], None]) -> ScoreInit:
    def init(model: nn.Module, batch: SnipBatch | None = None) -> None:
        with torch.no_grad():
            for _, layer in masked_layers(model):
                fill(layer.scores, layer.weight)

    return init


SCORE_INITS.register("kaiming_normal")(_fill_each(lambda s, w: nn.init.kaiming_normal_(s)))
SCORE_INITS.register("kaiming_uniform")(_fill_each(lambda s, w: nn.init.kaiming_uniform_(s)))
SCORE_INITS.register("xavier_normal")(_fill_each(lambda s, w: nn.init.xavier_normal_(s)))
SCORE_INITS.register("xavier_uniform")(_fill_each(lambda s, w: nn.init.xavier_uniform_(s)))
SCORE_INITS.register("uniform")(_fill_each(lambda s, w: nn.init.uniform_(s)))


def _ssi(s: torch.Tensor, w: torch.Tensor) -> None:
    fan_in = nn.init._calculate_fan_in_and_fan_out(w)[0]
    s.copy_(math.sqrt(6.0 / fan_in) * w / w.abs().max().clamp_min(1e-12))


SCORE_INITS.register("ssi")(_fill_each(_ssi))


@SCORE_INITS.register("snip")
def _snip(model: nn.Module, batch: SnipBatch | None = None) -> None:
    """SNIP connection sensitivity |dL/dw * w| from one batch (Lee et al. 2019)."""
    if batch is None:
        raise ValueError("score init 'snip' needs a batch of training data")
    layers = [m for _, m in masked_layers(model)]
    weights = [m.weight for m in layers]
    was_training = model.training
    model.eval()
    loss_fn = batch.loss_fn or (lambda mdl, x, y: F.cross_entropy(mdl(x), y))
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(model, batch.x, batch.y), weights, allow_unused=True)
    model.train(was_training)
    with torch.no_grad():
        for layer, g in zip(layers, grads):
            g = torch.zeros_like(layer.weight) if g is None else g
            layer.scores.copy_((g * layer.weight).abs())


def init_scores(model: nn.Module, name: str, batch: SnipBatch | None = None) -> None:
    SCORE_INITS.get(name)(model, batch)


def random_scores(model: nn.Module, generator: torch.Generator) -> None:
    """Scores for the random-pruning baseline (seeded)."""
    with torch.no_grad():
        for _, layer in masked_layers(model):
            r = torch.rand(layer.scores.shape, generator=generator, device=generator.device)
            layer.scores.copy_(r.to(layer.scores.device))


# ---------------------------------------------------------------------------------------------------
# Export and size figures


@torch.no_grad()
def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain (unmasked) state dict with hard zeros: loads into the dense architecture."""
    out: dict[str, torch.Tensor] = {}
    masked = dict(masked_layers(model))
    for name, tensor in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        layer = masked.get(owner)
        if layer is not None and leaf in ("scores", "mask"):
            continue
        if layer is not None and leaf == "weight" and layer.mode != "dense":
            # +0.0 where pruned (tensor * mask would give -0.0 for a negative weight): the sparse file stores
            # no zeros, and gives them back as +0.0 (study.trial.sparse_file)
            tensor = torch.where(layer.mask != 0, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
        out[name] = tensor.detach().clone()
    return out


@dataclass(frozen=True)
class SizeReport:
    params_total: int  # every parameter of the model (prunable weights, biases, BatchNorm)
    params_kept: int  # non-zero prunable weights + every non-prunable parameter
    prunable_total: int
    prunable_kept: int
    sparsity: float  # zeros among prunable weights
    compression: float  # params_total / params_kept
    dense_bytes: int  # fp32, stored densely
    sparse_bytes: int  # fp32 values of kept weights + a 1-bit mask per prunable weight + dense rest

    def as_metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


PARAMETER_LEAVES = ("weight", "bias")  # every parameter of every arch (conv, linear, BatchNorm affine)


def size_report(state: dict[str, torch.Tensor], prunable: set[str]) -> SizeReport:
    """Size figures counted from exported weights (zeros in the tensors, not a configured rate).

    Only parameters count: the `weight`/`bias` entries (conv, linear, BatchNorm affine; tests/test_models
    checks no arch owns any other kind). Buffers do not: BatchNorm's running_mean/running_var/
    num_batches_tracked and the input Normalize layer's mean/std are statistics and constants.
    """
    total = kept = p_total = p_kept = mask_bits = 0
    for name, t in state.items():
        if name.rpartition(".")[2] not in PARAMETER_LEAVES or not t.is_floating_point():
            continue
        n = t.numel()
        total += n
        if name in prunable:
            nz = int(torch.count_nonzero(t))
            p_total, p_kept, kept, mask_bits = p_total + n, p_kept + nz, kept + nz, mask_bits + n
        else:
            kept += n
    sparse_bytes = 4 * kept + math.ceil(mask_bits / 8)
    return SizeReport(
        params_total=total, params_kept=kept, prunable_total=p_total, prunable_kept=p_kept,
        sparsity=1.0 - p_kept / max(p_total, 1), compression=total / max(kept, 1),
        dense_bytes=4 * total, sparse_bytes=min(sparse_bytes, 4 * total),
    )


def prunable_weight_names(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name, _ in masked_layers(model)}
