"""Converters on small fixtures generated here: columns, bad rows (error and quarantine), ordering."""

from __future__ import annotations

import gzip
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtorl.data.converters import KUAI_USER
from mtorl.data.errors import DataError
from mtorl.data.prepare import prepare
from mtorl.spec.models import JourneysFormat, PrepareSpec

KUAI_COLS = ["", "user_id", "hourmin", "time_ms", "is_click", "long_view", "play_time_ms", "short", "mid", "long",
             *KUAI_USER, "onehot_feat0", "onehot_feat1"]
CRITEO_TYPES = ["Type_11", "Type_22", "Type_33"]
CRITEO_COLS = ["", "uid", "campaign", "conversion", "attribution", "click", "click_nb", "cost", "cpo",
               *[f"cat{i}" for i in range(1, 10)], *CRITEO_TYPES]
ATTR_COLS = [
    "timestamp",
    "uid",
    "campaign",
    "conversion",
    "conversion_timestamp",
    "conversion_id",
    "attribution",
    "click",
    "click_pos",
    "click_nb",
    "cost",
    "cpo",
    "time_since_last_click",
    *[f"cat{i}" for i in range(1, 10)],
]


def write_table(path: Path, cols: list[str], rows: list[list[Any]], sep: str = ",") -> Path:
    text = sep.join(cols) + "\n" + "".join(sep.join(str(v) for v in r) + "\n" for r in rows)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def kuai_rows(n_users: int = 30, seed: int = 0) -> list[list[Any]]:
    rng = random.Random(seed)
    rows, i = [], 0
    for u in range(n_users):
        T = 1 + (u % 6)  # users with 1 step are short journeys (min_steps 2)
        for t in range(T):
            ch = [0, 0, 0]
            ch[rng.randrange(3)] = 1
            rows.append(
                [
                    i,
                    f"{u}.0",
                    rng.random(),
                    (t + 1) / 10,
                    rng.randint(0, 1),
                    rng.randint(0, 1),
                    rng.random(),
                    *ch,
                    *[u % 2] * len(KUAI_USER),
                    u / n_users,
                    0.5,
                ]
            )
            i += 1
    return rows


def criteo_rows(n_users: int = 20, seed: int = 0) -> list[list[Any]]:
    """Users interleaved (not contiguous); the index column increases (time order)."""
    rng = random.Random(seed)
    per_user = {u: 2 + u % 4 for u in range(n_users)}
    order = [u for u, T in per_user.items() for _ in range(T)]
    rng.shuffle(order)
    rows = []
    for i, u in enumerate(order):
        types = ["False"] * 3
        types[rng.randrange(3)] = "True"
        rows.append([i * 3, 1000 + u, rng.random(), rng.randint(0, 1), 0, 1, -1, rng.random() / 10, 0.5,
                     *[rng.random() for _ in range(9)], *types])
    return rows


def attribution_rows(n_users: int = 25, seed: int = 0) -> list[list[Any]]:
    """Campaigns 7 (most rows), 8, 9 (few); rows shuffled so time order must be restored."""
    rng = random.Random(seed)
    rows = []
    for u in range(n_users):
        for t in range(2 + u % 3):
            camp = [7, 7, 7, 8, 8, 9][rng.randrange(6)]
            rows.append([1000 * u + 10 * t, 500 + u, camp, rng.randint(0, 1), -1, -1, 0, 0, -1, -1, rng.random(), 0.1,
                         t * 2.5, *[rng.randrange(10**6) for _ in range(9)]])
    rng.shuffle(rows)
    return rows


