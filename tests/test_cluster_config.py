"""Offline checks of the Ray cluster-launcher files (cluster.yaml, cluster-local.yaml).

`ray up` has no dry run, so these tests run the same config preparation and validation that
`ray up` runs before it touches a cloud (ray.autoscaler._private.commands._bootstrap_config):

    validate_config(prepare_config(yaml.safe_load(text)))

Why this path is offline-safe (read from ray 2.60's ray/autoscaler/_private/util.py):
- prepare_config() -> prepare_local() for `type: local` (pure dict work: one node type built from
  head_ip/worker_ips), then fillout_defaults(), which only reads the provider's defaults.yaml shipped
  inside the ray package (ray/autoscaler/{aws,local}/defaults.yaml) and merges it SHALLOWLY under the
  file; then merge_setup_commands(), validate_docker_config() and fill_node_type_min_max_workers().
  No boto3 import, no credentials, no network.
- validate_config() checks ray/autoscaler/ray-schema.json with jsonschema (top level and node types
  have additionalProperties: false, so a misspelt key fails), then that head_node_type is one of
  available_node_types and that the node types' min_workers fit under max_workers.
- What `ray up` does AFTER this, and these tests cannot check, needs the cloud: the AWS node provider's
  fillout_available_node_types_resources() (EC2 DescribeInstanceTypes) and bootstrap_aws() (IAM role,
  key pair, security group, subnets, AMI). An AMI id that does not exist in the region is only caught
  there. The `socket` guard below makes any network attempt fail these tests loudly.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import socket
from pathlib import Path

import jsonschema
import pytest
from conftest import ROOT
import yaml

ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

AWS_FILE = ROOT / "cluster.yaml"
LOCAL_FILE = ROOT / "cluster-local.yaml"
BOTH = [AWS_FILE, LOCAL_FILE]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Validation must stay offline: any outgoing connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster config validation tried to open a connection: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def load(path: Path) -> dict:
    # `ray up` parses the file with yaml.safe_load too (anchors and aliases included).
    return yaml.safe_load(path.read_text())


def prepared(path: Path) -> dict:
    cfg = prepare_config(copy.deepcopy(load(path)))
    validate_config(cfg)
    return cfg


def all_commands(cfg: dict) -> list[str]:
    keys = ("setup_commands", "head_setup_commands", "worker_setup_commands")
    return [c for k in keys for c in cfg.get(k, [])]


# ---------------------------------------------------------------------------------------------
# Ray's own validator accepts both files


@pytest.mark.parametrize("path", BOTH, ids=lambda p: p.name)
def test_ray_validator_accepts_file(path):
    cfg = prepared(path)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    # The prepared config is what `ray up` hands to the node updaters: commands merged per node kind.
    assert cfg["head_setup_commands"][: len(cfg["setup_commands"])] == cfg["setup_commands"]


def test_aws_file_is_aws_and_local_file_is_local():
    aws, local = load(AWS_FILE), load(LOCAL_FILE)
    assert aws["provider"]["type"] == "aws"
    for key in ("region", "availability_zone", "cache_stopped_nodes"):
        assert key in aws["provider"], key
    assert aws["auth"]["ssh_user"] == "ubuntu"
    assert local["provider"]["type"] == "local"
    assert local["provider"]["head_ip"]
    assert local["provider"]["worker_ips"]
    assert local["auth"]["ssh_user"] and local["auth"]["ssh_private_key"]


def test_local_file_gets_one_node_type_per_worker_ip():
    cfg = prepared(LOCAL_FILE)
    n_ips = len(cfg["provider"]["worker_ips"])
    (node_type,) = cfg["available_node_types"].values()
    assert cfg["max_workers"] == n_ips
    assert node_type["max_workers"] == n_ips


# ---------------------------------------------------------------------------------------------
# Negative tests: the validator is not a rubber stamp


def test_misspelt_top_level_key_is_rejected():
    cfg = load(AWS_FILE)
    cfg["availabe_node_types"] = cfg.pop("available_node_types")
    with pytest.raises(jsonschema.ValidationError, match="availabe_node_types"):
        validate_config(prepare_config(cfg))


def test_head_node_type_must_name_a_defined_node_type():
    cfg = load(AWS_FILE)
    cfg["head_node_type"] = "head.missing"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(cfg))


def test_misspelt_node_type_field_is_rejected():
    cfg = load(AWS_FILE)
    worker = cfg["available_node_types"]["worker.gpu"]
    worker["max_worker"] = worker.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(cfg))


def test_min_workers_above_global_max_workers_is_rejected():
    cfg = load(AWS_FILE)
    cfg["available_node_types"]["worker.gpu"]["min_workers"] = cfg["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(cfg))


def test_local_provider_refuses_node_types():
    # Ray's local provider builds its own node type and aborts when a file defines them:
    # cluster-local.yaml must not copy the node types of cluster.yaml.
    cfg = load(LOCAL_FILE)
    cfg["available_node_types"] = load(AWS_FILE)["available_node_types"]
    cfg["head_node_type"] = "head.cpu"
    with pytest.raises(Exception, match="not supported for on-premise"):
        prepare_config(cfg)


# ---------------------------------------------------------------------------------------------
# Node types: a CPU head that runs no trials, 1-GPU workers


def test_every_referenced_node_type_exists():
    cfg = load(AWS_FILE)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    # The file's own text must not mention a node type that is not defined (e.g. a stale rename).
    text = AWS_FILE.read_text()
    mentioned = set(re.findall(r"\b(?:head|worker)\.[a-z0-9_]+\b", text))
    assert mentioned <= set(types), f"undefined node types mentioned: {mentioned - set(types)}"


def test_head_runs_no_trial_and_is_not_autoscaled():
    """The head advertises no CPU and no GPU: no trial and no pretraining task can land there."""
    cfg = prepared(AWS_FILE)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0


def test_gpu_worker_type_advertises_one_gpu_and_scales_from_zero():
    cfg = prepared(AWS_FILE)
    workers = {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}
    gpu_types = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no worker node type advertises a GPU"
    for name, node_type in gpu_types.items():
        assert node_type["resources"]["GPU"] == 1, name
        assert node_type["resources"]["CPU"] >= 1, name
        assert node_type["min_workers"] == 0, name
        assert 1 <= node_type["max_workers"] <= cfg["max_workers"], name
        assert node_type["node_config"]["InstanceType"], name


def test_image_is_one_ami_for_all_node_types():
    cfg = load(AWS_FILE)
    images = {t["node_config"].get("ImageId") for t in cfg["available_node_types"].values()}
    assert len(images) == 1, images
    (image,) = images
    # Either the documented placeholder or a real-looking AMI id; never missing (Ray would fall back
    # to an old Ubuntu 18.04 Deep Learning AMI).
    assert image == "ami-REPLACE-WITH-DLAMI-ID" or re.fullmatch(r"ami-[0-9a-f]{8,17}", image), image


# ---------------------------------------------------------------------------------------------
# What gets installed and started


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def pip_installs(cfg: dict, kind: str) -> list[list[str]]:
    return [shlex.split(c) for c in cfg[kind] if "pip" in c and "install" in c and "-U" not in c]


@pytest.mark.parametrize("path", BOTH, ids=lambda p: p.name)
def test_nodes_install_the_wheel_with_the_tested_versions(path):
    """Every node installs the project's wheel (with the PostgreSQL driver) under constraints.txt, the
    versions the tests pass with; torchattacks alone with --no-deps at its pinned version."""
    cfg = prepared(path)
    pins = constraints()
    assert pins.get("psycopg") and pins.get("psycopg-binary"), "constraints.txt pins no psycopg"
    assert 'postgres = ["psycopg[binary]' in (ROOT / "pyproject.toml").read_text()
    for kind in ("head_setup_commands", "worker_setup_commands"):
        cmds = pip_installs(cfg, kind)
        project = [c for c in cmds if any("robust_prune_study-*.whl" in a and a.endswith("[postgres]") for a in c)]
        assert project, f"{kind}: the project's wheel with [postgres] is not installed"
        attacks = [c for c in cmds if any(a.startswith("torchattacks==") for a in c)]
        assert attacks and cmds.index(project[0]) < cmds.index(attacks[0]), f"{kind}: wheel first, then torchattacks"
        for c in cmds:
            if c in attacks:
                assert "--no-deps" in c and c[-1] == f"torchattacks=={pins['torchattacks']}", c
                continue
            assert "-c" in c and c[c.index("-c") + 1].endswith("dist/constraints.txt"), (
                f"{kind}: installs without the tested versions (-c constraints.txt): {c}")
            assert not [a for a in c if any(op in a for op in ("==", ">=", "<"))], f"{kind}: an unpinned version: {c}"


@pytest.mark.parametrize("path", BOTH, ids=lambda p: p.name)
def test_only_the_wheel_folder_travels(path):
    """`ray up` copies dist/ (the wheel + constraints.txt) and nothing else of the checkout: no hashing of
    .venv, runs/ or data/ on every `ray up`, no checkout on the nodes."""
    cfg = load(path)
    assert list(cfg["file_mounts"].values()) == ["./dist"], cfg["file_mounts"]
    make = (ROOT / "Makefile").read_text()
    wheel = make[make.index("\nwheel:"):].split("\n\n")[0]
    assert "pip wheel" in wheel and "cp constraints.txt dist/" in wheel


def test_nodes_run_rays_image_of_the_pinned_ray_and_python():
    """cluster.yaml's nodes run rayproject/ray:<constraints' Ray>-py<the tests' Python>-gpu."""
    import sys

    image = load(AWS_FILE)["docker"]["image"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert image == f"rayproject/ray:{constraints()['ray']}-{py}-gpu", image
    assert constraints()["ray"] == ray.__version__


def test_cluster_files_match_rays_published_schema():
    """Ray's own ray-schema.json, read as a file and applied with jsonschema, on both files as `ray up`
    prepares them (Ray's validator above uses the same schema; this pins which file it is)."""
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    for path in BOTH:
        jsonschema.validate(prepared(path), schema)
    bad = prepared(AWS_FILE)
    bad["docker"]["imagee"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


@pytest.mark.parametrize("path", BOTH, ids=lambda p: p.name)
def test_dashboard_is_bound_to_loopback(path):
    cfg = prepared(path)
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker_start


def test_docs_use_real_ray_cli_commands():
    """Every `ray ...` / `tune ...` command line in docs/cluster.md names a real CLI command."""
    import click
    from ray.scripts.scripts import cli as ray_cli
    from ray.tune.cli.scripts import cli as tune_cli

    doc = ROOT / "docs" / "cluster.md"
    if not doc.exists():
        pytest.skip("docs/cluster.md not written")
    text = doc.read_text()
    # Command lines in code blocks, and `ray ...` / `tune ...` spans in the prose.
    candidates = [ln.strip().lstrip("$ ").strip() for ln in text.splitlines()]
    candidates += re.findall(r"`((?:ray|tune) [^`]+)`", text)
    seen = 0
    for line in candidates:
        m = re.match(r"(ray|tune)\s+([a-z][a-z-]*)(?:\s+([a-z][a-z-]*))?", line)
        if not m:
            continue
        group = ray_cli if m.group(1) == "ray" else tune_cli
        cmd = group.commands.get(m.group(2))
        assert cmd is not None, f"docs/cluster.md: `{m.group(1)} {m.group(2)}` is not a command"
        if isinstance(cmd, click.Group) and m.group(3):
            assert m.group(3) in cmd.commands, f"docs/cluster.md: `{line}` is not a command"
        seen += 1
    assert seen >= 5


def test_aws_file_keeps_the_study_in_a_bucket():
    """cluster.yaml ships with the study folder in S3: one value (STUDY_RUNS_DIR, every `study` command's
    default --runs-dir) to change, and the workers get the instance profile that may use the bucket."""
    cfg = load(AWS_FILE)
    exports = [c for c in cfg["setup_commands"] if "STUDY_RUNS_DIR=" in c]
    assert len(exports) == 1 and "export STUDY_RUNS_DIR=s3://" in exports[0], exports
    worker = cfg["available_node_types"]["worker.gpu"]["node_config"]
    assert worker["IamInstanceProfile"] == {"Name": "robust-prune-study-worker"}
    policy = json.loads((ROOT / "docs" / "cluster-worker-policy.json").read_text())
    resources = [r for st in policy["Statement"]
                 for r in ([st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"])]
    assert resources and all(r.startswith("arn:aws:s3:::CHANGE-ME-BUCKET") for r in resources), resources
    from study.cli import build_parser
    import os

    os.environ["STUDY_RUNS_DIR"] = "s3://bucket/prefix"
    try:
        args = build_parser().parse_args(["resume", "name"])
    finally:
        del os.environ["STUDY_RUNS_DIR"]
    assert args.runs_dir == "s3://bucket/prefix"


def test_the_cluster_spaces_data_is_downloaded_on_every_node_where_they_read_it():
    """Trials read their data set on whatever node they run: cluster.yaml's setup (every node, in Ray's image,
    whose user is `ray`) downloads each data set a cluster space names, into the folder that space names."""
    classes = {"cifar10": "CIFAR10", "svhn": "SVHN"}
    setup = " ".join(load(AWS_FILE)["setup_commands"])
    seen = 0
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        space = yaml.safe_load(path.read_text())
        data = space["trial"]["data"]
        if space["study"].get("gpus_per_trial") != 1:  # the cluster spaces ask for GPUs explicitly
            continue
        assert data["root"] == "~/data", path.name
        folder = data["root"].replace("~", "/home/ray", 1)
        assert f"d.{classes[data['name']]}('{folder}'" in setup, f"{path.name}: {data['name']} not downloaded to {folder}"
        seen += 1
    assert seen >= 3
