"""`study run | resume | report`: a Ray Tune Tuner searched by Optuna, recorded in MLflow.

    study run search_spaces/quickstart.yaml      one search-space file = one study
    study resume quickstart                      continue an interrupted study (Ctrl-C, killed driver)
    study report quickstart                      reprint the Pareto front from the Optuna storage

Layout of a study (runs/<name>/): study.json (manifest: where everything is), space.yaml (the
validated file), optuna.db, tune/<name>/ (the Tune experiment), pretrained/, trials/<number>/,
pareto.csv. MLflow defaults to runs/mlflow.db (one experiment per study).

Trials are selected on validation figures only. After the search, every Pareto-front trial is evaluated
on the TEST split (`Study.final_evaluation`: study.confirm always, the study.robustness suite's final
budget where set; trials/<number>/confirm.json, robustness_final.json); `--no-final-eval` skips it.

No lost and no duplicated trials across a resume:
- Tune restores its trials and the searcher (which maps Tune trial ids to Optuna trials) from the
  experiment checkpoint; unfinished Tune trials continue from their last epoch checkpoint.
- An Optuna trial asked after the last experiment checkpoint (the driver died in between) is left
  RUNNING with no Tune trial: `StudySearch` adopts such orphans for the next trials Tune creates
  instead of asking new ones, so the study holds exactly n_trials trials.
- A trial that finished after the last checkpoint is rerun by Tune, finds its final.json and
  reports it again; Optuna ignores a second tell, MLflow reuses the run keyed by Optuna number.
- Every trial ends COMPLETE with finite objectives or FAIL; a trial still RUNNING when the search
  ends is failed with a log line (a bug if it happens).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from study.config import ConfigError, parse_overrides
from study.space import SearchSpace, load_space
from study.trainable import NODE_KEY, NUMBER_KEY, build_config, pretrain_task, study_trainable, trial_dir

log = logging.getLogger("study.runner")

DEFAULT_SPACE = "search_spaces/quickstart.yaml"
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # small: trial data lives in the trial, not in Ray's store


def _sampler_classes() -> dict[str, Callable[[], type]]:
    def get(name: str) -> Callable[[], type]:
        def load() -> type:
            import optuna

            return getattr(optuna.samplers, name)
        return load

    return {"tpe": get("TPESampler"), "nsga2": get("NSGAIISampler"), "gp": get("GPSampler"),
            "random": get("RandomSampler")}


SAMPLER_CLASSES = _sampler_classes()


def make_sampler(space: SearchSpace) -> Any:
    s = space.study
    return SAMPLER_CLASSES[s.sampler]()(seed=s.seed, **s.sampler_options)


# ---------------------------------------------------------------------------------------------------
# Where a study lives.


@dataclass(frozen=True)
class StudyPaths:
    root: Path  # runs/<name>, absolute
    name: str

    @property
    def manifest(self) -> Path:
        return self.root / "study.json"

    @property
    def space(self) -> Path:
        return self.root / "space.yaml"

    @property
    def tune_dir(self) -> Path:
        return self.root / "tune"

    @property
    def experiment(self) -> Path:
        return self.tune_dir / self.name

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    @property
    def pretrained(self) -> Path:
        return self.root / "pretrained"

    @property
    def pareto(self) -> Path:
        return self.root / "pareto.csv"

    @property
    def default_storage(self) -> str:
        return f"sqlite:///{self.root / 'optuna.db'}"


def study_paths(runs_dir: str | Path, name: str) -> StudyPaths:
    return StudyPaths(Path(runs_dir).resolve() / name, name)


@dataclass
class Manifest:
    name: str
    space_file: str  # the file the study came from
    storage: str  # Optuna storage URL or journal file
    tracking_uri: str
    parent_run_id: str = ""
    runs_dir: str = ""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        return cls(**json.loads(path.read_text()))


# ---------------------------------------------------------------------------------------------------
# Optuna.


def open_storage(url: str) -> Any:
    """An Optuna storage object from a URL: RDB URLs (sqlite://, postgresql://, mysql://...) or a
    journal file (`journal:///abs/path.log`, or any path ending in .log / .journal)."""
    import optuna

    path = url[len("journal:"):] if url.startswith("journal:") else url
    if url.startswith("journal:") or ("://" not in url and path.endswith((".log", ".journal"))):
        path = "/" + path.lstrip("/") if path.startswith("//") else path
        from optuna.storages.journal import JournalFileBackend

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise ConfigError("--storage", f"{url!r} is neither a database URL (sqlite:///abs/optuna.db) nor a journal file (*.log)")
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(url)


@functools.lru_cache(maxsize=4)
def _cached_storage(url: str) -> Any:
    return open_storage(url)


def load_optuna_study(url: str, name: str, space: SearchSpace | None = None) -> Any:
    import optuna

    storage = open_storage(url)
    if space is None:
        return optuna.load_study(study_name=name, storage=storage)
    directions = ["minimize" if m == "min" else "maximize" for m in space.study.modes]
    study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError("study.objectives", f"the Optuna study {name!r} exists with other directions "
                          f"({[d.name.lower() for d in study.directions]}); pick another study name or --fresh")
    if study.metric_names != space.study.metrics:  # optuna-dashboard and `optuna best-trials` show these names
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(space.study.metrics))
    return study


def link_mlflow_run(storage_url: str, study_name: str, number: int, run_id: str) -> None:
    """Record the MLflow run id with the Optuna trial (while it is still RUNNING)."""
    from optuna.trial import TrialState

    storage = _cached_storage(storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        if storage.get_trial(trial_id).state == TrialState.RUNNING:
            storage.set_trial_user_attr(trial_id, "mlflow_run_id", run_id)
    except Exception as e:  # a missing link loses a column of the report, never a trial
        log.warning("could not link MLflow run %s to Optuna trial %d: %s", run_id, number, e)


def _define_by_run(space: SearchSpace, trial: Any) -> dict[str, Any]:
    values = space.suggest(trial)
    return {**values, NUMBER_KEY: trial.number}


@functools.lru_cache(maxsize=1)
def _searcher_class() -> type:
    """StudySearch, built on first use (importing Ray Tune costs seconds; `study trial` needs none of it)."""
    from optuna.trial import Trial, TrialState
    from ray.tune.search.optuna import OptunaSearch

    from study.tracking import numeric_metrics

    class StudySearch(OptunaSearch):
        """OptunaSearch that never leaves a trial RUNNING and adopts orphans on resume."""

        def suggest(self, trial_id: str) -> dict | None:
            if self._ot_study is not None and trial_id not in self._ot_trials:
                orphan = self._orphan()
                if orphan is not None:
                    log.warning("resuming Optuna trial %d (asked before the driver stopped, never run)", orphan.number)
                    self._ot_trials[trial_id] = Trial(self._ot_study, orphan._trial_id)
            return super().suggest(trial_id)

        def _orphan(self) -> Any:
            claimed = {t.number for t in self._ot_trials.values()}
            running = self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            return next((t for t in sorted(running, key=lambda t: t.number) if t.number not in claimed), None)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            return  # multi-objective: Optuna takes no intermediate values

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials:
                return
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None:
                log.warning("Tune trial %s completed but has no Optuna trial; ignored", trial_id)
                return
            self._completed_trials.add(trial_id)
            storage = self._ot_study._storage
            if storage.get_trial(ot_trial._trial_id).state.is_finished():
                return  # told before the driver stopped; this is the rerun of a finished trial
            metrics = list(self.metric) if isinstance(self.metric, list) else [self.metric]
            result = result or {}
            values = [result.get(m) for m in metrics]
            finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            ot_trial.set_user_attr("tune_trial_id", trial_id)
            if result.get("final") and finite and not error:
                for key, value in numeric_metrics(result).items():
                    if key not in ("final", "step", "epoch"):
                        ot_trial.set_user_attr(key, value)
                if isinstance(result.get(NODE_KEY), str):
                    ot_trial.set_user_attr(NODE_KEY, result[NODE_KEY])
                self._ot_study.tell(ot_trial, [float(v) for v in values], state=TrialState.COMPLETE)
                return
            reason = ("the trial raised (see Tune's error file)" if error else
                      "stopped before its final report" if not result.get("final") else
                      f"objective not finite: {dict(zip(metrics, values))}")
            ot_trial.set_user_attr("fail_reason", reason)
            log.warning("Optuna trial %d recorded as FAIL: %s", ot_trial.number, reason)
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)

    StudySearch.__module__, StudySearch.__qualname__ = __name__, "StudySearch"  # pickled by reference
    return StudySearch


def __getattr__(name: str) -> Any:  # study.runner.StudySearch, importable (the Tuner pickles its searcher)
    if name == "StudySearch":
        return _searcher_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fail_running(study: Any, reason: str, expected: bool = False) -> int:
    """At the end of a search no Optuna trial may stay RUNNING: fail the rest, loudly unless `expected`
    (Tune's time budget stops trials without telling the searcher)."""
    from optuna.trial import TrialState

    stuck = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    for t in stuck:
        log.log(logging.WARNING if expected else logging.ERROR,
                "Optuna trial %d was still %s at the end of the study (%s); recording it as FAIL",
                t.number, t.state.name, reason)
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
        study.tell(t.number, state=TrialState.FAIL)
    return len(stuck)


def finished_count(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)))


