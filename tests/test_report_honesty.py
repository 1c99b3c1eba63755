"""The study report says only what its data supports: importances only on enough trials and never for a size set by
construction, the recommendation's rule and validation noise in words, the best trials the most visible, tick
labels that do not overlap, and a page that reads at 1,280 px."""
from __future__ import annotations

import html
import itertools
import json
import re
import subprocess

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from test_report import CHROMIUM, DIST, TOTAL, _folder, _space, _study, _trial

from analysis import pareto, plots_trials, recommend
from analysis.report import IMPORTANCE_MIN_TRIALS, importances, search_lines, size_note, write_report
from analysis.report_data import collect
from analysis.report_page import STYLE, recommendation_text
from analysis.report import recommend as recommend_models

PLANTED = "attack.eps_multiplier"
PLANTED_DIST = {**DIST, PLANTED: FloatDistribution(0.5, 2.0), "finetune.lr": FloatDistribution(1e-4, 1e-1, log=True)}


def _text(page: str) -> str:
    """The page as a reader sees it: tags dropped, entities decoded, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", page)))


def _planted_study(n: int, seed: int = 0, state_every: int = 0):
    """n COMPLETE trials whose val_robust_acc is set by PLANTED alone (plus a little noise): keep_fraction,
    score_init, method and finetune.lr are drawn at random and do not enter it. Every `state_every`-th further
    trial FAILs (0: none)."""
    rng = np.random.default_rng(seed)
    study = optuna.create_study(directions=["minimize", "maximize"])
    for i in range(n):
        keep = float(10 ** rng.uniform(-2, 0))
        eps = float(rng.uniform(0.5, 2.0))
        params = {"prune.keep_fraction": keep, "prune.score_init": str(rng.choice(["ssi", "snip", "kaiming_normal"])),
                  "prune.method": str(rng.choice(["hydra", "lwm"])), PLANTED: eps,
                  "finetune.lr": float(10 ** rng.uniform(-4, -1))}
        robust = 0.1 + 0.4 * (eps - 0.5) / 1.5 + float(rng.normal(0, 0.005))
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[round(TOTAL * keep), robust], params=params,
                                     distributions=PLANTED_DIST,
                                     user_attrs={"params_total": TOTAL, "val_points": 512.0, "val_clean_acc": robust + 0.2}))
        if state_every and i % state_every == 0:
            study.add_trial(create_trial(state=TrialState.FAIL, params=params, distributions=PLANTED_DIST))
    return study


# ---------------------------------------------------------------------------------------------------
# Importances.


def test_importance_names_the_planted_parameter_and_no_importance_for_the_size(tmp_path):
    study = _planted_study(40)
    imp = importances(study, ["params_kept", "val_robust_acc"])
    assert not imp.too_few and imp.complete == 40
    ranked = list(imp.values["val_robust_acc"])
    assert ranked[0] == PLANTED and imp.values["val_robust_acc"][PLANTED] > 0.5, imp.values
    assert "params_kept" not in imp.values  # set by keep_fraction: no fANOVA of it
    index = write_report(tmp_path / "s", study, _space(), None)
    text = _text(index.read_text())
    assert f"Most important for val_robust_acc: {PLANTED}" in text
    assert "params_kept is set by prune.keep_fraction: no importance is computed" in text
    assert (index.parent / "importance.png").is_file()
    assert "importance needs" not in text


def test_importance_on_too_few_trials_says_so_and_draws_nothing(tmp_path):
    study = _planted_study(8)
    imp = importances(study, ["params_kept", "val_robust_acc"])
    assert imp.too_few and imp.values == {} and (imp.complete, imp.needed) == (8, IMPORTANCE_MIN_TRIALS)
    index = write_report(tmp_path / "s", study, _space(), None)
    text = _text(index.read_text())
    assert f"importance needs >= {IMPORTANCE_MIN_TRIALS} completed trials; this study has 8" in text
    assert not (index.parent / "importance.png").exists()
    assert "Most important for" not in text and "fANOVA importance per objective" not in text
    # failed trials do not count towards the threshold
    assert importances(_planted_study(IMPORTANCE_MIN_TRIALS - 1, state_every=1), ["val_robust_acc"]).too_few


def test_size_objectives_are_set_by_the_keep_fraction():
    searched = ["prune.keep_fraction", "prune.score_init"]
    assert size_note("params_kept", searched) == "params_kept is set by prune.keep_fraction: no importance is computed"
    for metric in ("compression", "sparsity", "sparse_bytes", "prunable_kept"):
        assert size_note(metric, searched).startswith(f"{metric} is set by prune.keep_fraction:")
    assert "prune.keep_fraction and prune.scope" in size_note("params_kept", searched + ["prune.scope"])
    assert "prune.keep_fraction (fixed in this study)" in size_note("params_kept", ["prune.score_init"])
    assert size_note("dense_bytes", searched).startswith("dense_bytes is set by the model")
    assert size_note("val_robust_acc", searched) is None and size_note("auc.linf", searched) is None
    # the size objective has no importance even when it is the only one and the study is large
    imp = importances(_planted_study(25), ["params_kept", "val_robust_acc"])
    assert set(imp.values) == {"val_robust_acc"} and "params_kept" in imp.notes


# ---------------------------------------------------------------------------------------------------
# The recommendation: its rule and its validation noise.


def _noise_study(val_points):
    """_fake_study's trials (test_report) with `val_points` validation points each."""
    return _study([_trial(0.5, 0.63, "ssi", val_points=val_points), _trial(0.2, 0.615, "snip", val_points=val_points),
                   _trial(0.08, 0.60, "ssi", val_points=val_points), _trial(0.01, 0.35, "kaiming_normal", val_points=val_points),
                   _trial(0.03, 0.55, "ssi", val_points=val_points), _trial(0.3, 0.40, "kaiming_normal", val_points=val_points)])


