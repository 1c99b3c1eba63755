"""Ray for a study: join a cluster ($RAY_ADDRESS / --address) or start a small local one; GPUs per trial.

A local Ray (a one-machine study) listens on the loopback address only. Ray binds its servers (GCS,
raylet, object manager, workers, agents) to the node's IP, which it takes from the network unless
multi-node clusters are switched off: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is Ray's own switch for
single-node Ray (the default on Windows and macOS, "to prevent firewall popups"), under which a node's IP is
127.0.0.1. The other ways do not reach loopback: `ray.init(_node_ip_address=...)` is a hidden option, and
both it and `ray start --node-ip-address 127.0.0.1` turn a loopback address into the routable one
(ray._private.services.resolve_ip_for_localhost). Ray reads the switch when it is imported, so the `study`
command sets it before anything imports ray (`keep_local_ray_on_loopback`); a program that imported ray
first gets a Ray that listens where Ray decides, with a log line saying so. A joined cluster is left as is.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import sys
from typing import Any

from study.search.running import quiet

log = logging.getLogger("study.search")
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # small: trial data lives in the trial, not in Ray's store
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch: 0 = single-node Ray on the loopback IP


def joins_cluster(address: str | None) -> bool:
    return bool(address or os.environ.get("RAY_ADDRESS"))


def keep_local_ray_on_loopback(address: str | None = None) -> bool:
    """Before `import ray`: a Ray this process starts itself listens on 127.0.0.1 only (the module's
    docstring). Nothing is set when it joins a cluster, or once ray is imported (too late for this process,
    and its child processes must agree with it); a value the user set is kept. True when it takes effect."""
    if joins_cluster(address) or "ray" in sys.modules:
        return False
    quiet.local_ray_auth(joins_cluster=False)  # Ray's token authentication, without its warning (quiet)
    os.environ.setdefault(SINGLE_NODE_ENV, "0")
    return os.environ[SINGLE_NODE_ENV] == "0"


def _is_loopback(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    keep_local_ray_on_loopback(address)
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if joins_cluster(address):
        ray.init(address=address or None, log_to_driver=True)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
             log_to_driver=True)
    ip = ray.util.get_node_ip_address()
    if not _is_loopback(ip):
        log.info("the local Ray listens on %s, not on the loopback address only: ray was imported before "
                 "%s=0 was set (the `study` command sets it first)", ip, SINGLE_NODE_ENV)


# printed by `study run | resume` when `auto` finds no GPU on a joined cluster (study.search.running.startup)
NO_GPU_NOTICE = ("[study] study.gpus_per_trial is auto and the Ray cluster has no GPU now: the trials will use no "
                 "GPU and no GPU node will be asked for; to run them on GPU nodes the autoscaler starts, pass "
                 "--set study.gpus_per_trial=1")


def resolve_gpus(setting: Any) -> float:
    """GPUs per trial: the number set, or for `auto` 1 where the Ray cluster has a GPU now, else 0 (an
    autoscaler's GPU nodes that are not up yet do not count: ask for them with a number)."""
    if setting != "auto":
        return float(setting)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
