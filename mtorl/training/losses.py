"""Losses: pure functions of tensors (shapes in the docstrings), then ``compute_loss`` that picks the
objective of a model. No optimizer here: the step lives in ``mtorl.training.step``.

Notation: B windows, L steps, C channels; ``mask`` (B, L) marks valid steps; ``channel`` (B, L) is the
logged action a_t (−1 in padding); every mean is over valid steps only ("masked mean").
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mtorl.models.baselines import bcq_filter
from mtorl.models.batch import Batch, ModelOutput
from mtorl.spec.models import ObjectiveSpec

RewardKind = Literal["bce", "mse"]
AWR_MAX_WEIGHT = 100.0


# ----------------------------------------------------------------------------- helpers

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ x·m / max(Σ m, 1): x, mask (B, L) -> scalar (0 when no step is valid)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def logged(x: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """x[b, t, a_t]: (B, L, C), (B, L) -> (B, L); padding (−1) reads entry 0 and must be masked."""
    return x.gather(-1, channel.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def next_step(x: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
    """x_{t+1} aligned at t: (B, L, ...) -> (B, L, ...), the last step filled with ``fill``."""
    pad = torch.full_like(x[:, :1], fill)
    return torch.cat([x[:, 1:], pad], dim=1)


def resolve_reward_kind(objective: ObjectiveSpec, binary: bool) -> RewardKind:
    """``auto``: BCE for binary gains, MSE otherwise."""
    if objective.reward_loss == "auto":
        return "bce" if binary else "mse"
    return objective.reward_loss


# ----------------------------------------------------------------------------- supervised terms

def action_loss(logits: torch.Tensor, channel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_action = masked mean of −log softmax(logits)[a_t].  logits (B, L, C), channel/mask (B, L)."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), channel.clamp(min=0), reduction="none")  # (B, L)
    return masked_mean(nll, mask)


def reward_loss(
    reward_pred: torch.Tensor, channel: torch.Tensor, reward: torch.Tensor, mask: torch.Tensor, kind: RewardKind
) -> torch.Tensor:
    """L_reward on the logged channel's entry ŷ_t = reward_pred[b, t, a_t] (B, L):
    ``bce``: masked mean of BCEWithLogits(ŷ_t, r_t); ``mse``: masked mean of (ŷ_t − r_t)².
    reward_pred (B, L, C); channel, reward, mask (B, L)."""
    y_hat = logged(reward_pred.float(), channel)  # (B, L)
    r = reward.float()
    if kind == "bce":
        per = F.binary_cross_entropy_with_logits(y_hat, r, reduction="none")
    elif kind == "mse":
        per = (y_hat - r) ** 2
    else:
        raise ValueError(f"reward loss kind must be 'bce' or 'mse', got {kind!r}")
    return masked_mean(per, mask)


# ----------------------------------------------------------------------------- preference term

def window_returns(reward: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_i = Σ_t m_it · r_it: (B, L) -> (B,)."""
    return (reward.float() * mask.float()).sum(dim=1)


