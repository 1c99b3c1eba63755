"""The study report: recommendation logic and plot inputs on fake Optuna trials, the page in a real
browser (headless Chromium), MLflow/Optuna metadata, and one end-to-end study that leaves the report
in runs/<study>/report/ and in its parent MLflow run."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from conftest import QUICKSTART

from analysis import pareto, plots, recommend
from analysis.recommend import Point
from analysis.report import recommend as recommend_models
from analysis.report import summary, write_report
from analysis.report_data import ReportError, axes_of, collect
from study.search.optimize.space import load_space
from study.search.recording.trial_callback import epoch_record

OBJECTIVES = {"study.objectives": [{"metric": "params_kept", "mode": "min"}, {"metric": "val_robust_acc", "mode": "max"}]}
TOTAL = 10_000.0
DIST = {"prune.keep_fraction": FloatDistribution(0.001, 1.0, log=True),
        "prune.score_init": CategoricalDistribution(["ssi", "snip", "kaiming_normal"]),
        "prune.method": CategoricalDistribution(["hydra", "lwm"])}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space(**more):
    return load_space(QUICKSTART, {**OBJECTIVES, **more})


def _trial(keep, robust, init="ssi", method="hydra", state=TrialState.COMPLETE, run="", **attrs):
    params = {"prune.keep_fraction": keep, "prune.score_init": init, "prune.method": method}
    values = [round(TOTAL * keep), robust] if state == TrialState.COMPLETE else None
    return create_trial(state=state, values=values, params=params, distributions=DIST,
                        user_attrs={"params_total": TOTAL, "val_clean_acc": min(1.0, robust + 0.2),
                                    "mlflow_run_id": run, **attrs})


def _study(trials):
    study = optuna.create_study(directions=["minimize", "maximize"])
    for t in trials:
        study.add_trial(t)
    return study


def _point(n, size, robust, total=TOTAL, **kw):
    return Point(trial=n, size=float(size), robust=float(robust), total=total, **kw)


# ---------------------------------------------------------------------------------------------------
# Recommendation logic.


def test_front_equals_optunas_best_trials_and_brute_force():
    rng = np.random.default_rng(0)
    keeps = 10 ** rng.uniform(-3, 0, 40)
    robust = np.clip(0.2 + 0.5 * keeps ** 0.25 + rng.normal(0, 0.05, 40), 0, 1)
    trials = [_trial(float(k), float(r), run=f"r{i}") for i, (k, r) in enumerate(zip(keeps, robust))]
    trials.append(_trial(0.5, 0.5, state=TrialState.FAIL))
    study = _study(trials)
    data = collect(Path("/nonexistent"), study, _space())
    front = [p.trial for p in data.front]
    assert sorted(front) == sorted(t.number for t in study.best_trials)
    brute = [p.trial for p in data.points  # independent: nobody at most as large and strictly more robust, or ...
             if not any((q.size <= p.size and q.robust >= p.robust) and (q.size < p.size or q.robust > p.robust)
                        for q in data.points)]
    assert sorted(front) == sorted(brute)
    assert [p.size for p in data.front] == sorted(p.size for p in data.front)  # smallest first
    assert len(data.points) == 40 and data.counts["fail"] == 1


def test_knee_is_the_largest_bulge_of_the_front():
    # sizes evenly spaced in log10 (x = 0, 1/3, 2/3, 1 after scaling); robust scaled 0, .8, .9, 1:
    # the distance above the chord y = x is largest at the second point.
    front = [_point(0, 100, 0.10), _point(1, 1_000, 0.50), _point(2, 10_000, 0.55), _point(3, 100_000, 0.60)]
    assert recommend.knee(front).trial == 1
    # a bulge at the large end
    front = [_point(0, 100, 0.10), _point(1, 1_000, 0.12), _point(2, 10_000, 0.58), _point(3, 100_000, 0.60)]
    assert recommend.knee(front).trial == 2
    # the largest bulge is not the point nearest the ideal corner: scaled (0.02, 0.42) stands 0.40 above
    # the chord (distance to (0, 1): 0.58), (0.31, 0.69) stands 0.38 above it (distance 0.44)
    front = [_point(0, 100, 0.1), _point(1, 10 ** 2.06, 0.31), _point(2, 10 ** 2.93, 0.445), _point(3, 100_000, 0.6)]
    assert recommend.knee(front).trial == 1
    # no bulge (points on or below the chord) and two-point fronts: nearest the ideal corner (0, 1)
    straight = [_point(0, 100, 0.1), _point(1, 1_000, 0.2), _point(2, 10_000, 0.3)]
    assert recommend.knee(straight).trial == 1  # distances to (0,1): 1, 0.707, 1
    assert recommend.knee([_point(0, 100, 0.1), _point(1, 10_000, 0.9)]).trial == 1  # a tie: the more robust
    assert recommend.knee([_point(5, 100, 0.1)]).trial == 5
    assert recommend.knee([]) is None


def test_smallest_within_x_points_of_the_dense_model():
    pts = [_point(0, 50, 0.40), _point(1, 200, 0.585), _point(2, 150, 0.575), _point(3, 900, 0.61), _point(4, 200, 0.59)]
    assert recommend.smallest_within(pts, 0.60, 1.0).trial == 4  # >= 0.59: trials 3, 4 (same size as 1, more robust)
    assert recommend.smallest_within(pts, 0.60, 2.5).trial == 2  # >= 0.575
    assert recommend.smallest_within(pts, 0.60, 20.0).trial == 0
    assert recommend.smallest_within(pts, 0.70, 1.0) is None
    # the choice is always on the front
    data_front = recommend.front(pts)
    for x in (0.5, 1, 2.5, 5, 20):
        assert recommend.smallest_within(pts, 0.6, x) in data_front


def test_best_robust_accuracy_at_compression():
    pts = [_point(0, 2_000, 0.5), _point(1, 1_000, 0.45), _point(2, 900, 0.40), _point(3, 100, 0.30), _point(4, 50, 0.2),
           _point(5, 10, 0.9, total=None)]  # no total: no compression, never chosen
    assert recommend.best_at_compression(pts, 10).trial == 1  # 10_000 / 1_000 = 10x exactly
    assert recommend.best_at_compression(pts, 100).trial == 3
    assert recommend.best_at_compression(pts, 1000) is None


def test_hypervolume_history_ends_at_the_study_hypervolume():
    trials = [_trial(0.5, 0.6), _trial(0.05, 0.3), _trial(0.1, 0.2), _trial(0.9, 0.1, state=TrialState.FAIL),
              _trial(0.01, 0.25)]
    study = _study(trials)
    hist = recommend.hypervolume_history(study.get_trials(), ["min", "max"])
    assert [k for k, _ in hist] == [1, 2, 3, 4]
    values = np.array([t.values for t in study.trials if t.values])
    ref = [1.1 * values[:, 0].max(), 0.0]
    # independent: rectangles of a 2D staircase (min size, max robust) against ref
    def hv2d(pts):
        pts = sorted(pts)
        area, best = 0.0, 0.0
        for i, (s, r) in enumerate(pts):
            best = max(best, r)
            nxt = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
            area += (nxt - s) * best
        return area
    expect = [hv2d([tuple(v) for v in values[:k]]) for k in range(1, 5)]
    assert [v for _, v in hist] == pytest.approx(expect)
    assert hist[-1][1] == pytest.approx(pareto.study_hypervolume(study))
    assert all(b >= a for (_, a), (_, b) in zip(hist, hist[1:]))


def test_baseline_configs_name_the_lwm_runs_at_the_fronts_sizes():
    study = _study([_trial(0.05, 0.3, "snip"), _trial(0.05, 0.3, "ssi"), _trial(0.2, 0.5), _trial(0.02, 0.1, method="lwm"),
                    _trial(0.5, 0.2)])  # the last is dominated
    rows = pareto.front_rows(study, ["params_kept", "val_robust_acc"])
    configs = recommend.baseline_configs(rows)
    # trials 0 and 1 differ only in score_init, which LWM does not use: one run serves both
    assert [c["for_trials"] for c in configs] == [[0, 1], [2]]
    assert [c["overrides"] for c in configs] == [{"prune.keep_fraction": 0.05, "prune.method": "lwm"},
                                                 {"prune.keep_fraction": 0.2, "prune.method": "lwm"}]
    rows = [{"trial": 7, "prunable_kept": 30, "prunable_total": 120, "attack.schedule": "cosine", "prune.score_init": "ssi"}]
    assert recommend.baseline_configs(rows) == [
        {"for_trials": [7], "overrides": {"attack.schedule": "cosine", "prune.keep_fraction": 0.25, "prune.method": "lwm"}}]
    assert recommend.set_args({"prune.keep_fraction": 0.0123456789, "prune.method": "lwm"}) == \
        "--set prune.keep_fraction=0.0123457 --set prune.method=lwm"


# ---------------------------------------------------------------------------------------------------
# What the plots and the summary are given, from a study folder.


def _folder(tmp_path, study, space, dense_history=True, confirm=(), curves=(), baselines=None):
    root = tmp_path / "runs" / space.study.name
    for n in confirm:
        d = root / "trials" / f"{n:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.pt").write_bytes(b"weights")
        r = study.trials[n].values[1]
        (d / "confirm.json").write_text(json.dumps({"test_attack": "PGD-50 x3 + standard AutoAttack", "metrics": {
            "test_clean_acc": 0.9, "test_pgd_acc": r - 0.01, "test_autoattack_acc": r - 0.03, "test_robust_acc": r - 0.04}}))
    for n in curves:
        d = root / "trials" / f"{n:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "robustness_final.json").write_text(json.dumps({"report": {"curves": {
            "linf": {"unit": "linf", "eps": [0.0, 0.05, 0.1], "robust_acc": [0.9, 0.5, 0.2]},
            "l2": {"unit": "l2", "eps": [0.0, 1.0], "robust_acc": [0.9, 0.3]}}}}))
    if dense_history:
        (root / "pretrained").mkdir(parents=True, exist_ok=True)
        torch.save({"model": {"w": torch.zeros(2)}, "history": [{"val_robust_acc": 0.50, "val_clean_acc": 0.7},
                                                                {"val_robust_acc": 0.62, "val_clean_acc": 0.8}]},
                   root / "pretrained" / f"{space.base_config().pretrain_key()}.pt")
    if baselines is not None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "baselines.json").write_text(json.dumps(baselines))
    return root


def _fake_study():
    return _study([_trial(0.5, 0.63, "ssi", run="a"), _trial(0.2, 0.615, "snip", run="b"), _trial(0.08, 0.60, "ssi", run="c"),
                   _trial(0.01, 0.35, "kaiming_normal", run="d"), _trial(0.03, 0.55, "ssi", run="e"),
                   _trial(0.3, 0.40, "kaiming_normal", run="f"), _trial(0.2, 0.1, state=TrialState.FAIL)])


def test_collect_reads_trials_confirmations_curves_and_the_dense_model(tmp_path):
    study, space = _fake_study(), _space()
    root = _folder(tmp_path, study, space, confirm=(2,), curves=(2, 5))  # 5 is not on the front
    data = collect(root, study, space)
    assert (data.size_metric, data.robust_metric) == ("params_kept", "val_robust_acc")
    assert [p.trial for p in data.front] == [3, 4, 2, 1, 0]
    by = {p.trial: p for p in data.points}
    assert by[2].autoattack_confirmed and not by[1].autoattack_confirmed
    assert by[2].test["test_robust_acc"] == pytest.approx(0.56) and by[2].test["test_attack"].startswith("PGD-50")
    assert by[2].model_path == str(root / "trials" / "0002" / "model.pt") and by[1].model_path == ""
    assert by[2].compression == pytest.approx(1 / 0.08) and by[4].run_id == "e"
    assert set(data.curves) == {2} and data.curves[2]["linf"] == ([0.0, 0.05, 0.1], [0.9, 0.5, 0.2], "linf")
    assert data.dense is not None and (data.dense.robust, data.dense.clean, data.dense.size) == (0.62, 0.8, TOTAL)
    assert [k for k, _ in data.hv_history] == [1, 2, 3, 4, 5, 6]
    # within 1 point of the dense 0.62: the smallest with >= 0.61 is trial 1; within 2.5: trial 2 (0.60)
    rec = recommend_models(data, 1.0)
    # knee by hand: log10 sizes 2, 2.48, 2.90, 3.30, 3.70 and robust .35 .. .63 scaled to [0, 1] give
    # heights above the chord y = x of 0, .43, .36, .18, 0: trial 4 (300 params, 0.55)
    assert (rec.within.trial, rec.knee.trial, rec.chosen.trial) == (1, 4, 1)
    assert recommend_models(data, 2.5).within.trial == 2
    metrics, tags = summary(data, recommend_models(data, 2.5))
    assert metrics["recommended_trial"] == 2 and tags["recommended_run_id"] == "c"
    assert tags["recommended_model"].endswith("trials/0002/model.pt")
    assert metrics["best_val_robust_acc_10x"] == pytest.approx(0.60)  # 12.5x; trial 0/1/5 are < 10x
    assert metrics["best_val_robust_acc_100x"] == pytest.approx(0.35)  # trial 3, exactly 100x
    assert metrics["hypervolume"] == pytest.approx(pareto.study_hypervolume(study))
    assert metrics["dense_val_robust_acc"] == 0.62


def test_dense_reference_missing_or_unreadable_leaves_only_the_knee(tmp_path):
    study, space = _fake_study(), _space()
    root = _folder(tmp_path, study, space, dense_history=False)
    (root / "pretrained").mkdir(parents=True)
    (root / "pretrained" / f"{space.base_config().pretrain_key()}.pt").write_text("not a checkpoint")
    data = collect(root, study, space)
    assert data.dense is None
    rec = recommend_models(data, 1.0)
    assert rec.within is None and rec.chosen is rec.knee and "no dense figure" in rec.note


def test_lwm_baseline_from_the_study_or_from_baselines_json(tmp_path):
    space = _space()
    mixed = _study([_trial(0.1, 0.5), _trial(0.1, 0.4, method="lwm"), _trial(0.01, 0.2, method="lwm"),
                    _trial(0.3, 0.3, method="lwm")])  # the last LWM trial is dominated by LWM trial 1
    data = collect(tmp_path / "a", mixed, space)
    assert data.baseline_source.startswith("the study's LWM trials")
    assert sorted((b.size, b.robust) for b in data.baselines) == [(100.0, 0.2), (1000.0, 0.4)]
    rows = [{"method": "lwm", "keep_fraction": 0.1, "params_kept": 1000, "val_robust_acc": 0.45, "val_clean_acc": 0.6},
            {"method": "lwm", "keep_fraction": 0.01}]  # no figures: skipped
    root = _folder(tmp_path, _fake_study(), space, baselines=rows)
    data = collect(root, _fake_study(), space)
    assert [(b.size, b.robust, b.keep_fraction) for b in data.baselines] == [(1000.0, 0.45, 0.1)]
    assert data.baseline_source == "baselines.json"


def _computed_baselines(root, study, space, front_budget, baseline_budget):
    """Front trials confirmed with `front_budget` (confirm.json as study.search.front.evaluate writes it) and baselines.json
    as study.baselines writes it, confirmed with `baseline_budget`."""
    from study.search.front.robust_settings import ConfirmSettings

    def attack(b):
        return ConfirmSettings(**b).attack_text(0.1, b["points"])

    data = collect(root, study, space)
    for p in data.front:
        d = root / "trials" / f"{p.trial:04d}"
        d.mkdir(parents=True, exist_ok=True)
        aa = {"test_autoattack_acc": p.robust - 0.1} if front_budget["autoattack"] else {}
        (d / "confirm.json").write_text(json.dumps({"budget": front_budget, "eps": 0.1, "test_attack": attack(front_budget),
                                                    "metrics": {"test_clean_acc": 0.9, "test_pgd_acc": p.robust - 0.05, **aa,
                                                                "test_robust_acc": p.robust - 0.1, "test_points": 100.0}}))
    rows = [{"method": "lwm", "keep_fraction": p.size / TOTAL, "params_kept": p.size, "val_robust_acc": p.robust - 0.2,
             "val_clean_acc": 0.7, "params_total": TOTAL, "for_trials": [p.trial], "test_attack": attack(baseline_budget),
             "test_clean_acc": 0.8, "test_pgd_acc": p.robust - 0.25, "test_robust_acc": p.robust - 0.25, "test_points": 100.0,
             "budget": baseline_budget, "eps": 0.1, "model": f"baselines/{p.trial:04d}/model.pt", "config": {}}
            for p in data.front[:3]]
    (root / "baselines.json").write_text(json.dumps(rows))
    return rows


def test_the_front_plot_puts_the_computed_baselines_beside_the_front_with_the_same_attack(tmp_path):
    from analysis.report import front_plot_inputs, test_comparison

    study, space = _fake_study(), _space()
    root = _folder(tmp_path, study, space)
    front = {"points": 100, "steps": 50, "restarts": 3, "step_size": 0.0, "autoattack": True, "seed": 0}
    pgd_only = {**front, "autoattack": False}
    # the quickstart's setting: baselines confirmed with the front's PGD only -> compared on test_pgd_acc
    rows = _computed_baselines(root, study, space, front, pgd_only)
    data = collect(root, study, space)
    assert data.baseline_source == "baselines.json" and len(data.baselines) == 3
    b = min(data.baselines, key=lambda b: b.size)
    assert b.test["test_pgd_acc"] == rows[0]["test_pgd_acc"] and "(no AutoAttack)" in b.test["test_attack"]
    assert b.for_trials == (rows[0]["for_trials"][0],) and b.model_path == str(root / rows[0]["model"])
    inputs = front_plot_inputs(data, recommend_models(data), None)
    assert inputs["baselines"] == data.baselines
    assert (inputs["baseline_test_key"], inputs["front_test_key"]) == ("test_pgd_acc", "test_pgd_acc")
    assert "no AutoAttack" in inputs["baseline_test_label"] and "baselines' attack" in inputs["front_test_label"]
    index = write_report(root, study, space, None)
    page = index.read_text()
    assert rows[0]["test_attack"] in page and "confirmed with PGD only" in page
    assert "<code>study trial" not in page  # the baselines ran: no commands to run them
    # confirmed exactly like the front -> test_robust_acc, the front's own (AutoAttack-confirmed) marks
    _computed_baselines(root, study, space, front, front)
    cmp = test_comparison(collect(root, study, space))
    assert (cmp.key, cmp.front_key) == ("test_robust_acc", None) and "worst of PGD, AutoAttack" in cmp.label
    # another attack (other test points): the table has the figures, the plot does not compare them
    _computed_baselines(root, study, space, front, {**pgd_only, "points": 50})
    cmp = test_comparison(collect(root, study, space))
    assert cmp.key is None and "another attack" in cmp.note
    page = write_report(root, study, space, None).read_text()
    assert "another attack" in page and "50 test points" in page
    # the front not confirmed (--no-final-eval): the baselines' test figures are not drawn
    for d in (root / "trials").glob("*/confirm.json"):
        d.unlink()
    assert test_comparison(collect(root, study, space)).key is None


def test_computed_baselines_take_precedence_over_the_studys_own_lwm_trials(tmp_path):
    space = _space()
    mixed = _study([_trial(0.1, 0.5), _trial(0.05, 0.45), _trial(0.01, 0.2, method="lwm")])
    root = tmp_path / "runs" / "quickstart"
    root.mkdir(parents=True)
    assert collect(root, mixed, space).baseline_source.startswith("the study's LWM trials")
    (root / "baselines.json").write_text(json.dumps([
        {"method": "lwm", "keep_fraction": 0.1, "params_kept": 1000, "val_robust_acc": 0.4, "for_trials": [0],
         "test_robust_acc": 0.3, "test_clean_acc": 0.8, "test_attack": "PGD-50 x3", "budget": {"points": 100}}]))
    data = collect(root, mixed, space)  # study.baselines ran at the front's sizes: those are the comparison
    assert data.baseline_source == "baselines.json" and [(b.size, b.test["test_robust_acc"]) for b in data.baselines] == [(1000.0, 0.3)]


def test_report_axes_are_the_size_and_the_robustness_objectives():
    assert axes_of(["params_kept", "val_robust_acc"], ["min", "max"]) == ("params_kept", "val_robust_acc")
    three = ["val_clean_acc", "sparse_bytes", "val_robust_acc", "params_kept"]
    assert axes_of(three, ["max", "min", "max", "min"]) == ("sparse_bytes", "val_robust_acc")
    assert axes_of(["compression", "auc.linf"], ["min", "max"]) == ("compression", "auc.linf")
    with pytest.raises(ReportError, match="minimized size and a maximized robustness"):
        axes_of(["val_robust_acc"], ["max"])


def test_front_plot_colours_by_a_searched_parameter():
    pts = [_point(0, 10, 0.1, params={"a": "x", "k": 0.01}), _point(1, 20, 0.2, params={"a": "y", "k": 1.0}),
           _point(2, 30, 0.3, params={"k": 0.5})]  # "a" inactive (conditional) in trial 2
    kind, info = plots.color_values(pts, "a")
    assert kind == "category" and info["labels"] == ["x", "y"] and info["values"] == {0: "x", 1: "y"}
    kind, info = plots.color_values(pts, "k")
    assert kind == "number" and info["log"] and info["values"][2] == 0.5  # spans 100x: log colour scale
    assert plots.color_values(pts, "missing")[0] == "none" and plots.color_values(pts, None)[0] == "none"


# ---------------------------------------------------------------------------------------------------
# The report folder.


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _report(tmp_path, **kw):
    study, space = _fake_study(), _space()
    root = _folder(tmp_path, study, space, confirm=(2, 4), curves=(2, 4))
    before = _tree(tmp_path)
    index = write_report(root, study, space, SimpleNamespace(parent_run_id=""), **kw)
    after = _tree(tmp_path)
    return index, root, before, after


def test_report_writes_its_folder_and_nothing_else(tmp_path):
    index, root, before, after = _report(tmp_path, within_points=1.0)
    assert index == root / "report" / "index.html"
    new = {k for k in after if k not in before}
    assert all(k.startswith("runs/quickstart/report/") for k in new)
    assert {k: after[k] for k in before} == before  # nothing else touched
    from PIL import Image

    pngs = sorted(p.name for p in index.parent.glob("*.png"))
    # 6 completed trials: too few for importances (analysis.report.IMPORTANCE_MIN_TRIALS), so no importance.png
    assert pngs == ["curves.png", "front.png", "hypervolume.png", "parallel.png", "slice.png"]
    for name in pngs:
        with Image.open(index.parent / name) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    page = index.read_text()
    inlined = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(inlined) == 5
    assert "importance needs &gt;= 20 completed trials; this study has 6" in page
    import base64

    assert {base64.b64decode(b) for b in inlined} == {(index.parent / n).read_bytes() for n in pngs}
    assert "<script" not in page.lower()  # readable without JavaScript
    # the recommendation: smallest within 1 point of the dense 0.62 is trial 1 (0.615), with its run id
    assert "smallest within 1 points of dense" in page and "<code>b</code>" in page
    assert str(root / "trials" / "0002" / "model.pt") in page  # a front model's path
    assert "prune.method=lwm" in page  # no LWM trials, no baselines.json: the runs to do are listed
    assert "Test figures (chosen models only): PGD-50 x3 + standard AutoAttack." in page
    summary_json = json.loads((index.parent / "summary.json").read_text())
    assert summary_json["metrics"]["recommended_trial"] == 1 and summary_json["tags"]["recommended_run_id"] == "b"
    # a rerun replaces the pictures (no stale ones)
    (index.parent / "stale.png").write_bytes(b"old")
    write_report(root, _fake_study(), _space(), None, within_points=5.0)
    assert not (index.parent / "stale.png").exists()


def test_report_on_a_study_with_too_few_trials_still_renders(tmp_path):
    space = _space()
    study = _study([_trial(0.1, 0.5), _trial(0.2, 0.1, state=TrialState.FAIL)])
    index = write_report(tmp_path / "s", study, space, None)
    page = index.read_text()
    assert "not drawn (fewer than two completed trials)" in page
    assert "no front trial has a final robustness evaluation" in page
    assert (index.parent / "front.png").is_file() and (index.parent / "hypervolume.png").is_file()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = """<script>window.addEventListener('load', () => { const p = document.createElement('pre'); p.id = 'probe';
p.textContent = JSON.stringify([...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]));
document.body.appendChild(p); });</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium_with_every_image_loaded(tmp_path):
    index, _, _, _ = _report(tmp_path)
    # the page itself has no script: a copy with a probe appended reports what the browser decoded
    probe = index.with_name("probe.html")
    probe.write_text(index.read_text().replace("</body>", PROBE + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout, re.S)
    assert found, out.stderr[-2000:]
    images = json.loads(found.group(1))
    assert len(images) == 5  # no importance.png on 6 trials
    assert all(complete and w > 300 and h > 200 for complete, w, h in images), images
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium'}",
                    "--window-size=1200,1600", f"--screenshot={shot}", index.as_uri()],
                   capture_output=True, timeout=120, cwd=tmp_path)
    from PIL import Image

    with Image.open(shot) as im:  # the page paints: more than a blank sheet
        assert len(set(im.convert("L").resize((120, 160)).getdata())) > 20


