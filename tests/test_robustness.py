"""study.robustness on tiny models trained in seconds on scikit-learn's digits (8x8 grey, /16 -> [0, 1])."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from study.robustness import EvalBudget, Threat, evaluate_robustness
from study.robustness import checks as C
from study.robustness.attacks import CURVE, EVAL_ATTACKS, PRIMARY, attack, correct
from study.robustness.curves import area, from_distances, nested
from study.robustness.scenario import aggregated_accuracy, scenario_table, transfer
from study.robustness.threats import project_l0

EPS = {"linf": 0.1, "l2": 1.0, "l0": 3}
BUDGET = EvalBudget(points=120, steps=20, restarts=1, seed=0, batch_size=128, square_queries=300)
THREATS = {"linf": [0.0, 0.05, 0.1, 0.2], "l2": [0.0, 0.5, 1.0, 2.0], "l0": [0, 1, 3, 6]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two busy cores: torch's thread pool spins and makes tiny ops ~15x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Normalize(nn.Module):
    def forward(self, x):
        return (x - 0.3) / 0.4


class Quantized(nn.Module):
    """Gradient masking on purpose: the input is rounded (zero gradient) before the real model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1300], y[:1300]), (x[1300:], y[1300:])


@pytest.fixture(scope="module")
def mlp(digits):
    (xt, yt), _ = digits
    torch.manual_seed(0)
    m = nn.Sequential(Normalize(), nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(250):
        opt.zero_grad()
        F.cross_entropy(m(xt), yt).backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def plain_report(mlp, digits):
    _, (x, y) = digits
    return evaluate_robustness(mlp, x, y, threats=THREATS, budget=BUDGET, reference_model=mlp)


# --- threats, attacks ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", EVAL_ATTACKS.names())
def test_every_attack_respects_its_ball(name, mlp, digits):
    _, (x, y) = digits
    x, y = x[:40], y[:40]
    spec = EVAL_ATTACKS.get(name)
    eps = EPS[spec.threat.value]
    kw = dict(steps=10, restarts=2, seed=0, queries=100)
    with torch.random.fork_rng():
        raw = spec(mlp, x, y, eps, **kw).detach()  # the attack itself, before attack()'s safety projection
    adv = attack(name, mlp, x, y, eps, **kw)
    for a, slack in ((raw, 1e-5), (adv, 1e-6)):
        assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
        assert spec.threat.distance(a, x).max() <= eps + slack
    assert correct(mlp, adv, y).float().mean() < correct(mlp, x, y).float().mean()  # it does attack


@pytest.mark.parametrize("name", ["pgd0", "sparse_rs_l0"])
def test_l0_attacks_count_pixels_on_colour_images(name):
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
    x = torch.rand(16, 3, 8, 8)
    y = cnn(x).argmax(1)
    with torch.random.fork_rng():
        raw = EVAL_ATTACKS.get(name)(cnn, x, y, 4, steps=10, restarts=1, seed=0, queries=100).detach()
    assert Threat.L0.distance(raw, x).max() <= 4 and raw.min() >= 0 and raw.max() <= 1
    assert (raw != x).sum() > (Threat.L0.distance(raw, x).sum())  # several channels of a pixel do change


def test_l0_counts_pixels_not_channels():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 6, 6)
    d = project_l0(torch.randn(5, 3, 6, 6), x, 4)
    assert int(((d != 0).any(1)).flatten(1).sum(1).max()) <= 4
    assert ((x + d) >= 0).all() and ((x + d) <= 1).all()
    assert Threat.L0.distance(x + d, x).max() <= 4
    assert project_l0(torch.randn(5, 3, 6, 6), x, 0).abs().sum() == 0


def test_threat_parsing_and_eps_validation():
    assert Threat.parse("LINF") is Threat.LINF and "pixels" in Threat.L0.unit
    with pytest.raises(ValueError, match="valid choices: linf, l2, l0"):
        Threat.parse("l1")
    for t, bad in ((Threat.LINF, []), (Threat.LINF, None), (Threat.LINF, [8.0]), (Threat.L0, [1.5]),
                   (Threat.L2, [-1.0]), (Threat.L2, [1.0, 1.0]), (Threat.L2, [math.nan])):
        with pytest.raises(ValueError):
            t.validate_eps(bad)
    assert Threat.L2.validate_eps([1, 0.5, 0]) == [0.0, 0.5, 1.0]


