"""What `study run` and `study resume` do before their Study exists: the checks that need no Ray, then
(for a one-machine CPU study) the dense model's pretraining in a process spawned by the driver and MLflow's
import in a thread (study.search.running.dense, study.search.running.warmup), then Ray, started or joined, and
the checks that need it. Ray's start-up (3-5 s on a 2-core CPU) thus overlaps the pretraining instead of preceding it.

Nothing of the study is created before every check has passed: the MLflow store opens only after
`EarlyStart.checked()`, and a refused command cancels the pretraining. One thing may stay: a pretraining that
ended before a later check refused the command (the resource check after Ray's start, the lock) has written
the dense model to the cache, keyed by its config, where the next study with that config finds it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from study.search.folder.layout import StudyPaths
from study.search.optimize.space import SearchSpace
from study.search.running.ray_cluster import NO_GPU_NOTICE, joins_cluster, resolve_gpus, start_ray


def fixed_config(space: SearchSpace, paths: StudyPaths) -> dict[str, str]:
    """The trial config keys a study fixes: its name, the dense-model cache (the study's pretrained/ unless
    the space names one), the trials' output folder, and the data folder as an absolute path: Tune runs each
    trial in a working directory of its own, where a relative `data.root` (the default `data`) names nothing."""
    base = space.base_config()
    own_cache = paths.location("pretrained") if paths.remote else str(paths.pretrained)
    fixed = {"name": space.study.name,
             "cache_dir": str(Path(base.cache_dir).resolve()) if "cache_dir" in space.trial else own_cache,
             "output_dir": paths.location("trials")}
    if "://" not in base.data.root:
        fixed["data.root"] = str(Path(base.data.root).expanduser().resolve())
    return fixed


def check(space: SearchSpace, storage: str, tracking_uri: str, address: str | None, num_cpus: int | None) -> None:
    """Checks before anything is created or started (one line each, study.search.running.preflight)."""
    from study.search.running import preflight

    preflight.check_num_cpus(num_cpus)
    preflight.check_address(address)
    preflight.check_storage(storage)
    preflight.check_tracking(tracking_uri)
    preflight.check_data(space)


def start_ray_checked(space: SearchSpace, address: str | None, num_cpus: int | None) -> None:
    """Ray (joined or started), and a trial's resources checked against it (on a joined cluster: asked of its
    autoscaler, study.search.running.preflight.check_resources). `gpus_per_trial: auto` counts the GPUs present now: on
    a joined cluster with none (an autoscaling one whose GPU nodes start on demand) a line says so."""
    from study.search.running import preflight

    start_ray(address, num_cpus)
    s = space.study
    joined = joins_cluster(address)
    gpus = resolve_gpus(s.gpus_per_trial)
    if joined and s.gpus_per_trial == "auto" and gpus == 0:
        print(NO_GPU_NOTICE, flush=True)
    preflight.check_resources(s.cpus_per_trial, gpus, joined=joined, wait_s=s.autoscaler_wait_s)


class EarlyStart:
    """Started before Ray: the pretraining of a one-machine CPU study (`dense`, a dense.Pretraining; None
    elsewhere: Study.execute starts it on Ray) and MLflow's import. The process is spawned first, before the
    MLflow import thread starts."""

    def __init__(self, space: SearchSpace, paths: StudyPaths, pretrain: Callable | None, address: str | None,
                 num_cpus: int | None, tracking_uri: str, trials_left: bool = True):
        from study.search.running import dense, warmup
        from study.search.running.trainable import pretrain_task

        s = space.study
        # trials_left False: a resume with every Optuna trial finished (it ends the study: the front, the
        # report). A trial Tune still reruns then gets its dense model from Study.execute, as on a cluster.
        local = trials_left and (num_cpus is None or num_cpus >= s.cpus_per_trial) and dense.local_cpu_study(
            address, s.gpus_per_trial, s.cpus_per_trial)
        self.dense: Any = (dense.Pretraining(space.trial_config({}, fixed_config(space, paths)), s.cpus_per_trial, 0.0,
                                             pretrain, pretrain_task, local=True) if local else None)
        self.tracking_uri = tracking_uri
        warmup.start_mlflow(tracking_uri)

    def checked(self) -> None:
        """Every check passed: the MLflow warm-up may open (create) its store."""
        from study.search.running import warmup

        warmup.open_mlflow(self.tracking_uri)

    def cancel(self) -> None:
        """Stop what is still running (a no-op for what has ended): after a refusal, an error or Ctrl-C."""
        from study.search.running import warmup

        if self.dense is not None:
            self.dense.cancel()
        warmup.cancel_mlflow(self.tracking_uri)
