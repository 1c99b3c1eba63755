"""A study: a Ray Tune Tuner searched by Optuna, recorded in MLflow (`run_study`, `resume_study`,
`report_study`, `wipe_study`: the bodies of `study run | resume | report`, whose flags are in study.cli).

This module is over 400 lines because the Study class owns the whole run/resume lifecycle, including keeping
an object-store study's bucket and local mirror in step (the file operations themselves are in
study.search.folder.layout and .store; the MLflow side in study.search.recording.study_mlflow); the next split
is the entry points (run_study ... wipe_study) into their own module.

    study run search_spaces/quickstart.yaml      one search-space file = one study
    study resume quickstart                      continue an interrupted study (Ctrl-C, killed driver)
    study report quickstart                      reprint the Pareto front from the Optuna storage

A study lives in runs/<name>/ (study.search.folder.layout), or in a bucket (--runs-dir s3://...,
study.search.folder.store); MLflow defaults to runs/mlflow.db (one experiment per study).

Trials are selected on validation figures only. After the search, every Pareto-front trial is evaluated
on the TEST split (`Study.final_evaluation`: study.confirm always, the study.robustness suite's final
budget where set; study.search.front.evaluate); `--no-final-eval` skips it.

A study's state is its Optuna storage and its trial folders, nothing else. `study resume` builds a new
Tuner exactly as `study run` does (Tune's experiment folder is scratch: it is replaced, never restored, and
nothing in the study folder is unpickled), and the searcher (study.search.optimize.searcher) reads the storage:
- COMPLETE, FAIL and PRUNED trials are done;
- a RUNNING trial (its driver died) is handed to the new Tuner first, under its own Optuna number: the
  trainable continues it from trials/<number>/checkpoint.pt, or reports its final.json when it had
  finished; MLflow reuses its run (keyed by Optuna number) and skips the epochs already logged;
- new trials are asked until the study holds n_trials.
Every trial ends COMPLETE with finite objectives, FAIL or PRUNED; a trial still RUNNING when the search
ends is failed with a log line (a bug if it happens).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from study.errors import ConfigError, UserError
from study.keys import NUMBER_KEY
from study.search import console
from study.search.folder.layout import (CONFIRM_FILE, STORAGE_SNAPSHOT, SUITE_FINAL_FILE, TRIAL_CHECKPOINT_FILE,
                                        Manifest, StudyPaths, sqlite_file, study_paths)
from study.search.front.evaluate import add_test_columns, evaluate_front
from study.search.optimize.optuna_search import (check_resumable, counts, fail_running, finished_count,
                                                 load_optuna_study, open_storage, refuse_existing)
from study.search.optimize.space import SearchSpace, load_space
from study.search.recording import study_mlflow
from study.search.running import progress_table, startup
from study.search.running.ray_cluster import resolve_gpus
from study.search.running.trainable import build_config, pretrain_task, study_trainable

log = logging.getLogger("study.search")


def _trial_name(trial: Any) -> str:
    return f"trial_{int(trial.config.get(NUMBER_KEY, 0)):04d}"


def _trial_dirname(trial: Any) -> str:
    return f"trial_{int(trial.config.get(NUMBER_KEY, 0)):04d}_{trial.trial_id}"


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
                 run_trial: Callable | None = None, pretrain: Callable | None = None, final_eval: bool = True,
                 dense: Any = None):
        self.space, self.paths, self.manifest = space, paths, manifest
        self.run_trial, self.pretrain = run_trial, pretrain
        self.dense = dense  # pretraining started before Ray (run_study: a one-machine CPU study), else None
        self.final_eval = final_eval  # the test-split evaluation of the front (study.confirm, study.robustness)
        self.wipe_runs = False  # --fresh: delete the name's earlier MLflow runs (done while the dense model trains)
        self.pretraining_failed = False  # then no trial trained: a new study is removed again (_undo_creation)
        self.within_points = 1.0  # the report recommends the smallest model within this many accuracy points of dense
        self.fixed = startup.fixed_config(space, paths)

    # --- pieces ----------------------------------------------------------------------------------

    def tracker(self, relocate: bool = True) -> Any:
        """The study's MLflow tracker (study.search.recording.study_mlflow); `relocate=False` leaves the artifact
        relocation to open_parent_run."""
        return study_mlflow.tracker(self, relocate)

    def trainable(self, cpus: float, gpus: float, dense: Any = None) -> Any:
        from ray import tune

        s = self.space.study
        fn = tune.with_parameters(study_trainable, base=self.space.trial, fixed=self.fixed, objectives=s.metrics,
                                  study_dir=self.paths.location(), threads=max(1, int(cpus)), run_trial=self.run_trial,
                                  robustness=s.robustness, checkpoint_every_s=s.checkpoint_every_s,
                                  dense=dense.handle() if dense is not None else None)
        return tune.with_resources(fn, {"cpu": cpus, "gpu": gpus})

    def searcher(self, stop_reasons: Mapping[str, str] | None = None) -> Any:
        from study.search.optimize.searcher import StudySearch

        return StudySearch(self.space, self.manifest.storage, stop_reasons=stop_reasons)

    def rung_scheduler(self, optuna_study: Any) -> Any:
        """`study.early_stop`'s Tune scheduler (None when off), told the epoch figures of the trials the
        study completed before this driver (their result.json histories)."""
        s = self.space.study
        if s.early_stop is None:
            return None
        from optuna.trial import TrialState

        from study.search.optimize.rung_scheduler import RungScheduler

        sched = RungScheduler(s.early_stop, s.metrics, s.modes)
        for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            try:
                data = json.loads((self.trial_folder(t.number) / "result.json").read_text())
                history, metrics = data["history"], data["metrics"]
                if not isinstance(history, list) or not isinstance(metrics, dict):
                    raise ValueError("history/metrics of the wrong type")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("study.early_stop: trial %d's epoch figures unreadable (%s); its rungs not counted",
                            t.number, e)
                continue
            sched.add_completed([h for h in history if isinstance(h, dict)], metrics)
        return sched

    def save_manifest(self) -> None:
        self.manifest.save(self.paths.manifest)
        self.paths.push("study.json")

    def trial_folder(self, number: int) -> Path:
        """A trial's files, local (for an object-store study: pulled into the mirror first)."""
        return self.paths.pull_trial(number)

    def trial_config(self, config: Mapping[str, Any]) -> Any:
        """The TrialConfig of a Tune trial config (searched values + NUMBER_KEY) in this study."""
        return build_config(self.space.trial, self.fixed, config)

    def start_pretraining(self, cpus: float, gpus: float, needed: bool = True) -> Any:
        """The dense model, once per study (study.search.running.dense): the one a one-machine CPU study started before
        Ray (study.search.running.startup.EarlyStart, in a process spawned by the driver), else from the cache or a Ray
        task on a trial's resources, while the driver sets up and the trials' workers start; `threads` = the
        trial's CPUs.

        (Not more threads on a CPU machine: small convolutions gain little from them, and torch's
        spinning threads slow down ten-fold when the cores are shared.)"""
        if self.dense is not None:
            return self.dense
        from study.search.running.dense import Pretraining

        return Pretraining(self.space.trial_config({}, self.fixed), cpus, gpus, self.pretrain, pretrain_task,
                           needed=needed)

    # --- the search ------------------------------------------------------------------------------

    def execute(self, *, resume: bool) -> Outcome:
        s = self.space.study
        optuna_study = load_optuna_study(self.manifest.storage, s.name, self.space)
        gpus = resolve_gpus(s.gpus_per_trial)
        cpus = s.cpus_per_trial
        remaining = s.n_trials - finished_count(optuna_study)
        if resume:
            running = len(optuna_study.get_trials(deepcopy=False)) - finished_count(optuna_study)
            print(f"[study] resuming study {s.name!r} from its Optuna storage: {s.n_trials - remaining} of "
                  f"{s.n_trials} trials finished, {running} to continue from trials/<number>/", flush=True)
        t0 = time.monotonic()
        # RUNNING trials count as remaining: a resume continues them. The dense model trains while the driver
        # sets up; with no trial left there is no search and nothing to pretrain.
        dense = self.start_pretraining(cpus, gpus) if remaining > 0 else None
        tracker = self.tracker(relocate=False)
        from study.search.running.warmup import ParentRun

        # the parent run opens while Tune starts the trials' workers
        parent = ParentRun(functools.partial(study_mlflow.open_parent_run, self, tracker))
        try:
            if dense is not None:
                self._search(optuna_study, remaining, cpus, gpus, tracker, dense, parent)
        except BaseException:
            parent.join()  # nothing writes to MLflow while the error unwinds (a new study is removed)
            raise
        parent()  # its error, if it failed and no trial started to raise it
        elapsed = time.monotonic() - t0
        done = finished_count(optuna_study)
        budget_spent = s.time_budget_s > 0 and elapsed >= s.time_budget_s
        if done < s.n_trials and not budget_spent:
            tracker.finish(self.manifest.parent_run_id, "KILLED")
            self.paths.snapshot_storage(self.manifest.storage)
            console.print_interrupted(s.name, done, s.n_trials, self.manifest.runs_dir if self._custom_runs_dir() else None)
            return Outcome("interrupted", *counts(optuna_study), [], None, self.manifest.parent_run_id)
        reason = ("stopped by the study's time budget" if budget_spent else
                  "the search ended while it was RUNNING (a bug: please report it)")
        fail_running(optuna_study, self.manifest.storage, reason, expected=budget_spent)
        study_mlflow.finish_done_runs(self, optuna_study, tracker)  # a driver killed between Optuna and MLflow
        tracker.close_trial_runs(self.manifest.parent_run_id, "KILLED", reason)
        study_mlflow.record_unstarted(self, optuna_study, tracker)
        if self.final_eval:
            self.final_evaluation(optuna_study, tracker, cpus, gpus)
            if s.baselines is not None:  # study.baselines: LWM at the front's sizes (study.search.front.baselines)
                from study.search.front.baselines import run_baselines

                run_baselines(self, optuna_study, tracker, cpus, gpus)
        return self.finish(optuna_study, tracker)

    def _search(self, optuna_study: Any, remaining: int, cpus: float, gpus: float, tracker: Any, dense: Any,
                parent: Any) -> None:
        from study.search.running.warmup import wait_report

        self._tuner(optuna_study, remaining, cpus, gpus, tracker, dense, parent).fit()
        wait_report()  # the report's imports, started when the last trials ran (study.search.running.warmup)
        if not dense.poll():  # the search ended before the dense model (Ctrl-C, time budget): no trial ran
            dense.cancel()
            return
        try:
            dense.check()  # a failed pretraining stopped the search: its own error
        except BaseException:
            self.pretraining_failed = True
            raise

    def final_evaluation(self, optuna_study: Any, tracker: Any, cpus: float, gpus: float) -> int:
        """The front's test-split evaluation (study.search.front.evaluate). Returns the trials evaluated."""
        done = evaluate_front(self, optuna_study, tracker, cpus, gpus)
        self.paths.push_tree("trials", names=[CONFIRM_FILE, SUITE_FINAL_FILE])
        return done

    def _custom_runs_dir(self) -> bool:
        return self.paths.remote or Path(self.manifest.runs_dir).resolve() != Path("runs").resolve()

    def _tuner(self, optuna_study: Any, remaining: int, cpus: float, gpus: float, tracker: Any, dense: Any,
               parent: Any) -> Any:
        """A new Tuner, for a run and a resume alike: the searcher reads the Optuna storage (see the module
        docstring). Tune's folder of an earlier run is scratch: it is removed, never read."""
        from ray import tune

        # Epoch reports carry no objective on purpose (a partial value must never reach Optuna as final);
        # Tune's strict check would reject them. StudySearch fails any trial whose last report lacks one.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        # Tune's experiment snapshot (for `tune ls`, never for resume), at most every 10 s: each costs the
        # driver CPU that the trials share on a small machine.
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "10"
        # Tune's TensorBoard logger (an import and an event file per result); its JSON and CSV loggers stay
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        progress_table.use_table_output()  # Tune's table with params_kept and the searched parameters
        if self.paths.experiment_exists():
            log.info("replacing Tune's folder of an earlier run, %s (scratch)", self.paths.experiment_location)
            self.paths.remove_experiment()
        s = self.space.study
        rungs = self.rung_scheduler(optuna_study)
        reasons = rungs.reasons if rungs is not None else None
        return tune.Tuner(
            self.trainable(cpus, gpus, dense),
            tune_config=tune.TuneConfig(search_alg=self.searcher(reasons), num_samples=remaining, scheduler=rungs,
                                        max_concurrent_trials=s.max_concurrent,
                                        time_budget_s=s.time_budget_s or None,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname,
                                        reuse_actors=True),  # no new process + torch import per trial
            run_config=tune.RunConfig(
                name=s.name, storage_path=self.paths.tune_storage,
                failure_config=tune.FailureConfig(max_failures=s.max_failures),  # a dead worker's trial: again
                callbacks=study_mlflow.callbacks(self, tracker, parent, reasons), stop=dense.guard(),
                progress_reporter=progress_table.reporter(self.space), verbose=progress_table.VERBOSE),
        )

    def finish(self, optuna_study: Any, tracker: Any | None = None, report_tracker: Any | None = None) -> Outcome:
        from analysis import pareto

        s = self.space.study
        if self.paths.remote:  # what the table and the report read (not the models)
            self.paths.pull_tree("trials", skip=["model.pt", TRIAL_CHECKPOINT_FILE])
            self.paths.pull_tree("pretrained")
            self.paths.pull("baselines.json")
        rows = pareto.front_rows(optuna_study, s.metrics)
        suites, attacks = add_test_columns(self, rows)
        writable = tracker is not None or _writable(self.paths.root)
        if not writable:
            log.warning("the study folder %s is read-only: pareto.csv and the report are not rewritten", self.paths.root)
        csv = pareto.write_csv(rows, self.paths.pareto) if writable else None
        complete, failed = counts(optuna_study)
        hv = pareto.study_hypervolume(optuna_study)
        # The terminal gets test clean/robust (the attack named above the table), the objectives' suite test
        # figures, AutoAttack and suspect; the CSV gets them all, test_attack included.
        from study.search.front.front_files import terminal_column

        shown = [{k: v for k, v in r.items() if terminal_column(k, s.metrics, r)} for r in rows]
        console.print_front(s.name, shown, self.space.keys, complete, failed, hv, csv, attacks)
        if suites:
            console.print_final_checks(suites, s.robustness)
        if tracker is not None:
            run = self.manifest.parent_run_id
            tracker.log_summary(run, {"trials_complete": complete, "trials_failed": failed,  # when they changed
                                      "pareto_size": len(rows), "hypervolume": hv})
            tracker.log_file(run, csv)
        if writable:
            self.write_report(optuna_study, tracker if tracker is not None else report_tracker)
        if writable and self.paths.remote:  # what the driver wrote goes to the bucket
            self.paths.push("pareto.csv", "study.json", "space.yaml", "baselines.json")
            self.paths.push_tree("trials", names=[CONFIRM_FILE, SUITE_FINAL_FILE])
            self.paths.push_tree("report")
        if tracker is not None:
            tracker.finish(self.manifest.parent_run_id, "FINISHED")
            self.paths.snapshot_storage(self.manifest.storage)
        viewer = tracker if tracker is not None else report_tracker
        try:
            experiment_id = viewer.experiment_id if viewer is not None else None
        except Exception:  # noqa: BLE001 - a link is a courtesy
            experiment_id = None
        console.print_viewers(self.paths, self.manifest, s.metrics, experiment_id)
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


