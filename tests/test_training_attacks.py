"""Training attacks, eps schedules (per optimizer step), the auto step size and robust losses."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from study.trial import pipeline
from study.trial.attacks import EPS_SCHEDULES, AttackStrength, pgd_linf, strength_at
from study.trial.config import AttackConfig, ConfigError, StageConfig, trial_from_dict
from study.trial.engine import make_optimizer, make_scheduler, resolve_runtime, train_epoch
from study.trial.losses import LOSSES, frozen_bn_stats, make_loss


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

    from study.trial.config import choices_of

    field = next(f for f in dataclasses.fields(AttackConfig) if f.name == "loss")
    assert set(choices_of(field)) == set(LOSSES.names())


# ---------------------------------------------------------------------------------------------------
# PGD against an independent implementation, and its random start


def test_pgd_without_random_start_equals_torchattacks(mlp):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = mlp
    model.eval()  # torchattacks attacks in eval mode; ours keeps the caller's mode
    for eps, alpha, steps in ((0.1, 0.025, 10), (0.2, 0.07, 4), (0.05, 0.125, 1)):
        ours = pgd_linf(model, x, y, AttackStrength(eps=eps, steps=steps, step_size=alpha), random_start=False)
        theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        assert (ours - x).abs().max() > eps / 2  # the attack moved (not a trivial agreement)


def test_random_start_is_uniform_and_symmetric_in_the_ball():
    eps, draws = 0.1, 4000
    x = torch.full((draws, 1, 4, 4), 0.5)  # far from the [0, 1] box: nothing is clipped
    y = torch.zeros(draws, dtype=torch.long)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    start = AttackStrength(eps=eps, steps=0, step_size=0.0)  # no PGD step: x_adv - x is the random start
    delta = (pgd_linf(model, x, y, start, generator=torch.Generator().manual_seed(0)) - x).flatten(1)
    assert delta.abs().max() <= eps + 1e-7
    # per coordinate over the draws: centred, and reaching both faces of the ball
    assert delta.mean(0).abs().max() < 0.01  # sd of a mean of 4000 U(-0.1, 0.1) draws: 0.0009
    assert (delta.min(0).values < -0.097).all() and (delta.max(0).values > 0.097).all()
    # uniform: each quarter of [-eps, eps] holds a quarter of the draws
    counts = torch.histc(delta, bins=4, min=-eps, max=eps) / delta.numel()
    torch.testing.assert_close(counts, torch.full((4,), 0.25), rtol=0, atol=0.01)


def test_random_start_comes_from_the_generator_only():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 10, (8,))
    s = AttackStrength(eps=0.1, steps=2, step_size=0.06)
    state = torch.get_rng_state()
    g = torch.Generator().manual_seed(5)
    a = pgd_linf(model, x, y, s, generator=g)
    again = pgd_linf(model, x, y, s, generator=g)  # the generator advanced: a new start
    b = pgd_linf(model, x, y, s, generator=torch.Generator().manual_seed(5))
    other = pgd_linf(model, x, y, s, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, again) and not torch.equal(a, other)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------------
# The training step size: 0 = auto = 2.5 / steps, explicit values must reach the boundary


def test_auto_step_size_is_two_and_a_half_eps_of_travel():
    assert AttackConfig().step_size == 0.0  # auto is the default
    ten = strength_at(AttackConfig(eps=8 / 255, steps=10), 1.0)
    assert ten.step_size == pytest.approx(2 / 255)  # HYDRA/Madry: 10 steps of 2/255 at 8/255
    assert strength_at(AttackConfig(eps=0.2, steps=5), 1.0).step_size == pytest.approx(0.1)
    assert strength_at(AttackConfig(eps=0.1, steps=1), 1.0).step_size == pytest.approx(0.25)  # 2.5 eps
    assert strength_at(AttackConfig(eps=0.1, steps=4, step_size=0.3), 1.0).step_size == pytest.approx(0.03)
    # auto scales with the scheduled eps too
    warm = AttackConfig(eps=0.1, steps=10, schedule="linear", warmup_fraction=1.0)
    assert strength_at(warm, 0.5).step_size == pytest.approx(0.25 * 0.05)


def test_one_auto_step_overshoots_and_is_clipped_to_the_fgsm_point(mlp):
    model, x, y = mlp
    s = strength_at(AttackConfig(eps=0.1, steps=1), 1.0)
    x_adv = pgd_linf(model, x, y, s, random_start=False)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    fgsm = (x + 0.1 * g.sign()).clamp(0, 1)
    torch.testing.assert_close(x_adv, fgsm, rtol=0, atol=1e-7)


def test_explicit_step_size_must_reach_the_boundary():
    AttackConfig(steps=4, step_size=0.25)  # exactly 1 eps of travel: allowed
    AttackConfig(steps=1, step_size=1.0)
    with pytest.raises(ConfigError) as e:
        AttackConfig(steps=3, step_size=0.25)
    assert e.value.key == "step_size"
    for section in ("attack", "pretrain_attack"):
        with pytest.raises(ConfigError) as e:
            trial_from_dict({section: {"steps": 2, "step_size": 0.3}})
        assert e.value.key == f"{section}.step_size" and "steps * step_size >= 1" in str(e.value)
    assert trial_from_dict({"attack": {"steps": 2, "step_size": 0}}).attack.step_size == 0.0
    with pytest.raises(ConfigError):
        trial_from_dict({"attack": {"step_size": -0.1}})


# ---------------------------------------------------------------------------------------------------
# eps schedules act per optimizer step


def expected_frac(schedule: str, t: float, w: float) -> float:
    """The schedules, written out independently of study.trial.attacks."""
    if schedule == "constant" or w <= 0:
        return 1.0
    if schedule == "linear":
        return min(1.0, t / w)
    if schedule == "cosine":
        return 1.0 if t >= w else (1 - math.cos(math.pi * t / w)) / 2
    if schedule == "step":
        return 0.5 if t < w else 1.0
    raise AssertionError(schedule)


class Recorder:
    """A loss that records the attack strength it is handed at every optimizer step (natural CE)."""

    def __init__(self):
        self.eps: list[float] = []
        self.strengths: list[AttackStrength] = []

    def __call__(self, model, x, y, strength, generator):
        self.eps.append(strength.eps)
        self.strengths.append(strength)
        logits = model(x)
        return F.cross_entropy(logits, y), logits


@pytest.fixture(scope="module")
def ctx():
    cfg = trial_from_dict({"seed": 1, "device": "cpu", "precision": "fp32",
                           "data": {"name": "digits", "batch_size": 64, "train_limit": 256, "augment": False},
                           "model": {"arch": "small_cnn", "width": 4},
                           "eval": {"val_points": 16, "val_steps": 1, "points": 16, "steps": 1}})
    return pipeline._context(cfg)


def stage_eps(ctx, monkeypatch, attack: AttackConfig, epochs: int, *, warmup: bool = True, resume=None,
              states=None):
    """The eps sequence one `_train_stage` run hands its loss, step by step, and its per-epoch reports."""
    rec = Recorder()
    monkeypatch.setattr(pipeline, "make_loss", lambda *a, **k: rec)
    torch.manual_seed(0)
    model = pipeline._model(ctx)
    if resume is not None:
        model.load_state_dict(resume["model"])
    keep = (lambda name, epoch, metrics, state: states.append(torch.load(_roundtrip(state()), weights_only=True))
            ) if states is not None else None
    history = pipeline._train_stage(ctx, model, "prune", StageConfig(epochs=epochs, lr=0.01), attack,
                                    warmup=warmup, resume=resume, on_epoch=keep)
    return rec.eps, history


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def steps_per_epoch(ctx) -> int:
    return math.ceil(len(ctx.splits.x_train) / ctx.cfg.data.batch_size)


@pytest.mark.parametrize("epochs", [1, 2])
@pytest.mark.parametrize("schedule", ["linear", "cosine", "step"])
def test_eps_advances_per_optimizer_step_and_warmup_acts_in_short_stages(ctx, monkeypatch, schedule, epochs):
    per = steps_per_epoch(ctx)
    assert per >= 3
    total = per * epochs
    seqs = {}
    for w in (0.0, 0.3, 0.8):
        attack = AttackConfig(eps=0.2, steps=1, schedule=schedule, warmup_fraction=w)
        seq, history = stage_eps(ctx, monkeypatch, attack, epochs)
        expected = [0.2 * expected_frac(schedule, (i + 1) / total, w) for i in range(total)]
        assert seq == pytest.approx(expected, abs=1e-12)
        # per-epoch reports carry the eps of the epoch's last step
        assert [h["eps"] for h in history] == pytest.approx([seq[per * e - 1] for e in range(1, epochs + 1)])
        assert seq[-1] == pytest.approx(0.2)
        seqs[w] = seq
    assert seqs[0.0] == pytest.approx([0.2] * total)  # no warm-up: the target from the first step
    assert seqs[0.3] != seqs[0.0] and seqs[0.8] != seqs[0.3]  # the warm-up fraction changes the sequence
    assert 0 < seqs[0.8][0] < 0.2  # even the first step trains at a non-zero eps
    if schedule != "step":
        assert len(set(seqs[0.8][:per])) == per  # eps moves within the first epoch


def test_linear_and_cosine_differ_in_a_two_epoch_stage_and_constant_ignores_warmup(ctx, monkeypatch):
    lin, _ = stage_eps(ctx, monkeypatch, AttackConfig(eps=0.1, steps=1, schedule="linear", warmup_fraction=0.6), 2)
    cos, _ = stage_eps(ctx, monkeypatch, AttackConfig(eps=0.1, steps=1, schedule="cosine", warmup_fraction=0.6), 2)
    const, _ = stage_eps(ctx, monkeypatch, AttackConfig(eps=0.1, steps=1, schedule="constant", warmup_fraction=0.6), 2)
    assert lin != pytest.approx(cos) and lin[-1] == cos[-1] == pytest.approx(0.1)
    assert const == pytest.approx([0.1] * len(lin))
    # warmup=False (fine-tuning by default) starts at the target whatever the schedule
    nowarm, _ = stage_eps(ctx, monkeypatch, AttackConfig(eps=0.1, steps=1, schedule="linear", warmup_fraction=0.6), 2,
                          warmup=False)
    assert nowarm == pytest.approx([0.1] * len(lin))


def test_resumed_stage_continues_the_eps_schedule_exactly(ctx, monkeypatch):
    attack = AttackConfig(eps=0.1, steps=1, schedule="cosine", warmup_fraction=1.0)
    states = []
    full, _ = stage_eps(ctx, monkeypatch, attack, 3, states=states)
    rest, _ = stage_eps(ctx, monkeypatch, attack, 3, resume=states[0])
    per = steps_per_epoch(ctx)
    assert len(rest) == 2 * per and rest == full[per:]


def test_train_epoch_takes_a_fixed_strength_or_a_step_function():
    runtime = resolve_runtime("cpu", "fp32")
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    stage = StageConfig(epochs=1, lr=0.01)
    data = [(torch.rand(4, 1, 4, 4), torch.randint(0, 10, (4,)))] * 3
    rec = Recorder()
    opt = make_optimizer(model.parameters(), stage)
    out = train_epoch(model, data, rec, opt, make_scheduler(opt, stage, 3), AttackStrength(0.1, 2, 0.05), runtime)
    assert rec.eps == [0.1] * 3 and out["eps"] == 0.1
    rec = Recorder()
    out = train_epoch(model, data, rec, opt, make_scheduler(opt, stage, 3), lambda i: AttackStrength(i / 10, 1, 0.0),
                      runtime, first_step=7)
    assert rec.eps == pytest.approx([0.7, 0.8, 0.9]) and out["eps"] == pytest.approx(0.9)


def test_trial_warms_up_pretrain_and_prune_but_not_finetune_unless_asked(tmp_path, monkeypatch):
    seen: list[tuple[str, float]] = []
    stage = {"name": None}
    real_train_stage = pipeline._train_stage

    def train_stage(ctx, model, name, *args, **kwargs):
        stage["name"] = name
        return real_train_stage(ctx, model, name, *args, **kwargs)

    def make(*args, **kwargs):
        real = make_loss(*args, **kwargs)

        def loss(model, x, y, strength, generator):
            seen.append((stage["name"], strength.eps))
            return real(model, x, y, strength, generator)

        return loss

    monkeypatch.setattr(pipeline, "_train_stage", train_stage)
    monkeypatch.setattr(pipeline, "make_loss", make)
    base = {"seed": 2, "device": "cpu", "precision": "fp32", "cache_dir": str(tmp_path),
            "data": {"name": "digits", "batch_size": 64, "train_limit": 200, "augment": False},
            "model": {"arch": "small_cnn", "width": 4},
            "pretrain_attack": {"loss": "pgd", "eps": 0.1, "steps": 1, "schedule": "linear", "warmup_fraction": 1.0},
            "attack": {"loss": "pgd", "eps": 0.2, "steps": 1, "schedule": "cosine", "warmup_fraction": 0.5},
            "pretrain": {"epochs": 1}, "prune_stage": {"epochs": 1}, "finetune": {"epochs": 1},
            "prune": {"method": "hydra", "keep_fraction": 0.5, "score_init": "ssi"},
            "eval": {"val_points": 16, "val_steps": 1, "points": 16, "steps": 1}}
    pipeline.run_trial(trial_from_dict(base))

    def of(name):
        return [e for s, e in seen if s == name]

    pre, prune, fine = of("pretrain"), of("prune"), of("finetune")
    n = len(pre)
    assert n >= 2 and len(prune) == len(fine) == n
    assert pre == pytest.approx([0.1 * (i + 1) / n for i in range(n)])  # its own (linear) schedule
    assert prune == pytest.approx([0.2 * expected_frac("cosine", (i + 1) / n, 0.5) for i in range(n)])
    assert prune[0] < 0.2
    assert fine == pytest.approx([0.2] * n)  # finetune_warmup false: the target eps from the first step
    seen.clear()
    pipeline.run_trial(trial_from_dict(base, {"attack.finetune_warmup": True}))
    assert of("finetune") == pytest.approx(prune) and of("pretrain") == []  # pretraining came from the cache