# ---------------------------------------------------------------------------------------------------
# MLflow and Optuna as their users read them.


def test_epoch_records_are_named_by_stage_without_step_epoch_or_stage_metrics():
    rows = [("prune", 1, 1), ("prune", 2, 2), ("finetune", 1, 3), ("finetune", 2, 4)]
    records = [epoch_record({"stage": s, "epoch": e, "step": k, "train_loss": 0.5, "ray_node_id": "n1",
                             "training_iteration": k}) for s, e, k in rows]
    assert [sorted(m) for m, _ in records] == [["prune/train_loss"]] * 2 + [["finetune/train_loss"]] * 2
    assert [t["stage"] for _, t in records] == ["prune", "prune", "finetune", "finetune"]  # the tag: the latest
    assert records[0][1]["ray_node_id"] == "n1"


def test_optuna_study_carries_the_objective_names(tmp_path):
    from study.search.optimize import optuna_search

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna_search.load_optuna_study(url, "names", _space())
    study.add_trial(_trial(0.1, 0.5))
    assert optuna_search.load_optuna_study(url, "names").metric_names == ["params_kept", "val_robust_acc"]
    assert optuna_search.load_optuna_study(url, "names", _space()).metric_names == ["params_kept", "val_robust_acc"]
    cli = Path(sys.executable).with_name("optuna")
    out = subprocess.run([str(cli), "best-trials", "--study-name", "names", "--storage", url, "-f", "json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    best = json.loads(out.stdout)
    assert best[0]["values"] == {"params_kept": 1000, "val_robust_acc": 0.5}  # named, not a bare list


# ---------------------------------------------------------------------------------------------------
# End to end: a quickstart-sized study with a fake trial, then its report in the folder and in MLflow.


class _FakeResult:
    def __init__(self, metrics, cfg):
        self.metrics, self.cfg = metrics, cfg

    def save(self, d):
        d = Path(d)
        torch.save({"w": torch.zeros(3)}, d / "model.pt")
        (d / "result.json").write_text(json.dumps({"metrics": self.metrics, "config": {}, "history": []}))


def fake_pretrain(cfg):
    path = Path(cfg.cache_dir) / f"{cfg.pretrain_key()}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.zeros(3)}, "key": cfg.pretrain_key(),
                "history": [{"val_robust_acc": 0.55, "val_clean_acc": 0.8}, {"val_robust_acc": 0.6, "val_clean_acc": 0.85}]}, path)
    return path


