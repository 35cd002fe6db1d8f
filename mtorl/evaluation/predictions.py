"""The `Predictions` container every evaluation function consumes (pure numpy).

A split is flattened over every valid step of every user, in journey order (users contiguous,
steps in time order within a user). N steps, C channels:

    user          (N,)   int      user index (dense, 0..U-1 within a split is typical, not required)
    t             (N,)   int      step index within the user's journey
    channel       (N,)   int      logged channel a_t
    gain          (N,)   float    g_t
    cost          (N,)   float    w_t
    reward        (N,)   float    r_t in [0, 1]
    propensity    (N,)   float    logging probability of a_t; NaN when unknown
    action_probs  (N, C) float    pi(c | history before t, s_t)
    reward_pred   (N, C) float    predicted reward of every candidate channel
                                  (a probability when the gain is binary)
    reward_std    (N, C) float    an ensemble's spread of reward_pred (its members' population std),
                  or None         read by the decision layer (ensemble_pessimism); None = a single
                                  model or a heuristic (no spread)

The prediction at step t may use only the history before t and the current state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Predictions", "outcome"]


@dataclass
class Predictions:
    user: np.ndarray
    t: np.ndarray
    channel: np.ndarray
    gain: np.ndarray
    cost: np.ndarray
    reward: np.ndarray
    propensity: np.ndarray
    action_probs: np.ndarray
    reward_pred: np.ndarray
    channels: list[str] = field(default_factory=list)
    binary: bool = True
    name: str = "model"
    reward_std: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.user = np.asarray(self.user, dtype=np.int64)
        self.t = np.asarray(self.t, dtype=np.int64)
        self.channel = np.asarray(self.channel, dtype=np.int64)
        for k in ("gain", "cost", "reward", "propensity"):
            setattr(self, k, np.asarray(getattr(self, k), dtype=np.float64))
        self.action_probs = np.asarray(self.action_probs, dtype=np.float64)
        self.reward_pred = np.asarray(self.reward_pred, dtype=np.float64)
        if self.reward_std is not None:
            self.reward_std = np.asarray(self.reward_std, dtype=np.float64)
        self.channels = [str(c) for c in self.channels]
        self.validate()

    # ------------------------------------------------------------------ shape checks
    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        n = self.user.shape[0]
        for k in ("user", "t", "channel", "gain", "cost", "reward", "propensity"):
            a = getattr(self, k)
            if a.ndim != 1 or a.shape[0] != n:
                raise ValueError(f"Predictions[{self.name}].{k}: expected shape ({n},), got {a.shape}")
        c = len(self.channels)
        if c < 1:
            raise ValueError(f"Predictions[{self.name}]: channels is empty")
        for k in ("action_probs", "reward_pred"):
            a = getattr(self, k)
            if a.shape != (n, c):
                raise ValueError(f"Predictions[{self.name}].{k}: expected shape ({n}, {c}), got {a.shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"Predictions[{self.name}].{k}: contains NaN or inf")
        if self.reward_std is not None:
            sd = self.reward_std
            if sd.shape != (n, c):
                raise ValueError(f"Predictions[{self.name}].reward_std: expected shape ({n}, {c}), got {sd.shape}")
            if not np.all(np.isfinite(sd)) or (n and sd.min() < 0):
                raise ValueError(f"Predictions[{self.name}].reward_std: must be finite and >= 0")
        if n and (self.channel.min() < 0 or self.channel.max() >= c):
            raise ValueError(f"Predictions[{self.name}].channel: values must be in [0, {c}), got "
                             f"[{self.channel.min()}, {self.channel.max()}]")
        if n and (self.action_probs.min() < -1e-6):
            raise ValueError(f"Predictions[{self.name}].action_probs: negative probability")

    # ------------------------------------------------------------------ sizes
    @property
    def n_steps(self) -> int:
        return int(self.user.shape[0])

    @property
    def n_users(self) -> int:
        return int(np.unique(self.user).size)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    # ------------------------------------------------------------------ construction
    def with_outputs(self, action_probs: np.ndarray, reward_pred: np.ndarray, name: str,
                     reward_std: np.ndarray | None = None) -> "Predictions":
        """Same logged arrays, other model outputs (used by the heuristics: no spread)."""
        return dataclasses.replace(self, action_probs=action_probs, reward_pred=reward_pred, name=name,
                                   reward_std=reward_std)

    @classmethod
    def concat(cls, parts: list["Predictions"], name: str | None = None,
               renumber_users: bool = False) -> "Predictions":
        """Concatenate batches of one split, in order.

        Channels, `binary` and whether `reward_std` is given must agree. With `renumber_users=True`
        the user indices of each part are offset so that parts never share a user (use it when every
        batch numbers users from 0); otherwise user indices are kept as given (they must already be
        global).
        """
        if not parts:
            raise ValueError("Predictions.concat: no parts")
        first = parts[0]
        for p in parts[1:]:
            if p.channels != first.channels or p.binary != first.binary:
                raise ValueError(f"Predictions.concat: {p.name} has channels/binary {p.channels}/{p.binary}, "
                                 f"expected {first.channels}/{first.binary}")
            if (p.reward_std is None) != (first.reward_std is None):
                raise ValueError(f"Predictions.concat: {p.name} and {first.name} differ in having a reward_std")
        users = []
        offset = 0
        for p in parts:
            users.append(p.user + offset if renumber_users else p.user)
            if renumber_users and p.n_steps:
                offset += int(p.user.max()) + 1
        cat = lambda k: np.concatenate([getattr(p, k) for p in parts], axis=0)  # noqa: E731
        return cls(user=np.concatenate(users), t=cat("t"), channel=cat("channel"), gain=cat("gain"),
                   cost=cat("cost"), reward=cat("reward"), propensity=cat("propensity"),
                   action_probs=cat("action_probs"), reward_pred=cat("reward_pred"),
                   channels=list(first.channels), binary=first.binary, name=name or first.name,
                   reward_std=None if first.reward_std is None else cat("reward_std"))


def outcome(p: Predictions) -> np.ndarray:
    """The observed outcome that `reward_pred` predicts, (N,) float.

    Binary gains: 1.0 where g_t > 0 else 0.0 (reward_pred is a probability of that event).
    Continuous gains: the normalised reward r_t.
    """
    return (p.gain > 0).astype(np.float64) if p.binary else p.reward.astype(np.float64)


def journey_order(user: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort by (user, t). Returns (order, group_start_of_each_sorted_row).

    `order` sorts the arrays; `start[i]` is the sorted position of the first step of row i's user.
    """
    order = np.lexsort((t, user))
    u = user[order]
    n = u.shape[0]
    new = np.ones(n, dtype=bool)
    if n:
        new[1:] = u[1:] != u[:-1]
    first_pos = np.flatnonzero(new)
    start = first_pos[np.cumsum(new) - 1] if n else np.zeros(0, dtype=np.int64)
    return order, start
