"""Write simulated journeys as ``journeys`` Parquet shards + a ``simulation.json`` sidecar.

Memory stays constant in the number of users: users are generated in blocks, each block is
played to the end of its journeys (vectorised over users), and rows are streamed into shards of
at most ``spec.shard_steps`` rows. A user's rows are never split across shards and are in time
order. ``simulation.json`` is written last (it is the commit marker) and holds the column mapping
to pass to ``prepare --source journeys``.

Also here: ``dataset_stats`` and ``calibrate`` (fit the simulator to a prepared dataset), and
``read_journeys`` (iterate the written journeys per user, with the ground truth).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mtorl.data.shards import UserPacker
from mtorl.sim.model import STEP_FEATURES, Simulator
from mtorl.spec.models import SimulateSpec

if TYPE_CHECKING:
    from mtorl.data.manifest import Manifest

SIDECAR = "simulation.json"
BLOCK_USERS = 10_000


def user_feature_names(n: int) -> list[str]:
    return [f"f{i}" for i in range(n)]


def truth_columns(n_channels: int) -> list[str]:
    return [f"true_p{i}" for i in range(n_channels)]


def journeys_mapping(spec: SimulateSpec) -> dict[str, Any]:
    """Column mapping of the written shards (the fields of ``JourneysFormat``)."""
    return {"user_col": "user_id", "time_col": "timestamp", "channel_col": "channel", "gain_col": "gain",
            "cost_col": "cost", "propensity_col": "propensity", "numeric_features": list(STEP_FEATURES),
            "categorical_features": [], "user_features": user_feature_names(spec.n_features)}


def journeys_format(uri: str) -> dict[str, Any]:
    """The ``PrepareSpec.journeys`` mapping of a simulation output (read from its ``simulation.json``)."""
    from mtorl import storage

    return dict(storage.read_json(storage.join(uri, SIDECAR))["journeys"])


class _ShardWriter:
    """Buffers user-contiguous tables and writes shards of at most ``max_rows`` rows, never splitting a user."""

    def __init__(self, fs: pafs.FileSystem, root: str, max_rows: int) -> None:
        self.fs, self.root = fs, root
        self.packer = UserPacker(max_rows, self._write)
        self.shards: list[dict[str, Any]] = []

    def add(self, table: pa.Table, lengths: np.ndarray) -> None:
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (U + 1,) first row of each user
        self.packer.add(lengths, lambda u, k: table.slice(int(starts[u]), int(starts[u + k] - starts[u])))

    def flush(self) -> None:
        self.packer.flush()

    def _write(self, table: pa.Table, users: int, rows: int) -> None:
        name = f"part-{len(self.shards):05d}.parquet"
        # dictionary-encode only the columns that repeat (per user / per channel): much faster to write
        repeat = [c for c in table.column_names if c in ("user_id", "channel", "cost") or c.startswith("f")]
        pq.write_table(table, f"{self.root}/{name}", filesystem=self.fs, use_dictionary=repeat)
        self.shards.append({"path": name, "users": users, "steps": rows})


def _block_table(sim: Simulator, first_user: int, st_x: np.ndarray, lengths: np.ndarray, res: dict[str, np.ndarray],
                 channel_names: pa.Array, write_truth: bool) -> pa.Table:
    n = len(lengths)
    ids = pa.array([f"u{first_user + i:010d}" for i in range(n)], pa.string())
    rep = np.repeat(np.arange(n), lengths)  # (N,) user of each step
    cols: dict[str, pa.Array] = {
        "user_id": ids.take(pa.array(rep)),
        "timestamp": pa.array(res["timestamp"]),
        "channel": channel_names.take(pa.array(res["channel"])),
        "gain": pa.array(res["gain"]),
        "cost": pa.array(sim.costs.astype(np.float32)[res["channel"]]),
        "propensity": pa.array(res["propensity"]),
    }
    for j, name in enumerate(STEP_FEATURES):
        cols[name] = pa.array(res["q"][:, j])
    x = st_x.astype(np.float32)[rep]  # (N, D)
    for j, name in enumerate(user_feature_names(sim.n_features)):
        cols[name] = pa.array(x[:, j])
    if write_truth:
        for j, name in enumerate(truth_columns(sim.n_channels)):
            cols[name] = pa.array(res["true_p"][:, j])
    return pa.table(cols)


def _prepare_output(fs: pafs.FileSystem, root: str) -> None:
    """Create the output dir; remove the shards of an earlier simulation there, refuse foreign ones."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        if isinstance(fs, pafs.LocalFileSystem):  # object stores have no directories
            fs.create_dir(root, recursive=True)
        return
    files = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    parts = [f.path for f in files if f.base_name.startswith("part-") and f.base_name.endswith(".parquet")]
    has_sidecar = any(f.base_name == SIDECAR for f in files)
    if parts and not has_sidecar:
        raise FileExistsError(
            f"{root} holds part-*.parquet files that are not from a simulation; choose an empty output"
        )
    if has_sidecar:
        fs.delete_file(f"{root}/{SIDECAR}")  # the old output is no longer committed
    for p in parts:
        fs.delete_file(p)


