"""Ray Train worker loop: short glue around ``mtorl.training.step`` (plain PyTorch)."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import torch

import ray.train
import ray.train.torch

from mtorl import faults
from mtorl.data.manifest import Manifest
from mtorl.data.pipeline import read_windows_part
from mtorl.models import build_model
from mtorl.spec import validate_doc
from mtorl.training import checkpoint as ckpt
from mtorl.training import tracking
from mtorl.training.step import (NonFiniteLossError, decision_val_metrics, epoch_lr, maybe_compile, place_for_training, train_batches, unwrap,
                                 set_lr, val_metrics, validate_batches)
from mtorl.training.step import gather_all as _gather
from mtorl.training.step import sum_all as _sum



class ShardCache:
    """A worker's shard of a small split, kept in memory after the first full pass.

    ``batches(source)`` yields the batches of ``source`` (a fresh ``iter_batches`` iterator) and,
    once ``source`` has been read to the end, keeps their rows; later calls serve the kept rows
    instead, in a new order each epoch when ``shuffle_seed`` is given. A pass that stops early keeps
    nothing. ``fill(rows)`` keeps given rows up front instead (the worker's part of a cached split,
    read by the worker itself). Parts of ``read_windows_part`` and shards of
    ``streaming_split(equal=True)`` have the same size, so every worker runs the same number of steps.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.rows: dict[str, np.ndarray] | None = None

    def fill(self, rows: dict[str, np.ndarray]) -> None:
        """Keep ``rows`` (column -> array, equal lengths) as the shard: every pass serves them."""
        self.rows = rows

    @property
    def ready(self) -> bool:
        return self.rows is not None

    def batches(self, source: Any, batch_size: int, shuffle_seed: int | None = None) -> Any:
        if self.rows is not None:
            n = len(next(iter(self.rows.values()))) if self.rows else 0
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


