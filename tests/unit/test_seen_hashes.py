"""Prepare's duplicate-row memory: the sorted-run hash set flags exactly what a Python set would."""

from __future__ import annotations

import numpy as np
import pytest

from mtorl.data.converters import SeenHashes


@pytest.mark.parametrize("max_run", [1 << 22, 600])
def test_flags_exactly_the_repeats_a_python_set_sees(max_run: int) -> None:
    rng = np.random.default_rng(0)
    pool = np.concatenate([rng.integers(0, 2**63, 3000, dtype=np.uint64) * np.uint64(2),
                           np.array([0, 2**64 - 1], dtype=np.uint64)])  # the extremes too
    seen, ref = SeenHashes(max_run), set()
    for size in [1, 7, 300, 0, 1000, 50, 2500, 5, 4000]:
        batch = rng.choice(pool, size=size)  # repeats within a batch and across batches
        want = np.zeros(size, dtype=bool)
        for i, x in enumerate(batch.tolist()):
            want[i] = x in ref
            ref.add(x)
        np.testing.assert_array_equal(seen.add(batch), want)
        assert len(seen) == len(ref)
        assert all(np.all(r[:-1] < r[1:]) for r in seen.runs)  # sorted, no repeats
    assert len(seen.runs) <= 6 if max_run > len(ref) else len(seen.runs) >= len(ref) // max_run  # merged as it grows
    assert max(len(r) for r in seen.runs) <= max(max_run, 4000)  # merged runs stay within max_run (one batch may not)
