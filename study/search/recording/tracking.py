"""MLflow records of a study: one parent run per study, one nested run per trial, batched logging.

The experiment says what it is (tag `mlflow.experimentKind` = custom_model_development, and a
`mlflow.note.content` description of the study, shown on the experiment's page). Per-epoch metrics are
named by their stage (`prune/val_robust_acc`, `finetune/train_loss`: MLflow's UI groups charts by the prefix
before the `/`) and logged at MLflow's step = the trial's global step (monotone across the stages); the run
tag `stage` names the latest stage. A trial's final metrics (its last report) and the front's test figures
keep their plain names. Nothing else is a metric: no epoch, step or stage numbers, no Tune bookkeeping.
Every run carries MLflow's source, user and git tags and the study's data set as a dataset input
(study.search.recording.provenance). A parent run's summary metrics are logged only when they change.

All logging happens in the driver, from a Tune callback: one writer for the tracking store (no sqlite
lock contention between trial processes), and a trial that dies without a word (OOM kill, lost node)
is still marked FAILED. A trial's nested run is keyed by its Optuna trial number (tag
`optuna_trial_number`, study.keys), which survives a resume, so a resumed trial reuses its run instead of
adding one. mlflow is imported when a run is first touched. The callback itself: study.search.recording.trial_callback.

A finished trial's run gets its result.json and its model.pt under `model/`; where the run's artifacts and the
study folder share an S3 bucket, the model is not uploaded again but referenced (`model/model_ref.json` and
the tag `model_uri`: model_by_reference).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from ray.tune.result import AUTO_RESULT_KEYS

from study.keys import MODEL_REF_FILE, MODEL_URI_TAG, NUMBER_KEY, study_run_key
from study.search.folder.store import is_remote
from study.search.recording.provenance import dataset_input, provenance_tags

# Result keys Tune adds or that are not metrics (a report's place: MLflow's step and the stage's prefix).
_NOT_METRICS = set(AUTO_RESULT_KEYS) | {
    "done", "trial_id", "experiment_id", "experiment_tag", "should_checkpoint", "checkpoint_dir_name",
    "training_iteration", NUMBER_KEY, "final", "step", "epoch", "stage",
}
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the description MLflow's UI shows for an experiment or a run
MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
MAX_PARAM_CHARS = 6000
MODEL_FOLDER = "model"  # a trial run's artifact folder for its model.pt (or MODEL_REF_FILE) and result.json


def default_tracking_uri(runs_dir: str | Path) -> str:
    """runs/mlflow.db; for an object-store runs folder, a sqlite file on this machine (no file locks in a
    bucket; its artifacts go to the bucket: Study.tracker)."""
    if is_remote(runs_dir):
        from study.search.folder.store import data_dir

        folder = data_dir(str(runs_dir))
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}"
    return f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def _s3_bucket(location: str | Path | None) -> str | None:
    """The bucket of an s3:// URI; None for anything else (a local path, file://, gs://, mlflow-artifacts:/)."""
    parsed = urlparse(str(location or ""))
    if parsed.scheme.lower() != "s3":
        return None
    return parsed.netloc or None


def model_by_reference(artifact_uri: str | None, study_folder: str | Path | None) -> bool:
    """Whether a trial run gets a reference to its model.pt (MODEL_REF_FILE and the MODEL_URI_TAG tag) instead
    of the model's bytes: exactly when the run's artifact location (`artifact_uri`, as MLflow reports it) and
    the study folder (`study_folder`, or a folder in it) are in the same S3 bucket.

    Why: the study folder is the model's home and the study's source of truth (`<study>/trials/<n>/model.pt`).
    Uploading it again as an artifact stores every model twice in one bucket (under `trials/` and under
    MLflow's `mlartifacts/`), paid for twice, for nothing: whoever can read the bucket reads either copy, and
    the reference's sha256 says whether the object is still the model the run logged. Everywhere else (a
    local study folder or artifact root, two buckets, gs://, an MLflow server proxying its artifacts) the
    bytes are logged as before: the two places may have different owners or lifetimes, and a run must keep
    its model. Buckets are compared by name: a study talks to one S3 endpoint.
    """
    bucket = _s3_bucket(artifact_uri)
    return bucket is not None and bucket == _s3_bucket(study_folder)


