"""`ray up cluster.yaml` end to end, on one machine: Ray's autoscaler launching GPU nodes from zero for a study
whose folder is a bucket, a node lost mid-trial, the trial continued on another node from its checkpoint in
the bucket, then `study resume` and `study report`.

The cluster is Ray's fake multi-node autoscaling cluster (the `fake_multinode` node provider, switched on by
RAY_FAKE_CLUSTER=1; nodes are raylets on this machine) started with `ray start --head --autoscaling-config=...`
from a config GENERATED from cluster.yaml's node types: its head type ({CPU: 0}: no trial and no pretraining
task can run there) and its GPU worker type (min_workers 0: none until something asks), the worker's CPUs
shrunk to one (this machine has two cores) and its GPU a Ray resource only (the trials say `trial.device: cpu`;
the trainable refuses a GPU that CUDA cannot see otherwise). Not `ray.cluster_utils.AutoscalingCluster`, for
two reasons found here: its constructor reads autoscaler/_private/fake_multi_node/example.yaml, which the
ray 2.60.0 wheel does not ship (FileNotFoundError), and its start() and shutdown() run `ray stop --force`,
which kills every Ray process of the machine, other people's clusters included. The config below carries
the keys of that example file instead, and the cluster is stopped by its session id (tests/test_multinode.py).

The study (tests/test_multinode.py's tiny digits space, real pipeline, `gpus_per_trial: 1`) runs with
`--runs-dir s3://...` against a local S3 server (moto, as tests/test_object_store.py starts it):

1. the driver's resource check finds 0 GPU and asks the autoscaler for a trial's bundle; a `worker.gpu` node
   is launched and every task of the study runs on such nodes, never on the head;
2. trial 0's node is killed (its raylet, agents and the trial's worker: SIGKILL) after the trial's epoch-2
   checkpoint reached the bucket; the nodes' local scratch (the dense-model copy) is deleted, and no
   checkpoint.pt exists on any local disk; Ray lists the node dead, Tune reruns the trial, and it continues
   on another worker node from step 2 (its epoch log shows 1, 2 on the first node and 3 on the second);
3. `study resume` and `study report` of the finished study exit 0.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from test_multinode import BIN, LocalCluster, cmdline, free_port, session_pids, study_cli, tail, write_space
from test_object_store import BUCKET, _env, _store, aws, s3  # noqa: F401 - the moto server fixtures

TESTS = Path(__file__).resolve().parent
WORKER_CPUS = 1  # cluster.yaml's worker.gpu has 4 (a g5.xlarge); one trial of 1 CPU each here


def fake_cluster_config(gcs_address: str, max_workers: int = 2) -> dict:
    """An autoscaling config for the fake_multinode provider, generated from cluster.yaml's node types."""
    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = real["available_node_types"]
    head = types[real["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0, head  # the head runs nothing
    gpu_types = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types.values()), gpu_types  # started on demand
    workers = {name: {"resources": {**t["resources"], "CPU": WORKER_CPUS, "object_store_memory": 100 * 1024**2},
                      "node_config": {}, "min_workers": t["min_workers"],
                      "max_workers": min(t["max_workers"], max_workers)}
               for name, t in gpu_types.items()}
    return {
        "cluster_name": "fake-" + real["cluster_name"],
        "max_workers": min(real["max_workers"], max_workers),
        "idle_timeout_minutes": real["idle_timeout_minutes"],
        "upscaling_speed": 1.0,
        # the fake provider names its head type ray.head.default; it takes cluster.yaml's head resources
        "available_node_types": {"ray.head.default": {"resources": dict(head["resources"]), "node_config": {},
                                                      "max_workers": 0}, **workers},
        "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


# --- what runs in the driver and the trials ----------------------------------------------------------------


def _append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def node_logging_trial(cfg, *, on_epoch=None, resume_state=None, victim: int, after_step: int, marker: str,
                       log: str):
    """The real pipeline. Every start and every reported epoch appends a line to `log` (number, Ray node,
    pid, the resume state's step/stage/epoch); trial `victim`, once (`marker`), waits to be killed after
    reporting step `after_step`, whose checkpoint is then in the bucket."""
    import ray

    from study.trial import pipeline

    number = int(cfg.name.rsplit("-", 1)[1])
    node = ray.get_runtime_context().get_node_id()
    state = resume_state or {}
    _append(log, {"event": "start", "number": number, "node": node, "pid": os.getpid(),
                  "step": int(state.get("step", 0)), "stage": state.get("stage"), "epoch": state.get("epoch")})

    def hook(report):
        on_epoch(report)  # the checkpoint (to the bucket), then tune.report
        _append(log, {"event": "epoch", "number": number, "node": node, "step": report.step})
        if number == victim and report.step == after_step and not os.path.exists(marker):
            time.sleep(3.0)  # the report reaches the driver (and MLflow) before the node goes
            with open(marker + ".tmp", "w") as f:
                json.dump({"node": node, "pid": os.getpid()}, f)
            os.replace(marker + ".tmp", marker)
            time.sleep(600)  # the test kills this node now

    return pipeline.run_trial(cfg, on_epoch=hook, resume_state=resume_state)


def drive(space_file: str, runs: str, address: str, marker: str, log: str) -> None:
    """Driver process body: `study run` with node_logging_trial, shipped to the workers by value."""
    import ray

    from study.search.optimize.space import load_space
    from study.search.study import run_study

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trial = functools.partial(node_logging_trial, victim=0, after_step=2, marker=marker, log=log)
    outcome = run_study(load_space(space_file), runs_dir=runs, address=address, run_trial=trial)
    sys.exit(0 if outcome.status == "complete" else 3)


# --- helpers of the test -----------------------------------------------------------------------------------


NODES_PROBE = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
               "print(json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], 'resources': n['Resources'], "
               "'labels': n.get('Labels', {})} for n in ray.nodes()]))")


def ray_nodes(cluster: LocalCluster) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", NODES_PROBE % cluster.address], env=cluster.env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def node_processes(sid: int, node_id: str, extra: int) -> list[int]:
    """The processes of one fake node: those naming its id (raylet, agents), their descendants, and `extra`."""
    pids = set(session_pids(sid))
    named = {p for p in pids if any(node_id in a for a in cmdline(p))} | {extra}
    parents = {}
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            parents[p] = int(stat[stat.rindex(")") + 2:].split()[1])
        except OSError:
            continue
    found, grew = set(named), True
    while grew:
        more = {p for p, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return sorted(found)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r}); {code}"]


