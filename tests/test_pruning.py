"""Masked layers against an independent re-implementation of HYDRA's GetSubnet, exact top-k counts written
out by hand, score inits, export and size figures (hand-counted), and HYDRA's prune stage on digits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from study.trial import pipeline, pruning
from study.trial.config import DataConfig, PruneConfig, trial_from_dict
from study.trial.data import dataset_info, load_dataset
from study.trial.models import create_model
from study.trial.pruning import SCORE_INITS, SnipBatch


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


# tiny_net counted by hand: conv 1->6 3x3 (54 weights, 6 biases), conv 6->8 3x3 (432, 8), linear 288->10
# (2880, 10). Fan-in = in_channels x 3 x 3, or in_features.
LAYER_NUMEL = (54, 432, 2880)
FAN_IN = (9, 54, 288)
BIASES = 6 + 8 + 10


def prunable_net() -> nn.Module:
    return pruning.make_prunable(tiny_net())


def layers_of(model: nn.Module) -> list:
    return [m for _, m in pruning.masked_layers(model)]


def test_make_prunable_swaps_every_conv_and_linear_and_keeps_the_function():
    dense = tiny_net()
    x = torch.rand(4, 1, 8, 8)
    expected = dense(x)
    masked = pruning.make_prunable(dense)
    kinds = [type(m) for _, m in pruning.masked_layers(masked)]
    assert kinds == [pruning.MaskedConv2d, pruning.MaskedConv2d, pruning.MaskedLinear]
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in masked.modules())
    torch.testing.assert_close(masked(x), expected)


# ---------------------------------------------------------------------------------------------------
# Top-k: exact counts (integers worked out by hand) of the largest |scores|


def test_keep_count_is_round_k_n_and_at_least_one():
    assert pruning.keep_count(54, 0.5) == 27
    assert pruning.keep_count(54, 0.1) == 5  # 5.4
    assert pruning.keep_count(432, 0.1) == 43  # 43.2
    assert pruning.keep_count(54, 0.013) == 1  # 0.702 rounds to 1
    assert pruning.keep_count(10, 0.001) == 1  # 0.01 rounds to 0: a layer never disappears
    assert pruning.keep_count(7, 1.0) == 7


@pytest.mark.parametrize("keep, expected", [
    (0.5, (27, 216, 1440)),
    (0.1, (5, 43, 288)),  # 5.4, 43.2, 288
    (0.013, (1, 6, 37)),  # 0.702, 5.616, 37.44
])
def test_layer_scope_keeps_exactly_k_of_every_layer_at_the_largest_magnitudes(keep, expected):
    model = prunable_net()
    pruning.init_scores(model, "kaiming_normal")  # signed scores
    pruning.refresh_masks(model, keep, "layer")
    for layer, n_keep in zip(layers_of(model), expected):
        kept = layer.mask.bool()
        assert int(kept.sum()) == n_keep
        assert set(layer.mask.unique().tolist()) <= {0.0, 1.0}
        assert layer.scores.abs()[kept].min() > layer.scores.abs()[~kept].max()


@pytest.mark.parametrize("keep, expected", [(0.3, 1010), (0.05, 168)])  # of 3366: 1009.8, 168.3
def test_global_scope_keeps_exactly_k_overall_and_the_largest_magnitudes(keep, expected):
    model = prunable_net()
    pruning.init_scores(model, "kaiming_uniform")
    pruning.refresh_masks(model, keep, "global")
    layers = layers_of(model)
    assert int(sum(m.mask.sum() for m in layers)) == expected
    kept = torch.cat([m.scores.abs()[m.mask.bool()] for m in layers])
    dropped = torch.cat([m.scores.abs()[~m.mask.bool()] for m in layers])
    assert kept.min() > dropped.max()
    # global ranking differs from per-layer: at least one layer keeps a share other than k
    shares = [float(m.mask.mean()) for m in layers]
    assert max(abs(s - keep) for s in shares) > 0.01


@pytest.mark.parametrize("scope, expected", [("layer", (14, 108, 720)), ("global", (842,))])
def test_ties_still_keep_exactly_k(scope, expected):
    # 0.25 * (54, 432, 2880) = 13.5 (rounds to even: 14), 108, 720; 0.25 * 3366 = 841.5 -> 842
    model = prunable_net()
    with torch.no_grad():
        for layer in layers_of(model):
            layer.scores.fill_(-1.0)
    pruning.refresh_masks(model, 0.25, scope)
    counts = tuple(int(m.mask.sum()) for m in layers_of(model))
    assert (counts if scope == "layer" else (sum(counts),)) == expected


def _hand_example():
    """One 4 -> 2 linear layer with hand-set weights and signed scores, masks refreshed for keep 0.5
    per layer (k = 4 of 8: |s| = 5, 4, 3, 2)."""
    model = pruning.make_prunable(nn.Sequential(nn.Linear(4, 2, bias=False)))
    layer = model[0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 6.0, -7.0, 8.0]]))
        layer.scores.copy_(torch.tensor([[-5.0, 1.0, -0.5, 4.0], [0.0, -3.0, 2.0, 0.1]]))
    pruning.refresh_masks(model, 0.5, "layer")
    return model, layer


def test_top_k_ranks_magnitudes_not_signed_scores_hand_example():
    model, layer = _hand_example()
    assert torch.equal(layer.mask, torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]))
    # global: 3 of 7 (round(2.8)) -> |s| 5, 4, 3; signed ranking would keep 3, 2, 1
    a, b = torch.tensor([-5.0, 1.0, 0.5]), torch.tensor([[-4.0, 2.0], [-0.1, 3.0]])
    ma, mb = pruning.compute_masks([a, b], 0.4, "global")
    assert torch.equal(ma, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(mb, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_score_gradient_is_sign_times_weight_times_upstream_hand_example():
    """HYDRA: w_eff = w * GetSubnet(|s|), identity backward => dL/ds = sign(s) * w * dL/dw_eff."""
    model, layer = _hand_example()
    pruning.set_mode(model, "scores")
    layer.weight.requires_grad_(False)
    layer.scores.requires_grad_(True)
    x = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    out = model(x)
    # w_eff = [[1, 0, 0, -4], [0, 6, -7, 0]]: out = [1 - 2, 12 + 7]
    assert torch.equal(out, torch.tensor([[-1.0, 19.0]]))
    (out * torch.tensor([[2.0, -1.0]])).sum().backward()
    # dL/dw_eff = r x^T = [[2, 4, -2, 1], [-1, -2, 1, -0.5]]; times w = [[2, -8, -6, -4], [-0.5, -12, -7, -4]];
    # times sign(s) = [[-1, 1, -1, 1], [0, -1, 1, 1]] (the zero score gets no gradient, as |s| in torch)
    expected = torch.tensor([[-2.0, -8.0, 6.0, -4.0], [0.0, 12.0, -7.0, -4.0]])
    assert torch.equal(layer.scores.grad, expected)


# ---------------------------------------------------------------------------------------------------
# Differential test against HYDRA's GetSubnet, re-implemented here independently


class RefGetSubnet(torch.autograd.Function):
    """HYDRA's utils/model.py GetSubnet: sort ascending, zeros at the n - k smallest, ones at the rest;
    identity backward. k as this project defines it: round(frac * n), at least 1."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, frac: float) -> torch.Tensor:  # noqa: D102
        n = values.numel()
        k = max(1, round(frac * n))
        _, idx = values.flatten().sort()
        flat = torch.empty(n, dtype=values.dtype)
        flat[idx[: n - k]] = 0.0
        flat[idx[n - k:]] = 1.0
        return flat.view_as(values)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: D102
        return g, None


