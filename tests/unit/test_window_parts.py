"""A worker's part of a small split, read by the worker itself: the same windows as the whole split cut in
memory, equal disjoint parts per rank, and a corrupt or missing shard named in one line (local files, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mtorl.data.errors import DataError
from mtorl.data.manifest import load_manifest
from mtorl.data.pipeline import check_shards, read_windows_part
from mtorl.data.windows import make_windows
from mtorl.evaluation.run import read_split
from mtorl.spec.models import WindowSpec
from tests.fixtures.shards import flip_a_byte, remove_a_shard, small_sharded_dataset

WINDOW = WindowSpec(length=4)


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    return small_sharded_dataset(tmp_path)


def _whole(dataset: str, split: str) -> dict[str, np.ndarray]:
    m = load_manifest(dataset)
    return make_windows(read_split(dataset, split, m), WINDOW.length, state_dim=m.state_dim)


def test_one_part_is_the_whole_split_cut_in_memory(dataset: str) -> None:
    m = load_manifest(dataset)
    assert len(m.splits["train"].shards) > 1
    whole, part = _whole(dataset, "train"), read_windows_part(dataset, "train", WINDOW, 0, 1, m)
    assert set(part) == set(whole) and len(whole["mask"]) > 10
    for k in whole:
        assert part[k].dtype == whole[k].dtype, k
        np.testing.assert_array_equal(part[k], whole[k])


@pytest.mark.parametrize("world", [2, 3])
def test_parts_are_equal_disjoint_and_interleaved(dataset: str, world: int) -> None:
    whole = _whole(dataset, "train")
    n = len(whole["mask"]) // world
    parts = [read_windows_part(dataset, "train", WINDOW, r, world) for r in range(world)]
    assert [len(p["mask"]) for p in parts] == [n] * world  # every rank runs the same number of steps
    for r, p in enumerate(parts):
        for k in whole:
            np.testing.assert_array_equal(p[k], whole[k][r::world][:n])


def test_a_corrupt_shard_is_one_line_naming_it(dataset: str) -> None:
    m = load_manifest(dataset)
    shard = flip_a_byte(dataset, m, "val", -1)
    with pytest.raises(DataError) as e:
        read_windows_part(dataset, "val", WINDOW, 0, 1, m)
    assert str(e.value).startswith(f"{shard}: sha256 mismatch") and "\n" not in str(e.value)


def test_a_missing_shard_is_one_line_naming_it(dataset: str) -> None:
    m = load_manifest(dataset)
    shard = remove_a_shard(dataset, m, "train", 1)
    with pytest.raises(DataError) as e:
        read_windows_part(dataset, "train", WINDOW, 0, 1, m)
    assert str(e.value) == f"{shard}: shard listed in the manifest is missing"
    with pytest.raises(DataError) as e:  # the driver's check before any worker starts
        check_shards(dataset, "train", m)
    assert str(e.value).startswith(f"{shard}: shard listed in the manifest is missing (1 of the train split's")
