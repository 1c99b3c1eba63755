"""Arch registry: every arch builds (tiny) for every image shape, normalizes inside, passes gradients
to the input, and exposes only plain Conv2d/Linear layers with their own weights for pruning."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from study.trial.data import DatasetInfo, dataset_info
from study.trial.models import ARCHS, Normalize, create_model, prunable_layers

SHAPES = {
    "digits": dataset_info("digits"),  # 1 x 8 x 8
    "fashion_mnist": dataset_info("fashion_mnist"),  # 1 x 28 x 28
    "cifar10": dataset_info("cifar10"),  # 3 x 32 x 32
}
TINY = 4


def _batch(info: DatasetInfo, n: int = 3) -> torch.Tensor:
    return torch.rand(n, info.in_channels, info.image_size, info.image_size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("data", SHAPES)
@pytest.mark.parametrize("arch", ARCHS.names())
def test_arch_forward_and_input_gradient(arch, data):
    info = SHAPES[data]
    torch.manual_seed(0)
    model = create_model(arch, info, width=TINY)
    x = _batch(info).requires_grad_(True)
    logits = model(x)
    assert logits.shape == (3, info.num_classes) and torch.isfinite(logits).all()
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.eval()
    assert model(x.detach()).shape == (3, info.num_classes)


@pytest.mark.parametrize("arch", ARCHS.names())
def test_normalization_is_the_first_layer(arch):
    info = SHAPES["cifar10"]
    model = create_model(arch, info, width=TINY).eval()
    first = next(iter(model.children()))
    assert isinstance(first, Normalize)
    assert first.mean.flatten().tolist() == pytest.approx(info.mean)
    assert first.std.flatten().tolist() == pytest.approx(info.std)
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())
    x = _batch(info)
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    assert torch.allclose(model(x), model.body((x - mean) / std), atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS.names())
def test_prunable_layers_are_plain_and_own_their_weights(arch):
    model = create_model(arch, SHAPES["cifar10"], width=TINY)
    layers = prunable_layers(model)
    assert len(layers) >= 4
    assert all(type(m) in (nn.Conv2d, nn.Linear) for _, m in layers)
    weights = [id(m.weight) for _, m in layers]
    assert len(set(weights)) == len(weights)
    # every parameter belongs to a Conv2d, Linear or BatchNorm2d: nothing the pruner would miss
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert type(module) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d), name
    # the first conv, the classifier and (where present) shortcut convs are all among them
    assert isinstance(layers[0][1], nn.Conv2d) and isinstance(layers[-1][1], nn.Linear)
    assert layers[-1][1].out_features == 10


@pytest.mark.parametrize("arch", ARCHS.names())
def test_weights_only_round_trip(arch):
    info = SHAPES["digits"]
    model = create_model(arch, info, width=TINY).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    clone = create_model(arch, info, width=TINY).eval()
    clone.load_state_dict(torch.load(buf, weights_only=True))
    x = _batch(info)
    assert torch.equal(model(x), clone(x))


# Default sizes on CIFAR-10 (10 classes), checked against published counts:
# resnet18 is the usual CIFAR ResNet-18 (11,173,962); our WideResNet at widen 10 gives TRADES' WRN-28-10
# count (36,479,194), so WRN-28-4 is 5,849,050; vgg16_bn is the usual CIFAR VGG16-BN (14,728,266) without
# its 4,224 conv biases (BatchNorm follows every conv) and with HYDRA's 3-layer classifier on 2x2 pooling.
# small_cnn by hand (3 channels, width 32): convs without bias 3*32*9 + 32*64*9 + 64*64*9, BatchNorm affine
# 2*(32 + 64 + 64), linear 1024 -> 128 and 128 -> 10 with biases.
DEFAULT_PARAMS = {
    "small_cnn": 864 + 18_432 + 36_864 + 2 * (32 + 64 + 64) + (1024 * 128 + 128) + (128 * 10 + 10),
    "resnet18": 11_173_962,
    "wrn_28_4": 5_849_050,
    "vgg16_bn": 14_728_266 - 4_224 - (512 * 10 + 10) + (2048 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10),
}


@pytest.mark.parametrize("arch", ARCHS.names())
def test_default_width_builds(arch):
    with torch.device("meta"):  # shapes only: no time spent initialising millions of weights
        model = create_model(arch, SHAPES["cifar10"])
        assert model(torch.empty(2, 3, 32, 32)).shape == (2, 10)
    n = sum(p.numel() for p in model.parameters())
    if arch in DEFAULT_PARAMS:
        assert n == DEFAULT_PARAMS[arch]


def test_width_scales_channels():
    info = SHAPES["digits"]
    small = sum(p.numel() for p in create_model("small_cnn", info, width=8).parameters())
    big = sum(p.numel() for p in create_model("small_cnn", info, width=16).parameters())
    assert big > 3 * small


def test_small_cnn_convs_are_bias_free_and_batch_normalized():
    body = create_model("small_cnn", SHAPES["digits"], width=4).body
    children = list(body.children())
    convs = [i for i, m in enumerate(children) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    for i in convs:
        assert children[i].bias is None
        assert isinstance(children[i + 1], nn.BatchNorm2d) and children[i + 1].num_features == children[i].out_channels


def test_small_cnn_fine_tunes_from_a_random_90_percent_mask():
    """Without normalization this net stays at chance from a random sparse mask; with BatchNorm a few
    natural epochs take it well above chance (0.1) on digits."""
    from study.trial import pruning
    from study.trial.config import DataConfig
    from study.trial.data import batches, load_dataset

    sp = load_dataset(DataConfig(name="digits"))
    torch.manual_seed(0)
    model = pruning.make_prunable(create_model("small_cnn", sp.info, width=8))
    gen = torch.Generator().manual_seed(0)
    pruning.random_scores(model, gen)
    pruning.refresh_masks(model, 0.1, "layer")
    pruning.set_mode(model, "fixed")
    kept = sum(int(m.mask.sum()) for _, m in pruning.masked_layers(model))
    total = sum(m.mask.numel() for _, m in pruning.masked_layers(model))
    # width 8 by hand: 72, 1152, 2304, 8192, 320 weights; round(0.1 * n) of each kept
    assert total == 12_040 and kept == 7 + 115 + 230 + 819 + 32
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(5):
        for x, y in batches(sp.x_train, sp.y_train, 64, shuffle=True, generator=gen):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(sp.x_val).argmax(1) == sp.y_val).float().mean().item()
    assert acc > 0.5, acc
    # and the mask held: still 90% zeros
    assert sum(int((m.weight == 0).sum()) for _, m in pruning.masked_layers(model)) == total - kept


def test_unknown_arch_lists_choices():
    with pytest.raises(KeyError, match="small_cnn"):
        create_model("alexnet", SHAPES["digits"])
