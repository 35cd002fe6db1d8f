"""Baselines with the MTORL interface: every model returns ``action_logits (B, L, C)`` (the policy it
acts by) and ``reward_pred (B, L, C)`` (an immediate-reward head trained with the same reward loss),
so one evaluation scores them all. The losses live in ``mtorl.training.losses``; model-specific
tensors the losses need travel in ``ModelOutput.extras``.

- ``bc_mlp``  behaviour cloning, per-step MLP on x_t (no history).
- ``bc_seq``  behaviour cloning on a causal GRU.
- ``cql``     discrete CQL (Kumar et al. 2020) on a GRU encoder; acts by softmax(Q).
- ``iql``     discrete IQL (Kostrikov et al. 2022); acts by its advantage-weighted policy head.
- ``bcq``     discrete BCQ (Fujimoto et al. 2019); acts by Q restricted to G(a)/max G ≥ threshold.
- ``dt``      Decision Transformer (Chen et al. 2021) conditioned on the return-to-go.
- ``logreg``  logistic regression on the per-step features: the simplest learned reference.

Every model honours ``ModelSpec.history_stats``: with it, x_t is extended by the causal history
statistics (``layers.history_stats``), exactly as for MTORL, so a comparison gives all rows the same
inputs.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from mtorl.models.batch import Batch, ModelOutput
from mtorl.models.layers import (
    AddNormBlock,
    GRUEncoder,
    MLPHead,
    SequencePolicy,
    StepEmbedding,
    causal_attention_mask,
    history_dim,
    sinusoidal_positions,
    step_features,
)
from mtorl.spec.models import ModelSpec

# Fill value for actions BCQ filters out (finite, so softmax and cross-entropy never produce NaN).
FILTERED = -1e9


# ----------------------------------------------------------------------------- behaviour cloning

class BCMLP(SequencePolicy):
    """π(a_t | x_t) with x_t = (a_{t-1}, r_{t-1}, s_t) [+ history statistics]; no learned memory."""

    name = "bc_mlp"

    def __init__(self, spec: ModelSpec, state_dim: int, n_channels: int, binary: bool) -> None:
        super().__init__(spec, state_dim, n_channels, binary)
        self.embed = StepEmbedding(state_dim, n_channels, spec.hidden, with_history=spec.history_stats)
        self.trunk = nn.Sequential(nn.ReLU(), nn.Linear(spec.hidden, spec.hidden), nn.ReLU())
        self.action_head = MLPHead(spec.hidden, spec.decoder_hidden, n_channels)
        self.reward_head = MLPHead(spec.hidden, spec.decoder_hidden, n_channels)

    def forward(self, batch: Batch) -> ModelOutput:
        h = self.trunk(self.embed(batch))  # (B, L, H)
        return ModelOutput(self.action_head(h), self.reward_head(h))  # (B, L, C) x 2


class BCSeq(SequencePolicy):
    """π(a_t | h_t) with h_t a causal GRU state over x_≤t."""

    name = "bc_seq"

    def __init__(self, spec: ModelSpec, state_dim: int, n_channels: int, binary: bool) -> None:
        super().__init__(spec, state_dim, n_channels, binary)
        self.encoder = GRUEncoder(state_dim, n_channels, spec.hidden, with_history=spec.history_stats)
        self.action_head = MLPHead(spec.hidden, spec.decoder_hidden, n_channels)
        self.reward_head = MLPHead(spec.hidden, spec.decoder_hidden, n_channels)

    def forward(self, batch: Batch) -> ModelOutput:
        h = self.encoder(batch)  # (B, L, H)
        return ModelOutput(self.action_head(h), self.reward_head(h))


class LogReg(SequencePolicy):
    """Logistic regression on the per-step features φ_t = x_t [+ history statistics]:

        r̂(φ_t, c) = w·φ_t + W_c·φ_t + b_c      (B, L, C): a shared slope, a per-channel slope, an intercept
        π(c | φ_t) = softmax(A φ_t + a)_c      (B, L, C): multinomial logistic regression

    i.e. a logistic regression on [φ_t, φ_t ⊗ onehot(c), onehot(c)] for the reward (the shared slope lets
    rare channels borrow strength), fitted like every model on the logged channel's entry (BCE) with the
    same action cross-entropy. No hidden layer and no memory beyond what φ_t holds.
    """

    name = "logreg"

    def __init__(self, spec: ModelSpec, state_dim: int, n_channels: int, binary: bool) -> None:
        super().__init__(spec, state_dim, n_channels, binary)
        F_in = n_channels + 1 + state_dim + (history_dim(n_channels) if spec.history_stats else 0)
        self.reward_shared = nn.Linear(F_in, 1, bias=False)
        self.reward_linear = nn.Linear(F_in, n_channels)
        self.action_linear = nn.Linear(F_in, n_channels)

    def forward(self, batch: Batch) -> ModelOutput:
        phi = step_features(batch, self.n_channels, self.spec.history_stats)  # (B, L, F)
        reward = self.reward_shared(phi) + self.reward_linear(phi)  # (B, L, 1) + (B, L, C) -> (B, L, C)
        return ModelOutput(self.action_linear(phi), reward)  # (B, L, C) x 2


# ----------------------------------------------------------------------------- Q-learning

class _QModel(SequencePolicy):
    """GRU encoder + Q head over channels + immediate-reward head, with a Polyak target copy
    of (encoder, Q head): θ' ← (1 − τ)·θ' + τ·θ after every optimizer step (τ = target_update_tau)."""

    def __init__(self, spec: ModelSpec, state_dim: int, n_channels: int, binary: bool) -> None:
        super().__init__(spec, state_dim, n_channels, binary)
        self.encoder = GRUEncoder(state_dim, n_channels, spec.hidden, with_history=spec.history_stats)
        self.q_head = MLPHead(spec.hidden, spec.decoder_hidden, n_channels)
        self.reward_head = MLPHead(spec.hidden, spec.decoder_hidden, n_channels)
        self.target = nn.ModuleDict({"encoder": copy.deepcopy(self.encoder), "q_head": copy.deepcopy(self.q_head)})
        self.target.requires_grad_(False)

    def _online(self) -> list[nn.Module]:
        return [self.encoder, self.q_head]

    @torch.no_grad()
    def after_step(self) -> None:
        tau = self.spec.target_update_tau
        online = [p for m in self._online() for p in m.parameters()]
        target = [p for m in (self.target["encoder"], self.target["q_head"]) for p in m.parameters()]
        for pt, p in zip(target, online):
            pt.lerp_(p.detach(), tau)

    def _encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(batch)  # (B, L, H)
        q = self.q_head(h)  # (B, L, C)
        with torch.no_grad():
            q_target = self.target["q_head"](self.target["encoder"](batch))  # (B, L, C)
        return h, q, q_target


class CQL(_QModel):
    """Discrete CQL; acts by softmax(Q(h_t, ·)) (greedy = argmax Q)."""

    name = "cql"

    def forward(self, batch: Batch) -> ModelOutput:
        h, q, q_target = self._encode(batch)
        return ModelOutput(q, self.reward_head(h), {"q": q, "q_target": q_target})


class IQL(_QModel):
    """Discrete IQL: expectile value V(h_t), Q(h_t, a), and a policy head π(a|h_t) fitted by
    advantage-weighted regression; acts by the policy head."""

    name = "iql"

    def __init__(self, spec: ModelSpec, state_dim: int, n_channels: int, binary: bool) -> None:
        super().__init__(spec, state_dim, n_channels, binary)
        self.v_head = MLPHead(spec.hidden, spec.decoder_hidden, 1)
        self.policy_head = MLPHead(spec.hidden, spec.decoder_hidden, n_channels)

    def forward(self, batch: Batch) -> ModelOutput:
        h, q, q_target = self._encode(batch)
        v = self.v_head(h).squeeze(-1)  # (B, L)
        return ModelOutput(self.policy_head(h), self.reward_head(h), {"q": q, "q_target": q_target, "v": v})


def bcq_filter(q: torch.Tensor, imitation_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Q restricted to actions the data supports: keep a where G(a)/max_a' G(a') ≥ threshold.

    q, imitation_logits: (B, L, C) -> (B, L, C) with filtered entries set to ``FILTERED``.
    G(a)/max G = exp(log G(a) − max log G); the argmax of G always passes, so a row is never empty.
    """
    logp = torch.log_softmax(imitation_logits.float(), dim=-1)  # (B, L, C)
    allowed = (logp - logp.max(dim=-1, keepdim=True).values).exp() >= threshold  # (B, L, C)
    return q.float().masked_fill(~allowed, FILTERED)


