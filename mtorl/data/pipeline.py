"""Ray Data over a prepared dataset: journeys -> fixed-length windows, streamed (no groupby, no shuffle).

The only module of ``mtorl.data`` that imports Ray. Reads only the shards the manifest lists, so a
concurrent re-prepare (a new version directory) is never mixed in.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from mtorl import storage
from mtorl.data.errors import DataError
from mtorl.data.manifest import JOURNEY_SCHEMA, Manifest, load_manifest, manifest_sha256, parse_shard, read_shard_bytes, shard_uris
from mtorl.data.windows import Journey, journeys_from_table, make_windows
from mtorl.spec.models import WindowSpec

__all__ = ["check_shards", "iter_journeys", "load_manifest", "manifest_sha256", "read_split", "read_windows_part",
           "window_dataset"]

JOURNEYS_PER_BATCH = 256


VERIFY_ENV = "MTORL_VERIFY_SHARDS"  # "0": read shards with Ray's Parquet reader, unchecked


def verify_shards_enabled() -> bool:
    """Each shard's sha256 (from the manifest) is checked when it is read, unless ``MTORL_VERIFY_SHARDS=0``."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def check_shards(dataset_uri: str, split: str, manifest: Manifest) -> tuple[Any, list[str]]:
    """(filesystem, paths) of one split's shards, after one listing call; a missing shard is one line naming it."""
    uris = shard_uris(dataset_uri, manifest, split)
    fs, _ = storage.resolve(dataset_uri)
    paths = [storage.resolve(u)[1] for u in uris]
    missing = [u for u, info in zip(uris, fs.get_file_info(paths)) if info.type == pafs.FileType.NotFound] if uris else []
    if missing:
        raise DataError(f"{missing[0]}: shard listed in the manifest is missing "
                        f"({len(missing)} of the {split} split's {len(uris)} shards missing; re-run prepare)")
    return fs, paths


def read_windows_part(dataset_uri: str, split: str, window: WindowSpec, rank: int = 0, world: int = 1,
                      manifest: Manifest | None = None) -> dict[str, np.ndarray]:
    """One worker's equal part of a small split's windows, read in this process without Ray Data.

    The shards are read one at a time in manifest order (each checked against its sha256 unless
    ``MTORL_VERIFY_SHARDS=0``; a missing or corrupt shard is one line naming it) and cut into the same
    windows as :func:`window_dataset`. Part ``rank`` of ``world`` keeps windows ``rank, rank + world, ...``
    of that order, cut to ``total // world`` windows, so every part has the same size (every rank runs the
    same number of steps) and the parts are disjoint. Memory: this part plus one shard's windows.
    """
    if not 0 <= rank < max(world, 1):
        raise ValueError(f"rank {rank} outside world of {world}")
    world = max(world, 1)
    m = manifest if manifest is not None else load_manifest(dataset_uri)
    L, S = int(window.length), int(window.stride or window.length)
    uris = shard_uris(dataset_uri, m, split)
    shas = [sh.sha256 for sh in m.splits[split].shards] if verify_shards_enabled() else [""] * len(uris)
    fs, _ = storage.resolve(dataset_uri)
    kept: list[dict[str, np.ndarray]] = []
    seen = 0
    for uri, sha in zip(uris, shas):
        table = parse_shard(uri, read_shard_bytes(fs, storage.resolve(uri)[1], uri), sha)
        w = make_windows(journeys_from_table(table, m), L, S, state_dim=m.state_dim)
        first = (rank - seen) % world  # this part's first window of the shard, in the global order
        seen += len(w["mask"])
        kept.append(w if world == 1 else {k: np.ascontiguousarray(v[first::world]) for k, v in w.items()})
    if not kept:
        return make_windows([], L, S, state_dim=m.state_dim)
    n = seen // world
    return {k: np.concatenate([p[k] for p in kept])[:n] for k in kept[0]}


def read_split(dataset_uri: str, split: str, manifest: Manifest | None = None, **read_kwargs: Any) -> ray.data.Dataset:
    """One split's journeys (one row per journey, the prepared schema) as a Ray Dataset. Every shard's
    bytes are checked against the manifest's sha256 as they are read (see :func:`verify_shards_enabled`)."""
    m = manifest if manifest is not None else load_manifest(dataset_uri)
    uris = shard_uris(dataset_uri, m, split)
    if not uris:
        return ray.data.from_arrow(JOURNEY_SCHEMA.empty_table())
    fs, paths = check_shards(dataset_uri, split, m)
    if verify_shards_enabled():
        shas = [sh.sha256 for sh in m.splits[split].shards]
        return _read_verified(fs, uris, paths, shas, **read_kwargs)
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


def _read_verified(fs: Any, uris: list[str], paths: list[str], shas: list[str], **read_kwargs: Any) -> ray.data.Dataset:
    """One task per shard: read its bytes (waiting out a storage outage), check the sha256, parse the Parquet."""
    items = [{"uri": u, "path": p, "sha256": h} for u, p, h in zip(uris, paths, shas)]

    def load(batch: pa.Table) -> pa.Table:
        tables = []
        for row in batch.to_pylist():
            data = read_shard_bytes(fs, row["path"], row["uri"])
            tables.append(parse_shard(row["uri"], data, row["sha256"]))
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    kw = {k: v for k, v in read_kwargs.items() if k in ("num_cpus", "memory", "concurrency")}
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block per shard
    shuffle = read_kwargs.get("shuffle")
    if shuffle is not None:  # the file order of read_parquet(shuffle=FileShuffleConfig): here the shard order
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(
            seed=getattr(shuffle, "seed", None), reseed_after_execution=getattr(shuffle, "reseed_after_execution", True)))
    return ds.map_batches(load, batch_format="pyarrow", batch_size=1, **kw)


def window_dataset(dataset_uri: str, split: str, window: WindowSpec, manifest: Manifest | None = None,
                   **read_kwargs: Any) -> ray.data.Dataset:
    """Windows of one split: one row per window, columns = the window table (numpy tensor columns, so
    ``iter_batches(batch_format="numpy")`` yields ``state`` (B, L, D), ``channel`` (B, L), ...)."""
    m = manifest if manifest is not None else load_manifest(dataset_uri)
    L, S = int(window.length), int(window.stride or window.length)
    D = m.state_dim

    def to_windows(batch: pa.Table) -> dict[str, np.ndarray]:
        return make_windows(journeys_from_table(batch, m), L, S, state_dim=D)

    return read_split(dataset_uri, split, m, **read_kwargs).map_batches(
        to_windows, batch_format="pyarrow", batch_size=JOURNEYS_PER_BATCH)


def iter_journeys(dataset_uri: str, split: str, manifest: Manifest | None = None) -> Iterator[Journey]:
    """Full journeys of one split, streamed (evaluation)."""
    m = manifest if manifest is not None else load_manifest(dataset_uri)
    for batch in read_split(dataset_uri, split, m).iter_batches(batch_format="pyarrow", batch_size=JOURNEYS_PER_BATCH):
        yield from journeys_from_table(batch, m)
