"""prepare: raw logs -> a versioned, split, normalised journey dataset whose manifest is written last.

Steps (memory bounded by one input chunk, one spill partition and one shard per split):

1. **Read + check + spill.** The converter reads the input in chunks and turns each into canonical
   step rows; bad rows stop the run (``on_bad_rows: error``) or are written aside to
   ``<output>/<version>/quarantine/``. Good rows are hash-partitioned by user into Arrow files on
   local disk (a user's rows all land in one partition).
2. **Vocabulary.** Channels (and categorical vocabularies) from the counts of step 1, or from
   ``manifest_from``.
3. **Group + write.** Each partition is sorted by (user, time, input row) and cut into journeys;
   short journeys are dropped; users go to train/val/test by a stable hash of ``salt + user_id``;
   journeys are written as Parquet shards of at most ``shard_max_steps`` steps. Normalisation and
   reward range are accumulated on train only (streaming mean/variance, min/max).
4. **Commit.** ``manifest.json`` is written last, atomically: it is the commit marker and the pointer
   to the version. Readers read only the shards it lists, so a concurrent re-prepare never mixes in.

Every input row is accounted for: ``rows_read == rows_written + sum(rows_dropped.values())``.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import mtorl
from mtorl import storage
from mtorl.data.converters import Chunk, Converter, Plan, hash_partition, make_converter
from mtorl.data.errors import DataError
from mtorl.data.manifest import (
    JOURNEY_SCHEMA, MANIFEST_FILE, SCHEMA_VERSION, SPLITS, Manifest, new_version, resolve_manifest_from,
)
from mtorl.data.shards import UserPacker
from mtorl.data.windows import Journey, journeys_from_table
from mtorl.spec.models import JourneysFormat, PrepareSpec

STD_FLOOR = 1e-6
SPILL_BYTES = 128 << 20          # target input bytes per spill partition
QUARANTINE_ROWS = 50_000         # rows per quarantine file
ALL = "all"                      # the single bucket of in-memory (unsplit) runs

Progress = Callable[[str], Any]


# ----------------------------------------------------------------------------- public API

def prepare(spec: PrepareSpec, progress: Progress = print) -> Manifest:
    """Prepare ``spec.input`` into the dataset at ``spec.output``; returns the committed manifest."""
    manifest, _ = prepare_with_manifest(spec, progress=progress, keep_journeys=False)
    return manifest


def prepare_with_manifest(
    spec: PrepareSpec,
    manifest: Manifest | None = None,
    *,
    progress: Progress = print,
    write: bool = True,
    keep_journeys: bool = True,
) -> tuple[Manifest, list[Journey]]:
    """Prepare with an existing manifest (``manifest``, else ``spec.manifest_from``, else fit a new one).

    With ``write=False`` nothing is written and all users are kept together (no split): the returned
    manifest is a summary (counts) on top of the base manifest. ``keep_journeys`` also returns the
    journeys in memory (rewards and states normalised with the manifest), in input user order.
    """
    base = manifest if manifest is not None else (resolve_manifest_from(spec.manifest_from) if spec.manifest_from else None)
    spec = _with_simulation_mapping(spec, progress)
    if not write and base is None:
        raise DataError("write=False needs a manifest (or manifest_from) to normalise with")
    return _Run(spec, base, progress, write, keep_journeys).execute()


def _with_simulation_mapping(spec: PrepareSpec, progress: Progress) -> PrepareSpec:
    """``source: journeys`` on an ``mtorl simulate`` output with no ``journeys`` mapping in the spec:
    take the mapping the simulation recorded (its features, user features and propensities)."""
    if spec.source != "journeys" or "journeys" in spec.model_fields_set:
        return spec
    from mtorl.sim.generate import SIDECAR, journeys_format

    if not storage.exists(storage.join(spec.input, SIDECAR)):
        return spec
    progress(f"{spec.input}: simulated logs; journeys mapping from its {SIDECAR}")
    return spec.model_copy(update={"journeys": JourneysFormat(**journeys_format(spec.input))})


def load_journeys(
    source: str,
    input: str,
    manifest: Manifest,
    *,
    gain: str | None = None,
    journeys: JourneysFormat | None = None,
    on_bad_rows: str = "error",
    min_steps: int = 1,
    progress: Progress | None = None,
) -> list[Journey]:
    """Raw logs -> in-memory Journeys with the vocabulary/normalisation/reward range of ``manifest``
    (evaluation of held-back logs). Nothing is written; bad rows raise or are skipped (counted)."""
    fmt = journeys or (JourneysFormat(**manifest.journeys_format) if manifest.journeys_format else JourneysFormat())
    spec = PrepareSpec(source=source, input=input, output="-", gain=gain or manifest.gain, on_bad_rows=on_bad_rows,
                       min_steps=min_steps, journeys=fmt, top_k_channels=max(2, manifest.n_channels))
    _, out = prepare_with_manifest(spec, manifest, progress=progress or (lambda _m: None), write=False)
    return out


def split_of(user_id: str, salt: str, train: float, val: float) -> str:
    """train/val/test of a user: a stable hash of salt + user id (the same on every run and machine)."""
    h = int.from_bytes(hashlib.sha1(f"{salt}\x00{user_id}".encode()).digest()[:8], "big") / 2.0**64
    return "train" if h < train else "val" if h < train + val else "test"


# ----------------------------------------------------------------------------- accumulators

class _Moments:
    """Streaming mean/variance per column (Chan et al. merge of per-chunk moments)."""

    def __init__(self, d: int) -> None:
        self.n = 0
        self.mean = np.zeros(d)
        self.m2 = np.zeros(d)

    def add(self, x: np.ndarray) -> None:  # x (k, d)
        k = x.shape[0]
        if k == 0:
            return
        bm = x.mean(axis=0)
        bm2 = ((x - bm) ** 2).sum(axis=0)
        tot = self.n + k
        delta = bm - self.mean
        self.mean = self.mean + delta * (k / tot)
        self.m2 = self.m2 + bm2 + delta**2 * (self.n * k / tot)
        self.n = tot

    def std(self) -> np.ndarray:
        var = self.m2 / self.n if self.n else np.ones_like(self.m2)
        return np.maximum(np.sqrt(np.maximum(var, 0.0)), STD_FLOOR)


class _Quarantine:
    """Bad rows written aside as Parquet (all values as strings, plus _row, _field, _reason)."""

    def __init__(self, base_uri: str | None) -> None:
        self.base = base_uri
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0
        self.files: list[str] = []

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        if self.base is None:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= QUARANTINE_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.pending or self.base is None:
            return
        t = pa.concat_tables(self.pending, promote_options="permissive")
        name = f"quarantine/part-{len(self.files):05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(t, buf)
        storage.write_bytes(storage.join(self.base, name), buf.getvalue())
        self.files.append(name)
        self.pending, self.pending_rows = [], 0


class _ShardWriter:
    """Journey rows of one split -> Parquet shards of at most ``max_steps`` steps (a longer journey alone)."""

    def __init__(self, dataset_uri: str, version: str, split: str, max_steps: int) -> None:
        self.uri, self.version, self.split = dataset_uri, version, split
        self.packer = UserPacker(max_steps, self._write)
        self.shards: list[dict[str, Any]] = []
        self.users = 0
        self.steps = 0

    def add(self, table: pa.Table) -> None:
        self.packer.add(table.column("length").to_numpy().astype(np.int64), table.slice)

    def flush(self) -> None:
        self.packer.flush()

    def _write(self, t: pa.Table, users: int, steps: int) -> None:
        rel = f"{self.version}/{self.split}/part-{len(self.shards):05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(t, buf, compression="zstd")
        data = buf.getvalue()
        storage.write_bytes(storage.join(self.uri, rel), data)
        self.shards.append({"path": rel, "users": users, "steps": steps, "sha256": hashlib.sha256(data).hexdigest()})
        self.users += users
        self.steps += steps


# ----------------------------------------------------------------------------- the run

class _Run:
    def __init__(self, spec: PrepareSpec, base: Manifest | None, progress: Progress, write: bool, keep: bool) -> None:
        self.spec, self.base, self.progress, self.write, self.keep = spec, base, progress, write, keep
        self.conv: Converter = make_converter(spec)
        self.version = new_version()
        self.vuri = storage.join(spec.output, self.version) if write else None
        self.rows_read = 0
        self.dropped: Counter[str] = Counter()
        self.users_read = 0
        self.users_dropped = 0
        self.quarantine = _Quarantine(self.vuri if spec.on_bad_rows == "quarantine" else None)
        self.all_counts: Counter[str] = Counter()
        self.train_counts: Counter[str] = Counter()
        self.train_cats: list[set[str]] = []
        self.t0 = time.time()

    # -- 1. read, check, spill
    def _bad_rows(self, chunk: Chunk) -> None:
        if not chunk.bad_index.size:
            return
        first = int(chunk.bad_index[0])
        row_no = self._row0 + first
        if self.spec.on_bad_rows == "error":
            val = chunk.raw.column(chunk.bad_field[0]).combine_chunks()[first].as_py() if chunk.bad_field[0] in chunk.raw.column_names else None
            where = f"value {val!r}" if val is not None else "the channel flags"
            raise DataError(f"{self.spec.input}: row {row_no} (1-based, header not counted), field {chunk.bad_field[0]!r}: "
                            f"{chunk.bad_problem[0]} ({where}); fix the input or set on_bad_rows: quarantine")
        for f in chunk.bad_field:
            self.dropped[f"bad_row:{f}"] += 1
        raw = chunk.raw.take(pa.array(chunk.bad_index))
        raw = pa.table({n: pc.cast(raw.column(n), pa.string()) for n in raw.column_names})
        raw = raw.append_column("_row", pa.array(chunk.bad_index + self._row0, type=pa.int64()))
        raw = raw.append_column("_field", pa.array(chunk.bad_field, type=pa.string()))
        raw = raw.append_column("_reason", pa.array(chunk.bad_problem, type=pa.string()))
        self.quarantine.add(raw)

    def _spill(self, tmp: str) -> tuple[Plan, list[str]]:
        plan: Plan | None = None
        n_part = self.spec.spill_partitions or int(min(512, max(1, math.ceil(self.conv.size_hint() / SPILL_BYTES))))
        paths = [os.path.join(tmp, f"p{i:04d}.arrow") for i in range(n_part)]
        writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        opts = pa.ipc.IpcWriteOptions(compression="lz4")
        need_train = self.base is None and self.conv.fixed_channels is None and self.conv.drop_unknown_channel is None
        self._row0 = 1
        last = time.time()
        from mtorl.console import as_console

        con = as_console(self.progress)  # on a terminal a rows bar; elsewhere a line every 5 s
        bar = con.progress(None, "[prepare] rows read", unit="rows") if con.tty else None
        try:
            for raw in self.conv.read_chunks():
                if plan is None:
                    plan = self.conv.plan(raw.column_names)
                    self.train_cats = [set() for _ in plan.categorical]
                    need_train = need_train or (self.base is None and bool(plan.categorical))
                chunk = self.conv.convert(raw, plan, self._row0)
                self.rows_read += raw.num_rows
                if bar is not None:
                    bar.update(raw.num_rows)
                self._bad_rows(chunk)
                self._row0 += raw.num_rows
                t = chunk.rows
                if t.num_rows == 0:
                    continue
                self._count(t, plan, need_train)
                part = hash_partition(t.column("_uid").combine_chunks(), n_part)
                order = np.argsort(part, kind="stable")
                t = t.take(pa.array(order))
                part = part[order]
                cuts = np.searchsorted(part, np.arange(n_part + 1))
                for p in range(n_part):
                    a, b = int(cuts[p]), int(cuts[p + 1])
                    if a == b:
                        continue
                    if p not in writers:
                        writers[p] = pa.ipc.new_stream(paths[p], t.schema, options=opts)
                    writers[p].write_table(t.slice(a, b - a))
                if bar is None and time.time() - last > 5:
                    last = time.time()
                    self._say(f"read {self.rows_read:,} rows")
        finally:
            if bar is not None:
                bar.close()
        for w in writers.values():
            w.close()
        if plan is None:
            raise DataError(f"{self.spec.input}: no data rows")
        self._say(f"read {self.rows_read:,} rows into {len(writers)} spill partition(s)")
        return plan, [paths[p] for p in sorted(writers)]

    def _count(self, t: pa.Table, plan: Plan, need_train: bool) -> None:
        if self.conv.drop_unknown_channel is not None:
            vc = pc.value_counts(t.column("_ch")).to_pylist()
            self.all_counts.update({d["values"]: d["counts"] for d in vc})
        if not need_train:
            return
        s = self.spec.splits
        uniq = pc.unique(t.column("_uid"))
        is_train = pa.array([split_of(u, s.salt, s.train, s.val) == "train" for u in uniq.to_pylist()], type=pa.bool_())
        row_train = pc.take(is_train, pc.index_in(t.column("_uid"), value_set=uniq))
        tt = t.filter(row_train)
        vc = pc.value_counts(tt.column("_ch")).to_pylist()
        self.train_counts.update({d["values"]: d["counts"] for d in vc})
        for i in range(len(plan.categorical)):
            self.train_cats[i].update(pc.unique(tt.column(f"k{i}")).to_pylist())

    # -- 2. vocabulary
    def _vocab(self, plan: Plan) -> None:
        if self.base is not None:
            self.channels = list(self.base.channels)
            self.categorical = {k: list(v) for k, v in self.base.categorical.items()}
        else:
            self.channels = self.conv.channels(dict(self.all_counts), dict(self.train_counts))
            self.categorical = {c: sorted(self.train_cats[i]) for i, c in enumerate(plan.categorical)}
        missing = [c for c in plan.categorical if c not in self.categorical]
        if missing:
            raise DataError(f"manifest has no vocabulary for categorical column(s) {', '.join(missing)}")
        if len(self.channels) < 2 and self.write:
            raise DataError(f"{self.spec.input}: {len(self.channels)} channel(s) in train; need at least 2")
        self.step_features = plan.step_feature_names() + [f"{c}={v}" for c in plan.categorical for v in self.categorical[c]]
        self.user_features = list(plan.user_numeric)
        if self.base is not None:
            for key, theirs, mine in (("step_features", self.base.step_features, self.step_features),
                                      ("user_features", self.base.user_features, self.user_features)):
                if list(theirs) != mine:
                    raise DataError(f"{self.spec.input}: {key} {mine} differ from the manifest's {theirs}")

    # -- 3. group + write
    def _group(self, plan: Plan, parts: list[str]) -> None:
        spec = self.spec
        buckets = SPLITS if self.write else (ALL,)
        self.writers = {s: _ShardWriter(spec.output, self.version, s, spec.shard_max_steps) for s in SPLITS} if self.write else {}
        self.kept: list[pa.Table] = []
        dq, df = len(self.step_features), len(self.user_features)
        self.mom_q, self.mom_u = _Moments(dq), _Moments(df)
        self.rmin, self.rmax, self.binary, self.train_steps = math.inf, -math.inf, True, 0
        penalty = float(self.base.penalty) if self.base is not None else float(spec.penalty)
        vocab = pa.array(self.channels, type=pa.string())
        done_rows = 0
        for n_done, path in enumerate(parts):
            with pa.memory_map(path) as src:
                t = pa.ipc.open_stream(src).read_all()
            done_rows += t.num_rows
            self.users_read += len(pc.unique(t.column("_uid")))
            ch = pc.index_in(t.column("_ch"), value_set=vocab)
            unknown = pc.is_null(ch)
            if pc.any(unknown).as_py():
                self._unknown_channels(t.filter(unknown), plan)
                keep = pc.invert(unknown)
                t, ch = t.filter(keep), ch.filter(keep)
            t = t.append_column("_ci", pc.cast(ch, pa.int16()))
            t = t.sort_by([("_uid", "ascending"), ("_t", "ascending"), ("_row", "ascending")])
            n = t.num_rows
            if n == 0:
                continue
            uid = t.column("_uid").combine_chunks()
            new_user = np.ones(n, dtype=bool)
            if n > 1:
                new_user[1:] = np.asarray(pc.not_equal(uid.slice(1), uid.slice(0, n - 1)))
            starts = np.flatnonzero(new_user)
            lengths = np.diff(np.append(starts, n))
            short = lengths < spec.min_steps
            if short.any():
                self.dropped["short_journey"] += int(lengths[short].sum())
                self.users_dropped += int(short.sum())
                starts, lengths = starts[~short], lengths[~short]
            users = uid.take(pa.array(starts)).to_pylist()
            first = starts.copy()  # user features: the first row of each user
            # cut long journeys into consecutive pieces (the same user, so the same split)
            M = spec.max_journey_length
            if M and len(lengths) and lengths.max() > M:
                npcs = -(-lengths // M)
                owner = np.repeat(np.arange(len(lengths)), npcs)
                k = np.arange(owner.shape[0]) - np.repeat(np.cumsum(npcs) - npcs, npcs)
                p_starts = starts[owner] + k * M
                p_len = np.minimum(M, lengths[owner] - k * M)
                names = [users[o] if kk == 0 else f"{users[o]}#{kk}" for o, kk in zip(owner, k)]
                split_users = [users[o] for o in owner]
                starts, lengths, first, users = p_starts, p_len, first[owner], names
            else:
                split_users = users
            s = spec.splits
            which = np.array([split_of(u, s.salt, s.train, s.val) for u in split_users]) if self.write else np.full(len(users), ALL)
            q = np.column_stack([t.column(f"q{i}").to_numpy() for i in range(len(plan.step_feature_names()))]) if plan.step_feature_names() else np.zeros((n, 0))
            if plan.categorical:
                q = np.concatenate([q, self._onehot(t, plan)], axis=1)
            u = np.column_stack([t.column(f"u{i}").to_numpy() for i in range(df)]) if df else np.zeros((n, 0))
            g, w, p = (t.column(c).to_numpy() for c in ("_g", "_w", "_p"))
            ci = t.column("_ci").to_numpy()
            for b in buckets:
                sel = np.flatnonzero(which == b)
                if not sel.size:
                    continue
                idx = np.repeat(starts[sel] - (np.cumsum(lengths[sel]) - lengths[sel]), lengths[sel]) + np.arange(lengths[sel].sum())
                table = _journey_table([users[i] for i in sel], lengths[sel], ci[idx], g[idx], w[idx], p[idx], q[idx], u[first[sel]])
                if b == "train":
                    self.mom_q.add(q[idx])
                    self.mom_u.add(u[first[sel]])
                    r = g[idx] - penalty * w[idx]
                    self.rmin, self.rmax = min(self.rmin, float(r.min())), max(self.rmax, float(r.max()))
                    self.binary = self.binary and bool(np.isin(g[idx], (0.0, 1.0)).all())
                    self.train_steps += int(idx.size)
                self.rows_written += int(idx.size)
                if self.write:
                    self.writers[b].add(table)
                if self.keep:
                    self.kept.append(table)
            self._say(f"grouped partition {n_done + 1}/{len(parts)} ({done_rows:,} rows)")

    def _onehot(self, t: pa.Table, plan: Plan) -> np.ndarray:
        mats = []
        for i, c in enumerate(plan.categorical):
            voc = self.categorical[c]
            idx = pc.index_in(t.column(f"k{i}"), value_set=pa.array(voc, type=pa.string())).to_numpy(zero_copy_only=False)
            m = np.zeros((t.num_rows, len(voc)))
            ok = ~np.isnan(idx.astype(np.float64)) if idx.dtype == object or idx.dtype.kind == "f" else np.ones(len(idx), bool)
            rows = np.flatnonzero(ok)
            m[rows, idx[ok].astype(np.int64)] = 1.0  # a category unseen in train: all zeros
            mats.append(m)
        return np.concatenate(mats, axis=1) if mats else np.zeros((t.num_rows, 0))

    def _unknown_channels(self, bad: pa.Table, plan: Plan) -> None:
        reason = self.conv.drop_unknown_channel
        if reason is not None:
            self.dropped[reason] += bad.num_rows
            return
        bad = bad.sort_by("_row")
        if self.spec.on_bad_rows == "error":
            src = f"the manifest of {self.spec.manifest_from}" if self.spec.manifest_from else ("the manifest" if self.base else "the train split")
            raise DataError(f"{self.spec.input}: row {bad.column('_row')[0].as_py()} (1-based, header not counted), "
                            f"field {plan.channel_col or 'channel'!r}: channel {bad.column('_ch')[0].as_py()!r} is not in "
                            f"the vocabulary of {src} ({', '.join(self.channels[:20])}); "
                            "fix the input or set on_bad_rows: quarantine")
        self.dropped["unknown_channel"] += bad.num_rows
        names = {"_uid": plan.uid, "_t": plan.time, "_ch": plan.channel_col or "channel", "_g": plan.gain, "_w": plan.cost,
                 "_p": plan.propensity}
        names.update({f"q{i}": c for i, c in enumerate(plan.step_feature_names())})
        names.update({f"u{i}": c for i, c in enumerate(plan.user_numeric)})
        names.update({f"k{i}": c for i, c in enumerate(plan.categorical)})
        cols = {names[c]: pc.cast(bad.column(c), pa.string()) for c in bad.column_names if names.get(c)}
        cols["_row"] = bad.column("_row")
        cols["_field"] = pa.array([names["_ch"]] * bad.num_rows, type=pa.string())
        cols["_reason"] = pa.array(["channel not in the vocabulary"] * bad.num_rows, type=pa.string())
        self.quarantine.add(pa.table(cols))

    # -- 4. commit
    def _manifest(self, plan: Plan) -> Manifest:
        spec, base = self.spec, self.base
        norm: Any
        rnorm: Any
        if base is not None:
            norm, rnorm = base.normalization, base.reward_norm
            binary, penalty = base.gain_binary, float(base.penalty)
        else:
            if self.train_steps == 0:
                raise DataError(f"{spec.input}: no training journeys after cleaning (users {self.users_read}, "
                                f"dropped {dict(self.dropped)}); check min_steps and the split fractions")
            mean = np.concatenate([self.mom_q.mean, self.mom_u.mean])
            std = np.concatenate([self.mom_q.std(), self.mom_u.std()])
            norm = {"mean": [float(x) for x in mean], "std": [float(x) for x in std]}
            rnorm = {"min": self.rmin, "max": self.rmax}
            binary, penalty = self.binary, float(spec.penalty)
        splits = {s: {"users": w.users, "steps": w.steps, "shards": w.shards} for s, w in self.writers.items()}
        m: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "version": self.version,
            "source": spec.source,
            "input": spec.input,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "mtorl_version": mtorl.__version__,
            "channels": self.channels,
            "step_features": self.step_features,
            "user_features": self.user_features,
            "categorical": self.categorical,
            "normalization": norm,
            "gain": plan.gain,
            "gain_binary": binary,
            "cost": plan.cost or "1 per exposure",
            "penalty": penalty,
            "reward_norm": rnorm,
            "has_propensity": plan.propensity is not None,
            "splits": splits,
            "split_salt": spec.splits.salt,
            "rows_read": self.rows_read,
            "rows_written": self.rows_written,
            "rows_dropped": dict(sorted(self.dropped.items())),
            "users_read": self.users_read,
            "users_dropped": self.users_dropped,
            "quarantine": {"rows": self.quarantine.rows, "files": [f"{self.version}/{f}" for f in self.quarantine.files]},
            "manifest_from": spec.manifest_from,
        }
        if spec.source == "journeys":
            m["journeys_format"] = spec.journeys.model_dump()
        return Manifest.model_validate(m)

    def _say(self, msg: str) -> None:
        dt = max(time.time() - self.t0, 1e-9)
        self.progress(f"[prepare] {msg} ({self.rows_read / dt:,.0f} rows/s, {dt:.1f}s)")

    def execute(self) -> tuple[Manifest, list[Journey]]:
        """Run the prepare; on any failure the uncommitted version folder is removed (a killed one is
        left for ``mtorl datasets gc``), and spill folders of killed prepares are swept first."""
        from mtorl.data.gc import SPILL_PREFIX, remove_stale_spill_dirs

        remove_stale_spill_dirs(self.spec.spill_dir)
        try:
            return self._execute(f"{SPILL_PREFIX}{os.getpid()}-")
        except BaseException:
            if self.write and self.vuri is not None:
                try:
                    from mtorl import storage

                    storage.delete_prefix(self.vuri)
                except Exception:  # noqa: BLE001 - best effort: the original error matters
                    pass
            raise

    def _execute(self, spill_prefix: str) -> tuple[Manifest, list[Journey]]:
        self.rows_written = 0
        with tempfile.TemporaryDirectory(prefix=spill_prefix, dir=self.spec.spill_dir) as tmp:
            plan, parts = self._spill(tmp)
            self._vocab(plan)
            self._group(plan, parts)
        for w in self.writers.values():
            w.flush()
        self.quarantine.flush()
        accounted = self.rows_written + sum(self.dropped.values())
        if accounted != self.rows_read:
            raise RuntimeError(f"row accounting broken: read {self.rows_read}, written {self.rows_written}, "
                               f"dropped {dict(self.dropped)} (sum {accounted})")
        m = self._manifest(plan)
        if self.write:
            body = m.dump()
            storage.write_json(storage.join(self.spec.output, self.version, MANIFEST_FILE), body)  # the version's commit marker
            storage.write_json(storage.join(self.spec.output, MANIFEST_FILE), body)  # last: the commit
            sp = m.splits
            self._say(f"committed {self.spec.output} version {self.version}: {self.rows_written:,} steps, users "
                      f"train/val/test {sp['train'].users}/{sp['val'].users}/{sp['test'].users}, dropped {m.rows_dropped}")
        journeys: list[Journey] = []
        if self.keep:
            for t in self.kept:
                journeys.extend(journeys_from_table(t, m))
        return m, journeys


def _list(values: np.ndarray, offsets: np.ndarray, typ: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(values, type=typ))


def _journey_table(users: list[str], lengths: np.ndarray, ch: np.ndarray, g: np.ndarray, w: np.ndarray, p: np.ndarray,
                   q: np.ndarray, u: np.ndarray) -> pa.Table:
    """Rows (already gathered in journey order) -> one Parquet row per journey (JOURNEY_SCHEMA)."""
    off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    dq, df = q.shape[1], u.shape[1]
    f32 = pa.float32()
    return pa.Table.from_arrays([
        pa.array(users, type=pa.string()),
        pa.array(lengths, type=pa.int32()),
        _list(ch.astype(np.int16), off, pa.int16()),
        _list(g.astype(np.float32), off, f32),
        _list(w.astype(np.float32), off, f32),
        _list(p.astype(np.float32), off, f32),
        _list(q.astype(np.float32).reshape(-1), off * dq, f32),      # (T * Dq,) row-major
        _list(u.astype(np.float32).reshape(-1), np.arange(len(users) + 1) * df, f32),
    ], schema=JOURNEY_SCHEMA)
