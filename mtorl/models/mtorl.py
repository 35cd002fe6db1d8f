"""MTORL: causal TCN state encoder + causal multi-head self-attention + two decoders.

    x_t   = concat(onehot(a_{t-1}), r_{t-1}, s_t)            (B, L, C + 1 + D)
    e_t   = W_e [x_t, stats_t]                                (B, L, H)
            stats_t: causal running statistics of (a, r) before t (``history_stats``; spec.history_stats)
    z_t   = TCN(e_≤t)          dilated causal convolutions    (B, L, H)
    h_t   = AddNorm^N(z_≤t)    causal self-attention + FFN    (B, L, H)
    π(·|h_t)    = softmax(ActionDecoder(h_t))                 (B, L, C)
    r̂(h_t, ·)  = RewardDecoder(h_t)                          (B, L, C) one entry per candidate channel

The reward decoder is trained on the logged channel's entry only; its other entries are the model's
counterfactual estimate of the reward of each candidate channel.
"""

from __future__ import annotations

import torch.nn as nn

from mtorl.models.batch import Batch, ModelOutput
from mtorl.models.layers import (
    AddNormBlock,
    MLPHead,
    SequencePolicy,
    StepEmbedding,
    TemporalConvNet,
    causal_attention_mask,
    receptive_field,
)
from mtorl.spec.models import ModelSpec

__all__ = ["MTORL", "receptive_field"]


class MTORL(SequencePolicy):
    name = "mtorl"

    def __init__(self, spec: ModelSpec, state_dim: int, n_channels: int, binary: bool) -> None:
        super().__init__(spec, state_dim, n_channels, binary)
        H = spec.hidden
        self.embed = StepEmbedding(state_dim, n_channels, H, with_history=spec.history_stats)
        self.tcn = TemporalConvNet(H, spec.tcn)
        self.blocks = nn.ModuleList(
            AddNormBlock(H, spec.attention.heads, spec.attention.dropout) for _ in range(spec.attention.layers)
        )
        self.action_decoder = MLPHead(H, spec.decoder_hidden, n_channels)
        self.reward_decoder = MLPHead(H, spec.decoder_hidden, n_channels)

    def forward(self, batch: Batch) -> ModelOutput:
        e = self.embed(batch)  # (B, L, H)
        h = self.tcn(e)  # (B, L, H)
        attn_mask = causal_attention_mask(batch.mask)  # (B, 1, L, L)
        for block in self.blocks:
            h = block(h, attn_mask)  # (B, L, H)
        return ModelOutput(
            action_logits=self.action_decoder(h),  # (B, L, C)
            reward_pred=self.reward_decoder(h),  # (B, L, C)
        )
