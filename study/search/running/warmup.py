"""Work the study's driver does ahead of time, in threads, so that it is done when it is needed.

- MLflow: importing mlflow and opening a sqlite store cost the driver 2-4 s of Python on a 2-core CPU (a new
  store file: its schema migrations, 2.6 s more). `start_mlflow(uri)` imports mlflow in a thread while Ray
  starts (its processes, not the driver's Python, do that work) and opens the store once `open_mlflow(uri)`
  says the command's checks passed; `Tracker.client` calls `wait_mlflow(uri)` before it opens the store
  itself, so two threads never create one sqlite schema at once. A warm-up that fails is
  silent: the real call raises the same error where it is handled.
- The study's MLflow parent run: `ParentRun` runs what opens it (--fresh's deletion of the name's old runs,
  the experiment's description, the run itself: 1-3 s of sqlite and Python) in a thread while Tune starts
  the trials' workers; the MLflow callback calls it, and so waits for it, when the first trial starts.
- The report: `ReportPreload`, a Tune callback, imports what the report draws with (analysis.plots.preload)
  once a trial ends and no trial is left to start, when a core is idle rather than taken from a trial; the
  driver joins it (`wait_report`) as soon as the search ends.

Two threads must never import the same package for the first time at once (a package with import cycles
can hand one of them a half-made module): the main thread imports SHARED_IMPORTS before the MLflow thread
starts, and joins the report thread before it imports anything more.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from ray.tune import Callback

from study.search.running import quiet

_threads: dict[str, tuple[threading.Thread, threading.Event, dict]] = {}
_report: list[threading.Thread] = []
# Imported by the main thread before the warm-up starts: packages that both threads import next (Optuna's
# storage and MLflow's) and whose internal import cycles make a concurrent first import see a half-made
# module (seen: "module 'sqlalchemy.util' has no attribute ...").
SHARED_IMPORTS = ("sqlalchemy", "sqlalchemy.orm", "alembic", "alembic.migration", "alembic.script")


def _open(uri: str, go: threading.Event, state: dict) -> None:
    try:
        try:
            from mlflow.tracking import MlflowClient
        finally:
            state["imported"].set()
        go.wait()
        if not state.get("cancelled"):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # opens (creates) the store: cached per URI
    except Exception:  # noqa: BLE001 - reported by the real call
        pass


def start_mlflow(uri: str) -> None:
    """Import mlflow now; open (maybe create) the store for `uri` once `open_mlflow(uri)` says the study's
    checks have passed (nothing is created for a refused command)."""
    if uri in _threads:
        return
    import importlib

    quiet.quiet_loggers()  # before alembic's first import: its "setup plugin" lines (study.search.running.quiet)
    for name in SHARED_IMPORTS:
        importlib.import_module(name)
    go, state = threading.Event(), {"imported": threading.Event()}
    thread = threading.Thread(target=_open, args=(uri, go, state), name="mlflow-warm-up", daemon=True)
    _threads[uri] = (thread, go, state)
    thread.start()


def open_mlflow(uri: str) -> None:
    if uri in _threads:
        _threads[uri][1].set()


def cancel_mlflow(uri: str) -> None:
    """The command was refused: the warm-up opens nothing."""
    entry = _threads.pop(uri, None)
    if entry is not None:
        entry[2]["cancelled"] = True
        entry[1].set()


def wait_mlflow(uri: str) -> None:
    entry = _threads.pop(uri, None)
    if entry is not None:
        entry[1].set()
        entry[0].join()


def import_mlflow() -> None:
    """mlflow imported, by the warm-up thread (waited for) or here: before a second thread may use it."""
    for _, _, state in list(_threads.values()):
        state["imported"].wait()
    import mlflow.tracking  # noqa: F401


def wait_report() -> None:
    """Join the report's import thread: the main thread must not import the same packages concurrently."""
    while _report:
        _report.pop().join()


class ReportPreload(Callback):
    """Imports what the study's report draws with (analysis.plots.preload, about 2 s of CPU) in a driver
    thread once a trial ends and no trial is left to start: a core is idle then, not taken from a trial."""

    def __init__(self, n_trials: int):
        self.n_trials = n_trials
        self.started = False

    def _maybe_start(self, trials: list) -> None:
        if self.started or len(trials) < self.n_trials:
            return
        from analysis.plots import preload

        self.started = True
        thread = threading.Thread(target=preload, name="report-imports", daemon=True)
        _report.append(thread)
        thread.start()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._maybe_start(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._maybe_start(trials)

    def __reduce__(self):  # Tune pickles its callbacks with the experiment; a resumed study makes a new one
        return (ReportPreload, (self.n_trials,))


class ParentRun:
    """`open()`, the study's MLflow parent run id, computed in a thread from now on (mlflow imported first, in
    the caller's thread or by the warm-up); calling this waits for it and raises what `open` raised.
    Pickled (Tune pickles its callbacks with the Tuner, into its scratch folder) as the id if it is known by
    then, else as unknown: nothing reads that pickle back, a resumed study makes its callbacks anew."""

    def __init__(self, open: Callable[[], str]):
        import_mlflow()
        self._result: dict[str, Any] = {}
        self._thread: threading.Thread | None = threading.Thread(target=self._open, args=(open,),
                                                                 name="mlflow-parent-run", daemon=True)
        self._thread.start()

    def _open(self, open: Callable[[], str]) -> None:
        try:
            self._result["run_id"] = open()
        except BaseException as e:  # noqa: BLE001 - raised by __call__ in the caller's thread
            self._result["error"] = e

    def join(self) -> None:
        """Wait for it, raising nothing."""
        if self._thread is not None:
            self._thread.join()

    def __call__(self) -> str:
        self.join()
        if "error" in self._result:
            raise self._result["error"]
        if "run_id" not in self._result:
            raise RuntimeError("the study's MLflow parent run is unknown here (a callback unpickled)")
        return self._result["run_id"]

    def __getstate__(self) -> dict[str, Any]:
        done = self._thread is None or not self._thread.is_alive()
        return {"_result": {"run_id": self._result["run_id"]} if done and "run_id" in self._result else {},
                "_thread": None}
