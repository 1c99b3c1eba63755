"""The experiments of docs/results.md: their --quick modes end to end (real studies: Ray Tune + Optuna +
MLflow), and the pieces that turn studies into tables (hypervolume curves, fronts, the results page).

The quick runs check that the outputs are well formed (columns, rows, ranges, valid PNGs, a stamped page
with its table), not the science.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from analysis.experiments import common, fashion_methods, search_efficiency
from analysis.experiments.search_efficiency import Point


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fraction(text: str) -> float:
    v = float(text)
    assert 0.0 <= v <= 1.0, text
    return v


# ---------------------------------------------------------------------------------------------------
# Fast: the pieces.


def test_hypervolume_against_hand_computed_areas() -> None:
    """HV of (size: min, robust: max) with reference (1, 0) is the area the points dominate in [0,1]^2."""
    a = Point(0, "COMPLETE", {}, 0.5, 0.8, 0.9)  # dominates [0.5, 1] x [0, 0.8]: 0.4
    b = Point(1, "COMPLETE", {}, 0.2, 0.5, 0.6)  # adds [0.2, 0.5] x [0, 0.5]: 0.15
    c = Point(2, "COMPLETE", {}, 0.6, 0.3, 0.4)  # dominated by a: adds nothing
    d = Point(3, "FAIL", {}, math.nan, math.nan, math.nan)  # a failed trial counts in the budget, adds nothing
    assert search_efficiency.hv([a]) == pytest.approx(0.4)
    assert search_efficiency.curve([a, b, c, d]) == pytest.approx([0.4, 0.55, 0.55, 0.55])
    assert search_efficiency.on_front([a, b, c, d]) == [True, True, False, False]
    # The test hypervolume takes the validation front's models only, at their test figures.
    a.test_robust, b.test_robust, c.test_robust = 0.7, 0.4, 0.99
    assert search_efficiency.front_test_hv([a, b, c, d]) == pytest.approx(0.5 * 0.7 + 0.3 * 0.4)
    assert search_efficiency.first_reaching([0.1, 0.3, 0.5], 0.3) == 2
    assert search_efficiency.first_reaching([0.1, 0.3], 0.5) is None


def test_verdict_says_yes_only_when_every_seed_is_ahead() -> None:
    def stats(values: list[float]) -> dict:
        return {"hv": common.spread(values), "values": values, "reach": [5] * len(values)}

    clear = search_efficiency.verdict({"nsga2": stats([0.60, 0.61, 0.62]), "random": stats([0.50, 0.52, 0.55]),
                                       "grid": stats([0.45, 0.45, 0.45])}, 32)
    assert "**NSGA-II (population 4): Yes.**" in clear and "higher in every seed" in clear
    assert "random 0.5233 (+0.0867, +16.6%; higher in every seed)" in clear  # 0.61 - mean(0.50, 0.52, 0.55)
    assert "Where a search does not beat" not in clear
    mixed = search_efficiency.verdict({"nsga2": stats([0.50, 0.61]), "random": stats([0.52, 0.55])}, 32)
    assert "**NSGA-II (population 4): Not clearly.**" in mixed and "the seed ranges overlap" in mixed
    assert "Where a search does not beat" in mixed
    behind = search_efficiency.verdict({"tpe": stats([0.40, 0.45]), "random": stats([0.52, 0.55])}, 32)
    assert "**TPE: No.**" in behind and "lower in every seed" in behind


def test_grid_space_file_is_the_hand_written_grid(tmp_path: Path) -> None:
    import yaml

    z = search_efficiency.Sizing()
    path = search_efficiency.grid_space(z, tmp_path / "grid.yaml")
    raw = yaml.safe_load(path.read_text())
    assert z.n_trials == 32 == raw["study"]["n_trials"]
    assert raw["search"] == {"prune.keep_fraction": {"choice": [0.02, 0.05, 0.1, 0.25]},
                             "prune.score_init": {"choice": ["ssi", "snip"]},
                             "attack.schedule": {"choice": ["constant", "linear", "cosine", "step"]}}
    assert raw["trial"]["attack"]["steps"] == 3 and raw["trial"]["attack"]["warmup_fraction"] == 0.3
    shipped = yaml.safe_load(search_efficiency.SPACE.read_text())
    assert raw["trial"]["data"] == shipped["trial"]["data"]  # the quickstart's trial, not a copy that can drift


def test_results_page_sections_are_rewritten_in_place(tmp_path: Path) -> None:
    page = tmp_path / "results.md"
    common.update_section(page, "one", "first A")
    common.update_section(page, "two", "first B")
    common.update_section(page, "one", "second A")
    text = page.read_text()
    assert text.count("<!-- BEGIN one -->") == 1 and "second A" in text and "first A" not in text
    assert text.index("second A") < text.index("first B")  # the section keeps its place


def test_missing_fashion_mnist_is_one_line_with_the_install_command(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(fashion_methods, "FASHION_DIRS", (tmp_path / "nowhere",))
    assert fashion_methods.main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "apt-get install dataset-fashion-mnist" in err
    assert not (tmp_path / "work").exists()  # nothing started


def test_autoattack_cells_run_once_and_are_reused(tmp_path: Path, monkeypatch) -> None:
    """The 99% cells' AutoAttack goes through the study's confirmation code once per budget; its payload
    is saved beside the cell's model and read back (no second attack) on a rerun."""
    calls = []

    def fake_confirm(config, overrides, model_path, **kw):
        calls.append((overrides, kw))
        return {"test_attack": "fake", "metrics": {"test_clean_acc": 0.8, "test_pgd_acc": 0.6,
                                                   "test_autoattack_acc": 0.55, "test_robust_acc": 0.5,
                                                   "test_points": float(kw["points"])}}

    monkeypatch.setattr(common, "confirm_saved_model", fake_confirm)
    runs = tmp_path / "runs"
    common.trial_folder(runs, "cell", 0).mkdir(parents=True)
    cell = fashion_methods.Cell(1, "hydra", "global", 0.01)
    z = fashion_methods.Sizing(aa_points=200, sets=("trial.data.train_limit=2000", "study.n_trials=1"))
    first = fashion_methods.autoattack(cell, z, runs, "cell", 0, fresh=False)
    again = fashion_methods.autoattack(cell, z, runs, "cell", 0, fresh=False)
    assert len(calls) == 1 and calls[0][0] == {"seed": 1, "data.train_limit": 2000}
    assert calls[0][1]["points"] == 200 and calls[0][1]["autoattack"] is True
    assert first == again and first["aa_autoattack_acc"] == 0.55 and first["aa_points"] == 200
    fashion_methods.autoattack(cell, fashion_methods.Sizing(aa_points=300), runs, "cell", 0, fresh=False)
    assert len(calls) == 2  # another budget is another attack


