"""Ray Data over a prepared dataset: journeys -> fixed-length windows, streamed (no groupby, no shuffle).

The only module of ``mtorl.data`` that imports Ray. Reads only the shards the manifest lists, so a
concurrent re-prepare (a new version directory) is never mixed in.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray

from mtorl.data import _io
from mtorl.data.manifest import JOURNEY_SCHEMA, load_manifest, manifest_sha256, shard_uris
from mtorl.data.windows import Journey, journeys_from_table, make_windows
from mtorl.spec.models import WindowSpec

__all__ = ["iter_journeys", "load_manifest", "manifest_sha256", "read_split", "window_dataset"]

JOURNEYS_PER_BATCH = 256


def read_split(dataset_uri: str, split: str, manifest: dict[str, Any] | None = None, **read_kwargs: Any) -> ray.data.Dataset:
    """One split's journeys (one row per journey, the prepared schema) as a Ray Dataset."""
    m = manifest if manifest is not None else load_manifest(dataset_uri)
    uris = shard_uris(dataset_uri, m, split)
    if not uris:
        return ray.data.from_arrow(JOURNEY_SCHEMA.empty_table())
    fs, _ = _io.resolve(dataset_uri)
    paths = [_io.resolve(u)[1] for u in uris]
    ctx = ray.data.DataContext.get_current()
    prev = ctx.use_datasource_v2
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        # The shard list comes from the manifest, so nothing needs listing. Ray Data's V2 Parquet reader
        # starts a pool of footer-reading actors on every read, which cost ~2.5 s per pass (per epoch)
        # on 2 cores against ~0.2 s for the V1 reader (BENCHMARKS.md). The flag is only read here.
        ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(paths, filesystem=fs, **read_kwargs)
    finally:
        ctx.use_datasource_v2 = prev


def window_dataset(dataset_uri: str, split: str, window: WindowSpec, manifest: dict[str, Any] | None = None,
                   **read_kwargs: Any) -> ray.data.Dataset:
    """Windows of one split: one row per window, columns = the window table (numpy tensor columns, so
    ``iter_batches(batch_format="numpy")`` yields ``state`` (B, L, D), ``channel`` (B, L), ...)."""
    m = manifest if manifest is not None else load_manifest(dataset_uri)
    L, S = int(window.length), int(window.stride or window.length)
    D = len(m["step_features"]) + len(m["user_features"])

    def to_windows(batch: pa.Table) -> dict[str, np.ndarray]:
        return make_windows(journeys_from_table(batch, m), L, S, state_dim=D)

    return read_split(dataset_uri, split, m, **read_kwargs).map_batches(
        to_windows, batch_format="pyarrow", batch_size=JOURNEYS_PER_BATCH)


def iter_journeys(dataset_uri: str, split: str, manifest: dict[str, Any] | None = None) -> Iterator[Journey]:
    """Full journeys of one split, streamed (evaluation)."""
    m = manifest if manifest is not None else load_manifest(dataset_uri)
    for batch in read_split(dataset_uri, split, m).iter_batches(batch_format="pyarrow", batch_size=JOURNEYS_PER_BATCH):
        yield from journeys_from_table(batch, m)
