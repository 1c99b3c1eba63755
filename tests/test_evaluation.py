"""study.trial.evaluation.evaluate against a model whose robust accuracy is known by construction.

The model is linear on two pixels: class 1 iff x0 + x1 > 1. Its Linf distance to the boundary is
|x0 + x1 - 1| / 2 (the L1 norm of its weight direction is 2), so a correctly classified point can be
flipped within Linf radius eps iff that distance is below eps. Points sit well away from the eps values
used (no ties), inside [0, 1] with room for the adversary, so the exact clean and robust counts are
known. A third pixel carries each point's id (the model ignores it), so fake attacks and recorded
forwards can tell points apart wherever evaluate moves them.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from study.trial import evaluation

SCALE = 5.0  # logit gap 2 * SCALE * (x0 + x1 - 1): large enough to decide, small enough not to saturate CE
DISTANCES = (0.02, 0.045, 0.07, 0.095, 0.13, 0.17, 0.23, 0.3)  # Linf distances to the boundary
ID_SCALE = 1000.0


class Analytic(nn.Module):
    """Class 1 iff x0 + x1 > 1 (x flattened to 4 pixels); records the mode and ids of every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.dropout = nn.Dropout(0.5)  # would randomise the decision if evaluate forgot eval mode
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[-SCALE, -SCALE, 0.0, 0.0], [SCALE, SCALE, 0.0, 0.0]]))
            self.linear.bias.copy_(torch.tensor([SCALE, -SCALE]))
        self.modes: list[bool] = []
        self.seen: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        self.seen.append(ids_of(x))
        return self.linear(self.dropout(x.flatten(1)))


def ids_of(x: torch.Tensor) -> list[int]:
    return [int(round(float(v) * ID_SCALE)) for v in x.detach().flatten(1)[:, 2]]


def point(pid: int, distance: float, side: int, tilt: float = 0.0) -> torch.Tensor:
    """A point at Linf distance `distance` on `side` (+1: class 1) of the boundary; tilt keeps x0 + x1."""
    c = 0.5 + side * distance
    return torch.tensor([c + tilt, c - tilt, pid / ID_SCALE, 0.0]).view(1, 1, 2, 2)


def dataset(eps: float):
    """Points, labels, and the exact clean and robust counts at Linf radius eps."""
    xs, ys, clean, robust = [], [], 0, 0
    for d in DISTANCES:
        for side in (1, -1):
            for tilt in (0.0, 0.1):
                label = int(side > 0)
                xs.append(point(len(xs), d, side, tilt))
                ys.append(label)
                clean += 1
                robust += d > eps
    # misclassified points: far from the boundary (an attack cannot "fix" them) and near it
    for d, side in ((0.3, 1), (0.3, -1), (0.02, 1), (0.045, -1)):
        xs.append(point(len(xs), d, side))
        ys.append(int(side < 0))
    return torch.cat(xs), torch.tensor(ys), clean, robust


def reference_prediction(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    return (flat[:, 0] + flat[:, 1] > 1).long()


def test_the_construction_is_what_the_tests_assume():
    x, y, clean, _ = dataset(0.1)
    decisive = x.flatten(1)[:, :2]
    assert decisive.min() >= 0.05 and decisive.max() <= 0.95  # an eps <= 0.2 step toward the boundary stays in the box
    assert ids_of(x) == list(range(len(x)))
    model = Analytic().eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert torch.equal(pred, reference_prediction(x))
    assert int((pred == y).sum()) == clean and clean < len(x)


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.2])
@pytest.mark.parametrize("restarts", [1, 3])
def test_clean_and_robust_accuracy_are_exact(eps, restarts):
    x, y, clean, robust = dataset(eps)
    n = len(x)
    assert 0 < robust < clean < n  # every kind of point is present
    acc = evaluation.evaluate(Analytic(), x, y, eps=eps, steps=10, step_size=0.25, restarts=restarts,
                              batch_size=7)
    assert acc.points == n
    assert acc.clean == clean / n
    assert acc.robust == robust / n