class GivenSubnet(torch.autograd.Function):
    """A given 0/1 mask with GetSubnet's identity backward (for ties, where any k of the equals is right)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return mask.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: D102
        return g, None


def reference_masks(scores: list[torch.Tensor], frac: float, scope: str) -> list[torch.Tensor]:
    mags = [s.abs() for s in scores]
    if scope == "layer":
        return [RefGetSubnet.apply(m, frac) for m in mags]
    flat = RefGetSubnet.apply(torch.cat([m.flatten() for m in mags]), frac)
    return [part.view_as(m) for part, m in zip(flat.split([m.numel() for m in mags]), mags)]


def assert_no_tie_at_the_cut(scores: list[torch.Tensor], frac: float, scope: str) -> None:
    """Precondition of an exact mask comparison: the k-th and (k+1)-th largest |s| differ."""
    groups = [s.abs().flatten() for s in scores]
    if scope == "global":
        groups = [torch.cat(groups)]
    for g in groups:
        k = max(1, round(frac * g.numel()))
        if k < g.numel():
            top = g.sort(descending=True).values
            assert top[k - 1] > top[k], "test setup: a tie at the top-k cut"


def compare_with_reference(model: nn.Module, frac: float, scope: str, *, ties: bool = False) -> list[torch.Tensor]:
    """Outputs and score gradients of the project's masked layers vs HYDRA's w * GetSubnet(|s|) on the
    same (plain) net; returns the project's score gradients."""
    names = [n for n, _ in pruning.masked_layers(model)]
    layers = layers_of(model)
    scores = [m.scores.detach().clone() for m in layers]
    weights = [m.weight.detach().clone() for m in layers]
    if not ties:
        assert_no_tie_at_the_cut(scores, frac, scope)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.rand(6, 1, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)

    pruning.refresh_masks(model, frac, scope)
    pruning.set_mode(model, "scores")
    for m in layers:
        m.weight.requires_grad_(False)
        m.bias.requires_grad_(False)
        m.scores.requires_grad_(True)
    out = model(x)
    grads = torch.autograd.grad(F.cross_entropy(out, y), [m.scores for m in layers])

    ref_scores = [s.clone().requires_grad_(True) for s in scores]
    if ties:
        masks = [GivenSubnet.apply(s.abs(), m.mask) for s, m in zip(ref_scores, layers)]
    else:
        masks = reference_masks(ref_scores, frac, scope)
        for m, ref in zip(layers, masks):
            assert torch.equal(m.mask, ref.detach())
    plain = tiny_net()  # the same seed: the same weights and biases
    for (name, _), w in zip(pruning.masked_layers(model), weights):
        assert torch.equal(plain.get_submodule(name).weight, w)
    params = {f"{name}.weight": w * m for name, w, m in zip(names, weights, masks)}
    ref_out = functional_call(plain, params, (x,))
    ref_grads = torch.autograd.grad(F.cross_entropy(ref_out, y), ref_scores)

    assert torch.allclose(out, ref_out, rtol=1e-6, atol=1e-7)
    for g, ref in zip(grads, ref_grads):
        assert torch.allclose(g, ref, rtol=1e-5, atol=1e-9)
    assert sum(g.abs().sum() for g in grads) > 0  # (a layer behind a dead one can get none at 2% kept)
    return list(grads)


