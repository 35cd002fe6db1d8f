"""Driver of a TrainJob: builds the Ray Train ``TorchTrainer`` from the typed spec and runs it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.data import FileShuffleConfig
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from mtorl import storage
from mtorl.data.manifest import Manifest
from mtorl.data.pipeline import check_shards, load_manifest, manifest_sha256, window_dataset
from mtorl.spec import TrainJob, job_to_dict
from mtorl.training.checkpoint import (BEST_FILE, best_run_checkpoint, list_run_checkpoints,
                                       remove_unregistered_checkpoints)
from mtorl.training.step import dist_backend

PASS_ENV_PREFIXES = ("AWS_", "MTORL_", "WANDB_", "RAY_DATA_")


def worker_env() -> dict[str, str]:
    """Environment the workers need. Ray logs a runtime_env, so no secret: object-store and W&B keys
    travel in a 0600 file named by ``MTORL_CREDENTIALS_FILE`` (see mtorl.storage.credentials)."""
    from mtorl.storage.credentials import forwardable_env

    return forwardable_env(PASS_ENV_PREFIXES)


def run_uri(job: TrainJob) -> str:
    return storage.join(job.spec.output, job.metadata.name)


def storage_args(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: ``bucket/prefix`` plus the S3 filesystem for s3://."""
    fs, path = storage.resolve(uri)
    if uri.startswith("s3://"):
        storage.ensure_bucket(uri)
        from mtorl.storage.retrying_fs import retrying_s3
        from mtorl.storage.uri import retry_window_s

        # Ray Train's own storage calls (workers' checkpoint uploads, the controller's snapshot and pruning,
        # restores) wait out an outage as mtorl's do (training sets the window)
        return path, (retrying_s3(retry_window_s(), fs) if retry_window_s() > 0 else fs)
    os.makedirs(path, exist_ok=True)
    return path, None


def to_uri(output: str, path: str) -> str:
    return f"s3://{path}" if output.startswith("s3://") else path


# Bytes a cached window step costs: state (D float32) + prev_channel, channel (int64) + prev_reward, reward,
# gain, cost, propensity (float32) + done, mask (bool); x2: headroom for the shard each worker cuts while it
# reads its part (the parts of one node's workers add up to the split once).
_STEP_BYTES_FIXED = 2 * 8 + 5 * 4 + 2 * 1
CACHE_MEMORY_FRACTION = 1 / 8


def auto_cache_max_steps(state_dim: int, memory_bytes: float, fraction: float = CACHE_MEMORY_FRACTION) -> int:
    """The default ``trainer.cache_windows_max_steps``: the most steps whose cached windows (counted twice:
    the workers' parts plus reading headroom) fit in ``fraction`` of a node's memory."""
    per_step = 2 * (4 * state_dim + _STEP_BYTES_FIXED)
    return int(fraction * memory_bytes // per_step)


def node_memory_bytes() -> float:
    """Memory of the smallest alive Ray node (its ``memory`` resource), else (no cluster joined: ``ray.nodes``
    would start one) this machine's total."""
    mems: list[float] = []
    if ray.is_initialized():
        try:
            mems = [float(n["Resources"]["memory"]) for n in ray.nodes() if n.get("Alive") and "memory" in n.get("Resources", {})]
        except Exception:  # noqa: BLE001 - the cluster can't say: size from this machine
            mems = []
    if mems:
        return min(mems)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default). A
# worker's report waits in a one-slot queue until the next poll, and the end of the loop is seen only at a
# poll, so a short job idles up to 2 s per epoch and per run end. A missed poll is not a failure (a worker is
# declared dead only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min), so a shorter period is safe.
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.5"


@dataclass(frozen=True)
class LoopPlan:
    """What a training run's loop gets (``mtorl.training.worker.train_loop``), from the spec and the dataset:
    its config (the typed job and manifest as dicts, which splits each worker caches), the streamed
    splits' Ray Data datasets, and where the run's checkpoints go."""

    config: dict[str, Any]
    datasets: dict[str, Any]
    manifest: Manifest
    storage_path: str
    filesystem: Any


def cache_max_steps(job: TrainJob, manifest: Manifest) -> int:
    """The most steps of a split that training caches (``trainer.cache_windows_max_steps``, else sized from
    the node's memory); a larger split streams through Ray Data."""
    max_cached = job.spec.trainer.cache_windows_max_steps
    return auto_cache_max_steps(manifest.state_dim, node_memory_bytes()) if max_cached is None else max_cached