# ---------------------------------------------------------------------------------------------------
# Ray.


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 log_to_driver=True)


def resolve_gpus(setting: Any) -> float:
    if setting != "auto":
        return float(setting)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _trial_name(trial: Any) -> str:
    return f"trial_{int(trial.config.get(NUMBER_KEY, 0)):04d}"


def _trial_dirname(trial: Any) -> str:
    return f"trial_{int(trial.config.get(NUMBER_KEY, 0)):04d}_{trial.trial_id}"


def _trial_config(base: dict, fixed: dict, config: Mapping[str, Any]) -> Any:
    return build_config(base, fixed, config)


# ---------------------------------------------------------------------------------------------------
# A study, run or resumed.


@dataclass
class Outcome:
    status: str  # "complete" | "interrupted"
    complete: int
    failed: int
    rows: list[dict[str, Any]]
    pareto_csv: Path | None
    parent_run_id: str


class Study:
    """Everything one study needs, built from its search space and its manifest."""

    def __init__(self, space: SearchSpace, paths: StudyPaths, manifest: Manifest,
                 run_trial: Callable | None = None, pretrain: Callable | None = None, final_eval: bool = True):
        self.space, self.paths, self.manifest = space, paths, manifest
        self.run_trial, self.pretrain = run_trial, pretrain
        self.final_eval = final_eval  # the test-split evaluation of the front (study.confirm, study.robustness)
        self.within_points = 1.0  # the report recommends the smallest model within this many accuracy points of dense
        s = space.study
        cache = space.base_config().cache_dir
        explicit_cache = "cache_dir" in space.trial
        self.fixed = {"name": s.name, "cache_dir": str(Path(cache).resolve() if explicit_cache else paths.pretrained),
                      "output_dir": str(paths.trials)}

    # --- pieces ----------------------------------------------------------------------------------

    def tracker(self) -> Any:
        from study.tracking import Tracker

        uri = self.manifest.tracking_uri
        root = str(Path(self.manifest.runs_dir) / "mlartifacts" / self.space.study.name) if uri.startswith("sqlite:") else None
        return Tracker(uri, self.space.study.name, artifact_root=root)

    def trainable(self, cpus: float, gpus: float) -> Any:
        from ray import tune

        s = self.space.study
        fn = tune.with_parameters(study_trainable, base=self.space.trial, fixed=self.fixed, objectives=s.metrics,
                                  study_dir=str(self.paths.root), threads=max(1, int(cpus)), run_trial=self.run_trial,
                                  robustness=s.robustness)
        return tune.with_resources(fn, {"cpu": cpus, "gpu": gpus})

    def searcher(self) -> Any:
        s = self.space.study
        return _searcher_class()(space=functools.partial(_define_by_run, self.space), metric=s.metrics,
                                 mode=s.modes, sampler=make_sampler(self.space), study_name=s.name,
                                 storage=open_storage(self.manifest.storage))

    def callback(self, tracker: Any) -> Any:
        from study.tracking import MlflowTrialCallback

        return MlflowTrialCallback(tracker, self.space.study.name, self.manifest.parent_run_id, str(self.paths.space),
                                   trial_config=functools.partial(_trial_config, self.space.trial, self.fixed),
                                   link=functools.partial(link_mlflow_run, self.manifest.storage, self.space.study.name),
                                   trial_dir=functools.partial(trial_dir, self.paths.root))

    def run_pretraining(self, cpus: float, gpus: float) -> None:
        """The dense model, once per study, as a Ray task on the resources of one trial.

        (Not more threads on a CPU machine: small convolutions gain little from them, and torch's
        spinning threads slow down ten-fold when the cores are shared.)"""
        import ray

        cfg = self.space.trial_config({}, self.fixed)
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(pretrain_task)
        t0 = time.perf_counter()
        print(f"[study] pretraining the dense model ({cfg.pretrain_key()}) on {cpus:g} CPU / {gpus:g} GPU ...", flush=True)
        path = ray.get(task.remote(cfg, max(1, int(cpus)), self.pretrain))
        print(f"[study] dense model ready in {time.perf_counter() - t0:.1f}s: {path}", flush=True)

    # --- the search ------------------------------------------------------------------------------

    def execute(self, *, resume: bool) -> Outcome:
        from ray import tune

        s = self.space.study
        optuna_study = load_optuna_study(self.manifest.storage, s.name, self.space)
        tracker = self.tracker()
        from study.tracking import open_parent_run

        params = {f"study.{k}": v for k, v in dataclasses.asdict(s).items()}
        self.manifest.parent_run_id = open_parent_run(tracker, s.name, self.manifest.parent_run_id, params,
                                                      self.paths.space)
        self.manifest.save(self.paths.manifest)
        gpus = resolve_gpus(s.gpus_per_trial)
        cpus = s.cpus_per_trial
        remaining = s.n_trials - finished_count(optuna_study)
        t0 = time.monotonic()
        if remaining > 0 or (resume and tune.Tuner.can_restore(str(self.paths.experiment))):
            self.run_pretraining(cpus, gpus)
            tuner = self._tuner(resume, remaining, cpus, gpus, tracker)
            tuner.fit()
        elapsed = time.monotonic() - t0
        done = finished_count(optuna_study)
        budget_spent = s.time_budget_s > 0 and elapsed >= s.time_budget_s
        if done < s.n_trials and not budget_spent:
            tracker.finish(self.manifest.parent_run_id, "KILLED")
            print(f"\n[study] {s.name}: interrupted after {done} of {s.n_trials} trials. Continue with:\n"
                  f"    study resume {s.name}" + (f" --runs-dir {self.manifest.runs_dir}" if self._custom_runs_dir() else ""),
                  flush=True)
            return Outcome("interrupted", *self._counts(optuna_study), [], None, self.manifest.parent_run_id)
        reason = ("stopped by the study's time budget" if budget_spent else
                  "the search ended while it was RUNNING (a bug: please report it)")
        fail_running(optuna_study, reason, expected=budget_spent)
        tracker.close_trial_runs(self.manifest.parent_run_id, "KILLED", reason)
        self.record_unstarted(optuna_study, tracker)
        if self.final_eval:
            self.final_evaluation(optuna_study, tracker, cpus, gpus)
        return self.finish(optuna_study, tracker)

    def record_unstarted(self, optuna_study: Any, tracker: Any) -> None:
        """One MLflow run per Optuna trial, also for a trial stopped before it started (time budget)."""
        from optuna.trial import TrialState

        from study.tracking import provenance_tags

        parent = self.manifest.parent_run_id
        runs = tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
        have = {r.data.tags.get("optuna_trial_number") for r in runs}
        for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if str(t.number) in have:
                continue
            run_id = tracker.create_run(f"{self.space.study.name}-{t.number:04d}", {
                "study": self.space.study.name, "optuna_trial_number": str(t.number), "mlflow.parentRunId": parent,
                "run_role": "trial", "fail_reason": t.user_attrs.get("fail_reason", "never started"),
                **provenance_tags()})
            config = {**t.params, NUMBER_KEY: t.number}
            tracker.log_batch(run_id, params=_trial_config(self.space.trial, self.fixed, config).flat())
            tracker.finish(run_id, "KILLED")

    def _custom_runs_dir(self) -> bool:
        return Path(self.manifest.runs_dir).resolve() != Path("runs").resolve()

    def _tuner(self, resume: bool, remaining: int, cpus: float, gpus: float, tracker: Any) -> Any:
        from ray import tune

        # Epoch reports carry no objective on purpose (a partial value must never reach Optuna as final);
        # Tune's strict check would reject them. StudySearch fails any trial whose last report lacks one.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        # A checkpoint per epoch is the point (resume); Tune's warning about frequent snapshots is noise.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        # Snapshot the experiment state at every controller step and keep two checkpoints per trial: Tune
        # deletes the older checkpoint when a new one registers, and a driver killed before the next
        # (throttled) snapshot left a state pointing at a deleted checkpoint ("does not exist on storage").
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
        trainable = self.trainable(cpus, gpus)
        if resume and tune.Tuner.can_restore(str(self.paths.experiment)):
            print(f"[study] restoring the Tune experiment {self.paths.experiment}", flush=True)
            return tune.Tuner.restore(str(self.paths.experiment), trainable=trainable, resume_unfinished=True,
                                      resume_errored=False, restart_errored=False)
        if self.paths.experiment.exists():  # a Tune folder that cannot be restored (died while starting)
            shutil.rmtree(self.paths.experiment)
        s = self.space.study
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=self.searcher(), num_samples=remaining,
                                        max_concurrent_trials=s.max_concurrent,
                                        time_budget_s=s.time_budget_s or None,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname,
                                        reuse_actors=True),  # no new process + torch import per trial
            run_config=tune.RunConfig(
                name=s.name, storage_path=str(self.paths.tune_dir),
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[self.callback(tracker)]),
        )

    # --- the test-split evaluation of the front (study.confirm; study.robustness) -----------------

    def final_evaluation(self, optuna_study: Any, tracker: Any, cpus: float, gpus: float) -> int:
        """The TEST split, once per Pareto-front trial (the models the study chose on validation figures),
        as Ray tasks on one trial's resources:

        - the confirmation (study.confirm, always): clean, strong PGD, standard AutoAttack; saved as
          trials/<n>/confirm.json, logged as `test_*` metrics and the tag `test_attack`;
        - with a study.robustness section, the suite's final budget; saved as trials/<n>/robustness_final.json,
          logged with the `test.` prefix.

        A part saved with the same settings is not redone (resume, report). Returns the trials evaluated."""
        import ray

        from analysis import pareto
        from study import robust_eval

        s = self.space.study
        suite, conf = s.robustness, s.confirm
        todo = []
        for t in pareto.front_trials(optuna_study):
            folder = trial_dir(self.paths.root, t.number)
            need_confirm = robust_eval.load_confirm(folder, conf) is None
            need_suite = suite is not None and robust_eval.load_final(folder, suite.final_budget) is None
            if not (need_confirm or need_suite):
                continue
            if not (folder / "model.pt").is_file():
                log.warning("test-split evaluation: trial %d has no %s; skipped", t.number, folder / "model.pt")
                continue
            todo.append((t, folder, need_confirm, need_suite))
        if not todo:
            return 0
        searched_eps = {"attack.eps", "eval.eps"} & set(self.space.keys)
        eps = None if searched_eps else self.space.base_config().eval_eps
        parts = [conf.attack_text(eps)] + ([f"robustness suite ({robust_eval.budget_text(suite.final_budget)})"]
                                        if suite is not None else [])
        print(f"[study] test-split evaluation of {len(todo)} Pareto-front trial(s): {'; '.join(parts)} ...", flush=True)
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(robust_eval.evaluate_on_test)
        refs = [task.remote(_trial_config(self.space.trial, self.fixed, {**t.params, NUMBER_KEY: t.number}),
                            str(folder / "model.pt"), conf if need_confirm else None,
                            suite if need_suite else None, max(1, int(cpus)))
                for t, folder, need_confirm, need_suite in todo]
        done = 0
        for (t, folder, _, _), ref in zip(todo, refs):
            try:
                payload, report = ray.get(ref)
            except Exception as e:  # one trial's evaluation failing must not lose the study's report
                log.warning("test-split evaluation of trial %d failed: %s", t.number, e)
                continue
            run_id = self._trial_run_id(tracker, t)
            text, wall = [], 0.0
            if payload is not None:
                path = robust_eval.save_confirm(folder, payload)
                self._log_confirm(tracker, run_id, t, payload, path)
                m, wall = payload["metrics"], wall + sum(payload["wall_s"].values())
                text.append(f"test clean {m['test_clean_acc']:.4f}, test robust {m['test_robust_acc']:.4f}")
            if report is not None:
                path = robust_eval.save_final(folder, report, suite.final_budget)
                self._log_final(tracker, run_id, t, report, path)
                wall += report.wall_s.get("total", 0.0)
                text.append("suite " + ("** SUSPECT: a sanity check failed **" if report.suspect else "checks ok"))
            print(f"[study] trial {t.number}: test-split evaluation done in {wall:.0f}s: {'; '.join(text)}", flush=True)
            done += 1
        return done

    def _trial_run_id(self, tracker: Any, trial: Any) -> str | None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:
            run = tracker.find_run({"study": self.space.study.name, "optuna_trial_number": str(trial.number),
                                    "mlflow.parentRunId": self.manifest.parent_run_id})
            run_id = run.info.run_id if run is not None else None
        if not run_id:
            log.warning("test-split evaluation of trial %d: no MLflow run to log it to", trial.number)
        return run_id

    def _log_confirm(self, tracker: Any, run_id: str | None, trial: Any, payload: Mapping[str, Any], path: Path) -> None:
        if not run_id:
            return
        try:
            tracker.log_batch(run_id, metrics=payload["metrics"], tags={"test_attack": payload["test_attack"]})
            tracker.log_file(run_id, path)
        except Exception as e:  # the numbers are saved in the trial folder anyway
            log.warning("could not log the test-split confirmation of trial %d to MLflow: %s", trial.number, e)

    def _log_final(self, tracker: Any, run_id: str | None, trial: Any, report: Any, path: Path) -> None:
        from study import robust_eval

        if not run_id:
            return
        p = robust_eval.FINAL_PREFIX
        failed = [c.name for c in report.checks if not c.passed]
        try:
            tracker.log_batch(run_id, metrics=robust_eval.final_metrics(report),
                              tags={f"{p}suspect": str(report.suspect).lower(),
                                    f"{p}failed_checks": ", ".join(failed) or "none"})
            tracker.log_file(run_id, path)
        except Exception as e:  # the numbers are saved in the trial folder anyway
            log.warning("could not log the test-split suite evaluation of trial %d to MLflow: %s", trial.number, e)

    def _test_columns(self, rows: list[dict[str, Any]]) -> tuple[dict[int, dict], list[str]]:
        """Adds the saved test-split columns to the front rows, in place: the confirmation's test_* figures
        and test_attack, and the suite's (test.robust..., test.autoattack..., test.suspect). Returns trial
        number -> saved suite payload, and the distinct test_attack texts."""
        from study import robust_eval

        s = self.space.study
        suites, attacks = {}, []
        for row in rows:
            folder = trial_dir(self.paths.root, int(row["trial"]))
            payload = robust_eval.load_confirm(folder)
            if payload is not None:
                row.update(robust_eval.confirm_columns(payload))  # mlflow_run_id stays last (columns_of)
                if payload.get("test_attack") and payload["test_attack"] not in attacks:
                    attacks.append(payload["test_attack"])
            final = robust_eval.load_final(folder) if s.robustness is not None else None
            if final is not None:
                suites[int(row["trial"])] = final
                row.update(robust_eval.front_columns(final["metrics"], s.metrics))
        return suites, attacks

    def _counts(self, study: Any) -> tuple[int, int]:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        return (sum(t.state == TrialState.COMPLETE for t in trials), sum(t.state == TrialState.FAIL for t in trials))

    def finish(self, optuna_study: Any, tracker: Any | None = None, report_tracker: Any | None = None) -> Outcome:
        from analysis import pareto

        s = self.space.study
        rows = pareto.front_rows(optuna_study, s.metrics)
        suites, attacks = self._test_columns(rows)
        csv = pareto.write_csv(rows, self.paths.pareto)
        complete, failed = self._counts(optuna_study)
        hv = pareto.study_hypervolume(optuna_study)
        # The terminal gets test clean/robust (the attack named above the table), the objectives' suite test
        # figures, AutoAttack and suspect; the CSV gets them all, test_attack included.
        from study.robust_eval import terminal_column

        shown = [{k: v for k, v in r.items() if terminal_column(k, s.metrics, r)} for r in rows]
        print_front(s.name, shown, self.space.keys, complete, failed, hv, csv, attacks)
        if suites:
            print_final_checks(suites, s.robustness)
        if tracker is not None:
            run = self.manifest.parent_run_id
            tracker.log_batch(run, metrics={"trials_complete": complete, "trials_failed": failed,
                                            "pareto_size": len(rows), "hypervolume": hv})
            tracker.log_file(run, csv)
        self.write_report(optuna_study, tracker if tracker is not None else report_tracker)
        if tracker is not None:
            tracker.finish(self.manifest.parent_run_id, "FINISHED")
        print_viewers(self.paths, self.manifest, s.metrics)
        return Outcome("complete", complete, failed, rows, csv, self.manifest.parent_run_id)

    def write_report(self, optuna_study: Any, tracker: Any | None) -> Path | None:
        """runs/<study>/report/ (plots + index.html), logged to the parent run when `tracker` is given.
        A report that cannot be drawn is a warning: it must never lose the study's results."""
        from analysis.report import write_report

        try:
            page = write_report(self.paths.root, optuna_study, self.space, self.manifest, tracker,
                                within_points=self.within_points)
        except Exception as e:  # noqa: BLE001 - the front and pareto.csv are already written
            log.warning("could not write the study report: %s", e)
            return None
        print(f"report written to {page}", flush=True)
        return page


