"""The prepared-dataset contract: journey Parquet schema, ``manifest.json`` (commit marker + pointer)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtorl import storage
from mtorl.data.errors import DataError
from mtorl.errors import validation_line

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val", "test")

# One Parquet row per user journey (docs/ARCHITECTURE.md, "Prepared dataset").
JOURNEY_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("length", pa.int32()),
    ("channel", pa.list_(pa.int16())),
    ("gain", pa.list_(pa.float32())),
    ("cost", pa.list_(pa.float32())),
    ("propensity", pa.list_(pa.float32())),
    ("features", pa.list_(pa.float32())),       # T x len(step_features), row-major, raw
    ("user_features", pa.list_(pa.float32())),  # len(user_features), raw
])


def new_version() -> str:
    """``v20261128T110102Z-1a2b3c``: sortable by time, unique per run."""
    return time.strftime("v%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def manifest_uri(dataset_uri: str) -> str:
    return storage.join(dataset_uri, MANIFEST_FILE)


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalization(_Part):
    """Per-feature mean/std of the state (step features, then user features), fitted on train."""

    mean: list[float]
    std: list[float]


class RewardNorm(_Part):
    """Range of the raw reward ``g - s*w`` on train: rewards are min-max scaled into [0, 1] with it."""

    min: float
    max: float


class Shard(_Part):
    path: str = Field(description="Relative to the dataset URI (or absolute).")
    users: int
    steps: int
    sha256: str = ""


class Split(_Part):
    users: int
    steps: int
    shards: list[Shard] = Field(default_factory=list)


class Quarantine(_Part):
    rows: int = 0
    files: list[str] = Field(default_factory=list)


class Manifest(BaseModel):
    """``manifest.json`` of a prepared dataset (docs/ARCHITECTURE.md, "Prepared dataset"), typed.

    Unknown keys are kept, not refused (``extra="allow"``): a manifest of the same ``schema_version``
    written by a newer mtorl may carry informational keys, and a checkpoint's copy should stay whole.
    No mtorl code reads them; a breaking change bumps ``schema_version``, which is refused.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_version: int
    version: str
    channels: list[str]
    step_features: list[str]
    user_features: list[str]
    normalization: Normalization
    reward_norm: RewardNorm
    penalty: float
    splits: dict[str, Split]
    source: str | None = None
    input: str | None = None
    created_at: str | None = None
    mtorl_version: str | None = None
    categorical: dict[str, list[str]] = Field(default_factory=dict)
    gain: str | None = None
    gain_binary: bool = True
    cost: str | None = None
    has_propensity: bool = False
    split_salt: str | None = None
    rows_read: int = 0
    rows_written: int = 0
    rows_dropped: dict[str, int] = Field(default_factory=dict)
    users_read: int = 0
    users_dropped: int = 0
    quarantine: Quarantine = Field(default_factory=Quarantine)
    manifest_from: str | None = None
    journeys_format: dict[str, Any] | None = Field(None, description="The JourneysFormat of a journeys source.")
    channel_cost_mean: list[float | None] | dict[str, float | None] | None = Field(
        None, description="Mean cost per channel (a list in channel order, or a map by name), if recorded.")

    @property
    def state_dim(self) -> int:
        """D: state features per step (step features, then user features)."""
        return len(self.step_features) + len(self.user_features)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def onehot_features(self) -> set[str]:
        """Step features that are one-hot columns ``col=value`` of a categorical vocabulary."""
        return {f"{col}={v}" for col, vocab in self.categorical.items() for v in vocab}

    @classmethod
    def parse(cls, obj: Any, where: str) -> Manifest:
        """``obj`` (parsed JSON) checked as a manifest; one ``DataError`` line naming ``where`` and the field."""
        if isinstance(obj, Manifest):
            return obj
        if not isinstance(obj, dict):
            raise DataError(f"{where}: a manifest must be a JSON object")
        missing = [k for k in _REQUIRED if k not in obj]
        if missing:
            raise DataError(f"{where}: manifest lacks {', '.join(missing)}")
        try:
            newer = int(obj["schema_version"]) > SCHEMA_VERSION
        except (TypeError, ValueError):
            newer = False  # reported by validation below
        if newer:
            raise DataError(f"{where}: manifest schema_version {obj['schema_version']} is newer than this mtorl "
                            f"({SCHEMA_VERSION})")
        try:
            return cls.model_validate(obj)
        except ValidationError as e:
            raise DataError(f"{where}: manifest {validation_line(e)}") from None

    @classmethod
    def load(cls, dataset_uri: str) -> Manifest:
        """The manifest of a prepared dataset; ``DataError`` if there is none (or it is not valid)."""
        data = _read_manifest_bytes(dataset_uri)
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise DataError(f"{manifest_uri(dataset_uri)}: not valid JSON ({e})") from None
        return cls.parse(obj, manifest_uri(dataset_uri))

    def dump(self) -> dict[str, Any]:
        """The JSON object written as ``manifest.json`` (and copied into checkpoints)."""
        return self.model_dump(mode="json")

    def shard_uris(self, dataset_uri: str, split: str) -> list[str]:
        """URIs of the shards of one split listed in the manifest (never a directory listing)."""
        return [s.path if "://" in s.path or s.path.startswith("/") else storage.join(dataset_uri, s.path)
                for s in self.split(dataset_uri, split).shards]

    def split(self, dataset_uri: str, split: str) -> Split:
        if split not in self.splits:
            raise DataError(f"{dataset_uri}: no split {split!r} (have {', '.join(self.splits)})")
        return self.splits[split]