# ---------------------------------------------------------------------------------------------------
# Entry points for study.cli and tests.


def run_study(space: SearchSpace, *, runs_dir: str | Path = "runs", tracking_uri: str | None = None,
              storage: str | None = None, fresh: bool = False, run_trial: Callable | None = None,
              pretrain: Callable | None = None, address: str | None = None, num_cpus: int | None = None,
              final_eval: bool = True) -> Outcome:
    """Start a study from a validated search space (refuses to overwrite one unless `fresh`).

    Everything that can be checked is checked before anything is created (study.search.running.preflight); a
    failure after creation, before any trial ran, removes what this invocation created."""
    from study.search.folder.lock import StudyLock
    from study.search.recording.tracking import default_tracking_uri
    from study.search.running import preflight

    name = space.study.name
    preflight.check_runs_dir(runs_dir)
    paths = study_paths(runs_dir, name)
    url = storage or space.study.storage or paths.default_storage
    uri = tracking_uri or default_tracking_uri(runs_dir)
    lock = StudyLock(paths.root, paths.store)
    lock.refuse_if_held()  # a live driver: refused before anything, --fresh included
    if not fresh and (_has_manifest(paths) or paths.experiment_exists()):
        raise ConfigError("study.name", f"a study named {name!r} already exists in {paths.location()}; "
                          f"continue it with `study resume {name}`, or start over with --fresh", space.path)
    startup.check(space, url, uri, address, num_cpus)
    if not fresh and (url != paths.default_storage or sqlite_file(url).exists()):
        refuse_existing(url, name, space.path)
    early = startup.EarlyStart(space, paths, pretrain, address, num_cpus, uri)
    try:
        startup.start_ray_checked(space, address, num_cpus)
        existed = paths.store.exists() if paths.remote else paths.root.exists()
        lock.acquire()
    except BaseException:
        early.cancel()
        raise
    early.checked()  # the MLflow store may be created now
    try:
        if fresh:
            wipe_study(paths, url, uri, runs=False)  # the MLflow runs: in execute, while the dense model trains
        manifest = Manifest(name=name, space_file=str(Path(space.path).resolve()), storage=url,
                            tracking_uri=uri, runs_dir=paths.runs or str(Path(runs_dir).resolve()))
        header = f"# the validated search space of study {name!r}, from {space.path}\n"
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.space.write_text(header + yaml.safe_dump(space.raw, sort_keys=False))
        paths.push("space.yaml")
        study = Study(space, paths, manifest, run_trial, pretrain, final_eval, early.dense)
        study.wipe_runs = fresh
        study.save_manifest()
        try:
            return study.execute(resume=False)
        except Exception:
            _undo_creation(paths, url, uri, existed, before_trials=study.pretraining_failed)
            raise
    finally:
        early.cancel()  # stops a pretraining still running after an error or Ctrl-C
        lock.release()


