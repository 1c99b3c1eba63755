"""The LWM baseline at the front's sizes (`study.baselines`), after the front's test-split confirmation.

A HYDRA front means little without the obvious baseline beside it: magnitude pruning (LWM) at the same sizes.
With `study.baselines` set, `Study.execute` calls `run_baselines` right after the front's confirmation
(study.search.front.evaluate). For each distinct front configuration (`analysis.recommend.baseline_configs`: the front
trial's config with prune.method lwm, the same keep fraction, attack and fine-tuning; score_init, train_bn and
the prune stage drop out, since LWM sets the mask from weight magnitudes without score training) one Ray task
on a trial's resources:

- runs the trial pipeline (study.trial.pipeline.run_trial; the study's own run_trial where one is given), so
  the model is validated exactly as a trial reports it (val_robust_acc, val_clean_acc, sizes; with a
  study.robustness section also the suite's search metrics, so a suite objective has its baseline figure);
- confirms it on the TEST split with the front's confirmation (robust_eval.confirm, the code behind
  confirm.json), with `study.confirm`'s settings, or those with the keys `study.baselines.confirm` changes
  (e.g. `autoattack: false`: the same PGD on the same test points, comparable with the front's `test_pgd_acc`).

The results go to runs/<study>/baselines.json (atomically), a list with one entry per baseline run: the
report's original fields (method, keep_fraction, params_kept, val_robust_acc, val_clean_acc) plus every val
metric, the front trials it serves (`for_trials`), its `overrides`, the test figures (test_clean_acc,
test_pgd_acc, test_autoattack_acc, test_robust_acc, test_points), `test_attack` (attack and budget in words),
the confirmation's settings (`budget`, `eps`) and the config it ran (`config`). An entry is reused (a resume,
a larger front) while its config and confirmation settings are unchanged; a damaged file is run again with a
warning. Each model is saved as baselines/<front trial>/model.pt in the study folder only (the entry's `model`
names it): baselines.json is logged to the study's MLflow parent run, the models are not, so a bucket holds a
baseline's bytes once whatever MLflow's artifact location (the rule a trial's model follows where its run
shares the study's bucket: study.search.recording.tracking.model_by_reference). Each entry is also an MLflow run
nested under the parent run (tag run_role=baseline; study.search.recording.baseline_runs), with the trial runs'
param and metric names, found again by its tags on a rerun. The report (analysis.report) draws the entries
beside the front.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from analysis.recommend import LWM, baseline_configs
from analysis.report_data import BASELINES_FILE
from study.keys import NUMBER_KEY
from study.search.folder.layout import trial_dir

if TYPE_CHECKING:
    from study.search.study import Study

log = logging.getLogger("study.search")

MODELS_DIR = "baselines"  # baselines/<first front trial>/model.pt
# Trial config fields that say where things are, not what is trained: a moved study folder reuses its baselines.
_LOCATION_KEYS = ("name", "output_dir", "cache_dir", "pretrained", "data.root", "data.download", "device")
_TEST_KEYS = ("test_clean_acc", "test_pgd_acc", "test_autoattack_acc", "test_robust_acc", "test_points")


# ---------------------------------------------------------------------------------------------------
# What to run.


def defaults_of(space: Any) -> dict[str, Any]:
    """The study's fixed prune.method and prune.keep_fraction, for front rows that do not search them."""
    p = space.base_config().prune
    return {"prune.method": p.method, "prune.keep_fraction": p.keep_fraction}


def needed(st: "Study", optuna_study: Any) -> list[dict[str, Any]]:
    """The LWM runs the study's current front needs (analysis.recommend.baseline_configs)."""
    from analysis import pareto

    rows = pareto.front_rows(optuna_study, st.space.study.metrics)
    return baseline_configs(rows, defaults_of(st.space))


def baseline_config(st: "Study", entry: Mapping[str, Any]) -> Any:
    """The TrialConfig of one baseline: the study's trial config (as Study.trial_config builds a front
    trial's) with the entry's overrides, named <study>-lwm-<first front trial>."""
    first = int(entry["for_trials"][0])
    cfg = st.trial_config({**entry["overrides"], NUMBER_KEY: first})
    return dataclasses.replace(cfg, name=f"{st.space.study.name}-{LWM}-{first:04d}")


def identity(cfg: Any) -> dict[str, Any]:
    """What a baseline's figures depend on: the flat config without locations, and the dense model's key."""
    flat = {k: v for k, v in cfg.flat().items() if k not in _LOCATION_KEYS}
    return _plain({**flat, "pretrain_key": cfg.pretrain_key()})