def test_standard_error_and_noise():
    assert recommend.standard_error(0.5, 100) == pytest.approx(0.05)
    assert recommend.standard_error(0.9, 400) == pytest.approx(0.015)
    assert recommend.standard_error(0.5, None) is None and recommend.standard_error(0.5, 0) is None
    a = recommend.Point(0, 10, 0.60, val_points=100)
    b = recommend.Point(1, 20, 0.55, val_points=100)
    diff, bound = recommend.noise_gap(a, b)
    assert diff == pytest.approx(0.05) and bound == pytest.approx(2 * np.hypot(a.se, b.se))
    assert recommend.within_noise(a, b) is True
    assert recommend.within_noise(recommend.Point(0, 10, 0.60, val_points=1e5), recommend.Point(1, 20, 0.55, val_points=1e5)) is False
    assert recommend.within_noise(a, recommend.Point(1, 20, 0.55)) is None


def test_recommendation_states_its_rule_its_noise_and_when_candidates_are_within_it(tmp_path):
    space = _space()
    close = _noise_study(100.0)
    root = _folder(tmp_path / "close", close, space)  # dense 0.62: within 1 point -> trial 1 (0.615); knee: trial 4 (0.55)
    data = collect(root, close, space)
    rec = recommend_models(data, 1.0)
    assert (rec.within.trial, rec.knee.trial) == (1, 4)
    text = _text(recommendation_text(data, rec))
    assert recommend.KNEE_RULE in text and recommend.within_rule(1.0) in text
    assert "SE = sqrt(p (1 - p) / n)" in text
    assert "trial 1 (smallest within 1 points of dense): 0.615 ± 0.049 on 100 validation points" in text
    assert "trial 4 (knee of the front): 0.550 ± 0.050 on 100 validation points" in text
    # 0.615 and 0.55 differ by 0.065 < 2 sqrt(0.049^2 + 0.050^2) = 0.139
    assert re.search(r"Trial 1 \(smallest within .*?\) and trial 4 \(knee of the front.*?\) differ by 0\.065, within 2 "
                     r"standard errors of the difference \(0\.139\): not distinguishable on 100 validation points", text), text
    assert "decided by validation noise" in text  # a 1-point tolerance on 100 points
    page = _text(write_report(root, close, space, None).read_text())
    assert "not distinguishable on 100 validation points" in page and recommend.KNEE_RULE in page
    # the same figures on 100,000 points each: every difference is far outside the noise
    far = _noise_study(1e5)
    root = _folder(tmp_path / "far", far, space)
    data = collect(root, far, space)
    text = _text(recommendation_text(data, recommend_models(data, 1.0)))
    assert recommend.KNEE_RULE in text and "± 0.002 on 100000 validation points" in text
    assert "not distinguishable" not in text and "distinguishable on 100000 validation points" in text
    assert "decided by validation noise" not in text


