"""Export a trained model as a TorchScript module taking plain tensors.

    exported(state (B, L, D) float32, prev_channel (B, L) int64, prev_reward (B, L) float32,
             mask (B, L) bool) -> (action_probs (B, L, C), reward (B, L, C))

The module is traced in eval mode (no dropout). MTORL and the GRU/MLP baselines trace with a dynamic
B and L; ``dt`` unrolls its return-to-go loop, so its export is valid for the traced L only.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from mtorl.models.batch import Batch
from mtorl.models.layers import SequencePolicy


class PredictWrapper(nn.Module):
    """``SequencePolicy.predict`` as a module of four tensors (labels are not needed to act)."""

    def __init__(self, model: SequencePolicy) -> None:
        super().__init__()
        self.model = model
        self.binary = model.binary

    def forward(
        self, state: torch.Tensor, prev_channel: torch.Tensor, prev_reward: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = Batch.from_inputs(state, prev_channel, prev_reward, mask)
        logits, reward = self.model.policy_logits(batch)  # (B, L, C) x 2
        probs = torch.softmax(logits.float(), dim=-1)
        reward = torch.sigmoid(reward.float()) if self.binary else reward.float()
        return probs, reward


def export_torchscript(model: SequencePolicy, example_batch: Batch) -> torch.jit.ScriptModule:
    """Trace ``model`` (put in eval mode) on ``example_batch``'s inputs; weights are copied."""
    model = model.eval()
    wrapper = PredictWrapper(model).eval()
    inputs = (example_batch.state, example_batch.prev_channel, example_batch.prev_reward, example_batch.mask)
    with torch.no_grad(), warnings.catch_warnings():
        # the GRU's input-size checks trace as constants; they hold for every input of this model
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        traced: torch.jit.ScriptModule = torch.jit.trace(wrapper, inputs, check_trace=False)  # type: ignore[no-untyped-call]
    return traced
