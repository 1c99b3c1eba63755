"""Fault tolerance with real SIGKILLs, on a Ray cluster started with `ray start --head` (one node, 2 CPUs).

1. A trial's worker process kills itself (SIGKILL) in the middle of training, once, under the default
   study.max_failures: Tune reruns it (the same Tune trial, the same Optuna number) and it continues from its
   last checkpoint, trials/<number>/checkpoint.pt (model with its pruning scores and mask, optimizer, LR
   schedule position, RNG). Beside it a trial that raises is failed once, with its real reason, and never
   rerun: the trainable records its own errors, so Tune's retry sees only the dead worker.
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


def killing_trial(cfg, *, on_epoch=None, resume_state=None, victim: int, after_step: int, marker: str, log: str,
                  raiser: int = -1):
    """The real pipeline; Optuna trial `victim` SIGKILLs its own process (once: `marker`) while it trains the
    epoch after step `after_step`, i.e. after that step's checkpoint was written; trial `raiser` raises
    after its first epoch. Every start appends a line to `log`: number, pid and what the resume state held."""
    from study.trial import pipeline

    number = int(cfg.name.rsplit("-", 1)[1])
    state = resume_state or {}
    with open(log, "a") as f:
        f.write(json.dumps({"number": number, "pid": os.getpid(), "step": int(state.get("step", 0)),
                            "stage": state.get("stage"), "epoch": state.get("epoch"), "keys": sorted(state),
                            "scores": any(k.endswith("scores") for k in state.get("model", {})),
                            "masks": any(k.endswith("mask") for k in state.get("model", {}))}) + "\n")

    def hook(report):
        if number == raiser:
            on_epoch(report)
            raise RuntimeError(f"planted failure in trial {number}")
        if number == victim and report.step == after_step + 1 and not os.path.exists(marker):
            # The checkpoint of `after_step` is on disk (on_epoch wrote it); its report went to Tune one epoch
            # (plus this pause) ago, time enough for the driver to log it. Die before reporting this epoch.
            time.sleep(2.0)
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        on_epoch(report)

    return pipeline.run_trial(cfg, on_epoch=hook if on_epoch else None, resume_state=resume_state)


def drive_with_a_killed_trial(space_file: str, runs: str, address: str, marker: str, log: str) -> None:
    """Driver process body: `study run` with `killing_trial`, shipped to the workers by value."""
    import ray

    from study.search.optimize.space import load_space
    from study.search.study import run_study

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trial = functools.partial(killing_trial, victim=0, after_step=2, marker=marker, log=log, raiser=1)
    outcome = run_study(load_space(space_file), runs_dir=runs, address=address, run_trial=trial)
    sys.exit(0 if outcome.status == "complete" else 3)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r}); {code}"]


@pytest.mark.slow
def test_killed_worker_reruns_from_its_checkpoint_and_a_raising_trial_fails_once(tmp_path, cluster):
    from optuna.trial import TrialState

    t0 = time.perf_counter()
    runs, marker, log = tmp_path / "runs", tmp_path / "killed.pid", tmp_path / "starts.jsonl"
    space = write_space(tmp_path / "tiny.yaml", "workerkill", n_trials=3, max_concurrent=2, max_failures=None)
    args = ", ".join(repr(str(a)) for a in (space, runs, cluster.address, marker, log))
    driver_log = tmp_path / "driver.log"
    driver = cluster.popen(_python(f"import test_faults; test_faults.drive_with_a_killed_trial({args})"), driver_log)
    rc = driver.wait(timeout=420)
    assert rc == 0, tail(driver_log)
    assert marker.exists(), "the trial was never killed"

    starts = [json.loads(line) for line in log.read_text().splitlines()]
    victim = [s for s in starts if s["number"] == 0]
    assert len(victim) == 2, starts  # killed once, rerun once (the default max_failures)
    first, again = victim
    assert first["step"] == 0 and first["pid"] == int(marker.read_text())
    assert again["pid"] != first["pid"]  # a new worker process ...
    # ... that continued from the checkpoint of step 2 (the second and last prune epoch), not from scratch
    assert (again["step"], again["stage"], again["epoch"]) == (2, "prune", 2), again
    assert {"model", "optimizer", "scheduler", "generator", "stage", "epoch", "step"} <= set(again["keys"])
    assert again["scores"] and again["masks"]  # the pruning scores and mask travel with the model
    assert [s["step"] for s in starts if s["number"] == 1] == [0]  # the raising trial ran once, never retried
    assert [s["step"] for s in starts if s["number"] == 2] == [0]  # the other trial was not disturbed

    trials = {t.number: t for t in optuna_trials(runs, "workerkill")}
    assert [trials[n].state for n in range(3)] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    reason = "the trial raised RuntimeError: planted failure in trial 1"
    assert trials[1].user_attrs["fail_reason"] == reason  # the real reason, not "the trial raised"
    final = json.loads((runs / "workerkill" / "trials" / "0001" / "final.json").read_text())
    assert final["fail_reason"] == reason
    assert not list((runs / "workerkill" / "trials").glob("*/checkpoint.pt"))  # removed when each trial ended
    client, parents, mruns = mlflow_runs(runs, "workerkill")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_number = {int(r.data.tags["optuna_trial_number"]): r for r in mruns}
    assert sorted(by_number) == [0, 1, 2]
    assert by_number[1].info.status == "FAILED" and by_number[1].data.tags["fail_reason"] == reason
    for n in (0, 2):
        run, t = by_number[n], trials[n]
        assert run.info.status == "FINISHED" and t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.metrics["val_robust_acc"] == pytest.approx(t.values[1])
        loss = [m.step for k in ("prune/train_loss", "finetune/train_loss")
                for m in client.get_metric_history(run.info.run_id, k)]
        assert sorted(loss) == [1, 2, 3]  # once per epoch despite the rerun
    # the rerun trial logged steps 1, 2, 3 (epochs, by stage) and 4 (final) once each
    rerun = by_number[0].info.run_id
    hist = {k: [m.step for m in client.get_metric_history(rerun, k)] for k in client.get_run(rerun).data.metrics}
    assert all(len(steps) == len(set(steps)) for steps in hist.values()), hist
    assert sorted({s for k, steps in hist.items() if "/" in k for s in steps}) == [1, 2, 3]
    assert hist["val_robust_acc"] == [4] and not {"step", "epoch", "stage"} & set(hist)
    # Tune recorded the failure and the rerun of that trial
    text = driver_log.read_text(errors="replace")
    assert ("trial_0000 errored" in text or "Trial task failed for trial trial_0000" in text), tail(driver_log)
    print(f"\n[faults] killed-worker study in {time.perf_counter() - t0:.1f}s")


# --- 2. the driver killed mid-study ------------------------------------------------------------------------


def _training(study_dir: Path) -> list[str]:
    """Trials with an epoch checkpoint and no final result yet (killing the driver now loses work)."""
    return [d.name for d in (study_dir / "trials").glob("*")
            if (d / "checkpoint.pt").exists() and not (d / "final.json").exists()]


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
    assert "resuming study 'driverkill' from its Optuna storage" in resume_log.read_text()

    trials, mruns = check_records(runs, "driverkill", n, epochs=3)
    # the trials finished before the kill were neither rerun as new Optuna trials nor logged twice
    assert len({t.user_attrs["mlflow_run_id"] for t in trials}) == n
    assert len({r.data.tags["optuna_trial_number"] for r in mruns}) == len(mruns) == n
    print(f"\n[faults] driver killed at {killed_at:.1f}s with {complete_before}/{n} complete and "
          f"{training or 'no trial'} training; "
          f"resumed study done at {time.perf_counter() - t0:.1f}s")