def _has_manifest(paths: StudyPaths) -> bool:
    return paths.store.is_file("study.json") if paths.remote else paths.manifest.exists()




def _undo_creation(paths: StudyPaths, storage_url: str, tracking_uri: str, existed: bool,
                   before_trials: bool = False) -> None:
    """A study that failed before its first trial ran: remove what this invocation created (its Optuna
    study, its MLflow runs, its folder), so that the same command can simply be run again. `before_trials`:
    known to have failed before any trial trained (its pretraining failed while the trials waited for it)."""
    try:
        study = load_optuna_study(storage_url, paths.name)
        if not before_trials and (study.get_trials(deepcopy=False) or paths.experiment.exists()):
            log.warning("study %s failed after its search started; `study resume %s` continues it", paths.name,
                        paths.name)
            return
    except Exception:  # noqa: BLE001 - no Optuna study yet
        pass
    try:
        wipe_study(paths, storage_url, tracking_uri)
    except Exception as e:  # noqa: BLE001 - the original error matters more
        log.warning("could not clean up the failed study %s: %s", paths.name, e)
    if not existed:
        shutil.rmtree(paths.root, ignore_errors=True)
        if paths.remote:
            paths.store.delete_tree()


def resume_study(name: str, *, runs_dir: str | Path = "runs", run_trial: Callable | None = None,
                 pretrain: Callable | None = None, address: str | None = None, num_cpus: int | None = None,
                 final_eval: bool = True) -> Outcome:
    """Continue a study from its Optuna storage and trial folders (a storage that is missing, empty or holds
    no such study is refused: never a silent new study)."""
    from study.search.folder.lock import StudyLock

    paths, manifest, space = _open(name, runs_dir)
    paths.check_storage_here(manifest.storage)
    lock = StudyLock(paths.root, paths.store)
    lock.refuse_if_held()
    check_resumable(manifest.storage, name, _trial_numbers(paths))
    damaged = study_mlflow.store_problem(manifest.tracking_uri)
    if damaged:  # the trials' records go there: refused before anything runs
        raise UserError(f"study {name!r}: {damaged}; restore it (or move it aside: a new store starts empty, "
                        f"without the study's earlier runs)")
    startup.check(space, manifest.storage, manifest.tracking_uri, address, num_cpus)
    early = startup.EarlyStart(space, paths, pretrain, address, num_cpus, manifest.tracking_uri,
                               trials_left=_trials_left(manifest.storage, name, space.study.n_trials))
    try:
        startup.start_ray_checked(space, address, num_cpus)
        with lock.acquire():
            early.checked()
            return Study(space, paths, manifest, run_trial, pretrain, final_eval, early.dense).execute(resume=True)
    finally:
        early.cancel()


