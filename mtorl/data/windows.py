"""Pure numpy CMDP maths: reward, state normalisation, journeys and fixed-length windows.

No Ray, no torch: Ray Data calls these in ``map_batches``, evaluation and serving call them directly.

The window batch (docs/ARCHITECTURE.md, "Window batch"), B windows of length L, D = state size::

    state        (B, L, D) float32  normalised s_t
    prev_channel (B, L)    int64    a_{t-1}; -1 at a journey's first step and in padding
    prev_reward  (B, L)    float32  r_{t-1}; 0 at a journey's first step and in padding
    channel      (B, L)    int64    label a_t; -1 in padding
    reward       (B, L)    float32  label r_t
    gain, cost   (B, L)    float32  raw g_t, w_t
    propensity   (B, L)    float32  NaN when unknown
    done         (B, L)    bool     t is the journey's last step
    mask         (B, L)    bool     valid step

Padding is on the right: -1 for channels, 0 for floats (propensity included), False for flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from mtorl.data.manifest import Manifest

WINDOW_KEYS = ("state", "prev_channel", "prev_reward", "channel", "reward", "gain", "cost", "propensity", "done", "mask")


def compute_reward(gain: np.ndarray, cost: np.ndarray, manifest: Manifest) -> np.ndarray:
    """r = clip((g - s*w - min) / (max - min), 0, 1), s = manifest penalty, min/max fitted on train.

    gain, cost: (...,) -> reward (...,) float32. A degenerate range (max == min) counts as 1.
    """
    s = float(manifest.penalty)
    lo, hi = float(manifest.reward_norm.min), float(manifest.reward_norm.max)
    span = hi - lo if hi > lo else 1.0
    raw = np.asarray(gain, dtype=np.float64) - s * np.asarray(cost, dtype=np.float64)
    return np.clip((raw - lo) / span, 0.0, 1.0).astype(np.float32)


def normalise_state(features: np.ndarray, user_features: np.ndarray, manifest: Manifest) -> np.ndarray:
    """s_t = (concat(q_t, f) - mean) / std.  features (T, Dq), user_features (Df,) -> (T, Dq + Df) float32."""
    q = np.asarray(features, dtype=np.float64)
    f = np.asarray(user_features, dtype=np.float64).reshape(-1)
    T = q.shape[0]
    x = np.concatenate([q.reshape(T, -1), np.broadcast_to(f, (T, f.shape[0]))], axis=1)  # (T, D)
    mean, std = _moments(manifest)
    if x.shape[1] != mean.shape[0]:
        raise ValueError(f"state has {x.shape[1]} features, the manifest normalisation {mean.shape[0]}")
    return ((x - mean) / std).astype(np.float32)


def _moments(manifest: Manifest) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The manifest's state normalisation: mean (D,), std (D,) float64."""
    n = manifest.normalization
    return np.asarray(n.mean, dtype=np.float64), np.asarray(n.std, dtype=np.float64)


@dataclass
class Journey:
    """One user's journey in time order; T steps, D state features."""

    user_id: str
    channel: np.ndarray     # (T,) int64, index into manifest.channels
    gain: np.ndarray        # (T,) float32
    cost: np.ndarray        # (T,) float32
    propensity: np.ndarray  # (T,) float32, NaN when unknown
    state: np.ndarray       # (T, D) float32, normalised
    reward: np.ndarray      # (T,) float32

    @property
    def length(self) -> int:
        return int(self.channel.shape[0])


