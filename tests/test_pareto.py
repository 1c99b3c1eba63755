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
    metrics = ["params_kept", "robust_acc", "clean_acc"]
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
    rows = pareto.front_rows(study, ["params_kept", "robust_acc", "clean_acc"])
    table = pareto.format_table(pareto.compact_params(rows, ["prune.keep_fraction", "prune.score_init"]), title="front")
    lines = table.splitlines()
    assert lines[0] == "front"
    header = lines[1].split()
    assert header[:5] == ["trial", "params_kept", "compression", "clean_acc", "robust_acc"]
    assert header[-2:] == ["params", "mlflow_run_id"]
    assert "keep_fraction=0.01" in table and "score_init=snip" in table
    empty = _fake_study([[1.0, 0.1, 0.1]], states={0: TrialState.FAIL})
    assert pareto.front_rows(empty, ["params_kept"]) == []
    assert "empty" in pareto.format_table([])
    assert pareto.read_csv(pareto.write_csv([], tmp_path / "e.csv")) == []
