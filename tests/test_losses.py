"""Robust losses against hand computations: TRADES, FGSM-RS, PGD-AT (and BatchNorm statistics)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from study.trial import losses
from study.trial.attacks import AttackStrength, pgd_linf
from study.trial.losses import make_loss


def data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def mlp(seed: int = 0, bn: bool = False, sharp: float = 1.0) -> nn.Module:
    """A small random MLP; `sharp` scales its output layer so its predictions are confident, not uniform."""
    torch.manual_seed(seed)
    mid = [nn.BatchNorm1d(24)] if bn else []
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 24), *mid, nn.ReLU(), nn.Linear(24, 5))
    with torch.no_grad():
        model[-1].weight.mul_(sharp)
    return model


class Spy:
    """Wraps study.trial.losses.pgd_linf: records its arguments and result (and what `during` sees meanwhile)."""

    def __init__(self, during=None):
        self.calls: list[dict] = []
        self.during = during

    def __call__(self, model, x, y, strength, **kwargs):
        out = pgd_linf(model, x, y, strength, **kwargs)
        self.calls.append({"x": x, "y": y, "strength": strength, "x_adv": out, **kwargs,
                           "during": self.during() if self.during else None})
        return out


def kl_by_hand(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per batch mean: sum_i p_i (log p_i - log q_i)."""
    return (p * (p.log() - log_q)).sum(1).mean()


def grads(model: nn.Module, value: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, [p for p in model.parameters()]))


def test_trades_loss_is_ce_plus_beta_kl_of_clean_against_adversarial(monkeypatch):
    model, (x, y) = mlp(sharp=8.0), data()
    spy = Spy()
    monkeypatch.setattr(losses, "pgd_linf", spy)
    beta, s = 6.0, AttackStrength(eps=0.2, steps=5, step_size=0.06)
    loss, logits = make_loss("trades", trades_beta=beta)(model, x, y, s, torch.Generator().manual_seed(0))
    (call,) = spy.calls
    x_adv = call["x_adv"]
    # by hand, from the same x_adv: CE(f(x), y) + beta * KL(p_clean || p_adv)
    clean = model(x)
    p_clean = F.softmax(clean, dim=1)
    expected = F.cross_entropy(clean, y) + beta * kl_by_hand(p_clean, F.log_softmax(model(x_adv), dim=1))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits, clean)
    for a, b in zip(grads(model, loss), grads(model, expected)):
        torch.testing.assert_close(a, b)
    # the reversed divergence is a different number: the test can tell the arguments apart
    reverse = F.cross_entropy(clean, y) + beta * kl_by_hand(F.softmax(model(x_adv), 1), F.log_softmax(clean, 1))
    assert abs(float((reverse - expected).detach())) > 0.05


def test_trades_attack_maximises_kl_against_the_clean_distribution(monkeypatch):
    model, (x, y) = mlp(1, sharp=4.0), data(seed=1)
    spy = Spy()
    monkeypatch.setattr(losses, "pgd_linf", spy)
    s = AttackStrength(eps=0.2, steps=10, step_size=0.05)
    make_loss("trades")(model, x, y, s, torch.Generator().manual_seed(0))
    (call,) = spy.calls
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
        # the attack's target is the clean distribution, its objective KL(p_clean || p(x'))
        torch.testing.assert_close(call["y"], p_clean)
        assert call["strength"] == s
        probe = model(x + 0.1 * torch.randn_like(x))
        torch.testing.assert_close(call["loss_fn"](probe, call["y"]), kl_by_hand(p_clean, F.log_softmax(probe, 1)))
        x_adv = call["x_adv"]
        assert (x_adv - x).abs().max() <= 0.2 + 1e-6
        kl_adv = kl_by_hand(p_clean, F.log_softmax(model(x_adv), 1))
        noise = (x + (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) - 1) * 0.2).clamp(0, 1)
        kl_noise = kl_by_hand(p_clean, F.log_softmax(model(noise), 1))
        assert kl_adv > 5 * kl_noise and kl_adv > 0.01


def test_fgsm_rs_is_one_step_of_one_and_a_quarter_eps_from_a_uniform_start():
    model, (x, y) = mlp(2), data(seed=2)
    eps = 0.1
    loss, logits = make_loss("fgsm_rs")(model, x, y, AttackStrength(eps=eps, steps=7, step_size=0.01),
                                        torch.Generator().manual_seed(4))
    # by hand (Wong et al. 2020): delta ~ U(-eps, eps), one signed step of 1.25 eps, project to ball and box
    g = torch.Generator().manual_seed(4)
    start = (x + (2 * torch.rand(x.shape, generator=g) - 1) * eps).clamp(0, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(start), y), start)
    step = start.detach() + 1.25 * eps * grad.sign()
    x_adv = torch.maximum(torch.minimum(step, x + eps), x - eps).clamp(0, 1)
    expected_logits = model(x_adv)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(loss, F.cross_entropy(expected_logits, y))
    # the step overshoots the ball (1.25 eps) and is projected back: many coordinates sit on its faces
    assert ((x_adv - x).abs() > eps - 1e-6).float().mean() > 0.5


def test_fgsm_rs_hands_the_attack_one_step_with_a_random_start(monkeypatch):
    model, (x, y) = mlp(2), data(seed=2)
    spy = Spy()
    monkeypatch.setattr(losses, "pgd_linf", spy)
    make_loss("fgsm_rs")(model, x, y, AttackStrength(eps=0.1, steps=7, step_size=0.01), None)
    (call,) = spy.calls
    assert call["strength"] == AttackStrength(eps=0.1, steps=1, step_size=pytest.approx(0.125))
    assert call.get("random_start", True) is True


def test_pgd_at_is_ce_at_the_pgd_example_and_only_the_loss_forward_moves_bn_stats(monkeypatch):
    model, (x, y) = mlp(3, bn=True), data(seed=3)
    model.train()
    bn = model[2]
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    spy = Spy(during=lambda: (bn.running_mean.clone(), bn.running_var.clone(), bn.momentum))
    monkeypatch.setattr(losses, "pgd_linf", spy)
    s = AttackStrength(eps=0.1, steps=5, step_size=0.04)
    loss, logits = make_loss("pgd")(model, x, y, s, torch.Generator().manual_seed(0))
    (call,) = spy.calls
    x_adv = call["x_adv"]
    # K attack passes in train mode did not move the running statistics
    mean_during, var_during, momentum_during = call["during"]
    assert torch.equal(mean_during, mean0) and torch.equal(var_during, var0) and momentum_during == 0.0
    assert bn.momentum == 0.1  # restored
    # the loss's own forward did, by exactly one momentum update with the adversarial batch's statistics
    with torch.no_grad():
        h = model[1](x_adv.flatten(1))
    torch.testing.assert_close(bn.running_mean, 0.9 * mean0 + 0.1 * h.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 * var0 + 0.1 * h.var(0, unbiased=True))
    # loss = CE at the PGD example (train-mode output, batch statistics)
    expected_logits = model(x_adv)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(loss, F.cross_entropy(expected_logits, y))
    assert call["strength"] == s and (x_adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_natural_loss_is_plain_cross_entropy(monkeypatch):
    model, (x, y) = mlp(4), data(seed=4)
    spy = Spy()
    monkeypatch.setattr(losses, "pgd_linf", spy)
    loss, logits = make_loss("natural")(model, x, y, AttackStrength(0.1, 3, 0.03), None)
    assert spy.calls == []
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
