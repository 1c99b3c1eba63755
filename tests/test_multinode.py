"""A real two-node Ray cluster on one machine: a study driven against it, its trials on the second node.

`ray start --head` (no CPUs: it can run neither a trial nor the pretraining task) and a second
`ray start --address=...` with 2 CPUs of its own: two raylets, two Ray nodes (as `ray.nodes()` lists
them). `study run --address` drives a tiny digits study against the head; every trial must have run on
the second node (each trial's final report carries `ray_node_id`), and the results must be in the
study's runs folder (the "shared storage": Tune's experiment, final.json per trial), Optuna and MLflow.

Every process a test starts runs in a session of its own (`start_new_session`), and the teardown kills
those sessions by id: SIGTERM, then SIGKILL. Not `ray stop`: it kills every Ray process of the machine
by name, other people's clusters included. The helpers here are shared with tests/test_faults.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")

# The tiny study: digits (embedded), 256 training images, 1 pretraining epoch, 2 prune + 1 finetune epochs.
TINY_SPACE = """\
# Tiny digits study for the multi-node and fault tests (a few seconds per trial on one CPU).
study:
  name: {name}
  sampler: random
  n_trials: {n_trials}
  max_concurrent: {max_concurrent}
  cpus_per_trial: 1
  gpus_per_trial: 0
  max_failures: {max_failures}
  checkpoint_every_s: 0   # a resume checkpoint every epoch: the fault tests resume from a given epoch
  seed: 0
  objectives:
    - {{metric: params_kept, mode: min}}
    - {{metric: val_robust_acc, mode: max}}
  confirm: {{points: 32, steps: 5, restarts: 1, autoattack: false}}  # the test-split check, kept cheap here
trial:
  data: {{name: digits, batch_size: 64, train_limit: {train_limit}}}
  model: {{arch: small_cnn}}
  pretrain_attack: {{loss: pgd, eps: 0.1, steps: 1}}
  attack: {{loss: pgd, eps: 0.1, steps: 1}}
  pretrain: {{epochs: 1, lr: 0.05}}
  prune_stage: {{epochs: {prune_epochs}, lr: 0.1}}
  finetune: {{epochs: 1, lr: 0.01}}
  eval: {{steps: 2, points: 100, val_points: 64, val_steps: 1}}
search:
  prune.keep_fraction: {{float: [0.05, 0.5], log: true}}
  prune.score_init: {{choice: [ssi, kaiming_normal]}}
"""


def write_space(path: Path, name: str, n_trials: int, max_concurrent: int = 2, max_failures: int | None = 0,
                train_limit: int = 256, prune_epochs: int = 2) -> Path:
    """TINY_SPACE; `max_failures=None` leaves the key out (the study's default)."""
    text = TINY_SPACE.format(name=name, n_trials=n_trials, max_concurrent=max_concurrent, max_failures=max_failures,
                             train_limit=train_limit, prune_epochs=prune_epochs)
    if max_failures is None:
        text = "\n".join(line for line in text.split("\n") if not line.startswith("  max_failures:"))
    path.write_text(text)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """The environment of every process started here: no RAY_ADDRESS from outside, and token auth off
    explicitly (a local `ray.init()` elsewhere in the session may have set RAY_AUTH_MODE=token, and a
    head finding ~/.ray/auth_token turns it on by itself while a worker node does not)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (a process started with start_new_session=True has sid == pid;
    every Ray process that `ray start` launches, workers included, inherits it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            pids.append(int(entry.name))
    return pids


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def kill_sessions(sids: list[int], grace_s: float = 3.0) -> list[int]:
    """SIGTERM every process of these sessions, SIGKILL what is left after `grace_s`; returns the pids
    still alive at the end (should be none)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for sid in sids:
            for pid in session_pids(sid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(session_pids(s) for s in sids):
            time.sleep(0.2)
    return [p for s in sids for p in session_pids(s)]


class LocalCluster:
    """Ray nodes on this machine, started with `ray start`, each in its own session and temp dir."""

    def __init__(self, root: Path):
        self.root = root  # short: Ray's unix socket paths live under it
        self.sessions: list[int] = []
        self.address = ""
        self.env = ray_env()
        self.logs: list[Path] = []

    def _start(self, name: str, args: list[str]) -> int:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with open(log, "w") as out:
            proc = subprocess.Popen([RAY, "start", *args, "--disable-usage-stats"], stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True)
        self.sessions.append(proc.pid)
        rc = proc.wait(timeout=120)
        assert rc == 0, f"ray start for {name} failed ({rc}):\n{log.read_text()[-3000:]}"
        return proc.pid

    def _ports(self) -> list[str]:
        return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]

    def start_head(self, num_cpus: int) -> str:
        port = free_port()
        self._start("head", ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
                             "--num-gpus=0", "--node-name=head", "--include-dashboard=false",
                             f"--dashboard-port={free_port()}",
                             f"--temp-dir={self.root / 'h'}", *self._ports()])
        self.address = f"127.0.0.1:{port}"
        return self.address

    def add_node(self, name: str, num_cpus: int) -> str:
        """Start a worker node; returns its Ray node id (read from its raylet's command line)."""
        sid = self._start(name, [f"--address={self.address}", "--node-ip-address=127.0.0.1",
                                 f"--num-cpus={num_cpus}", "--num-gpus=0", f"--node-name={name}",
                                 f"--temp-dir={self.root / name}", *self._ports()])
        return self.node_id(sid)

    def node_id(self, sid: int) -> str:
        for pid in session_pids(sid):
            args = cmdline(pid)
            if args and args[0].endswith("/raylet"):
                return next(a.split("=", 1)[1] for a in args if a.startswith("--node_id="))
        raise AssertionError(f"no raylet in session {sid}")

    def popen(self, args: list[str], log: Path) -> subprocess.Popen:
        """A driver process (its own session, killed with the cluster)."""
        out = open(log, "w")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                start_new_session=True)
        out.close()
        self.sessions.append(proc.pid)
        return proc

    def wait_idle(self, timeout: float = 90.0) -> None:
        """Until every CPU of the cluster is free again: the actors of an earlier driver in the same cluster
        are released by Ray some time after that driver exits (a study started meanwhile would wait)."""
        probe = ("import json, time, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False)\n"
                 "deadline = time.monotonic() + %r\n"
                 "while time.monotonic() < deadline and ray.available_resources().get('CPU', 0) < "
                 "ray.cluster_resources().get('CPU', 0): time.sleep(0.5)\n"
                 "print(json.dumps([ray.available_resources().get('CPU', 0), ray.cluster_resources().get('CPU', 0)]))"
                 % (self.address, timeout))
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=self.env,
                             timeout=timeout + 60)
        assert out.returncode == 0, out.stderr[-3000:]
        free, total = json.loads(out.stdout.strip().splitlines()[-1])
        assert free >= total, f"{total - free} of {total} CPUs still held {timeout:.0f} s after the last driver"

    def stop(self) -> list[int]:
        left = kill_sessions(list(reversed(self.sessions)))
        return left


