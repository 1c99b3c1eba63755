"""A reference-style loop, written the way the HYDRA reference code (Sehwag et al. 2020) runs: the
baseline the speed ratios of `bench.throughput` are measured against. Not used by the study.

What makes it slow, on purpose (each is what the reference does):
- every masked layer recomputes its top-k mask from its scores by sorting them on EVERY forward pass,
  attack iterations included (HYDRA's `GetSubnet` inside `SubnetConv.forward`);
- the PGD attack calls `loss.backward()`, so every attack step also computes the gradients of every
  trainable parameter (scores in the prune stage, weights in fine-tuning), which are thrown away;
- fp32 eager, NCHW, no autocast, no compile.
The data are already on the device (the benchmark feeds both loops the same synthetic tensors), so the
reference's CPU DataLoader is not part of what is compared.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STAGES = ("dense", "prune", "finetune")


class GetSubnet(torch.autograd.Function):
    """HYDRA's top-k by full sort: ones at the k largest scores, straight-through gradient."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: float) -> torch.Tensor:  # noqa: D102
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = int((1 - k) * scores.numel())
        flat = out.flatten()
        flat[idx[:j]] = 0
        flat[idx[j:]] = 1
        return flat.view_as(scores)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: D102
        return g, None


def reference_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    return GetSubnet.apply(scores.abs(), k)


class RefSubnetMixin:
    weight: nn.Parameter

    def _init_subnet(self, k: float) -> None:
        self.popup_scores = nn.Parameter(torch.ones_like(self.weight))
        self.k = k

    def masked_weight(self) -> torch.Tensor:
        return self.weight * reference_mask(self.popup_scores, self.k)


class RefSubnetConv(RefSubnetMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class RefSubnetLinear(RefSubnetMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


def make_reference(model: nn.Module, k: float) -> nn.Module:
    """Swap every nn.Conv2d / nn.Linear for its subnet twin in place (weights shared)."""
    for name, child in list(model.named_children()):
        if type(child) is nn.Conv2d:
            new = RefSubnetConv(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                child.padding, child.dilation, child.groups, child.bias is not None,
                                child.padding_mode, device=child.weight.device, dtype=child.weight.dtype)
        elif type(child) is nn.Linear:
            new = RefSubnetLinear(child.in_features, child.out_features, child.bias is not None,
                                  device=child.weight.device, dtype=child.weight.dtype)
        else:
            make_reference(child, k)
            continue
        new.weight = child.weight
        if child.bias is not None:
            new.bias = child.bias
        new._init_subnet(k)
        setattr(model, name, new)
    return model


def subnet_layers(model: nn.Module) -> list[RefSubnetMixin]:
    return [m for m in model.modules() if isinstance(m, RefSubnetMixin)]


def set_stage(model: nn.Module, stage: str) -> None:
    """HYDRA's freezing: pretrain (k=1) and fine-tune train weights; prune trains the scores and BatchNorm's
    affine parameters (HYDRA's freeze_vars skips BN unless --freeze-bn), weights and biases frozen."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    for m in model.modules():
        if isinstance(m, RefSubnetMixin):
            m.weight.requires_grad_(stage != "prune")
            m.popup_scores.requires_grad_(stage == "prune")
            if m.bias is not None:
                m.bias.requires_grad_(stage != "prune")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)


def reference_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float,
                  steps: int) -> torch.Tensor:
    """HYDRA's `pgd_whitebox`: loss.backward() per step (parameter gradients included), then zeroed."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1).detach().requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
        with torch.no_grad():
            x_adv = x_adv + step_size * x_adv.grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
        x_adv.requires_grad_(True)
    model.zero_grad(set_to_none=False)
    return x_adv.detach()


def reference_train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                         eps: float, step_size: float, steps: int) -> torch.Tensor:
    """One PGD-AT step as the reference trainer does it (model in train mode throughout)."""
    model.train()
    x_adv = reference_pgd(model, x, y, eps, step_size, steps)
    loss = F.cross_entropy(model(x_adv), y)
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    optimizer.step()
    return loss.detach()
