"""The test-split evaluation of the models a study chose, and the suite's search metrics per trial.

Model selection sees validation data only; the TEST split is evaluated once per Pareto-front trial, after
the search (study.search.front.evaluate), in up to two parts:

- the confirmation (`study.confirm`, always): clean accuracy, strong PGD-Linf (default 50 steps of
  2.5*eps/50, 3 restarts, per-point worst case) and standard AutoAttack at the trial's eval eps;
  `test_robust_acc` is the per-point worst case over both. Saved as trials/<n>/confirm.json, logged as
  `test_*` metrics and the tag `test_attack` (attack and budget in words);
- the robustness suite's final part (`study.robustness.final_budget`, only with that section), logged with
  the `test.` prefix (`test.robust.linf.0.1`, `test.autoattack.linf.0.1`, ...).

The suite's search part runs per trial with the cheap `search_budget` on the VALIDATION split; its flat
metrics (`robust.linf.0.1`, `auc.l2`, `scenario.linf.0.1.r0.5`, ...) join the trial's final metrics, so
an objective may name one. The settings are study.search.front.robust_settings; the saved files and the Pareto
table's test columns are study.search.front.front_files.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from study.search.front.robust_settings import CONFIRM_DEFAULT, ConfirmSettings, RobustnessSettings

# Suite metric names that collide with the pipeline's final metrics: the pipeline's figure is kept.
SHADOWED = ("clean_acc",)


# ---------------------------------------------------------------------------------------------------
# Evaluations (torch from here on).


def evaluate(cfg: Any, model_state: Mapping[str, Any], settings: RobustnessSettings, *, final: bool,
             device: Any = None, splits: Any = None, progress: Any = None) -> Any:
    """The suite on the trial's model: validation split with the search budget, or test split with the
    final budget (and AutoAttack where set, its progress to the Sink `progress`). Returns the RobustnessReport."""
    import torch

    from study.trial.data import load_dataset
    from study.trial.models import load_exported
    from study.robustness import evaluate_robustness

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    sp = splits if splits is not None else load_dataset(cfg.data, device)
    model = load_exported(cfg, model_state, sp.info, device)
    x, y = (sp.x_test, sp.y_test) if final else (sp.x_val, sp.y_val)
    return evaluate_robustness(model, x, y, device=device, progress=progress, **settings.suite_kwargs(final))


def search_metrics(report: Any, pipeline_metrics: Mapping[str, float]) -> dict[str, float]:
    """The report's finite flat metrics to merge into a trial's final metrics (unprefixed, so objectives
    match; a name the pipeline already reports, e.g. clean_acc, keeps the pipeline's figure)."""
    return {k: float(v) for k, v in report.flat_metrics().items()
            if k not in pipeline_metrics and k not in SHADOWED and isinstance(v, (int, float)) and math.isfinite(v)}


def evaluate_on_test(cfg: Any, model_path: str, confirm_settings: ConfirmSettings | None,
              suite: RobustnessSettings | None, threads: int = 1, progress: Any = None) -> tuple[dict | None, Any]:
    """Body of the Ray task that evaluates one front trial on the TEST split (on a trial's resources): the
    confirmation (None: skipped) and the suite's final part (None: skipped). Returns (payload, report).
    `progress.part(name)`: the Sink of each part's progress (study.search.front.progress.TrialSink)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from study.trial.data import load_dataset

    torch.set_num_threads(max(1, int(threads)))
    from study.trial.sparse_file import load_state

    state = load_state(model_path)  # either format, torch's weights-only unpickler
    device = _device(cfg)
    sp = load_dataset(cfg.data, device)
    part = progress.part if progress is not None else (lambda name: None)
    payload = (confirm(cfg, state, confirm_settings, device=device, splits=sp, progress=part("confirming"))
               if confirm_settings else None)
    report = (evaluate(cfg, state, suite, final=True, device=device, splits=sp, progress=part("robustness suite on"))
              if suite is not None else None)
    return payload, report


def _device(cfg: Any) -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")


# ---------------------------------------------------------------------------------------------------
# The confirmation (study.confirm): clean, strong PGD and standard AutoAttack on the test split.


def confirm(cfg: Any, model_state: Mapping[str, Any], settings: ConfirmSettings = CONFIRM_DEFAULT, *,
            device: Any = None, splits: Any = None, progress: Any = None) -> dict[str, Any]:
    """The chosen model's test figures at the trial's eval eps (Linf). Per point: clean, PGD (correct under
    every restart), AutoAttack; `test_robust_acc` = correct under both, so it is never above either.
    Returns the payload saved as confirm.json: budget, eps, test_attack, metrics, AutoAttack's warnings.
    `progress`: a study.robustness.progress.Sink, given an Update per batch of points of PGD and AutoAttack."""
    import time

    from study.robustness.progress import Meter
    from study.trial.data import load_dataset
    from study.trial.models import load_exported
    from study.trial.evaluation import pgd_flags, subset

    device = device if device is not None else _device(cfg)
    sp = splits if splits is not None else load_dataset(cfg.data, device)
    model = load_exported(cfg, model_state, sp.info, device)
    x, y = subset(sp.x_test, sp.y_test, settings.points, settings.seed)
    eps, n = cfg.eval_eps, len(x)
    t0 = time.perf_counter()
    meter = Meter(progress, f"PGD-{settings.steps} x{settings.restarts} restarts Linf eps={eps:g}", n)
    clean, robust = pgd_flags(model, x, y, eps=eps, steps=settings.steps, step_size=settings.step_size,
                              restarts=settings.restarts, seed=settings.seed, batch_size=cfg.data.eval_batch_size,
                              on_batch=meter.update)
    meter.finish()
    wall = {"pgd": time.perf_counter() - t0}
    metrics = {"test_clean_acc": _mean(clean), "test_pgd_acc": _mean(robust)}
    flags: list[str] = []
    if settings.autoattack:
        from study.robustness.autoattack import autoattack
        from study.robustness.threats import Threat

        t0 = time.perf_counter()
        aa, flags = autoattack(model, x, y, Threat.LINF, eps, seed=settings.seed, batch_size=cfg.data.eval_batch_size,
                               progress=progress)
        wall["autoattack"] = time.perf_counter() - t0
        metrics["test_autoattack_acc"] = _mean(aa)
        robust = robust & aa.to(robust.device)
    metrics["test_robust_acc"] = _mean(robust)
    metrics["test_points"] = float(n)
    return {"budget": dataclasses.asdict(settings), "eps": eps,
            "test_attack": settings.attack_text(eps, n),
            "metrics": metrics, "autoattack_flags": flags, "wall_s": wall}


def _mean(flags: Any) -> float:
    return int(flags.sum()) / len(flags) if len(flags) else 0.0  # an exact fraction of the points