def journeys_rows(n_users: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for u in range(n_users):
        for t in range(3 + u % 3):
            out.append(
                {
                    "user_id": f"u{u}",
                    "timestamp": 100 - t,
                    "channel": rng.choice(["email", "search", "social"]),
                    "gain": float(rng.randint(0, 1)),
                    "cost": rng.random(),
                    "device": rng.choice(["ios", "android"]),
                    "price": rng.random() * 10,
                    "age": 20.0 + u,
                }
            )
    rng.shuffle(out)
    return out


JFMT = JourneysFormat(numeric_features=["price"], categorical_features=["device"], user_features=["age"])


def spec(tmp_path: Path, source: str, inp: Path, **kw: Any) -> PrepareSpec:
    return PrepareSpec(source=source, input=str(inp), output=str(tmp_path / "ds"), **kw)


def quiet(_: str) -> None:
    pass


def _invariant(m: dict[str, Any]) -> None:
    assert m.rows_read == m.rows_written + sum(m.rows_dropped.values())
    assert m.rows_written == sum(s.steps for s in m.splits.values())


# ----------------------------------------------------------------------------- kuairand

def test_kuairand_fixture(tmp_path: Path) -> None:
    rows = kuai_rows()
    inp = write_table(tmp_path / "k.csv.gz", KUAI_COLS, rows)
    m = prepare(spec(tmp_path, "kuairand-sequence", inp), progress=quiet)
    _invariant(m)
    assert m.rows_read == len(rows)
    assert m.channels == ["short", "mid", "long"]
    assert m.step_features == ["hourmin", "time_ms"]  # no long_view / play_time_ms: outcomes (leak)
    assert "long_view" not in m.user_features and "play_time_ms" not in m.user_features
    assert m.user_features == [*KUAI_USER, "onehot_feat0", "onehot_feat1"]
    assert m.rows_dropped == {"short_journey": 5} and m.users_dropped == 5 and m.users_read == 30
    assert m.gain_binary is True and m.cost == "1 per exposure"
    t = pq.read_table(tmp_path / "ds" / m.splits["train"].shards[0].path)
    row = t.slice(0, 1).to_pylist()[0]
    T = row["length"]
    assert (
        len(row["channel"]) == T
        and len(row["features"]) == 2 * T
        and len(row["user_features"]) == len(m.user_features)
    )
    assert row["cost"] == [1.0] * T
    assert np.isnan(row["propensity"]).all()
    # file order kept: time_ms (t + 1) / 10 increases within a user
    tm = np.array(row["features"]).reshape(T, 2)[:, 1]
    assert (np.diff(tm) > 0).all()


@pytest.mark.parametrize("col,value,field", [
    ("hourmin", "nan", "hourmin"), ("time_ms", "inf", "time_ms"), ("is_click", "abc", "is_click"),
    ("onehot_feat0", "", "onehot_feat0"), ("short", "yes please", "short"),
])
def test_kuairand_bad_values(tmp_path: Path, col: str, value: str, field: str) -> None:
    rows = kuai_rows()
    rows[7][KUAI_COLS.index(col)] = value
    inp = write_table(tmp_path / "k.csv", KUAI_COLS, rows)
    with pytest.raises(DataError) as e:
        prepare(spec(tmp_path, "kuairand-sequence", inp), progress=quiet)
    msg = str(e.value)
    assert "k.csv" in msg and "row 8" in msg and repr(field) in msg, msg
    m = prepare(spec(tmp_path, "kuairand-sequence", inp, on_bad_rows="quarantine"), progress=quiet)
    _invariant(m)
    assert m.rows_dropped[f"bad_row:{field}"] == 1
    q = pq.read_table(tmp_path / "ds" / m.quarantine.files[0])
    assert q.num_rows == 1 and q.column("_row").to_pylist() == [8] and q.column(col).to_pylist() == [value]


@pytest.mark.parametrize("flags,problem", [((0, 0, 0), "no channel"), ((1, 1, 0), "several channels")])
def test_kuairand_channel_count(tmp_path: Path, flags: tuple[int, int, int], problem: str) -> None:
    rows = kuai_rows()
    for k, c in zip(flags, ("short", "mid", "long")):
        rows[3][KUAI_COLS.index(c)] = k
    inp = write_table(tmp_path / "k.csv", KUAI_COLS, rows)
    with pytest.raises(DataError, match=f"row 4 .*'channel': {problem}"):
        prepare(spec(tmp_path, "kuairand-sequence", inp), progress=quiet)
    m = prepare(spec(tmp_path, "kuairand-sequence", inp, on_bad_rows="quarantine"), progress=quiet)
    _invariant(m)
    assert m.rows_dropped["bad_row:channel"] == 1 and m.quarantine.rows == 1


def test_missing_columns_named(tmp_path: Path) -> None:
    cols = [c for c in KUAI_COLS if c not in ("mid", "hourmin")]
    rows = [[v for c, v in zip(KUAI_COLS, r) if c not in ("mid", "hourmin")] for r in kuai_rows()]
    inp = write_table(tmp_path / "k.csv", cols, rows)
    with pytest.raises(DataError, match=r"k\.csv: missing column\(s\) hourmin, mid"):
        prepare(spec(tmp_path, "kuairand-sequence", inp), progress=quiet)


# ----------------------------------------------------------------------------- criteo-sequence

def test_criteo_sequence_non_contiguous(tmp_path: Path) -> None:
    rows = criteo_rows()
    inp = write_table(tmp_path / "c.csv.gz", CRITEO_COLS, rows)
    m = prepare(spec(tmp_path, "criteo-sequence", inp, spill_partitions=3), progress=quiet)
    _invariant(m)
    assert m.channels == ["11", "22", "33"] and m.users_read == 20 and m.rows_written == len(rows)
    # cat8 is the channel: excluded
    assert m.step_features == ["campaign", *[f"cat{i}" for i in (1, 2, 3, 4, 5, 6, 7, 9)]]
    got = {}
    for split in m.splits.values():
        for s in split.shards:
            for r in pq.read_table(tmp_path / "ds" / s.path).to_pylist():
                got[r["user_id"]] = r
    # each user's steps in file order, taken from anywhere in the file
    for u in range(20):
        mine = [r for r in rows if r[1] == 1000 + u]
        r = got[str(1000 + u)]
        np.testing.assert_allclose(r["features"][::9], [x[2] for x in mine], rtol=1e-6)
        np.testing.assert_allclose(r["gain"], [x[3] for x in mine])
        assert r["channel"] == [x[-3:].index("True") for x in mine]


def test_criteo_gain_choice(tmp_path: Path) -> None:
    inp = write_table(tmp_path / "c.csv", CRITEO_COLS, criteo_rows())
    m = prepare(spec(tmp_path, "criteo-sequence", inp, gain="click"), progress=quiet)
    assert m.gain == "click" and m.reward_norm.model_dump() == {"min": 1.0, "max": 1.0}
    with pytest.raises(DataError, match="gain must be one of"):
        prepare(spec(tmp_path, "criteo-sequence", inp, gain="cpo"), progress=quiet)


def test_criteo_bad_bool(tmp_path: Path) -> None:
    rows = criteo_rows()
    rows[5][CRITEO_COLS.index("Type_22")] = "maybe"
    rows[9][CRITEO_COLS.index("cost")] = "-inf"
    inp = write_table(tmp_path / "c.csv", CRITEO_COLS, rows)
    with pytest.raises(DataError, match="row 6 .*'Type_22'"):
        prepare(spec(tmp_path, "criteo-sequence", inp), progress=quiet)
    m = prepare(spec(tmp_path, "criteo-sequence", inp, on_bad_rows="quarantine"), progress=quiet)
    _invariant(m)
    assert m.rows_dropped["bad_row:Type_22"] == 1 and m.rows_dropped["bad_row:cost"] == 1


# ----------------------------------------------------------------------------- criteo-attribution

def test_criteo_attribution_top_k_and_time_order(tmp_path: Path) -> None:
    rows = attribution_rows()
    inp = write_table(tmp_path / "a.tsv.gz", ATTR_COLS, rows, sep="\t")
    m = prepare(
        spec(tmp_path, "criteo-attribution", inp, top_k_channels=2, min_steps=1, chunk_rows=1000, spill_partitions=4),
        progress=quiet,
    )
    _invariant(m)
    assert m.channels == ["7", "8"]
    assert m.rows_dropped.get("channel_not_in_top_k") == sum(1 for r in rows if r[2] == 9)
    assert m.step_features == ["time_since_last_click", *[f"cat{i}" for i in range(1, 10)]]
    for split in m.splits.values():
        for s in split.shards:
            for r in pq.read_table(tmp_path / "ds" / s.path).to_pylist():
                f = np.array(r["features"]).reshape(r["length"], 10)
                assert (np.diff(f[:, 0]) > 0).all()  # time_since_last_click = 2.5 t: time order restored
                assert ((f[:, 1:] >= 0) & (f[:, 1:] < 1)).all()  # hashed categorical ids in [0, 1)


def test_criteo_attribution_missing_column(tmp_path: Path) -> None:
    cols = [c for c in ATTR_COLS if c != "timestamp"]
    rows = [r[1:] for r in attribution_rows()]
    inp = write_table(tmp_path / "a.tsv.gz", cols, rows, sep="\t")
    with pytest.raises(DataError, match=r"a\.tsv\.gz: missing column\(s\) timestamp"):
        prepare(spec(tmp_path, "criteo-attribution", inp), progress=quiet)


# ----------------------------------------------------------------------------- journeys

@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_journeys_csv_and_parquet(tmp_path: Path, fmt: str) -> None:
    rows = journeys_rows()
    if fmt == "csv":
        inp = write_table(tmp_path / "j.csv", list(rows[0]), [list(r.values()) for r in rows])
    else:
        inp = tmp_path / "j.parquet"
        pq.write_table(pa.Table.from_pylist(rows), inp)
    m = prepare(spec(tmp_path, "journeys", inp, journeys=JFMT), progress=quiet)
    _invariant(m)
    assert m.channels == ["email", "search", "social"]
    assert m.categorical == {"device": ["android", "ios"]}
    assert m.step_features == ["price", "device=android", "device=ios"] and m.user_features == ["age"]
    assert m.journeys_format["categorical_features"] == ["device"]
    for split in m.splits.values():
        for s in split.shards:
            for r in pq.read_table(tmp_path / "ds" / s.path).to_pylist():
                mine = sorted((x for x in rows if x["user_id"] == r["user_id"]), key=lambda x: x["timestamp"])
                f = np.array(r["features"]).reshape(r["length"], 3)
                np.testing.assert_allclose(f[:, 0], [x["price"] for x in mine], rtol=1e-5)
                np.testing.assert_array_equal(f[:, 2], [x["device"] == "ios" for x in mine])
                assert r["channel"] == [m.channels.index(x["channel"]) for x in mine]
                assert r["user_features"] == [mine[0]["age"]]


def test_journeys_directory_of_shards(tmp_path: Path) -> None:
    """A directory (or S3 prefix) of shards is one input, read file by file; other files are ignored."""
    rows = journeys_rows()
    d = tmp_path / "logs"
    d.mkdir()
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), d / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:]), d / "part-00001.parquet")
    (d / "simulation.json").write_text("{}")
    m = prepare(spec(tmp_path, "journeys", d, journeys=JFMT), progress=quiet)
    _invariant(m)
    assert m.rows_read == len(rows)
    whole = tmp_path / "w.parquet"
    pq.write_table(pa.Table.from_pylist(rows), whole)
    m2 = prepare(spec(tmp_path / "b", "journeys", whole, journeys=JFMT), progress=quiet)
    assert {k: v.steps for k, v in m.splits.items()} == {k: v.steps for k, v in m2.splits.items()}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        prepare(spec(tmp_path, "journeys", tmp_path / "empty", journeys=JFMT), progress=quiet)


def test_journeys_propensity_and_bad_rows(tmp_path: Path) -> None:
    rows = journeys_rows()
    for r in rows:
        r["prop"] = 0.25
    rows[2]["prop"] = 1.5
    rows[4]["channel"] = ""
    rows[6]["timestamp"] = "yesterday"
    inp = write_table(tmp_path / "j.csv", list(rows[0]), [list(r.values()) for r in rows])
    fmt = JFMT.model_copy(update={"propensity_col": "prop"})
    with pytest.raises(DataError, match="row 3 .*'prop'"):
        prepare(spec(tmp_path, "journeys", inp, journeys=fmt), progress=quiet)
    m = prepare(spec(tmp_path, "journeys", inp, journeys=fmt, on_bad_rows="quarantine"), progress=quiet)
    _invariant(m)
    assert m.has_propensity is True
    assert {k: v for k, v in m.rows_dropped.items() if k.startswith("bad_row")} == {
        "bad_row:prop": 1, "bad_row:channel": 1, "bad_row:timestamp": 1}
    q = pq.read_table(tmp_path / "ds" / m.quarantine.files[0])
    assert sorted(q.column("_row").to_pylist()) == [3, 5, 7]
