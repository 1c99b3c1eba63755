"""Pareto filtering, hypervolume and the CSV, on synthetic points and fake Optuna trials (no training)."""
from __future__ import annotations

import itertools

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from analysis import pareto


def _brute_force(points, modes):
    pts = pareto.to_minimization(points, modes)
    keep = []
    for i, p in enumerate(pts):
        dominated = any((q <= p).all() and (q < p).any() for j, q in enumerate(pts) if j != i)
        keep.append(not dominated)
    return np.array(keep)


def test_non_dominated_small_example():
    # (size: min, robust: max)
    pts = [(100, 0.5), (50, 0.5), (50, 0.4), (200, 0.9), (200, 0.9), (300, 0.8)]
    mask = pareto.non_dominated(pts, ["min", "max"])
    assert mask.tolist() == [False, True, False, True, True, False]  # ties are all kept


@pytest.mark.parametrize("seed, m", list(itertools.product(range(5), (2, 3))))
def test_non_dominated_matches_brute_force(seed, m):
    rng = np.random.default_rng(seed)
    pts = rng.integers(0, 6, size=(40, m)).astype(float)  # many ties
    modes = ["min", "max", "max"][:m]
    assert (pareto.non_dominated(pts, modes) == _brute_force(pts, modes)).all()


def test_hypervolume_of_a_staircase():
    pts = [(1.0, 0.5), (2.0, 0.8)]  # size min, robust max; ref (3, 0)
    # area dominated: [1,3]x[0,0.5] + [2,3]x[0.5,0.8] = 1.0 + 0.3
    assert pareto.hypervolume(pts, ["min", "max"], [3.0, 0.0]) == pytest.approx(1.3)
    assert pareto.hypervolume(pts + [(2.5, 0.1)], ["min", "max"], [3.0, 0.0]) == pytest.approx(1.3)


def _fake_study(values, states=None, directions=("minimize", "maximize", "maximize")):
    study = optuna.create_study(directions=list(directions))
    dists = {"prune.keep_fraction": FloatDistribution(0.01, 0.5, log=True),
             "prune.score_init": CategoricalDistribution(["ssi", "snip"])}
    for i, v in enumerate(values):
        state = (states or {}).get(i, TrialState.COMPLETE)
        study.add_trial(create_trial(
            state=state, values=v if state == TrialState.COMPLETE else None,
            params={"prune.keep_fraction": 0.01 + 0.01 * i, "prune.score_init": "ssi" if i % 2 else "snip"},
            distributions=dists,
            user_attrs={"compression": 100.0 / (i + 1), "mlflow_run_id": f"run{i}"}))
    return study


@pytest.mark.parametrize("seed", range(4))
def test_front_equals_optuna_best_trials_and_csv(tmp_path, seed):
    rng = np.random.default_rng(seed)
    values = [[float(rng.integers(1, 8) * 100), float(rng.integers(0, 5)) / 5, float(rng.integers(0, 5)) / 5]
              for _ in range(30)]
    study = _fake_study(values, states={3: TrialState.FAIL, 7: TrialState.FAIL})
    metrics = ["params_kept", "val_robust_acc", "val_clean_acc"]
    front = pareto.front_trials(study)
    assert [t.number for t in front] == sorted(t.number for t in study.best_trials)
    rows = pareto.front_rows(study, metrics)
    path = pareto.write_csv(rows, tmp_path / "pareto.csv")
    back = pareto.read_csv(path)
    assert sorted(int(r["trial"]) for r in back) == sorted(t.number for t in study.best_trials)
    by_number = {t.number: t for t in study.best_trials}
    for r in back:
        t = by_number[int(r["trial"])]
        assert [float(r[m]) for m in metrics] == pytest.approx(t.values)
        assert r["mlflow_run_id"] == f"run{t.number}"
        assert float(r["prune.keep_fraction"]) == pytest.approx(t.params["prune.keep_fraction"])
    # sorted by the first objective (size), smallest first
    sizes = [float(r["params_kept"]) for r in back]
    assert sizes == sorted(sizes)


