"""The Tune callback that writes a study's trials to MLflow (study.search.recording.tracking's records): one
nested run per trial with the study's data set as its input, its per-epoch metrics named by stage
(`prune/val_robust_acc`) at the trial's global step, its final metrics by their own names, and at its end
the outputs of a COMPLETE trial (result.json; its model as an MLflow model or, where the study folder shares
the run's bucket, a reference) or why it ended otherwise (a trial a rung stopped: tags optuna_state=PRUNED and
stop_reason)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from ray.tune import Callback

from study.keys import FAIL_KEY, NODE_KEY, NUMBER_KEY, ROLE_TAG, STUDY_TAG, trial_run_key
from study.search.recording.provenance import provenance_tags
from study.search.recording.tracking import (MODEL_FOLDER, Tracker, log_model_reference, model_by_reference,
                                             numeric_metrics)


def epoch_record(result: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """The metrics and tags of one Tune report for a trial's MLflow run (logged at the trial's global step):
    an epoch report's numbers under its stage (`prune/val_robust_acc`: MLflow's UI charts them in one group
    per stage), a report without a stage (the final one) by their names; the tag `stage` names the stage.
    The step, the within-stage epoch and Tune's bookkeeping are no metrics."""
    metrics = numeric_metrics(result)
    tags: dict[str, str] = {}
    stage = result.get("stage")
    if isinstance(stage, str) and stage:
        metrics = {f"{stage}/{k}": v for k, v in metrics.items()}
        tags["stage"] = stage
    if isinstance(result.get(NODE_KEY), str):
        tags[NODE_KEY] = result[NODE_KEY]
    return metrics, tags


