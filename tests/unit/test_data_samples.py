"""The shared samples through prepare: every row accounted for (skips when the samples are absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtorl.data.manifest import load_manifest
from mtorl.data.prepare import prepare
from mtorl.spec.models import PrepareSpec

pytestmark = pytest.mark.shared_data


@pytest.mark.parametrize("source,name,users,rows,channels", [
    ("kuairand-sequence", "kuairand_sequence.csv.gz", 4839, 100979, 3),
    ("criteo-sequence", "criteo_sequence.csv.gz", 6039, 88998, 11),
])
def test_sample(
    shared_data: Path, tmp_path: Path, source: str, name: str, users: int, rows: int, channels: int
) -> None:
    m = prepare(PrepareSpec(source=source, input=str(shared_data / name), output=str(tmp_path / "ds"), min_steps=1),
                progress=lambda _m: None)
    assert load_manifest(str(tmp_path / "ds")) == m
    assert m.users_read == users and m.rows_read == rows
    assert m.rows_read == m.rows_written + sum(m.rows_dropped.values())
    assert m.rows_written == rows and m.rows_dropped == {}
    assert sum(s.users for s in m.splits.values()) == users
    assert sum(s.steps for s in m.splits.values()) == rows
    assert len(m.channels) == channels and m.gain_binary
    assert 0.7 < m.splits["train"].users / users < 0.9
