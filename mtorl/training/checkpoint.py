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
from typing import Any, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import mtorl
from mtorl import storage
from mtorl.data.manifest import Manifest
from mtorl.errors import MtorlError, validation_line

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
META_FILE = "meta.json"
BEST_FILE = "best.json"
CHECKSUM_FILE = "checksums.json"  # sha256 of meta.json and every weights file, written after meta.json
META_REQUIRED = ("manifest", "spec", "sha256", "mtorl_version")


class CheckpointError(MtorlError):
    """A checkpoint that can't be used: names the URI and the reason."""


class ModelArgs(BaseModel):
    """What rebuilds the network besides the model spec: the sizes the data fixed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dim: int
    n_channels: int
    binary: bool


class EnsembleMember(BaseModel):
    """One member of an ensemble checkpoint: the checkpoint it was copied from, as it was then."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field(description="URI of the member's own checkpoint.")
    model_sha256: str = Field(description="sha256 of that checkpoint's model.safetensors.")
    seed: int | None = Field(None, description="Its spec.trainer.seed.")
    epoch: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict, description="The member's own (validation) metrics.")


class EnsembleInfo(BaseModel):
    """``meta.json``'s ``ensemble`` block: the weights hold K members (keys ``members.<k>.``), and a
    prediction is the mean of theirs (``mtorl.models.ensemble``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    members: list[EnsembleMember] = Field(min_length=1)
    combine: Literal["mean"] = "mean"
    decision_overrides: dict[str, Any] = Field(
        default_factory=dict, description="The decision fields `mtorl ensemble --decision` set over member 0's "
        "decision: block, with their values (the spec's decision: block holds the result); empty: member 0's block as trained.")


class CheckpointMeta(BaseModel):
    """``meta.json`` of a checkpoint, typed. Unknown keys are kept (``extra="allow"``, as for the
    manifest): a newer mtorl of the same minor version may add informational keys; none is read."""

    model_config = ConfigDict(extra="allow", frozen=True)

    spec: dict[str, Any] = Field(description="The job document the run was started with ({kind, spec}).")
    manifest: Manifest
    sha256: dict[str, str] = Field(description="sha256 of every weights file, by file name.")
    mtorl_version: str
    model_args: ModelArgs | None = None
    manifest_uri: str | None = None
    manifest_sha256: str | None = None
    epoch: int = 0
    step: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)
    history: list[dict[str, Any]] = Field(default_factory=list)
    ensemble: EnsembleInfo | None = Field(None, description="Set for an ensemble checkpoint (`mtorl ensemble`).")

    @classmethod
    def parse(cls, obj: Any, where: str) -> CheckpointMeta:
        """Parsed meta.json checked for its keys and types; one ``CheckpointError`` line naming ``where``."""
        missing = [k for k in META_REQUIRED if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise CheckpointError(f"{where}: lacks {', '.join(missing)}: not an mtorl checkpoint")
        try:
            return cls.model_validate(obj)
        except ValidationError as e:
            raise CheckpointError(f"{where}: {validation_line(e)}") from None

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def metric(self, name: str) -> float | None:
        v = self.metrics.get(name)
        return None if v is None else float(v)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_checkpoint_dir(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: Mapping[str, Any],
) -> Path:
    """Write a checkpoint into a local directory (Ray Train then uploads it). ``meta``: the fields of
    :class:`CheckpointMeta` but ``mtorl_version`` and ``sha256``, which are filled in here."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blobs = {MODEL_FILE: st_save(state)}
    if optimizer is not None:
        buf = io.BytesIO()
        torch.save(_cpu(optimizer.state_dict()), buf)  # device-independent: a GPU run's state loads on CPU
        blobs[OPTIM_FILE] = buf.getvalue()
    for name, data in blobs.items():
        (d / name).write_bytes(data)
    full = CheckpointMeta.model_validate(
        {**meta, "mtorl_version": mtorl.__version__, "sha256": {n: _sha256(b) for n, b in blobs.items()}})
    meta_bytes = json.dumps(full.dump(), indent=1, default=str).encode()
    (d / META_FILE).write_bytes(meta_bytes)
    write_checksums(d, {**blobs, META_FILE: meta_bytes})  # written last
    return d


