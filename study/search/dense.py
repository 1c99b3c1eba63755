"""The study's dense model: found in the cache, or pretrained while the driver sets up and the trials'
Ray workers start.

Pretraining is the one step every trial needs first. Awaited before Tune started, it put the driver's
set-up (Optuna and MLflow stores, the parent run), a Ray worker's start for the task and each trial
worker's start (a new process importing torch: 3-4 s on a 2-core CPU) in series with it. Now, by case:

- cached (the checkpoint for this config's pretrain_key is in the study's cache, local or in the bucket,
  or `trial.pretrained` names an existing file): nothing to do, the trials read it;
- one machine without GPUs for the trials (Ray's only node is the driver's): the driver trains it in a
  thread (no Ray worker to start) and writes a marker file when it is done;
- otherwise (a cluster, or GPUs): a Ray task on the resources of one trial (CPUs reserved only on a
  cluster: on one machine every trial slot starts its worker meanwhile).

The trials get `Pretraining.handle()` (study_trainable's `dense`) and `wait_for()` it before they read
the cache. The driver follows the pretraining through `guard()`, a Tune stopper polled on every
controller step: it prints when the model is ready and stops the search at once when pretraining failed;
`Pretraining.check()` then raises the failure itself (a user mistake as its one line, not Ray's stack).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
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
    from study.search.store import Store, is_remote

    if cfg.pretrained:
        return not is_remote(cfg.pretrained) and Path(cfg.pretrained).is_file()
    name = cfg.pretrain_file_name()
    if is_remote(cfg.cache_dir):
        return Store(cfg.cache_dir).is_file(name)
    return (Path(cfg.cache_dir) / name).is_file()


def location(folder: str, name: str) -> str:
    """`folder`/`name` for a local folder or an object-store URI (Path would fold s3:// into s3:/)."""
    from study.search.store import Store, is_remote

    return Store(folder).url(name) if is_remote(folder) else str(Path(folder) / name)


def single_machine(cpus: float) -> bool:
    """Ray's only live node is the driver's, and it has the CPUs of a trial."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    return (len(nodes) == 1 and nodes[0].get("NodeID") == here
            and nodes[0].get("Resources", {}).get("CPU", 0) >= max(cpus, 1))


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
    """The dense model of one study run: how it is obtained, its handle for the trials, its outcome."""

    def __init__(self, cfg: Any, cpus: float, gpus: float, pretrain: Callable | None, task: Callable):
        self.started = time.perf_counter()
        self.ref: Any = None
        self.thread: threading.Thread | None = None
        self.marker: Path | None = None
        self.path: str | None = None
        self.error: BaseException | None = None
        self._announced = False
        if pretrain is None and cached(cfg):
            self.path = cfg.pretrained or location(cfg.cache_dir, cfg.pretrain_file_name())
            self._announced = True
            print(f"[study] dense model found in the cache: {self.path}", flush=True)
            return
        threads = max(1, int(cpus))
        local = single_machine(cpus)
        where = "in the driver" if local and gpus == 0 else f"as a Ray task on {cpus:g} CPU / {gpus:g} GPU"
        print(f"[study] pretraining the dense model ({cfg.pretrain_key()}) {where}; the trials wait for it ...",
              flush=True)
        if local and gpus == 0:
            self.marker = Path(tempfile.mkdtemp(prefix="study-dense-")) / "ready"
            self.thread = threading.Thread(target=self._train, args=(task, cfg, threads, pretrain),
                                           name="study-pretraining", daemon=True)
            self.thread.start()
            return
        import ray

        self.ref = ray.remote(num_cpus=0 if local else cpus, num_gpus=gpus)(task).remote(cfg, threads, pretrain)

    def _train(self, task: Callable, cfg: Any, threads: int, pretrain: Callable | None) -> None:
        try:
            self.path = str(task(cfg, threads, pretrain))
            self.marker.write_text(self.path)
        except BaseException as e:  # noqa: BLE001 - reported by check()
            self.error = e

    def handle(self) -> Any:
        """What a trial waits on (wait_for), None when the model is there already."""
        if self.marker is not None:
            return {"marker": str(self.marker)}
        return [self.ref] if self.ref is not None else None

    def poll(self, timeout: float = 0) -> bool:
        """True once pretraining has ended (or there was none); records its path or its error."""
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                return False
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

            def __reduce__(self):  # Tune pickles its run config; a restored study gets a new guard
                return (NoopStopper, ())

        return PretrainingGuard()