@pytest.fixture
def cluster_root():
    root = Path(f"/tmp/rh_{os.getpid()}_{time.monotonic_ns() % 10**6}")
    root.mkdir(parents=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def study_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "study.cli", *args]


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


def hung(proc: subprocess.Popen, log: Path, chars: int = 12000) -> str:
    """What a `study` driver that did not get on was doing: its threads' stacks (the CLI dumps them on
    SIGUSR1) and the end of its log, for a failure message."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(2)
    return tail(log, chars)


# --- reading a study's records ------------------------------------------------------------------------


def optuna_trials(runs: Path, name: str) -> list:
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{runs / name / 'optuna.db'}")
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def mlflow_runs(runs: Path, name: str) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    found = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in found if r.data.tags.get("run_role") == "study"]
    trials = [r for r in found if r.data.tags.get("run_role") == "trial"]
    return client, parents, trials


def check_records(runs: Path, name: str, n_trials: int, epochs: int = 3) -> tuple[list, list]:
    """Exactly n_trials COMPLETE Optuna trials (numbers 0..n-1, none RUNNING); one FINISHED nested MLflow
    run per Optuna number under one parent, each with one value per epoch (no duplicates) and the final
    metrics equal to Optuna's; a final.json per trial in the runs folder."""
    from optuna.trial import TrialState

    trials = optuna_trials(runs, name)
    assert sorted(t.number for t in trials) == list(range(n_trials)), [(t.number, t.state) for t in trials]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * n_trials, [(t.number, t.state) for t in trials]
    client, parents, mruns = mlflow_runs(runs, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    numbers = sorted(int(r.data.tags["optuna_trial_number"]) for r in mruns)
    assert numbers == list(range(n_trials)), numbers  # one nested run per Optuna trial, no duplicate
    by_number = {t.number: t for t in trials}
    for r in mruns:
        t = by_number[int(r.data.tags["optuna_trial_number"])]
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.info.status == "FINISHED"
        assert t.user_attrs["mlflow_run_id"] == r.info.run_id
        assert r.data.metrics["val_robust_acc"] == pytest.approx(t.values[1])
        assert r.data.metrics["params_kept"] == pytest.approx(t.values[0])
        history = [m for k in r.data.metrics if k.endswith("/train_loss")  # prune/..., finetune/...
                   for m in client.get_metric_history(r.info.run_id, k)]
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), [(m.step, m.value) for m in history]
        final = json.loads((runs / name / "trials" / f"{t.number:04d}" / "final.json").read_text())
        assert final["val_robust_acc"] == pytest.approx(t.values[1])
    return trials, mruns