def random_signs(t: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randint(0, 2, t.shape, generator=torch.Generator().manual_seed(seed)).float() * 2 - 1


@pytest.mark.parametrize("frac", [0.3, 0.02])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("signs", ["as_initialised", "mixed"])
@pytest.mark.parametrize("init", SCORE_INITS.names())
def test_masked_layers_match_hydra_getsubnet(init, signs, scope, frac):
    model = prunable_net()
    gen = torch.Generator().manual_seed(1)
    batch = SnipBatch(torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen))
    pruning.init_scores(model, init, batch)
    if signs == "mixed":
        with torch.no_grad():
            for i, layer in enumerate(layers_of(model)):
                layer.scores.mul_(random_signs(layer.scores, i))
    assert any((m.scores < 0).any() for m in layers_of(model)) or init in ("uniform", "snip")
    compare_with_reference(model, frac, scope)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_all_negative_scores_match_hydra(scope):
    model = prunable_net()
    pruning.init_scores(model, "kaiming_normal")
    with torch.no_grad():
        for layer in layers_of(model):
            layer.scores.copy_(-layer.scores.abs())
    grads = compare_with_reference(model, 0.2, scope)
    # every score is negative, so the gradient is -(w * upstream): opposite to the weight-times-upstream
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("frac", [0.5, 1.0])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_zero_scores_match_hydra_and_get_no_gradient(scope, frac):
    model = prunable_net()
    pruning.init_scores(model, "kaiming_normal")
    zeros = []
    with torch.no_grad():
        for i, layer in enumerate(layers_of(model)):
            z = torch.rand(layer.scores.shape, generator=torch.Generator().manual_seed(10 + i)) < 0.1
            layer.scores[z] = 0.0
            zeros.append(z)
    grads = compare_with_reference(model, frac, scope)
    for g, z, layer in zip(grads, zeros, layers_of(model)):
        assert z.any()
        assert (g[z] == 0).all()  # sign(0) = 0, kept (frac 1.0) or not
        if frac == 1.0:
            assert bool(layer.mask[z].all())