def _local_checkpoints(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("checkpoint.pt")]


# --- the test ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_autoscaler_launches_gpu_nodes_and_a_lost_node_trial_resumes_from_the_bucket(aws, tmp_path):
    from optuna.trial import TrialState

    import ray

    s3 = aws
    t0 = time.perf_counter()
    name, n = "autoscale", 2
    runs = f"s3://{BUCKET}/as/studies"
    space = write_space(tmp_path / "tiny.yaml", name, n_trials=n, max_concurrent=1, max_failures=None)
    text = space.read_text().replace("  gpus_per_trial: 0\n", "  gpus_per_trial: 1\n  autoscaler_wait_s: 240\n")
    space.write_text(text.replace("trial:\n", "trial:\n  device: cpu   # the GPU is a Ray resource only\n", 1))
    local = tmp_path / "local"
    driver_env = {"STUDY_CACHE_DIR": str(local / "driver-cache"), "STUDY_DATA_DIR": str(local / "driver-data"),
                  "TMPDIR": str(local / "driver-tmp")}
    (local / "driver-tmp").mkdir(parents=True)
    head_db = local / "driver-data" / "s3" / BUCKET / "as" / "studies"
    storage, tracking = f"sqlite:///{head_db / name / 'optuna.db'}", f"sqlite:///{head_db / 'mlflow.db'}"
    root = Path(f"/tmp/as_{os.getpid()}_{time.monotonic_ns() % 10**6}")  # short: Ray's socket paths
    nodes_tmp = root / "t"  # every fake node's TMPDIR (one disk): the trials' scratch, the dense-model copy
    nodes_tmp.mkdir(parents=True)
    log, marker = str(tmp_path / "trials.jsonl"), str(tmp_path / "killed.json")
    cluster = LocalCluster(root)
    try:
        port = free_port()
        config = root / "autoscaling.yaml"
        config.write_text(json.dumps(fake_cluster_config(f"{ray.util.get_node_ip_address()}:{port}")))
        cluster.env = _env(s3, TMPDIR=str(nodes_tmp), RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                           AUTOSCALER_HEARTBEAT_TIMEOUT_S="10")
        cluster._start("head", ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=0",
                                "--num-gpus=0", "--include-dashboard=false", f"--dashboard-port={free_port()}",
                                f"--object-store-memory={100 * 1024**2}", f"--temp-dir={root / 'h'}",
                                f"--autoscaling-config={config}", *cluster._ports()])
        cluster.address = f"127.0.0.1:{port}"
        head_sid = cluster.sessions[0]
        head = cluster.node_id(head_sid)
        before = ray_nodes(cluster)
        assert [(n_["id"], n_["resources"].get("CPU", 0), n_["resources"].get("GPU", 0)) for n_ in before] == \
            [(head, 0, 0)], before  # no worker node: they start on demand
        up_s = time.perf_counter() - t0

        # 1. the study: its resource check asks the autoscaler, which launches a worker.gpu node
        cluster.env = _env(s3, **driver_env)
        run_log = tmp_path / "run.log"
        args = ", ".join(repr(str(a)) for a in (space, runs, cluster.address, marker, log))
        driver = cluster.popen(_python(f"import test_autoscaling_cluster as t; t.drive({args})"), run_log)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None and not os.path.exists(marker):
            time.sleep(0.3)
        assert os.path.exists(marker), f"trial 0 never reached step 2:\n{tail(run_log)}"
        killed_at = time.perf_counter() - t0

        # 2. trial 0's node goes: its checkpoint of step 2 is in the bucket and on no local disk
        victim = json.loads(Path(marker).read_text())
        ckpt = "trials/0000/checkpoint.pt"
        assert _store(runs, name).is_file(ckpt), "the step-2 checkpoint is not in the bucket"
        assert not _local_checkpoints(root, local, tmp_path), _local_checkpoints(root, local, tmp_path)
        alive = {n_["id"]: n_ for n_ in ray_nodes(cluster)}  # the nodes as Ray saw them before the loss
        doomed = node_processes(head_sid, victim["node"], victim["pid"])
        assert any(cmdline(p)[0].endswith("/raylet") for p in doomed), [cmdline(p)[:2] for p in doomed]
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        scratch = nodes_tmp / "robust-prune-study"
        assert list(scratch.rglob("*.pt")), "the node had a local copy of the dense model"
        shutil.rmtree(scratch)  # the rerun must read the dense model (and its checkpoint) from the bucket

        rc = driver.wait(timeout=300)
        assert rc == 0, tail(run_log, 8000)
        study_s = time.perf_counter() - t0 - up_s

        starts = [json.loads(line) for line in Path(log).read_text().splitlines()]
        first, *again = [s for s in starts if s["event"] == "start" and s["number"] == 0]
        assert len(again) == 1, starts  # killed once, rerun once
        again = again[0]
        assert (first["node"], first["step"]) == (victim["node"], 0)
        assert again["node"] != victim["node"], starts  # another node ...
        assert (again["step"], again["stage"], again["epoch"]) == (2, "prune", 2), again  # ... from the checkpoint
        epochs = [(s["node"], s["step"]) for s in starts if s["event"] == "epoch" and s["number"] == 0]
        assert epochs == [(victim["node"], 1), (victim["node"], 2), (again["node"], 3)], epochs
        assert list(scratch.rglob("*.pt")), "the rerun fetched the dense model from the bucket"

        # every trial ran on a worker.gpu node the autoscaler launched, never on the head
        nodes = {n_["id"]: n_ for n_ in ray_nodes(cluster)}
        trials = sorted(_optuna(storage, name), key=lambda t: t.number)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * n, [(t.number, t.state) for t in trials]
        ran_on = {t.user_attrs["ray_node_id"] for t in trials}
        for t in trials:
            final = json.loads(_store(runs, name).read_text(f"trials/{t.number:04d}/final.json"))
            assert final["ray_node_id"] == t.user_attrs["ray_node_id"]
        assert head not in ran_on and head not in {s["node"] for s in starts}
        workers = {i for i in {**alive, **nodes} if i != head}
        assert {victim["node"], again["node"]} | ran_on <= workers
        for i in workers:  # the node type's resources (GPU: 1) while it was alive, and its name in Ray's labels
            seen = nodes[i] if nodes[i]["alive"] else alive[i]
            assert seen["resources"].get("GPU") == 1 and seen["resources"].get("CPU") == WORKER_CPUS, seen
            assert seen["labels"].get("ray.io/node-group") in (None, "worker.gpu"), seen["labels"]
        assert not nodes[victim["node"]]["alive"] and nodes[again["node"]]["alive"]
        print(f"\n[autoscaling] nodes: {json.dumps(list(nodes.values()))}")
        # the driver asked for the first node: the cluster had nothing for a trial before its request
        driver_text = run_log.read_text(errors="replace")
        assert "[study] asked the autoscaler for a trial's 1 CPU, 1 GPU (the cluster has 0 CPU, 0 GPU); waiting up " \
               "to 240 s" in driver_text, tail(run_log)
        assert "[study] the Ray cluster has 1 CPU, 1 GPU after " in driver_text, tail(run_log)
        monitor = "".join(p.read_text(errors="replace") for p in (root / "h").glob("session_*/logs/monitor*"))
        launched = [int(k) for k in re.findall(r"Adding (\d+) node\(s\) of type worker\.gpu", monitor)]
        assert sum(launched) >= len(workers), monitor[-3000:]
        assert not _store(runs, name).is_file(ckpt)  # removed when the trial ended
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking)
        exp = client.get_experiment_by_name(name)
        by_number = {int(r.data.tags["optuna_trial_number"]): r for r in client.search_runs([exp.experiment_id])
                     if r.data.tags.get("run_role") == "trial"}
        assert sorted(by_number) == [0, 1] and all(r.info.status == "FINISHED" for r in by_number.values())
        history = [m for k in by_number[0].data.metrics if k.endswith("/train_loss")  # prune/..., finetune/...
                   for m in client.get_metric_history(by_number[0].info.run_id, k)]
        assert sorted(m.step for m in history) == [1, 2, 3]  # once per epoch despite the lost node

        # 3. study resume (nothing left to train) and study report, against the same cluster and bucket
        resume_log = tmp_path / "resume.log"
        rc = cluster.popen(study_cli("resume", name, "--runs-dir", runs, "--address", cluster.address),
                           resume_log).wait(timeout=300)
        assert rc == 0, tail(resume_log)
        assert f"resuming study '{name}' from its Optuna storage: {n} of {n} trials finished" in \
            resume_log.read_text(), tail(resume_log)
        report = subprocess.run(study_cli("report", name, "--runs-dir", runs), env=cluster.env, cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
        assert f"Pareto front of study '{name}': " in report.stdout and f"of {n} complete trials" in report.stdout
        print(f"\n[autoscaling] head up {up_s:.1f}s; node killed at {killed_at:.1f}s; study {study_s:.1f}s; "
              f"{len(workers)} worker.gpu nodes launched; {time.perf_counter() - t0:.1f}s in all")
    finally:
        left = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        _store(f"s3://{BUCKET}", "as").delete_tree()
    assert not left, f"processes left behind: {[(p, cmdline(p)[:2]) for p in left]}"


def _optuna(storage: str, name: str) -> list:
    import optuna

    return optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(storage)).get_trials(deepcopy=False)
