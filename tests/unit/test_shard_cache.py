"""A worker's in-memory copy of its shard of a small split (later epochs skip the streaming start-up)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mtorl.training.worker import ShardCache


def _source(n: int, bs: int, calls: list[int]) -> Iterator[dict[str, np.ndarray]]:
    calls.append(1)
    for a in range(0, n, bs):
        ids = np.arange(a, min(a + bs, n))
        yield {"id": ids, "state": np.repeat(ids[:, None].astype(np.float32), 3, axis=1)}


def test_first_pass_streams_later_passes_come_from_memory_in_a_new_order() -> None:
    calls: list[int] = []
    cache = ShardCache(True)
    first = [b["id"] for b in cache.batches(lambda: _source(10, 4, calls), 4, shuffle_seed=1)]
    assert [len(x) for x in first] == [4, 4, 2] and cache.ready and len(calls) == 1
    second = list(cache.batches(lambda: _source(10, 4, calls), 4, shuffle_seed=2))
    third = np.concatenate([b["id"] for b in cache.batches(lambda: _source(10, 4, calls), 4, shuffle_seed=3)])
    assert len(calls) == 1  # the source is not read again
    ids = np.concatenate([b["id"] for b in second])
    assert sorted(ids.tolist()) == list(range(10)) and not np.array_equal(ids, third)  # every row once, reshuffled
    for b in second:  # rows stay whole
        assert np.array_equal(b["state"][:, 0], b["id"].astype(np.float32))
    unshuffled = np.concatenate([b["id"] for b in cache.batches(lambda: _source(10, 4, calls), 4)])
    assert unshuffled.tolist() == list(range(10))


def test_a_pass_stopped_early_keeps_nothing_and_disabled_never_keeps() -> None:
    calls: list[int] = []
    cache = ShardCache(True)
    for i, _ in enumerate(cache.batches(lambda: _source(10, 4, calls), 4)):
        if i == 1:
            break  # e.g. max_steps_per_epoch
    assert not cache.ready
    list(cache.batches(lambda: _source(10, 4, calls), 4))
    assert cache.ready and len(calls) == 2
    off = ShardCache(False)
    list(off.batches(lambda: _source(10, 4, calls), 4))
    list(off.batches(lambda: _source(10, 4, calls), 4))
    assert not off.ready and len(calls) == 4


def test_a_filled_cache_serves_every_pass_without_reading_the_source() -> None:
    calls: list[int] = []
    cache = ShardCache(False)
    ids = np.arange(7)
    cache.fill({"id": ids, "state": np.repeat(ids[:, None].astype(np.float32), 3, axis=1)})
    assert cache.ready
    for seed in (1, 2):
        got = np.concatenate([b["id"] for b in cache.batches(lambda: _source(7, 3, calls), 3, shuffle_seed=seed)])
        assert sorted(got.tolist()) == list(range(7))
    assert not calls  # the first pass came from memory too
    empty = ShardCache(False)
    empty.fill({})  # a worker's part with no windows: no batches, no error
    assert list(empty.batches(lambda: _source(7, 3, calls), 3, shuffle_seed=0)) == [] and not calls
