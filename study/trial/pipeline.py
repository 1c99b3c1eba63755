"""One trial: dense robust model -> prune -> fine-tune -> evaluate.

1. The dense model is adversarially pre-trained once and cached under `TrialConfig.pretrain_key()` (or a
   given checkpoint is loaded).
2. Prune: HYDRA trains importance scores (weights frozen) under the robust loss; LWM and random set the
   mask without training.
3. Fine-tune: the mask is fixed (hard zeros), weights train under the robust loss.
4. Evaluate: clean and PGD robust accuracy on the VALIDATION split with the eval budget (the trial's
   figures select models; the test split is evaluated only for chosen models, see study.confirm).
Every epoch of stages 2-3 is handed to `on_epoch` with a resume state; `resume_state` continues from it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from study.trial import pruning, sparse_file
from study.trial.attacks import stage_schedule, strength_at
from study.trial.config import AttackConfig, StageConfig, TrialConfig
from study.trial.data import Splits, batches, load_dataset
from study.trial.engine import (CompiledStep, Runtime, TrialFailed, make_optimizer, make_scheduler, resolve_runtime,
                                train_epoch)
from study.trial.evaluation import evaluate, relative_step
from study.trial.graphed import make_step
from study.trial.losses import make_loss
from study.trial.models import create_model

log = logging.getLogger("study")

__all__ = ["EpochReport", "TrialResult", "TrialFailed", "pretrain", "run_trial"]


@dataclass
class EpochReport:
    stage: str  # "prune" | "finetune"
    epoch: int  # 1-based within the stage
    step: int  # 1-based count of epochs this trial has reported (monotone)
    metrics: dict[str, float]
    # Resume state: torch.save-able, loads with weights_only=True. Its tensors alias the live model and
    # optimizer, so save it before returning from on_epoch.
    state: Callable[[], dict[str, Any]]
    # The model's size figures now (pruning.SizeReport.as_metrics: params_kept, sparsity, ...), counted from
    # the exported weights as the final metrics are; computed only when called (a rung needs the objectives).
    size: Callable[[], dict[str, float]] = lambda: {}


@dataclass
class TrialResult:
    config: TrialConfig
    metrics: dict[str, float]
    model_state: dict[str, torch.Tensor] = field(repr=False)
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        sparse_file.save(self.model_state, d / "model.pt")  # kept values + a bitmask (study.trial.sparse_file)
        payload = {"metrics": self.metrics, "config": self.config.to_dict(), "history": self.history}
        (d / "result.json").write_text(json.dumps(payload, indent=2))
        return d


# ---------------------------------------------------------------------------------------------------


@dataclass
class _Context:
    cfg: TrialConfig
    runtime: Runtime
    splits: Splits
    generator: torch.Generator


def _context(cfg: TrialConfig) -> _Context:
    runtime = resolve_runtime(cfg.device, cfg.precision)
    torch.manual_seed(cfg.seed)
    splits = load_dataset(cfg.data, runtime.device)
    generator = torch.Generator(device=runtime.device).manual_seed(cfg.seed)
    return _Context(cfg, runtime, splits, generator)


def _model(ctx: _Context) -> nn.Module:
    model = create_model(ctx.cfg.model.arch, ctx.splits.info, width=ctx.cfg.model.width).to(ctx.runtime.device)
    if ctx.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _train_stage(
    ctx: _Context,
    model: nn.Module,
    name: str,
    stage: StageConfig,
    attack: AttackConfig,
    *,
    after_step: Callable[[], None] | None = None,
    on_epoch: Callable[[str, int, dict[str, float], Callable[[], dict]], None] | None = None,
    resume: dict[str, Any] | None = None,
    warmup: bool = True,
) -> list[dict[str, float]]:
    """Train `model`'s trainable parameters for one stage; per-epoch validation under the eval attack.

    The attack's eps follows `attack.schedule` per optimizer step over the stage's steps (`warmup=False`:
    the target eps from the first step). The step index is (epoch - 1) * steps_per_epoch + batch, so a
    resumed stage continues the schedule exactly.
    """
    cfg, sp = ctx.cfg, ctx.splits
    steps_per_epoch = math.ceil(len(sp.x_train) / cfg.data.batch_size)
    optimizer = make_optimizer(model.parameters(), stage)
    scheduler = make_scheduler(optimizer, stage, steps_per_epoch)
    loss_fn = make_loss(attack.loss, attack.trades_beta)
    schedule = stage_schedule(attack, stage.epochs * steps_per_epoch, warmup=warmup)
    first = 1
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        ctx.generator.set_state(resume["generator"])
        first = resume["epoch"] + 1
    # Compiled when asked (CUDA or CPU); the uncompiled module (same parameters) is what is saved and evaluated.
    fast = CompiledStep(model) if cfg.compile else model
    step_fn = make_step(fast, loss_fn, ctx.runtime, ctx.generator, cuda_graphs=cfg.cuda_graphs)
    history = []
    for epoch in range(first, stage.epochs + 1):
        t0 = time.perf_counter()
        data = batches(sp.x_train, sp.y_train, cfg.data.batch_size, shuffle=True, generator=ctx.generator,
                       augment=cfg.data.augment and sp.info.augment)
        metrics = train_epoch(fast, data, loss_fn, optimizer, scheduler, schedule, ctx.runtime, ctx.generator,
                              after_step, first_step=(epoch - 1) * steps_per_epoch, step_fn=step_fn)
        val = evaluate(model, sp.x_val, sp.y_val, eps=cfg.eval_eps, steps=cfg.eval.val_steps,
                       step_size=cfg.eval.step_size, points=cfg.eval.val_points, seed=cfg.eval.seed,
                       batch_size=cfg.data.eval_batch_size)
        metrics.update(val_clean_acc=val.clean, val_robust_acc=val.robust, epoch_s=time.perf_counter() - t0)
        history.append(metrics)
        log.info("[%s %d/%d] loss %.4f acc %.3f | val clean %.3f robust %.3f | eps %.4f lr %.3g | %.1fs",
                 name, epoch, stage.epochs, metrics["train_loss"], metrics["train_acc"], val.clean, val.robust,
                 metrics["eps"], metrics["lr"], metrics["epoch_s"])

        def state(epoch: int = epoch) -> dict[str, Any]:
            return {"stage": name, "epoch": epoch, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "generator": ctx.generator.get_state()}

        if on_epoch is not None:
            on_epoch(name, epoch, metrics, state)
    return history


# ---------------------------------------------------------------------------------------------------
# Stage 1: the dense robust model, cached


def pretrain_path(cfg: TrialConfig) -> Path:
    return Path(cfg.cache_dir) / cfg.pretrain_file_name()


def pretrain(cfg: TrialConfig) -> Path:
    """The dense robust checkpoint for `cfg` (trained once, then read from the cache)."""
    if cfg.pretrained:
        path = Path(cfg.pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained: no checkpoint at {path}")
        return path
    path = pretrain_path(cfg)
    if path.is_file():
        return path
    ctx = _context(cfg)
    model = _model(ctx)
    log.info("pre-training the dense %s on %s (%d epochs, %s) -> %s", cfg.model.arch, cfg.data.name,
             cfg.pretrain.epochs, cfg.pretrain_attack.loss, path)
    history = _train_stage(ctx, model, "pretrain", cfg.pretrain, cfg.pretrain_attack)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        torch.save({"model": model.state_dict(), "key": cfg.pretrain_key(), "history": history}, tmp.name)
    os.replace(tmp.name, path)  # atomic: a concurrent reader never sees half a file
    return path


def load_dense(model: nn.Module, path: Path) -> None:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# Stages 2-4


def _set_trainable(model: nn.Module, *, weights: bool, scores: bool, bn: bool) -> None:
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if leaf == "scores":
            p.requires_grad_(scores)
        elif isinstance(owner, nn.modules.batchnorm._BatchNorm):
            p.requires_grad_(bn)
        else:
            p.requires_grad_(weights)


def _initial_mask(ctx: _Context, model: nn.Module) -> None:
    cfg = ctx.cfg
    p = cfg.prune
    if p.method == "random":
        pruning.random_scores(model, torch.Generator().manual_seed(cfg.seed))
    elif p.method == "lwm":
        with torch.no_grad():
            for _, layer in pruning.masked_layers(model):
                layer.scores.copy_(layer.weight.abs())
    else:
        sp = ctx.splits
        n = min(len(sp.x_train), cfg.data.batch_size)
        loss = make_loss(cfg.attack.loss, cfg.attack.trades_beta)
        strength = strength_at(cfg.attack, 1.0)
        batch = pruning.SnipBatch(sp.x_train[:n], sp.y_train[:n],
                                  lambda m, x, y: loss(m, x, y, strength, ctx.generator)[0])
        pruning.init_scores(model, p.score_init, batch)
    pruning.refresh_masks(model, p.keep_fraction, p.scope)


def _size(model: nn.Module) -> dict[str, float]:
    state = pruning.export_state_dict(model)
    return pruning.size_report(state, pruning.prunable_weight_names(model)).as_metrics()


def run_trial(
    cfg: TrialConfig,
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
    resume_state: dict[str, Any] | None = None,
) -> TrialResult:
    """Run one trial end to end (or continue it from `resume_state`)."""
    t0 = time.perf_counter()
    dense_path = pretrain(cfg)
    ctx = _context(cfg)
    model = _model(ctx)
    load_dense(model, dense_path)
    pruning.make_prunable(model)
    p = cfg.prune
    history: list[dict[str, Any]] = []
    step = 0

    def report(stage: str, epoch: int, metrics: dict[str, float], state: Callable[[], dict]) -> None:
        nonlocal step
        step += 1
        history.append({"stage": stage, "epoch": epoch, **metrics})
        if on_epoch is not None:
            on_epoch(EpochReport(stage, epoch, step, dict(metrics), lambda s=step: {**state(), "step": s},
                                 size=lambda: _size(model)))

    resume_stage = resume_state["stage"] if resume_state else None
    if resume_state is not None:
        step = int(resume_state.get("step", 0))

    if p.method != "dense":
        if resume_stage is None:
            _initial_mask(ctx, model)
        if p.method == "hydra" and resume_stage != "finetune":
            pruning.set_mode(model, "scores")
            _set_trainable(model, weights=False, scores=True, bn=p.train_bn)
            if resume_stage == "prune":
                model.load_state_dict(resume_state["model"])
            refresh = lambda: pruning.refresh_masks(model, p.keep_fraction, p.scope)  # noqa: E731
            refresh()
            _train_stage(ctx, model, "prune", cfg.prune_stage, cfg.attack, after_step=refresh, on_epoch=report,
                         resume=resume_state if resume_stage == "prune" else None)
        if resume_stage == "finetune":
            model.load_state_dict(resume_state["model"])
        pruning.set_mode(model, "fixed")
        _set_trainable(model, weights=True, scores=False, bn=True)
        # Fine-tuning starts from a robust model: the target eps from its first step unless asked otherwise.
        _train_stage(ctx, model, "finetune", cfg.finetune, cfg.attack, on_epoch=report,
                     resume=resume_state if resume_stage == "finetune" else None, warmup=cfg.attack.finetune_warmup)

    # Validation only: the trial's figures select models, so the test split is never touched here (the
    # chosen models are confirmed on test afterwards: study.confirm, `study trial`).
    sp = ctx.splits
    val = evaluate(model, sp.x_val, sp.y_val, eps=cfg.eval_eps, steps=cfg.eval.steps,
                   step_size=relative_step(cfg.eval.step_size, cfg.eval.steps), restarts=cfg.eval.restarts,
                   points=cfg.eval.points, seed=cfg.eval.seed, batch_size=cfg.data.eval_batch_size)
    state = pruning.export_state_dict(model)
    size = pruning.size_report(state, pruning.prunable_weight_names(model))
    metrics = {"val_clean_acc": val.clean, "val_robust_acc": val.robust, "eval_eps": cfg.eval_eps,
               "val_points": float(val.points), **size.as_metrics(), "wall_s": time.perf_counter() - t0}
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise TrialFailed(f"non-finite final metrics: {', '.join(bad)}")
    return TrialResult(config=cfg, metrics=metrics, model_state=state, history=history)