def needs_ray(job: TrainJob) -> bool:
    """Whether a run needs a Ray cluster: Ray Train workers (``trainer.workers`` > 0), or a split too large
    to cache (it streams through Ray Data). An in-process run (``workers: 0``) of cached splits runs in
    Ray Train's local mode in this process, with no cluster to start."""
    spec = job.spec
    if spec.trainer.workers > 0:
        return True
    manifest = load_manifest(spec.data)
    limit = cache_max_steps(job, manifest)
    return any(manifest.split(spec.data, split).steps > limit for split in ("train", "val"))


def loop_plan(job: TrainJob, run_name: str | None = None, storage_path_override: tuple[str, Any] | None = None,
              progress: Any = print, epoch_feed: Any = None) -> LoopPlan:
    """Choose per split between caching and streaming (printed), and build the loop's config."""
    spec = job.spec
    manifest = load_manifest(spec.data)
    t = spec.trainer
    datasets: dict[str, Any] = {}
    cached: list[str] = []
    max_cached = cache_max_steps(job, manifest)
    for split in ("train", "val"):
        steps = manifest.split(spec.data, split).steps
        if steps <= max_cached:
            # Small split: each worker reads its own equal part of the windows straight from the shards
            # (mtorl.data.pipeline.read_windows_part) once, after its process starts, and keeps it for every
            # epoch. The driver reads nothing (it only checks that the shards exist), and no Ray Data
            # pipeline or streaming split runs, so the job's start-up pays no dataset planning, no
            # read tasks and no split coordinator, and the first epoch waits for input no longer than the
            # later ones.
            check_shards(spec.data, split, manifest)
            cached.append(split)
            mode = f"cached in memory (<= {max_cached:,} steps; each worker reads its part once, kept for every epoch)"
        else:
            # Large split: streams from object storage every epoch, in a new file order each epoch (the
            # workers add a local shuffle buffer); memory stays bounded by the blocks in flight.
            datasets[split] = window_dataset(
                spec.data, split, spec.window, manifest=manifest,
                **({"shuffle": FileShuffleConfig(seed=t.seed, reseed_after_execution=True)} if split == "train" else {}))
            mode = f"streaming from object storage every epoch (> {max_cached:,} steps; no whole-split cache)"
        progress(f"data: {split} split {steps:,} steps: {mode}")
    storage_path, fs = storage_path_override or storage_args(spec.output)
    config = {"job": job_to_dict(job), "manifest": manifest.dump(), "manifest_sha256": manifest_sha256(spec.data),
              "cached_splits": cached, "epoch_feed": epoch_feed,
              "local_run_uri": to_uri(spec.output, f"{storage_path.rstrip('/')}/{run_name or job.metadata.name}")
              if t.workers == 0 else None}
    return LoopPlan(config, datasets, manifest, storage_path, fs)


def build_trainer(job: TrainJob, callbacks: list[Any] | None = None, run_name: str | None = None,
                  storage_path_override: tuple[str, Any] | None = None,
                  progress: Any = print, epoch_feed: Any = None) -> tuple[TorchTrainer, Manifest]:
    spec = job.spec
    t = spec.trainer
    plan = loop_plan(job, run_name, storage_path_override, progress, epoch_feed)
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    storage_path, fs = plan.storage_path, plan.filesystem
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, HEALTH_CHECK_INTERVAL_S)  # read by fit(), passed on by Ray Train
    env = worker_env()
    env.setdefault("WANDB_MODE", spec.tracking.wandb)
    trainer = TorchTrainer(
        _loop,
        train_loop_config=plan.config,
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=dist_backend(t.use_gpu)),
        datasets=plan.datasets,
        run_config=RunConfig(
            name=run_name or job.metadata.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_top_k, checkpoint_score_attribute=t.metric,
                                               checkpoint_score_order=t.mode),
            failure_config=FailureConfig(max_failures=t.max_failures),
            worker_runtime_env={"env_vars": env},
            callbacks=callbacks or None,
        ),
    )
    return trainer, plan.manifest


def check_train_resources(job: TrainJob, extra_units: int = 1, what: str = "") -> None:
    """Fail in seconds, naming what is missing, when the cluster can't place the Train workers
    (``extra_units`` concurrent runs of them, e.g. a sweep's parallel trials)."""
    t = job.spec.trainer
    if t.workers == 0:
        return
    from mtorl.raycluster import check_resources

    per = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    check_resources(per, t.workers * extra_units,
                    what or f"trainer.workers={t.workers} x cpus_per_worker={t.cpus_per_worker:g}"
                    + (f", gpus_per_worker={t.gpus_per_worker:g}" if t.use_gpu else ""))


