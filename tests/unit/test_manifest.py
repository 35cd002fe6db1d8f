"""The typed manifest: derived values, round trip, and one line naming the file and field when it is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mtorl.data.errors import DataError
from mtorl.data.manifest import Manifest, load_manifest

DOC: dict[str, Any] = {
    "schema_version": 1, "version": "v1", "channels": ["a", "b", "c"], "step_features": ["x", "dev=ios"],
    "user_features": ["age"], "categorical": {"dev": ["ios"]}, "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]},
    "reward_norm": {"min": 0.0, "max": 1.0}, "penalty": 0.5,
    "splits": {"train": {"users": 2, "steps": 7, "shards": [{"path": "v1/train/part-00000.parquet", "users": 2,
                                                             "steps": 7, "sha256": "ab"}]}},
}


def _write(tmp_path: Path, doc: Any) -> str:
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    return str(tmp_path)


def test_derived_values_and_round_trip(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path, {**DOC, "from_a_newer_mtorl": 1}))
    assert (m.state_dim, m.n_channels, m.onehot_features, m.gain_binary) == (3, 3, {"dev=ios"}, True)
    assert m.shard_uris("s3://b/ds", "train") == ["s3://b/ds/v1/train/part-00000.parquet"]
    assert m.dump()["from_a_newer_mtorl"] == 1  # kept, so a checkpoint's copy stays whole
    assert Manifest.parse(json.loads(json.dumps(m.dump())), "x") == m
    with pytest.raises(ValidationError, match="frozen"):
        m.channels = []  # type: ignore[misc]  # frozen


@pytest.mark.parametrize("edit, expect", [
    (lambda d: d.update(penalty="high"), r"manifest\.json: manifest field penalty: Input should be a valid number"),
    (lambda d: d["splits"]["train"].update(users=None), r"manifest field splits\.train\.users: "),
    (lambda d: d.pop("channels"), r"manifest\.json: manifest lacks channels$"),
    (lambda d: d.update(schema_version=9), r"manifest schema_version 9 is newer than this mtorl \(1\)$"),
])
def test_a_wrong_manifest_is_one_line_naming_the_field(tmp_path: Path, edit: Any, expect: str) -> None:
    doc = json.loads(json.dumps(DOC))
    edit(doc)
    with pytest.raises(DataError, match=expect) as e:
        load_manifest(_write(tmp_path, doc))
    assert "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path))


def test_no_split_names_the_splits() -> None:
    with pytest.raises(DataError, match=r"^s3://b/ds: no split 'val' \(have train\)$"):
        Manifest.parse(DOC, "x").shard_uris("s3://b/ds", "val")
