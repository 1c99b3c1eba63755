"""Architecture registry. Every model takes [0, 1] pixels and normalizes inside, so attacks (and their
eps) work in pixel space.

`create_model` returns `nn.Sequential(normalize=Normalize, body=<arch>)`. Bodies use only plain
nn.Conv2d / nn.Linear / nn.BatchNorm2d with their own weights (no functional convs, no sharing):
`study.trial.pruning` swaps every Conv2d/Linear - first, last and shortcut layers included - for a masked
subclass by walking `named_modules()`.

`width` is the channel count of an arch's first stage (0 = the arch's default, shown per arch); deeper
stages scale with it, so tests can build tiny versions of every arch.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from study.trial.data import DatasetInfo
from study.registry import Registry

ARCHS: Registry[Callable[[DatasetInfo, int], nn.Module]] = Registry("arch")


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean/std as buffers (saved in checkpoints, moved with .to())."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def create_model(arch: str, info: DatasetInfo, width: int = 0) -> nn.Module:
    """The arch's body for `info`'s images and classes, behind a Normalize layer (the first child)."""
    body = ARCHS.get(arch)(info, width)
    return nn.Sequential(OrderedDict(normalize=Normalize(info.mean, info.std), body=body))


def load_exported(cfg: Any, model_state: Mapping[str, Any], info: DatasetInfo, device: Any) -> nn.Module:
    """A trial's architecture (`cfg`: its TrialConfig) with its exported (plain, hard-zero) state dict, in
    eval mode: how the study, the confirmation and `study evaluate` rebuild a trained model."""
    model = create_model(cfg.model.arch, info, width=cfg.model.width)
    model.load_state_dict(dict(model_state))
    return model.to(device).eval()


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (name, Conv2d | Linear) in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _scaled(width: int, default: int) -> int:
    return width if width > 0 else default


# ---------------------------------------------------------------------------------------------------
# small_cnn: the quickstart's CPU-sized net (digits, MNIST, Fashion-MNIST; works at 32x32 too).


@ARCHS.register("small_cnn")
def small_cnn(info: DatasetInfo, width: int = 0) -> nn.Module:
    """conv(w)-conv(2w)-maxpool-conv(2w)-adaptive-avgpool(4x4)-fc(4w)-fc(classes); default w = 32.

    Every conv is conv(bias=False)-BatchNorm2d-ReLU, as in HYDRA's nets: without normalization a net does
    not train from a random sparse mask (at 90% pruning the activations shrink layer after layer).
    """
    w = _scaled(width, 32)

    def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *conv_bn(info.in_channels, w),
        *conv_bn(w, 2 * w),
        nn.MaxPool2d(2),
        *conv_bn(2 * w, 2 * w),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * w * 16, 4 * w),
        nn.ReLU(inplace=True),
        nn.Linear(4 * w, info.num_classes),
    )


# ---------------------------------------------------------------------------------------------------
# vgg16_bn: HYDRA's CIFAR VGG16 (models/vgg_cifar.py).

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """HYDRA's CIFAR VGG: conv-BN-ReLU features, adaptive avg-pool to 2x2, then the 3-layer classifier
    Linear(4*512, 256)-ReLU-Linear(256, 256)-ReLU-Linear(256, classes).

    Max-pools use ceil_mode so 8x8 and 28x28 inputs work too; at 32x32 this equals HYDRA's net.
    """

    def __init__(self, info: DatasetInfo, width: int = 0):
        super().__init__()
        scale = _scaled(width, 64) / 64
        layers: list[nn.Module] = []
        c_in = info.in_channels
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            c_out = max(1, round(v * scale))
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        hidden = max(1, round(256 * scale))
        self.classifier = nn.Sequential(
            nn.Linear(c_in * 4, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, info.num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@ARCHS.register("vgg16_bn")
def vgg16_bn(info: DatasetInfo, width: int = 0) -> nn.Module:
    """Default width 64 (the first conv's channels); every layer scales with width / 64."""
    return VGG(info, width)


# ---------------------------------------------------------------------------------------------------
# resnet18: the standard CIFAR ResNet-18 (BasicBlock, 3x3 stem, no max-pool), as in HYDRA/kuangliu.


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, info: DatasetInfo, width: int, blocks: tuple[int, ...] = (2, 2, 2, 2)):
        super().__init__()
        w = _scaled(width, 64)
        self.conv1 = nn.Conv2d(info.in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        stages, c_in = [], w
        for i, n in enumerate(blocks):
            c_out = w * 2**i
            for j in range(n):
                stages.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c_in, info.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.linear(torch.flatten(self.pool(out), 1))


@ARCHS.register("resnet18")
def resnet18(info: DatasetInfo, width: int = 0) -> nn.Module:
    """Default width 64; stages have width, 2x, 4x, 8x channels."""
    return ResNet(info, width)


# ---------------------------------------------------------------------------------------------------
# wrn_28_4: WideResNet-28-4 as in TRADES/HYDRA (pre-activation blocks, no dropout).


class WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.equal = c_in == c_out and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        # TRADES' WRN: the shortcut conv sees the pre-activated input when the shape changes.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, info: DatasetInfo, width: int, depth: int = 28, widen: int = 4):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WideResNet depth must be 6n + 4"
        n = (depth - 4) // 6
        base = _scaled(width, 16 * widen)  # channels of the first group
        stem = max(1, round(16 * base / (16 * widen)))
        self.conv1 = nn.Conv2d(info.in_channels, stem, 3, padding=1, bias=False)
        blocks, c_in = [], stem
        for i, c_out in enumerate((base, 2 * base, 4 * base)):
            for j in range(n):
                blocks.append(WideBlock(c_in, c_out, stride=(1 if i == 0 else 2) if j == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, info.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


@ARCHS.register("wrn_28_4")
def wrn_28_4(info: DatasetInfo, width: int = 0) -> nn.Module:
    """Default width 64 (16 x widen 4, the first group's channels); groups have width, 2x, 4x channels."""
    return WideResNet(info, width)
