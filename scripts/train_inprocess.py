"""Train a TrainJob in this process, without Ray (scripts/compare.sh with TRAINER=inprocess):

    python scripts/train_inprocess.py ray_jobs/specs/kuairand-train.yaml --set metadata.name=kuairand-logreg \
        --set spec.model.name=logreg --result kuairand-logreg.train.json

For a machine too loaded for a local Ray cluster to start (its raylet gives up waiting for its agents).
The same loop as `mtorl train` with `trainer.workers: 0`, from the same pieces: the spec, the windows
(`data.windows.make_windows` on the split's journeys), the loss and step (`training.step`), the validation
metrics (`val_metrics`, `decision_val_metrics`), and the checkpoint layout, ranking and `best.json` of an
in-process run (`training.checkpoint`), so `mtorl evaluate` and `mtorl serve` read its runs unchanged.
Epoch order: a new permutation of the train windows per epoch, seeded by trainer.seed + 1000·epoch.
Re-running resumes after the last checkpoint of the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from mtorl import storage
import pyarrow.parquet as pq

from mtorl.data.manifest import Manifest, load_manifest, manifest_sha256, shard_uris
from mtorl.data.windows import Journey, journeys_from_table, make_windows
from mtorl.models import build_model
from mtorl.spec.loader import job_to_dict, load_job
from mtorl.training import checkpoint as ckpt
from mtorl.training.step import decision_val_metrics, epoch_lr, set_lr, train_batches, val_metrics, validate_batches


def read_split(dataset_uri: str, split: str, manifest: Manifest) -> list[Journey]:
    """All journeys of a split, shard by shard (the manifest's shards only)."""
    out: list[Journey] = []
    for uri in shard_uris(dataset_uri, manifest, split):
        fs, path = storage.resolve(uri)
        out.extend(journeys_from_table(pq.read_table(path, filesystem=fs), manifest))
    return out


def batches(w: dict[str, np.ndarray], size: int, order: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    idx = np.arange(len(w["mask"])) if order is None else order
    for a in range(0, len(idx), size):
        j = idx[a:a + size]
        yield {k: v[j] for k, v in w.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    ap.add_argument("--result", metavar="FILE")
    args = ap.parse_args(argv)
    job = load_job(args.spec, args.overrides)
    spec, t = job.spec, job.spec.trainer
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    t0 = time.time()
    manifest = load_manifest(spec.data)
    binary = manifest.gain_binary if spec.objective.reward_loss == "auto" else spec.objective.reward_loss == "bce"
    D, C = manifest.state_dim, manifest.n_channels
    L, S = spec.window.length, spec.window.stride
    train = make_windows(read_split(spec.data, "train", manifest), L, S, state_dim=D)
    val = make_windows(read_split(spec.data, "val", manifest), L, S, state_dim=D)
    run = storage.join(spec.output, job.metadata.name)
    print(f"training {spec.model.name} on {spec.data} in this process -> {run} "
          f"({len(train['mask'])} train / {len(val['mask'])} val windows)", flush=True)

    torch.manual_seed(t.seed)
    model = build_model(spec.model, state_dim=D, n_channels=C, binary=binary)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    start, step, history = 0, 0, []
    done = ckpt.list_run_checkpoints(run)
    if done:
        loaded = ckpt.load_checkpoint(done[-1][0], with_optimizer=True)
        model.load_state_dict(loaded.state_dict)
        if loaded.optimizer_state is not None:
            optimizer.load_state_dict(loaded.optimizer_state)
        start, step, history = loaded.meta.epoch + 1, loaded.meta.step, list(loaded.meta.history)
        print(f"resumed from epoch {start - 1} (step {step})", flush=True)
    device = torch.device("cpu")
    sha = manifest_sha256(spec.data)
    for epoch in range(start, t.epochs):
        te = time.time()
        set_lr(optimizer, epoch_lr(t.lr, t.lr_schedule, epoch, t.epochs))
        order = np.random.default_rng(t.seed + 1000 * epoch).permutation(len(train["mask"]))
        stats = train_batches(model, optimizer, batches(train, t.batch_size, order), spec.objective, binary, device,
                              t.grad_clip, t.max_steps_per_epoch)
        step += -(-min(len(order), (t.max_steps_per_epoch or 10**12) * t.batch_size) // t.batch_size)
        train_s = time.time() - te
        v = validate_batches(model, batches(val, t.batch_size * 2), spec.objective, binary, device)
        vm = val_metrics(v.channel, v.action_probs, v.reward, v.reward_hat, binary)
        vm.update(decision_val_metrics(v.channel, v.action_probs, v.reward, v.reward_pred, v.cost, v.propensity, binary, spec.decision))
        metrics: dict[str, Any] = {**stats.means("train"), **v.stats.means("val"), **{f"val/{k}": x for k, x in vm.items()},
                                   "epoch": epoch, "step": step, "train/samples_per_s": stats.windows / max(train_s, 1e-9)}
        history.append({k: x for k, x in metrics.items() if isinstance(x, (int, float))})
        print(f"[mtorl] epoch {epoch + 1}/{t.epochs} loss {metrics.get('train/loss', float('nan')):.4f} "
              f"val/loss {metrics.get('val/loss', float('nan')):.4f} val/reward_auc {metrics.get('val/reward_auc', float('nan')):.4f} "
              f"{t.metric} {metrics.get(t.metric, float('nan')):.4f} ({time.time() - te:.0f} s)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt.write_checkpoint_dir(tmp, model, optimizer, {
                "spec": job_to_dict(job), "model_args": {"state_dim": D, "n_channels": C, "binary": binary},
                "manifest": manifest, "manifest_uri": spec.data, "manifest_sha256": sha,
                "epoch": epoch, "step": step, "metrics": metrics, "history": history,
            })
            ckpt.persist_local(tmp, run, epoch, t.keep_top_k, t.metric, t.mode)
    found = ckpt.best_run_checkpoint(run, t.metric, t.mode)
    if found is None:
        print(f"error: {run}: training produced no checkpoint", file=sys.stderr)
        return 1
    best_uri, meta = found
    storage.write_json(storage.join(run, ckpt.BEST_FILE), {"checkpoint": best_uri, "metric": t.metric,
                                                          "value": meta.metrics.get(t.metric)})
    out = {"kind": "TrainJob", "name": job.metadata.name, "run_uri": run, "best_checkpoint": best_uri,
           "best_metrics": json.loads(json.dumps(meta.metrics, default=str)), "wall_s": round(time.time() - t0, 2),
           "trainer": "inprocess"}
    print(f"best checkpoint ({t.metric}={meta.metrics.get(t.metric)}): {best_uri}", flush=True)
    if args.result:
        Path(args.result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