_REQUIRED = ("schema_version", "version", "channels", "step_features", "user_features", "normalization",
             "reward_norm", "penalty", "splits")


def _read_manifest_bytes(dataset_uri: str) -> bytes:
    uri = manifest_uri(dataset_uri)
    if not storage.exists(uri):
        raise DataError(f"no manifest.json at {dataset_uri}: not a prepared dataset, or prepare did not finish")
    try:
        return storage.read_bytes(uri)
    except storage.StorageError as e:
        raise DataError(f"can't read {uri}: {e}") from None


def load_manifest(dataset_uri: str) -> Manifest:
    """The manifest of a prepared dataset (:meth:`Manifest.load`)."""
    return Manifest.load(dataset_uri)


def manifest_sha256(dataset_uri: str) -> str:
    """sha256 of the manifest bytes: identifies exactly which version a checkpoint was trained on."""
    return hashlib.sha256(_read_manifest_bytes(dataset_uri)).hexdigest()


def resolve_manifest_from(uri: str) -> Manifest:
    """A manifest from a dataset URI (``manifest.json``) or a checkpoint directory (``meta.json['manifest']``)."""
    if storage.exists(manifest_uri(uri)):
        return load_manifest(uri)
    meta_uri = storage.join(uri, "meta.json")
    if storage.exists(meta_uri):
        meta = storage.read_json(meta_uri)
        if not isinstance(meta, dict) or "manifest" not in meta:
            raise DataError(f"{meta_uri}: no 'manifest' key: not an mtorl checkpoint")
        return Manifest.parse(meta["manifest"], meta_uri)
    raise DataError(f"manifest_from {uri}: neither a prepared dataset (manifest.json) nor a checkpoint (meta.json)")


def shard_uris(dataset_uri: str, manifest: Manifest, split: str) -> list[str]:
    """URIs of the shards of one split listed in the manifest (never a directory listing)."""
    return manifest.shard_uris(dataset_uri, split)


# ------------------------------------------------------------------ reading shards: checked, patient

RETRY_ENV = "MTORL_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 90.0


def storage_retry_s() -> float:
    """How long object-store reads wait out an outage (``MTORL_STORAGE_RETRY_S``, default 90 s; 0 = no retry)."""
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)))
    except ValueError:
        return DEFAULT_RETRY_S


def read_shard_bytes(fs: Any, path: str, uri: str, window_s: float | None = None) -> bytes:
    """A shard's bytes. A missing shard is one line naming it; a store that doesn't answer is retried with
    backoff (1, 2, 4 ... 10 s) for ``window_s`` (default :func:`storage_retry_s`), then one line naming it."""
    window = storage_retry_s() if window_s is None else window_s
    deadline, delay = time.monotonic() + window, 1.0
    while True:
        try:
            with fs.open_input_stream(path) as f:
                return bytes(f.readall())
        except FileNotFoundError:
            raise DataError(f"{uri}: shard listed in the manifest is missing") from None
        except OSError as e:  # pyarrow: connection refused, timeouts, 5xx
            reason = " ".join(str(e).split())[:300]
            if "NoSuchKey" in reason or "Path does not exist" in reason:
                raise DataError(f"{uri}: shard listed in the manifest is missing") from None
            if time.monotonic() + delay > deadline:
                raise DataError(f"{uri}: object store unreachable for {window:.0f} s: {reason}") from None
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def parse_shard(uri: str, data: bytes, sha256: str) -> pa.Table:
    """Check ``data`` against the manifest's sha256 and parse it; a mismatch or bad Parquet is one line."""
    import pyarrow.parquet as pq

    if sha256:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise DataError(f"{uri}: sha256 mismatch (shard altered or truncated: {len(data)} bytes, "
                            f"sha256 {got[:12]}..., manifest {sha256[:12]}...)")
    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{uri}: not a readable Parquet shard ({' '.join(str(e).split())[:200]})") from None
