"""The search benchmark's table and replay (analysis.experiments.search_table / search_replay / search_benchmark).

The replay is checked on a synthetic table written here (every cell, 2 replicates, figures by formula), so the
tests need no trials; the shipped table is checked for completeness and shape, and `--quick` runs on it."""
from __future__ import annotations

import csv
import math

import optuna
import pytest

from analysis.experiments import search_benchmark as sb
from analysis.experiments import search_replay as sr
from analysis.experiments import search_table as st


def synthetic_row(cell, seed):
    keep = cell["prune.keep_fraction"]
    good = {"ssi": 1.0, "snip": 0.8, "kaiming_normal": 0.2}[cell["prune.score_init"]]
    final = min(0.95, good * (0.5 + 0.4 * math.log(keep / 0.02) / math.log(25))) - 0.01 * seed
    row = {**cell, "trial_seed": seed, "params_kept": round(100_000 * keep), "params_total": 100_000,
           "val_points": 431, "val_clean_acc": final + 0.05, "val_robust_acc": final,
           "test_clean_acc": final + 0.04, "test_robust_acc": final - 0.02, "test_points": 360,
           "wall_s": 4.0 + cell["attack.steps"]}
    for e in range(1, sr.EPOCHS + 1):
        row[f"e{e}_val_robust_acc"] = final * e / sr.EPOCHS
        row[f"e{e}_val_clean_acc"] = final
    return row


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("table") / "table.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=st.columns(sr.EPOCHS))
        w.writeheader()
        for seed in st.SEEDS:
            for cell in st.cells():
                w.writerow(synthetic_row(cell, seed))
    return sr.load_table(path)


def test_cells_cover_the_space_and_snap_to_nearest_level():
    cells = list(st.cells())
    # 6 keeps x 3 inits x (constant + 3 warm-up schedules) x 2 eps multipliers x 2 step counts
    assert len(cells) == 6 * 3 * 4 * 2 * 2
    assert len({st.row_key({**c, "trial_seed": 0}) for c in cells}) == len(cells)
    assert all((c["attack.warmup_fraction"] == "") == (c["attack.schedule"] == "constant") for c in cells)
    keeps = st.LEVELS["prune.keep_fraction"]
    assert keeps[0] == 0.02 and keeps[-1] == 0.5
    # log-nearest, not linear-nearest: 0.1 is nearer 0.0725 than 0.1375 in log space (and linearly too);
    # 0.2 is log-nearer 0.2625 (ratio 1.31) than 0.1375 (1.45)
    assert st.snap("prune.keep_fraction", 0.1) == keeps[2]
    assert st.snap("prune.keep_fraction", 0.2) == keeps[4]
    assert st.snap("attack.steps", 2) == 1 and st.snap("attack.steps", 4) == 5
    assert st.snap("attack.warmup_fraction", "") == ""
    with pytest.raises(ValueError):
        st.snap("prune.score_init", "magnitude")


def test_hypervolume_of_known_points():
    t = lambda size, val, test: sr.Trial(size, val, test, (), 1.0)  # noqa: E731
    assert sr.hypervolumes([t(0.5, 0.8, 0.6)]) == pytest.approx((0.4, 0.3))
    # two front points: union of rectangles; a dominated point changes nothing; the test HV takes the
    # VALIDATION front's members at their test figures (the dominated point's great test figure is ignored)
    val, test = sr.hypervolumes([t(0.2, 0.5, 0.5), t(0.5, 0.8, 0.7), t(0.6, 0.4, 0.99)])
    assert val == pytest.approx(0.8 * 0.5 + 0.5 * 0.3)
    assert test == pytest.approx(0.8 * 0.5 + 0.5 * 0.2)
    assert sr.hypervolumes([]) == (0.0, 0.0)


@pytest.mark.parametrize("concurrency", [1, 2, 8])
def test_replay_asks_through_the_real_space_and_keeps_concurrency(table, concurrency, monkeypatch):
    asked_while_running = []
    real_ask = optuna.Study.ask

    def ask(self, *a, **k):
        running = [t for t in self.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
        asked_while_running.append(len(running))
        return real_ask(self, *a, **k)

    monkeypatch.setattr(optuna.Study, "ask", ask)
    trace = sr.replay(sr.arms()["random"], 0, concurrency, table, n_max=20)
    assert len(trace.finished) == 20 and all(complete for _, complete, _, _ in trace.finished)
    assert max(asked_while_running) == concurrency - 1  # several asked before any is told
    times = [t for _, _, t, _ in trace.finished]
    assert times == sorted(times)


def test_same_seed_same_replay_and_seeds_differ(table):
    a = sr.rows_of("x", 0, 2, sr.replay(sr.arms()["tpe"], 0, 2, table, n_max=16))
    b = sr.rows_of("x", 0, 2, sr.replay(sr.arms()["tpe"], 0, 2, table, n_max=16))
    c = sr.rows_of("x", 1, 2, sr.replay(sr.arms()["tpe"], 1, 2, table, n_max=16))
    assert a == b
    assert [r["val_hypervolume"] for r in a] != [r["val_hypervolume"] for r in c]


def test_stopped_trials_are_pruned_cost_their_epochs_and_never_enter_a_front(table):
    trace = sr.replay(sr.arms()["random+mf"], 3, 2, table, n_max=40)
    pruned = [(ep, trial) for ep, complete, _, trial in trace.finished if not complete]
    assert pruned, "the synthetic table has dominated cells: some trial must stop"
    assert all(ep in (2, 4) for ep, _ in pruned)  # the default rungs of 6 epochs
    rows = sr.rows_of("random+mf", 3, 2, trace, step=1)
    last = rows[-1]
    assert last["n_trials"] == 40 and last["n_pruned"] == len(pruned)
    assert last["epochs_used"] == sum(ep for ep, *_ in trace.finished) < 40 * sr.EPOCHS
    complete = [trial for _, ok, _, trial in trace.finished if ok]
    assert last["val_hypervolume"] == pytest.approx(round(sr.hypervolumes(complete)[0], 5))
    # equal compute: hv_at_epochs counts only trials that finished within the budget
    assert sr.hv_at_epochs(trace, 0) == 0.0
    assert sr.hv_at_epochs(trace, 10**6) == pytest.approx(sr.hypervolumes(complete)[0])


def test_stratified_keep_fractions_cover_the_log_range():
    import math as m

    u = sorted(m.log(sr.stratum(i, 0.3) / 0.02) / m.log(25) for i in range(16))
    # 16 van der Corput points, shifted: one in each sixteenth of [0, 1)
    assert [int(x * 16 + 1e-9) for x in u] == list(range(16))


def test_shipped_table_is_complete_and_quick_runs(tmp_path):
    rows = st.read_table(st.TABLE)
    keys = {st.row_key(r) for r in rows}
    assert len(keys) == len(rows) == len(list(st.cells())) * len(st.SEEDS), "the shipped table is incomplete"
    assert all(0 <= float(r["val_robust_acc"]) <= 1 and int(r["val_points"]) >= 400 for r in rows)
    out = tmp_path / "bench.csv"
    assert sb.main(["--quick", "--out", str(out)]) == 0
    with out.open() as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == sb.COLUMNS
    assert {r["arm"] for r in got} == {"random", "default", "default+mf"}
    assert {r["concurrency"] for r in got} == {"2", "8"}
