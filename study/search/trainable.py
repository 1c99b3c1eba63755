"""The Ray Tune function trainable: one trial = pipeline.run_trial on one searched config.

Tune hands it the searched values (flat dotted keys) plus `optuna_trial_number`; the fixed part of
the config comes through `tune.with_parameters`. Every epoch goes to `ray.tune.report` with a resume
checkpoint; the last report carries the final metrics, every objective finite, and `final: 1`. A trial
that cannot produce that raises, so Tune marks it ERROR and Optuna records it FAIL.

Everything a trial reports is a validation or size figure (model selection never sees the test split; a
run_trial returning test figures is refused). The test split is evaluated after the search, for the
Pareto-front trials only (study.search.front: confirm.json beside the trial's files).

A trial's files live in `<study_dir>/trials/<optuna number>/` (result.json, model.pt, final.json):
keyed by the Optuna number, which survives a resume, so a trial that had already finished when the
driver died reports its saved result again instead of training twice.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from study.keys import NODE_KEY, NUMBER_KEY
from study.search.layout import TRIAL_FINAL_FILE as FINAL_FILE
from study.search.layout import trial_dir
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
                    threads: int = 1, run_trial: Callable | None = None, robustness: Any = None) -> None:
    """Tune function trainable. `run_trial(cfg, on_epoch=, resume_state=)` defaults to the pipeline's.
    `robustness` (robust_settings.RobustnessSettings): the suite's search-budget metrics join the final ones."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(threads)))
    if run_trial is None:
        from study.trial.pipeline import run_trial
    cfg = build_config(base, fixed, config)
    out = trial_dir(study_dir, int(config.get(NUMBER_KEY, 0)))
    out.mkdir(parents=True, exist_ok=True)

    done = out / FINAL_FILE
    if done.is_file():  # finished before the driver went away: report it again, do not retrain
        tune.report(json.loads(done.read_text()))
        return

    resume_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            path = Path(d) / "state.pt"
            if path.is_file():
                resume_state = torch.load(path, map_location="cpu", weights_only=True)
    last_step = int(resume_state.get("step", 0)) if resume_state else 0

    def on_epoch(report: Any) -> None:
        nonlocal last_step
        last_step = report.step
        metrics = {**report.metrics, "stage": report.stage, "epoch": report.epoch, "step": report.step}
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
    tmp = out / (FINAL_FILE + ".tmp")
    tmp.write_text(json.dumps(final, indent=2))
    os.replace(tmp, done)
    tune.report(final)


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
    return str(pretrain(cfg))
