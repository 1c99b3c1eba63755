"""Fractional GPUs per trial: `study.gpus_per_trial: 0.25` lets four small trials share one GPU.

Ray schedules by declared resources, so a local Ray that declares one GPU shows the scheduling on a
machine without one: the fake trials only record when they ran and which GPU Ray gave them."""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import pytest

from conftest import QUICKSTART, fake_pretrain, fake_run_trial
from study.search.optimize.space import load_space
from study.search.study import run_study


@pytest.fixture(scope="module")
def ray_with_one_gpu():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(sys.modules["conftest"])
    yield
    ray.shutdown()


def gpu_trial(cfg, *, log, started, at_once, **kw):
    """Records when it ran on which GPU. It waits (up to 30 s) until `at_once` trials have started, so that
    trials Ray lets run together overlap however slowly a loaded machine starts their workers."""
    import ray

    start = time.time()
    with open(started, "a") as f:
        f.write("x\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(open(started).read().split()) < at_once:
        time.sleep(0.05)
    time.sleep(1.0)
    with open(log, "a") as f:
        f.write(json.dumps({"start": start, "end": time.time(), "gpus": [str(g) for g in ray.get_gpu_ids()],
                            "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
    return fake_run_trial(cfg, **kw)


def _most_at_once(intervals):
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


@pytest.mark.usefixtures("ray_with_one_gpu")
@pytest.mark.parametrize("share, at_once", [(0.25, 4), (0.5, 2)])
def test_trials_share_one_gpu_by_their_fraction(tmp_path, share, at_once):
    log = tmp_path / "trials.jsonl"
    space = load_space(QUICKSTART, {"study.n_trials": 4, "study.max_concurrent": 4, "study.cpus_per_trial": 1,
                                    "study.gpus_per_trial": share, "trial.device": "cpu"})  # the GPU is Ray's only
    outcome = run_study(space, runs_dir=tmp_path / "runs", final_eval=False, pretrain=fake_pretrain,
                        run_trial=functools.partial(gpu_trial, log=str(log), started=str(tmp_path / "started"),
                                                    at_once=at_once))
    assert outcome.status == "complete" and outcome.complete == 4
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 4
    assert all(r["gpus"] == ["0"] and r["visible"] == "0" for r in rows)  # the same GPU, shared
    assert _most_at_once([(r["start"], r["end"]) for r in rows]) == at_once


@pytest.mark.usefixtures("ray_with_one_gpu")
def test_a_trial_given_a_gpu_it_cannot_use_fails_in_one_line(tmp_path):
    """Ray hands these trials a GPU that CUDA cannot see (a Ray resource only, like a node whose driver does
    not match torch's CUDA build): without `trial.device: cpu` each fails with the reason, never trains on
    the CPU without a word."""
    import optuna

    space = load_space(QUICKSTART, {"study.n_trials": 2, "study.max_concurrent": 2, "study.cpus_per_trial": 1,
                                    "study.gpus_per_trial": 0.5})
    outcome = run_study(space, runs_dir=tmp_path / "runs", final_eval=False, pretrain=fake_pretrain,
                        run_trial=fake_run_trial)
    assert outcome.complete == 0
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp_path / 'runs' / 'quickstart' / 'optuna.db'}")
    reasons = [t.user_attrs.get("fail_reason", "") for t in study.trials]
    assert len(reasons) == 2 and all("GpuUnusable" in r and "CUDA is unusable" in r for r in reasons), reasons
