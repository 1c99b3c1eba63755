"""The study's dense model (study.search.running.dense): pretraining overlaps the driver's set-up and the trial
workers' start, yet no trial trains before the dense model exists; a failed pretraining stops the search
with its own error and removes the new study; a cached model needs no pretraining at all."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUICKSTART, fake_pretrain, fake_run_trial
from study.search.optimize.space import load_space
from study.search.running import dense
from study.search.study import resume_study, run_study


@pytest.fixture(autouse=True, scope="module")
def _ship_this_module(local_ray):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _space(n_trials=2, concurrent=2):
    return load_space(QUICKSTART, {"study.n_trials": n_trials, "study.max_concurrent": concurrent})


def _trial_worker_alive() -> bool:
    """A Tune trial's Ray worker process exists (Ray titles it ray::ImplicitFunc...). Read from the process
    table, not Ray's API: a process spawned by the driver must not use the driver's Ray connection."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if any("ImplicitFunc" in part for part in (p.info["cmdline"] or [])):
            return True
    return False


def slow_pretrain(cfg, *, log, after=6.0):
    """Ends `after` seconds after a trial's Ray worker is alive (a trial that did not wait would have started)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _trial_worker_alive():
        time.sleep(0.1)
    assert _trial_worker_alive(), "no trial worker started while the dense model was pretrained"
    time.sleep(after)
    path = fake_pretrain(cfg)
    with open(log, "a") as f:
        f.write(json.dumps({"kind": "pretrain", "end": time.time(), "pid": os.getpid(), "ppid": os.getppid()}) + "\n")
    return path


def stamped_trial(cfg, *, log, **kw):
    with open(log, "a") as f:
        f.write(json.dumps({"kind": "trial", "start": time.time(), "pid": os.getpid()}) + "\n")
    return fake_run_trial(cfg, **kw)


def broken_pretrain(cfg):
    from study.trial.data import DataError

    raise DataError("data set 'digits' vanished")


def _events(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["spawned", "task"])
def test_no_trial_trains_before_the_dense_model_exists(tmp_path, monkeypatch, capsys, mode):
    if mode == "task":  # what a cluster gets: a Ray task on a trial's resources
        monkeypatch.setattr(dense, "single_machine", lambda cpus: False)
    log = tmp_path / "events.jsonl"
    outcome = run_study(_space(), runs_dir=tmp_path / "runs", final_eval=False,
                        pretrain=functools.partial(slow_pretrain, log=str(log)),
                        run_trial=functools.partial(stamped_trial, log=str(log)))
    assert outcome.status == "complete" and outcome.complete == 2
    events = _events(log)
    pre = [e for e in events if e["kind"] == "pretrain"]
    trials = [e for e in events if e["kind"] == "trial"]
    assert len(pre) == 1 and len(trials) == 2
    assert all(t["start"] >= pre[0]["end"] for t in trials)  # their workers were up: they waited
    assert pre[0]["pid"] != os.getpid() and (pre[0]["ppid"] == os.getpid()) == (mode == "spawned")
    out = capsys.readouterr().out
    assert ("spawned by the driver" in out) == (mode == "spawned") and "dense model ready" in out


def test_a_failed_pretraining_task_stops_the_search_and_removes_the_new_study(tmp_path, monkeypatch):
    from study.trial.data import DataError

    monkeypatch.setattr(dense, "single_machine", lambda cpus: False)
    runs = tmp_path / "runs"
    t0 = time.monotonic()
    with pytest.raises(DataError, match="vanished"):  # its own error, not Ray's wrapper
        run_study(_space(n_trials=6), runs_dir=runs, run_trial=fake_run_trial, pretrain=broken_pretrain)
    assert time.monotonic() - t0 < 60
    assert not (runs / "quickstart").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    assert not client.search_runs([exp.experiment_id])  # the parent run and any trial run: deleted


def test_fresh_keeps_the_dense_model_and_the_driver_finds_it_in_the_cache(tmp_path, capsys):
    runs = tmp_path / "runs"
    run_study(_space(n_trials=1, concurrent=1), runs_dir=runs, final_eval=False, pretrain=fake_pretrain,
              run_trial=fake_run_trial)
    cached = list((runs / "quickstart" / "pretrained").glob("*.pt"))
    assert len(cached) == 1
    capsys.readouterr()
    # pretrain=None: the pipeline's own, which would train for real; the driver finds the checkpoint instead
    again = run_study(_space(n_trials=1, concurrent=1), runs_dir=runs, final_eval=False, fresh=True,
                      run_trial=fake_run_trial)
    assert again.status == "complete"
    out = capsys.readouterr().out
    assert f"dense model found in the cache: {cached[0]}" in out and "pretraining the dense model" not in out


def test_the_pretraining_handle_and_the_wait(tmp_path):
    from study.trial.config import trial_from_dict

    from conftest import TINY_TRIAL

    cfg = trial_from_dict(TINY_TRIAL, {"cache_dir": str(tmp_path)})
    assert not dense.cached(cfg)
    p = dense.Pretraining(cfg, 1, 0, fake_pretrain, lambda c, threads, pre: pre(c), local=True)  # a spawned process
    handle = p.handle()
    assert set(handle) == {"marker"}
    dense.wait_for(handle)  # returns once the marker is written
    p.check()
    assert dense.cached(cfg) and p.path == str(tmp_path / cfg.pretrain_file_name())
    never = dense.Pretraining(cfg, 1, 0, None, lambda *a: pytest.fail("a cached model is not pretrained again"))
    assert never.handle() is None and never.poll() and never.path == str(tmp_path / cfg.pretrain_file_name())
    missing = trial_from_dict(TINY_TRIAL, {"cache_dir": str(tmp_path), "pretrained": str(tmp_path / "no.pt")})
    assert not dense.cached(missing)


def sleepy_pretrain(cfg, *, pidfile, seconds=120.0):
    """Writes its pid, then trains for `seconds` (the driver is interrupted long before)."""
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return fake_pretrain(cfg)


def test_ctrl_c_while_the_dense_model_trains_stops_it_and_resume_pretrains_again(tmp_path):
    import signal
    import threading

    import psutil

    runs, pidfile = tmp_path / "runs", tmp_path / "pretrain.pid"

    def interrupt_once_a_trial_waits():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (_trial_worker_alive() and pidfile.exists()):
            time.sleep(0.2)
        time.sleep(1.0)  # Tune's fit is running: its SIGINT handler stops the search
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_a_trial_waits, daemon=True).start()
    t0 = time.monotonic()
    first = run_study(_space(n_trials=2), runs_dir=runs, final_eval=False,
                      pretrain=functools.partial(sleepy_pretrain, pidfile=str(pidfile)),
                      run_trial=fake_run_trial)
    assert first.status == "interrupted" and first.complete == 0
    assert time.monotonic() - t0 < 100  # not the 120 s of the pretraining
    child = int(pidfile.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert not list((runs / "quickstart" / "pretrained").glob("*.pt"))  # nothing half-written in the cache
    again = resume_study("quickstart", runs_dir=runs, final_eval=False, pretrain=fake_pretrain,
                         run_trial=fake_run_trial)
    assert again.status == "complete" and again.complete == 2


def marking_pretrain(cfg, *, mark):
    with open(mark, "a") as f:
        f.write(f"{os.getpid()}\n")
    return fake_pretrain(cfg)


def test_a_resume_with_no_trial_left_pretrains_nothing(tmp_path, capsys):
    """A resume that only ends the study (every Optuna trial finished: the front, the report) used to fork
    the dense model's pretraining before Ray started, whenever the model was not cached, for nothing."""
    runs, mark = tmp_path / "runs", tmp_path / "pretrained-by"
    first = run_study(_space(n_trials=1, concurrent=1), runs_dir=runs, final_eval=False,
                      pretrain=functools.partial(marking_pretrain, mark=str(mark)), run_trial=fake_run_trial)
    assert first.status == "complete" and len(mark.read_text().split()) == 1
    for cached in (runs / "quickstart" / "pretrained").glob("*.pt"):
        cached.unlink()  # not in the cache: only the number of trials left says that none is needed
    capsys.readouterr()
    again = resume_study("quickstart", runs_dir=runs, final_eval=False,
                         pretrain=functools.partial(marking_pretrain, mark=str(mark)), run_trial=fake_run_trial)
    assert again.status == "complete" and again.complete == 1
    assert "pretraining the dense model" not in capsys.readouterr().out
    assert len(mark.read_text().split()) == 1  # the first run's pretraining only


