"""Training attacks, eps schedules and robust losses."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from study.attacks import EPS_SCHEDULES, AttackStrength, pgd_linf, strength_at
from study.config import AttackConfig
from study.losses import LOSSES, frozen_bn_stats, make_loss


def trained_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:400] / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target[:400])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), x, y


@pytest.fixture(scope="module")
def mlp():
    return trained_mlp()


def test_pgd_stays_in_the_eps_ball_and_unit_box_and_raises_the_loss(mlp):
    model, x, y = mlp
    s = AttackStrength(eps=0.1, steps=10, step_size=0.025)
    x_adv = pgd_linf(model, x, y, s, generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.5
        assert (model(x_adv).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean() - 0.2


def test_pgd_is_reproducible_from_the_generator_and_leaves_global_rng_alone(mlp):
    model, x, y = mlp
    s = AttackStrength(eps=0.1, steps=3, step_size=0.03)
    state = torch.get_rng_state()
    a = pgd_linf(model, x, y, s, generator=torch.Generator().manual_seed(1))
    b = pgd_linf(model, x, y, s, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


def test_pgd_takes_input_gradients_only(mlp):
    model, x, y = mlp
    pgd_linf(model, x, y, AttackStrength(0.1, 2, 0.05))
    assert all(p.grad is None for p in model.parameters())


def test_zero_eps_returns_the_input(mlp):
    model, x, y = mlp
    assert torch.equal(pgd_linf(model, x, y, AttackStrength(0.0, 5, 0.0)), x)


@pytest.mark.parametrize("name", EPS_SCHEDULES.names())
def test_every_schedule_reaches_the_target_and_stays_in_range(name):
    cfg = AttackConfig(eps=0.2, schedule=name, warmup_fraction=0.4, eps_multiplier=1.0)
    values = [strength_at(cfg, t / 10).eps for t in range(11)]
    assert all(0 <= v <= 0.2 + 1e-12 for v in values)
    assert values[-1] == pytest.approx(0.2)
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))  # warm-ups never decrease
    if name != "constant":
        assert values[0] < 0.2


def test_schedule_shapes():
    lin = AttackConfig(eps=0.1, schedule="linear", warmup_fraction=0.5)
    assert strength_at(lin, 0.25).eps == pytest.approx(0.05)
    cos = AttackConfig(eps=0.1, schedule="cosine", warmup_fraction=0.5)
    assert strength_at(cos, 0.25).eps == pytest.approx(0.05)
    assert strength_at(cos, 0.1).eps < 0.1 * 0.2
    step = AttackConfig(eps=0.1, schedule="step", warmup_fraction=0.5)
    assert strength_at(step, 0.2).eps == pytest.approx(0.05) and strength_at(step, 0.6).eps == pytest.approx(0.1)
    mult = AttackConfig(eps=0.1, eps_multiplier=1.5, step_size=0.2, steps=7)
    s = strength_at(mult, 0.0)
    assert (s.eps, s.steps, s.step_size) == pytest.approx((0.15, 7, 0.03))


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_trains_a_step_and_is_finite(name, mlp):
    model, x, y = mlp
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    model.train()
    loss_fn = make_loss(name, trades_beta=6.0)
    bn = model[2]
    loss, logits = loss_fn(model, x[:64], y[:64], AttackStrength(0.1, 3, 0.03), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and logits.shape == (64, 10)
    loss.backward()
    assert model[1].weight.grad is not None
    assert int(bn.num_batches_tracked) >= 1


def test_attack_passes_do_not_move_batchnorm_running_stats():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)).train()
    before = model[2].running_mean.clone()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    with frozen_bn_stats(model):
        pgd_linf(model, x, y, AttackStrength(0.1, 5, 0.03))
    assert torch.equal(model[2].running_mean, before)
    assert model[2].momentum == 0.1  # restored
    model(x)
    assert not torch.equal(model[2].running_mean, before)


def test_losses_and_config_choices_agree():
    import dataclasses

    field = next(f for f in dataclasses.fields(AttackConfig) if f.name == "loss")
    assert set(field.metadata["choices"]) == set(LOSSES.names())