def _cpu(obj: Any) -> Any:
    """``obj`` (an optimizer state_dict: nested dicts/lists of tensors) with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def write_checksums(directory: Path, blobs: dict[str, bytes]) -> None:
    """``checksums.json``: the sha256 of meta.json and of every weights file. meta.json's own ``sha256``
    covers the weights; this file also covers meta.json, so one edit can't change a label (or a weights
    digest) unnoticed: meta.json and checksums.json would both have to be rewritten."""
    body = {"algorithm": "sha256", "files": {n: _sha256(b) for n, b in sorted(blobs.items())}}
    (Path(directory) / CHECKSUM_FILE).write_text(json.dumps(body, indent=1))


def verify_meta(uri: str, meta_bytes: bytes) -> CheckpointMeta:
    """meta.json's bytes checked against ``checksums.json``, parsed and checked for its keys; one line on failure."""
    try:
        sums = json.loads(storage.read_bytes(storage.join(uri, CHECKSUM_FILE)))
        want = sums["files"][META_FILE]
    except storage.StorageError as e:
        if not storage.exists(storage.join(uri, CHECKSUM_FILE)):
            raise CheckpointError(f"{uri}: no {CHECKSUM_FILE} (written by an older mtorl, or not a complete "
                                  "checkpoint): refusing an unverified meta.json") from None
        raise CheckpointError(f"{uri}/{CHECKSUM_FILE}: cannot be read: {e}") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{uri}/{CHECKSUM_FILE}: not a checksum file (no files.{META_FILE})") from None
    if _sha256(meta_bytes) != want:
        raise CheckpointError(f"{uri}/{META_FILE}: checksum mismatch (file altered or truncated)")
    try:
        meta = json.loads(meta_bytes)
    except ValueError as e:
        raise CheckpointError(f"{uri}/{META_FILE}: not valid JSON ({e})") from None
    parsed = CheckpointMeta.parse(meta, f"{uri}/{META_FILE}")
    for name, digest in parsed.sha256.items():
        if sums["files"].get(name) != digest:
            raise CheckpointError(f"{uri}/{META_FILE}: sha256 of {name} disagrees with {CHECKSUM_FILE} (file altered)")
    return parsed


def check_weights(uri: str, state: dict[str, torch.Tensor]) -> None:
    """Every tensor finite: a NaN/inf weight is a corrupt checkpoint (one line naming the tensor)."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{uri}/{MODEL_FILE}: tensor {name!r} holds NaN or infinite values")


def load_optimizer_state(uri: str, data: bytes) -> dict[str, Any]:
    """``optimizer.pt`` as weights only (no code runs); anything else is refused in one line."""
    try:
        return dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - UnpicklingError & co carry a long advice text: one line instead
        raise CheckpointError(f"{uri}/{OPTIM_FILE}: refused: not plain tensor data ({type(e).__name__})") from None


@dataclass
class LoadedCheckpoint:
    uri: str
    state_dict: dict[str, torch.Tensor]
    meta: CheckpointMeta
    optimizer_state: dict[str, Any] | None = None

    @property
    def manifest(self) -> Manifest:
        return self.meta.manifest

    @property
    def spec(self) -> dict[str, Any]:
        return self.meta.spec


def resolve_checkpoint_uri(uri: str) -> str:
    """A checkpoint dir stays as is; a run dir (with best.json) resolves to its best checkpoint."""
    uri = uri.rstrip("/")
    if storage.exists(storage.join(uri, META_FILE)):
        return uri
    best = storage.join(uri, BEST_FILE)
    if storage.exists(best):
        try:
            target = storage.read_json(best)["checkpoint"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{best}: no 'checkpoint' key: not a run's best.json") from None
        if not isinstance(target, str) or not target:
            raise CheckpointError(f"{best}: 'checkpoint' is not a URI")
        return target.rstrip("/")
    return _recheck_missing(uri)


def _recheck_missing(uri: str) -> str:
    """Neither meta.json nor best.json: during an outage (a restarting SeaweedFS answers 404 before its
    filer is ready) that is not proof. Where storage calls wait out outages (training), look again for
    that window before calling it "not a checkpoint"."""
    import time

    from mtorl.storage.uri import retry_window_s

    deadline, delay = time.monotonic() + retry_window_s(), 1.0
    while time.monotonic() + delay <= deadline:
        time.sleep(delay)
        delay = min(delay * 2, 10.0)
        if storage.exists(storage.join(uri, META_FILE)):
            return uri
        if storage.exists(storage.join(uri, BEST_FILE)):
            return resolve_checkpoint_uri(uri)
    raise CheckpointError(f"{uri}: not a checkpoint (no {META_FILE}) and not a run directory (no {BEST_FILE})")


def _compatible(version: str) -> bool:
    return version.split(".")[:2] == mtorl.__version__.split(".")[:2]


def load_checkpoint(uri: str, with_optimizer: bool = False) -> LoadedCheckpoint:
    """Load weights only, after checking each file's sha256 and the package version."""
    uri = resolve_checkpoint_uri(uri)
    try:
        meta_bytes = storage.read_bytes(storage.join(uri, META_FILE))
    except storage.StorageError as e:
        raise CheckpointError(f"{uri}: unreadable {META_FILE}: {e}") from None
    meta = verify_meta(uri, meta_bytes)
    version = meta.mtorl_version
    if not _compatible(version):
        raise CheckpointError(f"{uri}: written by mtorl {version}, this is {mtorl.__version__} (incompatible)")
    names = [MODEL_FILE] + ([OPTIM_FILE] if with_optimizer and OPTIM_FILE in meta.sha256 else [])
    blobs: dict[str, bytes] = {}
    for name in names:
        data = storage.read_bytes(storage.join(uri, name))
        want = meta.sha256.get(name)
        if want is None or _sha256(data) != want:
            raise CheckpointError(f"{uri}/{name}: checksum mismatch (file altered or truncated)")
        blobs[name] = data
    optim = None
    if OPTIM_FILE in blobs:
        optim = load_optimizer_state(uri, blobs[OPTIM_FILE])
    try:
        state = st_load(blobs[MODEL_FILE])
    except Exception as e:  # noqa: BLE001 - safetensors' own errors: one line
        raise CheckpointError(f"{uri}/{MODEL_FILE}: not a safetensors file ({e})") from None
    check_weights(uri, state)
    return LoadedCheckpoint(uri=uri, state_dict=state, meta=meta, optimizer_state=optim)