def _trial_numbers(paths: StudyPaths) -> list[int]:
    """The numbers of the study folder's trials/<number>/ folders (in the bucket for an object-store study)."""
    names = paths.store.list_dirs("trials") if paths.remote else \
        [p.name for p in paths.trials.iterdir() if p.is_dir()] if paths.trials.is_dir() else []
    return [int(n) for n in names if n.isdigit()]


def _trials_left(storage: str, name: str, n_trials: int) -> bool:
    """Whether a resumed study has Optuna trials still to finish; a storage not readable yet counts as yes."""
    try:
        return finished_count(load_optuna_study(storage, name)) < n_trials
    except Exception:  # noqa: BLE001 - execute() opens it and reports what is wrong
        return True


def report_study(name: str, *, runs_dir: str | Path = "runs", within_points: float = 1.0) -> Outcome:
    """Reprint the front and redraw the report of a finished or running study (the report's files are
    logged to the parent run; the run's status is left as it is)."""
    paths, manifest, space = _open(name, runs_dir)
    url = paths.readable_storage(manifest.storage)
    check_resumable(url, name, _trial_numbers(paths), consequence="there is no study to report")
    study = load_optuna_study(url, name)
    s = Study(space, paths, manifest)
    s.within_points = within_points
    elsewhere = paths.remote and manifest.tracking_uri.startswith("sqlite:///") \
        and not sqlite_file(manifest.tracking_uri).is_file()
    if elsewhere:  # an object-store study's local MLflow store is on the machine that ran it
        log.warning("the study's MLflow store %s is not on this machine: the report is not logged to MLflow",
                    manifest.tracking_uri)
    damaged = None if elsewhere else study_mlflow.store_problem(manifest.tracking_uri)
    if damaged:
        log.warning("%s: the report is not logged to MLflow", damaged)
    return s.finish(study, report_tracker=s.tracker() if _writable(paths.root) and not (elsewhere or damaged)
                    else None)


