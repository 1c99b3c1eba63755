"""What the driver does ahead of time (study.search.running.warmup, study.search.running.dense): a one-machine CPU study
starts pretraining in a process spawned before Ray starts; MLflow's import and store open in a thread while
Ray starts, and the Tracker waits for it; the report's imports start once no trial is left to start."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from study.search.running import warmup

TESTS = Path(__file__).resolve().parent

DRIVER = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
import conftest, ray
from conftest import QUICKSTART, fake_pretrain, fake_run_trial
from study.search.study import run_study
ray.cloudpickle.register_pickle_by_value(conftest)  # the trial workers do not see the tests folder
from study.search.optimize.space import load_space

def pretrain(cfg):
    import ray  # a fresh interpreter (spawned, never forked): Ray is not initialized in it
    with open({log!r}, "w") as f:
        json.dump({{"ray_up": ray.is_initialized(), "pid": os.getpid(), "ppid": os.getppid()}}, f)
    return fake_pretrain(cfg)

space = load_space(QUICKSTART, {{"study.n_trials": 1, "study.max_concurrent": 1, "study.gpus_per_trial": 0}})
out = run_study(space, runs_dir={runs!r}, final_eval=False, num_cpus=2, pretrain=pretrain,
                run_trial=fake_run_trial)
print("DRIVER", os.getpid(), out.status, out.complete)
"""


def test_a_one_machine_cpu_study_pretrains_in_a_process_spawned_before_ray_starts(tmp_path):
    log = tmp_path / "pretrain.json"
    code = DRIVER.format(tests=str(TESTS), log=str(log), runs=str(tmp_path / "runs"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    driver = next(line.split() for line in done.stdout.splitlines() if line.startswith("DRIVER"))
    assert driver[2:] == ["complete", "1"]
    seen = json.loads(log.read_text())
    assert seen["ray_up"] is False  # spawned before ray.init: Ray's start-up overlapped the pretraining
    assert seen["ppid"] == int(driver[1]) and seen["pid"] != int(driver[1])
    assert "spawned by the driver" in done.stdout


def test_the_tracker_waits_for_the_mlflow_warm_up_on_a_new_store(tmp_path, monkeypatch):
    from study.search.recording.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opened = []
    real = warmup._open

    def slow_open(u, go, state):
        time.sleep(0.5)  # a Tracker that did not wait would create the schema itself meanwhile
        real(u, go, state)
        opened.append(threading.current_thread().name)

    monkeypatch.setattr(warmup, "_open", slow_open)
    warmup.start_mlflow(uri)
    time.sleep(1.0)
    assert not (tmp_path / "mlflow.db").exists()  # imported only: the store waits for the checks to pass
    warmup.open_mlflow(uri)
    tracker = Tracker(uri, "exp")
    run = tracker.create_run("r", {"k": "v"})  # the schema is created once, by the warm-up, before this
    assert opened == ["mlflow-warm-up"] and uri not in warmup._threads
    assert tracker.client.get_run(run).data.tags["k"] == "v"


def test_the_report_imports_start_once_no_trial_is_left_to_start(monkeypatch):
    started = []
    monkeypatch.setattr("analysis.plots.preload", lambda: started.append(threading.current_thread().name))
    cb = warmup.ReportPreload(3)
    cb.on_trial_complete(1, trials=["a", "b"], trial="a")  # a third trial is still to come: no idle core
    assert not cb.started
    cb.on_trial_error(2, trials=["a", "b", "c"], trial="b")
    cb.on_trial_complete(3, trials=["a", "b", "c"], trial="c")  # once
    for t in threading.enumerate():
        if t.name == "report-imports":
            t.join()
    assert cb.started and started == ["report-imports"]


def test_the_parent_run_opens_in_a_thread_and_the_caller_gets_its_id_or_its_error():
    import pickle

    import pytest

    go = threading.Event()

    def slow_open():
        go.wait(10)
        return "run-1"

    parent = warmup.ParentRun(slow_open)
    assert pickle.loads(pickle.dumps(parent))._result == {}  # pickled while opening: unknown, no wait
    with pytest.raises(RuntimeError, match="unknown"):
        pickle.loads(pickle.dumps(parent))()
    go.set()
    assert parent() == "run-1"
    assert pickle.loads(pickle.dumps(parent))() == "run-1"

    def broken_open():
        raise OSError("database is locked")

    failed = warmup.ParentRun(broken_open)
    failed.join()  # waits and raises nothing
    with pytest.raises(OSError, match="locked"):
        failed()


def test_the_mlflow_callback_waits_for_the_parent_run_before_its_first_trial_run(tmp_path):
    from types import SimpleNamespace

    from study.keys import NUMBER_KEY
    from study.search.recording.tracking import Tracker
    from study.search.recording.trial_callback import MlflowTrialCallback

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "quickstart", artifact_root=str(tmp_path / "art"))
    opened = []

    def open_parent():
        time.sleep(0.5)
        run_id = tracker.create_run("quickstart", {"role": "study"})
        opened.append(run_id)
        return run_id

    callback = MlflowTrialCallback(tracker, "quickstart", warmup.ParentRun(open_parent), str(tmp_path / "space.yaml"),
                                   trial_config=lambda config: SimpleNamespace(flat=lambda: {}, to_dict=lambda: {}))
    (tmp_path / "space.yaml").write_text("study: {}\n")
    trial = SimpleNamespace(trial_id="t0", config={NUMBER_KEY: 0}, last_result={})
    callback.on_trial_start(0, [trial], trial)  # waits for the parent run, then nests the trial's run under it
    run = tracker.client.get_run(callback._runs["t0"])
    assert opened and run.data.tags["mlflow.parentRunId"] == opened[0]
