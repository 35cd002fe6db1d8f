"""Streaming evaluation: split batches, train-split statistics and metric accumulators (numpy + pyarrow).

Evaluation of a split too large to hold whole reads it shard by shard, in batches of whole users
(a user's journey is never split across batches, so the causal models and the history heuristics score
every batch exactly as they score the whole split). What it keeps:

* from TRAIN, only what evaluation needs: the heuristics' `HistoryPrior` (channel counts, outcome sum
  and count: sufficient statistics, exact) and the behaviour model's fitting rows (the same uniform
  subsample of at most ``max_behaviour`` steps that the in-memory path draws: its global row indices
  are drawn from the manifest's step count before the pass, so the fitted model is the same);
* from the evaluated split, per model:
  - exact sufficient statistics for every metric that has them (`MetricSums`): accuracy and macro
    precision / recall / F1 (a C x C confusion matrix), logloss, Brier, MSE, MAE, the calibration bins
    (ECE and the reliability table), mean prediction and outcome, base rate, user and step counts;
  - the per-step predictions of every user while the split has at most ``exact_max_steps`` steps: then
    every number of the report (AUC, Spearman, budget curve, OPE and its bootstrap) is computed from
    all of them and equals the in-memory path's;
  - above that, the predictions of a uniform random sample of USERS of about ``exact_max_steps`` steps
    (`UserSample`, seeded): the metrics that need all points (per-channel and reward AUC, Spearman,
    the budget curve, OPE values and intervals) are computed on that sample, and the report says so.
    Sampling error: a mean over m sampled steps of a quantity with standard deviation sd has standard
    error about sd / sqrt(m_eff), with m_eff the number of sampled USERS for per-user clustered
    quantities; an AUC estimated on m points with n_pos positives has standard error below
    sqrt(0.25 / min(n_pos, m - n_pos)) (Hanley and McNeil 1982, worst case), e.g. <= 0.0016 at
    100,000 positives. The budget curve prices the sample at its own logged cost (the budget is the
    same fraction of it).

Memory is bounded by one batch of users plus the sample (``exact_max_steps`` steps per compared row).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtorl import storage
from mtorl.data.errors import DataError
from mtorl.data.manifest import Manifest, parse_shard, read_shard_bytes
from mtorl.data.windows import Journey, journeys_from_table
from mtorl.evaluation.heuristics import HistoryPrior
from mtorl.evaluation.predictions import Predictions, outcome

__all__ = ["split_batches", "split_tables", "step_columns", "behaviour_features", "BatchScore", "TrainStats", "MetricSums", "UserSample", "BATCH_STEPS"]

BATCH_STEPS = 200_000  # steps per batch of whole users (a longer journey goes alone)


def split_batches(dataset_uri: str, manifest: Manifest, split: str, batch_steps: int = BATCH_STEPS,
                  shards: Sequence[int] | None = None) -> Iterator[list[Journey]]:
    """Journeys of one split in batches of whole users of about ``batch_steps`` steps, in split order.

    Shards are the manifest's (one version; ``shards``: only those, by index), read one at a time and checked
    against its sha256: a missing, altered or unreadable shard is a `DataError` naming the shard's URI.
    """
    for uri, table in split_tables(dataset_uri, manifest, split, shards):
        try:
            lengths = np.asarray(pc.list_value_length(table.column("channel")).to_numpy(zero_copy_only=False),
                                 dtype=np.int64)
        except (KeyError, pa.ArrowException) as e:
            raise DataError(f"{uri}: not a prepared shard ({' '.join(str(e).split())[:200]})") from None
        u0 = 0
        cum = np.cumsum(lengths)
        while u0 < len(lengths):
            before = int(cum[u0 - 1]) if u0 else 0
            u1 = max(u0 + 1, int(np.searchsorted(cum, before + batch_steps, side="right")))
            yield journeys_from_table(table.slice(u0, u1 - u0), manifest)
            u0 = u1
        del table


def split_tables(dataset_uri: str, manifest: Manifest, split: str,
                 shards: Sequence[int] | None = None) -> Iterator[tuple[str, pa.Table]]:
    """(URI, table) of each shard of a split (``shards``: only those, by index), checked against the manifest."""
    sp = manifest.split(dataset_uri, split)
    pairs = list(zip(sp.shards, manifest.shard_uris(dataset_uri, split)))
    for shard, uri in (pairs if shards is None else [pairs[i] for i in shards]):
        fs, path = storage.resolve(uri)
        yield uri, parse_shard(uri, read_shard_bytes(fs, path, uri), shard.sha256)


def step_columns(uri: str, table: pa.Table, manifest: Manifest, binary: bool) -> tuple[np.ndarray, np.ndarray]:
    """(channel (N,) int64, outcome y (N,) float64) of every step of a shard's table, computed as the
    journeys' (`journeys_from_table`, `outcome`) without building states."""
    from mtorl.data.windows import compute_reward

    try:
        flat = {k: pc.list_flatten(table.column(k)).to_numpy(zero_copy_only=False) for k in ("channel", "gain", "cost")}
    except (KeyError, pa.ArrowException) as e:
        raise DataError(f"{uri}: not a prepared shard ({' '.join(str(e).split())[:200]})") from None
    gain = np.asarray(flat["gain"], dtype=np.float32)
    if binary:
        y = (gain > 0).astype(np.float64)
    else:
        y = compute_reward(gain, np.asarray(flat["cost"], dtype=np.float32), manifest).astype(np.float64)
    return np.asarray(flat["channel"], dtype=np.int64), y


