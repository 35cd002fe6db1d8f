"""History heuristics: the honest floor of every comparison table (pure numpy, no model).

All of them read only the logged arrays of a split plus two numbers fitted on TRAIN
(`HistoryPrior`: the channel distribution and the outcome rate), and use, at step t, only the
user's steps before t.

    last_channel      pi_t = one-hot(a_{t-1});  t = first step: the train channel prior
    majority_channel  pi_t(c) = (n_{<t}(c) + alpha * prior(c)) / (n_{<t} + alpha)
                      With alpha = 1 the argmax is the majority channel so far, ties broken by the
                      prior (integer counts differ by >= 1, prior terms by < 1); t = first step: prior.
    past_reward_rate  rhat_t = (sum_{k<t} y_k + kappa * rate) / (n_{<t} + kappa), the same value for
                      every candidate channel (chosen over per-channel rates: most users see few
                      channels, so per-channel rates are mostly the shrinkage target anyway; the
                      per-channel variant is available with per_channel=True).
                      y = outcome (1[g > 0] for binary gains, r_t otherwise), rate = train mean of y.

Combined rows (each has both action_probs and reward_pred so it fits every table):
    history  = last_channel + past_reward_rate
    majority = majority_channel + past_reward_rate
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtorl.evaluation.predictions import Predictions, journey_order, outcome

__all__ = ["HistoryPrior", "last_channel_probs", "majority_channel_probs", "past_reward_rate",
           "heuristic_predictions", "HEURISTICS"]

HEURISTICS = ("history", "majority")


@dataclass(frozen=True)
class HistoryPrior:
    """What the heuristics know from TRAIN: channel prior (C,) and outcome rate."""

    channel_prior: np.ndarray
    rate: float

    @classmethod
    def fit(cls, channel: np.ndarray, y: np.ndarray, n_channels: int, smoothing: float = 1.0) -> "HistoryPrior":
        """channel (N,) logged channels of train, y (N,) outcomes of train (see `outcome`).

        prior(c) = (count(c) + smoothing) / (N + smoothing * C): never exactly zero.
        """
        counts = np.bincount(np.asarray(channel, dtype=np.int64), minlength=n_channels).astype(np.float64)
        prior = (counts + smoothing) / (counts.sum() + smoothing * n_channels)
        y = np.asarray(y, dtype=np.float64)
        rate = float(y.mean()) if y.size else 0.0
        return cls(channel_prior=prior, rate=rate)

    @classmethod
    def from_predictions(cls, train: Predictions, smoothing: float = 1.0) -> "HistoryPrior":
        return cls.fit(train.channel, outcome(train), train.n_channels, smoothing)


def _exclusive_group_cumsum(x: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Sum of x over the earlier rows of the same group, rows already sorted by group.

    x (N, ...) ; start (N,) sorted position of the group's first row  ->  (N, ...)
    """
    cs = np.cumsum(x, axis=0)
    excl = cs - x                      # sum over all earlier rows
    return excl - excl[start]          # minus what came before the group


def last_channel_probs(p: Predictions, prior: HistoryPrior) -> np.ndarray:
    """(N, C): one-hot of the user's previous logged channel; the train prior at a first step."""
    order, start = journey_order(p.user, p.t)
    ch = p.channel[order]
    n, c = p.n_steps, p.n_channels
    out_sorted = np.tile(prior.channel_prior, (n, 1))
    pos = np.arange(n)
    has_prev = pos != start                                   # not the user's first step
    rows = pos[has_prev]
    out_sorted[rows] = 0.0
    out_sorted[rows, ch[rows - 1]] = 1.0
    out = np.empty((n, c))
    out[order] = out_sorted
    return out


def majority_channel_probs(p: Predictions, prior: HistoryPrior, alpha: float = 1.0) -> np.ndarray:
    """(N, C): smoothed channel counts of the user's earlier steps (see module docstring)."""
    order, start = journey_order(p.user, p.t)
    n, c = p.n_steps, p.n_channels
    onehot = np.zeros((n, c))
    onehot[np.arange(n), p.channel[order]] = 1.0
    counts = _exclusive_group_cumsum(onehot, start)                         # (N, C) counts before t
    probs_sorted = (counts + alpha * prior.channel_prior) / (counts.sum(1, keepdims=True) + alpha)
    out = np.empty((n, c))
    out[order] = probs_sorted
    return out


def past_reward_rate(p: Predictions, prior: HistoryPrior, kappa: float = 1.0,
                     per_channel: bool = False) -> np.ndarray:
    """(N, C): the user's past outcome rate shrunk to the train rate (kappa pseudo-observations).

    per_channel=False: the same value in every column.
    per_channel=True: column c = (sum_{k<t, a_k=c} y_k + kappa * u_t) / (n_{<t}(c) + kappa), where u_t
    is the user's overall shrunk rate (the per_channel=False value).
    """
    order, start = journey_order(p.user, p.t)
    n, c = p.n_steps, p.n_channels
    y = outcome(p)[order]
    past = _exclusive_group_cumsum(np.stack([y, np.ones(n)], axis=1), start)   # (N, 2) sum y, count
    user_rate = (past[:, 0] + kappa * prior.rate) / (past[:, 1] + kappa)        # (N,)
    if per_channel:
        onehot = np.zeros((n, c))
        onehot[np.arange(n), p.channel[order]] = 1.0
        s = _exclusive_group_cumsum(onehot * y[:, None], start)                 # (N, C)
        k = _exclusive_group_cumsum(onehot, start)                              # (N, C)
        rate_sorted = (s + kappa * user_rate[:, None]) / (k + kappa)
    else:
        rate_sorted = np.repeat(user_rate[:, None], c, axis=1)
    out = np.empty((n, c))
    out[order] = rate_sorted
    return out


def heuristic_predictions(p: Predictions, prior: HistoryPrior, kappa: float = 1.0,
                          per_channel: bool = False) -> dict[str, Predictions]:
    """{"history": last channel + past rate, "majority": majority channel + past rate}."""
    rate = past_reward_rate(p, prior, kappa=kappa, per_channel=per_channel)
    return {
        "history": p.with_outputs(last_channel_probs(p, prior), rate, "history"),
        "majority": p.with_outputs(majority_channel_probs(p, prior), rate, "majority"),
    }
