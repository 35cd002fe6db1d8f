"""Typed containers passed into and out of every model.

``Batch`` mirrors the window batch table of the architecture notes: fixed length L, left-aligned,
right-padded. The input at step t is (a_{t-1}, r_{t-1}, s_t); the labels are a_t and r_t.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Mapping

import numpy as np
import torch

_DTYPES: dict[str, torch.dtype] = {
    "state": torch.float32,
    "prev_channel": torch.int64,
    "prev_reward": torch.float32,
    "channel": torch.int64,
    "reward": torch.float32,
    "gain": torch.float32,
    "cost": torch.float32,
    "propensity": torch.float32,
    "done": torch.bool,
    "mask": torch.bool,
}
_REQUIRED = ("state", "prev_channel", "prev_reward", "mask")


@dataclass(frozen=True)
class Batch:
    """B windows of L steps; D state features; C channels (channel indices, −1 = none/pad)."""

    state: torch.Tensor  # (B, L, D) float32, normalised s_t
    prev_channel: torch.Tensor  # (B, L) int64, a_{t-1}; -1 at a journey's first step and in padding
    prev_reward: torch.Tensor  # (B, L) float32, r_{t-1}; 0 at the first step
    channel: torch.Tensor  # (B, L) int64, label a_t; -1 in padding
    reward: torch.Tensor  # (B, L) float32, label r_t in [0, 1]
    gain: torch.Tensor  # (B, L) float32, raw g_t
    cost: torch.Tensor  # (B, L) float32, raw w_t
    propensity: torch.Tensor  # (B, L) float32, NaN when unknown
    done: torch.Tensor  # (B, L) bool, t is the journey's last step
    mask: torch.Tensor  # (B, L) bool, valid step

    @classmethod
    def from_numpy(cls, d: Mapping[str, np.ndarray], device: str | torch.device = "cpu") -> "Batch":
        """Build from the numpy window dict. ``state, prev_channel, prev_reward, mask`` are required;
        missing label columns (inference) default to channel −1, reward/gain/cost 0, propensity NaN,
        done False."""
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise KeyError(f"batch is missing {missing}")
        B, L = np.asarray(d["mask"]).shape
        defaults = {
            "channel": np.full((B, L), -1, np.int64),
            "reward": np.zeros((B, L), np.float32),
            "gain": np.zeros((B, L), np.float32),
            "cost": np.zeros((B, L), np.float32),
            "propensity": np.full((B, L), np.nan, np.float32),
            "done": np.zeros((B, L), bool),
        }
        out = {}
        for k, dt in _DTYPES.items():
            v = d[k] if k in d else defaults[k]
            a = np.asarray(v)
            if not a.flags.writeable:  # Ray Data hands out read-only views; torch wants writable memory
                a = a.copy()
            out[k] = torch.as_tensor(a).to(device=device, dtype=dt)
        return cls(**out)

    @classmethod
    def from_inputs(cls, state: torch.Tensor, prev_channel: torch.Tensor, prev_reward: torch.Tensor, mask: torch.Tensor) -> "Batch":
        """Inference batch from the four input tensors (labels filled with neutral values)."""
        z = torch.zeros_like(prev_reward)
        return cls(
            state=state, prev_channel=prev_channel, prev_reward=prev_reward,
            channel=torch.full_like(prev_channel, -1), reward=z, gain=z, cost=z,
            propensity=torch.full_like(prev_reward, float("nan")),
            done=torch.zeros_like(mask), mask=mask,
        )

    def to(self, device: str | torch.device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def shape(self) -> tuple[int, int]:
        """(B, L)."""
        return tuple(self.mask.shape)  # type: ignore[return-value]


@dataclass
class ModelOutput:
    """What ``model(batch)`` returns.

    ``reward_pred`` holds the immediate reward of EVERY candidate channel: logits when the reward
    loss is BCE (binary gains), values when it is MSE. ``extras`` carries model-specific tensors the
    loss needs (``q``, ``q_target``, ``v``, ``imitation_logits``, ``rtg``, ...).
    """

    action_logits: torch.Tensor  # (B, L, C)
    reward_pred: torch.Tensor  # (B, L, C)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