def behaviour_features(journeys: Sequence[Journey], n_channels: int) -> np.ndarray:
    """Context of the logging decision at t: s_t and one-hot(a_{t-1}) -> (N, D + C)."""
    rows = []
    for j in journeys:
        prev = np.zeros((j.length, n_channels), dtype=np.float32)
        if j.length > 1:
            prev[np.arange(1, j.length), j.channel[:-1]] = 1.0
        rows.append(np.concatenate([j.state, prev], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, n_channels))


@dataclass
class TrainStats:
    """What evaluation reads from TRAIN, accumulated batch by batch (see the module docstring).

    ``n_total``: the train split's step count (from the manifest), to draw the behaviour rows' global
    indices as the in-memory path does: all rows when n_total <= max_behaviour, else
    ``default_rng(seed).choice(n_total, max_behaviour, replace=False)``.
    """

    n_channels: int
    binary: bool
    n_total: int
    max_behaviour: int
    seed: int = 0
    collect: bool = True          # keep the behaviour rows (False: the prior's statistics only)
    counts: np.ndarray = field(init=False)
    y_sum: float = 0.0
    n: int = 0
    _keep: np.ndarray | None = field(init=False, default=None)          # sorted global indices to keep
    _rows: list[np.ndarray] = field(init=False, default_factory=list)
    _ch: list[np.ndarray] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.n_channels, dtype=np.int64)
        if self.n_total > self.max_behaviour:
            self._draw = np.random.default_rng(self.seed).choice(self.n_total, self.max_behaviour, replace=False)
            self._keep = np.sort(self._draw)

    def add_steps(self, ch: np.ndarray, y: np.ndarray) -> None:
        """The prior's statistics of some steps: channel (N,), outcome (N,) (see `step_columns`)."""
        self.counts += np.bincount(ch, minlength=self.n_channels)
        self.y_sum += float(y.sum())
        self.n += ch.size

    def add(self, journeys: Sequence[Journey]) -> None:
        if not journeys:
            return
        ch = np.concatenate([j.channel for j in journeys]).astype(np.int64)
        y = np.concatenate([(j.gain > 0).astype(np.float64) if self.binary else j.reward.astype(np.float64)
                            for j in journeys])
        lo, hi = self.n, self.n + ch.size
        self.add_steps(ch, y)
        if not self.collect:
            return
        X = behaviour_features(journeys, self.n_channels)
        if self._keep is None:
            self._rows.append(X)
            self._ch.append(ch)
        else:
            a, b = np.searchsorted(self._keep, [lo, hi])
            idx = self._keep[a:b] - lo
            self._rows.append(X[idx])
            self._ch.append(ch[idx])

    def prior(self, smoothing: float = 1.0) -> HistoryPrior:
        """The same `HistoryPrior` as `HistoryPrior.fit` over the whole split."""
        prior = (self.counts + smoothing) / (self.counts.sum() + smoothing * self.n_channels)
        return HistoryPrior(channel_prior=prior, rate=self.y_sum / self.n if self.n else 0.0)

    def behaviour_rows(self, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(X, c): the behaviour model's fitting rows, in the in-memory path's order."""
        if not self.collect:
            raise ValueError("TrainStats(collect=False) keeps no behaviour rows")
        if self.n != self.n_total:
            raise DataError(f"{where}: the manifest lists {self.n_total} train steps, its shards hold {self.n}")
        X = np.concatenate(self._rows) if self._rows else np.zeros((0, self.n_channels))
        c = np.concatenate(self._ch) if self._ch else np.zeros(0, dtype=np.int64)
        if self._keep is not None:
            pos = np.searchsorted(self._keep, self._draw)     # sorted position of each drawn index
            X, c = X[pos], c[pos]
        return X, c


class MetricSums:
    """Exact sufficient statistics of the metrics that have them (`metrics.channel_metrics`,
    `metrics.reward_metrics`), accumulated over batches of one row of the report."""

    def __init__(self, n_channels: int, binary: bool, n_bins: int = 10) -> None:
        self.c, self.binary, self.n_bins = n_channels, binary, n_bins
        self.confusion = np.zeros((n_channels, n_channels), dtype=np.int64)   # [true, predicted]
        self.bins = np.zeros((3, n_bins))                                       # count, sum y, sum p
        self.s = dict.fromkeys(("n", "y", "p", "logloss", "brier", "se", "ae"), 0.0)
        self.users = 0

    def add(self, p: Predictions) -> None:
        from mtorl.evaluation.metrics import _EPS, logged_reward_pred

        pred = np.argmax(p.action_probs, axis=1)
        self.confusion += np.bincount(p.channel * self.c + pred, minlength=self.c * self.c).reshape(self.c, self.c)
        r = logged_reward_pred(p)
        y = outcome(p)
        s = self.s
        s["n"] += y.size
        s["y"] += float(y.sum())
        self.users += p.n_users
        if self.binary:
            prob = np.clip(r, _EPS, 1 - _EPS)
            s["p"] += float(prob.sum())
            s["logloss"] += float(-(y * np.log(prob) + (1 - y) * np.log(1 - prob)).sum())
            s["brier"] += float(((y - prob) ** 2).sum())
            b = np.minimum((prob * self.n_bins).astype(np.int64), self.n_bins - 1)
            for k, w in enumerate((None, y, prob)):
                self.bins[k] += np.bincount(b, weights=w, minlength=self.n_bins)
        else:
            s["p"] += float(r.sum())
            s["se"] += float(((y - r) ** 2).sum())
            s["ae"] += float(np.abs(y - r).sum())

    def merge(self, other: "MetricSums") -> None:
        """Add another batch's sums."""
        self.confusion += other.confusion
        self.bins += other.bins
        for k, v in other.s.items():
            self.s[k] += v
        self.users += other.users

    def channel(self) -> dict[str, float]:
        """accuracy and macro precision / recall / F1 (sklearn's: labels in truth or prediction, zero_division=0)."""
        m = self.confusion
        tp = np.diag(m).astype(np.float64)
        true, predicted = m.sum(axis=1).astype(np.float64), m.sum(axis=0).astype(np.float64)
        labels = (true > 0) | (predicted > 0)
        prec = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        rec = np.divide(tp, true, out=np.zeros_like(tp), where=true > 0)
        f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(tp), where=(prec + rec) > 0)
        mean = lambda a: float(a[labels].mean()) if labels.any() else 0.0  # noqa: E731
        n = m.sum()
        return {"accuracy": float(tp.sum() / n) if n else 0.0, "macro_f1": mean(f1),
                "macro_precision": mean(prec), "macro_recall": mean(rec)}

    def reward(self) -> dict[str, Any]:
        s, n = self.s, self.s["n"]
        if not n:
            return {}
        out: dict[str, Any] = {"mean_pred": s["p"] / n, "mean_outcome": s["y"] / n}
        if self.binary:
            cnt, sy, sp = self.bins
            nz = cnt > 0
            frac = np.where(nz, sy / np.maximum(cnt, 1), np.nan)
            mp = np.where(nz, sp / np.maximum(cnt, 1), np.nan)
            none = lambda a: [None if np.isnan(v) else float(v) for v in a]  # noqa: E731
            out.update({"logloss": s["logloss"] / n, "brier": s["brier"] / n,
                        "ece": float(np.sum(cnt[nz] / n * np.abs(frac[nz] - mp[nz]))),
                        "reliability": {"bin_centers": [float((i + 0.5) / self.n_bins) for i in range(self.n_bins)],
                                        "mean_pred": none(mp), "frac_pos": none(frac),
                                        "counts": [int(v) for v in cnt]}})
        else:
            out.update({"mse": s["se"] / n, "mae": s["ae"] / n})
        return out

    def apply(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result`` (an `evaluate_predictions` bundle of a sample) with the exact statistics put in."""
        result["channel"].update(self.channel())
        result["reward"].update(self.reward())
        result["n_steps"], result["n_users"] = int(self.s["n"]), int(self.users)
        result["base_rate"] = self.s["y"] / self.s["n"] if self.s["n"] else None
        return result


@dataclass
class BatchScore:
    """One scored batch of whole users: ``sums`` {row: exact metric sums over all its steps}, ``parts`` {row:
    predictions of its sampled users}, ``features`` the sampled users' behaviour features (N, D + C) when a
    step of the batch has no logged propensity, else None."""

    users: int
    kept_users: int
    sums: dict[str, "MetricSums"]
    parts: dict[str, Predictions]
    features: np.ndarray | None


class UserSample:
    """A seeded uniform sample of users: a user is kept when a stable hash of (seed, user id) falls below
    ``rate``, so the sample is the same whatever the batches or their order (rate 1 keeps every user)."""

    def __init__(self, rate: float, seed: int = 0) -> None:
        self.rate = min(max(float(rate), 0.0), 1.0)
        self.seed = int(seed)
        self.kept_users = 0

    def keep(self, user_ids: Sequence[str]) -> np.ndarray:
        """(U,) bool: which of these users are kept."""
        if self.rate >= 1.0:
            k = np.ones(len(user_ids), dtype=bool)
        else:
            salt = f"{self.seed}:".encode()
            u = np.array([int.from_bytes(hashlib.blake2b(salt + str(x).encode(), digest_size=8).digest(), "little")
                          for x in user_ids], dtype=np.uint64)
            k = u < np.uint64(min(int(self.rate * 2.0**64), 2**64 - 1))
        self.kept_users += int(k.sum())
        return k