def _writable(folder: Path) -> bool:
    """Whether files can be written in `folder` (a read-only copy or mount of a study is still reported)."""
    import tempfile

    if not os.access(folder, os.W_OK):
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            return True
    except OSError:
        return False


def _open(name: str, runs_dir: str | Path) -> tuple[StudyPaths, Manifest, SearchSpace]:
    """A study's paths, manifest and space (an object-store study's are fetched into its mirror first)."""
    from study.search.running import preflight

    preflight.check_runs_dir(runs_dir, write=False)
    paths = study_paths(runs_dir, name)
    if paths.remote:
        paths.pull("study.json", "space.yaml")
        if not paths.store.is_file("study.json"):
            known = paths.studies_beside()
            raise ConfigError("", f"no study named {name!r} in {paths.runs}; studies there: {', '.join(known) or '(none)'}")
    elif not paths.manifest.is_file():
        known = sorted(p.parent.name for p in Path(runs_dir).glob("*/study.json"))
        missing = f" ({paths.manifest} does not exist)" if paths.root.is_dir() else ""
        raise ConfigError("", f"no study named {name!r} in {Path(runs_dir).resolve()}{missing}; "
                          f"studies there: {', '.join(known) or '(none)'}")
    manifest = Manifest.load(paths.manifest)
    _check_manifest(paths, manifest)
    return paths, manifest, _study_space(paths)


