"""GPU demand on an autoscaling cluster (cluster.yaml: a head with no CPU, GPU workers from zero).

- `study.gpus_per_trial: auto` counts the GPUs up when the study starts; on a joined cluster with none it
  says, in one line, that no GPU will be used and how to ask for one.
- With a number, the resource check on a joined cluster asks the autoscaler for one trial's bundle
  (`ray.autoscaler.sdk.request_resources`), waits `study.autoscaler_wait_s` with a progress line every 30 s,
  refuses in one line when the time is up, and clears its request afterwards, whatever happened.

Ray's public API is replaced here where no autoscaler is needed (the cluster's resources, the request, the
clock); tests/test_autoscaling_cluster.py runs the same path against Ray's fake autoscaling cluster.
"""
from __future__ import annotations

import socket

import pytest
import ray
import ray.autoscaler.sdk
from conftest import QUICKSTART, ROOT

from study.errors import ConfigError, UserError
from study.search.optimize.space import load_space
from study.search.running import preflight, startup
from study.search.running.ray_cluster import NO_GPU_NOTICE


class FakeCluster:
    """ray.cluster_resources() that gains `later` once `after` calls have been made; the requests made of
    the autoscaler; a clock that moves only when the check sleeps."""

    def __init__(self, now: dict, later: dict | None = None, after: int = 0):
        self.now, self.later, self.after = now, later, after
        self.calls, self.requests, self.t = 0, [], 1000.0

    def cluster_resources(self) -> dict:
        self.calls += 1
        return dict(self.later if self.later is not None and self.calls > self.after else self.now)

    def request_resources(self, num_cpus=None, bundles=None, bundle_label_selectors=None) -> None:
        self.requests.append({"num_cpus": num_cpus, "bundles": bundles})

    def clock(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert 0 <= seconds <= preflight.POLL_S
        self.t += max(seconds, 0.01)


@pytest.fixture
def fake(monkeypatch):
    def make(now: dict, later: dict | None = None, after: int = 0) -> FakeCluster:
        cluster = FakeCluster(now, later, after)
        monkeypatch.setattr(ray, "cluster_resources", cluster.cluster_resources)
        monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", cluster.request_resources)
        return cluster

    return make


def _check(cluster: FakeCluster, cpus: float, gpus: float, joined: bool = True, wait_s: float = 900) -> None:
    preflight.check_resources(cpus, gpus, joined, wait_s, clock=cluster.clock, sleep=cluster.sleep)


def _progress(out: str) -> list[str]:
    return [line for line in out.splitlines() if "waiting for the autoscaler" in line]


# --- the resource check on a joined cluster ----------------------------------------------------------------


def test_joined_cluster_asks_the_autoscaler_for_a_trial_and_clears_the_request_once_it_fits(fake, capsys):
    # the head has no CPU and no GPU; a GPU node (4 CPU, 1 GPU) joins after ~65 s of waiting (13 polls of 5 s)
    cluster = fake({"memory": 1e9}, later={"CPU": 4.0, "GPU": 1.0}, after=14)
    _check(cluster, cpus=1, gpus=1)
    assert cluster.requests == [{"num_cpus": None, "bundles": [{"CPU": 1, "GPU": 1}]},
                                {"num_cpus": None, "bundles": []}]  # asked, then cleared
    out = capsys.readouterr().out
    assert out.startswith("[study] asked the autoscaler for a trial's 1 CPU, 1 GPU (the cluster has 0 CPU, 0 GPU); "
                          "waiting up to 900 s (study.autoscaler_wait_s)\n"), out
    assert out.endswith("[study] the Ray cluster has 4 CPU, 1 GPU after 65 s: a trial fits\n"), out
    lines = _progress(out)
    assert len(lines) == 2, lines  # at 30 s and at 60 s
    assert lines[0] == ("[study] waiting for the autoscaler to add 1 CPU, 1 GPU for a trial (1 CPU, 1 GPU): "
                        "30 s of 900 s so far; the cluster has 0 CPU, 0 GPU")
    assert "60 s of 900 s so far" in lines[1]


def test_joined_cluster_refuses_in_one_line_when_the_wait_is_over_and_clears_the_request(fake, capsys):
    cluster = fake({"CPU": 8.0})  # CPUs only: the autoscaler never adds a GPU node
    with pytest.raises(UserError) as e:
        _check(cluster, cpus=4, gpus=0.5, wait_s=100)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("study.cpus_per_trial/gpus_per_trial: a trial needs 0.5 GPU but the Ray cluster has "
                              "8 CPU, 0 GPU in all after waiting 100 s for the autoscaler (asked for 4 CPU, 0.5 GPU; "
                              "study.autoscaler_wait_s)"), message
    assert "--set study.autoscaler_wait_s=" in message and "--set study.gpus_per_trial=" in message
    assert cluster.requests == [{"num_cpus": None, "bundles": [{"CPU": 4, "GPU": 0.5}]},
                                {"num_cpus": None, "bundles": []}]
    lines = _progress(capsys.readouterr().out)
    assert [line.split(": ", 1)[1].split(" so far")[0] for line in lines] == [
        "30 s of 100 s", "60 s of 100 s", "90 s of 100 s"]
    assert all("add 0.5 GPU for a trial (4 CPU, 0.5 GPU)" in line and "the cluster has 8 CPU, 0 GPU" in line
               for line in lines), lines
    assert cluster.t - 1000.0 == pytest.approx(100.0)  # waited exactly the setting


def test_request_is_cleared_when_the_wait_is_interrupted(fake):
    cluster = fake({"CPU": 0.0})

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preflight.check_resources(1, 1, True, 900, clock=cluster.clock, sleep=interrupted)
    assert [r["bundles"] for r in cluster.requests] == [[{"CPU": 1, "GPU": 1}], []]


def test_resources_that_fit_at_once_ask_nothing(fake, capsys):
    cluster = fake({"CPU": 4.0, "GPU": 1.0})
    _check(cluster, cpus=4, gpus=1)
    _check(cluster, cpus=2, gpus=0)
    assert cluster.requests == [] and capsys.readouterr().out == ""


def test_a_cpu_only_trial_asks_for_cpus_only(fake):
    cluster = fake({"CPU": 0.0}, later={"CPU": 4.0}, after=2)
    _check(cluster, cpus=2, gpus=0)
    assert [r["bundles"] for r in cluster.requests] == [[{"CPU": 2}], []]


def test_a_local_ray_is_refused_at_once_without_asking(fake):
    cluster = fake({"CPU": 2.0})
    with pytest.raises(UserError, match=r"needs 1 GPU but the Ray cluster has 2 CPU, 0 GPU in all; lower them"):
        _check(cluster, cpus=1, gpus=1, joined=False)
    assert cluster.requests == [] and cluster.t == 1000.0


# --- the setting --------------------------------------------------------------------------------------------


def test_autoscaler_wait_is_a_study_setting():
    assert load_space(QUICKSTART).study.autoscaler_wait_s == 900
    assert load_space(QUICKSTART, {"study.autoscaler_wait_s": 1800}).study.autoscaler_wait_s == 1800
    with pytest.raises(ConfigError, match="autoscaler_wait_s"):
        load_space(QUICKSTART, {"study.autoscaler_wait_s": -1})


def test_cluster_spaces_ask_for_a_gpu_per_trial_and_the_small_ones_keep_auto():
    spaces = ROOT / "search_spaces"
    for name in ("cifar10_vgg16", "cifar10_wrn_28_4", "svhn_vgg16"):
        assert load_space(spaces / f"{name}.yaml").study.gpus_per_trial == 1, name
    for name in ("quickstart", "fashion_mnist"):
        assert load_space(spaces / f"{name}.yaml").study.gpus_per_trial == "auto", name


# --- `auto` on a joined cluster, and the whole path through `study run` -------------------------------------


@pytest.mark.parametrize("address, have, notice, gpus", [
    ("127.0.0.1:1", {"CPU": 4.0}, True, 0),  # joined, no GPU up: the notice
    ("127.0.0.1:1", {"CPU": 4.0, "GPU": 1.0}, False, 1),  # joined, a GPU up: auto takes it
    (None, {"CPU": 4.0}, False, 0),  # a local Ray without GPU: nothing to say
])
def test_auto_on_a_joined_cluster_without_gpus_says_so_in_one_line(fake, monkeypatch, capsys, address, have, notice,
                                                                   gpus):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(startup, "start_ray", lambda address, num_cpus: None)
    checked = []
    monkeypatch.setattr(preflight, "check_resources", lambda *a, **kw: checked.append((a, kw)))
    fake(have)
    startup.start_ray_checked(load_space(QUICKSTART), address, None)
    out = capsys.readouterr().out
    assert out.count(NO_GPU_NOTICE) == (1 if notice else 0), out
    assert checked == [((1.0, gpus), {"joined": address is not None, "wait_s": 900.0})]
    if notice:
        assert "no GPU" in NO_GPU_NOTICE and "--set study.gpus_per_trial=1" in NO_GPU_NOTICE
        assert "\n" not in NO_GPU_NOTICE


def test_study_run_on_a_cluster_without_gpu_nodes_is_refused_in_one_line_exit_2(fake, monkeypatch, tmp_path, capsys):
    """`study run --address` with gpus_per_trial 1 where the autoscaler adds nothing: the request is made,
    cleared, and the command ends with the one-line refusal, exit status 2, nothing created."""
    from study import cli

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(startup, "start_ray", lambda address, num_cpus: None)
    monkeypatch.setattr(preflight, "POLL_S", 0.05)
    cluster = fake({"memory": 1e9})
    runs = tmp_path / "runs"
    with socket.socket() as listener:  # the address check wants a port that answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        rc = cli.main(["run", str(QUICKSTART), "--runs-dir", str(runs), "--address", f"127.0.0.1:{port}",
                       "--set", "study.gpus_per_trial=1", "--set", "study.autoscaler_wait_s=0.3"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("study: error:")]
    assert len(lines) == 1 and "needs 1 CPU and 1 GPU" in lines[0], err
    assert "after waiting 0.3 s for the autoscaler" in lines[0] and "Traceback" not in err, err
    assert [r["bundles"] for r in cluster.requests] == [[{"CPU": 1, "GPU": 1}], []]
    assert not (runs / "quickstart").exists()
