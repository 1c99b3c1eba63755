"""A study's MLflow side (study.search.study.Study's): its tracker, the artifact locations of a copied
study, the parent run, the Tune callbacks that record every trial as a nested run, and the runs of trials
that never started. The records themselves (Tracker, MlflowTrialCallback, tags) are study.search.recording.tracking's.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from study.keys import NUMBER_KEY, ROLE_TAG, trial_run_key
from study.search.optimize.optuna_search import link_mlflow_run, probe_sqlite
from study.search.running.trainable import build_config

if TYPE_CHECKING:
    from study.search.study import Study


def tracker(st: Study, relocate: bool = True) -> Any:
    """The study's MLflow tracker; `relocate=False` leaves `relocate_artifacts` to the caller."""
    from study.search.recording.tracking import Tracker

    uri = st.manifest.tracking_uri
    name = st.space.study.name
    if st.paths.remote:  # a local MLflow store keeps the artifacts in the bucket, beside the study
        return Tracker(uri, name, artifact_root=f"{st.paths.runs}/mlartifacts/{name}" if uri.startswith("sqlite:")
                       else None)
    if relocate:
        relocate_artifacts(st)
    return Tracker(uri, name, artifact_root=_artifact_root(st))


def _artifact_root(st: Study) -> str | None:
    if st.paths.remote or not st.manifest.tracking_uri.startswith("sqlite:"):
        return None
    return str(Path(st.manifest.runs_dir) / "mlartifacts" / st.space.study.name)


def relocate_artifacts(st: Study) -> None:
    """A local MLflow store copied or moved with the study: its artifact locations to this folder."""
    root = _artifact_root(st)
    if root is not None:
        relocate_store(st.manifest.tracking_uri, st.space.study.name, Path(root))


def open_parent_run(st: Study, tracker: Any) -> str:
    """The study's MLflow parent run, opened (and --fresh's old runs of the name deleted first); saved
    in the manifest."""
    from study.search.recording.tracking import open_parent_run

    s = st.space.study
    relocate_artifacts(st)
    if st.wipe_runs:
        tracker.delete_study_runs(s.name)
    params = {f"study.{k}": v for k, v in dataclasses.asdict(s).items()}
    data = st.space.trial_config({}, st.fixed).data  # the study's data set (the trials' unless they search it)
    st.manifest.parent_run_id = open_parent_run(tracker, s.name, st.manifest.parent_run_id, params, st.paths.space,
                                                data)
    st.save_manifest()
    return st.manifest.parent_run_id


def callback(st: Study, tracker: Any, parent: Any = None, stop_reasons: Any = None) -> Any:
    """The MLflow callback; `parent`: what returns the parent run's id once it is open (default: the
    manifest's); `stop_reasons`: Tune trial id -> why a scheduler stopped it (study.search.optimize.rung_scheduler)."""
    from study.search.recording.trial_callback import MlflowTrialCallback

    return MlflowTrialCallback(tracker, st.space.study.name, parent or st.manifest.parent_run_id,
                               str(st.paths.space),
                               trial_config=functools.partial(build_config, st.space.trial, st.fixed),
                               link=functools.partial(link_mlflow_run, st.manifest.storage, st.space.study.name),
                               trial_dir=st.paths.pull_trial, trial_uri=st.paths.trial_location,
                               stop_reasons=stop_reasons)