@pytest.mark.parametrize("scope, expected", [("layer", (14, 108, 720)), ("global", (842,))])
def test_tied_magnitudes_keep_exactly_k_and_gradients_match_on_that_mask(scope, expected):
    model = prunable_net()
    with torch.no_grad():
        for i, layer in enumerate(layers_of(model)):
            layer.scores.copy_(random_signs(layer.scores, 20 + i))  # every |s| = 1
    compare_with_reference(model, 0.25, scope, ties=True)
    counts = tuple(int(m.mask.sum()) for m in layers_of(model))
    assert (counts if scope == "layer" else (sum(counts),)) == expected


# ---------------------------------------------------------------------------------------------------
# Score inits


def test_ssi_scores_are_scaled_weights_and_start_at_the_magnitude_mask():
    model = prunable_net()
    pruning.init_scores(model, "ssi")
    for layer, fan_in in zip(layers_of(model), FAN_IN):
        w = layer.weight.detach()
        expected = math.sqrt(6.0 / fan_in) * w / w.abs().max()
        assert torch.allclose(layer.scores, expected, rtol=1e-6, atol=0.0)
    pruning.refresh_masks(model, 0.2, "layer")
    for layer, n_keep in zip(layers_of(model), (11, 86, 576)):  # round(10.8), round(86.4), 576
        kept = layer.mask.bool()
        assert int(kept.sum()) == n_keep
        assert layer.weight.abs()[kept].min() > layer.weight.abs()[~kept].max()  # = LWM


