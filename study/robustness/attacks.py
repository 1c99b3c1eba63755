"""Evaluation attacks, by threat model: a strict registry of library attacks plus the two sparse ones no
installable library provides with a pixel budget (PGD0, Sparse-RS).

Every attack maps (model, x, y, eps) to x_adv inside the eps-ball and [0, 1]. `attack()` is the one way
to call them: batched, seeded, the caller's RNG state untouched (torchattacks' APGD/Square re-seed the
global RNG), eps = 0 answered without attacking (the ball is {x}) and the result projected onto the ball
as a last guarantee. The model must already be in eval mode (suite.evaluate_robustness sees to that).
"""
from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from study.registry import Registry
from study.robustness.threats import Threat

AttackFn = Callable[..., Tensor]  # fn(model, x, y, eps, *, steps, restarts, seed, queries) -> x_adv


@dataclass(frozen=True)
class AttackSpec:
    name: str
    threat: Threat
    white_box: bool  # False: queries only (for the gradient-masking check)
    fn: AttackFn

    def __call__(self, *a, **kw) -> Tensor:
        return self.fn(*a, **kw)


EVAL_ATTACKS: Registry[AttackSpec] = Registry("evaluation attack")


def _register(name: str, threat: Threat, white_box: bool) -> Callable[[AttackFn], AttackFn]:
    def deco(fn: AttackFn) -> AttackFn:
        EVAL_ATTACKS.register(name)(AttackSpec(name, threat, white_box, fn))
        return fn
    return deco


# A threat's curve is the per-point worst case over its CURVE attacks. Square is run for the
# black-box-vs-white-box check only. For L0 the black-box Sparse-RS is part of the curve: it is far
# stronger than PGD0 on honest models (Croce et al. 2022), so it would fail that check for no reason,
# and being in the curve it already keeps gradient masking from inflating the L0 figures.
CURVE = {Threat.LINF: ("pgd_linf", "apgd_ce_linf"), Threat.L2: ("pgd_l2", "apgd_ce_l2"),
         Threat.L0: ("pgd0", "sparse_rs_l0")}
PRIMARY = {Threat.LINF: "pgd_linf", Threat.L2: "pgd_l2", Threat.L0: "pgd0"}  # white-box; transfer and effort check
BLACK_BOX = {Threat.LINF: "square_linf", Threat.L2: "square_l2"}


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run with torch's RNG seeded, then put the caller's RNG state back."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _restarted(make: Callable[[int], Callable[[Tensor, Tensor], Tensor]], model: nn.Module, x: Tensor,
               y: Tensor, restarts: int) -> Tensor:
    """Per-sample worst over random restarts: restart r attacks only the points still classified right."""
    adv = x.clone()
    alive = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for r in range(max(1, restarts)):
        idx = alive.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        a = make(r)(x[idx], y[idx]).detach()
        adv[idx] = a
        with torch.no_grad():
            alive[idx] = model(a).argmax(1) == y[idx]
    return adv