def test_table_formats_and_empty_front(tmp_path):
    study = _fake_study([[100.0, 0.5, 0.9], [50.0, 0.4, 0.8]])
    rows = pareto.front_rows(study, ["params_kept", "val_robust_acc", "val_clean_acc"])
    rows[0].update(test_clean_acc=0.7, test_robust_acc=0.3, test_pgd_acc=0.35, test_attack="PGD-50 x3 restarts")
    table = pareto.format_table(pareto.compact_params(rows, ["prune.keep_fraction", "prune.score_init"]), title="front")
    lines = table.splitlines()
    assert lines[0] == "front"
    header = lines[1].split()
    assert header[:7] == ["trial", "params_kept", "compression", "val_clean_acc", "val_robust_acc", "test_clean_acc",
                          "test_robust_acc"]
    assert header[-3:] == ["params", "test_attack", "mlflow_run_id"]
    assert "test_pgd_acc" in header and lines[3].split()[5:7] == ["0.7", "0.3"]
    assert "keep_fraction=0.01" in table and "score_init=snip" in table
    empty = _fake_study([[1.0, 0.1, 0.1]], states={0: TrialState.FAIL})
    assert pareto.front_rows(empty, ["params_kept"]) == []
    assert "empty" in pareto.format_table([])
    assert pareto.read_csv(pareto.write_csv([], tmp_path / "e.csv")) == []


def _optuna_hypervolume(values, modes, ref):
    """Optuna's own WFG hypervolume (an implementation independent of moocore): it minimizes, so `max`
    columns are negated, and it requires every point to be no worse than the reference point, so points
    that are not are dropped (they dominate nothing inside the reference box)."""
    from optuna._hypervolume import compute_hypervolume

    signs = np.array([-1.0 if m == "max" else 1.0 for m in modes])
    pts, r = np.asarray(values, dtype=float) * signs, np.asarray(ref, dtype=float) * signs
    inside = (pts <= r).all(1)
    return float(compute_hypervolume(pts[inside], r)) if inside.any() else 0.0


@pytest.mark.parametrize("seed", range(6))
def test_hypervolume_matches_optunas_on_random_3d_points(seed):
    rng = np.random.default_rng(seed)
    modes = [["min", "max", "max"], ["max", "min", "max"], ["min", "min", "max"]][seed % 3]
    n = int(rng.integers(5, 40))
    values = np.column_stack([rng.uniform(1, 100, n) if m == "min" else rng.uniform(0, 1, n) for m in modes])
    values[: n // 4] = np.round(values[: n // 4], 1)  # some ties
    ref = pareto.default_reference(values, modes)
    expected = _optuna_hypervolume(values, modes, ref)
    assert expected > 0
    assert pareto.hypervolume(values, modes, ref) == pytest.approx(expected, rel=1e-9)
    # a reference point some points do not beat: only the box it bounds counts
    tight = [float(np.median(values[:, i])) for i in range(3)]
    assert pareto.hypervolume(values, modes, tight) == pytest.approx(_optuna_hypervolume(values, modes, tight), rel=1e-9)


def test_study_hypervolume_matches_optunas():
    rng = np.random.default_rng(7)
    values = [[float(rng.integers(1, 50) * 10), float(rng.uniform(0, 1)), float(rng.uniform(0, 1))] for _ in range(25)]
    study = _fake_study(values, states={4: TrialState.FAIL})
    complete = [t.values for t in study.trials if t.state == TrialState.COMPLETE]
    modes = ["min", "max", "max"]
    ref = [1.1 * max(v[0] for v in complete), 0.0, 0.0]
    assert pareto.study_hypervolume(study) == pytest.approx(_optuna_hypervolume(complete, modes, ref), rel=1e-9)