@pytest.mark.parametrize("name", SCORE_INITS.names())
def test_every_score_init_fills_scores_and_yields_a_valid_mask(name):
    model = prunable_net()
    batch = SnipBatch(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    pruning.init_scores(model, name, batch)
    for layer in layers_of(model):
        assert torch.isfinite(layer.scores).all()
        assert layer.scores.abs().sum() > 0
        assert not torch.equal(layer.scores, torch.ones_like(layer.scores))  # actually initialised
    pruning.refresh_masks(model, 0.1, "layer")
    assert [int(m.mask.sum()) for m in layers_of(model)] == [5, 43, 288]


def test_snip_scores_are_gradient_times_weight_magnitudes():
    model = prunable_net()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    plain = tiny_net()
    grads = torch.autograd.grad(F.cross_entropy(plain(x), y), [plain[0].weight, plain[2].weight, plain[5].weight])
    pruning.init_scores(model, "snip", SnipBatch(x, y))
    for layer, g, w in zip(layers_of(model), grads, [plain[0].weight, plain[2].weight, plain[5].weight]):
        assert torch.allclose(layer.scores, (g * w).abs(), rtol=1e-5, atol=1e-9)


def test_unknown_score_init_raises_with_the_valid_names():
    with pytest.raises(KeyError, match="valid choices: .*ssi"):
        pruning.init_scores(prunable_net(), "magic")


def test_snip_needs_a_batch():
    with pytest.raises(ValueError, match="snip"):
        pruning.init_scores(prunable_net(), "snip")


# ---------------------------------------------------------------------------------------------------
# Modes


def test_scores_mode_forward_uses_the_mask_and_gradients_reach_scores_only():
    model = prunable_net()
    pruning.init_scores(model, "kaiming_normal")
    pruning.refresh_masks(model, 0.3, "layer")
    pruning.set_mode(model, "scores")
    for layer in layers_of(model):
        layer.weight.requires_grad_(False)
        layer.scores.requires_grad_(True)
    x = torch.rand(4, 1, 8, 8)
    out = model(x)
    # the forward equals a dense net with hard-zeroed weights
    reference = tiny_net()
    reference.load_state_dict(pruning.export_state_dict(model))
    torch.testing.assert_close(out, reference(x))
    out.sum().backward()
    for layer in layers_of(model):
        assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0
        assert layer.weight.grad is None
        # straight-through: pruned scores get gradient too (so they can come back)
        assert layer.scores.grad[layer.mask == 0].abs().sum() > 0


def test_masked_weight_is_computed_once_per_refresh_not_per_forward():
    model = prunable_net()
    pruning.init_scores(model, "ssi")
    pruning.refresh_masks(model, 0.3, "layer")
    pruning.set_mode(model, "scores")
    layer = layers_of(model)[0]
    w1 = layer.effective_weight()
    assert layer.effective_weight() is w1  # attack iterations reuse it
    pruning.refresh_masks(model, 0.3, "layer")
    assert layer.effective_weight() is not w1  # a new optimizer step rebuilds it


def test_fixed_mode_bakes_hard_zeros_and_training_keeps_them():
    model = prunable_net()
    pruning.init_scores(model, "ssi")
    pruning.refresh_masks(model, 0.2, "layer")
    masks = [m.mask.clone() for m in layers_of(model)]
    pruning.set_mode(model, "fixed")
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.rand(4, 1, 8, 8)).pow(2).sum().backward()
        opt.step()
    for mask, layer in zip(masks, layers_of(model)):
        assert torch.equal(layer.mask, mask)
        assert (layer.weight[mask == 0] == 0).all()
        assert (layer.weight[mask == 1] != 0).float().mean() > 0.99


# ---------------------------------------------------------------------------------------------------
# Export and size figures (counted by hand)


def test_size_report_counts_the_zeros_in_the_exported_weights():
    model = prunable_net()
    pruning.init_scores(model, "ssi")
    pruning.refresh_masks(model, 0.1, "layer")
    pruning.set_mode(model, "fixed")
    state = pruning.export_state_dict(model)
    assert not any(k.endswith(("scores", "mask")) for k in state)
    size = pruning.size_report(state, pruning.prunable_weight_names(model))
    # 3366 prunable weights, 24 biases; kept 5 + 43 + 288 = 336 weights
    assert size.prunable_total == 3366 and size.prunable_kept == 336
    assert size.params_total == sum(LAYER_NUMEL) + BIASES == 3390 and size.params_kept == 360
    assert size.sparsity == pytest.approx(1 - 336 / 3366)
    assert size.compression == pytest.approx(3390 / 360)
    assert size.dense_bytes == 4 * 3390
    assert size.sparse_bytes == 4 * 360 + 421  # ceil(3366 / 8) = 421 mask bytes
    tiny_net().load_state_dict(state)  # exported weights load into the plain architecture


def test_size_report_of_a_dense_model_is_capped_at_dense_bytes():
    model = prunable_net()
    pruning.init_scores(model, "ssi")
    pruning.refresh_masks(model, 1.0, "layer")
    pruning.set_mode(model, "fixed")
    size = pruning.size_report(pruning.export_state_dict(model), pruning.prunable_weight_names(model))
    assert size.params_kept == size.params_total == 3390
    assert size.sparse_bytes == size.dense_bytes == 4 * 3390  # not 4 * 3390 + 421


