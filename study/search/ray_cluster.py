"""Ray for a study: join a cluster ($RAY_ADDRESS / --address) or start a small local one; GPUs per trial."""
from __future__ import annotations

import os
from typing import Any

LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # small: trial data lives in the trial, not in Ray's store


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 log_to_driver=True)


def resolve_gpus(setting: Any) -> float:
    if setting != "auto":
        return float(setting)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
