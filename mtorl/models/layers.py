"""Building blocks shared by MTORL and the baselines, plus the ``SequencePolicy`` base class.

Notation: B windows, L steps, D state features, C channels, H hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from mtorl.models.batch import Batch, ModelOutput
from mtorl.spec.models import ModelSpec, TCNSpec


# ----------------------------------------------------------------------------- base class

class SequencePolicy(nn.Module):
    """Interface of every model: ``forward(batch) -> ModelOutput`` and ``predict(batch)``.

    ``reward_kind`` is ``"bce"`` (reward head outputs logits) for binary gains, else ``"mse"``
    (reward head outputs values).
    """

    name: str = "base"

    def __init__(self, spec: ModelSpec, state_dim: int, n_channels: int, binary: bool) -> None:
        super().__init__()
        self.spec = spec
        self.state_dim = state_dim
        self.n_channels = n_channels
        self.binary = binary
        self.reward_kind = "bce" if binary else "mse"

    def forward(self, batch: Batch) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def policy_logits(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(action logits (B, L, C), reward head (B, L, C)) used at decision time."""
        out = self.forward(batch)
        return out.action_logits, out.reward_pred

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(action_probs (B, L, C), reward (B, L, C)): probabilities for binary gains, values for MSE.

        Runs with eval-mode semantics (no dropout) whatever the module's mode, and restores it.
        """
        if self.training:
            self.eval()
            try:
                logits, reward = self.policy_logits(batch)
            finally:
                self.train(True)
        else:  # already in eval mode (serving, evaluation): no walk over the module tree per call
            logits, reward = self.policy_logits(batch)
        probs = torch.softmax(logits.float(), dim=-1)  # (B, L, C)
        reward = torch.sigmoid(reward.float()) if self.binary else reward.float()  # (B, L, C)
        return probs, reward

    def after_step(self) -> None:
        """Called by the trainer after each optimizer step (Polyak target update for Q methods)."""


# ----------------------------------------------------------------------------- input embedding

def step_inputs(batch: Batch, n_channels: int) -> torch.Tensor:
    """x_t = concat(onehot(a_{t-1}) (zeros when −1), r_{t-1}, s_t): (B, L, C + 1 + D)."""
    prev = batch.prev_channel
    onehot = F.one_hot(prev.clamp(min=0), n_channels).to(batch.state.dtype)  # (B, L, C)
    onehot = onehot * (prev >= 0).unsqueeze(-1).to(onehot.dtype)  # zeros when there is no previous action
    return torch.cat([onehot, batch.prev_reward.unsqueeze(-1).to(batch.state.dtype), batch.state], dim=-1)


def history_dim(n_channels: int) -> int:
    """Width of ``history_stats``: 2 + 2C."""
    return 2 + 2 * n_channels


def history_stats(batch: Batch, n_channels: int) -> torch.Tensor:
    """Causal running statistics of the journey so far, from (a_{k-1}, r_{k-1}) for k <= t:

        n_t        = number of earlier steps                      -> log(1 + n_t)
        rate_t     = (Σ r + 0.5) / (n_t + 1)                      overall reward rate, shrunk to 1/2
        freq_t(c)  = (count_c + 1/C) / (n_t + 1)                  channel frequencies
        crate_t(c) = (Σ_{a=c} r + rate_t) / (count_c + 1)         per-channel reward rate, shrunk to rate_t

    Returns (B, L, 2 + 2C). These are the sufficient statistics the user's history carries about the
    next reward and channel; computing them exactly (cumulative sums) spares the encoder learning to
    count. Padding steps contribute nothing.
    """
    valid = (batch.prev_channel >= 0) & batch.mask  # (B, L)
    dt = batch.state.dtype
    onehot = F.one_hot(batch.prev_channel.clamp(min=0), n_channels).to(dt) * valid.unsqueeze(-1).to(dt)  # (B, L, C)
    r = batch.prev_reward.to(dt) * valid.to(dt)  # (B, L)
    n = valid.to(dt).cumsum(1)  # (B, L)
    rate = (r.cumsum(1) + 0.5) / (n + 1.0)  # (B, L)
    cnt = onehot.cumsum(1)  # (B, L, C)
    freq = (cnt + 1.0 / n_channels) / (n + 1.0).unsqueeze(-1)
    crate = ((onehot * r.unsqueeze(-1)).cumsum(1) + rate.unsqueeze(-1)) / (cnt + 1.0)
    return torch.cat([torch.log1p(n).unsqueeze(-1), rate.unsqueeze(-1), freq, crate], dim=-1)


def step_features(batch: Batch, n_channels: int, with_history: bool) -> torch.Tensor:
    """x_t, followed by the history statistics when ``with_history``: (B, L, C + 1 + D [+ 2 + 2C])."""
    x = step_inputs(batch, n_channels)  # (B, L, C + 1 + D)
    if with_history:
        x = torch.cat([x, history_stats(batch, n_channels)], dim=-1)  # (B, L, C + 1 + D + 2 + 2C)
    return x


class StepEmbedding(nn.Module):
    """W_e: Linear(C + 1 + D [+ 2 + 2C history statistics] -> H) on x_t."""

    def __init__(self, state_dim: int, n_channels: int, hidden: int, with_history: bool = False) -> None:
        super().__init__()
        self.n_channels = n_channels
        self.with_history = with_history
        self.proj = nn.Linear(n_channels + 1 + state_dim + (history_dim(n_channels) if with_history else 0), hidden)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.proj(step_features(batch, self.n_channels, self.with_history))  # (B, L, H)


def sinusoidal_positions(L: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed sinusoidal position code (L, dim) (Vaswani et al.), no maximum length."""
    pos = torch.arange(L, device=device, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(L, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe


# ----------------------------------------------------------------------------- TCN

def tcn_dilations(spec: TCNSpec) -> list[int]:
    """Dilations of the residual blocks: ``spec.dilations`` or 1, 2, 4, ..."""
    return list(spec.dilations) if spec.dilations is not None else [2**i for i in range(spec.levels)]


def receptive_field(spec: ModelSpec | TCNSpec) -> int:
    """Steps the causal TCN sees: each residual block stacks two causal convolutions of kernel k and
    dilation d, each extending the history by (k−1)·d, so RF = 1 + 2·(k−1)·Σ_i d_i."""
    tcn = spec.tcn if isinstance(spec, ModelSpec) else spec
    return 1 + 2 * (tcn.kernel_size - 1) * sum(tcn_dilations(tcn))


class CausalConv1d(nn.Module):
    """Weight-normed Conv1d left-padded by (k−1)·d, so output t sees inputs ≤ t only."""

    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.left = (kernel_size - 1) * dilation
        self.conv = weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, L)
        return self.conv(F.pad(x, (self.left, 0)))  # (B, H, L)


class TemporalBlock(nn.Module):
    """Residual block of Bai et al. (2018): two (causal conv -> ReLU -> dropout), plus identity."""

    def __init__(self, hidden: int, kernel_size: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = CausalConv1d(hidden, kernel_size, dilation)
        self.conv2 = CausalConv1d(hidden, kernel_size, dilation)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, L)
        y = self.drop(F.relu(self.conv1(x)))
        y = self.drop(F.relu(self.conv2(y)))
        return F.relu(x + y)  # (B, H, L)


class TemporalConvNet(nn.Module):
    """Dilated causal TCN over (B, L, H); receptive field ``receptive_field(spec)``."""

    def __init__(self, hidden: int, spec: TCNSpec) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TemporalBlock(hidden, spec.kernel_size, d, spec.dropout) for d in tcn_dilations(spec)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L, H)
        h = x.transpose(1, 2)  # (B, H, L)
        for block in self.blocks:
            h = block(h)
        return h.transpose(1, 2)  # (B, L, H)


