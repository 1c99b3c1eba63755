"""Optuna's side of a study: the storage, the study, and `StudySearch`, the Tune searcher.

`StudySearch` is Ray Tune's OptunaSearch made safe for resume: it never leaves an Optuna trial RUNNING
(every Tune trial ends COMPLETE with finite objectives or FAIL with a `fail_reason`), an Optuna trial
asked after Tune's last experiment checkpoint (the driver died in between) is adopted by the next trial
Tune creates instead of a new one being asked, and once the Optuna study holds n_trials trials it asks no
more (a trial created and finished after that checkpoint is unknown to the restored Tune, which would
otherwise create one more). It is built on first use (importing Ray Tune costs
seconds) and pickled by reference as study.search.optuna_search.StudySearch.
"""
from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

from study.errors import ConfigError
from study.keys import NODE_KEY, NUMBER_KEY
from study.search.space import SearchSpace

log = logging.getLogger("study.search")


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
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}}
    return _open_rdb(url, kwargs)


def _open_rdb(url: str, kwargs: dict[str, Any], tries: int = 5) -> Any:
    """RDBStorage, retried when another process creates the same new database at the same moment (both
    stamp the schema version: one of them gets a UNIQUE-constraint IntegrityError; the schema is then there)."""
    import time

    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (IntegrityError, OperationalError):
            if attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


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


def define_by_run(space: SearchSpace, trial: Any) -> dict[str, Any]:
    """Optuna's define-by-run space of a study: the searched values plus the trial's number (NUMBER_KEY)."""
    values = space.suggest(trial)
    return {**values, NUMBER_KEY: trial.number}


@functools.lru_cache(maxsize=1)
def searcher_class() -> type:
    """StudySearch, built on first use (importing Ray Tune costs seconds; `study trial` needs none of it)."""
    from optuna.trial import Trial, TrialState
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    from study.search.tracking import numeric_metrics

    _ASKED = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)

    class StudySearch(OptunaSearch):
        """OptunaSearch that never leaves a trial RUNNING, adopts orphans on resume and never asks Optuna for
        more than `n_trials` trials."""

        def __init__(self, *args: Any, n_trials: int | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.n_trials = n_trials

        def suggest(self, trial_id: str) -> dict | str | None:
            if self._ot_study is not None and trial_id not in self._ot_trials:
                orphan = self._orphan()
                if orphan is not None:
                    log.warning("resuming Optuna trial %d (asked before the driver stopped, never run)", orphan.number)
                    self._ot_trials[trial_id] = Trial(self._ot_study, orphan._trial_id)
                elif self._all_asked():
                    return Searcher.FINISHED
            return super().suggest(trial_id)

        def _all_asked(self) -> bool:
            """The study holds its n_trials Optuna trials already. Tune restored from a snapshot older than the
            driver's death counts fewer: a trial that was created and finished after the snapshot is COMPLETE
            in Optuna and unknown to Tune, which would create one trial too many."""
            n = self.__dict__.get("n_trials")  # None in a searcher pickled before the cap existed
            if n is None:
                return False
            asked = len(self._ot_study.get_trials(deepcopy=False, states=_ASKED))
            if asked >= n:
                log.info("the study holds its %d Optuna trials: no new trial is asked", n)
            return asked >= n

        def _orphan(self) -> Any:
            claimed = {t.number for t in self._ot_trials.values()}
            running = self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            return next((t for t in sorted(running, key=lambda t: t.number) if t.number not in claimed), None)

        def repoint(self, url: str) -> None:
            """Use the Optuna storage at `url` (the manifest's, resolved against the study folder) instead of
            the one pickled with the experiment: a copied or moved study must never write into the original.
            Kept across Tune's restore of the searcher's state (`restore`)."""
            import optuna

            self._pinned_url = url
            self._storage = open_storage(url)
            if self._ot_study is not None:
                self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                                   sampler=self._ot_study.sampler, pruner=self._ot_study.pruner)
                self._ot_trials = {k: Trial(self._ot_study, t._trial_id) for k, t in self._ot_trials.items()}

        def restore(self, checkpoint_path: str) -> None:
            """Tune's restore, which must never raise: Tune answers a searcher that fails to restore by
            restarting the experiment, which then waits forever. An unreadable state (a driver killed while
            Tune wrote it) keeps the searcher as the Tuner pickled it; either way the trials of Tune's own
            snapshot beside it are claimed (`_claim_tune_trials`) and the Optuna storage says the rest."""
            from study.search.samplers import restored

            pinned = self.__dict__.get("_pinned_url")
            try:
                super().restore(checkpoint_path)
                if self._ot_study is not None:  # the study's sampler is the searcher's (one object, pickled once)
                    shared = self._sampler is self._ot_study.sampler
                    self._ot_study.sampler = restored(self._ot_study.sampler)
                    if shared:
                        self._sampler = self._ot_study.sampler
            except Exception as e:  # noqa: BLE001 - see the docstring
                log.warning("the searcher's saved state %s is unreadable (%s: %s); resuming from Tune's trials and "
                            "the Optuna storage", checkpoint_path, type(e).__name__, e)
            if pinned:
                self.repoint(pinned)
            if self._ot_study is not None:
                self._claim_tune_trials(Path(checkpoint_path).parent)

        def _claim_tune_trials(self, folder: Path) -> None:
            """Make the searcher's trials those of Tune's newest experiment snapshot in `folder` (the two are
            saved as separate files, so a driver killed between them leaves one older than the other):
            - a Tune trial the searcher lacks is mapped to its Optuna trial (by the number in its config):
              Tune reruns it without asking; unclaimed, it would look like an orphan to `suggest` (and run
              twice) and its result would be ignored;
            - a trial the searcher knows and Tune lost, still RUNNING in Optuna, is released: the next trial
              Tune creates adopts it (`suggest`), instead of it staying RUNNING until the study fails it."""
            import json

            states = sorted(folder.glob("experiment_state-*.json"))
            if not states:  # no snapshot of Tune's to compare with: the searcher's state stands
                return
            try:
                trial_data = json.loads(states[-1].read_text())["trial_data"]
            except Exception as e:  # noqa: BLE001 - Tune, reading the same file, reports it
                log.warning("could not read Tune's snapshot %s: %s", states[-1], e)
                return
            storage, study_id = self._ot_study._storage, self._ot_study._study_id
            in_tune: set[str] = set()
            for entry in trial_data:
                try:
                    state = json.loads(entry[0])
                    trial_id, number = state["trial_id"], int(state["config"][NUMBER_KEY])
                except Exception:  # noqa: BLE001 - not a trial of this study's searcher
                    continue
                in_tune.add(trial_id)
                if trial_id in self._ot_trials:
                    continue
                try:
                    ot_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
                except KeyError:
                    continue
                log.info("Tune trial %s is Optuna trial %d (the searcher's saved state predates it)", trial_id, number)
                self._ot_trials[trial_id] = Trial(self._ot_study, ot_id)
            for trial_id in [t for t in self._ot_trials if t not in in_tune]:
                ot_trial = self._ot_trials[trial_id]
                if storage.get_trial(ot_trial._trial_id).state == TrialState.RUNNING:
                    log.info("Optuna trial %d is released for adoption (Tune's snapshot predates its trial %s)",
                             ot_trial.number, trial_id)
                    del self._ot_trials[trial_id]

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