def _check_manifest(paths: StudyPaths, manifest: Manifest) -> None:
    """A manifest is followed only to this study's own storage: one naming another study, or the Optuna file
    of another study folder, is refused (a resume would write into that study)."""
    from study.search.optimize.optuna_search import storage_file

    if manifest.name != paths.name:
        raise UserError(f"{paths.manifest}: the manifest of study {manifest.name!r}, not of {paths.name!r}; restore "
                        f"this study's own study.json")
    own = storage_file(manifest.storage)
    if own is None or paths.remote:
        return
    folder = own.resolve().parent
    if folder != paths.root.resolve() and (folder / "study.json").is_file():
        raise UserError(f"{paths.manifest}: its \"storage\" {manifest.storage} is the Optuna storage of another "
                        f"study folder, {folder}; refused, not followed: restore this study's own "
                        f"(\"storage\": \"optuna.db\")")


def _study_space(paths: StudyPaths) -> SearchSpace:
    """The study's validated search space (space.yaml): a missing or damaged one is refused in one line."""

    fix = "restore it from the study's search-space file (study.json's \"space_file\")"
    if not paths.space.is_file():
        raise UserError(f"{paths.space} does not exist: the study's search space; {fix}")
    try:
        return load_space(paths.space)
    except ConfigError as e:
        raise UserError(f"{e}; {fix}" if str(paths.space) in str(e) else f"{paths.space}: {e}; {fix}") from None
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: UnicodeDecodeError among others
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{paths.space}: not a readable search space ({first}); {fix}") from None


def wipe_study(paths: StudyPaths, storage_url: str, tracking_uri: str, runs: bool = True) -> None:
    """--fresh: forget a study (its folder, its Optuna study, and with `runs` its MLflow runs)."""
    import optuna

    name = paths.name
    new_file = storage_url.startswith("sqlite:///") and not sqlite_file(storage_url).exists()
    try:
        if not new_file:  # opening a sqlite file that is not there creates it (1 s of schema) to find nothing
            optuna.delete_study(study_name=name, storage=open_storage(storage_url))
    except KeyError:
        pass
    if runs:
        from study.search.recording.tracking import Tracker

        Tracker(tracking_uri, name).delete_study_runs(name)
    for sub in (paths.tune_dir, paths.trials):
        shutil.rmtree(sub, ignore_errors=True)
    for f in (paths.manifest, paths.space, paths.pareto):
        f.unlink(missing_ok=True)
    if paths.remote:
        for sub in ("tune", "trials", "report"):
            paths.store.delete_tree(sub)
        for f in ("study.json", "space.yaml", "pareto.csv", STORAGE_SNAPSHOT):
            paths.store.delete(f)