def print_front(name: str, rows: list[dict], keys: list[str], complete: int, failed: int, hv: float, csv: Path,
                attacks: Sequence[str] = ()) -> None:
    from analysis import pareto

    title = (f"\nPareto front of study '{name}': {len(rows)} of {complete} complete trials "
             f"({failed} failed); hypervolume {hv:.4g}")
    title += "\nselected on the validation split (val_*)"
    if attacks:
        title += ("; test_* = the chosen models on the TEST split, test_robust_acc = per-point worst case of "
                  + " | ".join(attacks))
    else:
        title += "; no test-split figures yet (study resume runs the confirmation)" if rows else ""
    print(pareto.format_table(pareto.compact_params(rows, keys), title=title))
    print(f"written to {csv}", flush=True)


def print_final_checks(finals: Mapping[int, dict], robustness: Any) -> None:
    """One line per evaluated front trial: the sanity checks of its final robustness evaluation."""
    from study import robust_eval

    budget = robust_eval.budget_text(robustness.final_budget) if robustness is not None else ""
    print(f"\nrobustness suite on the test split ({budget}): sanity checks")
    for number, payload in sorted(finals.items()):
        failed = payload.get("failed_checks") or []
        print(f"  trial {number}: " + (f"SUSPECT, failed: {', '.join(failed)}" if failed else "all checks passed"))
    print("  (a failed check flags possible gradient masking or a broken evaluation: see docs/robustness.md)", flush=True)


