"""The study's dense model: found in the cache, or pretrained while the driver sets up and the trials'
Ray workers start.

Pretraining is the one step every trial needs first. Awaited before Tune started, it put the driver's
set-up (Optuna and MLflow stores, the parent run), a Ray worker's start for the task and each trial
worker's start (a new process importing torch: 3-4 s on a 2-core CPU) in series with it. Now, by case:

- cached (the checkpoint for this config's pretrain_key is in the study's cache, local or in the bucket,
  or `trial.pretrained` names an existing file): nothing to do, the trials read it;
- a one-machine study without GPUs for the trials, whose driver is about to start its own local Ray
  (study.search.running.startup.EarlyStart): a child process SPAWNED by the driver (a fresh interpreter: no GIL
  shared with the driver's own set-up) trains it and writes a marker file when it is done. It starts
  before Ray does, so Ray's start-up, the MLflow and Optuna stores and the trial workers' start all overlap
  it. Never a fork: a fork of a driver that has run torch deadlocks in the child's OpenMP thread pool as
  soon as it uses more than one thread (seen: `study.cpus_per_trial: 2` on a 2-core machine hung forever);
- otherwise (a joined cluster, GPUs, Ray already up): a Ray task on the resources of one trial (CPUs
  reserved only on a cluster: on one machine every trial slot starts its worker meanwhile).

The trials get `Pretraining.handle()` (study_trainable's `dense`) and `wait_for()` it before they read
the cache. The driver follows the pretraining through `guard()`, a Tune stopper polled on every
controller step: it prints when the model is ready and stops the search at once when pretraining failed;
`Pretraining.check()` then raises the failure itself (a user mistake as its one line, not Ray's stack).
"""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

POLL_S = 0.1


def user_error(e: BaseException) -> BaseException | None:
    """The user mistake a failed Ray task raised (ConfigError, UserError, DataError), None for anything else."""
    from study.errors import ConfigError, UserError
    from study.trial.data import DataError

    if isinstance(e, (ConfigError, UserError, DataError)):
        return e
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, (ConfigError, UserError, DataError)) else None


def cached(cfg: Any) -> bool:
    """Whether the dense model of `cfg` exists already (checked by the driver, without a task)."""
    from study.search.folder.store import Store, is_remote

    if cfg.pretrained:
        return not is_remote(cfg.pretrained) and Path(cfg.pretrained).is_file()
    name = cfg.pretrain_file_name()
    if is_remote(cfg.cache_dir):
        return Store(cfg.cache_dir).is_file(name)
    return (Path(cfg.cache_dir) / name).is_file()


def location(folder: str, name: str) -> str:
    """`folder`/`name` for a local folder or an object-store URI (Path would fold s3:// into s3:/)."""
    from study.search.folder.store import Store, is_remote

    return Store(folder).url(name) if is_remote(folder) else str(Path(folder) / name)


