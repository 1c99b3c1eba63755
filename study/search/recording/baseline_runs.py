"""The LWM baselines as MLflow runs (study.search.front.baselines): one run per entry of baselines.json, nested
under the study's parent run beside the trials' runs, so that MLflow's runs table and charts show them at the
same sizes as the front.

A baseline run carries:
- tags: `study`, `mlflow.parentRunId`, `run_role` = baseline, `baseline` (method and size in words, e.g.
  "lwm keep 0.05, 500 params"), `baseline_key` (what finds it again: a digest of the entry's config overrides),
  `baseline_for_trials` (the front trials it serves), `test_attack`, a description, provenance;
- params: the flat config it ran (entry "config"; the trial runs' names: `prune.method` = lwm,
  `prune.keep_fraction`, ...);
- metrics under the trial runs' names: the validation figures of a trial's final report (`params_kept`,
  `val_robust_acc`, `val_clean_acc`, the suite's search metrics with study.robustness, ...) and the confirmation's
  test figures (`test_clean_acc`, `test_pgd_acc`, `test_robust_acc`, ...);
- its baselines.json entry as the artifact baseline.json (the model stays in the study folder: entry "model").

It has no `optuna_trial_number` tag, so nothing that looks for a trial's run (by number, or every nested run's
number) finds it; `tags.study` does, so `--fresh` deletes it with the study's other runs.

Idempotent (`record`, on every run_baselines): a run is found by its key and updated where its figures or tags
changed; a run whose params would change or that holds a metric the entry no longer has (MLflow keeps both
forever) is replaced; the runs of baselines no longer in baselines.json are deleted.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping, Sequence

from study.keys import PARENT_TAG, ROLE_TAG, STUDY_TAG

ROLE = "baseline"
KEY_TAG = "baseline_key"
NAME_TAG = "baseline"
TRIALS_TAG = "baseline_for_trials"
ARTIFACT = "baseline.json"
# Numbers of an entry that are not figures of the model (the keep fraction is a param, eps the attack's).
_NOT_METRICS = {"keep_fraction", "eps"}


def key_of(entry: Mapping[str, Any]) -> str:
    """What identifies a baseline across reruns: its config overrides (method, keep fraction, the front
    configuration's searched values), not the front trials it serves (a larger front may change those)."""
    text = json.dumps(entry.get("overrides") or {}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def metrics_of(entry: Mapping[str, Any]) -> dict[str, float]:
    """The entry's finite figures, under the names the trial runs carry them."""
    return {k: float(v) for k, v in entry.items() if k not in _NOT_METRICS and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def params_of(entry: Mapping[str, Any]) -> dict[str, str]:
    """The flat config the baseline ran, as MLflow stores params (the text Tracker.log_batch writes)."""
    config = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    return {k: _text(v) for k, v in config.items()}


def _text(value: Any) -> str:
    from study.search.recording.tracking import MAX_PARAM_CHARS

    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:MAX_PARAM_CHARS]


def run_name(study: str, entry: Mapping[str, Any]) -> str:
    """<study>-lwm-<first front trial>: the name of the baseline's config and of its model's folder."""
    first = int((entry.get("for_trials") or [0])[0])
    return f"{study}-{entry.get('method', 'lwm')}-{first:04d}"


def tags_of(study: str, parent_run_id: str, entry: Mapping[str, Any]) -> dict[str, str]:
    from study.search.recording.tracking import NOTE_TAG

    method, keep = str(entry.get("method", "lwm")), entry.get("keep_fraction")
    size = f"keep {keep:.4g}" if isinstance(keep, (int, float)) else "keep ?"
    kept = entry.get("params_kept")
    if isinstance(kept, (int, float)) and math.isfinite(kept):
        size += f", {kept:.0f} params"
    trials = ", ".join(str(n) for n in entry.get("for_trials") or [])
    attack = str(entry.get("test_attack") or "")
    note = (f"{method.upper()} baseline (magnitude pruning, no score training) at the size of front trial(s) "
            f"{trials}: {size}; validated as a trial, confirmed on the test split ({attack or 'no test figures'}). "
            f"Its model: {entry.get('model') or '?'} in the study folder.")
    return {STUDY_TAG: study, PARENT_TAG: parent_run_id, ROLE_TAG: ROLE, KEY_TAG: key_of(entry),
            NAME_TAG: f"{method} {size}", TRIALS_TAG: trials, "test_attack": attack, NOTE_TAG: note}


def find_runs(tracker: Any, parent_run_id: str) -> list[Any]:
    """The baseline runs nested under the study's parent run (oldest first)."""
    return tracker.client.search_runs(
        [tracker.experiment_id], order_by=["attributes.start_time ASC"],
        filter_string=f"tags.{PARENT_TAG} = '{parent_run_id}' and tags.{ROLE_TAG} = '{ROLE}'")


def record(tracker: Any, study: str, parent_run_id: str, entries: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Make the baseline runs under `parent_run_id` mirror `entries` (baselines.json). Returns the count of
    runs created, updated, unchanged and deleted."""
    from study.search.recording.tracking import provenance_tags

    done = {"created": 0, "updated": 0, "unchanged": 0, "deleted": 0}
    existing: dict[str, Any] = {}
    for run in find_runs(tracker, parent_run_id):
        key = run.data.tags.get(KEY_TAG, "")
        if key in existing:  # a duplicate (two drivers at once): the oldest is kept
            tracker.client.delete_run(run.info.run_id)
            done["deleted"] += 1
        else:
            existing[key] = run
    wanted = {key_of(e) for e in entries}
    for key, run in list(existing.items()):
        if key not in wanted:  # no longer in baselines.json (a front that changed, a baseline that failed)
            tracker.client.delete_run(run.info.run_id)
            done["deleted"] += 1
    for entry in entries:
        run = existing.get(key_of(entry))
        name = run_name(study, entry)
        metrics, params, tags = metrics_of(entry), params_of(entry), tags_of(study, parent_run_id, entry)
        if run is not None and (any(run.data.params.get(k, v) != v for k, v in params.items())
                                or set(run.data.metrics) - set(metrics)):
            tracker.client.delete_run(run.info.run_id)  # MLflow cannot change a param or drop a metric
            run = None
        if run is None:
            run_id = tracker.create_run(name, {**tags, **provenance_tags()})
            tracker.log_batch(run_id, metrics=metrics, params=params)
            tracker.log_dict(run_id, entry, ARTIFACT)
            tracker.finish(run_id)
            done["created"] += 1
            continue
        run_id = run.info.run_id
        new_metrics = {k: v for k, v in metrics.items() if run.data.metrics.get(k) != v}
        new_params = {k: v for k, v in params.items() if k not in run.data.params}
        new_tags = {k: v for k, v in tags.items() if run.data.tags.get(k) != v}
        if not (new_metrics or new_params or new_tags or run.info.run_name != name
                or run.info.status != "FINISHED"):
            done["unchanged"] += 1
            continue
        tracker.log_batch(run_id, metrics=new_metrics, params=new_params, tags=new_tags)
        if run.info.run_name != name:
            tracker.client.update_run(run_id, name=name)
        tracker.log_dict(run_id, entry, ARTIFACT)
        tracker.finish(run_id)
        done["updated"] += 1
    return done
