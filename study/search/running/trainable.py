"""The Ray Tune function trainable: one trial = pipeline.run_trial on one searched config.

Tune hands it the searched values (flat dotted keys) plus `optuna_trial_number`; the fixed part of
the config comes through `tune.with_parameters`. Every epoch goes to `ray.tune.report`; the last report
carries the final metrics, every objective finite, and `final: 1`.

A trial records its own errors: whatever run_trial raises (NaN loss, OOM, a bug), and a non-finite
objective, ends the trial with a last report `{final: 1, fail_reason: "<the error>"}` (also saved as its
final.json), which the searcher tells Optuna as FAIL with that reason and MLflow records as FAILED. Tune's
retry (study.max_failures) thus only ever sees a worker process that died.

Everything a trial reports is a validation or size figure (model selection never sees the test split; a
run_trial returning test figures is refused). The test split is evaluated after the search, for the
Pareto-front trials only (study.search.front.evaluate: confirm.json beside the trial's files).

A trial's files live in `<study_dir>/trials/<optuna number>/` (on an object store, `study_dir` is the
bucket's URI and the files are written there; model.pt and result.json through a node-local scratch folder):
- checkpoint.pt: the resume state of its last checkpointed epoch (study.checkpoint_every_s), written
  atomically (a new file renamed over the old one; one PUT in a bucket) and loaded with
  `torch.load(weights_only=True)`: a trial restarted by Tune after its worker died, or continued by
  `study resume` after its driver died, starts from it. Removed when the trial ends.
- final.json: the last report, written last: a trial that had finished when the driver died reports it
  again instead of training twice.
Keyed by the Optuna number, which is the same for every attempt at the trial.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from study.keys import FAIL_KEY, NODE_KEY, NUMBER_KEY
from study.search.folder.layout import TRIAL_CHECKPOINT_FILE as CHECKPOINT_FILE
from study.search.folder.layout import TRIAL_FINAL_FILE as FINAL_FILE
from study.search.folder.layout import trial_dir
from study.search.folder.store import Store, is_remote, scratch_dir
from study.trial.config import trial_from_dict


class ObjectiveNotFinite(RuntimeError):
    """The final metrics lack an objective or hold NaN/inf: the trial counts as failed."""


def searched_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """The searched dotted keys of a Tune trial config (everything but our bookkeeping)."""
    return {k: v for k, v in config.items() if k != NUMBER_KEY}


def build_config(base: Mapping[str, Any], fixed: Mapping[str, Any], config: Mapping[str, Any]):
    number = int(config.get(NUMBER_KEY, 0))
    overrides = {**fixed, **searched_values(config), "name": f"{fixed.get('name', 'trial')}-{number:04d}"}
    return trial_from_dict(base, overrides)


def check_objectives(metrics: Mapping[str, Any], objectives: Sequence[str]) -> None:
    bad = [m for m in objectives if not isinstance(metrics.get(m), (int, float)) or not math.isfinite(metrics[m])]
    if bad:
        raise ObjectiveNotFinite(f"objective(s) {', '.join(bad)} missing or not finite: "
                                 f"{ {m: metrics.get(m) for m in bad} }")


class GpuUnusable(RuntimeError):
    """Ray gave the trial a GPU, but torch cannot use CUDA in its process."""


def check_gpu(cfg: Any, gpu_ids: Sequence[Any], cuda_available: bool) -> None:
    """A trial that holds a Ray GPU must not train on the CPU without a word: it fails in one line, unless its
    config says `device: cpu` (a test cluster whose GPUs are Ray resources only)."""
    if gpu_ids and cfg.device != "cpu" and not cuda_available:
        import torch

        raise GpuUnusable(f"Ray gave this trial GPU {', '.join(map(str, gpu_ids))} but CUDA is unusable in its "
                          f"process (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): check "
                          "the node's NVIDIA driver against torch's CUDA build, or set trial.device: cpu")


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def study_trainable(config: dict, *, base: dict, fixed: dict, objectives: Sequence[str], study_dir: str,
                    threads: int = 1, run_trial: Callable | None = None, robustness: Any = None,
                    dense: Any = None, checkpoint_every_s: float = 0.0) -> None:
    """Tune function trainable. `run_trial(cfg, on_epoch=, resume_state=)` defaults to the pipeline's.
    `robustness` (robust_settings.RobustnessSettings): the suite's search-budget metrics join the final ones.
    `dense`: what to wait for while the dense model is being pretrained (study.search.running.dense.wait_for).
    `checkpoint_every_s`: an epoch end writes the trial's checkpoint when this many seconds have passed
    since the previous one (or the trial's start); 0 = every epoch."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(threads)))
    if run_trial is None:
        from study.trial.pipeline import run_trial
    number = int(config.get(NUMBER_KEY, 0))
    files = TrialFiles(study_dir, number)
    saved = files.final()
    if saved is not None:  # finished before the driver went away: report it again, do not retrain
        tune.report(saved)
        return
    if dense is not None:  # the dense model is being pretrained: wait for it (the pipeline imported meanwhile)
        import study.trial.pipeline  # noqa: F401
        from study.search.running.dense import wait_for

        wait_for(dense)  # a failed pretraining raises here: the study stops (dense.guard), no trial is recorded

    resume_state = files.checkpoint()
    last_step = int(resume_state.get("step", 0)) if resume_state else 0
    due = CheckpointClock(checkpoint_every_s)
    # The epoch reports up to the checkpoint travel in it: a driver killed before its MLflow callback logged
    # them loses them with Tune's folder (scratch), so a continued trial reports them again first; the
    # callback logs only the steps its run lacks (no duplicates).
    reports = [r for r in (resume_state or {}).get("reports", []) if isinstance(r, dict)]
    for old in reports:
        tune.report(old)

    def on_epoch(report: Any) -> None:
        nonlocal last_step
        last_step = report.step
        record = {**report.metrics, "stage": report.stage, "epoch": report.epoch, "step": report.step}
        missing = [k for k in objectives if k not in record]
        if missing:  # size objectives, counted now: a rung (study.search.optimize.rung_scheduler) judges every objective
            size = getattr(report, "size", lambda: {})()
            record.update({k: float(size[k]) for k in missing if k in size})
        reports.append(record)
        if due():
            files.save_checkpoint({**report.state(), "reports": list(reports)})
        tune.report(record)

    try:
        cfg = local_cache(build_config(base, fixed, config))
        import ray

        check_gpu(cfg, ray.get_gpu_ids(), torch.cuda.is_available())
        final = _train(cfg, run_trial, on_epoch, resume_state, objectives, robustness, files)
    except Exception as e:  # noqa: BLE001 - the trial's own failure, recorded as such (see the docstring)
        import traceback

        traceback.print_exc()  # the whole stack in the worker's log (Tune's trial log)
        reason = str(e) if isinstance(e, ObjectiveNotFinite) else f"the trial raised {type(e).__name__}: {e}"
        final = {"final": 1, FAIL_KEY: reason[:2000]}
    final = {**final, "step": last_step + 1, NODE_KEY: _node_id()}
    files.save_final(final)
    tune.report(final)


def _train(cfg: Any, run_trial: Callable, on_epoch: Callable, resume_state: Any, objectives: Sequence[str],
           robustness: Any, files: "TrialFiles") -> dict[str, Any]:
    """The trial itself: its final metrics (with `final: 1`), or it raises."""
    result = run_trial(cfg, on_epoch=on_epoch, resume_state=resume_state)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    leaked = sorted(k for k in metrics if k.startswith(("test_", "test.")) or k in ("clean_acc", "robust_acc"))
    if leaked:  # whatever reaches Tune reaches Optuna and MLflow as a selection figure
        raise RuntimeError(f"run_trial returned test-split figures ({', '.join(leaked)}): model selection uses "
                           "validation only; test figures are measured for the chosen models (study.confirm)")
    if robustness is not None:
        metrics.update(search_robustness(cfg, result, metrics, robustness))
    check_objectives(metrics, objectives)
    if hasattr(result, "save"):
        result.save(files.local)
    return {**metrics, "final": 1}


class CheckpointClock:
    """`due()`: whether this epoch's end writes a checkpoint (`every_s` seconds since the last one, or since
    the clock was made; 0 = always). Calling it when due restarts the interval."""

    def __init__(self, every_s: float, now: Callable[[], float] = time.monotonic):
        self.every_s, self.now = float(every_s), now
        self.last = now()

    def __call__(self) -> bool:
        t = self.now()
        if self.every_s > 0 and t - self.last < self.every_s:
            return False
        self.last = t
        return True


class TrialFiles:
    """A trial's folder `<study>/trials/<number>/`: written in place for a local study; for an object-store
    study, the checkpoint and final.json go to the bucket directly (one PUT each), model.pt and result.json
    through a node-local scratch folder, uploaded before final.json (the trial's end marker)."""

    def __init__(self, study_dir: str, number: int):
        self.store = Store(study_dir) if is_remote(study_dir) else None
        self.rel = f"trials/{number:04d}"
        self.local = (scratch_dir(study_dir) / self.rel) if self.store is not None else trial_dir(study_dir, number)
        self.local.mkdir(parents=True, exist_ok=True)

    def _read(self, name: str) -> bytes | None:
        if self.store is not None:
            return self.store.read_bytes(f"{self.rel}/{name}") if self.store.is_file(f"{self.rel}/{name}") else None
        path = self.local / name
        return path.read_bytes() if path.is_file() else None

    def _write(self, name: str, data: bytes) -> None:
        if self.store is not None:
            self.store.write_bytes(f"{self.rel}/{name}", data)
            return
        tmp = self.local / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.local / name)

    def final(self) -> dict | None:
        """The saved final report, None if the trial has not finished. A damaged one (or one of another shape
        than a final report) is ignored, said in one line: the trial trains on from its checkpoint."""
        data = self._read(FINAL_FILE)
        if data is None:
            return None
        try:
            final = json.loads(data)
            if not isinstance(final, dict) or not final.get("final"):
                raise ValueError("not a final report (a JSON object with final: 1)")
            return final
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            print(f"[study] {self.rel}/{FINAL_FILE} is damaged ({str(e).splitlines()[0] if str(e) else ''}); "
                  f"ignored: the trial trains on from its checkpoint", flush=True)
            return None

    def checkpoint(self) -> dict | None:
        """The resume state of the trial's last checkpoint, None when there is none or it cannot be used (a
        damaged file, or one holding more than tensors: torch's weights-only loader refuses to run code)."""
        import io

        import torch

        data = self._read(CHECKPOINT_FILE)
        if data is None:
            return None
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError("not a dict")
            return state
        except Exception as e:  # noqa: BLE001 - the trial starts over instead
            print(f"[study] {self.rel}/{CHECKPOINT_FILE} is not a usable checkpoint ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); the trial starts over", flush=True)
            return None

    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        import io

        import torch

        buf = io.BytesIO()
        torch.save(dict(state), buf)
        self._write(CHECKPOINT_FILE, buf.getvalue())

    def save_final(self, final: Mapping[str, Any]) -> None:
        """final.json, written last (the trial's end marker); the checkpoint is no longer needed."""
        if self.store is not None:
            self.store.upload_tree(self.local, self.rel, names=[p.name for p in self.local.iterdir()
                                                                if p.name not in (FINAL_FILE, CHECKPOINT_FILE)])
        self._write(FINAL_FILE, json.dumps(dict(final), indent=2).encode())
        if self.store is not None:
            self.store.delete(f"{self.rel}/{CHECKPOINT_FILE}")
        else:
            (self.local / CHECKPOINT_FILE).unlink(missing_ok=True)