HUNG_PATH = """
import sys, tempfile
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(2)
a = torch.rand(600, 600)
(a @ a).sum()  # the driver has run torch with 2 threads: its OpenMP pool is up
from conftest import TINY_TRIAL
from study.trial.config import trial_from_dict
from study.search.running import dense
from study.search.running.trainable import pretrain_task
cfg = trial_from_dict({{**TINY_TRIAL, "pretrain": {{"epochs": 1, "lr": 0.05}}, "cache_dir": {cache!r}}})
p = dense.Pretraining(cfg, 2, 0.0, None, pretrain_task, local=True)  # 2 threads, as cpus_per_trial: 2
print("ENDED" if p.poll(timeout=150) else "HUNG", p.path, p.error, flush=True)
p.cancel()
"""


@pytest.mark.slow
def test_two_thread_pretraining_after_torch_ran_in_the_driver_finishes(tmp_path):
    """The path that hung: `study.cpus_per_trial: 2` on one machine. A fork of a driver whose OpenMP pool is
    up deadlocked in the child's first 2-thread op (reproduced with the fork: still running after 90 s; the
    real pretraining takes seconds); the spawned process finishes. A script with no __main__ guard, too."""
    code = HUNG_PATH.format(tests=str(Path(__file__).resolve().parent), cache=str(tmp_path / "cache"))
    script = tmp_path / "driver.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ENDED" in done.stdout and "None" == done.stdout.split()[-1], done.stdout
    assert list((tmp_path / "cache").glob("*.pt"))