def log_model_reference(tracker: "Tracker", run_id: str, folder_uri: str) -> dict[str, Any]:
    """Log a reference to the model.pt of the trial folder `folder_uri` (an object-store URI): MODEL_REF_FILE
    with the object's URI, size and sha256 (read from the object itself), and the tag MODEL_URI_TAG."""
    from study.search.folder.store import Store

    folder = folder_uri.rstrip("/")
    size, sha256 = Store(folder).sha256("model.pt")
    ref = {"uri": f"{folder}/model.pt", "bytes": size, "sha256": sha256}
    tracker.log_dict(run_id, ref, f"{MODEL_FOLDER}/{MODEL_REF_FILE}")
    tracker.log_batch(run_id, tags={MODEL_URI_TAG: ref["uri"]})
    return ref


def numeric_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a Tune result that are ours (not Tune's bookkeeping, not config)."""
    out = {}
    for key, value in result.items():
        if key in _NOT_METRICS or key.startswith("config/") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


class Tracker:
    """A small MLflow client wrapper: get-or-create runs by tag, one log_batch call per event."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_root = artifact_root  # local file stores: keep artifacts beside the runs folder
        self._client = None
        self._experiment_id: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from study.search.running import warmup

            warmup.wait_mlflow(self.tracking_uri)  # the driver's warm-up thread, if one opens this store
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                location = (None if not self.artifact_root else self.artifact_root if is_remote(self.artifact_root)
                            else Path(self.artifact_root).resolve().as_uri())  # a bucket URI stays as it is
                self._experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
            else:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def delete_study_runs(self, study: str) -> None:
        """--fresh: delete every run of `study` in this experiment (none if the experiment does not exist)."""
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            return
        for run in self.client.search_runs([exp.experiment_id], filter_string=f"tags.study = '{study}'"):
            self.client.delete_run(run.info.run_id)

    def find_run(self, tags: Mapping[str, str]) -> Any | None:
        query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=2,
                                       order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None

    def create_run(self, name: str, tags: Mapping[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=dict(tags))
        return run.info.run_id

    def log_batch(self, run_id: str, metrics: Mapping[str, float] | None = None, step: int = 0,
                  params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> None:
        """Metrics, params and tags in as few calls as MLflow's limits allow (usually one)."""
        self._log(run_id, {k: (v, int(step)) for k, v in (metrics or {}).items()}, params, tags)

    def _log(self, run_id: str, metrics: Mapping[str, tuple[float, int]], params: Mapping[str, Any] | None = None,
             tags: Mapping[str, Any] | None = None) -> None:
        """log_batch with a step per metric (`metrics`: key -> (value, step))."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, int(step)) for k, (v, step) in metrics.items()]
        ps = [Param(k, _param_text(v)) for k, v in (params or {}).items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        while ms or ps or ts:
            chunk = ps[:MAX_PARAMS_PER_BATCH]
            self.client.log_batch(run_id, metrics=ms[:1000], params=chunk, tags=ts[:100])
            ms, ps, ts = ms[1000:], ps[MAX_PARAMS_PER_BATCH:], ts[100:]

    def log_summary(self, run_id: str, metrics: Mapping[str, float],
                    tags: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Metrics that are one figure of a run (a study's front: hypervolume, trials_complete, ...), each
        logged only where it differs from the run's latest value, at the next step of its own history (0 for
        the first): a repeated `study report` adds no points. `tags` are set as given. Returns what was logged."""
        latest = self.client.get_run(run_id).data.metrics
        changed = {k: float(v) for k, v in metrics.items() if not _same(latest.get(k), float(v))}
        steps = {k: len(self.client.get_metric_history(run_id, k)) if k in latest else 0 for k in changed}
        if changed or tags:
            self._log(run_id, {k: (v, steps[k]) for k, v in changed.items()}, tags=tags)
        return changed

    def log_dataset(self, run_id: str, data: Any) -> None:
        """The data set of `data` (a study.trial.config.DataConfig) as the run's dataset input (context
        training; logging it again changes nothing). A store that refuses loses the input, not the study."""
        try:
            self.client.log_inputs(run_id, datasets=[dataset_input(data)])
        except Exception as e:  # noqa: BLE001 - a description of the run, never worth a study
            import logging

            logging.getLogger("study.search").warning("could not log the data set of MLflow run %s: %s", run_id, e)

    def artifact_uri(self, run_id: str) -> str:
        """Where the run's artifacts go, as the store holds it now (e.g. s3://BUCKET/.../<run id>/artifacts)."""
        return self.client.get_run(run_id).info.artifact_uri

    def artifacts(self, run_id: str) -> Any:
        """The artifact repository of a run, from the location the store holds now (MLflow's client caches
        a run's location per process: a study folder copied in the same process would write into the
        original's artifacts)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(self.artifact_uri(run_id), tracking_uri=self.tracking_uri)

    def log_dict(self, run_id: str, data: Mapping[str, Any], name: str) -> None:
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / Path(name).name
            path.write_text(json.dumps(dict(data), indent=2))
            folder = str(Path(name).parent)
            self.artifacts(run_id).log_artifact(str(path), None if folder == "." else folder)

    def log_file(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        if Path(path).is_file():
            self.artifacts(run_id).log_artifact(str(path), folder)

    def log_folder(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        """Every file under `path`, as artifacts under `folder` (e.g. report/index.html)."""
        if Path(path).is_dir():
            self.artifacts(run_id).log_artifacts(str(path), folder)

    def set_experiment_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_experiment_tag(self.experiment_id, k, str(v))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def close_trial_runs(self, parent_run_id: str, status: str, reason: str) -> int:
        """Nested runs still RUNNING when the study ends (a stopped trial) get `status` and a reason."""
        runs = self.client.search_runs([self.experiment_id], filter_string=
                                       f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'")
        for run in runs:
            self.log_batch(run.info.run_id, tags={"fail_reason": reason})
            self.finish(run.info.run_id, status)
        return len(runs)

    def last_step(self, run: Any) -> int:
        """The highest step any metric of `run` was logged at (0 for none): a resumed trial logs after it."""
        if run is None:
            return 0
        return max((m.step for k in run.data.metrics for m in self.client.get_metric_history(run.info.run_id, k)),
                   default=0)


def _same(old: float | None, new: float) -> bool:
    return old is not None and (old == new or (math.isnan(old) and math.isnan(new)))


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:MAX_PARAM_CHARS]


# ---------------------------------------------------------------------------------------------------
# The study's experiment and parent run.


def study_description(settings: Mapping[str, Any], space_file: str | Path | None = None, extra: str = "") -> str:
    """Markdown shown on the experiment's page: what the study searches for and how (`settings`: the
    fields of study.search.optimize.space.StudySettings, as dataclasses.asdict gives them)."""
    objectives = settings.get("objectives") or ()
    goals = ", ".join(f"`{o['metric']}` ({o['mode']})" if isinstance(o, Mapping) else str(o) for o in objectives)
    lines = [f"Study **{settings.get('name', '?')}**: robust pruning (HYDRA and baselines) searched by Optuna "
             f"({settings.get('sampler', '?')} sampler, {settings.get('n_trials', '?')} trials) on Ray Tune.",
             f"Objectives: {goals or '?'}. Selection uses validation figures only; test figures (`test_*`) "
             "exist for the Pareto front.",
             "One parent run (tag run_role=study) per study, one nested run per trial (tag optuna_trial_number)."]
    if space_file:
        lines.append(f"Search space: `{space_file}`.")
    if extra:
        lines.append(extra)
    return "\n\n".join(lines)


def describe_experiment(tracker: Tracker, settings: Mapping[str, Any], space_file: str | Path | None = None,
                        extra: str = "") -> None:
    """Tag the study's experiment as model development and give it the study's description."""
    tracker.set_experiment_tags({EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
                                 NOTE_TAG: study_description(settings, space_file, extra)})


def open_parent_run(tracker: Tracker, study: str, run_id: str = "", params: Mapping[str, Any] | None = None,
                    space_file: str | Path | None = None, data: Any = None) -> str:
    """Find the study's parent run (by id, then by tag) or create it; mark it RUNNING. Describes the
    experiment from `params` (the study.* settings); `data` (the study's DataConfig): its dataset input."""
    settings = {k[len("study."):]: v for k, v in (params or {}).items() if k.startswith("study.")}
    describe_experiment(tracker, {"name": study, **settings}, space_file)
    run = None
    if run_id:
        try:
            run = tracker.client.get_run(run_id)
        except Exception:  # deleted or another store: fall back to the tag
            run = None
    if run is None:
        run = tracker.find_run(study_run_key(study))
    if run is not None:
        tracker.reopen(run.info.run_id)
        if data is not None:  # a run made before dataset inputs were logged gets one
            tracker.log_dataset(run.info.run_id, data)
        return run.info.run_id
    run_id = tracker.create_run(study, {**study_run_key(study), **provenance_tags()})
    tracker.log_batch(run_id, params=params or {})
    if data is not None:
        tracker.log_dataset(run_id, data)
    if space_file:
        tracker.log_file(run_id, space_file)
    return run_id


# ---------------------------------------------------------------------------------------------------
# Nested trial runs, from the driver.
