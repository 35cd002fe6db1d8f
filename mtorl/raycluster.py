"""Connecting to Ray: an existing cluster (RAY_ADDRESS / --address) or a local one on loopback."""

from __future__ import annotations

import os
from typing import Any

# Settings that keep a small machine responsive (see docs/OPERATIONS.md). Applied only when a
# command starts Ray, never at import time, and never over a value the user set.
LOCAL_DEFAULTS = {
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> Any:
    """``ray.init`` once. Local clusters get more logical CPUs than cores (at least 4) so Ray Data
    read tasks, Train workers and Tune drivers never wait on each other on a 2-core machine."""
    import ray

    if ray.is_initialized():
        return ray
    for k, v in LOCAL_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from mtorl import console

    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "MTORL_", "WANDB_", "RAY_DATA_", "RAY_TRAIN_"))}
    kwargs: dict[str, Any] = console.ray_init_kwargs()
    if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # inside a Ray job the job's runtime_env applies
        kwargs["runtime_env"] = {"env_vars": env_vars}
    console.before_ray_init()  # quiet console: Ray's output into the session's log file from here on
    if address:
        ray.init(address=address, **kwargs)
    else:
        cpus = num_cpus or int(os.environ.get("MTORL_RAY_CPUS", "0")) or max(4, 2 * (os.cpu_count() or 1))
        ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
    if quiet:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    console.after_ray_init()
    return ray