def load_local_dir(directory: str | Path, with_optimizer: bool = True) -> LoadedCheckpoint:
    return load_checkpoint(str(directory), with_optimizer=with_optimizer)


# ------------------------------------------------------------------ in-process runs (trainer.workers = 0)
# Ray Train's local mode keeps checkpoints in memory only, so the worker persists them itself under
# the run URI, with the same layout, ranking and pruning as Ray Train's checkpoint manager.

LOCAL_PREFIX = "checkpoint_epoch_"


def list_run_checkpoints(run_uri: str) -> list[tuple[str, CheckpointMeta]]:
    """(checkpoint URI, meta) of the run's in-process checkpoints, oldest first (meta.json read as is:
    :func:`load_checkpoint` verifies the one that is loaded)."""
    if not storage.exists(run_uri):
        return []
    out = []
    for f in storage.list_files(run_uri):
        parent, name = f.rsplit("/", 1)
        if name == META_FILE and parent.rsplit("/", 1)[-1].startswith(LOCAL_PREFIX):
            out.append((parent, CheckpointMeta.parse(json.loads(storage.read_bytes(f)), f)))
    return sorted(out, key=lambda x: x[1].epoch)


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


def _score(meta: CheckpointMeta, metric: str, mode: str) -> float:
    v = meta.metric(metric)
    if v is None:
        return float("inf")
    return v if mode == "min" else -v


def best_run_checkpoint(run_uri: str, metric: str, mode: str) -> tuple[str, CheckpointMeta] | None:
    cks = list_run_checkpoints(run_uri)
    return min(cks, key=lambda x: _score(x[1], metric, mode)) if cks else None


# ------------------------------------------------------------------ bookkeeping on resume (Ray Train runs)

RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def unregistered_checkpoints(run_uri: str) -> list[str]:
    """Checkpoint folders under a Ray Train run that its checkpoint manager snapshot does not list: a
    rank-0 kill just after an upload leaves one, never ranked or pruned. [] when there is no snapshot."""
    snap_uri = storage.join(run_uri, RAY_SNAPSHOT_FILE)
    if not storage.exists(snap_uri):
        return []
    try:
        snap = json.loads(storage.read_bytes(snap_uri))
        states = [*snap.get("checkpoint_results", []), *snap.get("pending_training_results", []),
                  snap.get("latest_checkpoint_result") or {}]
        registered = {s["checkpoint_dir_name"] for s in states if isinstance(s, dict) and s.get("checkpoint_dir_name")}
    except (ValueError, TypeError, AttributeError):
        return []  # a snapshot we can't read: leave everything to Ray
    base = run_uri.rstrip("/")
    dirs = {f[len(base) + 1:].split("/", 1)[0] for f in storage.list_files(run_uri) if "/" in f[len(base) + 1:]}
    return sorted(storage.join(run_uri, d) for d in dirs if d.startswith("checkpoint_") and d not in registered)


def remove_unregistered_checkpoints(run_uri: str) -> list[str]:
    """Delete what :func:`unregistered_checkpoints` finds (call before a resume, with no other driver on
    the run); returns their URIs."""
    found = unregistered_checkpoints(run_uri)
    for uri in found:
        storage.delete_prefix(uri)
    return found
