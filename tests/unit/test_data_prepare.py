"""prepare: splits, train-only normalisation, shards, atomic re-publish, manifest_from, load_journeys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from mtorl.data import prepare as prep_mod
from mtorl.data.errors import DataError
from mtorl.data.manifest import load_manifest, manifest_sha256
from mtorl.data.prepare import load_journeys, prepare, prepare_with_manifest, split_of
from mtorl.spec.models import PrepareSpec, SplitSpec
from tests.unit.test_data_converters import (
    JFMT, KUAI_COLS, journeys_rows, kuai_rows, quiet, write_table,
)


def _kuai(tmp_path: Path, n_users: int = 60, name: str = "k.csv") -> Path:
    return write_table(tmp_path / name, KUAI_COLS, kuai_rows(n_users))


def _read_split(root: Path, m: dict[str, Any], split: str) -> list[dict[str, Any]]:
    return [r for s in m.splits[split].shards for r in pq.read_table(root / s.path).to_pylist()]


def test_split_is_stable_and_disjoint(tmp_path: Path) -> None:
    inp = _kuai(tmp_path)
    a = prepare(PrepareSpec(source="kuairand-sequence", input=str(inp), output=str(tmp_path / "a")), progress=quiet)
    b = prepare(
        PrepareSpec(source="kuairand-sequence", input=str(inp), output=str(tmp_path / "b"), shard_max_steps=100),
        progress=quiet,
    )
    users = {}
    for s in ("train", "val", "test"):
        ua = {r["user_id"] for r in _read_split(tmp_path / "a", a, s)}
        ub = {r["user_id"] for r in _read_split(tmp_path / "b", b, s)}
        assert ua == ub and len(ua) == a.splits[s].users
        users[s] = ua
        assert all(split_of(u, "mtorl", 0.8, 0.1) == s for u in ua)
    assert (
        not (users["train"] & users["val"])
        and not (users["train"] & users["test"])
        and not (users["val"] & users["test"])
    )
    assert a.normalization == b.normalization
    other = prepare(PrepareSpec(source="kuairand-sequence", input=str(inp), output=str(tmp_path / "c"),
                                splits=SplitSpec(salt="other")), progress=quiet)
    assert {r["user_id"] for r in _read_split(tmp_path / "c", other, "train")} != users["train"]


def test_normalisation_and_reward_range_fitted_on_train_only(tmp_path: Path) -> None:
    inp = _kuai(tmp_path)
    m = prepare(PrepareSpec(source="kuairand-sequence", input=str(inp), output=str(tmp_path / "ds"), penalty=0.3),
                progress=quiet)
    train = _read_split(tmp_path / "ds", m, "train")
    q = np.concatenate([np.array(r["features"], dtype=np.float64).reshape(r["length"], 2) for r in train])
    u = np.array([r["user_features"] for r in train], dtype=np.float64)
    want_mean = np.concatenate([q.mean(0), u.mean(0)])
    want_std = np.maximum(np.concatenate([q.std(0), u.std(0)]), 1e-6)
    np.testing.assert_allclose(m.normalization.mean, want_mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m.normalization.std, want_std, rtol=1e-4, atol=1e-7)
    g = np.concatenate([r["gain"] for r in train])
    r = g - 0.3  # cost 1 per exposure
    assert m.reward_norm.model_dump() == pytest.approx({"min": r.min(), "max": r.max()})
    everything = np.concatenate([np.array(x["features"]).reshape(x["length"], 2)
                                 for s in ("train", "val", "test") for x in _read_split(tmp_path / "ds", m, s)])
    assert not np.allclose(m.normalization.mean[:2], everything.mean(0), rtol=1e-7, atol=0)


def test_shards_bounded_and_hashed(tmp_path: Path) -> None:
    import hashlib

    inp = _kuai(tmp_path, n_users=200)
    m = prepare(
        PrepareSpec(source="kuairand-sequence", input=str(inp), output=str(tmp_path / "ds"), shard_max_steps=100),
        progress=quiet,
    )
    shards = m.splits["train"].shards
    assert len(shards) > 2
    for s in shards:
        data = (tmp_path / "ds" / s.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s.sha256
        t = pq.read_table(tmp_path / "ds" / s.path)
        assert t.num_rows == s.users and sum(t.column("length").to_pylist()) == s.steps <= 100
        assert s.path.startswith(m.version + "/train/part-")


def test_max_journey_length_cuts_in_the_same_split(tmp_path: Path) -> None:
    inp = _kuai(tmp_path)
    m = prepare(
        PrepareSpec(source="kuairand-sequence", input=str(inp), output=str(tmp_path / "ds"), max_journey_length=2),
        progress=quiet,
    )
    for s in ("train", "val", "test"):
        for r in _read_split(tmp_path / "ds", m, s):
            assert r["length"] <= 2
            assert split_of(r["user_id"].split("#")[0], "mtorl", 0.8, 0.1) == s
    assert m.rows_read == m.rows_written + sum(m.rows_dropped.values())


def test_no_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    with pytest.raises(
        DataError, match="no manifest.json at .*half: not a prepared dataset, or prepare did not finish"
    ):
        load_manifest(str(tmp_path / "half"))


def test_atomic_republish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inp = _kuai(tmp_path)
    out = tmp_path / "ds"
    sp = PrepareSpec(source="kuairand-sequence", input=str(inp), output=str(out))
    old = prepare(sp, progress=quiet)
    old_sha = manifest_sha256(str(out))

    # a re-prepare that dies just before the commit: the old manifest (and its shards) stay readable
    real = prep_mod.storage.write_json

    def crash(uri: str, obj: Any) -> None:
        assert load_manifest(str(out)).version == old.version  # readers still see the old version
        new_dir = out / obj["version"]
        for s in obj["splits"].values():  # the new version is complete before the swap
            for sh in s["shards"]:
                assert (out / sh["path"]).exists()
        assert new_dir.exists()
        raise OSError("killed before commit")

    monkeypatch.setattr(prep_mod.storage, "write_json", crash)
    with pytest.raises(OSError):
        prepare(sp, progress=quiet)
    monkeypatch.setattr(prep_mod.storage, "write_json", real)
    assert manifest_sha256(str(out)) == old_sha
    for s in old.splits.values():
        for sh in s.shards:
            assert (out / sh.path).exists()

    new = prepare(sp, progress=quiet)
    assert new.version != old.version and load_manifest(str(out)).version == new.version
    assert all(sh.path.startswith(new.version) for s in new.splits.values() for sh in s.shards)
    assert not list(out.glob(".tmp-*"))


def test_manifest_from_unknown_channel(tmp_path: Path) -> None:
    rows = journeys_rows()
    inp = write_table(tmp_path / "j.csv", list(rows[0]), [list(r.values()) for r in rows])
    base = prepare(
        PrepareSpec(source="journeys", input=str(inp), output=str(tmp_path / "ds"), journeys=JFMT, penalty=0.2),
        progress=quiet,
    )
    new_rows = journeys_rows(n_users=10, seed=3)
    new_rows[4]["channel"] = "tv"
    new_rows[1]["device"] = "windows"  # an unseen category: all-zero one-hot, not an error
    inp2 = write_table(tmp_path / "j2.csv", list(new_rows[0]), [list(r.values()) for r in new_rows])
    sp = PrepareSpec(source="journeys", input=str(inp2), output=str(tmp_path / "ds2"), journeys=JFMT,
                     manifest_from=str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"j2\.csv: row 5 .*channel 'tv' is not in the vocabulary"):
        prepare(sp, progress=quiet)
    m = prepare(sp.model_copy(update={"on_bad_rows": "quarantine"}), progress=quiet)
    assert m.rows_dropped["unknown_channel"] == 1 and m.quarantine.rows == 1
    assert m.channels == base.channels and m.normalization == base.normalization
    assert m.reward_norm == base.reward_norm and m.penalty == 0.2 and m.categorical == base.categorical
    q = pq.read_table(tmp_path / "ds2" / m.quarantine.files[0]).to_pylist()
    assert q[0]["channel"] == "tv" and q[0]["_row"] == 5

    # a checkpoint directory: meta.json carries the manifest
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "meta.json").write_text(json.dumps({"manifest": base.dump()}))
    js = load_journeys("journeys", str(inp), load_manifest(str(tmp_path / "ds")))
    _, js2 = prepare_with_manifest(sp.model_copy(update={"manifest_from": str(ck), "on_bad_rows": "quarantine"}),
                                   write=False, progress=quiet)
    assert sum(j.length for j in js) == len(rows) and len(js) == 20
    assert sum(j.length for j in js2) == len(new_rows) - 1
    j = js[0]
    assert j.state.shape == (j.length, 4) and j.state.dtype == np.float32 and ((0 <= j.reward) & (j.reward <= 1)).all()


def test_manifest_from_feature_mismatch(tmp_path: Path) -> None:
    rows = journeys_rows()
    inp = write_table(tmp_path / "j.csv", list(rows[0]), [list(r.values()) for r in rows])
    prepare(PrepareSpec(source="journeys", input=str(inp), output=str(tmp_path / "ds"), journeys=JFMT), progress=quiet)
    with pytest.raises(DataError, match="step_features"):
        prepare(PrepareSpec(source="journeys", input=str(inp), output=str(tmp_path / "ds2"),
                            journeys=JFMT.model_copy(update={"categorical_features": []}),
                            manifest_from=str(tmp_path / "ds")), progress=quiet)
    with pytest.raises(DataError, match="neither a prepared dataset"):
        prepare(PrepareSpec(source="journeys", input=str(inp), output=str(tmp_path / "ds3"), journeys=JFMT,
                            manifest_from=str(tmp_path / "nothing")), progress=quiet)


def test_progress_lines(tmp_path: Path) -> None:
    lines: list[str] = []
    prepare(PrepareSpec(source="kuairand-sequence", input=str(_kuai(tmp_path)), output=str(tmp_path / "ds")),
            progress=lines.append)
    assert any("rows/s" in x for x in lines) and any("committed" in x for x in lines)


def test_rows_bar_on_a_terminal_plain_lines_elsewhere(tmp_path: Path) -> None:
    """On a terminal prepare shows a rows-read bar (tqdm); anywhere else plain lines, no control characters."""
    import io

    from mtorl.console import Console

    inp = _kuai(tmp_path)
    tty = io.StringIO()
    prepare(PrepareSpec(source="kuairand-sequence", input=str(inp), output=str(tmp_path / "a")),
            progress=Console(tty, tty=True))
    assert "[prepare] rows read" in tty.getvalue() and "rows" in tty.getvalue() and "\r" in tty.getvalue()
    plain = io.StringIO()
    prepare(PrepareSpec(source="kuairand-sequence", input=str(inp), output=str(tmp_path / "b")),
            progress=Console(plain, tty=False))
    text = plain.getvalue()
    assert "[prepare] rows read" not in text and "\r" not in text and "\x1b" not in text and "[prepare] read " in text