def print_viewers(paths: StudyPaths, manifest: Manifest, metrics: list[str]) -> None:
    store = manifest.storage
    dash = store[len("journal:"):] if store.startswith("journal:") else store
    cols = ",".join(["trial_id", *metrics[:2], "config/prune.keep_fraction"])  # fits 80 columns
    print("\nLook at it with:\n"
          f"    mlflow ui --backend-store-uri {manifest.tracking_uri}\n"
          f"    optuna-dashboard {dash}\n"
          f"    tune ls {paths.experiment} --columns {cols}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Entry points for study.cli and tests.


def run_study(space: SearchSpace, *, runs_dir: str | Path = "runs", tracking_uri: str | None = None,
              storage: str | None = None, fresh: bool = False, run_trial: Callable | None = None,
              pretrain: Callable | None = None, address: str | None = None, num_cpus: int | None = None,
              final_eval: bool = True) -> Outcome:
    """Start a study from a validated search space (refuses to overwrite one unless `fresh`)."""
    from study.tracking import default_tracking_uri

    name = space.study.name
    paths = study_paths(runs_dir, name)
    url = storage or space.study.storage or paths.default_storage
    if fresh:
        wipe_study(paths, url, tracking_uri or default_tracking_uri(runs_dir))
    elif paths.manifest.exists() or paths.experiment.exists():
        raise ConfigError("study.name", f"a study named {name!r} already exists in {paths.root}; "
                          f"continue it with `study resume {name}`, or start over with --fresh", space.path)
    if not fresh and (url != paths.default_storage or (paths.root / "optuna.db").exists()):
        _refuse_existing_optuna(url, name, space.path)
    manifest = Manifest(name=name, space_file=str(Path(space.path).resolve()), storage=url,
                        tracking_uri=tracking_uri or default_tracking_uri(runs_dir),
                        runs_dir=str(Path(runs_dir).resolve()))
    paths.root.mkdir(parents=True, exist_ok=True)
    header = f"# the validated search space of study {name!r}, from {space.path}\n"
    paths.space.write_text(header + yaml.safe_dump(space.raw, sort_keys=False))
    manifest.save(paths.manifest)
    start_ray(address, num_cpus)
    return Study(space, paths, manifest, run_trial, pretrain, final_eval).execute(resume=False)


def _refuse_existing_optuna(url: str, name: str, source: str) -> None:
    import optuna

    for summary in optuna.get_all_study_summaries(open_storage(url), include_best_trial=False):
        if summary.study_name == name and summary.n_trials:
            raise ConfigError("study.name", f"the Optuna storage {url} already holds a study {name!r} with "
                              f"{summary.n_trials} trials; start over with --fresh or pick another name", source)


def resume_study(name: str, *, runs_dir: str | Path = "runs", run_trial: Callable | None = None,
                 pretrain: Callable | None = None, address: str | None = None, num_cpus: int | None = None,
                 final_eval: bool = True) -> Outcome:
    """Continue a study from its manifest: Tune's checkpoint where there is one, Optuna's storage anyway."""
    paths, manifest, space = _open(name, runs_dir)
    start_ray(address, num_cpus)
    return Study(space, paths, manifest, run_trial, pretrain, final_eval).execute(resume=True)


def report_study(name: str, *, runs_dir: str | Path = "runs", within_points: float = 1.0) -> Outcome:
    """Reprint the front and redraw the report of a finished or running study (the report's files are
    logged to the parent run; the run's status is left as it is)."""
    paths, manifest, space = _open(name, runs_dir)
    study = load_optuna_study(manifest.storage, name)
    s = Study(space, paths, manifest)
    s.within_points = within_points
    return s.finish(study, report_tracker=s.tracker())


def _open(name: str, runs_dir: str | Path) -> tuple[StudyPaths, Manifest, SearchSpace]:
    paths = study_paths(runs_dir, name)
    if not paths.manifest.is_file():
        known = sorted(p.parent.name for p in Path(runs_dir).glob("*/study.json"))
        raise ConfigError("", f"no study named {name!r} in {Path(runs_dir).resolve()}; "
                          f"studies there: {', '.join(known) or '(none)'}")
    manifest = Manifest.load(paths.manifest)
    return paths, manifest, load_space(paths.space)


def wipe_study(paths: StudyPaths, storage_url: str, tracking_uri: str) -> None:
    """--fresh: forget a study (its folder, its Optuna study, its MLflow runs)."""
    import optuna

    name = paths.name
    try:
        optuna.delete_study(study_name=name, storage=open_storage(storage_url))
    except KeyError:
        pass
    from study.tracking import Tracker

    tracker = Tracker(tracking_uri, name)
    if tracker.client.get_experiment_by_name(name) is not None:
        for run in tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.study = '{name}'"):
            tracker.client.delete_run(run.info.run_id)
    for sub in (paths.tune_dir, paths.trials):
        shutil.rmtree(sub, ignore_errors=True)
    for f in (paths.manifest, paths.space, paths.pareto):
        f.unlink(missing_ok=True)


# --- CLI ------------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default="runs", help="where studies live (default: runs)")


def _add_final_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-final-eval", dest="final_eval", action="store_false",
                   help="skip the test-split evaluation of the Pareto front (study.confirm, and "
                        "study.robustness.final_budget); `study resume <name>` runs it later")


