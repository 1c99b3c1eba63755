"""Shared fixtures and fakes: the repository's paths, the tiny trial configs, a local Ray, and the fake
trial and pretraining the study tests hand to run_study (instant, made-up but sensible metrics).

Ray workers cannot import this module (tests/ is not on their path): its functions are shipped by value.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
DATA = Path(__file__).resolve().parent / "data"

# The tiny digits trial of the pipeline and evaluation tests (seconds on CPU); tests override what they need.
TINY_TRIAL: dict[str, Any] = {
    "name": "tiny",
    "seed": 3,
    "data": {"name": "digits", "batch_size": 64, "train_limit": 400, "val_fraction": 0.1},
    "model": {"arch": "small_cnn", "width": 8},
    "pretrain_attack": {"loss": "pgd", "eps": 0.1, "steps": 3, "step_size": 0.4},
    "attack": {"loss": "pgd", "eps": 0.1, "steps": 3, "step_size": 0.4},
    "pretrain": {"epochs": 3, "lr": 0.05},
    "prune": {"method": "hydra", "keep_fraction": 0.2, "score_init": "ssi"},
    "prune_stage": {"epochs": 2, "lr": 0.1},
    "finetune": {"epochs": 2, "lr": 0.01},
    "eval": {"steps": 5, "points": 200, "val_points": 100, "val_steps": 3},
}


def tiny_trial(**sections: Any) -> dict[str, Any]:
    """TINY_TRIAL with whole top-level values replaced (`prune={"method": "dense"}`); None drops a key."""
    return {k: v for k, v in {**TINY_TRIAL, **sections}.items() if v is not None}


def _ship_by_value() -> None:
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def start_local_ray() -> None:
    """A small local Ray for the study tests (2 CPUs, no dashboard, a 100 MB object store)."""
    import ray

    _ship_by_value()
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)


def pytest_collection_modifyitems(config, items):
    """Soak loops (`soak` marker) run only when asked for by marker (`make soak`: pytest -m soak)."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="a soak loop: run it with `pytest -m soak` (make soak)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the module, shut down after it."""
    import ray

    start_local_ray()
    yield
    ray.shutdown()


# ---------------------------------------------------------------------------------------------------
# The fake trial and pretraining of the study tests.


class FakeResult:
    def __init__(self, metrics):
        self.metrics = metrics


def fake_pretrain(cfg):
    path = Path(cfg.cache_dir) / f"{cfg.pretrain_key()}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("dense")
    return path


def fake_run_trial(cfg, *, on_epoch=None, resume_state=None, fail=(), nan=(), interrupt=None, epochs=2, sleep=0.0):
    """Made-up but sensible metrics: smaller keep_fraction -> fewer params, lower robust accuracy.

    `fail`/`nan`: Optuna numbers that raise / end with a NaN objective. `interrupt`: (number, driver pid,
    marker file): that trial sends the driver SIGINT (once) after its first epoch and keeps running.
    A resumed trial starts after the epoch of its checkpoint (`resume_state["step"]`).
    """
    number = int(cfg.name.rsplit("-", 1)[1])
    assert Path(cfg.cache_dir, f"{cfg.pretrain_key()}.pt").is_file(), "pretraining must come first"
    time.sleep(sleep)
    first = int(resume_state["step"]) + 1 if resume_state else 1
    for step in range(first, epochs + 1):
        if on_epoch is not None:
            from study.trial.pipeline import EpochReport

            on_epoch(EpochReport("finetune", step, step, {"train_loss": 1.0 / step, "val_robust_acc": 0.1 * step},
                                 lambda s=step: {"step": s}))
        if interrupt and interrupt[0] == number and not Path(interrupt[2]).exists():
            Path(interrupt[2]).write_text("sent")  # after one epoch: the resumed trial starts from its checkpoint
            os.kill(interrupt[1], signal.SIGINT)
            time.sleep(60)
    if number in fail:
        raise RuntimeError(f"fake trial {number} failed on purpose")
    keep = cfg.prune.keep_fraction
    robust = 0.3 + 0.5 * math.sqrt(keep) * cfg.attack.eps_multiplier / 1.25
    return FakeResult({"params_kept": round(10000 * keep), "params_total": 10000.0, "compression": 1 / keep,
                       "val_clean_acc": min(1.0, robust + 0.2),
                       "val_robust_acc": float("nan") if number in nan else robust,
                       "sparsity": 1 - keep, "wall_s": 0.1})


def fit_briefly(model, sp, steps: int = 150) -> None:
    """`steps` seeded Adam steps (lr 1e-2, batches of 64) of plain cross-entropy on `sp`'s training split:
    a model that classifies, made in about a second (no attack)."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(sp.x_train), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(sp.x_train[idx]), sp.y_train[idx]).backward()
        opt.step()


def logging_trial(cfg, *, log, inner, **kw):
    """Runs `inner`, first appending '<name> <resume step>' to the file `log` (trials run in workers)."""
    with open(log, "a") as f:
        f.write(f"{cfg.name} {(kw.get('resume_state') or {}).get('step', 0)}\n")
    return inner(cfg, **kw)


def mlflow_trial_runs(runs_dir: Path, experiment: str = "quickstart"):
    """The MLflow client of `runs_dir`'s store and the experiment's trial runs by Optuna trial number."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(Path(runs_dir) / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.run_role = 'trial'")
    return client, {int(r.data.tags["optuna_trial_number"]): r for r in runs}