def _announce_epoch(config: dict[str, Any], epoch: int, epochs: int, eta: float, metrics: dict[str, Any]) -> None:
    """Rank 0's epoch line: to the command's progress display when it passed a feed, else printed."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    feed = config.get("epoch_feed")
    if feed is not None:
        try:
            feed.put_nowait({"epoch": epoch, "epochs": epochs, "eta_s": eta, "metrics": scalars})
            return
        except Exception:  # noqa: BLE001 - the display is gone (driver interrupted): print instead
            pass
    print(f"[mtorl] epoch {epoch + 1}/{epochs} loss {metrics.get('train/loss', float('nan')):.4f} "
          f"val/loss {metrics.get('val/loss', float('nan')):.4f} val/reward_auc {metrics.get('val/reward_auc', float('nan')):.4f} "
          f"{metrics.get('train/samples_per_s', 0.0):.0f} windows/s ETA {eta:.0f}s", flush=True)


class RayTrainSession:
    """What the loop asks of its runner, inside a Ray Train worker (or Train's in-process local mode)."""

    def __init__(self) -> None:
        self.ctx = ray.train.get_context()
        self.rank, self.world = self.ctx.get_world_rank(), self.ctx.get_world_size()

    def device(self, use_gpu: bool) -> torch.device:
        return ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def node_id(self) -> str:
        if hasattr(self.ctx, "get_node_id"):
            return str(self.ctx.get_node_id())
        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
        return "local"  # Ray Train's local mode with no cluster (an in-process run of cached splits)

    def checkpoint(self) -> Any:
        return ray.train.get_checkpoint()

    def dataset_shard(self, split: str) -> Any:
        return ray.train.get_dataset_shard(split)

    def report(self, metrics: dict[str, Any], checkpoint: Any) -> None:
        ray.train.report(metrics, checkpoint=checkpoint)


class TrialSession:
    """The loop in a Ray Tune trial's own process (``trainer.workers: 0`` in a sweep's base): one rank, no
    Ray Train controller or worker. Ray Train's API is not callable inside a Tune function, so the loop's
    runner is this: its checkpoints are persisted by the loop under the run (``local_run_uri``), the
    epoch's metrics go to ``ray.tune.report``, and a streamed split is read from its Ray Data dataset."""

    rank, world = 0, 1

    def __init__(self, datasets: dict[str, Any]) -> None:
        self.datasets = datasets

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cuda") if use_gpu else torch.device("cpu")  # Tune set CUDA_VISIBLE_DEVICES

    def node_id(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def checkpoint(self) -> Any:
        return None  # the loop resumes from the run's own latest checkpoint

    def dataset_shard(self, split: str) -> Any:
        return self.datasets[split]

    def report(self, metrics: dict[str, Any], checkpoint: Any) -> None:
        import ray.tune

        ray.tune.report(metrics)


def train_loop(config: dict[str, Any], session: Any = None) -> None:
    """Per-worker loop. ``config``: {"job": TrainJob dict, "manifest": Manifest.dump(), "manifest_sha256": str,
    ...} (``mtorl.training.driver.loop_plan``); ``session``: its runner (default: a Ray Train worker's)."""
    job = validate_doc(config["job"], "<train_loop_config>")
    spec = job.spec
    manifest = Manifest.model_validate(config["manifest"])
    sess = session if session is not None else RayTrainSession()
    rank, world = sess.rank, sess.world
    device = sess.device(spec.trainer.use_gpu)

    torch.manual_seed(spec.trainer.seed)  # identical init on every rank (DDP also broadcasts)
    binary = manifest.gain_binary if spec.objective.reward_loss == "auto" else spec.objective.reward_loss == "bce"
    state_dim, n_channels = manifest.state_dim, manifest.n_channels
    model = build_model(spec.model, state_dim=state_dim, n_channels=n_channels, binary=binary)

    start_epoch, global_step, history = 0, 0, []
    local_run = config.get("local_run_uri")  # workers = 0: checkpoints persisted by this loop
    resume = sess.checkpoint()
    loaded = None
    if resume is not None:
        with resume.as_directory() as d:
            loaded = ckpt.load_local_dir(d, with_optimizer=True)
    elif local_run and ckpt.list_run_checkpoints(local_run):
        loaded = ckpt.load_checkpoint(ckpt.list_run_checkpoints(local_run)[-1][0], with_optimizer=True)
    if loaded is not None:
        model.load_state_dict(loaded.state_dict)  # CPU weights into the CPU model (copied on .to below)
    # model on the device -> optimizer over the device parameters -> resumed state (cast to their device)
    optimizer = place_for_training(
        model, device,
        lambda params: torch.optim.AdamW(params, lr=spec.trainer.lr, weight_decay=spec.trainer.weight_decay),
        loaded.optimizer_state if loaded is not None else None)
    if loaded is not None:
        start_epoch = loaded.meta.epoch + 1
        global_step = loaded.meta.step
        history = list(loaded.meta.history)
        if rank == 0:
            print(f"[mtorl] resumed from epoch {start_epoch - 1} (step {global_step})", flush=True)
    maybe_compile(model, spec.trainer.compile)

    if world > 1:  # already on its device: DDP only wraps it
        model = ray.train.torch.prepare_model(
            model, move_to_device=False,
            parallel_strategy_kwargs={"find_unused_parameters": spec.model.name != "mtorl"},
        )

    run = tracking.open_run(job, rank)  # one W&B run per mtorl run (per trial); the id comes from the job name
    cached = set(config.get("cached_splits") or ())
    train_cache, val_cache = ShardCache(False), ShardCache(False)
    for split, cache in (("train", train_cache), ("val", val_cache)):
        if split in cached:  # a small split: this worker reads its equal part once, for every epoch
            cache.fill(read_windows_part(spec.data, split, spec.window, rank, world, manifest))
    train_shard = None if train_cache.ready else sess.dataset_shard("train")
    val_shard = None if val_cache.ready else sess.dataset_shard("val")
    bs = spec.trainer.batch_size
    epochs = spec.trainer.epochs
    t_run = time.time()
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        set_lr(optimizer, epoch_lr(spec.trainer.lr, spec.trainer.lr_schedule, epoch, epochs))
        wait = [0.0]

        def on_step(i: int, losses: dict[str, float]) -> None:
            nonlocal global_step
            global_step += 1
            faults.maybe_crash_worker(global_step, rank, world)  # off unless a test enables it (mtorl.faults)

        nan_at = faults.int_value("train.nan_at_step")  # -1: off (mtorl.faults)

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
            "perf/node_id": sess.node_id(),
        }
        node_ids = _gather(np.array([metrics["perf/node_id"]], dtype=object))
        metrics["perf/node_ids"] = sorted(set(map(str, node_ids)))
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if rank == 0:
            _announce_epoch(config, epoch, epochs, (time.time() - t_run) / (epoch + 1 - start_epoch) * (epochs - epoch - 1), metrics)
            tracking.log_metrics(run, metrics, global_step)
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
            sess.report(metrics, checkpoint)
    if run is not None:
        run.finish()