@functools.lru_cache(maxsize=1)
def relocated_class() -> type:
    """RelocatedSearch: Tune's SearchGenerator for a restored experiment that may have moved. Tune restores
    the generator's Experiment (its storage location, where new trials write) from the pickled state of
    the first location; this one points it at the folder being resumed."""
    import copy

    from ray.tune.search.search_generator import SearchGenerator

    from study.search.store import is_remote

    class RelocatedSearch(SearchGenerator):
        def __init__(self, searcher: Any, storage_path: str, name: str):
            super().__init__(searcher)
            if is_remote(storage_path):  # Tune keeps the bucket's path without the scheme (bucket/prefix/...)
                from pyarrow import fs as pafs

                storage_path = pafs.FileSystem.from_uri(storage_path)[1]
            self._relocate_to = (Path(storage_path).as_posix(), name)

        def set_state(self, state: dict) -> None:
            super().set_state(state)
            exp = self._experiment
            if exp is not None and getattr(exp, "storage", None) is not None:
                storage = copy.copy(exp.storage)
                storage.storage_fs_path, storage.experiment_dir_name = self._relocate_to
                exp.storage = storage
                exp.spec["storage"] = storage

    RelocatedSearch.__module__, RelocatedSearch.__qualname__ = __name__, "RelocatedSearch"
    return RelocatedSearch


def __getattr__(name: str) -> Any:  # StudySearch, importable by module path (the Tuner pickles its searcher)
    if name == "StudySearch":
        return searcher_class()
    if name == "RelocatedSearch":
        return relocated_class()
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


def refuse_existing(url: str, name: str, source: str) -> None:
    """A fresh study must not silently add to an Optuna study of the same name that has trials."""
    import optuna

    for summary in optuna.get_all_study_summaries(open_storage(url), include_best_trial=False):
        if summary.study_name == name and summary.n_trials:
            raise ConfigError("study.name", f"the Optuna storage {url} already holds a study {name!r} with "
                              f"{summary.n_trials} trials; start over with --fresh or pick another name", source)


def counts(study: Any) -> tuple[int, int]:
    """(COMPLETE, FAIL) trials of an Optuna study."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return (sum(t.state == TrialState.COMPLETE for t in trials), sum(t.state == TrialState.FAIL for t in trials))