# --- the test ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_study_on_a_two_node_cluster_runs_its_trials_on_the_second_node(tmp_path, cluster_root):
    t0 = time.perf_counter()
    cluster = LocalCluster(cluster_root)
    runs = tmp_path / "runs"
    space = write_space(tmp_path / "tiny.yaml", "multinode", n_trials=2, max_concurrent=2)
    try:
        address = cluster.start_head(num_cpus=0)  # the head can take no trial and no pretraining task
        worker = cluster.add_node("node2", num_cpus=2)
        head = cluster.node_id(cluster.sessions[0])
        assert worker != head
        started = time.perf_counter() - t0

        # the cluster as a driver sees it: two alive nodes, their CPUs, our names
        probe = subprocess.run([sys.executable, "-c", (
            "import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps([[n['NodeID'], n['Alive'], n['Resources'].get('CPU', 0), n.get('NodeName', '')] "
            "for n in ray.nodes()]))") % address], env=cluster.env, cwd=ROOT, capture_output=True, text=True,
            timeout=120)
        assert probe.returncode == 0, probe.stderr[-3000:]
        nodes = {n[0]: n[1:] for n in json.loads(probe.stdout.strip().splitlines()[-1])}
        assert nodes == {head: [True, 0, "head"], worker: [True, 2.0, "node2"]}, nodes

        log = tmp_path / "driver.log"
        driver = cluster.popen(study_cli("run", str(space), "--runs-dir", str(runs), "--address", address), log)
        rc = driver.wait(timeout=240)
        assert rc == 0, tail(log)
        study_s = time.perf_counter() - t0 - started

        trials, mruns = check_records(runs, "multinode", 2)
        # every trial ran on the second node: in Optuna, in the runs folder (final.json) and in Tune's results
        assert {t.user_attrs["ray_node_id"] for t in trials} == {worker}
        for t in trials:
            final = json.loads((runs / "multinode" / "trials" / f"{t.number:04d}" / "final.json").read_text())
            assert final["ray_node_id"] == worker
            assert (runs / "multinode" / "trials" / f"{t.number:04d}" / "model.pt").is_file()
        results = list((runs / "multinode" / "tune" / "multinode").glob("trial_*/result.json"))
        assert len(results) == 2
        for path in results:
            last = json.loads(path.read_text().strip().splitlines()[-1])
            assert last["final"] == 1 and last["ray_node_id"] == worker
        assert list((runs / "multinode" / "pretrained").glob("*.pt"))  # the pretraining task's output
        assert (runs / "multinode" / "pareto.csv").is_file()
        print(f"\n[multinode] cluster up in {started:.1f}s, study of 2 trials in {study_s:.1f}s")
    finally:
        left = cluster.stop()
    assert not left, f"processes left behind: {[(p, cmdline(p)[:2]) for p in left]}"


@pytest.mark.slow
def test_a_study_joining_a_one_node_cluster_with_cpus_finishes(tmp_path, cluster_root):
    """The path that hung: a study joins a cluster whose only node is the driver's own and has CPUs, with
    2 threads per trial. Its pretraining used to be forked from a driver that had run torch, and the child
    deadlocked in its first 2-thread op until the 900 s timeout. On a joined cluster it is a Ray task now."""
    cluster = LocalCluster(cluster_root)
    runs = tmp_path / "runs"
    space = write_space(tmp_path / "tiny.yaml", "joined", n_trials=1, max_concurrent=1)
    space.write_text(space.read_text().replace("cpus_per_trial: 1", "cpus_per_trial: 2"))
    try:
        address = cluster.start_head(num_cpus=2)
        log = tmp_path / "driver.log"
        driver = cluster.popen(study_cli("run", str(space), "--runs-dir", str(runs), "--address", address,
                                         "--no-final-eval"), log)
        try:
            rc = driver.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the study on a joined one-node cluster did not finish in 300 s:\n{hung(driver, log)}")
        assert rc == 0, tail(log)
        text = log.read_text()
        assert "as a Ray task on 2 CPU / 0 GPU" in text and "spawned by the driver" not in text, tail(log)
        # a new MLflow store, and still none of its routine lines (alembic's migrations, table creation)
        noise = [ln for ln in text.splitlines() if "Running upgrade" in ln or "Context impl" in ln
                 or "Creating initial MLflow database tables" in ln or "font cache" in ln]
        assert not noise, noise[:5]
        assert [t.state.name for t in optuna_trials(runs, "joined")] == ["COMPLETE"]
    finally:
        left = cluster.stop()
    assert not left, f"processes left behind: {[(p, cmdline(p)[:2]) for p in left]}"