def settings_of(cfg: Any, confirm: Any, robustness: Any) -> dict[str, Any]:
    """The settings an entry of baselines.json is reused under: config, confirmation, suite (or None)."""
    return {"config": identity(cfg), "budget": _plain(dataclasses.asdict(confirm)),
            "robustness": _plain(dataclasses.asdict(robustness)) if robustness is not None else None}


def _plain(x: Any) -> Any:
    """As it reads back from JSON (tuples become lists), so saved and current settings compare equal."""
    return json.loads(json.dumps(x))


# ---------------------------------------------------------------------------------------------------
# baselines.json


def load(root: str | Path) -> list[dict[str, Any]] | None:
    """The saved entries; None when there is no file. A damaged file warns and reads as no entries."""
    path = Path(root) / BASELINES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
            raise ValueError("not a list of entries")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("%s is damaged (%s): the LWM baselines are run again", path, e)
        return []
    return data


def save(root: str | Path, entries: Sequence[Mapping[str, Any]]) -> Path:
    """Write baselines.json atomically: a reader never sees half a file."""
    path = Path(root) / BASELINES_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([dict(e) for e in entries], indent=2))
    os.replace(tmp, path)
    return path


def reusable(saved: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """A saved entry made under exactly these settings, with finite validation and test figures."""
    for e in saved:
        if all(e.get(k) == v for k, v in settings.items()) and _complete(e):
            return dict(e)
    return None


def _complete(e: Mapping[str, Any]) -> bool:
    return all(_finite(e.get(k)) for k in ("params_kept", "val_robust_acc", "test_clean_acc", "test_robust_acc")) \
        and bool(e.get("test_attack"))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def make_entry(entry: Mapping[str, Any], settings: Mapping[str, Any], metrics: Mapping[str, float],
               payload: Mapping[str, Any], model: str) -> dict[str, Any]:
    """One entry of baselines.json: the report's fields first (method, keep_fraction, params_kept,
    val_robust_acc, val_clean_acc), every val metric, the test figures and their attack, the settings."""
    over = entry["overrides"]
    test = payload["metrics"]
    out: dict[str, Any] = {"method": over["prune.method"], "keep_fraction": over["prune.keep_fraction"]}
    for k in ("params_kept", "val_robust_acc", "val_clean_acc"):
        if k in metrics:
            out[k] = metrics[k]
    out.update({k: v for k, v in metrics.items() if k not in out})
    out.update({"for_trials": list(entry["for_trials"]), "overrides": dict(over),
                "test_attack": payload["test_attack"], **{k: test[k] for k in _TEST_KEYS if k in test},
                "eps": payload["eps"], "autoattack_flags": list(payload.get("autoattack_flags") or []),
                "confirm_wall_s": dict(payload.get("wall_s") or {}), "model": model, **settings})
    return out


# ---------------------------------------------------------------------------------------------------
# The Ray task (on a trial's resources).


def baseline_task(cfg: Any, confirm: Any, robustness: Any = None, threads: int = 1,
                  run_trial: Callable | None = None) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """Body of the Ray task of one baseline: the trial pipeline (validation figures, as a trial reports them;
    the suite's search metrics with `robustness`), then the front's confirmation on the TEST split.
    Returns (val metrics, confirmation payload, exported model state)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from study.search.front import robust_eval
    from study.search.running.trainable import local_cache, search_robustness

    torch.set_num_threads(max(1, int(threads)))
    if run_trial is None:
        from study.trial.pipeline import run_trial
    cfg = local_cache(cfg)
    result = run_trial(cfg)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    state = getattr(result, "model_state", None)
    if state is None:
        raise RuntimeError("run_trial returned no model_state: the LWM baseline cannot be confirmed on test")
    if robustness is not None:
        metrics.update(search_robustness(cfg, result, metrics, robustness))
    payload = robust_eval.confirm(cfg, state, confirm)
    return metrics, payload, {k: v.detach().cpu() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------------
# The entry point (Study.execute, after the front's confirmation).


def run_baselines(st: "Study", optuna_study: Any, tracker: Any, cpus: float, gpus: float) -> int:
    """The LWM baseline at the current front's sizes, as Ray tasks on one trial's resources: validated and
    confirmed on the TEST split, saved in baselines.json (entries with unchanged settings are reused), logged
    to the parent MLflow run. A baseline that fails is a warning (the study's report must not be lost).
    Returns the baselines run now."""
    s = st.space.study
    if s.baselines is None:
        return 0
    confirm = s.baselines.confirm_settings(s.confirm)
    root = st.paths.root
    st.paths.pull(BASELINES_FILE)
    saved = load(root)
    entries: list[dict[str, Any] | None] = []
    todo = []
    for entry in needed(st, optuna_study):
        # as the front's confirmation: a front trial without its model (a fake trial, a lost file) has no test
        # figure to compare with, so it gets no baseline
        if not any((trial_dir(root, n) / "model.pt").is_file() for n in entry["for_trials"]):
            log.warning("LWM baseline: front trial(s) %s have no model.pt; skipped", entry["for_trials"])
            continue
        i = len(entries)
        cfg = baseline_config(st, entry)
        settings = settings_of(cfg, confirm, s.robustness)
        old = reusable(saved or [], settings)
        if old is not None:
            old["for_trials"] = list(entry["for_trials"])  # the same run serves the current front's trials
            entries.append(old)
        else:
            entries.append(None)
            todo.append((i, entry, cfg, settings))
    if not entries:
        return 0
    if todo:
        _run(st, todo, entries, confirm, cpus, gpus)
    done = [e for e in entries if e is not None]
    if not todo and saved is not None and done == saved:
        record_runs(st, tracker, done)  # nothing new: the file stays as it is (its MLflow runs are checked)
        return 0
    if saved and any("config" not in e for e in saved):  # written by hand (or an earlier release): kept aside
        backup = root / (BASELINES_FILE + ".bak")
        shutil.copyfile(root / BASELINES_FILE, backup)
        log.warning("%s holds entries not made by study.baselines; replaced by the computed LWM baseline (the old "
                    "file is kept as %s)", root / BASELINES_FILE, backup)
    path = save(root, done)
    st.paths.push(BASELINES_FILE)
    st.paths.push_tree(MODELS_DIR)
    try:
        tracker.log_file(st.manifest.parent_run_id, path)
    except Exception as e:  # noqa: BLE001 - the figures are saved in the study folder anyway
        log.warning("could not log %s to MLflow: %s", path, e)
    record_runs(st, tracker, done)
    return sum(1 for i, *_ in todo if entries[i] is not None)


def record_runs(st: "Study", tracker: Any, entries: Sequence[Mapping[str, Any]]) -> None:
    """The entries as MLflow runs nested under the study's parent run (study.search.recording.baseline_runs),
    beside the trials' runs in MLflow's table and charts. A store that refuses is a warning."""
    from study.search.recording import baseline_runs

    parent = st.manifest.parent_run_id
    if not parent:
        log.warning("the LWM baselines are not recorded as MLflow runs: the study has no parent run")
        return
    try:
        baseline_runs.record(tracker, st.space.study.name, parent, entries)
    except Exception as e:  # noqa: BLE001 - the figures are saved in the study folder anyway
        log.warning("could not record the LWM baselines as MLflow runs: %s", e)


def _run(st: "Study", todo: list, entries: list, confirm: Any, cpus: float, gpus: float) -> None:
    import ray

    from study.trial import sparse_file

    s = st.space.study
    searched_eps = {"attack.eps", "eval.eps"} & set(st.space.keys)
    eps = None if searched_eps else st.space.base_config().eval_eps
    trials = ", ".join(str(t) for _, e, _, _ in todo for t in e["for_trials"])
    print(f"[study] LWM baseline at the front's sizes: {len(todo)} run(s) for front trial(s) {trials}, validated as "
          f"trials and confirmed on the test split: {confirm.attack_text(eps)} ...", flush=True)
    task = ray.remote(num_cpus=cpus, num_gpus=gpus)(baseline_task)
    t0 = time.perf_counter()
    refs = [task.remote(cfg, confirm, s.robustness, max(1, int(cpus)), st.run_trial) for _, _, cfg, _ in todo]
    for (i, entry, cfg, settings), ref in zip(todo, refs):
        first = int(entry["for_trials"][0])
        try:
            metrics, payload, state = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - one baseline failing must not lose the study's report
            log.warning("the LWM baseline for front trial(s) %s failed: %s", entry["for_trials"], _reason(e))
            continue
        rel = f"{MODELS_DIR}/{first:04d}/model.pt"
        (st.paths.root / rel).parent.mkdir(parents=True, exist_ok=True)
        sparse_file.save(state, st.paths.root / rel)  # stored as the trials' models are
        entries[i] = make_entry(entry, settings, metrics, payload, rel)
        m = payload["metrics"]
        print(f"[study] LWM baseline for trial(s) {', '.join(map(str, entry['for_trials']))} (keep "
              f"{entry['overrides']['prune.keep_fraction']:.4g}, {metrics.get('params_kept', float('nan')):.0f} params): "
              f"val robust {metrics.get('val_robust_acc', float('nan')):.4f}, test clean {m['test_clean_acc']:.4f}, "
              f"test robust {m['test_robust_acc']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)


def _reason(e: Exception) -> str:
    """A failed task's reason: a user mistake inside it as its one line, not Ray's stack."""
    from study.search.running.dense import user_error

    return str(user_error(e) or e)