def test_linf_geometry_not_l2():
    # x0 + x1 - 1 = 0.15: Linf distance 0.075 (flippable at eps 0.1), L2 distance 0.106 (not within 0.1)
    x = torch.cat([point(0, 0.075, 1), point(1, 0.075, -1)])
    y = torch.tensor([1, 0])
    acc = evaluation.evaluate(Analytic(), x, y, eps=0.1, steps=10, step_size=0.25)
    assert (acc.clean, acc.robust) == (1.0, 0.0)
    acc = evaluation.evaluate(Analytic(), x, y, eps=0.07, steps=10, step_size=0.25)
    assert (acc.clean, acc.robust) == (1.0, 1.0)


def test_zero_eps_gives_robust_equal_to_clean():
    x, y, clean, _ = dataset(0.0)
    acc = evaluation.evaluate(Analytic(), x, y, eps=0.0, steps=10, step_size=0.25, restarts=3)
    assert acc.clean == acc.robust == clean / len(x)


def test_negative_eps_is_refused():
    x, y, _, _ = dataset(0.1)
    with pytest.raises(ValueError, match="eps"):
        evaluation.evaluate(Analytic(), x, y, eps=-0.1, steps=10, step_size=0.25)


class ScriptedPGD:
    """Stands in for torchattacks.PGD: breaks point `i` on its `break_on[i]`-th attack (1-based), leaves
    every other correct point where it is, and moves misclassified points to the correct side (an attack
    that "fails" on them). Counts how often each point is attacked and checks the step size."""

    break_on: dict[int, int] = {}
    attacked: dict[int, int] = {}
    made: list[dict] = []

    def __init__(self, model, eps, alpha, steps, random_start):
        self.model = model
        ScriptedPGD.made.append({"eps": eps, "alpha": alpha, "steps": steps, "random_start": random_start})

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        adv = x.clone()
        flat = adv.view(len(adv), -1)
        wrong = reference_prediction(x) != y
        for row, pid in enumerate(ids_of(x)):
            ScriptedPGD.attacked[pid] = ScriptedPGD.attacked.get(pid, 0) + 1
            if wrong[row] or ScriptedPGD.break_on.get(pid) == ScriptedPGD.attacked[pid]:
                x0, x1 = float(flat[row, 0]), float(flat[row, 1])
                flat[row, 0], flat[row, 1] = 1.0 - x1, 1.0 - x0  # mirror across x0 + x1 = 1
        return adv


@pytest.fixture
def scripted(monkeypatch):
    ScriptedPGD.break_on, ScriptedPGD.attacked, ScriptedPGD.made = {}, {}, []
    monkeypatch.setattr(evaluation.torchattacks, "PGD", ScriptedPGD)
    monkeypatch.setattr(evaluation, "PGD", ScriptedPGD, raising=False)  # should it be imported by name
    return ScriptedPGD


def restart_case():
    """10 correct points (ids 0-9) and 2 misclassified ones (10, 11), all far from the boundary."""
    xs = [point(i, 0.3, 1 if i % 2 else -1) for i in range(12)]
    y = torch.tensor([i % 2 for i in range(10)] + [1, 0])  # 10 and 11 sit on the other side
    return torch.cat(xs), y


def test_robust_is_the_per_point_worst_case_over_restarts(scripted):
    x, y = restart_case()
    scripted.break_on = {0: 1, 1: 1, 2: 2, 3: 2, 4: 3, 5: 4}  # 5 survives 3 restarts; 6-9 are never broken
    acc = evaluation.evaluate(Analytic(), x, y, eps=0.1, steps=7, step_size=0.3, restarts=3, batch_size=5)
    assert acc.clean == 10 / 12
    assert acc.robust == 5 / 12  # ids 5-9: broken by no restart
    assert [m["alpha"] for m in scripted.made] == [pytest.approx(0.03)] * len(scripted.made)
    assert all(m["steps"] == 7 and m["random_start"] for m in scripted.made)