# ---------------------------------------------------------------------------------------------------
# Slow: the --quick modes, end to end.


@pytest.mark.slow
def test_fashion_methods_quick(tmp_path: Path) -> None:
    missing = fashion_methods.fashion_missing()
    if missing:
        pytest.skip(missing)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--quick", "--out", str(out), "--work", str(work)]
    assert fashion_methods.main(argv) == 0
    cells = read_csv(out / "results" / "fashion_methods_cells.csv")
    assert list(cells[0]) == fashion_methods.CELL_COLUMNS
    assert [(r["method"], r["scope"], r["keep_fraction"]) for r in cells] == [("hydra", "global", "0.1"),
                                                                             ("lwm", "global", "0.1")]
    for r in cells:
        assert r["state"] == "COMPLETE" and r["test_points"] == "100"
        assert fraction(r["test_pgd_acc"]) <= fraction(r["test_clean_acc"])
        assert 0 < int(float(r["params_kept"])) < int(float(r["params_total"]))
        assert (work / "runs" / r["study"] / "trials" / "0000" / "confirm.json").is_file()  # the study's own
    summary = read_csv(out / "results" / "fashion_methods.csv")
    assert len(summary) == 2 and {"test_pgd_acc_mean", "test_pgd_acc_std", "test_pgd_acc_min", "seeds"} <= set(summary[0])
    assert common.is_png(out / "results" / "fashion_methods.png")
    page = (out / "results.md").read_text()
    assert "Generated by `python -m analysis.experiments.fashion_methods --quick" in page
    assert "QUICK SMOKE RUN" in page and "| HYDRA (ssi) | global | 90% |" in page
    assert "](results/fashion_methods.png)" in page
    # A rerun reuses the finished cell studies and rewrites its section in place.
    assert fashion_methods.main(argv) == 0
    assert (out / "results.md").read_text().count("<!-- BEGIN fashion_methods -->") == 1


