"""Ray Train worker loop: short glue around ``mtorl.training.step`` (plain PyTorch)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import ray.train
import ray.train.torch

from mtorl.models import build_model
from mtorl.spec import validate_doc
from mtorl.training import checkpoint as ckpt
from mtorl.training.step import NonFiniteLossError, decision_val_metrics, train_batches, unwrap, val_metrics, validate_batches

# Test-only fault injection: the worker of this rank exits hard at this global step, once (marker file).
CRASH_AT_STEP_ENV = "MTORL_TEST_CRASH_AT_STEP"
CRASH_MARKER_ENV = "MTORL_TEST_CRASH_MARKER"
# Test-only: the batch of this global step gets NaN states (to show a NaN loss stops the run cleanly).
NAN_AT_STEP_ENV = "MTORL_TEST_NAN_AT_STEP"


def _gather(x: np.ndarray) -> np.ndarray:
    """Concatenate an array from every worker (validation metrics are over all shards)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x)
    return np.concatenate(parts)


def _sum(values: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _maybe_crash(global_step: int, rank: int) -> None:
    at = os.environ.get(CRASH_AT_STEP_ENV)
    marker = os.environ.get(CRASH_MARKER_ENV)
    if at is None or marker is None or int(at) != global_step or rank != max(0, ray.train.get_context().get_world_size() - 1):
        return
    if Path(marker).exists():
        return
    Path(marker).write_text(str(global_step))
    print(f"[test] injected crash of rank {rank} at step {global_step}", flush=True)
    os._exit(1)


class ShardCache:
    """A worker's shard of a small split, kept in memory after the first full pass.

    ``batches(source)`` yields the batches of ``source`` (a fresh ``iter_batches`` iterator) and,
    once ``source`` has been read to the end, keeps their rows; later calls serve the kept rows
    instead, in a new order each epoch when ``shuffle_seed`` is given. A pass that stops early keeps
    nothing. Shards of ``streaming_split(equal=True)`` have the same size, so every worker still
    runs the same number of steps.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.rows: dict[str, np.ndarray] | None = None

    @property
    def ready(self) -> bool:
        return self.rows is not None

    def batches(self, source: Any, batch_size: int, shuffle_seed: int | None = None) -> Any:
        if self.rows is not None:
            n = len(next(iter(self.rows.values())))
            order = np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else np.arange(n)
            for a in range(0, n, batch_size):
                idx = order[a:a + batch_size]
                yield {k: v[idx] for k, v in self.rows.items()}
            return
        kept: list[dict[str, np.ndarray]] = []
        for b in source():
            if self.enabled:
                kept.append(b)
            yield b
        if self.enabled and kept:  # only after the whole shard went by
            self.rows = {k: np.concatenate([b[k] for b in kept]) for k in kept[0]}


def _wandb_run(job: Any, rank: int, resume_id: str) -> Any:
    tr = job.spec.tracking
    if rank != 0 or tr.wandb == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    import wandb

    wdir = os.environ.get("WANDB_DIR") or os.path.join(tempfile.gettempdir(), "mtorl-wandb")
    os.makedirs(wdir, exist_ok=True)
    return wandb.init(
        project=tr.project, entity=tr.entity, group=tr.group, name=job.metadata.name, id=resume_id,
        resume="allow", mode=os.environ.get("WANDB_MODE", tr.wandb), dir=wdir,
        config=job.spec.model_dump(mode="json"),
    )


def train_loop(config: dict[str, Any]) -> None:
    """Per-worker loop. ``config``: {"job": TrainJob dict, "manifest": dict, "manifest_sha256": str}."""
    job = validate_doc(config["job"], "<train_loop_config>")
    spec = job.spec
    manifest = config["manifest"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if spec.trainer.use_gpu else torch.device("cpu")

    torch.manual_seed(spec.trainer.seed)  # identical init on every rank (DDP also broadcasts)
    binary = bool(manifest.get("gain_binary", True)) if spec.objective.reward_loss == "auto" else spec.objective.reward_loss == "bce"
    state_dim = len(manifest["step_features"]) + len(manifest["user_features"])
    n_channels = len(manifest["channels"])
    model = build_model(spec.model, state_dim=state_dim, n_channels=n_channels, binary=binary)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.trainer.lr, weight_decay=spec.trainer.weight_decay)

    start_epoch, global_step, history = 0, 0, []
    local_run = config.get("local_run_uri")  # workers = 0: checkpoints persisted by this loop
    resume = ray.train.get_checkpoint()
    loaded = None
    if resume is not None:
        with resume.as_directory() as d:
            loaded = ckpt.load_local_dir(d, with_optimizer=True)
    elif local_run and ckpt.list_run_checkpoints(local_run):
        loaded = ckpt.load_checkpoint(ckpt.list_run_checkpoints(local_run)[-1][0], with_optimizer=True)
    if loaded is not None:
        model.load_state_dict(loaded.state_dict)
        if loaded.optimizer_state is not None:
            optimizer.load_state_dict(loaded.optimizer_state)
        start_epoch = int(loaded.meta["epoch"]) + 1
        global_step = int(loaded.meta["step"])
        history = list(loaded.meta.get("history", []))
        if rank == 0:
            print(f"[mtorl] resumed from epoch {start_epoch - 1} (step {global_step})", flush=True)

    if world > 1:
        model = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": spec.model.name != "mtorl"}
        )
    else:
        model = model.to(device)

    run = _wandb_run(job, rank, resume_id=f"{job.metadata.name}-{config.get('run_id', 'run')}")
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    cache = config.get("cache_shards") or {}
    train_cache, val_cache = ShardCache(bool(cache.get("train"))), ShardCache(bool(cache.get("val")))
    bs = spec.trainer.batch_size
    epochs = spec.trainer.epochs
    t_run = time.time()
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        wait = [0.0]

        def on_step(i: int, losses: dict[str, float]) -> None:
            nonlocal global_step
            global_step += 1
            _maybe_crash(global_step, rank)

        nan_at = int(os.environ.get(NAN_AT_STEP_ENV, "-1"))

        def timed(it: Any) -> Any:
            k = global_step
            while True:
                t = time.time()
                try:
                    b = next(it)
                except StopIteration:
                    return
                wait[0] += time.time() - t
                k += 1
                if k == nan_at:
                    b = dict(b, state=np.full_like(b["state"], np.nan))
                yield b

        seed = spec.trainer.seed + epoch * 1000 + rank
        batches = timed(iter(train_cache.batches(lambda: train_shard.iter_batches(
            batch_size=bs, batch_format="numpy", prefetch_batches=2,
            local_shuffle_buffer_size=bs * 8, local_shuffle_seed=seed), bs, shuffle_seed=seed)))
        try:
            stats = train_batches(model, optimizer, batches, spec.objective, binary, device,
                                  spec.trainer.grad_clip, spec.trainer.max_steps_per_epoch, on_step)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"epoch {epoch}: {e}; the last good checkpoint is kept") from None
        train_time = time.time() - t0
        sums = _sum({**{k: v for k, v in stats.sums.items()}, "_steps": stats.steps, "_windows": stats.windows,
                     "_wait": wait[0], "_time": train_time})
        train_metrics = {f"train/{k}": v / max(sums["_steps"], 1) for k, v in sums.items() if not k.startswith("_")}
        samples_per_s = sums["_windows"] / max(sums["_time"] / world, 1e-9)

        val = validate_batches(unwrap(model), val_cache.batches(lambda: val_shard.iter_batches(batch_size=bs * 2, batch_format="numpy"), bs * 2),
                               spec.objective, binary, device)
        vsums = _sum({**val.stats.sums, "_steps": val.stats.steps})
        val_losses = {f"val/{k}": v / max(vsums["_steps"], 1) for k, v in vsums.items() if not k.startswith("_")}
        vm = val_metrics(_gather(val.channel), _gather(val.action_probs), _gather(val.reward), _gather(val.reward_hat), binary)
        vm.update(decision_val_metrics(_gather(val.channel), _gather(val.action_probs), _gather(val.reward), _gather(val.reward_pred),
                                       _gather(val.cost), _gather(val.propensity), binary, spec.decision))
        metrics: dict[str, Any] = {
            **train_metrics, **val_losses, **{f"val/{k}": v for k, v in vm.items()},
            "epoch": epoch, "step": global_step, "train/samples_per_s": samples_per_s,
            "train/input_wait_frac": sums["_wait"] / max(sums["_time"], 1e-9),
            "perf/node_id": ctx.get_node_id() if hasattr(ctx, "get_node_id") else ray.get_runtime_context().get_node_id(),
        }
        node_ids = _gather(np.array([metrics["perf/node_id"]], dtype=object))
        metrics["perf/node_ids"] = sorted(set(map(str, node_ids)))
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if rank == 0:
            done = epoch + 1 - start_epoch
            eta = (time.time() - t_run) / done * (epochs - epoch - 1)
            print(f"[mtorl] epoch {epoch + 1}/{epochs} loss {metrics.get('train/loss', float('nan')):.4f} "
                  f"val/loss {metrics.get('val/loss', float('nan')):.4f} val/reward_auc {metrics.get('val/reward_auc', float('nan')):.4f} "
                  f"{samples_per_s:.0f} windows/s ETA {eta:.0f}s", flush=True)
            if run is not None:
                run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=global_step)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                ckpt.write_checkpoint_dir(tmp, unwrap(model), optimizer, {
                    "spec": config["job"], "model_args": {"state_dim": state_dim, "n_channels": n_channels, "binary": binary},
                    "manifest": manifest, "manifest_uri": spec.data, "manifest_sha256": config["manifest_sha256"],
                    "epoch": epoch, "step": global_step, "metrics": metrics, "history": history,
                })
                if local_run:
                    ckpt.persist_local(tmp, local_run, epoch, spec.trainer.keep_top_k, spec.trainer.metric, spec.trainer.mode)
                else:
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
    if run is not None:
        run.finish()
