"""The prepared-dataset contract: journey Parquet schema, ``manifest.json`` (commit marker + pointer)."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any

import pyarrow as pa

from mtorl.data import _io
from mtorl.data.errors import DataError

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
    return _io.join(dataset_uri, MANIFEST_FILE)


def _read_manifest_bytes(dataset_uri: str) -> bytes:
    uri = manifest_uri(dataset_uri)
    if not _io.exists(uri):
        raise DataError(f"no manifest.json at {dataset_uri}: not a prepared dataset, or prepare did not finish")
    try:
        return _io.read_bytes(uri)
    except _io.StorageError as e:
        raise DataError(f"can't read {uri}: {e}") from None


def load_manifest(dataset_uri: str) -> dict[str, Any]:
    """The manifest of a prepared dataset; ``DataError`` if there is none (or it is not valid JSON)."""
    data = _read_manifest_bytes(dataset_uri)
    try:
        m = json.loads(data)
    except ValueError as e:
        raise DataError(f"{manifest_uri(dataset_uri)}: not valid JSON ({e})") from None
    check_manifest(m, manifest_uri(dataset_uri))
    return m


def manifest_sha256(dataset_uri: str) -> str:
    """sha256 of the manifest bytes: identifies exactly which version a checkpoint was trained on."""
    return hashlib.sha256(_read_manifest_bytes(dataset_uri)).hexdigest()


_REQUIRED = ("schema_version", "version", "channels", "step_features", "user_features", "normalization",
             "reward_norm", "penalty", "splits")


def check_manifest(m: Any, where: str) -> None:
    if not isinstance(m, dict):
        raise DataError(f"{where}: a manifest must be a JSON object")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise DataError(f"{where}: manifest lacks {', '.join(missing)}")
    if int(m["schema_version"]) > SCHEMA_VERSION:
        raise DataError(f"{where}: manifest schema_version {m['schema_version']} is newer than this mtorl ({SCHEMA_VERSION})")


def resolve_manifest_from(uri: str) -> dict[str, Any]:
    """A manifest from a dataset URI (``manifest.json``) or a checkpoint directory (``meta.json['manifest']``)."""
    if _io.exists(manifest_uri(uri)):
        return load_manifest(uri)
    meta_uri = _io.join(uri, "meta.json")
    if _io.exists(meta_uri):
        meta = _io.read_json(meta_uri)
        if not isinstance(meta, dict) or "manifest" not in meta:
            raise DataError(f"{meta_uri}: no 'manifest' key: not an mtorl checkpoint")
        check_manifest(meta["manifest"], meta_uri)
        return meta["manifest"]
    raise DataError(f"manifest_from {uri}: neither a prepared dataset (manifest.json) nor a checkpoint (meta.json)")


def shard_uris(dataset_uri: str, manifest: dict[str, Any], split: str) -> list[str]:
    """URIs of the shards of one split listed in the manifest (never a directory listing)."""
    if split not in manifest["splits"]:
        raise DataError(f"{dataset_uri}: no split {split!r} (have {', '.join(manifest['splits'])})")
    return [_io.join(dataset_uri, s["path"]) for s in manifest["splits"][split]["shards"]]