def sequence_log_likelihood(logits: torch.Tensor, channel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ℓ_i = mean over valid t of log π(a_t | h_t): logits (B, L, C) -> (B,) (0 for an empty window)."""
    logp = logged(torch.log_softmax(logits.float(), dim=-1), channel)  # (B, L)
    m = mask.float()
    return (logp * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def preference_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor | None,
    channel: torch.Tensor,
    mask: torch.Tensor,
    returns: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO-style return-contrastive loss between the best and the worst windows of the batch.

    Windows with at least one valid step are ranked by return G_i (``window_returns``); with
    k = max(1, n // 4) (n valid windows), the j-th highest-return window w_j is paired with the j-th
    lowest l_j, and

        L_pref = mean_j  −log σ( β · [ (ℓ(w_j) − ℓ_ref(w_j)) − (ℓ(l_j) − ℓ_ref(l_j)) ] ),

    ℓ = ``sequence_log_likelihood`` of the logged actions under the policy, ℓ_ref the same under
    ``ref_logits``. Without a reference model ℓ_ref = 0 and the term is a contrastive margin on the
    log-likelihoods: raise the likelihood of the logged actions of high-return windows, lower it for
    low-return ones. Only pairs with G(w_j) > G(l_j) count; the loss is 0 when all returns are equal
    or fewer than two windows are valid.

    logits, ref_logits: (B, L, C); channel, mask: (B, L); returns: (B,) -> scalar.
    """
    zero = logits.float().sum() * 0.0  # keeps the graph and the device
    valid = mask.any(dim=1).nonzero().squeeze(-1)  # (n,)
    n = int(valid.numel())
    if n < 2:
        return zero
    ell = sequence_log_likelihood(logits, channel, mask)  # (B,)
    if ref_logits is not None:
        ell = ell - sequence_log_likelihood(ref_logits.detach(), channel, mask)
    G = returns.float()[valid]  # (n,)
    order = valid[torch.argsort(G, descending=True, stable=True)]  # (n,) best first
    k = max(1, n // 4)
    win, lose = order[:k], order.flip(0)[:k]  # (k,), (k,): top-k and bottom-k, disjoint since 2k <= n
    strict = (returns.float()[win] > returns.float()[lose]).float()  # (k,)
    if float(strict.sum()) == 0.0:
        return zero
    per_pair = -F.logsigmoid(beta * (ell[win] - ell[lose]))  # (k,)
    return (per_pair * strict).sum() / strict.sum()


# ----------------------------------------------------------------------------- RL terms

def td_valid(done: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Steps with a usable TD target: valid and either terminal or followed by a valid step in the
    window (the last step of a cut window has no next state to bootstrap from). (B, L) -> (B, L)."""
    return mask & (done | next_step(mask, False))


def td_target(reward: torch.Tensor, done: torch.Tensor, mask: torch.Tensor, next_value: torch.Tensor, gamma: float) -> torch.Tensor:
    """y_t = r_t + γ · 1[not done_t and t+1 valid] · V_{t+1}; next_value (B, L) is V at t (shifted here).
    reward, done, mask, next_value: (B, L) -> (B, L), no gradient."""
    boot = (~done) & next_step(mask, False)
    return (reward.float() + gamma * boot.float() * next_step(next_value.float().detach(), 0.0)).detach()


def cql_loss(
    q: torch.Tensor, q_target: torch.Tensor, batch: Batch, gamma: float, alpha: float
) -> dict[str, torch.Tensor]:
    """Discrete CQL. q, q_target (B, L, C).

    td  = ½ · masked mean over TD-valid steps of (Q(h_t, a_t) − y_t)², y_t = r_t + γ·max_a' Q'(h_{t+1}, a')
    cql = masked mean of logsumexp_a Q(h_t, a) − Q(h_t, a_t)
    q_loss = td + α·cql
    """
    q = q.float()
    y = td_target(batch.reward, batch.done, batch.mask, q_target.float().max(dim=-1).values, gamma)  # (B, L)
    q_a = logged(q, batch.channel)  # (B, L)
    td = 0.5 * masked_mean((q_a - y) ** 2, td_valid(batch.done, batch.mask))
    reg = masked_mean(torch.logsumexp(q, dim=-1) - q_a, batch.mask)
    return {"q_loss": td + alpha * reg, "td_loss": td, "cql_loss": reg}


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """L_τ(u) = |τ − 1(u < 0)| · u², elementwise (IQL's asymmetric square)."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return weight * diff**2


def awr_weights(advantage: torch.Tensor, beta: float, max_weight: float = AWR_MAX_WEIGHT) -> torch.Tensor:
    """w = min(exp(β·A), max_weight), no gradient."""
    return torch.exp(beta * advantage.detach().float()).clamp(max=max_weight)


def iql_loss(
    q: torch.Tensor, q_target: torch.Tensor, v: torch.Tensor, policy_logits: torch.Tensor,
    batch: Batch, gamma: float, expectile: float, beta: float,
) -> dict[str, torch.Tensor]:
    """Discrete IQL. q, q_target, policy_logits (B, L, C); v (B, L).

    v_loss   = masked mean of L_τ(Q'(h_t, a_t) − V(h_t))
    q_loss   = masked mean over TD-valid steps of (Q(h_t, a_t) − (r_t + γ·V(h_{t+1})))²   (V detached)
    awr_loss = −masked mean of min(exp(β·(Q'(h_t, a_t) − V(h_t))), 100) · log π(a_t | h_t)
    """
    m = batch.mask
    qt_a = logged(q_target.float(), batch.channel)  # (B, L)
    v = v.float()
    v_loss = masked_mean(expectile_loss(qt_a - v, expectile), m)
    y = td_target(batch.reward, batch.done, m, v, gamma)
    q_loss = masked_mean((logged(q.float(), batch.channel) - y) ** 2, td_valid(batch.done, m))
    logp = logged(torch.log_softmax(policy_logits.float(), dim=-1), batch.channel)  # (B, L)
    awr = -masked_mean(awr_weights(qt_a - v, beta) * logp, m)
    return {"q_loss": q_loss, "v_loss": v_loss, "awr_loss": awr}


def bcq_loss(
    q: torch.Tensor, q_target: torch.Tensor, imitation_logits: torch.Tensor, batch: Batch, gamma: float, threshold: float
) -> dict[str, torch.Tensor]:
    """Discrete BCQ. q, q_target, imitation_logits (B, L, C).

    a*_{t+1} = argmax_a of Q(h_{t+1}, a) over a with G(a|h_{t+1}) / max G ≥ threshold
    y_t      = r_t + γ · Q'(h_{t+1}, a*_{t+1})
    q_loss   = masked mean over TD-valid steps of Huber(Q(h_t, a_t) − y_t)
    imitation_loss = masked mean of −log G(a_t | h_t)
    """
    a_next = bcq_filter(q.detach(), imitation_logits.detach(), threshold).argmax(dim=-1)  # (B, L): a* at t
    v_next = q_target.float().gather(-1, a_next.unsqueeze(-1)).squeeze(-1)  # (B, L): Q'(h_t, a*_t)
    y = td_target(batch.reward, batch.done, batch.mask, v_next, gamma)
    huber = F.smooth_l1_loss(logged(q.float(), batch.channel), y, reduction="none")
    q_loss = masked_mean(huber, td_valid(batch.done, batch.mask))
    imitation = action_loss(imitation_logits, batch.channel, batch.mask)
    return {"q_loss": q_loss, "imitation_loss": imitation}


# ----------------------------------------------------------------------------- objective

def compute_loss(
    model: torch.nn.Module,
    out: ModelOutput,
    batch: Batch,
    objective: ObjectiveSpec,
    binary: bool,
    ref_logits: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every loss of one batch; ``loss`` is the one to minimise.

    mtorl:          L = L_action + μ·L_reward + λ·L_pref       (μ = reward_weight, λ = pref_weight)
    bc_mlp/bc_seq/dt/logreg: L = L_action + μ·L_reward
    cql:            L = q_loss (td + α·cql) + μ·L_reward
    iql:            L = q_loss + v_loss + awr_loss + μ·L_reward
    bcq:            L = q_loss + imitation_loss + μ·L_reward
    ``action_loss`` is always the cross-entropy of the logged actions under the acting policy's
    logits (for bcq: under G, since filtered actions have logit −1e9); ``pref_loss`` is 0 for baselines.
    """
    kind = resolve_reward_kind(objective, binary)
    model_kind = getattr(model, "reward_kind", kind)
    if model_kind != kind:
        raise ValueError(f"the model's reward head is built for {model_kind!r} but the objective asks for {kind!r}")
    name = getattr(model, "name", "mtorl")
    spec = getattr(model, "spec", None)
    mu = objective.reward_weight
    l_reward = reward_loss(out.reward_pred, batch.channel, batch.reward, batch.mask, kind)
    zero = l_reward * 0.0
    losses: dict[str, torch.Tensor] = {"reward_loss": l_reward, "pref_loss": zero}

    if name == "mtorl":
        l_action = action_loss(out.action_logits, batch.channel, batch.mask)
        l_pref = preference_loss(
            out.action_logits, ref_logits, batch.channel, batch.mask,
            window_returns(batch.reward, batch.mask), objective.pref_beta,
        )
        losses.update(action_loss=l_action, pref_loss=l_pref)
        total = l_action + mu * l_reward + objective.pref_weight * l_pref
    elif name in ("bc_mlp", "bc_seq", "dt", "logreg"):
        l_action = action_loss(out.action_logits, batch.channel, batch.mask)
        losses["action_loss"] = l_action
        total = l_action + mu * l_reward
    elif name == "cql":
        assert spec is not None
        rl = cql_loss(out.extras["q"], out.extras["q_target"], batch, spec.gamma, spec.cql_alpha)
        losses.update(rl, action_loss=action_loss(out.action_logits, batch.channel, batch.mask).detach())
        total = rl["q_loss"] + mu * l_reward
    elif name == "iql":
        assert spec is not None
        rl = iql_loss(out.extras["q"], out.extras["q_target"], out.extras["v"], out.action_logits,
                      batch, spec.gamma, spec.iql_expectile, spec.iql_beta)
        losses.update(rl, action_loss=action_loss(out.action_logits, batch.channel, batch.mask).detach())
        total = rl["q_loss"] + rl["v_loss"] + rl["awr_loss"] + mu * l_reward
    elif name == "bcq":
        assert spec is not None
        rl = bcq_loss(out.extras["q"], out.extras["q_target"], out.extras["imitation_logits"],
                      batch, spec.gamma, spec.bcq_threshold)
        losses.update(rl, action_loss=rl["imitation_loss"])
        total = rl["q_loss"] + rl["imitation_loss"] + mu * l_reward
    else:
        raise ValueError(f"no objective for model {name!r}")
    losses["loss"] = total
    return losses