def local_cache(cfg: Any) -> Any:
    """A config whose dense-model cache is an object-store folder gets a node-local copy of the cached
    checkpoint (fetched once per node) and that local folder as its cache_dir."""
    if not is_remote(cfg.cache_dir):
        return cfg
    import dataclasses

    store, local = Store(cfg.cache_dir), scratch_dir(cfg.cache_dir)
    cfg = dataclasses.replace(cfg, cache_dir=str(local))
    name = cfg.pretrain_file_name()
    if not (local / name).is_file() and store.is_file(name):
        store.download_file(name, local / name)
    return cfg


def search_robustness(cfg: Any, result: Any, metrics: Mapping[str, float], settings: Any) -> dict[str, float]:
    """The robustness suite on the trial's model (rebuilt from its exported state, eval mode) with the
    cheap search budget on the VALIDATION split; its flat metrics, unprefixed, so objectives match."""
    from study.search.front import robust_eval

    state = getattr(result, "model_state", None)
    if state is None:
        raise RuntimeError("study.robustness is set but run_trial returned no model_state to evaluate")
    report = robust_eval.evaluate(cfg, state, settings, final=False)
    return robust_eval.search_metrics(report, metrics)


def pretrain_task(cfg: Any, threads: int = 1, pretrain: Callable | None = None) -> str:
    """Body of the Ray task that trains (or finds) the study's dense model before any trial starts."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(max(1, int(threads)))
    if pretrain is None:
        from study.trial.pipeline import pretrain
    remote = cfg.cache_dir if is_remote(cfg.cache_dir) else None
    cfg = local_cache(cfg)
    path = Path(pretrain(cfg))
    if remote is None or cfg.pretrained:
        return str(path)
    store = Store(remote)
    if not store.is_file(path.name):  # written once, in one PUT: every trial reads the whole object or none
        store.upload_file(path, path.name)
    return store.url(path.name)