# ----------------------------------------------------------------------------- attention

def causal_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, L, L) mask, True = may attend: key j ≤ query i and key j valid.

    The diagonal is always allowed, so a padded query row (or a fully padded window) still attends
    to itself and the softmax never sees an all-masked row (no NaN). Valid queries are unaffected:
    their own key is valid.
    """
    L = mask.shape[1]
    idx = torch.arange(L, device=mask.device)
    causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # (L, L): [i, j] = j <= i
    eye = idx.unsqueeze(0) == idx.unsqueeze(1)  # (L, L)
    allowed = causal.unsqueeze(0) & (mask.unsqueeze(1) | eye.unsqueeze(0))  # (B, L, L)
    return allowed.unsqueeze(1)  # (B, 1, L, L)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal + key-padding mask; dropout in training only."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        assert hidden % heads == 0
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:  # x: (B, L, H)
        B, L, H = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, L, H)
        q, k, v = (t.view(B, L, self.heads, H // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, L, H/h)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, L, H)  # (B, L, H)
        return self.proj(y)


class AddNormBlock(nn.Module):
    """Post-norm transformer block: x = LN(x + Drop(Attn(x))); x = LN(x + Drop(FFN(x)))."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(hidden, heads, dropout)
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.norm2 = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:  # x: (B, L, H)
        x = self.norm1(x + self.drop(self.attn(x, attn_mask)))
        x = self.norm2(x + self.drop(self.ffn(x)))
        return x  # (B, L, H)


# ----------------------------------------------------------------------------- heads

class MLPHead(nn.Module):
    """Linear(H -> hd) -> ReLU -> Linear(hd -> out)."""

    def __init__(self, hidden: int, decoder_hidden: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, decoder_hidden), nn.ReLU(), nn.Linear(decoder_hidden, out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: (B, L, H)
        return self.net(h)  # (B, L, out)


class GRUEncoder(nn.Module):
    """W_e (optionally on the history statistics too) then a single-layer causal (unidirectional)
    GRU: (B, L) batch -> (B, L, H)."""

    def __init__(self, state_dim: int, n_channels: int, hidden: int, with_history: bool = False) -> None:
        super().__init__()
        self.embed = StepEmbedding(state_dim, n_channels, hidden, with_history=with_history)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)

    def forward(self, batch: Batch) -> torch.Tensor:
        h, _ = self.gru(F.relu(self.embed(batch)))  # (B, L, H)
        return h