def single_machine(cpus: float) -> bool:
    """Ray's only live node is the driver's, and it has the CPUs of a trial."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    return (len(nodes) == 1 and nodes[0].get("NodeID") == here
            and nodes[0].get("Resources", {}).get("CPU", 0) >= max(cpus, 1))


def local_cpu_study(address: str | None, gpus_setting: Any, cpus: float) -> bool:
    """Before Ray starts: will this driver start a local Ray (no address, no $RAY_ADDRESS) whose trials get
    no GPU? (Then pretraining can start at once, in a spawned process.) With Ray already up: single_machine."""
    import ray

    if ray.is_initialized():
        from study.search.running.ray_cluster import resolve_gpus

        return resolve_gpus(gpus_setting) == 0 and single_machine(cpus)
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    if gpus_setting == "auto":
        import torch

        return torch.cuda.device_count() == 0  # Ray's local GPUs are the ones CUDA reports
    return float(gpus_setting) == 0 and (os.cpu_count() or 1) >= max(cpus, 1)


def wait_for(handle: Any) -> None:
    """In a trial: block until the dense model exists (a marker file, or the task's ObjectRef in a list:
    Ray hands over a listed reference, not its value). A failed task raises here."""
    if handle is None:
        return
    if isinstance(handle, dict):
        while not os.path.exists(handle["marker"]):
            time.sleep(POLL_S)
        return
    import ray

    ray.get(list(handle))


class Pretraining:
    """The dense model of one study run: how it is obtained, its handle for the trials, its outcome.
    `local`: a one-machine CPU study before its Ray starts (local_cpu_study): a spawned process; otherwise a
    Ray task."""

    def __init__(self, cfg: Any, cpus: float, gpus: float, pretrain: Callable | None, task: Callable,
                 local: bool | None = None, needed: bool = True):
        self.started = time.perf_counter()
        self.ref: Any = None
        self.process: Any = None
        self.marker: Path | None = None
        self.path: str | None = None
        self.error: BaseException | None = None
        self._announced = False
        if not needed:  # no trial left to train: nothing to start or wait for (see Study.execute)
            self._announced = True
            return
        if pretrain is None and cached(cfg):
            self.path = cfg.pretrained or location(cfg.cache_dir, cfg.pretrain_file_name())
            self._announced = True
            print(f"[study] dense model found in the cache: {self.path}", flush=True)
            return
        threads = max(1, int(cpus))
        local = bool(local)
        where = "in a process spawned by the driver" if local else f"as a Ray task on {cpus:g} CPU / {gpus:g} GPU"
        print(f"[study] pretraining the dense model ({cfg.pretrain_key()}) {where}; the trials wait for it ...",
              flush=True)
        if local:
            self.marker = Path(tempfile.mkdtemp(prefix="study-dense-")) / "ready"
            self.process = _spawn(task, cfg, threads, pretrain, self.marker)
            return
        import ray

        cpus_reserved = 0 if single_machine(cpus) else cpus  # one node: every trial slot starts its worker meanwhile
        self.ref = ray.remote(num_cpus=cpus_reserved, num_gpus=gpus)(task).remote(cfg, threads, pretrain)

    def cancel(self) -> None:
        """The driver gives up (an error, Ctrl-C, the time budget): stop the pretraining process or task and
        remove the marker's folder. A model already written stays in the cache."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.ref is not None and self.path is None and self.error is None:
            import ray

            ray.cancel(self.ref, force=True)
        if self.marker is not None:
            shutil.rmtree(self.marker.parent, ignore_errors=True)

    def handle(self) -> Any:
        """What a trial waits on (wait_for), None when the model is there already."""
        if self.marker is not None:
            return {"marker": str(self.marker)}
        return [self.ref] if self.ref is not None else None

    def poll(self, timeout: float = 0) -> bool:
        """True once pretraining has ended (or there was none); records its path or its error."""
        if self.process is not None and self.path is None and self.error is None:
            if self.marker.is_file():  # written last: the model is ready, whether or not the process has exited
                self.path = self.marker.read_text()
            else:
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    return False
                self.path, self.error = _child_outcome(self.marker, self.process.returncode)
        elif self.ref is not None and self.path is None and self.error is None:
            import ray

            ready, _ = ray.wait([self.ref], timeout=timeout)
            if not ready:
                return False
            try:
                self.path = ray.get(self.ref)
            except Exception as e:  # noqa: BLE001 - reported by check()
                self.error = e
        if self.path is not None and not self._announced:
            self._announced = True
            print(f"[study] dense model ready in {time.perf_counter() - self.started:.1f}s: {self.path}", flush=True)
        return True

    def check(self) -> None:
        """Wait for pretraining and raise its failure: a user mistake as itself, anything else as raised."""
        while not self.poll(timeout=1.0):
            pass
        if self.marker is not None:
            shutil.rmtree(self.marker.parent, ignore_errors=True)
        if self.error is not None:
            raise user_error(self.error) or self.error

    def guard(self) -> Any:
        """A Tune stopper that stops the whole search as soon as pretraining has failed."""
        from ray import tune
        from ray.tune.stopper import NoopStopper

        pretraining = self

        class PretrainingGuard(tune.Stopper):
            def __call__(self, trial_id: str, result: dict) -> bool:
                return False

            def stop_all(self) -> bool:
                return pretraining.poll() and pretraining.error is not None

            def __reduce__(self):  # Tune pickles its run config (scratch, never read back)
                return (NoopStopper, ())

        return PretrainingGuard()


def _spawn(task: Callable, cfg: Any, threads: int, pretrain: Callable | None, marker: Path) -> subprocess.Popen:
    """`python -m study.search.running.dense MARKER` with the job on its stdin (cloudpickle: by value for a function
    of a script's __main__, by reference for a module's), the driver's sys.path as its PYTHONPATH. A plain
    subprocess rather than multiprocessing's spawn, which re-runs the driver's main module in the child."""
    import cloudpickle

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-m", "study.search.running.dense", str(marker)], stdin=subprocess.PIPE,
                            env=env)
    proc.stdin.write(cloudpickle.dumps((task, cfg, threads, pretrain)))
    proc.stdin.close()
    return proc


def _train_in_child(job: bytes, marker: str) -> None:
    """The spawned pretraining process: the checkpoint's path into `marker`, or the exception into
    `marker`.error (pickled; its text where it does not pickle). Dies with the driver (Linux). `job` is the
    driver's own (task, cfg, threads, pretrain), handed over in memory."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a killed driver leaves no orphan
    except Exception:  # noqa: BLE001 - not Linux: the driver's cancel() still stops it
        pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle (it cancels this process)
    try:
        import cloudpickle

        task, cfg, threads, pretrain = cloudpickle.loads(job)
        path = str(task(cfg, threads, pretrain))
    except BaseException as e:  # noqa: BLE001 - handed to the driver
        text = "".join(traceback.format_exception(e))
        try:
            blob = pickle.dumps(e)
            pickle.loads(blob)  # an exception whose __init__ takes other arguments pickles but does not load
        except Exception:  # noqa: BLE001
            blob = pickle.dumps(RuntimeError(f"pretraining failed:\n{text}"))
        Path(marker + ".error").write_bytes(blob)
        return
    tmp = marker + ".tmp"
    Path(tmp).write_text(path)
    os.replace(tmp, marker)


def _child_outcome(marker: Path, exitcode: int | None) -> tuple[str | None, BaseException | None]:
    if marker.is_file():
        return marker.read_text(), None
    error = marker.with_name(marker.name + ".error")
    if error.is_file():
        return None, pickle.loads(error.read_bytes())
    return None, RuntimeError(f"the pretraining process ended without a result (exit code {exitcode}: "
                              "killed, or out of memory?)")


if __name__ == "__main__":  # the spawned pretraining process (see _spawn)
    _train_in_child(sys.stdin.buffer.read(), sys.argv[1])