def _flat(col: Any) -> tuple[np.ndarray, np.ndarray]:
    """A list column (pyarrow ListArray/ChunkedArray, or a sequence of arrays) -> (values, offsets)."""
    if hasattr(col, "combine_chunks"):
        col = col.combine_chunks()
    if hasattr(col, "flatten") and hasattr(col, "offsets"):
        offsets = np.asarray(col.offsets, dtype=np.int64)
        values = np.asarray(col.values.to_numpy(zero_copy_only=False))
        return values[offsets[0]:offsets[-1]], offsets - offsets[0]
    parts = [np.asarray(v).reshape(-1) for v in col]
    lens = np.array([p.shape[0] for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    values = np.concatenate(parts) if parts else np.zeros(0)
    return values, offsets


def journeys_from_table(batch: Any, manifest: Manifest) -> list[Journey]:
    """Journey rows (a pyarrow Table/RecordBatch or a dict of columns, schema of the prepared dataset)
    -> Journeys with rewards and normalised states (vectorised over the whole batch)."""
    get: Callable[[str], Any] = (lambda k: batch.column(k)) if hasattr(batch, "column_names") else (lambda k: batch[k])
    users = get("user_id")
    users = users.to_pylist() if hasattr(users, "to_pylist") else [str(u) for u in users]
    ch, off = _flat(get("channel"))
    gain, _ = _flat(get("gain"))
    cost, _ = _flat(get("cost"))
    prop, _ = _flat(get("propensity"))
    feats, _ = _flat(get("features"))
    ufeats, _ = _flat(get("user_features"))
    n_users, n_steps = len(users), int(off[-1]) if len(off) else 0
    dq, df = len(manifest.step_features), len(manifest.user_features)
    q = np.asarray(feats, dtype=np.float64).reshape(n_steps, dq)                   # (N, Dq)
    f = np.asarray(ufeats, dtype=np.float64).reshape(n_users, df)                  # (U, Df)
    lengths = np.diff(off)
    x = np.concatenate([q, np.repeat(f, lengths, axis=0)], axis=1)                 # (N, D)
    mean, std = _moments(manifest)
    state = ((x - mean) / std).astype(np.float32)
    gain = np.asarray(gain, dtype=np.float32)
    cost = np.asarray(cost, dtype=np.float32)
    reward = compute_reward(gain, cost, manifest)
    ch = np.asarray(ch, dtype=np.int64)
    prop = np.asarray(prop, dtype=np.float32)
    out = []
    for i in range(n_users):
        a, b = int(off[i]), int(off[i + 1])
        out.append(Journey(str(users[i]), ch[a:b], gain[a:b], cost[a:b], prop[a:b], state[a:b], reward[a:b]))
    return out


def make_windows(journeys: list[Journey], length: int, stride: int | None = None, state_dim: int | None = None) -> dict[str, np.ndarray]:
    """Cut journeys into fixed-length windows (the window batch table above).

    Windows of a journey with T steps start at 0, stride, 2*stride, ... and stop after the first window
    that reaches the journey's end (stride = length gives disjoint chunks covering each step once).
    ``prev_*`` of a window's first step come from the real preceding step of the journey.
    ``state_dim`` gives D when ``journeys`` is empty.
    """
    L = int(length)
    S = int(stride or length)
    if L < 1 or S < 1:
        raise ValueError(f"length and stride must be >= 1, got {L}, {S}")
    D = journeys[0].state.shape[1] if journeys else int(state_dim or 0)
    if not journeys:
        return _empty(L, D)
    T = np.array([j.length for j in journeys], dtype=np.int64)                     # (J,)
    off = np.concatenate([[0], np.cumsum(T)])                                     # (J+1,)
    state = np.concatenate([j.state for j in journeys]).reshape(-1, D)            # (N, D)
    ch = np.concatenate([j.channel for j in journeys]).astype(np.int64)
    rew = np.concatenate([j.reward for j in journeys]).astype(np.float32)
    gain = np.concatenate([j.gain for j in journeys]).astype(np.float32)
    cost = np.concatenate([j.cost for j in journeys]).astype(np.float32)
    prop = np.concatenate([j.propensity for j in journeys]).astype(np.float32)

    n_win = 1 + -(-np.maximum(T - L, 0) // S)                                     # (J,) ceil division
    jw = np.repeat(np.arange(len(journeys)), n_win)                               # (B,) journey of window
    k = np.arange(jw.shape[0]) - np.repeat(np.cumsum(n_win) - n_win, n_win)      # (B,) window number
    pos = (k * S)[:, None] + np.arange(L)[None, :]                                # (B, L) step within journey
    mask = pos < T[jw][:, None]
    idx = np.where(mask, off[jw][:, None] + pos, 0)                               # (B, L) flat step index
    has_prev = mask & (pos > 0)
    pidx = np.where(has_prev, idx - 1, 0)
    out = {
        "state": np.where(mask[..., None], state[idx], 0).astype(np.float32),     # (B, L, D)
        "prev_channel": np.where(has_prev, ch[pidx], -1).astype(np.int64),
        "prev_reward": np.where(has_prev, rew[pidx], 0).astype(np.float32),
        "channel": np.where(mask, ch[idx], -1).astype(np.int64),
        "reward": np.where(mask, rew[idx], 0).astype(np.float32),
        "gain": np.where(mask, gain[idx], 0).astype(np.float32),
        "cost": np.where(mask, cost[idx], 0).astype(np.float32),
        "propensity": np.where(mask, prop[idx], 0).astype(np.float32),
        "done": mask & (pos == (T[jw] - 1)[:, None]),
        "mask": mask,
    }
    return out


def _empty(L: int, D: int) -> dict[str, np.ndarray]:
    z = {k: np.zeros((0, L), dtype=np.float32) for k in ("prev_reward", "reward", "gain", "cost", "propensity")}
    z.update({k: np.zeros((0, L), dtype=np.int64) for k in ("prev_channel", "channel")})
    z.update({k: np.zeros((0, L), dtype=bool) for k in ("done", "mask")})
    z["state"] = np.zeros((0, L, D), dtype=np.float32)
    return z


def pad_journeys(journeys: list[Journey], state_dim: int | None = None) -> dict[str, np.ndarray]:
    """Whole journeys padded to the longest (one row per journey, same order): the window table with
    L = max T. The models are causal, so the prediction at t uses only inputs at steps <= t."""
    L = max((j.length for j in journeys), default=1)
    return make_windows(journeys, L, L, state_dim=state_dim)