def test_registry_walk():
    for t in Threat:
        assert PRIMARY[t] in CURVE[t]
        for name in CURVE[t]:
            assert EVAL_ATTACKS.get(name).threat is t
    with pytest.raises(KeyError, match="valid choices"):
        EVAL_ATTACKS.get("fgsm")


def test_entry_point_refuses_unsafe_calls(mlp, digits):
    _, (x, y) = digits
    for threats in (None, {}, {"linf": []}, {"linf": None}, {"l1": [0.1]}):
        with pytest.raises(ValueError):
            evaluate_robustness(mlp, x, y, threats=threats, budget=BUDGET)
    with pytest.raises(TypeError):
        evaluate_robustness(mlp, x, y, budget=BUDGET)  # threats is required
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate_robustness(mlp, (x - 0.5) / 0.2, y, threats={"linf": [0.1]}, budget=BUDGET)
    with pytest.raises(ValueError):
        EvalBudget(points=0)
    with pytest.raises(ValueError, match="autoattack_eps"):
        evaluate_robustness(mlp, x, y, threats={"linf": [0.1]}, budget=BUDGET, autoattack=True,
                            autoattack_eps={"l2": [0.5]})


# --- the report ----------------------------------------------------------------------------------

def test_undefended_model_loses_robustness(plain_report):
    r = plain_report
    assert r.clean_acc > 0.85 and r.n_points == BUDGET.points
    for t, e in (("linf", 0.1), ("l2", 1.0), ("l0", 3)):
        assert r.curves[t].at(e) < r.clean_acc - 0.3, (t, r.curves[t].robust_acc)


def test_plain_model_passes_every_check(plain_report):
    failed = [c for c in plain_report.checks if not c.passed]
    assert not failed and not plain_report.suspect, plain_report.table()
    assert {c.name.split(".")[0] for c in plain_report.checks} == {"eps0", "monotone", "chance", "effort", "black_box"}


def test_curves_are_non_increasing(plain_report):
    for c in plain_report.curves.values():
        assert c.robust_acc[0] == plain_report.clean_acc  # eps 0
        assert all(b <= a for a, b in zip(c.robust_acc, c.robust_acc[1:])), c.robust_acc
        assert all(b <= a for a, b in zip(c.robust_acc_nested, c.robust_acc_nested[1:]))
        assert all(n <= m + 1e-12 for n, m in zip(c.robust_acc_nested, c.running_min))
        assert 0 <= c.auc <= 1


def test_report_serializes(plain_report):
    d = plain_report.to_dict()
    json.loads(json.dumps(d, allow_nan=False))
    assert d["suspect"] is False and d["curves"]["linf"]["unit"]
    m = plain_report.flat_metrics()
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    for key in ("clean_acc", "robust.linf.0.1", "robust.l2.0.5", "robust.l0.3", "auc.linf", "check.monotone",
                "check.chance.l2", "transfer.linf.0.1", "scenario.linf.0.1.r0.25", "wall_s.total", "suspect"):
        assert key in m, key
    table = plain_report.table()
    assert "sanity checks" in table and "[l0]" in table and "pixels" in table


def test_gradient_masked_model_is_suspect(mlp, digits):
    _, (x, y) = digits
    masked = Quantized(mlp).eval()
    r = evaluate_robustness(masked, x, y, threats={"linf": [0.0, 0.1, 0.2]},
                            budget=EvalBudget(points=80, steps=10, restarts=1, square_queries=300))
    failed = {c.name for c in r.checks if not c.passed}
    assert r.suspect and failed & {"chance.linf", "black_box.linf", "effort.linf", "monotone.linf"}, r.table()


def test_train_mode_is_switched_and_restored_and_rng_untouched(mlp, digits):
    _, (x, y) = digits
    mlp.train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    try:
        with pytest.warns(UserWarning, match="train mode"):
            r = evaluate_robustness(mlp, x, y, threats={"linf": [0.0, 0.1], "l2": [0.5]},
                                    budget=EvalBudget(points=30, steps=5, restarts=1, square_queries=50))
        assert mlp.training
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        mlp.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r2 = evaluate_robustness(mlp, x, y, threats={"linf": [0.0, 0.1], "l2": [0.5]},
                                 budget=EvalBudget(points=30, steps=5, restarts=1, square_queries=50))
    assert r.curves["linf"].robust_acc == r2.curves["linf"].robust_acc  # seeded: same numbers twice
    assert r.curves["l2"].robust_acc == r2.curves["l2"].robust_acc


