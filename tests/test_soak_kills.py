"""Kill soak: a 6-trial study whose driver is SIGKILLed, or sent SIGINT, or one of whose trial workers is
SIGKILLed, at a random (seeded) moment, then `study resume`d until it finishes; after each study:

- exactly n_trials finished Optuna trials (COMPLETE + FAIL + PRUNED), none left RUNNING;
- one nested MLflow run per Optuna trial (FINISHED for a COMPLETE trial), no metric logged twice at one step;
- no epoch trained twice past a checkpoint: every trial appends to trials/<n>/epochs.log a `start <pid> <step>`
  line when it (re)starts, `epoch <k>` when it has trained epoch k, `ckpt <k>` once epoch k's checkpoint is on
  disk (checkpoint_every_s 0: every epoch); an epoch at or below a checkpoint logged before it is a duplicate.

The drivers are `study run | resume` processes (the CLI's own main, with the fake trial of this module patched
in) against a one-node `ray start --head` cluster, each in its own session, killed by session id at the end
(tests/test_multinode.py's helpers, as tests/test_faults.py). A worker's pid is the one its trial writes to
trials/<n>/worker.pid (as test_faults' trial does).

`make test` runs one kill of each kind (slow); `make soak` (`-m soak`) runs SOAK_KILLS of each kind.
"""
from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers of test_multinode (no package here)
import conftest  # noqa: E402
from conftest import FakeResult, fake_run_trial  # noqa: E402 - globals of epoch_trial, shipped by value
from test_multinode import LocalCluster, cmdline, mlflow_runs, optuna_trials, tail  # noqa: E402

TESTS = Path(__file__).resolve().parent
NAME = "soak"
N_TRIALS = 6
EPOCHS = 4
EPOCH_S = 0.4
SOAK_KILLS = 20
KINDS = ("driver-sigkill", "driver-sigint", "worker-sigkill")


# --- the fake trial and the driver's body (run in other processes) ---------------------------------------


def epoch_trial(cfg, *, on_epoch=None, resume_state=None, epochs: int = EPOCHS, sleep: float = EPOCH_S):
    """conftest.fake_run_trial's metrics after `epochs` epochs of `sleep` seconds, logged in trials/<n>/."""
    from study.trial.pipeline import EpochReport

    number = int(cfg.name.rsplit("-", 1)[1])
    folder = Path(cfg.output_dir) / f"{number:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "worker.pid").write_text(str(os.getpid()))
    log = folder / "epochs.log"
    first = int(resume_state["step"]) + 1 if resume_state else 1

    def line(text: str) -> None:
        with open(log, "a") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())

    line(f"start {os.getpid()} {first - 1}")
    for step in range(first, epochs + 1):
        time.sleep(sleep)
        line(f"epoch {step}")
        if on_epoch is not None:
            on_epoch(EpochReport("finetune", step, step, {"train_loss": 1.0 / step, "val_robust_acc": 0.1 * step},
                                 lambda s=step: {"step": s}))
            line(f"ckpt {step}")  # on_epoch wrote the checkpoint (checkpoint_every_s 0) before reporting
    result = fake_run_trial(cfg, epochs=0)
    assert isinstance(result, FakeResult)
    return result


def drive(argv: list[str]) -> None:
    """A driver process: `study <argv>` through the CLI's main, with `epoch_trial` and conftest's fake
    pretraining in place of the real pipeline."""
    import ray

    from study import cli
    import study.search.study as study_module

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(conftest)
    for name in ("run_study", "resume_study"):
        setattr(study_module, name, functools.partial(getattr(study_module, name), run_trial=epoch_trial,
                                                      pretrain=conftest.fake_pretrain))
    sys.exit(cli.main(argv))


def _driver(argv: list[str]) -> list[str]:
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_soak_kills; "
            f"test_soak_kills.drive({argv!r})")
    return [sys.executable, "-c", code]


# --- the test side ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    root = Path(f"/tmp/rh_{os.getpid()}_s")
    root.mkdir(parents=True, exist_ok=True)
    c = LocalCluster(root)
    try:
        c.start_head(num_cpus=2)
        yield c
    finally:
        left = c.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes left behind: {[(p, cmdline(p)[:2]) for p in left]}"


def _epoch_lines(study: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in study.glob("trials/*/epochs.log"))


def _running_worker(study: Path) -> int | None:
    """The pid of a worker training a trial now (its pid file, no final.json yet), if any."""
    for folder in sorted(study.glob("trials/*")):
        pid_file = folder / "worker.pid"
        if pid_file.is_file() and not (folder / "final.json").exists():
            try:
                pid = int(pid_file.read_text())
            except ValueError:
                continue
            if cmdline(pid):  # alive
                return pid
    return None


def _kill_at_random(kind: str, proc, study: Path, rng: random.Random, progress_from: int, log: Path) -> bool:
    """Wait until the driver has trained an epoch more than `progress_from` lines of epoch logs, then a random
    0-3 s, then kill (the driver, or a worker training a trial). Returns whether a kill was sent."""
    deadline = time.monotonic() + 240
    while proc.poll() is None and _epoch_lines(study) <= progress_from:
        assert time.monotonic() < deadline, f"no progress in 240 s:\n{tail(log)}"
        time.sleep(0.1)
    time.sleep(rng.uniform(0.0, 3.0))
    if proc.poll() is not None:
        return False
    if kind == "worker-sigkill":
        pid = _running_worker(study)
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True
    os.kill(proc.pid, signal.SIGKILL if kind == "driver-sigkill" else signal.SIGINT)
    return True


