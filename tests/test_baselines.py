"""The LWM baseline at the front's sizes (`study.baselines`, study.search.front.baselines).

The setting's validation; which LWM runs a front needs and the configs they run; baselines.json written,
reused while its settings are unchanged, redone when they change or the file is damaged (fake runs, no Ray);
and one tiny digits study with the real pipeline: one entry per needed config, finite test figures measured on
the TEST split, the LWM model at the front trial's size with magnitude masks of the dense model, the report's
front plot given the baseline points, and a resume that reuses it all.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import create_trial

from conftest import QUICKSTART, mlflow_trial_runs

from analysis import pareto, recommend
from analysis.report_data import BASELINES_FILE, read_baselines
from study.errors import ConfigError
from study.trial.sparse_file import load_state
from study.keys import NUMBER_KEY
from study.search.folder import layout
from study.search.front import baselines
from study.search.front.robust_settings import ConfirmSettings
from study.search.optimize.space import load_space
from study.search.study import Study, resume_study, run_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

OFF = {"study.baselines": None}


# ---------------------------------------------------------------------------------------------------
# The setting.


def test_the_setting_is_off_by_default_and_builds_on_study_confirm():
    assert load_space(QUICKSTART, OFF).study.baselines is None
    assert load_space(QUICKSTART, {"study.baselines": False}).study.baselines is None
    s = load_space(QUICKSTART, {"study.baselines": True}).study
    assert s.baselines.confirm_settings(s.confirm) == s.confirm  # confirmed exactly like the front
    s = load_space(QUICKSTART, {"study.confirm": {"points": 64, "steps": 20, "restarts": 2},
                                "study.baselines": {"confirm": {"autoattack": False}}}).study
    assert s.baselines.confirm_settings(s.confirm) == ConfirmSettings(points=64, steps=20, restarts=2, autoattack=False)
    # --set reaches one key
    s = load_space(QUICKSTART, {"study.baselines.confirm.points": 50}).study
    assert s.baselines.confirm_settings(s.confirm).points == 50
    # the quickstart ships it on: its front's PGD on the same test points, without AutoAttack's minutes
    q = load_space(QUICKSTART).study
    assert q.baselines is not None and q.confirm.autoattack
    assert q.baselines.confirm_settings(q.confirm) == dataclasses.replace(q.confirm, autoattack=False)


@pytest.mark.parametrize("value, key, words", [
    ("yes", "study.baselines", ["expected true, false or a section", "valid keys: confirm"]),
    (1, "study.baselines", ["expected true, false"]),
    ([True], "study.baselines", ["expected true, false"]),
    ({"method": "lwm"}, "study.baselines.method", ["unknown key", "valid keys: confirm"]),
    ({"confirm": "pgd"}, "study.baselines.confirm", ["mapping", "points, steps, restarts"]),
    ({"confirm": {"autoatack": False}}, "study.baselines.confirm.autoatack", ["did you mean 'autoattack'"]),
    ({"confirm": {"points": -1}}, "study.baselines.confirm.points", [">= 0"]),
    ({"confirm": {"autoattack": "no"}}, "study.baselines.confirm.autoattack", ["true or false"]),
    ({"confirm": {"step_size": 0.01}}, "study.baselines.confirm.step_size", ["steps * step_size >= 1"]),
])
def test_bad_values_are_one_line_config_errors(value, key, words):
    with pytest.raises(ConfigError) as e:
        load_space(QUICKSTART, {"study.baselines": value})
    assert e.value.key == key, str(e.value)
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{QUICKSTART}: {key}")
    for w in words:
        assert w in text, text


# ---------------------------------------------------------------------------------------------------
# Which LWM runs a front needs.


def test_baseline_configs_keep_what_lwm_uses_and_merge_what_it_does_not():
    rows = [  # pareto.front_rows rows: metrics, searched values (dotted), test columns
        {"trial": 0, "params_kept": 500, "val_robust_acc": 0.3, "robust.linf.0.1": 0.2, "test.robust.linf.0.1": 0.1,
         "prune.keep_fraction": 0.05, "prune.score_init": "ssi", "prune_stage.lr": 0.1, "attack.steps": 3,
         "eval.eps": 0.05, "mlflow_run_id": "a"},
        {"trial": 1, "params_kept": 500, "val_robust_acc": 0.31, "prune.keep_fraction": 0.05, "prune.score_init": "snip",
         "prune_stage.lr": 0.2, "prune.train_bn": False, "attack.steps": 3, "eval.eps": 0.05},  # differs only where LWM does not look
        {"trial": 2, "params_kept": 2000, "val_robust_acc": 0.5, "prune.keep_fraction": 0.2, "prune.score_init": "ssi",
         "attack.steps": 3, "eval.eps": 0.1},
        {"trial": 3, "prune.keep_fraction": 0.3, "prune.method": "lwm"},  # already LWM
        {"trial": 4, "prune.keep_fraction": 1.0, "prune.method": "dense"},  # not pruned
    ]
    configs = recommend.baseline_configs(rows)
    assert [c["for_trials"] for c in configs] == [[0, 1], [2]]
    assert configs[0]["overrides"] == {"attack.steps": 3, "eval.eps": 0.05, "prune.keep_fraction": 0.05, "prune.method": "lwm"}
    assert configs[1]["overrides"]["eval.eps"] == 0.1  # a searched eval eps is the baseline's too
    # a study that does not search the keep fraction: the fixed one (not the measured ratio)
    rows = [{"trial": 7, "prunable_kept": 31, "prunable_total": 120, "attack.schedule": "cosine"}]
    assert recommend.baseline_configs(rows, {"prune.method": "hydra", "prune.keep_fraction": 0.25}) == [
        {"for_trials": [7], "overrides": {"attack.schedule": "cosine", "prune.keep_fraction": 0.25, "prune.method": "lwm"}}]
    assert recommend.baseline_configs(rows, {"prune.method": "lwm", "prune.keep_fraction": 0.25}) == []  # an LWM study


DIST = {"prune.keep_fraction": FloatDistribution(0.02, 0.5, log=True),
        "prune.score_init": CategoricalDistribution(["ssi", "kaiming_normal", "snip"]),
        "attack.schedule": CategoricalDistribution(["constant", "linear", "cosine", "step"]),
        "attack.eps_multiplier": FloatDistribution(0.75, 1.25), "attack.steps": IntDistribution(1, 5)}


def _trial(keep, robust, init="ssi", mult=1.0, steps=3):
    params = {"prune.keep_fraction": keep, "prune.score_init": init, "attack.schedule": "constant",
              "attack.eps_multiplier": mult, "attack.steps": steps}
    kept = float(round(10000 * keep))
    return create_trial(values=[kept, robust], params=params, distributions=DIST,
                        user_attrs={"params_kept": kept, "params_total": 10000.0, "val_clean_acc": 0.9})


def _optuna(trials):
    study = optuna.create_study(directions=["minimize", "maximize"])
    for t in trials:
        study.add_trial(t)
    return study


def _study(tmp_path, **overrides) -> Study:
    space = load_space(QUICKSTART, {"study.baselines": True, **overrides})
    paths = layout.study_paths(tmp_path / "runs", "quickstart")
    paths.root.mkdir(parents=True, exist_ok=True)
    manifest = layout.Manifest(name="quickstart", space_file=str(QUICKSTART), storage="sqlite://",
                               tracking_uri="sqlite://", parent_run_id="parent")
    return Study(space, paths, manifest)


def test_a_baseline_runs_the_front_trials_config_with_lwm(tmp_path):
    st = _study(tmp_path)
    study = _optuna([_trial(0.05, 0.3, "snip", 1.2, 4), _trial(0.2, 0.5)])
    entry = baselines.needed(st, study)[0]
    assert entry["for_trials"] == [0]
    cfg = baselines.baseline_config(st, entry)
    front = st.trial_config({**study.trials[0].params, NUMBER_KEY: 0})
    assert (cfg.prune.method, front.prune.method) == ("lwm", "hydra")
    assert cfg.prune.keep_fraction == front.prune.keep_fraction == 0.05 and cfg.prune.scope == front.prune.scope
    assert (cfg.attack, cfg.finetune, cfg.eval, cfg.data, cfg.model) == (front.attack, front.finetune, front.eval,
                                                                         front.data, front.model)
    assert cfg.pretrain_key() == front.pretrain_key() and cfg.cache_dir == front.cache_dir  # the study's dense model
    assert cfg.name == "quickstart-lwm-0000"
    differ = {k for k, v in cfg.flat().items() if front.flat()[k] != v}
    assert differ == {"name", "prune.method", "prune.score_init"}  # snip is not LWM's: the fixed default stays


# ---------------------------------------------------------------------------------------------------
# baselines.json: written, reused, redone (the runs themselves faked: no Ray here).


class FakeTracker:
    def __init__(self):
        self.logged = []

    def log_file(self, run_id, path):
        self.logged.append((run_id, Path(path).name))


@pytest.fixture
def fake_runs(monkeypatch):
    """Replaces the Ray tasks: each run's figures follow from its config; `calls` lists each batch's front trials."""
    calls = []

    def run(st, todo, entries, confirm, cpus, gpus):
        calls.append([e["for_trials"] for _, e, _, _ in todo])
        for i, entry, cfg, settings in todo:
            keep = cfg.prune.keep_fraction
            metrics = {"params_kept": float(round(10000 * keep)), "val_robust_acc": 0.2 + keep, "val_clean_acc": 0.8}
            n = confirm.points
            payload = {"eps": cfg.eval_eps, "test_attack": confirm.attack_text(cfg.eval_eps, n), "wall_s": {"pgd": 0.1},
                       "budget": dataclasses.asdict(confirm),
                       "metrics": {"test_clean_acc": 0.8, "test_pgd_acc": 0.1 + keep, "test_robust_acc": 0.1 + keep,
                                   "test_points": float(n)}}
            entries[i] = baselines.make_entry(entry, settings, metrics, payload, f"baselines/{entry['for_trials'][0]:04d}/model.pt")

    monkeypatch.setattr(baselines, "_run", run)
    return calls


def _models(st, *numbers):
    for n in numbers:
        folder = layout.trial_dir(st.paths.root, n)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.pt").write_bytes(b"weights")


def test_baselines_json_is_written_reused_and_redone(tmp_path, fake_runs, caplog):
    st, tracker = _study(tmp_path), FakeTracker()
    study = _optuna([_trial(0.05, 0.3, "ssi"), _trial(0.05, 0.3, "snip"), _trial(0.2, 0.5), _trial(0.3, 0.2)])
    _models(st, 0, 1, 2)
    path = st.paths.root / BASELINES_FILE
    assert baselines.run_baselines(st, study, tracker, 1, 0) == 2
    assert fake_runs == [[[0, 1], [2]]]  # trials 0 and 1 share one LWM run; trial 3 is dominated
    saved = json.loads(path.read_text())
    assert [e["for_trials"] for e in saved] == [[0, 1], [2]]
    first = saved[0]
    # the report's original fields, then the test figures, their attack and the settings they were made with
    assert list(first)[:5] == ["method", "keep_fraction", "params_kept", "val_robust_acc", "val_clean_acc"]
    assert first["method"] == "lwm" and first["keep_fraction"] == 0.05 and first["test_robust_acc"] == pytest.approx(0.15)
    assert first["test_attack"] == st.space.study.confirm.attack_text(0.1, 100)
    assert first["budget"] == dataclasses.asdict(st.space.study.confirm) and first["config"]["prune.method"] == "lwm"
    assert tracker.logged == [("parent", BASELINES_FILE)]
    refs = read_baselines(st.paths.root, "params_kept", "val_robust_acc")
    assert [(r.size, r.robust, r.for_trials, r.test["test_robust_acc"]) for r in refs] == \
        [(500.0, 0.25, (0, 1), pytest.approx(0.15)), (2000.0, pytest.approx(0.4), (2,), pytest.approx(0.3))]
    assert refs[0].test["test_attack"] == first["test_attack"] and refs[0].test_budget == first["budget"]

    # unchanged settings (a resume, a second call): nothing runs, the file is not rewritten
    before = path.read_bytes()
    assert baselines.run_baselines(st, study, tracker, 1, 0) == 0
    assert fake_runs == [[[0, 1], [2]]] and path.read_bytes() == before

    # a larger front: only the new configuration runs
    study.add_trial(_trial(0.1, 0.45))
    _models(st, 4)
    assert baselines.run_baselines(st, study, tracker, 1, 0) == 1
    assert fake_runs[-1] == [[4]]
    assert [e["for_trials"] for e in json.loads(path.read_text())] == [[0, 1], [4], [2]]  # the front's order

    # changed confirmation settings: every baseline runs again
    st2 = _study(tmp_path, **{"study.baselines": {"confirm": {"points": 64}}})
    assert baselines.run_baselines(st2, study, tracker, 1, 0) == 3
    assert fake_runs[-1] == [[0, 1], [4], [2]]
    assert {e["test_points"] for e in json.loads(path.read_text())} == {64.0}

    # a damaged file: a warning, and everything runs again
    path.write_text('[{"method": "lwm", "keep_fr')
    with caplog.at_level(logging.WARNING, logger="study.search"):
        assert baselines.run_baselines(st2, study, tracker, 1, 0) == 3
    assert "is damaged" in caplog.text and "run again" in caplog.text
    assert len(json.loads(path.read_text())) == 3

    # an entry lacking its test figures is not reused
    saved = json.loads(path.read_text())
    del saved[0]["test_robust_acc"]
    path.write_text(json.dumps(saved))
    assert baselines.run_baselines(st2, study, tracker, 1, 0) == 1 and fake_runs[-1] == [[0, 1]]


def test_a_hand_written_file_is_kept_aside_and_trials_without_models_get_no_baseline(tmp_path, fake_runs, caplog):
    st = _study(tmp_path)
    study = _optuna([_trial(0.05, 0.3), _trial(0.2, 0.5)])
    path = st.paths.root / BASELINES_FILE
    hand = [{"method": "lwm", "keep_fraction": 0.05, "params_kept": 500, "val_robust_acc": 0.2, "val_clean_acc": 0.7}]
    path.write_text(json.dumps(hand))
    _models(st, 1)  # trial 0 has no model (as the front's confirmation, it is skipped)
    with caplog.at_level(logging.WARNING, logger="study.search"):
        assert baselines.run_baselines(st, study, FakeTracker(), 1, 0) == 1
    assert fake_runs == [[[1]]]
    assert "have no model.pt" in caplog.text and "not made by study.baselines" in caplog.text
    assert json.loads((st.paths.root / (BASELINES_FILE + ".bak")).read_text()) == hand
    assert [e["for_trials"] for e in json.loads(path.read_text())] == [[1]]
    # off: nothing runs, nothing is written
    off = _study(tmp_path, **OFF)
    assert baselines.run_baselines(off, study, FakeTracker(), 1, 0) == 0 and fake_runs == [[[1]]]


# ---------------------------------------------------------------------------------------------------
# The baselines as MLflow runs: a real MLflow store (sqlite), the baseline figures faked (no Ray here).


def _tracked(tmp_path, **overrides):
    """A _study with a real MLflow store, its parent run open."""
    from study.search.recording.tracking import Tracker, open_parent_run

    st = _study(tmp_path, **overrides)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "quickstart", artifact_root=str(tmp_path / "mlartifacts" / "quickstart"))
    st.manifest.tracking_uri = uri
    st.manifest.parent_run_id = open_parent_run(tracker, "quickstart")
    return st, tracker


def _baseline_runs(tracker, parent):
    return tracker.client.search_runs([tracker.experiment_id], filter_string=
                                      f"tags.mlflow.parentRunId = '{parent}' and tags.run_role = 'baseline'")


def test_baselines_are_mlflow_runs_beside_the_trials_found_again_on_a_rerun(tmp_path, fake_runs):
    from analysis.report_data import mlflow_run_ids
    from study.keys import ROLE_TAG, trial_run_key
    from study.search.front.front_files import TEST_METRICS
    from study.search.recording import baseline_runs
    from study.search.recording.study_mlflow import record_unstarted

    st, tracker = _tracked(tmp_path)
    parent = st.manifest.parent_run_id
    study = _optuna([_trial(0.05, 0.3, "ssi"), _trial(0.05, 0.3, "snip"), _trial(0.2, 0.5), _trial(0.3, 0.2)])
    _models(st, 0, 1, 2)
    trials = {}
    for t in study.trials:  # the trials' runs, as the MLflow callback leaves them (still RUNNING)
        trials[t.number] = tracker.create_run(f"quickstart-{t.number:04d}", {
            **trial_run_key("quickstart", t.number, parent), ROLE_TAG: "trial"})
        tracker.log_batch(trials[t.number], metrics={k: v for k, v in t.user_attrs.items()} | {
            "val_robust_acc": t.values[1]}, params=st.trial_config({**t.params, NUMBER_KEY: t.number}).flat())
    assert baselines.run_baselines(st, study, tracker, 1, 0) == 2
    saved = json.loads((st.paths.root / BASELINES_FILE).read_text())
    runs = _baseline_runs(tracker, parent)
    assert len(runs) == 2
    by_key = {r.data.tags["baseline_key"]: r for r in runs}
    for e in saved:
        run = by_key[baseline_runs.key_of(e)]
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        assert (tags["study"], tags["mlflow.parentRunId"], tags["run_role"]) == ("quickstart", parent, "baseline")
        assert tags["baseline"].startswith(f"lwm keep {e['keep_fraction']:.4g}, {e['params_kept']:.0f} params")
        assert tags["baseline_for_trials"] == ", ".join(map(str, e["for_trials"]))
        assert tags["test_attack"] == e["test_attack"] and "optuna_trial_number" not in tags
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"quickstart-lwm-{e['for_trials'][0]:04d}"
        # the names the trial runs carry: the size and validation objectives, and the confirmation's test figures
        assert set(st.space.study.metrics) | {"val_clean_acc"} <= set(metrics)
        assert set(metrics) == {"params_kept", "val_robust_acc", "val_clean_acc"} | {k for k in TEST_METRICS if k in e}
        assert all(metrics[k] == pytest.approx(e[k]) for k in metrics)
        assert (params["prune.method"], float(params["prune.keep_fraction"])) == ("lwm", e["keep_fraction"])
        trial_params = tracker.client.get_run(trials[e["for_trials"][0]]).data.params
        assert set(params) - {"pretrain_key"} <= set(trial_params)  # the runs table's columns line up
        artifacts = [a.path for a in tracker.client.list_artifacts(run.info.run_id)]
        assert artifacts == [baseline_runs.ARTIFACT]
    ids = {r.info.run_id for r in runs}

    # the trials' readers do not take them for trials
    assert mlflow_run_ids(tracker, "quickstart", parent) == trials
    for t in study.trials:
        assert tracker.find_run(trial_run_key("quickstart", t.number, parent)).info.run_id == trials[t.number]
    assert tracker.close_trial_runs(parent, "KILLED", "stopped") == len(trials)
    assert {tracker.client.get_run(i).info.status for i in ids} == {"FINISHED"}
    # a trial that never started gets its run (number 4), the baselines' runs count as no trial's
    unstarted = _optuna([*study.trials, create_trial(state=optuna.trial.TrialState.FAIL, params={}, distributions={})])
    record_unstarted(st, unstarted, tracker)
    nested = tracker.client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags.get(NUMBER_KEY, r.data.tags["run_role"]) for r in nested) == \
        ["0", "1", "2", "3", "4", "baseline", "baseline"]
    tracker.client.delete_run(next(r.info.run_id for r in nested if r.data.tags.get(NUMBER_KEY) == "4"))

    # a rerun: no new run, no new metric value
    assert baselines.run_baselines(st, study, tracker, 1, 0) == 0
    again = _baseline_runs(tracker, parent)
    assert {r.info.run_id for r in again} == ids
    assert all(len(tracker.client.get_metric_history(i, "val_robust_acc")) == 1 for i in ids)

    # a larger front: one more run; changed confirmation settings: the same runs, their figures updated
    study.add_trial(_trial(0.1, 0.45))
    _models(st, 4)
    assert baselines.run_baselines(st, study, tracker, 1, 0) == 1
    assert len(_baseline_runs(tracker, parent)) == 3 and ids < {r.info.run_id for r in _baseline_runs(tracker, parent)}
    st2 = _study(tmp_path, **{"study.baselines": {"confirm": {"points": 64}}})
    st2.manifest = st.manifest
    assert baselines.run_baselines(st2, study, tracker, 1, 0) == 3
    runs = _baseline_runs(tracker, parent)
    assert len(runs) == 3 and ids < {r.info.run_id for r in runs}
    assert {r.data.metrics["test_points"] for r in runs} == {64.0}
    # a baseline no longer needed (its front trial lost its model): its run goes too, as its entry does
    (layout.trial_dir(st.paths.root, 4) / "model.pt").unlink()
    baselines.run_baselines(st2, study, tracker, 1, 0)
    assert {r.info.run_id for r in _baseline_runs(tracker, parent)} == ids

    # `--fresh` (delete_study_runs) removes them with the study's other runs
    tracker.delete_study_runs("quickstart")
    assert _baseline_runs(tracker, parent) == []


# ---------------------------------------------------------------------------------------------------
# End to end: a tiny digits study with the real pipeline.

TINY = {"study.n_trials": 3, "study.max_concurrent": 2, "study.sampler": "random", "study.sampler_options": None,
        "trial.model.width": 8, "trial.pretrain.epochs": 3, "trial.prune_stage.epochs": 1, "trial.finetune.epochs": 1,
        "trial.eval.points": 100, "trial.eval.val_points": 100, "trial.eval.steps": 5, "trial.eval.restarts": 1,
        "study.confirm": {"points": 32, "steps": 10, "restarts": 1, "autoattack": False},
        "study.baselines": True}


def _prunable(arch: str, info, width: int) -> set[str]:
    from study.trial import pruning
    from study.trial.models import create_model

    model = create_model(arch, info, width=width)
    pruning.make_prunable(model)
    return pruning.prunable_weight_names(model)


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_a_tiny_digits_study_runs_its_lwm_baseline_and_reports_it(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from analysis.report import front_plot_inputs, recommend as recommend_models
    from analysis.report_data import collect
    from study.search.recording.tracking import Tracker
    from study.trial.config import DataConfig
    from study.trial.data import load_dataset
    from study.trial.models import create_model

    space = load_space(QUICKSTART, TINY)
    runs = tmp_path / "runs"
    outcome = run_study(space, runs_dir=runs)
    out = capsys.readouterr().out
    assert outcome.status == "complete" and outcome.complete == 3
    root = runs / "quickstart"
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{root / 'optuna.db'}")
    rows = pareto.front_rows(study, space.study.metrics)
    saved = json.loads((root / BASELINES_FILE).read_text())
    # one entry per needed configuration, covering every front trial once
    assert len(saved) == len(recommend.baseline_configs(rows, baselines.defaults_of(space))) >= 1
    assert sorted(n for e in saved for n in e["for_trials"]) == sorted(r["trial"] for r in rows)
    assert "LWM baseline at the front's sizes" in out
    conf = space.study.confirm
    sp = load_dataset(DataConfig(name="digits"), "cpu")
    names = _prunable("small_cnn", sp.info, 8)
    dense = torch.load(root / "pretrained" / f"{space.base_config().pretrain_key()}.pt", weights_only=True)["model"]
    idx = torch.randperm(len(sp.x_test), generator=torch.Generator().manual_seed(conf.seed))[:conf.points]
    by_number = {t.number: t for t in study.trials}
    for e in saved:
        t = by_number[e["for_trials"][0]]
        assert e["method"] == "lwm" and e["config"]["prune.method"] == "lwm"
        for k in ("test_clean_acc", "test_pgd_acc", "test_robust_acc", "val_robust_acc", "val_clean_acc"):
            assert math.isfinite(e[k]) and 0 <= e[k] <= 1, k
        assert e["test_robust_acc"] <= e["test_clean_acc"] and e["test_points"] == conf.points
        assert e["budget"] == dataclasses.asdict(conf) and e["test_attack"] == conf.attack_text(0.1, conf.points)
        # the front trial's size: the same keep fraction, the same kept parameters (layer scope), layer by layer
        assert e["keep_fraction"] == t.params["prune.keep_fraction"]
        assert (e["params_kept"], e["prunable_kept"]) == (t.user_attrs["params_kept"], t.user_attrs["prunable_kept"])
        lwm = load_state(root / e["model"])
        hydra = load_state(root / "trials" / f"{t.number:04d}" / "model.pt")
        for name in names:
            kept = lwm[name].flatten() != 0
            assert int(kept.sum()) == int((hydra[name] != 0).sum()), name
            # LWM: the kept weights are the dense model's largest magnitudes (masks set without score training)
            top = torch.topk(dense[name].abs().flatten(), int(kept.sum())).indices
            assert set(top.tolist()) == set(kept.nonzero().flatten().tolist()), name
        # measured on the TEST split: clean accuracy recomputed from the saved model on the seeded test points
        model = create_model("small_cnn", sp.info, width=8)
        model.load_state_dict(lwm)
        with torch.no_grad():
            clean = (model.eval()(sp.x_test[idx]).argmax(1) == sp.y_test[idx]).float().mean().item()
        assert e["test_clean_acc"] == pytest.approx(clean)
    # the report: the baselines' points on the front plot, the test figure comparable with the front's
    data = collect(root, study, space)
    inputs = front_plot_inputs(data, recommend_models(data), None)
    assert sorted((b.size, b.robust) for b in inputs["baselines"]) == sorted((e["params_kept"], e["val_robust_acc"]) for e in saved)
    assert inputs["baseline_test_key"] == "test_robust_acc" and inputs["front_test_key"] == "test_robust_acc"
    assert sorted(b.test["test_robust_acc"] for b in inputs["baselines"]) == sorted(e["test_robust_acc"] for e in saved)
    page = (root / "report" / "index.html").read_text()
    assert saved[0]["test_attack"] in page and "<code>study trial" not in page
    # logged to the study's parent MLflow run
    manifest = layout.Manifest.load(root / "study.json")
    client = MlflowClient(tracking_uri=manifest.tracking_uri)
    assert BASELINES_FILE in [a.path for a in client.list_artifacts(manifest.parent_run_id)]
    # each one an MLflow run nested under it, with the figures its front trial's run carries, under the same names
    _, trial_runs = mlflow_trial_runs(runs)
    nested = _baseline_runs(Tracker(manifest.tracking_uri, "quickstart"), manifest.parent_run_id)
    assert len(nested) == len(saved)
    for run in nested:
        trial_run = trial_runs[int(run.data.tags["baseline_for_trials"].split(",")[0])]
        assert {"params_kept", "val_robust_acc", "test_robust_acc"} <= set(run.data.metrics) <= set(trial_run.data.metrics)
        assert run.data.metrics["params_kept"] == trial_run.data.metrics["params_kept"]
    # a resume reuses them
    before = (root / BASELINES_FILE).read_bytes()
    resume_study("quickstart", runs_dir=runs)
    assert "LWM baseline at the front's sizes" not in capsys.readouterr().out
    assert (root / BASELINES_FILE).read_bytes() == before
    again = _baseline_runs(Tracker(manifest.tracking_uri, "quickstart"), manifest.parent_run_id)
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in nested)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
