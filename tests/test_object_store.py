"""A study whose runs folder is an object store (`--runs-dir s3://...`), against a real S3-compatible server
on 127.0.0.1: moto's server mode (what Ray's own storage tests use), one process for the whole module.

- study.search.folder.store against the server: round trips, trees, deletes, the atomic local download.
- The checks before Ray starts: a bad URI, an unknown scheme, a missing bucket and missing credentials each
  give one line and exit status 2; an Optuna journal on an object store is refused.
- A model's bytes once per bucket: a finished trial's MLflow run references the study folder's model.pt
  (tag model_uri, model/model_ref.json) where its artifacts share the study's S3 bucket, and stores the
  bytes elsewhere (another bucket, a local folder); the rule's unit test.
- The slow end-to-end test: a 2-node Ray cluster (head with no CPUs + a worker node) runs a study into the
  bucket; the driver is killed mid-study; the whole cluster is torn down and every local folder of it is
  deleted (Ray's temp folders, the nodes' scratch folders, the driver's mirror); a NEW cluster resumes the
  study from the bucket; then, from another machine (no mirror, no databases), `study report` reads the
  copy of the Optuna storage the driver left in the bucket, `study evaluate` a trial folder in the bucket,
  and `study resume` is refused in one line (the study's Optuna storage is a file on the head).
  Optuna and MLflow stay on the head's disk (the defaults for a bucket: sqlite files in STUDY_DATA_DIR, the
  head's database, not a temp folder); everything else is deleted before the resume.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_multinode import (BIN, LocalCluster, cmdline, free_port, kill_sessions, study_cli, tail,  # noqa: F401
                            write_space)

pytest.importorskip("moto", reason="moto[server] is a dev dependency (pip install -e '.[dev]')")

BUCKET = "robust-prune-studies"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
NO_FILES = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials", "AWS_CONFIG_FILE": "/nonexistent/config",
            "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; yields its endpoint URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in KEYS.items()
                                                           if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline or proc.poll() is not None:
                kill_sessions([proc.pid])
                pytest.fail(f"moto server did not start:\n{tail(log)}")
            time.sleep(0.3)
    yield endpoint
    kill_sessions([proc.pid])


@pytest.fixture
def aws(s3, monkeypatch):
    """This process talks to the moto server (pyarrow and boto3 read AWS_ENDPOINT_URL)."""
    for k, v in {**KEYS, **NO_FILES, "AWS_ENDPOINT_URL": s3}.items():
        monkeypatch.setenv(k, v)
    return s3


def _env(endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(KEYS, **NO_FILES, AWS_ENDPOINT_URL=endpoint, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def _list(prefix: str) -> dict[str, int]:
    from study.search.folder.store import Store

    return Store(f"s3://{BUCKET}/{prefix}").list_files()


# --- the store itself ---------------------------------------------------------------------------------


def test_store_round_trips_files_and_trees(aws, tmp_path):
    from study.search.folder.store import Store

    store = Store(f"s3://{BUCKET}/unit/a")
    assert not store.exists() and store.list_files() == {}
    store.write_text("x/one.json", '{"a": 1}')
    store.write_bytes("x/y/two.bin", bytes(range(256)) * 10)
    assert store.is_file("x/one.json") and not store.is_file("x") and store.exists("x")
    assert json.loads(store.read_text("x/one.json")) == {"a": 1}
    assert store.list_files("x") == {"one.json": 8, "y/two.bin": 2560}
    assert Store(f"s3://{BUCKET}/unit").list_dirs() == ["a"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("x/missing.json")

    local = tmp_path / "mirror"
    assert store.download_tree("x", local) == 2
    assert (local / "y" / "two.bin").read_bytes() == bytes(range(256)) * 10
    assert store.download_tree("x", local) == 0  # present with the same size: not fetched again
    (local / "y" / "two.bin").write_bytes(b"short")  # another size: fetched again
    assert store.download_tree("x", local, skip=["one.json"]) == 1
    assert (local / "y" / "two.bin").stat().st_size == 2560

    (local / "z").mkdir()
    (local / "z" / "keep.json").write_text("{}")
    (local / "z" / "drop.pt").write_text("model")
    assert store.upload_tree(local / "z", "z", names=["keep.json"]) == 1
    assert store.list_files("z") == {"keep.json": 2}

    store.delete_tree("x")
    assert store.list_files() == {"z/keep.json": 2}
    store.delete("z/keep.json")
    store.delete("z/keep.json")  # deleting what is not there is not an error
    assert not store.exists()


def test_store_pickles_without_its_client(aws):
    import pickle

    from study.search.folder.store import Store

    store = Store(f"s3://{BUCKET}/unit/pickled")
    store.write_text("f.txt", "hi")
    again = pickle.loads(pickle.dumps(store))  # what Ray sends to a worker node: the URI, not a client
    assert again.uri == store.uri and again._fs is None
    assert again.read_text("f.txt") == "hi"
    store.delete_tree()


def test_lock_of_an_object_store_study_lives_in_the_bucket(aws, tmp_path):
    from study.errors import UserError
    from study.search.folder.lock import LOCK_FILE, StudyLock
    from study.search.folder.store import Store

    store = Store(f"s3://{BUCKET}/unit/locked")
    with StudyLock(tmp_path / "mirror", store).acquire("study run x.yaml"):
        assert store.is_file(LOCK_FILE)
        assert json.loads(store.read_text(LOCK_FILE))["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"in use by another driver.*s3://{BUCKET}/unit/locked/.lock"):
            StudyLock(tmp_path / "other-mirror", store).acquire()
    assert not store.is_file(LOCK_FILE)
    # a lock of another host is never taken over
    store.write_text(LOCK_FILE, json.dumps({"host": "elsewhere", "pid": 1, "since": 0, "command": "study run"}))
    with pytest.raises(UserError, match="host elsewhere"):
        StudyLock(tmp_path / "mirror", store).acquire()
    store.delete(LOCK_FILE)


def test_lock_in_a_bucket_is_a_conditional_write(aws, tmp_path):
    """S3's conditional writes: the lock is created only where there is none (IfNoneMatch), and a stale lock
    is replaced only if nobody replaced it since it was read (IfMatch on its ETag). Here another driver
    takes the stale lock between our read and our write: our write fails, and we are refused."""
    from study.errors import UserError
    from study.search.folder import lock_s3
    from study.search.folder.lock import LOCK_FILE, StudyLock
    from study.search.folder.store import Store

    store = Store(f"s3://{BUCKET}/unit/cas")
    dead = json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "start": "", "since": 0, "command": "x"})
    live = json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "start": "", "since": 0,
                       "command": "the other driver"})
    store.write_text(LOCK_FILE, dead)
    real_judge = StudyLock._judge
    calls = []

    def judge_then_lose_the_race(self, data):
        verdict = real_judge(self, data)
        if not calls:
            calls.append(verdict)
            store.write_text(LOCK_FILE, live)  # the other driver wins the takeover right now
        return verdict

    puts = []
    real_put = lock_s3.S3Lock._put
    with pytest.MonkeyPatch.context() as m:
        m.setattr(StudyLock, "_judge", judge_then_lose_the_race)
        m.setattr(lock_s3.S3Lock, "_put", lambda self, record, **c: puts.append(c) or real_put(self, record, **c))
        with pytest.raises(UserError, match="the other driver"):
            StudyLock(tmp_path / "mirror", store).acquire("loser")
    assert calls == [None]  # it judged the dead driver's lock stale ...
    assert [list(c) for c in puts][:2] == [["IfNoneMatch"], ["IfMatch"]]  # ... and its IfMatch write failed
    assert json.loads(store.read_text(LOCK_FILE))["command"] == "the other driver"
    store.write_text(LOCK_FILE, dead)  # a stale lock nobody races for is taken over
    with StudyLock(tmp_path / "mirror", store).acquire("winner"):
        assert json.loads(store.read_text(LOCK_FILE))["command"] == "winner"
    assert not store.is_file(LOCK_FILE)


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# --- the checks before Ray starts ------------------------------------------------------------------------


@pytest.mark.parametrize("runs_dir, env_change, message", [
    ("s3:///no-bucket/x", {}, "no bucket in the URI"),
    ("ftp://host/x", {}, "unknown storage scheme 'ftp'"),
    (f"s3://missing-{os.getpid()}/x", {}, "does not exist"),
    (f"s3://{BUCKET}/x", {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}, "no AWS credentials found"),
])
def test_bad_runs_dir_is_one_line_exit_2_before_ray(s3, tmp_path, runs_dir, env_change, message):
    space = write_space(tmp_path / "tiny.yaml", "badstore", n_trials=1)
    env = _env(s3, RAY_ADDRESS="127.0.0.1:1")  # a Ray start would fail differently, and loudly
    for k, v in env_change.items():
        env.pop(k) if not v else env.__setitem__(k, v)
    proc = subprocess.run(study_cli("run", str(space), "--runs-dir", runs_dir), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("study: error: --runs-dir") and message in lines[0], lines
    assert "Ray" not in proc.stdout + proc.stderr


def test_optuna_journal_on_an_object_store_is_refused(s3, tmp_path):
    space = write_space(tmp_path / "tiny.yaml", "journal", n_trials=1)
    proc = subprocess.run(study_cli("run", str(space), "--runs-dir", f"s3://{BUCKET}/j",
                                    "--storage", f"journal:s3://{BUCKET}/j/optuna.journal"),
                          env=_env(s3, STUDY_CACHE_DIR=str(tmp_path / "c"), STUDY_DATA_DIR=str(tmp_path / "d")),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "file locks" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_missing_study_in_a_bucket_names_the_studies_there(aws, tmp_path, monkeypatch):
    from study.errors import ConfigError
    from study.search.folder.store import Store
    from study.search.study import report_study

    monkeypatch.setenv("STUDY_CACHE_DIR", str(tmp_path / "cache"))
    Store(f"s3://{BUCKET}/listing").write_text("present/study.json", "{}")
    with pytest.raises(ConfigError, match=f"no study named 'absent' in s3://{BUCKET}/listing; studies there: present"):
        report_study("absent", runs_dir=f"s3://{BUCKET}/listing")
    Store(f"s3://{BUCKET}/listing").delete_tree()


# --- a model's bytes once per bucket: the run references the study folder's model.pt ---------------------


@pytest.mark.parametrize("artifact_uri, study_folder, expected", [
    (f"s3://{BUCKET}/team/mlartifacts/s/1/abc/artifacts", f"s3://{BUCKET}/team/s/trials/0003", True),
    (f"S3://{BUCKET}/mlflow/1/abc/artifacts", f"s3://{BUCKET}/elsewhere/s", True),  # any prefix of one bucket
    ("s3://other-bucket/mlartifacts/s/1/abc/artifacts", f"s3://{BUCKET}/team/s/trials/0003", False),
    (f"s3://{BUCKET}-2/mlartifacts/s/1/abc/artifacts", f"s3://{BUCKET}/team/s/trials/0003", False),
    ("file:///home/me/runs/mlartifacts/s/1/abc/artifacts", f"s3://{BUCKET}/team/s/trials/0003", False),
    ("/home/me/runs/mlartifacts/s/1/abc/artifacts", f"s3://{BUCKET}/team/s/trials/0003", False),
    ("mlflow-artifacts:/1/abc/artifacts", f"s3://{BUCKET}/team/s/trials/0003", False),  # a server's proxy
    (f"s3://{BUCKET}/team/mlartifacts/s/1/abc/artifacts", "/home/me/runs/s/trials/0003", False),
    (f"s3://{BUCKET}/team/mlartifacts/s/1/abc/artifacts", "", False),
    (f"gs://{BUCKET}/team/mlartifacts/s/1/abc/artifacts", f"gs://{BUCKET}/team/s/trials/0003", False),
    ("s3:///no-bucket/x", "s3:///no-bucket/y", False),
])
def test_model_by_reference_only_where_the_run_shares_the_study_folders_s3_bucket(artifact_uri, study_folder,
                                                                                    expected):
    from study.search.recording.tracking import model_by_reference

    assert model_by_reference(artifact_uri, study_folder) is expected


def _make_bucket(endpoint: str, name: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          **{k.lower(): v for k, v in KEYS.items() if k != "AWS_DEFAULT_REGION"})
    if name not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=name)


def _objects_holding(bucket: str, data: bytes) -> list[str]:
    """The keys of every object in `bucket` whose bytes are `data`."""
    from study.search.folder.store import Store

    store = Store(f"s3://{bucket}")
    return [k for k, size in store.list_files().items() if size == len(data) and store.read_bytes(k) == data]


@pytest.mark.parametrize("where", ["same bucket", "other bucket", "local folder"])
def test_finished_trial_run_references_its_model_in_the_study_bucket_else_stores_it(aws, tmp_path, monkeypatch,
                                                                                    where):
    """A finished trial through MlflowTrialCallback.on_trial_complete, its study folder in the bucket. With the
    run's artifacts in the same bucket the bucket holds the model's bytes once (trials/0003/model.pt) and the
    run carries the tag model_uri and model/model_ref.json (that object's URI, size and sha256), which
    `study evaluate runs:/<id>` follows; elsewhere the run stores model/model.pt itself, as before."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from study.errors import UserError
    from study.keys import MODEL_REF_FILE, MODEL_URI_TAG, NUMBER_KEY, study_run_key
    from study.robustness import targets
    from study.search.folder.layout import study_paths
    from study.search.folder.store import Store
    from study.search.recording.tracking import Tracker
    from study.search.recording.trial_callback import MlflowTrialCallback
    from study.trial.config import TrialConfig

    monkeypatch.setenv("STUDY_CACHE_DIR", str(tmp_path / "cache"))
    name, other = "refstudy", f"{BUCKET}-artifacts"
    prefix = f"refs-{where.replace(' ', '-')}"
    runs = f"s3://{BUCKET}/{prefix}"
    artifact_root = {"same bucket": f"{runs}/mlartifacts/{name}", "other bucket": f"s3://{other}/{prefix}/{name}",
                     "local folder": str(tmp_path / "mlartifacts" / name)}[where]
    if where == "other bucket":
        _make_bucket(aws, other)
    paths = study_paths(runs, name)
    model = os.urandom(40_000)  # bytes no other object in the bucket holds
    cfg = TrialConfig()
    paths.store.write_bytes("trials/0003/model.pt", model)
    paths.store.write_text("trials/0003/result.json", json.dumps({"config": cfg.to_dict()}))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(tracking, name, artifact_root=artifact_root)
    try:
        parent = tracker.create_run(name, study_run_key(name))
        callback = MlflowTrialCallback(tracker, name, parent, "", trial_config=lambda c: cfg,
                                       trial_dir=paths.pull_trial, trial_uri=paths.trial_location)
        trial = SimpleNamespace(trial_id="t3", config={NUMBER_KEY: 3}, last_result={"final": True})
        callback.on_trial_complete(0, [], trial)
        run_id = callback._runs["t3"]
        client = MlflowClient(tracking_uri=tracking)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        logged = {f.path for f in client.list_artifacts(run_id, "model")}
        sha256 = hashlib.sha256(model).hexdigest()
        in_study = f"{prefix}/{name}/trials/0003/model.pt"
        if where == "same bucket":
            assert _objects_holding(BUCKET, model) == [in_study]  # the bytes once in the bucket ...
            assert [k for k in _list(prefix) if k.endswith("model.pt")] == [f"{name}/trials/0003/model.pt"]
            assert logged == {f"model/{MODEL_REF_FILE}", "model/result.json"}  # ... the run references them
            assert run.data.tags[MODEL_URI_TAG] == f"s3://{BUCKET}/{in_study}"
            ref = json.loads(Path(client.download_artifacts(run_id, f"model/{MODEL_REF_FILE}",
                                                            str(tmp_path / "dl"))).read_text())
            assert ref == {"uri": f"s3://{BUCKET}/{in_study}", "bytes": len(model), "sha256": sha256}
            obj = ref["uri"].rsplit("/", 1)
            assert hashlib.sha256(Store(obj[0]).read_bytes(obj[1])).hexdigest() == ref["sha256"]
            # `study evaluate runs:/<id>` follows the reference, and refuses an object rewritten since
            target = targets.resolve(f"runs:/{run_id}", tracking, tmp_path / "scratch")
            assert target.model_path.read_bytes() == model and target.config == cfg
            paths.store.write_bytes("trials/0003/model.pt", os.urandom(40_000))
            with pytest.raises(UserError, match="no longer the model the run logged"):
                targets.resolve(f"runs:/{run_id}", tracking, tmp_path / "scratch2")
        else:
            assert _objects_holding(BUCKET, model) == [in_study]
            assert logged == {"model/result.json"}  # the bytes are logged once, as the run's MLflow model
            assert MODEL_URI_TAG not in run.data.tags
            from study.trial.mlflow_model import logged_model_of_run

            logged_model = logged_model_of_run(client, run.info.experiment_id, run_id)
            assert logged_model is not None and logged_model.tags["optuna_trial_number"] == "3"
            target = targets.resolve(f"runs:/{run_id}", tracking, tmp_path / "scratch")  # the logged model's file
            assert target.model_path.read_bytes() == model and target.config == cfg
            if where == "other bucket":
                assert len(_objects_holding(other, model)) == 1
            else:
                assert list((tmp_path / "mlartifacts" / name).rglob("model.pt"))
    finally:
        Store(runs).delete_tree()
        if where == "other bucket":
            Store(f"s3://{other}/{prefix}").delete_tree()


# --- end to end: two nodes, a killed driver, a new cluster, the bucket alone ------------------------------


def _optuna(storage: str, name: str) -> list:
    import optuna

    return optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(storage)).get_trials(deepcopy=False)