def prestart_autoscaling_coordinator() -> None:
    """Start Ray Data's AutoscalingCoordinator actor now, without waiting for it.

    Ray Train's controller registers its resource request with that actor when it starts (ray 2.60:
    ``scaling_policy.after_controller_start``) and waits for the answer; in a cluster where no Ray Data
    job ran yet, it first waits for that actor's new process (about 2 s on 2 cores). Started from the
    driver just before ``fit()``, it comes up while the controller's own process does. Best effort: a
    Ray without this (private) helper, or a failure here, only loses the overlap."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import \
            get_or_create_autoscaling_coordinator

        get_or_create_autoscaling_coordinator()  # detached, get_if_exists: at most one per cluster
    except Exception:  # noqa: BLE001 - an optimisation only
        pass


def _loop(config: dict[str, Any]) -> None:
    from mtorl.storage.credentials import export_to_environ
    from mtorl.training.worker import train_loop

    export_to_environ()  # WANDB_API_KEY from the credentials file, when this process lacks it
    train_loop(config)


def best_of(result: Any, metric: str, mode: str) -> tuple[Any, dict[str, Any]]:
    best = None
    for ck, m in result.best_checkpoints or []:
        v = m.get(metric)
        if v is None:
            continue
        if best is None or (v < best[1][metric] if mode == "min" else v > best[1][metric]):
            best = (ck, m)
    if best is None and result.checkpoint is not None:
        best = (result.checkpoint, result.metrics or {})
    if best is None:
        raise RuntimeError("training produced no checkpoint")
    return best


def finish_run(job: TrainJob, result: Any, uri: str) -> tuple[str, dict[str, Any], str | None, dict[str, Any]]:
    """(best checkpoint URI, its metrics, latest checkpoint URI, final metrics); writes ``best.json``."""
    spec = job.spec
    if spec.trainer.workers == 0:  # in-process: the loop persisted its checkpoints under the run
        found = best_run_checkpoint(uri, spec.trainer.metric, spec.trainer.mode)
        if found is None:
            raise RuntimeError("training produced no checkpoint")
        best_uri, meta = found
        latest_uri, latest_meta = list_run_checkpoints(uri)[-1]
        metrics, latest, final = meta.metrics, latest_uri, latest_meta.metrics
    else:
        ck, metrics = best_of(result, spec.trainer.metric, spec.trainer.mode)
        best_uri = to_uri(spec.output, ck.path)
        latest = to_uri(spec.output, result.checkpoint.path) if result.checkpoint else None
        final = result.metrics or {}
    storage.write_json(storage.join(uri, BEST_FILE), {"checkpoint": best_uri, "metric": spec.trainer.metric,
                                                      "value": metrics.get(spec.trainer.metric)})
    return best_uri, metrics, latest, final


def run_train(job: TrainJob, progress: Any = print, address: str | None = None) -> dict[str, Any]:
    """Run (or resume: same run name) a TrainJob; returns the result dict. Ray is started (or joined at
    ``address``) only when the run needs it (``needs_ray``)."""
    spec = job.spec
    t0 = time.time()
    if not ray.is_initialized():
        if needs_ray(job):
            from mtorl.raycluster import init_ray

            init_ray(address)
        else:
            from mtorl.console import without_ray

            without_ray()
            progress("ray: not started (trainer.workers: 0 and every split cached): the loop runs in this process")
    uri = run_uri(job)
    progress(f"training {spec.model.name} on {spec.data} with {spec.trainer.workers} worker(s) -> {uri}")
    # object-store calls of the driver and the workers (forwarded: MTORL_*) wait out an outage
    os.environ.setdefault("MTORL_STORAGE_RETRY_S", "90")
    check_train_resources(job)
    if spec.trainer.workers > 0:
        for orphan in remove_unregistered_checkpoints(uri):  # uploaded but never registered (killed rank 0)
            progress(f"removed {orphan}: a checkpoint the run's snapshot does not list")
    from mtorl.console import epoch_progress

    with epoch_progress(spec.trainer.epochs, local=not ray.is_initialized()) as feed:  # the epochs display of a command's console
        trainer, manifest = build_trainer(job, progress=progress, epoch_feed=feed)
        if spec.trainer.workers > 0:
            prestart_autoscaling_coordinator()
        result = trainer.fit()
    best_uri, metrics, latest, final = finish_run(job, result, uri)
    wall = time.time() - t0
    out = {
        "kind": "TrainJob", "name": job.metadata.name, "run_uri": uri, "best_checkpoint": best_uri,
        "latest_checkpoint": latest,
        "best_metrics": _plain(metrics), "final_metrics": _plain(final), "wall_s": round(wall, 2),
        "samples_per_s": final.get("train/samples_per_s"), "node_ids": final.get("perf/node_ids", []),
    }
    progress(f"best checkpoint ({spec.trainer.metric}={metrics.get(spec.trainer.metric)}): {best_uri}")
    return out


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(m, default=str))