class MlflowTrialCallback(Callback):
    """Tune callback: a nested MLflow run per trial, one log_batch per reported epoch.

    `trial_config(config)` maps a Tune trial config to its TrialConfig (flat params + JSON artifact);
    `link(number, run_id)` records the run id with the Optuna trial (both picklable: Tune pickles this
    callback with the Tuner into its scratch folder, which nothing reads back). `parent_run_id`: the id, or what returns it once the
    run is open (study.search.running.warmup.ParentRun). `trial_dir(number)`: the local folder with a finished trial's
    model.pt and result.json (logged under `model/`); `trial_uri(number)`: where that folder really lives (its
    URI in a bucket), which decides whether the model's bytes or a reference are logged (model_by_reference).
    """

    def __init__(self, tracker: Tracker, study: str, parent_run_id: str | Callable[[], str], space_file: str,
                 trial_config: Callable[[Mapping[str, Any]], Any], link: Callable[[int, str], None] | None = None,
                 trial_dir: Callable[[int], Path] | None = None, trial_uri: Callable[[int], str] | None = None,
                 stop_reasons: Mapping[str, str] | None = None):
        self.tracker, self.study, self._parent = tracker, study, parent_run_id
        self.stop_reasons = stop_reasons if stop_reasons is not None else {}  # Tune trial id -> a scheduler's why
        self.space_file, self.trial_config, self.link = space_file, trial_config, link
        self.trial_dir = trial_dir  # Optuna trial number -> the folder with the trial's model.pt/result.json
        self.trial_uri = trial_uri  # Optuna trial number -> that folder's URI (a bucket) or path
        self._runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self._steps: dict[str, int] = {}  # MLflow run id -> last step logged

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_runs": {}, "_steps": {}}

    @property
    def parent_run_id(self) -> str:
        self._parent = self._parent() if callable(self._parent) else self._parent
        return self._parent

    def get_state(self) -> dict | None:
        return None  # everything is found again by tag

    def _run_id(self, trial: Any) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        number = int(trial.config.get(NUMBER_KEY, -1))
        key = trial_run_key(self.study, number, self.parent_run_id)
        run = self.tracker.find_run(key)
        if run is None:
            run_id = self.tracker.create_run(f"{self.study}-{number:04d}", {
                **key, ROLE_TAG: "trial", "tune_trial_id": trial.trial_id, **provenance_tags()})
            self._start(run_id, trial)
            self._steps[run_id] = 0
        else:
            run_id = run.info.run_id
            self.tracker.reopen(run_id)
            self.tracker.log_batch(run_id, tags={"tune_trial_id": trial.trial_id})
            self._steps[run_id] = self.tracker.last_step(run)
        self._runs[trial.trial_id] = run_id
        if self.link is not None:
            self.link(number, run_id)
        return run_id

    def _start(self, run_id: str, trial: Any) -> None:
        cfg = None
        try:
            cfg = self.trial_config(trial.config)
            params, tree = cfg.flat(), cfg.to_dict()
        except Exception as e:  # a bad config fails the trial itself; record what we can
            params = tree = {"config_error": str(e)}
        self.tracker.log_batch(run_id, params=params)
        if getattr(cfg, "data", None) is not None:
            self.tracker.log_dataset(run_id, cfg.data)
        self.tracker.log_dict(run_id, tree, "trial_config.json")
        self.tracker.log_file(run_id, self.space_file)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self._run_id(trial)
        step = int(result.get("step", result.get("training_iteration", 0)))
        if step <= self._steps.get(run_id, 0):
            return  # already logged before a resume
        metrics, tags = epoch_record(result)
        self.tracker.log_batch(run_id, metrics=metrics, step=step, tags=tags or None)
        self._steps[run_id] = step

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_id(trial)
        last = trial.last_result or {}
        final = bool(last.get("final"))
        status = "FINISHED" if final and not last.get(FAIL_KEY) else "FAILED" if final else "KILLED"
        if not final and trial.trial_id in self.stop_reasons:  # study.early_stop: PRUNED in Optuna
            self.tracker.log_batch(run_id, tags={"stop_reason": self.stop_reasons[trial.trial_id][:500],
                                                 "optuna_state": "PRUNED"})
        elif not final:
            self.tracker.log_batch(run_id, tags={FAIL_KEY: "stopped before its final report"})
        elif last.get(FAIL_KEY):  # the trial recorded its own failure (study.search.running.trainable)
            self.tracker.log_batch(run_id, tags={FAIL_KEY: str(last[FAIL_KEY])[:500]})
        elif self.trial_dir is not None:
            self.log_outputs(run_id, int(trial.config.get(NUMBER_KEY, -1)))
        self.tracker.finish(run_id, status)

    def log_outputs(self, run_id: str, number: int) -> None:
        """A COMPLETE trial's exported model and its result: the model as an MLflow model (study.trial.mlflow_model:
        the sparse weights file and the trial config, its final metrics attached) or, where the study folder shares
        the run's bucket, a reference to the model (model_by_reference: its bytes are kept once); result.json under
        `model/`. A model that cannot be logged is said in the run's tag `model_error`, never fails the study."""
        folder = self.trial_dir(number)
        if (folder / "model.pt").is_file():
            where = self.trial_uri(number) if self.trial_uri is not None else ""
            if model_by_reference(self.tracker.artifact_uri(run_id), where):
                log_model_reference(self.tracker, run_id, where)
            else:
                self._log_model(run_id, number, folder)
        self.tracker.log_file(run_id, folder / "result.json", MODEL_FOLDER)

    def _log_model(self, run_id: str, number: int, folder: Path) -> None:
        import json
        import logging

        from study.trial.mlflow_model import log_trial_model

        try:
            result = json.loads((folder / "result.json").read_text())
            log_trial_model(run_id, folder / "model.pt", result["config"], result.get("metrics") or {},
                            tags={STUDY_TAG: self.study, NUMBER_KEY: str(number)},
                            tracking_uri=self.tracker.tracking_uri,
                            step=self._steps.get(run_id) or self.tracker.last_step(self.tracker.client.get_run(run_id)),
                            name=f"{self.study}-{number:04d}")
        except Exception as e:  # noqa: BLE001 - the trial's folder keeps the model; the run says why it lacks one
            reason = f"{type(e).__name__}: {e}".strip().splitlines()[0][:500]
            logging.getLogger("study.search").warning("trial %d: its model was not logged to MLflow (%s)",
                                                      number, reason)
            self.tracker.log_batch(run_id, tags={"model_error": reason})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_id(trial)
        reason = (getattr(trial, "error_message", None) or "trial raised").strip().splitlines()
        self.tracker.log_batch(run_id, tags={"fail_reason": (reason[-1] if reason else "trial raised")[:500]})
        self.tracker.finish(run_id, "FAILED")