def test_size_report_counts_batchnorm_affine_but_not_running_statistics_or_buffers():
    info = dataset_info("digits")  # 1 x 8 x 8, 10 classes
    torch.manual_seed(0)
    model = pruning.make_prunable(create_model("small_cnn", info, width=4))
    model.train()
    model(torch.rand(8, 1, 8, 8))  # running statistics move away from their init
    pruning.init_scores(model, "ssi")
    pruning.refresh_masks(model, 0.1, "layer")
    pruning.set_mode(model, "fixed")
    state = pruning.export_state_dict(model)
    assert any(k.endswith("running_mean") for k in state) and any(k.endswith("num_batches_tracked") for k in state)
    assert "normalize.mean" in state
    size = pruning.size_report(state, pruning.prunable_weight_names(model))
    # By hand. Convs (no bias): 1*4*9 = 36, 4*8*9 = 288, 8*8*9 = 576; BatchNorm weight + bias: 2*(4 + 8 + 8)
    # = 40; linear 8*16 -> 16: 2048 + 16; linear 16 -> 10: 160 + 10. Not parameters: running_mean/var,
    # num_batches_tracked, the Normalize layer's mean/std.
    prunable = 36 + 288 + 576 + 2048 + 160
    other = 40 + 16 + 10
    assert size.prunable_total == prunable == 3108
    assert size.params_total == prunable + other == 3174
    kept = 4 + 29 + 58 + 205 + 16  # round(0.1 * n): 3.6, 28.8, 57.6, 204.8, 16
    assert size.prunable_kept == kept
    assert size.params_kept == kept + other == 378
    assert size.dense_bytes == 4 * 3174
    assert size.sparse_bytes == 4 * 378 + 389  # ceil(3108 / 8) = 389


# ---------------------------------------------------------------------------------------------------
# The prune stage on digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"))


def _fit(model, sp, loss_fn, strength, stage, generator, after_step=None):
    from study.trial.data import batches
    from study.trial.engine import Runtime, make_optimizer, make_scheduler, train_epoch

    runtime = Runtime(torch.device("cpu"), bf16=False, channels_last=False)
    opt = make_optimizer(model.parameters(), stage)
    sched = make_scheduler(opt, stage, math.ceil(len(sp.x_train) / 64))
    for _ in range(stage.epochs):
        train_epoch(model, batches(sp.x_train, sp.y_train, 64, shuffle=True, generator=generator), loss_fn, opt,
                    sched, strength, runtime, generator, after_step)


def test_hydra_prune_stage_lowers_the_robust_loss_of_its_mask_below_lwm(digits):
    """PGD-AT dense small_cnn -> HYDRA (ssi init = the LWM mask) trains scores only (weights and BatchNorm
    frozen, so only the mask changes); the robust loss of the learned mask, on the same fixed batches
    under the same fixed-seed PGD, ends clearly below the LWM mask's."""
    from study.trial.attacks import AttackStrength
    from study.trial.config import StageConfig
    from study.trial.losses import make_loss

    sp = digits
    loss_fn = make_loss("pgd")
    train_attack = AttackStrength(eps=0.1, steps=3, step_size=0.04)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = create_model("small_cnn", sp.info, width=8)
    _fit(model, sp, loss_fn, train_attack, StageConfig(epochs=3, lr=0.05), gen)

    pruning.make_prunable(model)
    pruning.init_scores(model, "ssi")
    refresh = lambda: pruning.refresh_masks(model, 0.1, "layer")  # noqa: E731
    refresh()
    lwm = pruning.compute_masks([m.weight for m in layers_of(model)], 0.1, "layer")
    assert all(torch.equal(m.mask, w) for m, w in zip(layers_of(model), lwm))
    pruning.set_mode(model, "scores")
    pipeline._set_trainable(model, weights=False, scores=True, bn=False)
    frozen = {k: v.clone() for k, v in model.named_parameters() if not k.endswith("scores")}

    def robust_loss() -> float:
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        gen_eval = torch.Generator().manual_seed(123)
        eval_attack = AttackStrength(eps=0.1, steps=5, step_size=0.025)
        losses = [loss_fn(model, sp.x_train[i:i + 128], sp.y_train[i:i + 128], eval_attack, gen_eval)[0].item()
                  for i in range(0, 512, 128)]
        model.load_state_dict(saved)  # running statistics as they were
        refresh()
        return sum(losses) / len(losses)

    start = robust_loss()
    _fit(model, sp, loss_fn, train_attack, StageConfig(epochs=2, lr=0.1), gen, after_step=refresh)
    end = robust_loss()
    assert all(torch.equal(v, frozen[k]) for k, v in model.named_parameters() if k in frozen)
    assert any(not torch.equal(m.mask, w) for m, w in zip(layers_of(model), lwm))
    assert end < 0.75 * start, (start, end)