def test_autoattack_is_not_above_pgd(mlp, digits):
    _, (x, y) = digits
    r = evaluate_robustness(mlp, x, y, threats={"linf": [0.1], "l2": [0.5]}, autoattack=True,
                            budget=EvalBudget(points=24, steps=20, restarts=1, square_queries=100))
    assert len(r.autoattack) == 2
    for a in r.autoattack:
        assert a.robust_acc <= a.pgd_acc and a.robust_acc <= a.white_box_acc, a
        assert r.flat_metrics()[f"autoattack.{a.threat}.{a.eps:g}"] == a.robust_acc


# --- transfer, scenario, curves, checks: hand-checkable ------------------------------------------

def test_transfer_from_itself_equals_white_box_pgd(plain_report):
    for tr in plain_report.transfer:
        assert tr.target_acc == tr.source_acc == plain_report.curves[tr.threat].per_attack[tr.attack]


class Constant(nn.Module):
    """Always predicts class 0, whatever the input: its accuracy under any attack is the share of 0s."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return F.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float() + 0 * self.w


def test_transfer_to_a_constant_model(mlp, digits):
    _, (x, y) = digits
    x, y = x[:50], y[:50]
    tr = transfer(mlp, Constant(), x, y, Threat.LINF, [0.0, 0.2], steps=10, restarts=1)
    share = float((y == 0).float().mean())
    assert tr.target_acc == [share, share]
    assert tr.source_acc[1] < tr.source_acc[0]


def test_scenario_is_the_weighted_mix():
    assert aggregated_accuracy(0.9, 0.3, 0.0) == 0.9
    assert aggregated_accuracy(0.9, 0.3, 1.0) == 0.3
    assert aggregated_accuracy(0.9, 0.3, 0.5) == pytest.approx(0.6)
    rows = scenario_table(0.8, {"linf": ([0.0, 0.1], [0.8, 0.2])}, [0.0, 0.25, 1.0])
    assert [(r.eps, r.r, round(r.accuracy, 6)) for r in rows] == [
        (0.0, 0.0, 0.8), (0.0, 0.25, 0.8), (0.0, 1.0, 0.8), (0.1, 0.0, 0.8), (0.1, 0.25, 0.65), (0.1, 1.0, 0.2)]
    with pytest.raises(ValueError):
        aggregated_accuracy(0.9, 0.3, 1.5)


def test_scenario_in_report_matches_curve(plain_report):
    r = plain_report
    rows = {(s.threat, s.eps, s.r): s.accuracy for s in r.scenario}
    for t, c in r.curves.items():
        for e, a in zip(c.eps, c.robust_acc):
            assert rows[(t, e, 0.0)] == pytest.approx(r.clean_acc)
            assert rows[(t, e, 1.0)] == pytest.approx(a)


def test_curve_helpers():
    assert area([0, 1], [1, 0]) == pytest.approx(0.5)
    assert area([0, 2, 4], [0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert area([0.1], [0.3]) == 0.3
    dist = torch.tensor([0.0, 1.0, 2.0, math.inf])
    ok = torch.tensor([False, True, True, True])
    assert from_distances([0, 1, 1.5, 3], dist, ok) == [0.75, 0.5, 0.5, 0.25]
    flags = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    assert nested(flags).tolist() == [[True, True, True], [False, True, True], [False, False, True]]


def test_checks_on_made_up_numbers():
    assert not C.monotone("linf", [0, 0.1, 0.2], [0.9, 0.3, 0.5], n=100).passed
    assert C.monotone("linf", [0, 0.1, 0.2], [0.9, 0.3, 0.31], n=100).passed
    assert not C.reaches_chance("linf", 0.5, 0.6, 0.1, n=100).passed
    assert not C.more_effort("linf", 0.1, 0.3, 0.4, "2x steps", n=100).passed
    assert "not converged" in C.more_effort("linf", 0.1, 0.4, 0.2, "2x steps", n=100).detail
    assert not C.black_box("linf", 0.1, 0.5, 0.1, "square", n=100).passed
    assert not C.eps_zero("linf", 0.9, 0.89).passed