def _pgd(norm: str) -> AttackFn:
    def fn(model, x, y, eps, *, steps, restarts, seed, **_):
        import torchattacks
        cls = torchattacks.PGD if norm == "Linf" else torchattacks.PGDL2

        def make(r: int):
            torch.manual_seed(seed + r)  # random start of restart r
            return cls(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
        return _restarted(make, model, x, y, restarts)
    return fn


def _apgd(norm: str) -> AttackFn:
    def fn(model, x, y, eps, *, steps, restarts, seed, **_):
        import torchattacks
        return torchattacks.APGD(model, norm=norm, eps=eps, steps=steps, n_restarts=max(1, restarts),
                                 seed=seed, loss="ce")(x, y)
    return fn


def _square(norm: str) -> AttackFn:
    def fn(model, x, y, eps, *, queries, seed, **_):
        import torchattacks
        return torchattacks.Square(model, norm=norm, eps=eps, n_queries=queries, n_restarts=1, p_init=0.8,
                                   loss="margin", resc_schedule=True, seed=seed)(x, y)
    return fn


_register("pgd_linf", Threat.LINF, True)(_pgd("Linf"))
_register("apgd_ce_linf", Threat.LINF, True)(_apgd("Linf"))
_register("square_linf", Threat.LINF, False)(_square("Linf"))
_register("pgd_l2", Threat.L2, True)(_pgd("L2"))
_register("apgd_ce_l2", Threat.L2, True)(_apgd("L2"))
_register("square_l2", Threat.L2, False)(_square("L2"))


@_register("pgd0", Threat.L0, True)
def pgd0(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int, restarts: int, seed: int, **_) -> Tensor:
    """PGD0 (Croce & Hein 2019): L1-normalized gradient step, then projection onto k pixels ∩ [0, 1].

    Step size 0.15 * numel: their CIFAR-10 constant 120000/255 ≈ 0.15 * 3072, made size-independent.
    The iterate that first fools the model is kept (the last one need not).
    """
    k = int(eps)
    step = 0.15 * x[0].numel()

    def make(r: int):
        def run(xs: Tensor, ys: Tensor) -> Tensor:
            torch.manual_seed(seed + r)
            adv = Threat.L0.project(torch.rand_like(xs), xs, k)  # random start: k random-valued pixels
            best, hit = adv.clone(), torch.zeros(len(xs), dtype=torch.bool, device=xs.device)
            for _ in range(steps):
                adv.requires_grad_(True)
                logits = model(adv)
                grad, = torch.autograd.grad(F.cross_entropy(logits, ys, reduction="sum"), adv)
                with torch.no_grad():
                    new = (logits.argmax(1) != ys) & ~hit
                    best[new] = adv.detach()[new]
                    hit |= new
                    grad /= grad.flatten(1).abs().sum(1).clamp_min(1e-12).view(-1, *[1] * (xs.dim() - 1))
                    adv = Threat.L0.project(adv.detach() + step * grad, xs, k)
            with torch.no_grad():
                best[~hit] = adv[~hit]
            return best
        return run
    return _restarted(make, model, x, y, restarts)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """logit of the true class minus the best other logit: < 0 means misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - other


@_register("sparse_rs_l0", Threat.L0, False)
def sparse_rs(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, queries: int, seed: int, **_) -> Tensor:
    """Sparse-RS (Croce et al. 2022), untargeted L0, compact: k pixels set to random corners of [0,1]^C;
    each query re-draws a shrinking fraction of them (location and value) and keeps the change if the
    margin drops. Black-box: uses the logits only."""
    k, (n, c, h, w) = int(eps), x.shape
    pixels = h * w
    k = min(k, pixels)
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g).to(x.device)
    corners = lambda *s: torch.randint(0, 2, s, generator=g).to(x.device, x.dtype)

    def build(idx: Tensor, pix: Tensor, vals: Tensor) -> Tensor:
        adv = x[idx].flatten(2).clone()
        adv.scatter_(2, pix[:, None, :].expand(-1, c, -1), vals)
        return adv.view(len(idx), c, h, w)

    pix, vals = rand(n, pixels).argsort(1)[:, :k], corners(n, c, k)
    with torch.no_grad():
        m = margin(model(build(torch.arange(n, device=x.device), pix, vals)), y)
        bounds = [10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000]
        for i in range(1, queries):
            act = (m > 0).nonzero().squeeze(1)
            if act.numel() == 0 or k == 0:
                break
            frac = 0.3 / 2 ** sum(i >= b * queries / 10000 for b in bounds)
            j = max(1, int(round(frac * k)))
            pos = rand(len(act), k).argsort(1)[:, :j]
            score = rand(len(act), pixels).scatter(1, pix[act], -1.0)  # only pixels not yet in the set
            new_pix = pix[act].scatter(1, pos, score.topk(j, 1).indices)
            new_vals = vals[act].scatter(2, pos[:, None, :].expand(-1, c, -1), corners(len(act), c, j))
            new_m = margin(model(build(act, new_pix, new_vals)), y[act])
            better = new_m < m[act]
            upd = act[better]
            pix[upd], vals[upd], m[upd] = new_pix[better], new_vals[better], new_m[better]
    return build(torch.arange(n, device=x.device), pix, vals)


def _seed(seed: int, name: str) -> int:
    return seed * 1_000_003 + zlib.crc32(name.encode()) % 1_000_003


def attack(name: str, model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int = 50, restarts: int = 1,
           seed: int = 0, queries: int = 1000, batch_size: int = 256) -> Tensor:
    """x_adv for every point from the registered attack `name`, inside its threat's eps-ball and [0, 1]."""
    spec = EVAL_ATTACKS.get(name)
    if eps == 0:
        return x.clone()
    out = []
    with seeded(_seed(seed, name), x.device):
        for s in range(0, len(x), batch_size):
            xb, yb = x[s:s + batch_size], y[s:s + batch_size]
            adv = spec(model, xb, yb, eps, steps=steps, restarts=restarts, seed=_seed(seed, name) + s, queries=queries)
            out.append(spec.threat.project(adv.detach().to(xb.dtype), xb, eps))
    return torch.cat(out)


@torch.no_grad()
def correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> Tensor:
    """Per-point bool: the model's prediction equals the label."""
    return torch.cat([model(x[s:s + batch_size]).argmax(1) == y[s:s + batch_size]
                      for s in range(0, len(x), batch_size)])