def test_recommendation_without_val_points_says_the_noise_is_unknown(tmp_path):
    space = _space()
    study = _study([_trial(0.5, 0.63), _trial(0.2, 0.615), _trial(0.03, 0.55)])
    data = collect(_folder(tmp_path, study, space), study, space)
    text = _text(recommendation_text(data, recommend_models(data, 1.0)))
    assert recommend.KNEE_RULE in text and "Validation noise unknown" in text and "distinguishable" not in text


# ---------------------------------------------------------------------------------------------------
# The best trials the most visible; no overlapping labels.


def _luminance(rgba) -> float:
    r, g, b = rgba[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_pareto_ranks_are_non_dominated_sorting():
    rng = np.random.default_rng(1)
    values = rng.uniform(0, 1, (60, 2))
    ranks = pareto.pareto_ranks(values, ["min", "max"])
    assert (np.flatnonzero(ranks == 0) == np.flatnonzero(pareto.non_dominated(values, ["min", "max"]))).all()
    for i, j in itertools.permutations(range(60), 2):  # independent: a dominating point has a smaller rank
        if values[j, 0] <= values[i, 0] and values[j, 1] >= values[i, 1] and (values[j] != values[i]).any():
            assert ranks[j] < ranks[i]
    for r in range(1, ranks.max() + 1):  # every rank-r point is dominated by some rank r-1 point
        for i in np.flatnonzero(ranks == r):
            assert any(values[j, 0] <= values[i, 0] and values[j, 1] >= values[i, 1] for j in np.flatnonzero(ranks == r - 1))


def test_parallel_plot_draws_the_front_last_and_darkest():
    ranks = [2, 0, None, 1, 0, None, 2]
    order = plots_trials.draw_order(ranks)
    assert sorted(i for i, *_ in order) == list(range(len(ranks)))
    drawn = [ranks[i] for i, *_ in order]
    assert drawn[:2] == [None, None] and drawn[-2:] == [0, 0]  # failed underneath, the front on top
    assert drawn == [None, None, 2, 2, 1, 0, 0]
    style = {ranks[i]: (colour, lw, z) for i, colour, lw, z in order}
    lum = {r: _luminance(style[r][0]) for r in (0, 1, 2)}
    assert lum[0] < lum[1] < lum[2] < 0.9  # the better, the darker; the worst still shows on white
    assert style[0][1] > style[1][1] > style[2][1] and style[0][2] > style[1][2] > style[2][2] > style[None][2]
    grey = style[None][0]
    assert max(grey[:3]) - min(grey[:3]) < 0.02 and _luminance(grey) > lum[2]  # a light grey, lighter than any rank
    # a study: its front (Optuna's best_trials) gets rank 0 and is drawn last
    study = _planted_study(30, state_every=5)
    axes, lines = search_lines(study, ["min", "max"])
    assert {a.key for a in axes} == set(PLANTED_DIST) and any(ln.rank is None for ln in lines)
    front = {ln.number for ln in lines if ln.rank == 0}
    assert front == {t.number for t in study.best_trials}
    order = plots_trials.draw_order([ln.rank for ln in lines])
    assert {lines[i].number for i, *_ in order[-len(front):]} == front


def _inside(ax, label, k: int) -> bool:
    """Whether a tick label's tick is inside the axis' limits (matplotlib keeps a few outside, never drawn);
    k: 0 for x, 1 for y."""
    lo, hi = sorted(ax.get_xlim() if k == 0 else ax.get_ylim())
    return lo <= label.get_position()[k] <= hi


def _overlaps(boxes) -> list:
    return [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]


LONG = ("kaiming_normal_fan_out_with_a_long_suffix", "snip_at_initialisation", "ssi", "synflow_iterative_100",
        "uniform", "magnitude_after_warmup", "grasp", "random_balanced_per_layer", "a", "b", "c")


@pytest.mark.parametrize("long", [LONG, LONG[:8], LONG[:4], ("ssi", "snip", "kaiming_normal")])
def test_slice_plot_tick_labels_do_not_overlap(tmp_path, long):
    axes = [plots_trials.ParamAxis("prune.score_init", "category", choices=long),
            plots_trials.ParamAxis("finetune.lr", "number", log=True),  # less than a decade: minor ticks would be labelled
            plots_trials.ParamAxis("attack.eps_multiplier", "number"),
            plots_trials.ParamAxis("prune.keep_fraction", "number", log=True)]
    rng = np.random.default_rng(0)
    lines = [plots_trials.TrialLine(i, {"prune.score_init": long[i % len(long)], "finetune.lr": float(rng.uniform(0.0021, 0.0079)),
                                 "attack.eps_multiplier": float(rng.uniform(0.51234, 1.98765)),
                                 "prune.keep_fraction": float(10 ** rng.uniform(-3, 0))},
                             [float(rng.integers(100, 10000)), float(rng.uniform(0.1, 0.6))], int(rng.integers(0, 4)))
             for i in range(40)]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plots_trials.slice_figure(axes, lines, 1, "val_robust_acc")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    page = fig.bbox
    used = [ax for ax in fig.axes if ax.get_visible()]
    assert len(used) == len(axes)
    for ax in used:
        for k, labels in enumerate((ax.get_xticklabels(), ax.get_yticklabels())):
            shown = [t for t in labels if t.get_visible() and t.get_text() and _inside(ax, t, k)]
            boxes = [t.get_window_extent(renderer) for t in shown]
            assert not _overlaps(boxes), [t.get_text() for t in shown]
            assert all(page.x0 - 1 <= b.x0 and b.x1 <= page.x1 + 1 and page.y0 - 1 <= b.y0 for b in boxes)
            assert 2 <= len(shown) <= 8, [t.get_text() for t in labels]  # labelled, and few
            assert all(t.get_text() in {plots_trials.short_label(c) for c in long} for t in shown) if k == 0 and ax is used[0] else True
        assert not [t for t in ax.get_xticklabels(minor=True) if t.get_text() and _inside(ax, t, 0)]
    # the x labels of different panels do not collide either
    xl = [ax.xaxis.label.get_window_extent(renderer) for ax in used]
    assert not _overlaps(xl)
    path = plots_trials.slice_plot(tmp_path / "slice.png", axes, lines, 1, "val_robust_acc")
    assert path.is_file()
    assert "\n" in plots_trials.short_label(LONG[0]) and plots_trials.short_label(LONG[0]).endswith("…")
    assert plots_trials.short_label("kaiming_normal") == "kaiming_normal"


# ---------------------------------------------------------------------------------------------------
# The page at 1,280 px.


def test_page_tables_scroll_in_their_container_and_images_shrink(tmp_path):
    study = _planted_study(25, state_every=5)
    index = write_report(tmp_path / "s", study, _space(), None)
    page = index.read_text()
    tables = page.count("<table")
    assert tables >= 3 and page.count("<div class=scroll><table") == tables  # every table in a scroll container
    assert ".scroll{max-width:100%;overflow-x:auto" in STYLE and "img{max-width:100%" in STYLE
    assert f"<style>{STYLE}</style>" in page


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_page_reads_at_1280_px_in_headless_chromium(tmp_path):
    study = _planted_study(25)
    # a front model with a long unbreakable test attack name and model path: the widest tables
    index = write_report(tmp_path / "s", study, _space(), None)
    wide = "<div class=scroll><table><tr>" + "".join(f"<td>column_{i}_with_a_long_unbreakable_name</td>" for i in range(40)) \
        + "</tr></table></div>"
    probe = index.with_name("probe.html")
    script = ("<script>window.addEventListener('load', () => { const p = document.createElement('pre'); p.id = 'probe';"
              "p.textContent = JSON.stringify({doc: document.documentElement.scrollWidth, view: window.innerWidth,"
              "imgs: [...document.images].map(i => i.getBoundingClientRect().right),"
              "tables: [...document.querySelectorAll('table')].map(t => [t.parentElement.className,"
              "t.parentElement.getBoundingClientRect().right])});"
              "document.body.appendChild(p); });</script>")
    probe.write_text(index.read_text().replace("</body>", wide + script + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600",
           f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout, re.S)
    assert found, out.stderr[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    assert seen["view"] == 1280 and seen["doc"] <= seen["view"], seen  # nothing widens the page: no sideways page scroll
    assert seen["imgs"] and all(r <= seen["view"] for r in seen["imgs"])
    assert all(cls == "scroll" and right <= seen["view"] for cls, right in seen["tables"]), seen["tables"]