def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", nargs="?", default=DEFAULT_SPACE, help=f"search-space file (default: {DEFAULT_SPACE})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a value of the file, e.g. --set study.n_trials=4 --set trial.finetune.epochs=2")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///<runs-dir>/mlflow.db)")
    p.add_argument("--storage", default=None, help="Optuna storage URL or journal file (default: the file's "
                   "study.storage, else sqlite:///<runs-dir>/<study>/optuna.db)")
    p.add_argument("--fresh", action="store_true", help="delete an existing study of the same name first")
    _add_final_eval(p)
    _add_common(p)
    _add_ray(p)


def add_resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="study name (the folder under --runs-dir)")
    _add_final_eval(p)
    _add_common(p)
    _add_ray(p)


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="study name (the folder under --runs-dir)")
    p.add_argument("--within-points", type=float, default=1.0, metavar="X",
                   help="recommend the smallest model within X accuracy points of the dense model's "
                        "validation robust accuracy (default 1.0)")
    _add_common(p)


def add_commands(sub: Any) -> None:
    """Register run, resume and report on the `study` CLI's subparsers."""
    p = sub.add_parser("run", help="run a study: Ray Tune trials searched by Optuna, recorded in MLflow")
    add_run_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("resume", help="continue an interrupted study (no lost, no duplicated trials)")
    add_resume_args(p)
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("report", help="print a study's Pareto front and write its pareto.csv")
    add_report_args(p)
    p.set_defaults(func=cmd_report)


def _exit_code(outcome: Outcome) -> int:
    return 0 if outcome.status == "complete" else 130


def cmd_run(args: argparse.Namespace) -> int:
    space = load_space(args.space, parse_overrides(args.set or []))
    outcome = run_study(space, runs_dir=args.runs_dir, tracking_uri=args.tracking_uri, storage=args.storage,
                        fresh=args.fresh, address=args.address, num_cpus=args.num_cpus,
                        final_eval=getattr(args, "final_eval", True))
    return _exit_code(outcome)


def cmd_resume(args: argparse.Namespace) -> int:
    outcome = resume_study(args.name, runs_dir=args.runs_dir, address=args.address, num_cpus=args.num_cpus,
                           final_eval=getattr(args, "final_eval", True))
    return _exit_code(outcome)


def cmd_report(args: argparse.Namespace) -> int:
    if not 0 <= args.within_points <= 100:
        raise ConfigError("--within-points", f"{args.within_points:g} is out of range; must be in [0, 100]")
    report_study(args.name, runs_dir=args.runs_dir, within_points=args.within_points)
    return 0


if __name__ == "__main__":  # python -m study.runner run ...
    parser = argparse.ArgumentParser(prog="study")
    add_commands(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
