"""Optuna's side of a study: the storage, the study, and the checks a resume makes of them.

The Optuna storage is, with the trial folders, the study's only state; the Tune searcher on it is
study.search.optimize.searcher.StudySearch.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from study.errors import ConfigError
from study.search.optimize.space import SearchSpace

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


def set_user_attrs(storage: Any, study_name: str, number: int, attrs: dict[str, Any]) -> None:
    """User attributes of Optuna trial `number` (before it is told), through the storage's public API."""
    study_id = storage.get_study_id_from_name(study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)


def fail_running(study: Any, storage_url: str, reason: str, expected: bool = False) -> int:
    """At the end of a search no Optuna trial may stay RUNNING: fail the rest, loudly unless `expected`
    (Tune's time budget stops trials without telling the searcher)."""
    from optuna.trial import TrialState

    from study.keys import FAIL_KEY

    stuck = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    for t in stuck:
        log.log(logging.WARNING if expected else logging.ERROR,
                "Optuna trial %d was still %s at the end of the study (%s); recording it as FAIL",
                t.number, t.state.name, reason)
        set_user_attrs(_cached_storage(storage_url), study.study_name, t.number, {FAIL_KEY: reason})
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
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


def _hide_password(url: str) -> str:
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def storage_file(url: str) -> Path | None:
    """The file of a sqlite or journal storage URL, None for a database server."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    path = url[len("journal:"):] if url.startswith("journal:") else url
    if url.startswith("journal:") or ("://" not in url and path.endswith((".log", ".journal"))):
        return Path("/" + path.lstrip("/") if path.startswith("//") else path)
    return None


RESUMING = "resuming would start a new study"


def check_resumable(url: str, name: str, trial_numbers: list[int], consequence: str = RESUMING) -> None:
    """`study resume` continues the study in its Optuna storage and never starts a new one (nor does `study
    report` invent one): a storage that is missing or empty, not an Optuna database, or holds no study of this
    name, or fewer trials than the study folder has (`trial_numbers`: the numbers of its trials/<number>/
    folders), is refused in one line, before anything opens it for writing."""
    import optuna

    from study.errors import UserError

    shown = _hide_password(url)
    fix = ("restore it (or point the manifest's \"storage\" at the study's own), or start over with "
           "`study run SPACE --fresh`")
    path = storage_file(url)
    if path is not None and (not path.is_file() or path.stat().st_size == 0):
        what = "does not exist" if not path.is_file() else "is empty"
        raise UserError(f"study {name!r}: its Optuna storage {shown} {what}; {consequence}: {fix}")
    if url.startswith("sqlite:///") and path is not None:
        _check_sqlite(path, f"study {name!r}: its Optuna storage {shown}", fix)
    try:
        storage = open_storage(url)
        names = optuna.get_all_study_names(storage)
        trials = (len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
                  if name in names else 0)
    except Exception as e:  # noqa: BLE001 - a damaged file, a database that refuses us
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"study {name!r}: its Optuna storage {shown} cannot be read ({first}): {fix}") from None
    if name not in names:
        held = ", ".join(sorted(names)) or "none"
        raise UserError(f"study {name!r}: its Optuna storage {shown} holds no study of that name (studies there: "
                        f"{held}); {consequence}: {fix}")
    beyond = sorted(n for n in trial_numbers if n >= trials)
    if beyond:
        raise UserError(f"study {name!r}: its Optuna storage {shown} holds {trials} trials, but the study folder has "
                        f"trials/{beyond[0]:04d}/: not this study's storage? {fix}")


OPTUNA_TABLES = {"studies", "trials", "version_info"}


def probe_sqlite(path: Path) -> tuple[set[str], str]:
    """(the tables, quick_check's verdict) of an existing sqlite file, read without the schema changes Optuna or
    MLflow would make on opening it. Not opened read-only: the journal a killed writer left must be rolled back
    (sqlite does it on the first read), which a read-only connection refuses. Raises sqlite3.Error."""
    import sqlite3

    con = sqlite3.connect(str(path), timeout=60)
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        check = con.execute("PRAGMA quick_check(1)").fetchone()
    finally:
        con.close()
    return tables, check[0] if check else "?"


def _check_sqlite(path: Path, what: str, fix: str) -> None:
    """A sqlite file that Optuna can use as it is: opening a damaged file or another database (MLflow's, say)
    through Optuna would add its tables to it."""
    import sqlite3

    from study.errors import UserError

    try:
        tables, check = probe_sqlite(path)
    except sqlite3.Error as e:
        raise UserError(f"{what} is not a readable sqlite database ({e}): {fix}") from None
    if check != "ok":
        raise UserError(f"{what} is damaged (sqlite: {check}): {fix}")
    if not OPTUNA_TABLES <= tables:
        shown = ", ".join(sorted(tables)[:5]) or "none"
        raise UserError(f"{what} is not an Optuna storage (its tables: {shown}{', ...' if len(tables) > 5 else ''})"
                        f": {fix}")


def counts(study: Any) -> tuple[int, int]:
    """(COMPLETE, FAIL) trials of an Optuna study."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return (sum(t.state == TrialState.COMPLETE for t in trials), sum(t.state == TrialState.FAIL for t in trials))
