"""Converters: raw logs -> validated, canonical step rows, chosen by ``PrepareSpec.source``.

A converter reads its input in chunks (never the whole file), checks the columns it needs, and turns
each chunk into *canonical* step rows (``_uid, _row, _t, _ch, _g, _w, _p, q*, u*, k*``) plus the bad
rows it found. ``mtorl.data.prepare`` spills canonical rows into hash partitions by user on local disk
and groups each partition into journeys, so memory stays bounded whatever the input size.

Sources and the MDP they define (state s_t = concat(q_t, f), action = channel, gain g_t, cost w_t):

* ``kuairand-sequence``: channels short/mid/long (one-hot columns), gain ``is_click``, cost 1 per
  exposure, q_t = (hourmin, time_ms), f = activity one-hots and onehot_feat*. ``long_view`` and
  ``play_time_ms`` are outcomes of the exposure at t (known only after it), so they are never part of
  s_t: the policy would see the future. Rows of a user are in time order: file order is kept.
* ``criteo-sequence``: channels are the ``Type_<id>`` boolean columns, gain ``conversion`` (or
  ``click``/``attribution``), cost ``cost``, q_t = campaign, cat1..cat7, cat9. ``cat8`` is excluded: it
  takes exactly 11 values, one per ``Type_<id>`` column (the channel columns are its one-hot), so it
  would hand the logged action to the policy (a decision tree on cat8 alone predicts the channel with
  accuracy 1.0). Outcome columns (conversion, attribution, click, click_nb, cpo) are excluded from
  the state. File order is time order.
* ``criteo-attribution``: the raw public Criteo Attribution TSV. Channels are the top-K campaigns by
  row count (other rows dropped as ``channel_not_in_top_k``), order by timestamp within a user,
  q_t = cat1..cat9 (hashed categorical ids, each mapped by a stable hash to [0, 1): simple, no
  vocabulary to fit; the model sees them as numeric noise-free identifiers) and time_since_last_click.
  Outcomes (conversion*, attribution, click*, cpo) are excluded.
* ``journeys``: the generic format (``JourneysFormat``): user, timestamp, channel (string), gain,
  cost, optional propensity, numeric/categorical step features and static user features.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtorl import storage
from mtorl.data.errors import DataError

KUAI_CHANNELS = ["short", "mid", "long"]
KUAI_USER = ["2_14_day_new", "30day_retention", "UNKNOWN", "day_new", "full_active", "high_active", "low_active",
             "middle_active", "single_low_active"]
DATA_SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv", ".tsv.gz")
CRITEO_CATS = [f"cat{i}" for i in range(1, 10)]
CRITEO_SEQUENCE_STATE = ["campaign", *(c for c in CRITEO_CATS if c != "cat8")]  # cat8 is the channel itself
CRITEO_GAINS = ("conversion", "click", "attribution")
ATTRIBUTION_COLUMNS = ["timestamp", "uid", "campaign", "conversion", "conversion_timestamp", "conversion_id",
                       "attribution", "click", "click_pos", "click_nb", "cost", "cpo", "time_since_last_click",
                       *CRITEO_CATS]
_TRUE = {"1", "1.0", "true", "t", "yes"}
_FALSE = {"0", "0.0", "false", "f", "no"}


@dataclass
class Plan:
    """Which input columns make up each part of a step (names as in the input)."""

    uid: str
    time: str | None                       # order key within a user; None = file order
    gain: str
    cost: str | None                       # None = 1 per exposure
    channel_onehot: list[tuple[str, str]] = field(default_factory=list)  # (column, channel label)
    channel_col: str | None = None         # a column holding the channel label
    propensity: str | None = None
    step_numeric: list[str] = field(default_factory=list)
    step_hashed: list[str] = field(default_factory=list)   # categorical ids -> stable hash in [0, 1)
    categorical: list[str] = field(default_factory=list)   # one-hot, vocabulary fitted on train
    user_numeric: list[str] = field(default_factory=list)

    def step_feature_names(self) -> list[str]:
        return [*self.step_numeric, *self.step_hashed]

    def columns(self) -> list[str]:
        """Every input column the plan reads."""
        one = [self.uid, self.time, self.gain, self.cost, self.channel_col, self.propensity]
        return [c for c in one if c] + [c for c, _ in self.channel_onehot] + self.step_numeric + self.step_hashed \
            + self.categorical + self.user_numeric


@dataclass
class Chunk:
    """Canonical rows of one input chunk and its bad rows."""

    rows: pa.Table
    bad_index: np.ndarray            # positions (in the raw chunk) of bad rows
    bad_field: list[str]             # first bad field of each bad row
    bad_problem: list[str]
    raw: pa.Table                    # the raw chunk (strings), for quarantine and messages


class Converter:
    source = ""
    delimiter = ","
    fixed_channels: list[str] | None = None      # a fixed vocabulary (one-hot sources)
    drop_unknown_channel: str | None = None      # drop reason for channels outside the vocabulary (else: bad row)

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self._seen_rows = SeenHashes()  # row hashes of the pass so far (fully duplicated rows are bad rows)

    # -- columns
    def plan(self, columns: list[str]) -> Plan:
        raise NotImplementedError

    def _require(self, columns: list[str], needed: list[str]) -> None:
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"{self.spec.input}: missing column(s) {', '.join(missing)} for source {self.source} "
                            f"(found {len(columns)} columns: {', '.join(columns[:12])}{'...' if len(columns) > 12 else ''})")

    # -- reading
    def input_files(self) -> list[tuple[str, Any, str]]:
        """(uri, filesystem, path) of the input: one file, or every data file under a directory/prefix."""
        uri = self.spec.input
        fs, path = storage.resolve(uri)
        try:
            info = fs.get_file_info(path)
        except Exception as e:  # noqa: BLE001 - storage errors become one line
            raise DataError(f"{uri}: can't read input ({e})") from None
        if info.type.name == "File":
            return [(uri, fs, path)]
        if info.type.name == "Directory":
            sel = pafs.FileSelector(path, recursive=True)
            files = sorted(i.path for i in fs.get_file_info(sel) if i.type.name == "File" and i.path.lower().endswith(DATA_SUFFIXES))
            if files:
                base = uri.rstrip("/")
                return [(f"{base}/{f[len(path.rstrip('/')) + 1:]}", fs, f) for f in files]
            raise DataError(f"{uri}: a directory with no data files ({', '.join(DATA_SUFFIXES)})")
        raise DataError(f"{uri}: input file not found")

    def read_chunks(self) -> Iterator[pa.Table]:
        """Raw chunks of about ``chunk_rows`` rows; CSV values as strings (checked by us, not guessed).
        A directory (or S3 prefix) input is read file by file, in name order. A truncated or corrupt
        file (gzip, Parquet) is one DataError naming it."""
        for uri, fs, path in self.input_files():
            try:
                yield from self._read_file(uri, fs, path)
            except DataError:
                raise
            except (pa.ArrowException, OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
                kind = "Parquet" if uri.lower().endswith((".parquet", ".pq")) else "CSV"
                raise DataError(f"{uri}: corrupt or truncated {kind} file ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]})") from None

    def _read_file(self, uri: str, fs: Any, path: str) -> Iterator[pa.Table]:
        low = uri.lower()
        if low.endswith(".parquet") or low.endswith(".pq"):
            pf = pq.ParquetFile(fs.open_input_file(path))
            for b in pf.iter_batches(batch_size=self.spec.chunk_rows):
                yield pa.Table.from_batches([b])
            return
        compression = "gzip" if low.endswith(".gz") else None
        delim = "\t" if (self.delimiter == "\t" or ".tsv" in low) else ","
        parse = pacsv.ParseOptions(delimiter=delim)
        with fs.open_input_stream(path, compression=compression) as f:
            head = b""
            while b"\n" not in head:
                more = f.read(1 << 16)
                if not more:
                    break
                head += more
        header = head.split(b"\n", 1)[0].decode("utf-8-sig").rstrip("\r")
        if not header:
            raise DataError(f"{uri}: empty file (no header)")
        names = next(iter(pd.read_csv(io.StringIO(header), sep=delim, header=None, dtype=str, keep_default_na=False).itertuples(index=False)), ())
        names = [str(n) for n in names]
        block = int(min(max(self.spec.chunk_rows * 64, 1 << 20), 256 << 20))
        ropts = pacsv.ReadOptions(block_size=block, column_names=names, skip_rows=1)
        copts = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
        with fs.open_input_stream(path, compression=compression) as f:
            try:
                reader = pacsv.open_csv(f, read_options=ropts, parse_options=parse, convert_options=copts)
                for b in reader:
                    yield pa.Table.from_batches([b])
            except pa.ArrowInvalid as e:
                raise DataError(f"{uri}: malformed CSV ({e})") from None

    def size_hint(self) -> int:
        """Estimated uncompressed bytes of the input (to size the spill partitions)."""
        total = 0
        for uri, fs, path in self.input_files():
            n = int(fs.get_file_info(path).size or 0)
            total += n * 6 if uri.lower().endswith(".gz") else n
        return total

    def _duplicates(self, raw: pa.Table) -> np.ndarray:
        """(N,) bool: rows equal in every column to an earlier row of the input (64-bit row hashes, kept
        for the whole pass in sorted arrays: 8 bytes per distinct row, see :class:`SeenHashes`)."""
        if not raw.num_rows:
            return np.zeros(0, dtype=bool)
        return self._seen_rows.add(_row_hashes(raw))

    # -- channel vocabulary from the counts of valid rows
    def channels(self, all_counts: dict[str, int], train_counts: dict[str, int]) -> list[str]:
        return list(self.fixed_channels or sorted(train_counts))

    # -- conversion of one raw chunk
    def convert(self, raw: pa.Table, plan: Plan, row0: int) -> Chunk:
        used = set(plan.columns())
        for f in raw.schema:
            if f.name in used and pa.types.is_nested(f.type):
                raise DataError(f"{self.spec.input}: column {f.name!r} holds {f.type} values (list/struct/map): "
                                "mtorl reads one scalar per row and column; flatten it first")
        n = raw.num_rows
        first_bad = np.full(n, -1, dtype=np.int64)
        fields: list[str] = []
        problems: list[str] = []

        def flag(bad: np.ndarray, name: str, problem: str) -> None:
            new = bad & (first_bad < 0)
            if new.any():
                first_bad[new] = len(fields)
            fields.append(name)
            problems.append(problem)

        cols: dict[str, Any] = {}
        uid = _as_string(raw.column(plan.uid))
        flag(np.asarray(pc.fill_null(pc.equal(pc.utf8_length(uid), 0), True)), plan.uid, "empty user id")
        cols["_uid"] = uid
        rows = np.arange(row0, row0 + n, dtype=np.int64)
        cols["_row"] = rows
        if plan.time is None:
            cols["_t"] = rows.astype(np.float64)
        else:
            t = _numeric(raw.column(plan.time), allow_time=True)
            flag(~np.isfinite(t), plan.time, "not a finite number or timestamp")
            cols["_t"] = t
        if plan.channel_onehot:
            mat = np.zeros((n, len(plan.channel_onehot)), dtype=np.float64)
            for i, (c, _) in enumerate(plan.channel_onehot):
                v = _flag01(raw.column(c))
                flag(np.isnan(v), c, "not a 0/1 or true/false channel flag")
                mat[:, i] = np.nan_to_num(v)
            k = mat.sum(axis=1)
            flag(k == 0, "channel", "no channel set")
            flag(k > 1, "channel", "several channels set")
            labels = np.array([lab for _, lab in plan.channel_onehot], dtype=object)
            cols["_ch"] = pa.array(labels[mat.argmax(axis=1)] if n else [], type=pa.string())
        else:
            ch = _as_string(raw.column(plan.channel_col))
            flag(np.asarray(pc.fill_null(pc.equal(pc.utf8_length(ch), 0), True)), plan.channel_col, "empty channel")
            cols["_ch"] = ch
        for key, name in (("_g", plan.gain), ("_w", plan.cost)):
            if name is None:
                cols[key] = np.ones(n, dtype=np.float64)
                continue
            v = _numeric(raw.column(name))
            flag(~np.isfinite(v), name, "not a finite number")
            if key == "_w":
                flag(np.isfinite(v) & (v < 0), name, "negative cost")
            cols[key] = v
        if plan.propensity:
            p = _numeric(raw.column(plan.propensity))
            flag(~np.isfinite(p) | (p < 0) | (p > 1), plan.propensity, "not a probability in [0, 1]")
            cols["_p"] = p
        else:
            cols["_p"] = np.full(n, np.nan)
        for i, c in enumerate(plan.step_numeric):
            v = _numeric(raw.column(c))
            flag(~np.isfinite(v), c, "not a finite number")
            cols[f"q{i}"] = v
        for i, c in enumerate(plan.step_hashed):
            cols[f"q{len(plan.step_numeric) + i}"] = _hash01(_as_string(raw.column(c)))
        for i, c in enumerate(plan.user_numeric):
            v = _numeric(raw.column(c))
            flag(~np.isfinite(v), c, "not a finite number")
            cols[f"u{i}"] = v
        for i, c in enumerate(plan.categorical):
            cols[f"k{i}"] = pc.fill_null(_as_string(raw.column(c)), "")

        flag(self._duplicates(raw), "duplicate_row", "duplicate of an earlier row (every column equal)")
        good = first_bad < 0
        table = pa.table({k: (v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v)) for k, v in cols.items()})
        bad_idx = np.flatnonzero(~good)
        if bad_idx.size:
            table = table.filter(pa.array(good))
        return Chunk(table, bad_idx, [fields[first_bad[i]] for i in bad_idx], [problems[first_bad[i]] for i in bad_idx], raw)


class KuaiRandSequence(Converter):
    source = "kuairand-sequence"
    fixed_channels = KUAI_CHANNELS

    def plan(self, columns: list[str]) -> Plan:
        gain = self.spec.gain or "is_click"
        if gain not in ("is_click", "long_view"):
            raise DataError(f"source {self.source}: gain must be is_click or long_view, got {gain!r}")
        onehot = sorted(c for c in columns if c.startswith("onehot_feat"))
        self._require(columns, ["user_id", "hourmin", "time_ms", gain, *KUAI_CHANNELS, *KUAI_USER])
        if not onehot:
            raise DataError(f"{self.spec.input}: missing column(s) onehot_feat* for source {self.source}")
        # long_view / play_time_ms are outcomes of the exposure at t: never in the state (leak).
        return Plan(uid="user_id", time=None, gain=gain, cost=None,
                    channel_onehot=[(c, c) for c in KUAI_CHANNELS], step_numeric=["hourmin", "time_ms"],
                    user_numeric=[*KUAI_USER, *sorted(onehot, key=lambda c: int(c[len("onehot_feat"):] or 0))])


class CriteoSequence(Converter):
    source = "criteo-sequence"

    def plan(self, columns: list[str]) -> Plan:
        gain = self.spec.gain or "conversion"
        if gain not in CRITEO_GAINS:
            raise DataError(f"source {self.source}: gain must be one of {', '.join(CRITEO_GAINS)}, got {gain!r}")
        types = [c for c in columns if c.startswith("Type_")]
        self._require(columns, ["uid", "campaign", gain, "cost", *CRITEO_CATS])
        if len(types) < 2:
            raise DataError(f"{self.spec.input}: missing column(s) Type_<id> (need at least 2 channel columns) for source {self.source}")
        self.fixed_channels = [c[len("Type_"):] for c in types]
        # conversion, attribution, click, click_nb, cpo are outcomes: excluded from the state.
        return Plan(uid="uid", time=None, gain=gain, cost="cost", channel_onehot=[(c, c[len("Type_"):]) for c in types],
                    step_numeric=list(CRITEO_SEQUENCE_STATE))


class CriteoAttribution(Converter):
    source = "criteo-attribution"
    delimiter = "\t"
    drop_unknown_channel = "channel_not_in_top_k"

    def plan(self, columns: list[str]) -> Plan:
        gain = self.spec.gain or "conversion"
        if gain not in CRITEO_GAINS:
            raise DataError(f"source {self.source}: gain must be one of {', '.join(CRITEO_GAINS)}, got {gain!r}")
        self._require(columns, ["timestamp", "uid", "campaign", gain, "cost", "time_since_last_click", *CRITEO_CATS])
        return Plan(uid="uid", time="timestamp", gain=gain, cost="cost", channel_col="campaign",
                    step_numeric=["time_since_last_click"], step_hashed=list(CRITEO_CATS))

    def channels(self, all_counts: dict[str, int], train_counts: dict[str, int]) -> list[str]:
        ranked = sorted(all_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [k for k, _ in ranked[: self.spec.top_k_channels]]


class Journeys(Converter):
    source = "journeys"

    def plan(self, columns: list[str]) -> Plan:
        f = self.spec.journeys
        gain = self.spec.gain or f.gain_col
        need = [f.user_col, f.time_col, f.channel_col, gain, f.cost_col, *f.numeric_features,
                *f.categorical_features, *f.user_features]
        if f.propensity_col:
            need.append(f.propensity_col)
        self._require(columns, need)
        return Plan(uid=f.user_col, time=f.time_col, gain=gain, cost=f.cost_col, channel_col=f.channel_col,
                    propensity=f.propensity_col, step_numeric=list(f.numeric_features),
                    categorical=list(f.categorical_features), user_numeric=list(f.user_features))


CONVERTERS: dict[str, type[Converter]] = {c.source: c for c in (KuaiRandSequence, CriteoSequence, CriteoAttribution, Journeys)}


def make_converter(spec: Any) -> Converter:
    try:
        return CONVERTERS[spec.source](spec)
    except KeyError:
        raise DataError(f"unknown source {spec.source!r}; one of {', '.join(CONVERTERS)}") from None


# ----------------------------------------------------------------------------- duplicate rows

class SeenHashes:
    """The 64-bit hashes seen so far, as sorted uint64 runs: 8 bytes per distinct hash, where a Python set
    of ints costs about 90 (prepare's peak memory grew with the input by that much: BENCHMARKS.md).

    ``add(h)`` flags each hash seen before (in an earlier call or earlier in ``h``) and keeps the others as
    a new run; a run merges into the one before while that one is at most twice its size and the merged
    run stays within ``max_run`` hashes (32 MiB by default), so there are about n / max_run +
    log2(max_run / batch) runs to search, a merge (a stable sort of two sorted runs: linear) never holds
    more than twice ``max_run`` at once, and nothing else grows with the input.
    """

    def __init__(self, max_run: int = 1 << 22) -> None:
        self.runs: list[np.ndarray] = []
        self.max_run = max_run

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def add(self, hashes: np.ndarray) -> np.ndarray:
        h = np.asarray(hashes, dtype=np.uint64)
        dup = np.zeros(len(h), dtype=bool)
        for run in self.runs:
            i = np.minimum(np.searchsorted(run, h), len(run) - 1)
            dup |= run[i] == h
        fresh = np.flatnonzero(~dup)
        new, first = np.unique(h[fresh], return_index=True)  # sorted; the first occurrence of each
        later = np.ones(len(fresh), dtype=bool)
        later[first] = False
        dup[fresh[later]] = True  # repeats within this batch
        if len(new):
            self.runs.append(new)
            while (len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1])
                   and len(self.runs[-2]) + len(self.runs[-1]) <= self.max_run):
                merged = np.concatenate((self.runs.pop(-2), self.runs.pop()))  # disjoint sorted runs
                merged.sort(kind="stable")  # in place: two sorted runs merge in linear time
                self.runs.append(merged)
        return dup



# ----------------------------------------------------------------------------- value parsing

def _row_hashes(raw: pa.Table) -> np.ndarray:
    """A 64-bit hash of every row over all its columns (uint64, (N,))."""
    return pd.util.hash_pandas_object(raw.to_pandas(), index=False).to_numpy()


def _as_string(col: Any) -> pa.Array:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    if pa.types.is_floating(col.type):  # 2.0 -> "2" so float-typed ids match their integer spelling
        v = col.to_numpy(zero_copy_only=False)
        whole = np.isfinite(v) & (v == np.round(v))
        return pa.array([str(int(x)) if w else str(x) for x, w in zip(v, whole)], type=pa.string())
    return pc.cast(col, pa.string())


def _numeric(col: Any, allow_time: bool = False) -> np.ndarray:
    """float64 values; NaN for anything that is not a number (text, empty, null)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return pc.cast(pc.cast(col, pa.timestamp("us")), pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return pc.fill_null(pc.cast(col, pa.float64()), float("nan")).to_numpy(zero_copy_only=False)
    s = pc.cast(col, pa.string())
    try:
        return pc.fill_null(pc.cast(s, pa.float64()), float("nan")).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    v = pd.to_numeric(pd.Series(s.to_numpy(zero_copy_only=False), dtype=object), errors="coerce").to_numpy(dtype=np.float64, copy=True)
    if allow_time:
        miss = np.isnan(v)
        if miss.any():
            ts = pd.to_datetime(pd.Series(s.to_numpy(zero_copy_only=False))[miss], errors="coerce", utc=True, format="ISO8601")
            us = (ts - pd.Timestamp("1970-01-01", tz="UTC")) / pd.Timedelta(microseconds=1)
            v[miss] = us.to_numpy(dtype=np.float64, na_value=np.nan)
    return v


def _flag01(col: Any) -> np.ndarray:
    """0/1 for 0/1/true/false flags (any case), NaN otherwise."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        v = _numeric(col)
        return np.where((v == 0) | (v == 1), v, np.nan)
    low = pc.utf8_lower(pc.utf8_trim_whitespace(col))
    ones = np.asarray(pc.fill_null(pc.is_in(low, value_set=pa.array(sorted(_TRUE))), False))
    zeros = np.asarray(pc.fill_null(pc.is_in(low, value_set=pa.array(sorted(_FALSE))), False))
    return np.where(ones, 1.0, np.where(zeros, 0.0, np.nan))


def _hash01(s: pa.Array) -> np.ndarray:
    """A stable hash of each string into [0, 1) (same value -> same number, across runs and machines)."""
    h = pd.util.hash_array(np.asarray(s.to_numpy(zero_copy_only=False), dtype=object))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def hash_partition(uids: pa.Array, n: int) -> np.ndarray:
    """Partition of each user id in [0, n): a stable hash, so a user's rows all land in one partition."""
    if n <= 1:
        return np.zeros(len(uids), dtype=np.int64)
    h = pd.util.hash_array(np.asarray(uids.to_numpy(zero_copy_only=False), dtype=object))
    return (h % np.uint64(n)).astype(np.int64)
