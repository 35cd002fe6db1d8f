"""Driver of a TrainJob: builds the Ray Train ``TorchTrainer`` from the typed spec and runs it."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from mtorl import storage
from mtorl.data.pipeline import load_manifest, manifest_sha256, window_dataset
from mtorl.spec import TrainJob, job_to_dict
from mtorl.training.checkpoint import BEST_FILE, best_run_checkpoint, list_run_checkpoints

PASS_ENV_PREFIXES = ("AWS_", "MTORL_", "WANDB_", "RAY_DATA_")


def worker_env() -> dict[str, str]:
    """Environment the workers need (object-store credentials included; never printed)."""
    return {k: v for k, v in os.environ.items() if k.startswith(PASS_ENV_PREFIXES)}


def run_uri(job: TrainJob) -> str:
    return storage.join(job.spec.output, job.metadata.name)


def storage_args(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: ``bucket/prefix`` plus the S3 filesystem for s3://."""
    fs, path = storage.resolve(uri)
    if uri.startswith("s3://"):
        storage.ensure_bucket(uri)
        return path, fs
    os.makedirs(path, exist_ok=True)
    return path, None


def to_uri(output: str, path: str) -> str:
    return f"s3://{path}" if output.startswith("s3://") else path


def build_trainer(job: TrainJob, callbacks: list[Any] | None = None, run_name: str | None = None,
                  storage_path_override: tuple[str, Any] | None = None,
                  epoch_feed: Any = None) -> tuple[TorchTrainer, dict[str, Any]]:
    spec = job.spec
    manifest = load_manifest(spec.data)
    t = spec.trainer
    datasets, cached = {}, {}
    for split in ("train", "val"):
        ds = window_dataset(spec.data, split, spec.window, manifest=manifest)
        # Small splits: build the windows once (in Ray's object store), and each worker keeps the
        # shard it streamed in its first epoch in memory for the later ones, instead of paying the
        # read + windowing + split start-up every epoch (it dominated the input wait on the samples).
        cached[split] = manifest["splits"][split]["steps"] <= t.cache_windows_max_steps
        if cached[split]:
            ds = ds.materialize()
        datasets[split] = ds
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    storage_path, fs = storage_path_override or storage_args(spec.output)
    env = worker_env()
    env.setdefault("WANDB_MODE", spec.tracking.wandb)
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"job": job_to_dict(job), "manifest": manifest, "manifest_sha256": manifest_sha256(spec.data),
                           "cache_shards": cached, "epoch_feed": epoch_feed,
                           "local_run_uri": to_uri(spec.output, f"{storage_path.rstrip('/')}/{run_name or job.metadata.name}")
                           if t.workers == 0 else None},
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        datasets=datasets,
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
    return trainer, manifest


def _loop(config: dict[str, Any]) -> None:
    from mtorl.training.worker import train_loop

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
        metrics, latest, final = meta["metrics"], latest_uri, latest_meta["metrics"]
    else:
        ck, metrics = best_of(result, spec.trainer.metric, spec.trainer.mode)
        best_uri = to_uri(spec.output, ck.path)
        latest = to_uri(spec.output, result.checkpoint.path) if result.checkpoint else None
        final = result.metrics or {}
    storage.write_json(storage.join(uri, BEST_FILE), {"checkpoint": best_uri, "metric": spec.trainer.metric,
                                                      "value": metrics.get(spec.trainer.metric)})
    return best_uri, metrics, latest, final


def run_train(job: TrainJob, progress: Any = print) -> dict[str, Any]:
    """Run (or resume: same run name) a TrainJob; returns the result dict."""
    spec = job.spec
    t0 = time.time()
    if not ray.is_initialized():
        from mtorl.raycluster import init_ray

        init_ray()
    uri = run_uri(job)
    progress(f"training {spec.model.name} on {spec.data} with {spec.trainer.workers} worker(s) -> {uri}")
    from mtorl.console import epoch_progress

    with epoch_progress(spec.trainer.epochs) as feed:  # the epochs display of a command's console
        trainer, manifest = build_trainer(job, epoch_feed=feed)
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
