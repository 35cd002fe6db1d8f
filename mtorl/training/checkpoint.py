"""Checkpoints: weights + optimizer state + full spec + data manifest + version, loadable alone.

Layout of one checkpoint directory (local or in object storage)::

    model.safetensors   weights (safetensors: no code is ever unpickled)
    optimizer.pt        optimizer state_dict, read back with torch.load(weights_only=True)
    meta.json           spec, model_args, manifest (full copy), manifest_uri, manifest_sha256,
                        mtorl_version, epoch, step, metrics, sha256{file: digest}

A run directory holds Ray Train's ``checkpoint_*`` directories and ``best.json``
(``{"checkpoint": URI, "metric": NAME, "value": V}``) so ``--checkpoint RUN_URI`` means its best.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import mtorl
from mtorl import storage
from mtorl.errors import MtorlError

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
META_FILE = "meta.json"
BEST_FILE = "best.json"


class CheckpointError(MtorlError):
    """A checkpoint that can't be used: names the URI and the reason."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_checkpoint_dir(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
) -> Path:
    """Write a checkpoint into a local directory (Ray Train then uploads it)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blobs = {MODEL_FILE: st_save(state)}
    if optimizer is not None:
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        blobs[OPTIM_FILE] = buf.getvalue()
    for name, data in blobs.items():
        (d / name).write_bytes(data)
    meta = dict(meta, mtorl_version=mtorl.__version__, sha256={n: _sha256(b) for n, b in blobs.items()})
    (d / META_FILE).write_text(json.dumps(meta, indent=1, default=str))  # written last
    return d


@dataclass
class LoadedCheckpoint:
    uri: str
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        return self.meta["manifest"]

    @property
    def spec(self) -> dict[str, Any]:
        return self.meta["spec"]


def resolve_checkpoint_uri(uri: str) -> str:
    """A checkpoint dir stays as is; a run dir (with best.json) resolves to its best checkpoint."""
    uri = uri.rstrip("/")
    if storage.exists(storage.join(uri, META_FILE)):
        return uri
    best = storage.join(uri, BEST_FILE)
    if storage.exists(best):
        return str(storage.read_json(best)["checkpoint"]).rstrip("/")
    raise CheckpointError(f"{uri}: not a checkpoint (no {META_FILE}) and not a run directory (no {BEST_FILE})")


def _compatible(version: str) -> bool:
    return version.split(".")[:2] == mtorl.__version__.split(".")[:2]


def load_checkpoint(uri: str, with_optimizer: bool = False) -> LoadedCheckpoint:
    """Load weights only, after checking each file's sha256 and the package version."""
    uri = resolve_checkpoint_uri(uri)
    try:
        meta = json.loads(storage.read_bytes(storage.join(uri, META_FILE)))
    except (ValueError, storage.StorageError) as e:
        raise CheckpointError(f"{uri}: unreadable {META_FILE}: {e}") from None
    version = str(meta.get("mtorl_version", "?"))
    if not _compatible(version):
        raise CheckpointError(f"{uri}: written by mtorl {version}, this is {mtorl.__version__} (incompatible)")
    names = [MODEL_FILE] + ([OPTIM_FILE] if with_optimizer and OPTIM_FILE in meta.get("sha256", {}) else [])
    blobs: dict[str, bytes] = {}
    for name in names:
        data = storage.read_bytes(storage.join(uri, name))
        want = meta.get("sha256", {}).get(name)
        if want is None or _sha256(data) != want:
            raise CheckpointError(f"{uri}/{name}: checksum mismatch (file altered or truncated)")
        blobs[name] = data
    optim = None
    if OPTIM_FILE in blobs:
        optim = torch.load(io.BytesIO(blobs[OPTIM_FILE]), map_location="cpu", weights_only=True)
    return LoadedCheckpoint(uri=uri, state_dict=st_load(blobs[MODEL_FILE]), meta=meta, optimizer_state=optim)


def load_local_dir(directory: str | Path, with_optimizer: bool = True) -> LoadedCheckpoint:
    return load_checkpoint(str(directory), with_optimizer=with_optimizer)


# ------------------------------------------------------------------ in-process runs (trainer.workers = 0)
# Ray Train's local mode keeps checkpoints in memory only, so the worker persists them itself under
# the run URI, with the same layout, ranking and pruning as Ray Train's checkpoint manager.

LOCAL_PREFIX = "checkpoint_epoch_"


def list_run_checkpoints(run_uri: str) -> list[tuple[str, dict[str, Any]]]:
    """(checkpoint URI, meta) of the run's in-process checkpoints, oldest first."""
    if not storage.exists(run_uri):
        return []
    out = []
    for f in storage.list_files(run_uri):
        parent, name = f.rsplit("/", 1)
        if name == META_FILE and parent.rsplit("/", 1)[-1].startswith(LOCAL_PREFIX):
            out.append((parent, json.loads(storage.read_bytes(f))))
    return sorted(out, key=lambda x: int(x[1]["epoch"]))


def persist_local(tmp_dir: str | Path, run_uri: str, epoch: int, keep: int, metric: str, mode: str) -> str:
    """Upload a checkpoint dir into the run and prune to the ``keep`` best (the latest is always kept)."""
    uri = storage.join(run_uri, f"{LOCAL_PREFIX}{epoch:06d}")
    storage.upload_dir(tmp_dir, uri)
    cks = list_run_checkpoints(run_uri)
    latest = cks[-1][0] if cks else uri
    ranked = sorted(cks, key=lambda x: _score(x[1], metric, mode))
    for ck_uri, _ in ranked[keep:]:
        if ck_uri != latest:
            storage.delete_prefix(ck_uri)
    return uri


def _score(meta: dict[str, Any], metric: str, mode: str) -> float:
    v = meta.get("metrics", {}).get(metric)
    if v is None:
        return float("inf")
    return float(v) if mode == "min" else -float(v)


def best_run_checkpoint(run_uri: str, metric: str, mode: str) -> tuple[str, dict[str, Any]] | None:
    cks = list_run_checkpoints(run_uri)
    return min(cks, key=lambda x: _score(x[1], metric, mode)) if cks else None
