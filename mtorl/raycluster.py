"""Connecting to Ray: an existing cluster (RAY_ADDRESS / --address) or a local one on loopback."""

from __future__ import annotations

import os
from typing import Any

from mtorl.errors import MtorlError

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API client looks first for the dashboard

# Settings that keep a small machine responsive (see docs/OPERATIONS.md). Applied only when a
# command starts Ray, never at import time, and never over a value the user set.
LOCAL_DEFAULTS = {
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True,
             secret_env: tuple[str, ...] = ()) -> Any:
    """``ray.init`` once. Local clusters get more logical CPUs than cores (at least 4) so Ray Data
    read tasks, Train workers and Tune drivers never wait on each other on a 2-core machine.
    ``secret_env``: more variable names never to forward (e.g. a serve token's)."""
    import ray

    if ray.is_initialized():
        return ray
    for k, v in LOCAL_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from mtorl import console

    address = address or os.environ.get("RAY_ADDRESS")
    from mtorl.storage.credentials import forwardable_env

    # never a secret in a runtime_env (Ray logs it): the keys travel in a 0600 file whose path is passed
    env_vars = forwardable_env(("AWS_", "MTORL_", "WANDB_", "RAY_DATA_", "RAY_TRAIN_"), also_secret=secret_env)
    kwargs: dict[str, Any] = console.ray_init_kwargs()
    if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # inside a Ray job the job's runtime_env applies
        kwargs["runtime_env"] = {"env_vars": env_vars}
    console.before_ray_init()  # quiet console: Ray's output into the session's log file from here on
    if address:
        ray.init(address=address, **kwargs)
    else:
        cpus = num_cpus or int(os.environ.get("MTORL_RAY_CPUS", "0")) or max(4, 2 * (os.cpu_count() or 1))
        # address="local": always a new cluster, never one found in the temp dir (another user's or test's).
        # The dashboard binds loopback; Ray 2.60's own servers listen on all interfaces whatever the node
        # IP (ray.init maps 127.0.0.1 to the machine's address): see docs/OPERATIONS.md.
        # Ray Train's placement-group cleaner asks the State API for its controller with no address, which
        # fails ("Found multiple active Ray instances") when another Ray runs on this machine: tell the
        # cluster's processes its dashboard (not a secret) by picking the dashboard's port here.
        from mtorl.localhost import free_port

        port = free_port()
        if "runtime_env" in kwargs:
            kwargs["runtime_env"]["env_vars"][API_SERVER_ENV] = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, **kwargs)
    if quiet:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    console.after_ray_init()
    return ray


class ResourceError(MtorlError):
    """The Ray cluster can't provide what a job asks for: raised in seconds instead of waiting forever."""


def check_resources(per_unit: dict[str, float], units: int, what: str) -> None:
    """Refuse a request the cluster cannot place: ``units`` bundles of ``per_unit`` (e.g. {"CPU": 1, "GPU": 1}
    per Train worker) against ``ray.cluster_resources()`` (the total) and the largest node (one bundle must
    fit on one node). ``what`` names the request in the one-line error."""
    import ray

    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    missing = []
    for res, amount in per_unit.items():
        if amount <= 0:
            continue
        need, have = amount * units, float(total.get(res, 0.0))
        biggest = max((float(n.get(res, 0.0)) for n in nodes), default=0.0)
        if have + 1e-9 < need:
            missing.append(f"{need:g} {res} in all ({units} x {amount:g}), the cluster has {have:g}")
        elif biggest + 1e-9 < amount:
            missing.append(f"{amount:g} {res} on one node, the largest node has {biggest:g}")
    if missing:
        raise ResourceError(f"{what}: the Ray cluster cannot provide it: needs " + "; ".join(missing)
                            + " (lower the request, or add nodes)")