def simulate(
    spec: SimulateSpec, progress: Callable[[str], Any] | None = print, block_users: int = BLOCK_USERS
) -> dict[str, Any]:
    """Generate ``spec.users`` journeys into ``spec.output``; returns the ``simulation.json`` content."""
    from mtorl import storage

    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    calibration: dict[str, Any] | None = None
    if spec.calibrate_from:
        manifest, stats = load_dataset_stats(spec.calibrate_from)
        overrides = calibrate(manifest, stats)
        spec = spec.model_copy(update=overrides)
        calibration = {"from": spec.calibrate_from, "stats": stats, "overrides": overrides}
        say(f"simulate: calibrated to {spec.calibrate_from}: {overrides}")
    sim = Simulator(spec)
    if spec.output.startswith("s3://"):
        storage.ensure_bucket(spec.output)
    fs, root = storage.resolve(spec.output)
    root = root.rstrip("/")
    _prepare_output(fs, root)
    writer = _ShardWriter(fs, root, spec.shard_steps)
    names = pa.array(sim.channels, pa.string())
    C = sim.n_channels
    p_sum, g_sum, count = np.zeros(C), np.zeros(C), np.zeros(C)
    len_sum = len_sq = 0.0
    t_gen = time.perf_counter()
    n_blocks = math.ceil(spec.users / block_users)
    for b in range(n_blocks):
        first = b * block_users
        n = min(block_users, spec.users - first)
        rng = np.random.default_rng([spec.seed, 1, b])
        st = sim.init_users(n, rng)
        lengths = st.length.copy()
        x0 = st.x.copy()
        res = sim.run_logged(st, rng)
        p_sum += res["p_sum"]
        g_sum += res["g_sum"]
        count += res["count"]
        len_sum += float(lengths.sum())
        len_sq += float((lengths.astype(np.float64) ** 2).sum())
        writer.add(_block_table(sim, first, x0, lengths, res, names, spec.write_truth), lengths)
        if b == n_blocks - 1 or (b + 1) % max(1, n_blocks // 10) == 0:
            steps = int(count.sum())
            say(f"simulate: {first + n}/{spec.users} users, {steps} steps, "
                f"{steps / max(time.perf_counter() - t_gen, 1e-9):,.0f} steps/s")
    writer.flush()
    elapsed = time.perf_counter() - t_gen
    steps = int(count.sum())
    mean_len = len_sum / spec.users
    summary: dict[str, Any] = {
        "kind": "mtorl-simulation",
        "format_version": 1,
        "output": spec.output,
        "seed": spec.seed,
        "spec": spec.model_dump(mode="json", by_alias=True),
        "users": spec.users,
        "steps": steps,
        "shards": writer.shards,
        "channels": sim.channels,
        "channel_costs": sim.costs.tolist(),
        "channel_stats": {
            "count": count.astype(int).tolist(),
            "share": (count / max(steps, 1)).tolist(),
            "true_rate": (p_sum / np.maximum(count, 1)).tolist(),  # mean true probability of the logged steps
            "empirical_rate": (g_sum / np.maximum(count, 1)).tolist(),
            "target_rate": sim.target_rates.tolist(),
        },
        "true_rate": float(p_sum.sum() / max(steps, 1)),
        "mean_length": mean_len,
        "length_var": len_sq / spec.users - mean_len**2,
        "journeys": journeys_mapping(spec),
        "truth_columns": truth_columns(C) if spec.write_truth else [],
        "parameters": sim.parameters(),
        "calibration": calibration,
        "seconds": time.perf_counter() - t0,
        "steps_per_s": steps / max(elapsed, 1e-9),
    }
    storage.write_json(storage.join(spec.output, SIDECAR), summary)
    say(f"simulate: wrote {steps} steps of {spec.users} users in {len(writer.shards)} shards to {spec.output} "
        f"({summary['steps_per_s']:,.0f} steps/s)")
    return summary


# ----------------------------------------------------------------------------- reading back

def read_journeys(uri: str) -> Iterator[dict[str, Any]]:
    """Yield one dict per user from a simulation output, in shard order.

    Keys: user_id (str), timestamp (T,), channel (T,) int64 index into ``channels``, gain (T,),
    cost (T,), propensity (T,), features (T, 3) step features, user_features (D,), and
    true_p (T, C) when the ground truth was written.
    """
    from mtorl import storage

    meta = storage.read_json(storage.join(uri, SIDECAR))
    fs, root = storage.resolve(uri)
    lookup = {c: i for i, c in enumerate(meta["channels"])}
    m = meta["journeys"]
    for shard in meta["shards"]:
        tab = pq.read_table(f"{root.rstrip('/')}/{shard['path']}", filesystem=fs)
        uid = tab.column("user_id").to_numpy(zero_copy_only=False)
        cut = np.nonzero(uid[1:] != uid[:-1])[0] + 1
        bounds = np.concatenate([[0], cut, [len(uid)]])
        ch = np.array([lookup[c] for c in tab.column("channel").to_pylist()], dtype=np.int64)
        cols = {k: tab.column(k).to_numpy() for k in ("timestamp", "gain", "cost", "propensity")}
        q = np.stack([tab.column(k).to_numpy() for k in m["numeric_features"]], axis=1)
        f = np.stack([tab.column(k).to_numpy() for k in m["user_features"]], axis=1)
        tp = (
            np.stack([tab.column(k).to_numpy() for k in meta["truth_columns"]], axis=1)
            if meta["truth_columns"]
            else None
        )
        for a, b in zip(bounds[:-1], bounds[1:]):
            d = {"user_id": str(uid[a]), "channel": ch[a:b], "features": q[a:b], "user_features": f[a]}
            d.update({k: v[a:b] for k, v in cols.items()})
            if tp is not None:
                d["true_p"] = tp[a:b]
            yield d


# ----------------------------------------------------------------------------- calibration

def dataset_stats(journeys: Iterable[dict[str, np.ndarray]], n_channels: int | None = None) -> dict[str, Any]:
    """Per-channel shares and positive-outcome rates, and the journey-length distribution.

    Each item holds ``channel (T,) int`` and ``gain (T,)`` (optionally ``cost (T,)``) of one journey,
    or of several concatenated journeys with their ``lengths (J,)``. The rate of a channel is the
    fraction of its steps with gain > 0 (= the mean gain for binary gains).
    """
    cnt = pos = cost = None
    have_cost = True
    n_j = 0
    l_sum = l_sq = 0.0
    for j in journeys:
        ch = np.asarray(j["channel"], dtype=np.int64)
        g = np.asarray(j["gain"], dtype=np.float64)
        k = max(int(ch.max()) + 1 if len(ch) else 0, n_channels or 0, 0 if cnt is None else len(cnt))
        if cnt is None:
            cnt, pos, cost = np.zeros(k), np.zeros(k), np.zeros(k)
        elif k > len(cnt):
            cnt, pos, cost = (np.pad(a, (0, k - len(a))) for a in (cnt, pos, cost))
        cnt += np.bincount(ch, minlength=len(cnt))
        pos += np.bincount(ch, weights=(g > 0).astype(np.float64), minlength=len(cnt))
        if "cost" in j and j["cost"] is not None:
            cost += np.bincount(ch, weights=np.asarray(j["cost"], dtype=np.float64), minlength=len(cnt))
        else:
            have_cost = False
        lengths = np.asarray(j["lengths"], dtype=np.float64) if "lengths" in j else np.array([float(len(ch))])
        n_j += len(lengths)
        l_sum += float(lengths.sum())
        l_sq += float((lengths**2).sum())
    if cnt is None or n_j == 0:
        raise ValueError("dataset_stats: no journeys")
    steps = float(cnt.sum())
    mean_len = l_sum / n_j
    out: dict[str, Any] = {
        "channel_share": (cnt / steps).tolist(),
        "channel_rate": (pos / np.maximum(cnt, 1)).tolist(),
        "mean_length": mean_len,
        "length_var": max(l_sq / n_j - mean_len**2, 0.0),
        "users": n_j,
        "steps": int(steps),
    }
    if have_cost:
        out["channel_cost"] = (cost / np.maximum(cnt, 1)).tolist()
    return out


def calibrate(manifest: Manifest, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """``SimulateSpec`` overrides that fit a prepared dataset: channels, shares, rates, lengths (and costs).

    ``manifest``: a prepared dataset's manifest (``channels``, ``splits.train.steps/users``).
    ``stats``: ``dataset_stats`` of its train split; without it only channels and the mean length are fitted.
    """
    channels = list(manifest.channels)
    C = len(channels)
    train = manifest.splits["train"]
    out: dict[str, Any] = {
        "channels": channels,
        "mean_steps": max(float(train.steps) / max(float(train.users), 1.0), 2.0),
    }
    if stats is None:
        return out
    share = np.asarray(stats["channel_share"], dtype=np.float64)
    rate = np.asarray(stats["channel_rate"], dtype=np.float64)
    share = np.pad(share, (0, C - len(share)))[:C]
    rate = np.pad(rate, (0, C - len(rate)))[:C]
    share = np.maximum(share, 1e-4)  # the logging policy keeps full support
    out["channel_shares"] = (share / share.sum()).tolist()
    out["channel_rates"] = np.clip(rate, 1e-3, 0.95).tolist()
    mean = max(float(stats["mean_length"]), 2.0)
    out["mean_steps"] = mean
    m, v = mean - 2.0, float(stats.get("length_var", 0.0))
    if m > 0 and v > m:
        out["length_dispersion"] = float(np.clip(m * m / (v - m), 0.05, 1000.0))
    elif m > 0:
        out["length_dispersion"] = 1000.0  # under-dispersed: close to Poisson
    if "channel_cost" in stats:
        c = np.asarray(stats["channel_cost"], dtype=np.float64)[:C]
        if len(c) == C and np.all(c > 0):
            out["channel_costs"] = c.tolist()
    return out


def load_dataset_stats(uri: str) -> tuple[Manifest, dict[str, Any]]:
    """Read a prepared dataset's manifest and compute ``dataset_stats`` over its train shards."""
    from mtorl import storage
    from mtorl.data.manifest import load_manifest

    manifest = load_manifest(uri)

    def chunks() -> Iterator[dict[str, np.ndarray]]:
        for full in manifest.shard_uris(uri, "train"):
            fs, path = storage.resolve(full)
            tab = pq.read_table(path, columns=["channel", "gain", "cost"], filesystem=fs)
            ch, g, c = (tab.column(k).combine_chunks() for k in ("channel", "gain", "cost"))
            lengths = np.diff(ch.offsets.to_numpy())
            yield {"channel": ch.flatten().to_numpy(), "gain": g.flatten().to_numpy(),
                   "cost": c.flatten().to_numpy(), "lengths": lengths}

    return manifest, dataset_stats(chunks(), n_channels=manifest.n_channels)