def callbacks(st: Study, tracker: Any, parent: Any = None, stop_reasons: Any = None) -> list[Any]:
    """Tune's JSON and CSV result loggers (what `tune` and ExperimentAnalysis read), the MLflow callback
    and ReportPreload (study.search.running.warmup)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from study.search.running.warmup import ReportPreload

    return [JsonLoggerCallback(), CSVLoggerCallback(), callback(st, tracker, parent, stop_reasons),
            ReportPreload(st.space.study.n_trials)]


def finish_done_runs(st: Study, optuna_study: Any, tracker: Any) -> int:
    """Nested runs still RUNNING whose Optuna trial is done: a driver killed between Optuna's tell and the MLflow
    callback's end of the trial leaves them so. A COMPLETE trial's run gets its outputs (its MLflow model, unless
    it has one, and result.json) and FINISHED; a PRUNED one KILLED with optuna_state; a FAIL one FAILED with its
    reason. Returns how many were finished."""
    from optuna.trial import TrialState

    from study.trial.mlflow_model import logged_model_of_run

    parent = st.manifest.parent_run_id
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string=
                                      f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'")
    done = {t.number: t for t in optuna_study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))}
    finished, outputs = 0, None
    for run in runs:
        number = run.data.tags.get(NUMBER_KEY, "")
        t = done.get(int(number)) if number.lstrip("-").isdigit() else None
        if t is None:
            continue
        run_id = run.info.run_id
        if t.state == TrialState.COMPLETE:
            if logged_model_of_run(tracker.client, tracker.experiment_id, run_id) is None:
                outputs = outputs or callback(st, tracker)  # what logs a finished trial's outputs
                outputs.log_outputs(run_id, t.number)
            tracker.finish(run_id, "FINISHED")
        elif t.state == TrialState.PRUNED:
            tracker.log_batch(run_id, tags={"optuna_state": "PRUNED",
                                            "stop_reason": str(t.user_attrs.get("stop_reason", ""))[:500]})
            tracker.finish(run_id, "KILLED")
        else:
            tracker.log_batch(run_id, tags={"fail_reason": str(t.user_attrs.get("fail_reason", "failed"))[:500]})
            tracker.finish(run_id, "FAILED")
        finished += 1
    return finished


def record_unstarted(st: Study, optuna_study: Any, tracker: Any) -> None:
    """One MLflow run per Optuna trial, also for a trial stopped before it started (time budget)."""
    from optuna.trial import TrialState

    from study.search.recording.provenance import provenance_tags

    parent = st.manifest.parent_run_id
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    have = {r.data.tags.get(NUMBER_KEY) for r in runs}
    for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if str(t.number) in have:
            continue
        run_id = tracker.create_run(f"{st.space.study.name}-{t.number:04d}", {
            **trial_run_key(st.space.study.name, t.number, parent), ROLE_TAG: "trial",
            "fail_reason": t.user_attrs.get("fail_reason", "never started"), **provenance_tags()})
        cfg = st.trial_config({**t.params, NUMBER_KEY: t.number})
        tracker.log_batch(run_id, params=cfg.flat())
        tracker.log_dataset(run_id, cfg.data)
        tracker.finish(run_id, "KILLED")


MLFLOW_TABLES = {"experiments", "runs", "metrics", "params", "tags", "alembic_version"}


def store_problem(tracking_uri: str) -> str | None:
    """What is wrong with a local sqlite MLflow store (one line naming its file), None when it is usable: absent
    or empty (MLflow creates it), or an MLflow database that sqlite reads. Checked before MLflow opens it:
    MLflow opening a damaged file or another database would try to migrate it."""
    import sqlite3

    db = Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None
    if db is None or not db.is_file() or db.stat().st_size == 0:
        return None
    try:
        tables, check = probe_sqlite(db)
    except sqlite3.Error as e:
        return f"the MLflow store {db} is not a readable sqlite database ({e})"
    if check != "ok":
        return f"the MLflow store {db} is damaged (sqlite: {check})"
    if not MLFLOW_TABLES <= tables:
        return f"the MLflow store {db} is not an MLflow database (its tables: {', '.join(sorted(tables)[:5]) or 'none'})"
    return None


def relocate_store(tracking_uri: str, experiment: str, artifact_root: Path) -> bool:
    """A local MLflow store copied or moved with its runs folder still names the old folder as the artifact
    location of its experiment, runs, logged models and model versions (MLflow stores them absolute): point
    them at `artifact_root`, so artifacts of a copied study are never written into the original. Returns whether anything moved."""
    import logging
    import sqlite3

    db = Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None
    if db is None or not db.is_file():
        return False
    new = artifact_root.resolve().as_uri()
    try:
        with sqlite3.connect(db, timeout=60) as con:
            row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)).fetchone()
            if row is None or not row[0] or row[0] == new or not row[0].endswith(f"/mlartifacts/{experiment}"):
                return False
            old_prefix, new_prefix = row[0][:-len(experiment)], new[:-len(experiment)]
            if Path(old_prefix.removeprefix("file://")).resolve() == Path(new_prefix.removeprefix("file://")).resolve():
                return False
            n = len(old_prefix)
            con.execute("UPDATE experiments SET artifact_location = ? || substr(artifact_location, ?) "
                        "WHERE substr(artifact_location, 1, ?) = ?", (new_prefix, n + 1, n, old_prefix))
            con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                        "WHERE substr(artifact_uri, 1, ?) = ?", (new_prefix, n + 1, n, old_prefix))
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table, column in (("logged_models", "artifact_location"), ("model_versions", "storage_location")):
                if table in tables:  # the trials' MLflow models and their registered versions
                    con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                f"WHERE substr({column}, 1, ?) = ?", (new_prefix, n + 1, n, old_prefix))
        logging.getLogger("study.search").info("MLflow artifacts of %s relocated from %s to %s", experiment,
                                               old_prefix, new_prefix)
        return True
    except sqlite3.Error as e:
        logging.getLogger("study.search").warning("could not relocate the MLflow artifacts of %s in %s: %s",
                                                  experiment, db, e)
        return False