class BCQ(_QModel):
    """Discrete BCQ: imitation head G(a|h_t) and Q; acts by ``bcq_filter(Q, G, threshold)``."""

    name = "bcq"

    def __init__(self, spec: ModelSpec, state_dim: int, n_channels: int, binary: bool) -> None:
        super().__init__(spec, state_dim, n_channels, binary)
        self.imitation_head = MLPHead(spec.hidden, spec.decoder_hidden, n_channels)

    def forward(self, batch: Batch) -> ModelOutput:
        h, q, q_target = self._encode(batch)
        g = self.imitation_head(h)  # (B, L, C)
        logits = bcq_filter(q, g.detach(), self.spec.bcq_threshold)  # (B, L, C)
        return ModelOutput(logits, self.reward_head(h), {"q": q, "q_target": q_target, "imitation_logits": g})


# ----------------------------------------------------------------------------- Decision Transformer

def returns_to_go(reward: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """In-window return-to-go R_t = Σ_{k ≥ t, valid} γ^{k−t} r_k, 0 in padding.

    reward, mask: (B, L) -> (B, L). Computed backwards: R_t = m_t · (r_t + γ·R_{t+1}).
    """
    r = reward.float() * mask.float()
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # (B,)
    for t in range(r.shape[1] - 1, -1, -1):
        running = (r[:, t] + gamma * running) * mask[:, t].float()
        out[:, t] = running
    return out


def conditioned_returns_to_go(prev_reward: torch.Tensor, target: float, gamma: float) -> torch.Tensor:
    """Return-to-go fed at decision time, starting from a target return and spending the observed
    rewards: R̂_0 = target, R̂_t = clip((R̂_{t−1} − r_{t−1}) / γ, 0, target) (R̂_t = target if γ = 0).

    prev_reward: (B, L) with prev_reward[:, t] = r_{t−1} -> (B, L). Uses inputs ≤ t only (causal).
    """
    B, L = prev_reward.shape
    out = prev_reward.new_full((B, L), float(target), dtype=torch.float32)
    if gamma == 0:
        return out
    cur = out[:, 0]
    for t in range(1, L):
        cur = ((cur - prev_reward[:, t].float()) / gamma).clamp(0.0, float(target))
        out[:, t] = cur
    return out


class DecisionTransformer(SequencePolicy):
    """Causal transformer over tokens e_t = W_e x_t + W_R R_t + PE(t).

    Training conditions on the hindsight in-window return-to-go (from the reward labels); predict
    conditions on ``dt_target_return`` or, by default, the largest in-window return-to-go seen in
    training (buffer ``max_return``; 1.0 before any training step).
    """

    name = "dt"
    max_return: torch.Tensor  # a buffer (register_buffer below)

    def __init__(self, spec: ModelSpec, state_dim: int, n_channels: int, binary: bool) -> None:
        super().__init__(spec, state_dim, n_channels, binary)
        H = spec.hidden
        self.embed = StepEmbedding(state_dim, n_channels, H, with_history=spec.history_stats)
        self.rtg_embed = nn.Linear(1, H)
        self.blocks = nn.ModuleList(
            AddNormBlock(H, spec.attention.heads, spec.attention.dropout) for _ in range(spec.attention.layers)
        )
        self.action_head = MLPHead(H, spec.decoder_hidden, n_channels)
        self.reward_head = MLPHead(H, spec.decoder_hidden, n_channels)
        self.register_buffer("max_return", torch.zeros(()))

    def target_return(self) -> float:
        if self.spec.dt_target_return is not None:
            return float(self.spec.dt_target_return)
        m = float(self.max_return)
        return m if m > 0 else 1.0

    def _run(self, batch: Batch, rtg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L = batch.mask.shape
        x = self.embed(batch) + self.rtg_embed(rtg.unsqueeze(-1).to(batch.state.dtype))  # (B, L, H)
        x = x + sinusoidal_positions(L, x.shape[-1], x.device).to(x.dtype)  # (B, L, H)
        attn_mask = causal_attention_mask(batch.mask)  # (B, 1, L, L)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.action_head(x), self.reward_head(x)  # (B, L, C) x 2

    def forward(self, batch: Batch) -> ModelOutput:
        rtg = returns_to_go(batch.reward, batch.mask, self.spec.gamma)  # (B, L)
        if self.training:
            with torch.no_grad():
                self.max_return.copy_(torch.maximum(self.max_return, rtg.max().to(self.max_return.dtype)))
        logits, reward = self._run(batch, rtg)
        return ModelOutput(logits, reward, {"rtg": rtg})

    def policy_logits(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        rtg = conditioned_returns_to_go(batch.prev_reward, self.target_return(), self.spec.gamma)  # (B, L)
        return self._run(batch, rtg)