# ---------------------------------------------------------------------------------------------------
# BatchNorm in the prune stage (HYDRA trains its affine parameters unless --freeze-bn), via run_trial


TRIAL = {
    "seed": 1, "device": "cpu",
    "data": {"name": "digits", "batch_size": 64},
    "model": {"arch": "small_cnn", "width": 8},
    "pretrain_attack": {"loss": "pgd", "eps": 0.1, "steps": 2, "step_size": 0.5},
    "attack": {"loss": "pgd", "eps": 0.1, "steps": 2, "step_size": 0.5},
    "pretrain": {"epochs": 3, "lr": 0.05},
    "prune": {"method": "hydra", "keep_fraction": 0.1},
    "prune_stage": {"epochs": 2, "lr": 0.1},
    "finetune": {"epochs": 0, "lr": 0.1},
    "eval": {"steps": 3, "restarts": 1, "val_steps": 1},
}


@pytest.fixture(scope="module")
def trial_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrained")


def _prune_snapshots(cfg) -> tuple[dict, list[dict], pipeline.TrialResult]:
    seen = []

    def keep(report: pipeline.EpochReport) -> None:
        seen.append({"stage": report.stage, "model": {k: v.clone() for k, v in report.state()["model"].items()}})

    result = pipeline.run_trial(cfg, on_epoch=keep)
    dense = torch.load(pipeline.pretrain_path(cfg), weights_only=True)["model"]
    return dense, [s["model"] for s in seen if s["stage"] == "prune"], result


def _bn_and_layer_keys(state: dict) -> tuple[list[str], list[str]]:
    bn = [k for k in state if k.endswith((".weight", ".bias")) and k.rsplit(".", 1)[0] + ".running_mean" in state]
    layer = [k for k in state if k.endswith((".weight", ".bias")) and k.rsplit(".", 1)[0] + ".scores" in state]
    return bn, layer


def test_prune_config_trains_batchnorm_by_default():
    assert PruneConfig().train_bn is True


def test_prune_stage_trains_batchnorm_by_default_never_weights_and_kaiming_hydra_learns(trial_cache):
    cfg = trial_from_dict({**TRIAL, "cache_dir": str(trial_cache)},
                          {"prune.score_init": "kaiming_normal", "finetune.epochs": 5})
    assert cfg.prune.train_bn
    dense, pruned, result = _prune_snapshots(cfg)
    bn_keys, layer_keys = _bn_and_layer_keys(pruned[-1])
    assert len(bn_keys) == 6 and len(layer_keys) == 7  # 3 BatchNorms; 3 convs (no bias), 2 linears (bias)
    for k in layer_keys:
        assert all(torch.equal(state[k], dense[k]) for state in pruned), k
    for k in bn_keys:
        assert not torch.equal(pruned[-1][k], dense[k]), k
    # a random (kaiming_normal) start mask, 90% pruned: BatchNorm lets it fine-tune well above chance (0.1)
    assert result.metrics["val_clean_acc"] > 0.5


def test_prune_stage_with_train_bn_false_freezes_batchnorm(trial_cache):
    cfg = trial_from_dict({**TRIAL, "cache_dir": str(trial_cache)}, {"prune.train_bn": False})
    dense, pruned, _ = _prune_snapshots(cfg)
    bn_keys, layer_keys = _bn_and_layer_keys(pruned[-1])
    assert bn_keys and layer_keys
    for k in bn_keys + layer_keys:
        assert all(torch.equal(state[k], dense[k]) for state in pruned), k
    # the scores did train
    assert any(not torch.equal(pruned[-1][k], pruned[0][k]) for k in pruned[-1] if k.endswith("scores"))