def _start(root: Path, endpoint: str) -> tuple[LocalCluster, str]:
    """A head with no CPUs and a worker node with 2, each node with a TMPDIR of its own under `root`."""
    cluster = LocalCluster(root)
    cluster.env = _env(endpoint, TMPDIR=str(root / "tmp-head"))
    (root / "tmp-head").mkdir(parents=True, exist_ok=True)
    cluster.start_head(num_cpus=0)
    cluster.env = _env(endpoint, TMPDIR=str(root / "tmp-node2"))
    (root / "tmp-node2").mkdir(parents=True, exist_ok=True)
    worker = cluster.add_node("node2", num_cpus=2)
    return cluster, worker


@pytest.mark.slow
def test_object_store_study_on_two_nodes_survives_a_killed_driver_and_a_new_cluster(aws, tmp_path):
    from optuna.trial import TrialState

    s3 = aws
    t0 = time.perf_counter()
    name, n = "s3study", 3
    runs = f"s3://{BUCKET}/team/studies"
    space = write_space(tmp_path / "tiny.yaml", name, n_trials=n, max_concurrent=1)
    local = tmp_path / "local"  # everything a machine keeps for itself: cluster temp folders, mirrors
    driver_env = {"STUDY_CACHE_DIR": str(local / "driver-cache"), "STUDY_DATA_DIR": str(local / "driver-data"),
                  "TMPDIR": str(local / "driver-tmp")}
    (local / "driver-tmp").mkdir(parents=True)
    head_db = local / "driver-data" / "s3" / BUCKET / "team" / "studies"  # the head's databases (kept)
    storage, tracking = f"sqlite:///{head_db / name / 'optuna.db'}", f"sqlite:///{head_db / 'mlflow.db'}"
    short = Path(f"/tmp/s3_{os.getpid()}_{time.monotonic_ns() % 10**6}")  # Ray's socket paths must be short
    clusters: list[LocalCluster] = []
    try:
        cluster, worker = _start(short / "c1", s3)
        clusters.append(cluster)
        cluster.env = _env(s3, **driver_env)
        run_log = tmp_path / "run.log"
        driver = cluster.popen(study_cli("run", str(space), "--runs-dir", runs, "--address", cluster.address), run_log)
        deadline, states = time.monotonic() + 300, []
        while time.monotonic() < deadline and driver.poll() is None:
            if (head_db / name / "optuna.db").exists():
                try:
                    states = [t.state for t in _optuna(storage, name)]
                except Exception:  # noqa: BLE001 - not created yet, or busy
                    states = []
                if states.count(TrialState.COMPLETE) >= 1 and TrialState.RUNNING in states:
                    break
            time.sleep(0.3)
        assert driver.poll() is None, f"the driver ended before the kill:\n{tail(run_log)}"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        done_before = [t.number for t in _optuna(storage, name) if t.state == TrialState.COMPLETE]
        assert 1 <= len(done_before) < n

        # the first trial's files are in the bucket, written by the worker node
        files = _list(f"team/studies/{name}")
        for number in done_before:
            assert {f"trials/{number:04d}/{f}" for f in ("final.json", "model.pt", "result.json")} <= set(files)
            final = json.loads(_store(runs, name).read_text(f"trials/{number:04d}/final.json"))
            assert final["ray_node_id"] == worker
        assert any(k.startswith("pretrained/") and k.endswith(".pt") for k in files)
        assert any(k.startswith(f"tune/{name}/experiment_state") for k in files)
        assert {"study.json", "space.yaml", ".lock"} <= set(files)

        # tear the cluster down and delete every local folder: Ray's, the nodes' scratch, the driver's mirror
        assert not cluster.stop()
        clusters.remove(cluster)
        scratch = list(short.glob("c1/tmp-*/robust-prune-study"))
        assert scratch and (local / "driver-cache").is_dir()  # there was node-local state ...
        shutil.rmtree(short)  # ... Ray's temp folders and the nodes' TMPDIRs (trial scratch, dense-model cache)
        shutil.rmtree(local / "driver-cache")  # ... and the driver's mirror: all gone

        # a new cluster resumes the study from the bucket (the dead driver's lock is on this host: stale)
        cluster, worker2 = _start(short / "c2", s3)
        clusters.append(cluster)
        cluster.env = _env(s3, **driver_env)
        resume_log = tmp_path / "resume.log"
        rc = cluster.popen(study_cli("resume", name, "--runs-dir", runs, "--address", cluster.address),
                           resume_log).wait(timeout=300)
        assert rc == 0, tail(resume_log)
        text = resume_log.read_text()
        assert f"resuming study '{name}' from its Optuna storage: " in text, tail(resume_log)
        # the dense model is in the bucket: the resuming driver finds it there and pretrains nothing
        assert f"dense model found in the cache: {runs}/{name}/pretrained/" in text, tail(resume_log)
        assert "pretraining the dense model" not in text

        trials = _optuna(storage, name)
        assert sorted(t.number for t in trials) == list(range(n))
        assert [t.state for t in trials] == [TrialState.COMPLETE] * n, [(t.number, t.state) for t in trials]
        files = _list(f"team/studies/{name}")
        for t in trials:
            final = json.loads(_store(runs, name).read_text(f"trials/{t.number:04d}/final.json"))
            assert final["val_robust_acc"] == pytest.approx(t.values[1])
            assert final["ray_node_id"] == (worker if t.number in done_before else worker2)
        assert {"pareto.csv", "report/index.html", "report/front.png"} <= set(files)
        assert ".lock" not in files  # released by the resuming driver
        front = [k for k in files if k.endswith("/confirm.json")]
        assert front, "the front's test-split confirmation is in the bucket"
        # MLflow: one FINISHED run per trial, artifacts in the bucket; each model's bytes once in the bucket (in
        # the trial folder), the run referencing them (tag model_uri, model/model_ref.json with its sha256)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking)
        exp = client.get_experiment_by_name(name)
        assert exp.artifact_location == f"{runs}/mlartifacts/{name}"
        mruns = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("run_role") == "trial"]
        assert sorted(int(r.data.tags["optuna_trial_number"]) for r in mruns) == list(range(n))
        assert all(r.info.status == "FINISHED" for r in mruns)
        every = _list("team")
        assert sorted(k for k in every if k.endswith("model.pt")) == \
            [f"studies/{name}/trials/{t:04d}/model.pt" for t in range(n)]
        for r in mruns:
            number = int(r.data.tags["optuna_trial_number"])
            key = f"team/studies/{name}/trials/{number:04d}/model.pt"
            model = _store(f"s3://{BUCKET}", "team").read_bytes(key[len("team/"):])
            assert _objects_holding(BUCKET, model) == [key]
            assert r.data.tags["model_uri"] == f"s3://{BUCKET}/{key}"
            ref = json.loads(Path(client.download_artifacts(r.info.run_id, "model/model_ref.json",
                                                            str(tmp_path / "refs" / str(number)))).read_text())
            assert ref["uri"] == f"s3://{BUCKET}/{key}" and ref["bytes"] == len(model)
            assert ref["sha256"] == hashlib.sha256(model).hexdigest()
        assert not cluster.stop()
        clusters.remove(cluster)

        # another machine: no mirror, no databases, no Ray; report and evaluate read the bucket
        assert "optuna.db" in files  # the driver's copy of its Optuna storage
        (local / "driver-data").rename(local / "head-disk-elsewhere")  # this machine cannot see the head's disk
        other = _env(s3, STUDY_CACHE_DIR=str(tmp_path / "other-cache"), STUDY_DATA_DIR=str(tmp_path / "other-data"))
        report = subprocess.run(study_cli("report", name, "--runs-dir", runs), env=other, cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
        assert f"Pareto front of study '{name}': " in report.stdout and f"of {n} complete trials" in report.stdout
        assert f"reading the copy of the Optuna storage in {runs}/{name}/optuna.db" in report.stdout
        assert "is not on this machine: the report is not logged to MLflow" in report.stderr
        assert not (local / "driver-data").exists()  # nothing was created where the head's files were
        refused = subprocess.run(study_cli("resume", name, "--runs-dir", runs), env=other, cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "a file on the machine that started it" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        number = int(front[0].split("/")[1])
        out = tmp_path / "evaluate.json"
        ev = subprocess.run(study_cli("evaluate", f"{runs}/{name}/trials/{number:04d}", "--threats", "linf",
                                      "--points", "16", "--steps", "2", "--restarts", "1", "--json", str(out)),
                            env=other, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
        payload = json.loads(out.read_text())
        assert payload["provenance"]["target"] == f"{runs}/{name}/trials/{number:04d}"
        assert "linf" in json.dumps(payload["report"] if "report" in payload else payload)
        print(f"\n[object store] killed with {len(done_before)}/{n} complete; resumed on a new cluster; "
              f"report and evaluate from the bucket; {time.perf_counter() - t0:.1f}s in all")
    finally:
        left = [p for c in clusters for p in c.stop()]
        shutil.rmtree(short, ignore_errors=True)
        _store(f"s3://{BUCKET}", "team").delete_tree()
    assert not left, f"processes left behind: {[(p, cmdline(p)[:2]) for p in left]}"


def _store(runs: str, name: str):
    from study.search.folder.store import Store

    return Store(f"{runs}/{name}")