def fake_run_trial(cfg, *, on_epoch=None, resume_state=None):
    """Two prune and two finetune epochs; robustness grows with the keep fraction and the eps multiplier."""
    from study.trial.pipeline import EpochReport

    first = int(resume_state["step"]) + 1 if resume_state else 1
    for step, (stage, epoch) in enumerate([("prune", 1), ("prune", 2), ("finetune", 1), ("finetune", 2)], 1):
        if step >= first and on_epoch is not None:
            on_epoch(EpochReport(stage, epoch, step, {"train_loss": 1.0 / step, "val_robust_acc": 0.1 * step},
                                 lambda s=step: {"step": s}))
    keep = cfg.prune.keep_fraction
    robust = 0.2 + 0.4 * keep ** 0.3 * cfg.attack.eps_multiplier / 1.25
    total = 10000.0
    return _FakeResult({"params_kept": round(total * keep), "params_total": total, "compression": 1 / keep,
                        "val_clean_acc": min(1.0, robust + 0.2), "val_robust_acc": robust, "sparsity": 1 - keep,
                        "wall_s": 0.1}, cfg)


@pytest.mark.slow
def test_quickstart_study_leaves_the_report_and_its_mlflow_artifacts(tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    from study.search.folder import layout
    from study.search.optimize import optuna_search
    from study.search.study import Study, run_study

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    try:
        space = _space(**{"study.n_trials": 6, "study.max_concurrent": 2})
        runs = tmp_path / "runs"
        outcome = run_study(space, runs_dir=runs, run_trial=fake_run_trial, pretrain=fake_pretrain, final_eval=False)
    finally:
        if started:
            ray.shutdown()
    assert outcome.status == "complete" and outcome.complete == 6
    paths = layout.study_paths(runs, "quickstart")
    manifest = layout.Manifest.load(paths.manifest)
    study = optuna_search.load_optuna_study(manifest.storage, "quickstart")  # read-only, as `study report` opens it
    assert study.metric_names == ["params_kept", "val_robust_acc"]
    tracker = Study(space, paths, manifest).tracker()
    index = write_report(paths.root, study, space, manifest, tracker, within_points=5.0)

    report = paths.root / "report"
    assert index == report / "index.html"
    names = {p.name for p in report.iterdir()}
    assert {"index.html", "front.png", "hypervolume.png", "parallel.png", "slice.png", "summary.json"} <= names
    assert "importance.png" not in names  # 6 trials: too few for importances
    client = MlflowClient(tracking_uri=manifest.tracking_uri)
    parent = client.get_run(manifest.parent_run_id)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{n}" for n in names} == logged
    local = client.download_artifacts(parent.info.run_id, "report/index.html", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == index.read_bytes()
    # the front's summary on the parent run, against Optuna's own figures
    best = [t for t in study.best_trials]
    m, tags = parent.data.metrics, parent.data.tags
    assert m["hypervolume"] == pytest.approx(pareto.study_hypervolume(study))
    chosen = study.trials[int(m["recommended_trial"])]
    assert chosen.number in {t.number for t in best}
    assert tags["recommended_run_id"] == chosen.user_attrs["mlflow_run_id"]
    assert client.get_run(tags["recommended_run_id"]).data.tags["optuna_trial_number"] == str(chosen.number)
    assert tags["recommended_model"] == str(paths.root / "trials" / f"{chosen.number:04d}" / "model.pt")
    assert m["dense_val_robust_acc"] == 0.6
    ten = [t.values[1] for t in study.trials if t.values and t.user_attrs["compression"] >= 10]
    assert ("best_val_robust_acc_10x" in m) == bool(ten)
    if ten:
        assert m["best_val_robust_acc_10x"] == pytest.approx(max(ten))
    assert "Front:" in tags["mlflow.note.content"]
    exp = client.get_experiment_by_name("quickstart")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "params_kept" in exp.tags["mlflow.note.content"] and "val_robust_acc" in exp.tags["mlflow.note.content"]
    # per-epoch metrics named by stage at the global step; no epoch, step or stage metrics
    run_id = chosen.user_attrs["mlflow_run_id"]
    hist = {k: [(x.step, x.value) for x in sorted(client.get_metric_history(run_id, k), key=lambda x: x.step)]
            for k in client.get_run(run_id).data.metrics}
    assert [s for s, _ in hist["prune/train_loss"]] == [1, 2] and [s for s, _ in hist["finetune/train_loss"]] == [3, 4]
    assert [s for s, _ in hist["finetune/val_robust_acc"]] == [3, 4]
    assert not {"epoch", "step", "stage"} & set(hist) and not [k for k in hist if k.startswith("time_")]
    assert hist["val_robust_acc"] == [(5, pytest.approx(chosen.values[1]))]  # the final figure, by its name
    trial_run = client.get_run(run_id)
    assert trial_run.data.tags["stage"] == "finetune" and "git_sha" not in trial_run.data.tags
    assert [i.dataset.name for i in trial_run.inputs.dataset_inputs] == ["digits"]
    assert [i.dataset.name for i in parent.inputs.dataset_inputs] == ["digits"]
    assert parent.data.tags["mlflow.source.type"] == "LOCAL" and parent.data.tags["mlflow.user"]
    # the study wrote its report once and this test a second time: each summary metric has one point
    parent_hist = {k: client.get_metric_history(parent.info.run_id, k) for k in m}
    assert {k: len(v) for k, v in parent_hist.items()} == {k: 1 for k in m}
