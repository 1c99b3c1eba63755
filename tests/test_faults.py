"""Fault tolerance with real SIGKILLs, on a Ray cluster started with `ray start --head` (one node, 2 CPUs).

1. A trial's worker process kills itself (SIGKILL) in the middle of training, once: Tune (FailureConfig
   max_failures=1) restarts it from its last epoch checkpoint (model with its pruning scores and mask,
   optimizer, LR schedule position, RNG) and the study ends with the requested number of COMPLETE trials.
2. The driver (`study run`) is killed with SIGKILL after its first trial completed: `study resume`
   finishes the study, with no trial lost or counted twice in Optuna or MLflow.

tests/test_study.py covers an in-process Ctrl-C + resume with fake trials; these use the real pipeline
on a tiny digits study and separate processes, so nothing gets to clean up after itself. Both drivers
run as subprocesses against the cluster; the cluster and drivers are killed by session id at the end
(see tests/test_multinode.py, whose helpers these share).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers of test_multinode (no package here)
from test_multinode import (  # noqa: E402
    LocalCluster, check_records, cmdline, hung, mlflow_runs, optuna_trials, study_cli, tail, write_space,
)

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster():
    root = Path(f"/tmp/rh_{os.getpid()}_f")
    root.mkdir(parents=True, exist_ok=True)
    c = LocalCluster(root)
    try:
        c.start_head(num_cpus=2)
        yield c
    finally:
        left = c.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes left behind: {[(p, cmdline(p)[:2]) for p in left]}"


# --- 1. a trial's worker process killed mid-training ------------------------------------------------------


def killing_trial(cfg, *, on_epoch=None, resume_state=None, victim: int, after_step: int, marker: str, log: str):
    """The real pipeline; Optuna trial `victim` SIGKILLs its own process (once: `marker`) while it trains the
    epoch after step `after_step`, i.e. after that step's checkpoint was reported. Every start appends a
    line to `log`: number, pid and what the resume state held."""
    from study.trial import pipeline

    number = int(cfg.name.rsplit("-", 1)[1])
    state = resume_state or {}
    with open(log, "a") as f:
        f.write(json.dumps({"number": number, "pid": os.getpid(), "step": int(state.get("step", 0)),
                            "stage": state.get("stage"), "epoch": state.get("epoch"), "keys": sorted(state),
                            "scores": any(k.endswith("scores") for k in state.get("model", {})),
                            "masks": any(k.endswith("mask") for k in state.get("model", {}))}) + "\n")

    def hook(report):
        if number == victim and report.step == after_step + 1 and not os.path.exists(marker):
            # The checkpoint of `after_step` went to Tune one epoch (plus this pause) ago: time enough for
            # the driver to register it. Die before reporting this epoch: its training is lost.
            time.sleep(2.0)
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        on_epoch(report)

    return pipeline.run_trial(cfg, on_epoch=hook if on_epoch else None, resume_state=resume_state)


def drive_with_a_killed_trial(space_file: str, runs: str, address: str, marker: str, log: str) -> None:
    """Driver process body: `study run` with `killing_trial`, shipped to the workers by value."""
    import ray

    from study.search import runner
    from study.search.space import load_space

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trial = functools.partial(killing_trial, victim=0, after_step=2, marker=marker, log=log)
    outcome = runner.run_study(load_space(space_file), runs_dir=runs, address=address, run_trial=trial)
    sys.exit(0 if outcome.status == "complete" else 3)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r}); {code}"]


@pytest.mark.slow
def test_killed_trial_process_resumes_from_its_checkpoint(tmp_path, cluster):
    t0 = time.perf_counter()
    runs, marker, log = tmp_path / "runs", tmp_path / "killed.pid", tmp_path / "starts.jsonl"
    space = write_space(tmp_path / "tiny.yaml", "workerkill", n_trials=2, max_concurrent=2, max_failures=1)
    args = ", ".join(repr(str(a)) for a in (space, runs, cluster.address, marker, log))
    driver_log = tmp_path / "driver.log"
    driver = cluster.popen(_python(f"import test_faults; test_faults.drive_with_a_killed_trial({args})"), driver_log)
    rc = driver.wait(timeout=300)
    assert rc == 0, tail(driver_log)
    assert marker.exists(), "the trial was never killed"

    starts = [json.loads(line) for line in log.read_text().splitlines()]
    victim = [s for s in starts if s["number"] == 0]
    assert len(victim) == 2, starts  # killed once, restarted once
    first, again = victim
    assert first["step"] == 0 and first["pid"] == int(marker.read_text())
    assert again["pid"] != first["pid"]  # a new worker process ...
    # ... that continued from the checkpoint of step 2 (the second and last prune epoch), not from scratch
    assert (again["step"], again["stage"], again["epoch"]) == (2, "prune", 2), again
    assert {"model", "optimizer", "scheduler", "generator", "stage", "epoch", "step"} <= set(again["keys"])
    assert again["scores"] and again["masks"]  # the pruning scores and mask travel with the model
    assert [s["step"] for s in starts if s["number"] == 1] == [0]  # the other trial was not disturbed

    # Optuna: exactly 2 COMPLETE; MLflow: one run per trial, train_loss once per epoch (1, 2, 3) despite the
    # restart; both agree with final.json in the runs folder
    check_records(runs, "workerkill", 2, epochs=3)
    client, _, mruns = mlflow_runs(runs, "workerkill")
    run0 = next(r for r in mruns if r.data.tags["optuna_trial_number"] == "0")
    assert [m.step for m in client.get_metric_history(run0.info.run_id, "step")] == [1, 2, 3, 4]  # 4 = final
    # Tune recorded the failure and the restart of that trial
    text = driver_log.read_text(errors="replace")
    assert "trial_0000 errored" in text or "Trial trial_0000 errored" in text, tail(driver_log)
    print(f"\n[faults] killed-trial study in {time.perf_counter() - t0:.1f}s")


# --- 2. the driver killed mid-study ------------------------------------------------------------------------


def _training(study_dir: Path) -> list[str]:
    """Tune trials with an epoch checkpoint and no final result yet (killing the driver now loses work)."""
    return [d.name for d in (study_dir / "tune" / study_dir.name).glob("trial_*")
            if list(d.glob("checkpoint_*")) and not (study_dir / "trials" / d.name[6:10] / "final.json").exists()]


@pytest.mark.slow
def test_killed_driver_is_resumed_without_duplicates(tmp_path, cluster):
    from optuna.trial import TrialState

    cluster.wait_idle()  # the previous test's trial actors are gone
    t0 = time.perf_counter()
    runs = tmp_path / "runs"
    n = 3
    # one trial at a time: the kill lands with a trial done, one training and one not started
    space = write_space(tmp_path / "tiny.yaml", "driverkill", n_trials=n, max_concurrent=1)
    run_log = tmp_path / "run.log"
    driver = cluster.popen(study_cli("run", str(space), "--runs-dir", str(runs), "--address", cluster.address),
                           run_log)
    db = runs / "driverkill" / "optuna.db"
    states: list = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if db.exists():
            try:
                states = [t.state for t in optuna_trials(runs, "driverkill")]
            except Exception:  # the study is not created yet, or the database is busy
                states = []
            if states.count(TrialState.COMPLETE) >= 1 and _training(runs / "driverkill"):
                break
        time.sleep(0.3)
    assert driver.poll() is None, f"the driver ended before the kill:\n{tail(run_log)}"
    if time.monotonic() >= deadline:  # no trial done in 240 s: the study is stuck somewhere, show where
        raise AssertionError(f"no trial complete after 240 s ({states}):\n{hung(driver, run_log)}")
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    killed_at = time.perf_counter() - t0
    training = _training(runs / "driverkill")
    states = [t.state for t in optuna_trials(runs, "driverkill")]
    complete_before = states.count(TrialState.COMPLETE)
    assert 1 <= complete_before < n, states
    _, parents, _ = mlflow_runs(runs, "driverkill")
    assert parents[0].info.status == "RUNNING"  # nobody closed it: the driver died without a word

    resume_log = tmp_path / "resume.log"
    resume = cluster.popen(study_cli("resume", "driverkill", "--runs-dir", str(runs), "--address",
                                     cluster.address), resume_log)
    rc = resume.wait(timeout=300)
    assert rc == 0, tail(resume_log)
    assert "restoring the Tune experiment" in resume_log.read_text()

    trials, mruns = check_records(runs, "driverkill", n, epochs=3)
    # the trials finished before the kill were neither rerun as new Optuna trials nor logged twice
    assert len({t.user_attrs["mlflow_run_id"] for t in trials}) == n
    assert len({r.data.tags["optuna_trial_number"] for r in mruns}) == len(mruns) == n
    print(f"\n[faults] driver killed at {killed_at:.1f}s with {complete_before}/{n} complete and "
          f"{training or 'no trial'} training; "
          f"resumed study done at {time.perf_counter() - t0:.1f}s")