def check_study(runs: Path) -> tuple[int, int]:
    """The invariants of a finished study (the module docstring). Returns (restarts of a trial, of which from
    a checkpoint)."""
    from optuna.trial import TrialState

    trials = optuna_trials(runs, NAME)
    states = [(t.number, t.state.name) for t in trials]
    assert sorted(t.number for t in trials) == list(range(N_TRIALS)), states
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED) for t in trials), states
    client, parents, mruns = mlflow_runs(runs, NAME)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [p.info.status for p in parents]
    numbers = sorted(int(r.data.tags["optuna_trial_number"]) for r in mruns)
    assert numbers == list(range(N_TRIALS)), numbers  # one run per trial, no duplicate
    for t in trials:  # only a kill may fail a trial: a worker killed more often than max_failures allows, or a
        # driver killed between Optuna's ask and the trial's last parameter (the resume fails it: never started)
        reason = t.user_attrs.get("fail_reason", "")
        assert t.state != TrialState.FAIL or "max_failures" in reason or "asked but never started" in reason, \
            (t.number, reason)
    by_number = {t.number: t for t in trials}
    for r in mruns:
        t = by_number[int(r.data.tags["optuna_trial_number"])]
        if t.state == TrialState.COMPLETE:
            assert r.info.status == "FINISHED", (t.number, r.info.status)
        for key in r.data.metrics:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert len(steps) == len(set(steps)), f"trial {t.number}: {key} logged twice at a step: {sorted(steps)}"
    restarts = from_checkpoint = 0
    for t in trials:
        log = runs / NAME / "trials" / f"{t.number:04d}" / "epochs.log"
        if not log.is_file():
            continue  # a trial that never started (it FAILed: killed more often than max_failures allows)
        checkpoint, trained = 0, set()
        for i, line in enumerate(log.read_text().splitlines()):
            what, *rest = line.split()
            if what == "start":
                restarts += i > 0
                from_checkpoint += int(rest[1]) > 0
                assert int(rest[1]) >= checkpoint, f"trial {t.number} restarted behind its checkpoint:\n{log.read_text()}"
            elif what == "epoch":
                k = int(rest[0])
                assert k > checkpoint, f"trial {t.number}: epoch {k} trained again past checkpoint {checkpoint}:\n" \
                                       f"{log.read_text()}"
                trained.add(k)
            elif what == "ckpt":
                checkpoint = max(checkpoint, int(rest[0]))
        if t.state == TrialState.COMPLETE:
            assert trained == set(range(1, EPOCHS + 1)), (t.number, log.read_text())
    return restarts, from_checkpoint


def soak(cluster, tmp_path: Path, kind: str, kills: int, seed: int) -> dict:
    """Studies killed `kills` times in all (`kind`), each resumed until it finishes and then checked."""
    rng = random.Random(seed)
    done, studies, resumes, restarts, from_checkpoint = 0, 0, 0, 0, 0
    t0 = time.perf_counter()
    while done < kills:
        runs = tmp_path / f"study{studies}" / "runs"
        study = runs / NAME
        log = tmp_path / f"study{studies}.log"
        flags = ["--runs-dir", str(runs), "--address", cluster.address, "--no-final-eval"]
        argv = ["run", str(TESTS.parent / "search_spaces" / "quickstart.yaml"), "--set", f"study.name={NAME}",
                "--set", f"study.n_trials={N_TRIALS}", "--set", "study.max_concurrent=2",
                "--set", "study.checkpoint_every_s=0", "--set", "study.gpus_per_trial=0", *flags]
        for attempt in range(2 * kills + 20):
            proc = cluster.popen(_driver(argv), log)
            killed = done < kills and _kill_at_random(kind, proc, study, rng, _epoch_lines(study), log)
            rc = proc.wait(timeout=300)
            done += killed
            if kind == "driver-sigkill" and killed:
                assert rc == -signal.SIGKILL, (rc, tail(log))
            elif kind == "driver-sigint" and killed:
                # 0: the study ended as the signal came; -SIGINT: it came during the interpreter's exit, after
                # Python put back the default handler (a shell shows 130 for both that and a handled Ctrl-C)
                assert rc in (0, 130, -signal.SIGINT), (rc, tail(log))
                # the driver's own output; a trial worker's lines (Ray prefixes them "(study_trainable pid=N)") may
                # carry Ray's own SIGTERM teardown ("Exception ignored ... SystemExit: 1"), once in 20 soak kills
                driver = [ln for ln in log.read_text(errors="replace").splitlines() if " pid=" not in ln[:60]]
                assert not [ln for ln in driver if "Traceback" in ln], tail(log)
            else:
                assert rc == 0, (rc, tail(log))
            cluster.wait_idle()  # a dead driver's trial actors are gone before the next driver starts
            if rc == 0 and not (killed and kind != "worker-sigkill"):
                break
            argv = ["resume", NAME, *flags]
            resumes += 1
        else:
            raise AssertionError(f"the study never finished:\n{tail(log)}")
        again, resumed = check_study(runs)
        restarts, from_checkpoint, studies = restarts + again, from_checkpoint + resumed, studies + 1
    summary = {"kind": kind, "kills": done, "studies": studies, "resumes": resumes, "trial_restarts": restarts,
               "from_checkpoint": from_checkpoint, "wall_s": round(time.perf_counter() - t0, 1)}
    print(f"\n[soak] {json.dumps(summary)}")
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_one_kill_of_each_kind_is_resumed_without_duplicates(cluster, tmp_path, kind):
    soak(cluster, tmp_path, kind, kills=1, seed=KINDS.index(kind))


@pytest.mark.soak
@pytest.mark.parametrize("kind", KINDS)
def test_soak_kills(cluster, tmp_path, kind):
    kills = int(os.environ.get("SOAK_KILLS", SOAK_KILLS))
    soak(cluster, tmp_path, kind, kills=kills, seed=100 + KINDS.index(kind))