def test_more_restarts_break_more_points(scripted):
    x, y = restart_case()
    scripted.break_on = {i: 2 for i in range(10)}  # every correct point falls to the 2nd restart only
    assert evaluation.evaluate(Analytic(), x, y, eps=0.1, steps=3, step_size=0.3, restarts=1).robust == 10 / 12
    scripted.attacked.clear()
    assert evaluation.evaluate(Analytic(), x, y, eps=0.1, steps=3, step_size=0.3, restarts=3).robust == 0.0


def test_misclassified_points_never_count_as_robust_even_when_the_attack_fails(scripted):
    x, y = restart_case()  # the scripted attack leaves correct points alone and "fixes" misclassified ones
    acc = evaluation.evaluate(Analytic(), x, y, eps=0.1, steps=3, step_size=0.3, restarts=2)
    assert acc.clean == acc.robust == 10 / 12


def test_model_mode_and_global_rng_are_restored():
    x, y, clean, robust = dataset(0.1)
    for training in (True, False):
        model = Analytic().train(training)
        torch.manual_seed(123)
        before = torch.get_rng_state()
        acc = evaluation.evaluate(model, x, y, eps=0.1, steps=10, step_size=0.25, restarts=2)
        assert torch.equal(torch.get_rng_state(), before)
        assert model.training is training and model.dropout.training is training
        assert model.modes and not any(model.modes)  # every forward (clean and attack) in eval mode
        assert (acc.clean, acc.robust) == (clean / len(x), robust / len(x))


def test_the_random_start_comes_from_the_seed_not_the_global_rng():
    # one step of 0.001 eps: which points flip is decided by the random start drawn
    x = torch.cat([point(i, 0.02, 1 if i % 2 else -1) for i in range(300)])
    y = torch.tensor([i % 2 for i in range(300)])

    def robust(seed, global_seed):
        torch.manual_seed(global_seed)
        return evaluation.evaluate(Analytic(), x, y, eps=0.1, steps=1, step_size=0.001, seed=seed).robust

    a = robust(seed=1, global_seed=0)
    assert robust(seed=1, global_seed=99) == a
    assert robust(seed=2, global_seed=0) != a
    # x0 + x1 moves by the sum of two U(-eps, eps) (+-0.0002): the flip chance at distance 0.02, eps 0.1 is 0.32
    assert 0.2 < 1 - a < 0.45


def test_the_same_seed_evaluates_the_same_subset_for_clean_and_robust():
    x, y, _, _ = dataset(0.1)
    correct = reference_prediction(x) == y

    def subset(seed):
        model = Analytic()
        evaluation.evaluate(model, x, y, eps=0.0, steps=10, step_size=0.25, points=15, seed=seed)
        return [pid for batch in model.seen for pid in batch]

    first = subset(4)
    assert len(first) == 15 == len(set(first)) and set(first) <= set(range(len(x)))
    assert subset(4) == first
    assert subset(5) != first
    # the robust figure is computed on those same points
    acc = evaluation.evaluate(Analytic(), x, y, eps=0.1, steps=10, step_size=0.25, points=15, seed=4)
    d = (x.flatten(1)[:, 0] + x.flatten(1)[:, 1] - 1).abs() / 2
    assert acc.points == 15
    assert acc.clean == int(correct[first].sum()) / 15
    assert acc.robust == int((correct & (d > 0.1))[first].sum()) / 15
    # points <= 0 or >= len(x): every point
    for points in (0, len(x), len(x) + 5):
        assert evaluation.evaluate(Analytic(), x, y, eps=0.0, steps=1, step_size=0.25, points=points).points == len(x)


def test_per_point_flags_match_the_geometry():
    x, y, _, _ = dataset(0.1)
    correct = reference_prediction(x) == y
    d = (x.flatten(1)[:, 0] + x.flatten(1)[:, 1] - 1).abs() / 2
    ok, still = evaluation.pgd_flags(Analytic(), x, y, eps=0.1, steps=10, step_size=0.25, restarts=2, batch_size=6)
    assert torch.equal(ok, correct)
    assert torch.equal(still, correct & (d > 0.1))
