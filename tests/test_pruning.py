"""Masked layers, top-k exactness, score inits, export and size figures."""
import pytest
import torch
from torch import nn

from study import pruning
from study.pruning import SCORE_INITS, SnipBatch


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def prunable_net() -> nn.Module:
    return pruning.make_prunable(tiny_net())


def test_make_prunable_swaps_every_conv_and_linear_and_keeps_the_function():
    dense = tiny_net()
    x = torch.rand(4, 1, 8, 8)
    expected = dense(x)
    masked = pruning.make_prunable(dense)
    kinds = [type(m) for _, m in pruning.masked_layers(masked)]
    assert kinds == [pruning.MaskedConv2d, pruning.MaskedConv2d, pruning.MaskedLinear]
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in masked.modules())
    torch.testing.assert_close(masked(x), expected)


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.013])
def test_layer_scope_keeps_exactly_k_of_every_layer(keep):
    model = prunable_net()
    pruning.init_scores(model, "kaiming_normal")
    pruning.refresh_masks(model, keep, "layer")
    for _, layer in pruning.masked_layers(model):
        n = layer.weight.numel()
        assert int(layer.mask.sum()) == pruning.keep_count(n, keep)
        assert set(layer.mask.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("keep", [0.3, 0.05])
def test_global_scope_keeps_exactly_k_overall_and_the_largest_scores(keep):
    model = prunable_net()
    pruning.init_scores(model, "kaiming_uniform")
    pruning.refresh_masks(model, keep, "global")
    layers = [m for _, m in pruning.masked_layers(model)]
    total = sum(m.weight.numel() for m in layers)
    assert int(sum(m.mask.sum() for m in layers)) == pruning.keep_count(total, keep)
    kept = torch.cat([m.scores.abs()[m.mask.bool()] for m in layers])
    dropped = torch.cat([m.scores.abs()[~m.mask.bool()] for m in layers])
    assert kept.min() >= dropped.max()
    # global ranking differs from per-layer: at least one layer keeps a share other than k
    shares = [float(m.mask.mean()) for m in layers]
    assert max(abs(s - keep) for s in shares) > 0.01


def test_ties_still_keep_exactly_k():
    model = prunable_net()
    with torch.no_grad():
        for _, layer in pruning.masked_layers(model):
            layer.scores.fill_(1.0)
    pruning.refresh_masks(model, 0.25, "layer")
    for _, layer in pruning.masked_layers(model):
        assert int(layer.mask.sum()) == pruning.keep_count(layer.weight.numel(), 0.25)


def test_ssi_initial_mask_equals_lwm_mask():
    model = prunable_net()
    pruning.init_scores(model, "ssi")
    pruning.refresh_masks(model, 0.2, "layer")
    ssi_masks = [m.mask.clone() for _, m in pruning.masked_layers(model)]
    lwm = pruning.compute_masks([m.weight for _, m in pruning.masked_layers(model)], 0.2, "layer")
    for a, b in zip(ssi_masks, lwm):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", SCORE_INITS.names())
def test_every_score_init_fills_scores_and_yields_a_valid_mask(name):
    model = prunable_net()
    batch = SnipBatch(torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    pruning.init_scores(model, name, batch)
    for _, layer in pruning.masked_layers(model):
        assert torch.isfinite(layer.scores).all()
        assert layer.scores.abs().sum() > 0
        assert not torch.equal(layer.scores, torch.ones_like(layer.scores))  # actually initialised
    pruning.refresh_masks(model, 0.1, "layer")
    # different inits give different masks than magnitude for the random ones; all give exact k
    for _, layer in pruning.masked_layers(model):
        assert int(layer.mask.sum()) == pruning.keep_count(layer.weight.numel(), 0.1)


def test_unknown_score_init_raises_with_the_valid_names():
    with pytest.raises(KeyError, match="valid choices: .*ssi"):
        pruning.init_scores(prunable_net(), "magic")


def test_snip_needs_a_batch():
    with pytest.raises(ValueError, match="snip"):
        pruning.init_scores(prunable_net(), "snip")


def test_scores_mode_forward_uses_the_mask_and_gradients_reach_scores_only():
    model = prunable_net()
    pruning.init_scores(model, "kaiming_normal")
    pruning.refresh_masks(model, 0.3, "layer")
    pruning.set_mode(model, "scores")
    for _, layer in pruning.masked_layers(model):
        layer.weight.requires_grad_(False)
        layer.scores.requires_grad_(True)
    x = torch.rand(4, 1, 8, 8)
    out = model(x)
    # the forward equals a dense net with hard-zeroed weights
    reference = tiny_net()
    state = pruning.export_state_dict(model)
    reference.load_state_dict(state)
    torch.testing.assert_close(out, reference(x))
    out.sum().backward()
    for _, layer in pruning.masked_layers(model):
        assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0
        assert layer.weight.grad is None
        # straight-through: pruned scores get gradient too (so they can come back)
        assert layer.scores.grad[layer.mask == 0].abs().sum() > 0


def test_masked_weight_is_computed_once_per_refresh_not_per_forward():
    model = prunable_net()
    pruning.init_scores(model, "ssi")
    pruning.refresh_masks(model, 0.3, "layer")
    pruning.set_mode(model, "scores")
    layer = next(m for _, m in pruning.masked_layers(model))
    w1 = layer.effective_weight()
    assert layer.effective_weight() is w1  # attack iterations reuse it
    pruning.refresh_masks(model, 0.3, "layer")
    assert layer.effective_weight() is not w1  # a new optimizer step rebuilds it


def test_fixed_mode_bakes_hard_zeros_and_training_keeps_them():
    model = prunable_net()
    pruning.init_scores(model, "ssi")
    pruning.refresh_masks(model, 0.2, "layer")
    masks = [m.mask.clone() for _, m in pruning.masked_layers(model)]
    pruning.set_mode(model, "fixed")
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.rand(4, 1, 8, 8)).pow(2).sum().backward()
        opt.step()
    for mask, (_, layer) in zip(masks, pruning.masked_layers(model)):
        assert torch.equal(layer.mask, mask)
        assert (layer.weight[mask == 0] == 0).all()
        assert (layer.weight[mask == 1] != 0).float().mean() > 0.99


def test_size_report_counts_the_zeros_in_the_exported_weights():
    model = prunable_net()
    pruning.init_scores(model, "ssi")
    pruning.refresh_masks(model, 0.1, "layer")
    pruning.set_mode(model, "fixed")
    state = pruning.export_state_dict(model)
    assert not any(k.endswith(("scores", "mask")) for k in state)
    names = pruning.prunable_weight_names(model)
    size = pruning.size_report(state, names)
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    prunable = sum(state[n].numel() for n in names)
    assert size.prunable_total == prunable
    assert size.sparsity == pytest.approx(zeros / prunable)
    assert size.params_total == sum(t.numel() for t in state.values())
    assert size.params_kept == size.params_total - zeros
    assert size.compression == pytest.approx(size.params_total / size.params_kept)
    assert size.sparse_bytes < size.dense_bytes
    # exported weights load into the plain architecture
    tiny_net().load_state_dict(state)