@pytest.mark.slow
def test_search_efficiency_quick(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    assert search_efficiency.main(["--quick", "--out", str(out), "--work", str(work)]) == 0
    res = out / "results"
    n = search_efficiency.QUICK.n_trials
    summary = read_csv(res / "search_efficiency.csv")
    assert [r["arm"] for r in summary] == ["nsga2", "tpe", "random", "grid"]
    for r in summary:
        assert int(r["n_trials"]) == n and int(r["complete"]) + int(r["failed"]) == n
        fraction(r["hv_val"])
        fraction(r["hv_test_front"])
        assert int(r["front_size"]) >= 1
    curves = read_csv(res / "search_efficiency_curves.csv")
    for arm in ("nsga2", "tpe", "random", "grid"):
        hv = [fraction(r["hypervolume"]) for r in curves if r["arm"] == arm]
        assert len(hv) == n and hv == sorted(hv)  # a hypervolume never shrinks as trials are added
        assert hv[-1] == pytest.approx(float(next(r["hv_val"] for r in summary if r["arm"] == arm)))
    trials = read_csv(res / "search_efficiency_trials.csv")
    assert len(trials) == 4 * n and {"param.prune.keep_fraction", "size", "val_robust_acc", "on_front"} <= set(trials[0])
    assert any(r["on_front"] == "True" and r["test_robust_acc"] for r in trials)
    for png in ("search_efficiency_hv.png", "search_efficiency_fronts.png"):
        assert common.is_png(res / png)
    page = (out / "results.md").read_text()
    assert "Generated by `python -m analysis.experiments.search_efficiency --quick" in page
    assert "QUICK SMOKE RUN" in page and "**Does the search beat random and the grid at equal cost?**" in page
    assert "| NSGA-II (population 4) |" in page and "| hand-written grid |" in page
    # Every arm ran as real studies: an Optuna storage and an MLflow store per study.
    names = [p.parent.name for p in (work / "runs").glob("*/study.json")]
    assert len(names) == 3 + n and (work / "runs" / "mlflow.db").is_file()
    for name in names:
        url = common.storage_url(work / "runs", name)
        assert url.startswith("sqlite:///") and Path(url[len("sqlite:///"):]).is_file()
        assert len(common.load_study(work / "runs", name).trials) == (1 if "-grid-" in name else n)


def test_storage_url_follows_the_manifest(tmp_path: Path) -> None:
    """study.json names the Optuna storage relative to the study folder (or absolute, or as a URL)."""
    folder = tmp_path / "runs" / "s"
    folder.mkdir(parents=True)
    for given, expected in [("optuna.db", f"sqlite:///{folder}/optuna.db"),
                            ("../shared/optuna.log", f"journal:{folder}/../shared/optuna.log"),
                            ("/abs/optuna.db", "sqlite:////abs/optuna.db"),
                            ("postgresql://host/db", "postgresql://host/db")]:
        (folder / "study.json").write_text(json.dumps({"name": "s", "storage": given}))
        assert common.storage_url(tmp_path / "runs", "s") == expected
