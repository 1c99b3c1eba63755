"""The Ray Tune function trainable: one trial = pipeline.run_trial on one searched config.

Tune hands it the searched values (flat dotted keys) plus `optuna_trial_number`; the fixed part of
the config comes through `tune.with_parameters`. Every epoch goes to `ray.tune.report` with a resume
checkpoint; the last report carries the final metrics, every objective finite, and `final: 1`. A trial
that cannot produce that raises, so Tune marks it ERROR and Optuna records it FAIL.

Everything a trial reports is a validation or size figure (model selection never sees the test split; a
run_trial returning test figures is refused). The test split is evaluated after the search, for the
Pareto-front trials only (study.search.front: confirm.json beside the trial's files).

A trial's files live in `<study_dir>/trials/<optuna number>/` (result.json, model.pt, final.json; on an
object store, `study_dir` is the bucket's URI and the files are uploaded there, final.json last):
keyed by the Optuna number, which survives a resume, so a trial that had already finished when the
driver died reports its saved result again instead of training twice.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from study.keys import NODE_KEY, NUMBER_KEY
from study.search.layout import TRIAL_FINAL_FILE as FINAL_FILE
from study.search.layout import trial_dir
from study.search.store import Store, is_remote, scratch_dir
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


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def study_trainable(config: dict, *, base: dict, fixed: dict, objectives: Sequence[str], study_dir: str,
                    threads: int = 1, run_trial: Callable | None = None, robustness: Any = None,
                    dense: Any = None, checkpoint_every_s: float = 0.0) -> None:
    """Tune function trainable. `run_trial(cfg, on_epoch=, resume_state=)` defaults to the pipeline's.
    `robustness` (robust_settings.RobustnessSettings): the suite's search-budget metrics join the final ones.
    `dense`: what to wait for while the dense model is being pretrained (study.search.dense.wait_for).
    `checkpoint_every_s`: an epoch's report carries a resume checkpoint when this many seconds have passed
    since the previous one (or the trial's start); 0 = every epoch."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(threads)))
    if run_trial is None:
        from study.trial.pipeline import run_trial
    cfg = build_config(base, fixed, config)
    number = int(config.get(NUMBER_KEY, 0))
    files = TrialFiles(study_dir, number)
    saved = files.final()
    if saved is not None:  # finished before the driver went away: report it again, do not retrain
        tune.report(saved)
        return
    if dense is not None:  # the dense model is being pretrained: wait for it (the pipeline imported meanwhile)
        import study.trial.pipeline  # noqa: F401
        from study.search.dense import wait_for

        wait_for(dense)
    out = files.local
    cfg = local_cache(cfg)

    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            path = Path(d) / "state.pt"
            if path.is_file():
                resume_state = torch.load(path, map_location="cpu", weights_only=True)
    last_step = int(resume_state.get("step", 0)) if resume_state else 0
    due = CheckpointClock(checkpoint_every_s)

    def on_epoch(report: Any) -> None:
        nonlocal last_step
        last_step = report.step
        metrics = {**report.metrics, "stage": report.stage, "epoch": report.epoch, "step": report.step}
        if not due():
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(report.state(), Path(d) / "state.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

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
        result.save(out)
    final = {**metrics, "final": 1, "step": last_step + 1, NODE_KEY: _node_id()}
    files.save_final(final)
    tune.report(final)


class CheckpointClock:
    """`due()`: whether this epoch's report takes a checkpoint (`every_s` seconds since the last one, or since
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
    study written in a node-local scratch folder and uploaded, final.json last (the trial's end marker)."""

    def __init__(self, study_dir: str, number: int):
        self.store = Store(study_dir) if is_remote(study_dir) else None
        self.rel = f"trials/{number:04d}"
        self.local = (scratch_dir(study_dir) / self.rel) if self.store is not None else trial_dir(study_dir, number)
        self.local.mkdir(parents=True, exist_ok=True)

    def final(self) -> dict | None:
        """The saved final report, None if the trial has not finished."""
        if self.store is not None:
            if not self.store.is_file(f"{self.rel}/{FINAL_FILE}"):
                return None
            return json.loads(self.store.read_text(f"{self.rel}/{FINAL_FILE}"))
        done = self.local / FINAL_FILE
        return json.loads(done.read_text()) if done.is_file() else None

    def save_final(self, final: Mapping[str, Any]) -> None:
        text = json.dumps(dict(final), indent=2)
        if self.store is not None:
            self.store.upload_tree(self.local, self.rel, names=[p.name for p in self.local.iterdir()
                                                                if p.name != FINAL_FILE])
            self.store.write_text(f"{self.rel}/{FINAL_FILE}", text)
            return
        tmp = self.local / (FINAL_FILE + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.local / FINAL_FILE)


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
    from study.search import robust_eval

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
