"""Packing consecutive users into Parquet shards of bounded size (prepare's splits, the simulator's output)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa


class UserPacker:
    """Buffers consecutive users and hands shards of at most ``max_size`` (steps) to ``write(table, users,
    size)``; a user is never split, and a user larger than a shard goes alone."""

    def __init__(self, max_size: int, write: Callable[[pa.Table, int, int], None]) -> None:
        self.max_size, self.write = max_size, write
        self.pending: list[pa.Table] = []
        self.pending_size = self.pending_users = 0

    def add(self, sizes: np.ndarray, take: Callable[[int, int], pa.Table]) -> None:
        """``sizes`` (U,): the size of each of U consecutive users; ``take(first, n)``: the rows of users
        ``first .. first + n - 1``."""
        u0, n = 0, len(sizes)
        while u0 < n:
            cum = np.cumsum(sizes[u0:])
            k = int(np.searchsorted(cum, self.max_size - self.pending_size, side="right"))  # whole users that fit
            if k == 0:
                if self.pending_users:
                    self.flush()
                    continue
                k = 1  # larger than a shard: alone
            self.pending.append(take(u0, k))
            self.pending_size += int(cum[k - 1])
            self.pending_users += k
            u0 += k
            if self.pending_size >= self.max_size:
                self.flush()

    def flush(self) -> None:
        if not self.pending_users:
            return
        table, users, size = pa.concat_tables(self.pending), self.pending_users, self.pending_size
        self.pending, self.pending_size, self.pending_users = [], 0, 0
        self.write(table, users, size)
