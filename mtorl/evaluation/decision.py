"""The decision layer: which channel to serve each user, and whom to serve within a budget (pure numpy).

One function, `decide`, is used by offline evaluation (budget curves, OPE target policies, the
validation metric), online allocation (`allocation.allocate_requests`, behind `/v1/allocate`) and
the simulator's closed loop, so the three can never disagree.

Notation, for N items (users or user-steps) and C channels: predicted reward rhat (N, C) from the
per-channel reward head, the action decoder's probabilities pi (N, C) (an estimate of the logging
policy pi_b(c | s), since the decoder imitates the logs), cost kappa (N, C) >= 0, penalty s >= 0.

1. Per-channel scores q (N, C), the pessimistic reward estimate of serving c:

   policy "reward" (default): act on the reward head where the logs support it,
        q_c = rhat_c - beta * u_c - beta_e * sd_c,   u_c = sqrt(rhat_c (1 - rhat_c) / max(pi_c, 1e-3))
        q_c = -inf                             when pi_c < tau * max_c' pi_c'   (support constraint)
      u_c is the standard-error proxy of an inverse-propensity estimate of channel c's reward in this
      context (Bernoulli variance over the logged share of c): large where the logs rarely chose c.
      tau (``support_threshold``) is BCQ's relative-probability threshold (Fujimoto et al. 2019);
      beta (``pessimism``) is a lower-confidence-bound penalty in the spirit of CQL / pessimistic
      offline RL. tau = 0 and beta = 0 give the plain greedy rule on the reward head; tau = 1 keeps
      only the logger's most likely channel. sd_c is an ensemble's spread of rhat_c (the members'
      population std, ``models.ensemble``; 0 for a single model) and beta_e (``ensemble_pessimism``)
      its weight: the members' disagreement as a second lower-confidence-bound penalty.
   policy "imitation": today's pi-reweighted rule kept for comparison: the channel is
        argmax_c pi_c * max(rhat_c - s kappa_c, 0) / kappa_c   (allocation.channel_scores)
      and q is rhat on that channel (every other channel -inf).

2. The penalised rule at penalty s (the Lagrangian of "maximise expected reward, spend <= B"):
        c*(s)     = argmax_c q_c - s * kappa_c      (ties: the cheaper channel, then the lower index)
        value(s)  = q_{c*} - s * kappa_{c*}          the penalised expected reward of the SERVED channel
        served(s) = value(s) > 0
   Items are ranked by q_{c*} / kappa_{c*} (the expected reward per cost of the channel actually
   served; free items first). Serving {value(s) > 0} is exactly the prefix of that ranking with
   ratio > s when each item has one channel.

3. The penalty s as the budget's Lagrange multiplier. spend(s) = sum over served items of
   kappa_{c*(s)} is non-increasing in s (if s1 < s2 then kappa_{c*(s1)} >= kappa_{c*(s2)}: add the two
   optimality inequalities), so bisection finds the smallest s with spend(s) <= B: the returned s
   fits, and s - (1e-12 relative) does not. At the breakpoint several items change at once
   (discreteness); with ``fill`` the leftover budget B - spend(s) is then spent greedily on those
   marginal changes (the decision they take just below s), in order of added reward per added cost,
   skipping any that does not fit, so spend stays <= B. Without a budget, s is the given penalty.

   For every s the served set is optimal for the budget it spends (Everett 1963): no other choice of
   channels and users spending at most spend(s) has a larger total q.

Training is NOT conditioned on s: the reward head is trained once on r = MinMaxNorm(g - s0 * w) with
the dataset's fixed penalty s0 (0 in every shipped spec), and s is applied here, at decision time.
That equals training at any other s: with r_s = (g - s w - m_s) / (M_s - m_s),
    E[r_s | c] = ((M_0 - m_0) E[r_0 | c] + m_0 - m_s - s kappa_c) / (M_s - m_s),
an increasing affine map of E[r_0 | c] - (s / (M_0 - m_0)) kappa_c, so argmax_c and the sign test
agree with rhat_0 - s' kappa at s' = s / (M_0 - m_0) (exact while the clip to [0, 1] is inactive,
i.e. on rewards inside the train range). s here is in normalised-reward units per unit of cost.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple, Sequence

import numpy as np

__all__ = ["Decision", "DecisionParams", "channel_values", "choose", "spend_at", "solve_penalty", "decide",
           "decision_metrics", "POLICIES"]

POLICIES = ("reward", "imitation")
PI_FLOOR = 1e-3


class DecisionParams(NamedTuple):
    """The decision layer's knobs (a `spec.DecisionSpec` has the same fields)."""

    policy: Literal["reward", "imitation"] = "reward"
    support_threshold: float = 0.5
    pessimism: float = 0.0
    fill: bool = True
    ensemble_pessimism: float = 0.0
    channel_cost_weight: float = 1.0


class Decision(NamedTuple):
    channel: np.ndarray          # (N,) int  c*, the channel each item would be served
    value: np.ndarray            # (N,) float q_{c*} - s kappa_{c*} (served iff > 0, or chosen by fill)
    expected_reward: np.ndarray  # (N,) float rhat_{c*}
    cost: np.ndarray             # (N,) float kappa_{c*}
    served: np.ndarray           # (N,) bool
    penalty: float               # s
    spend: float                 # sum of cost over served items (<= budget when one is given)


def params_of(spec: Any) -> DecisionParams:
    """DecisionParams from a DecisionSpec (or anything with those attributes), None -> defaults."""
    if spec is None:
        return DecisionParams()
    if isinstance(spec, DecisionParams):
        return spec
    return DecisionParams(policy=spec.policy, support_threshold=float(spec.support_threshold),
                          pessimism=float(spec.pessimism), fill=bool(spec.fill),
                          ensemble_pessimism=float(spec.ensemble_pessimism),
                          channel_cost_weight=float(spec.channel_cost_weight))


def broadcast_cost(cost: np.ndarray | Sequence[float] | float, shape: tuple[int, int]) -> np.ndarray:
    """cost: scalar, (C,) per channel, (N,) per item (same for every channel) or (N, C) -> (N, C) float64."""
    k = np.asarray(cost, dtype=np.float64)
    n, c = shape
    if k.ndim == 1 and k.shape[0] == n and (n != c or c == 1):
        k = k[:, None]
    elif k.ndim == 1 and k.shape[0] != c:
        raise ValueError(f"cost of shape {k.shape} matches neither C={c} channels nor N={n} items")
    k = np.broadcast_to(k, shape)
    if np.any(k < 0) or not np.all(np.isfinite(k)):
        raise ValueError("costs must be finite and >= 0")
    return k


def channel_values(reward_pred: np.ndarray, action_probs: np.ndarray | None, params: DecisionParams = DecisionParams(),
                   cost: np.ndarray | None = None, penalty: float = 0.0,
                   reward_std: np.ndarray | None = None) -> np.ndarray:
    """Per-channel pessimistic scores q (N, C) (step 1 of the module docstring); -inf = not allowed.

    reward_pred (N, C); action_probs (N, C) or None (then uniform: no support constraint, u_c with
    pi = 1/C); cost (N, C) and penalty are only read by the "imitation" policy; reward_std (N, C) the
    ensemble members' spread of rhat (None = a single model: 0), read when ensemble_pessimism > 0.
    """
    r = np.asarray(reward_pred, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"reward_pred must be (N, C), got {r.shape}")
    pi = np.full_like(r, 1.0 / max(r.shape[1], 1)) if action_probs is None else np.asarray(action_probs, dtype=np.float64)
    if pi.shape != r.shape:
        raise ValueError(f"action_probs {pi.shape} and reward_pred {r.shape} must both be (N, C)")
    if params.policy == "imitation":
        from mtorl.evaluation.allocation import channel_scores, recommended_channel

        k = broadcast_cost(0.0 if cost is None else cost, r.shape)
        best = recommended_channel(channel_scores(pi, r, k, penalty), pi)
        q = np.full_like(r, -np.inf)
        rows = np.arange(r.shape[0])
        q[rows, best] = r[rows, best]
        return q
    if params.policy != "reward":
        raise ValueError(f"unknown decision policy {params.policy!r}: one of {POLICIES}")
    q = r.copy()
    if params.pessimism > 0:
        var = np.clip(r * (1.0 - r), 0.0, 0.25)
        q = q - params.pessimism * np.sqrt(var / np.maximum(pi, PI_FLOOR))
    if params.ensemble_pessimism > 0 and reward_std is not None:
        sd = np.asarray(reward_std, dtype=np.float64)
        if sd.shape != r.shape:
            raise ValueError(f"reward_std {sd.shape} and reward_pred {r.shape} must both be (N, C)")
        q = q - params.ensemble_pessimism * sd
    if params.support_threshold > 0 and action_probs is not None:
        supported = pi >= params.support_threshold * pi.max(axis=1, keepdims=True)
        q = np.where(supported, q, -np.inf)
    return q


def choose(q: np.ndarray, cost: np.ndarray, s: float, channel_cost_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """c*(s) (N,) = argmax_c q_c - g s kappa_c and value(s) (N,) = q_{c*} - s kappa_{c*} (ties: cheaper
    channel, then lower index); g = ``channel_cost_weight``. With g = 1 (the Lagrangian rule) the value is
    max_c q_c - s kappa_c; with g < 1 the channel is chosen with the penalty discounted, and the user is
    still served on the full penalised value."""
    net = q - channel_cost_weight * s * cost             # (N, C)
    best = net.max(axis=1, keepdims=True)                # (N, 1)
    # among the (near-)maximal channels take the cheapest: keeps spend(s) monotone at ties
    tie = net >= best - 1e-12 * np.maximum(np.abs(best), 1.0)
    c = np.argmin(np.where(tie, cost, np.inf), axis=1)
    rows = np.arange(q.shape[0])
    return c, q[rows, c] - s * cost[rows, c]


def bisect_smallest(fits: Callable[[float], bool], lo: float, hi: float, tol: float, max_iter: int,
                    floor: float = 1e-300) -> tuple[float, float]:
    """(lo, hi) bracketing the smallest x with ``fits(x)``, by bisection, for ``fits`` False at ``lo`` and
    True at ``hi``; stops when hi - lo <= tol * max(hi, floor) or after ``max_iter`` halvings."""
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
        if hi - lo <= tol * max(hi, floor):
            break
    return lo, hi


def spend_at(q: np.ndarray, cost: np.ndarray, s: float, channel_cost_weight: float = 1.0) -> float:
    """spend(s) = sum of kappa_{c*(s)} over items with value(s) > 0."""
    c, v = choose(q, cost, s, channel_cost_weight)
    return float(cost[np.arange(q.shape[0]), c][v > 0].sum())


def solve_penalty(q: np.ndarray, cost: np.ndarray, budget: float, fill: bool = True,
                  tol: float = 1e-12, max_iter: int = 200,
                  channel_cost_weight: float = 1.0) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """The smallest s >= 0 with spend(s) <= budget, by bisection; q, cost (N, C).

    Returns (s, channel (N,), value (N,), served (N,) bool) at s, with the leftover budget filled
    (``fill``) from the decisions just below s. Spend never exceeds ``budget``. With
    ``channel_cost_weight`` g < 1 (``choose``) spend(s) need not fall monotonically (a user moved to a
    cheaper channel as s grows can become worth serving), so s is the bisection's point, the smallest
    such s only where spend is monotone; spend <= budget holds either way (the bisection keeps it at its
    upper end).
    """
    budget = max(float(budget), 0.0)
    g = float(channel_cost_weight)
    rows = np.arange(q.shape[0])
    c0, v0 = choose(q, cost, 0.0, g)
    if q.shape[0] == 0 or float(cost[rows, c0][v0 > 0].sum()) <= budget:
        return 0.0, c0, v0, v0 > 0
    paid = (cost > 0) & np.isfinite(q) & (q > 0)
    # above every q/kappa nothing paid is worth serving: spend(hi) = 0 <= budget
    hi = float(np.max(np.where(paid, q / np.where(paid, cost, 1.0), 0.0))) * (1 + 1e-9) + 1e-12
    lo, hi = bisect_smallest(lambda s: spend_at(q, cost, s, g) <= budget, 0.0, hi, tol, max_iter)
    c, v = choose(q, cost, hi, g)
    served = v > 0
    if fill:
        c_lo, v_lo = choose(q, cost, lo, g)
        s_lo = v_lo > 0
        spend = float(cost[rows, c][served].sum())
        # marginal items: their decision just below s differs from the one at s
        marg = np.flatnonzero((s_lo != served) | (s_lo & (c_lo != c)))
        d_cost = cost[marg, c_lo[marg]] - np.where(served[marg], cost[marg, c[marg]], 0.0)
        d_gain = q[marg, c_lo[marg]] - np.where(served[marg], q[marg, c[marg]], 0.0)
        ratio = np.divide(d_gain, d_cost, out=np.full(marg.size, np.inf), where=d_cost > 0)
        for j in np.argsort(-ratio, kind="stable"):
            if d_gain[j] <= 0 and d_cost[j] >= 0:
                continue
            if spend + d_cost[j] <= budget * (1 + 1e-12):
                i = marg[j]
                spend += d_cost[j]
                c[i], served[i] = c_lo[i], True
                v[i] = q[i, c[i]] - hi * cost[i, c[i]]
    return float(hi), c, v, served


def decide(reward_pred: np.ndarray, action_probs: np.ndarray | None, cost: Any, params: Any = None,
           budget: float | None = None, penalty: float | None = None,
           reward_std: np.ndarray | None = None) -> Decision:
    """The decision layer (module docstring): channels, values and who is served.

    reward_pred, action_probs (N, C); cost scalar | (C,) | (N,) | (N, C); params: DecisionParams or a
    DecisionSpec (None = defaults); reward_std (N, C) the ensemble members' spread of reward_pred (None =
    a single model), read when ``ensemble_pessimism`` > 0 (``channel_values``). With ``budget`` the
    penalty s is solved for it (smallest s whose rule spends <= budget); without, s = ``penalty``
    (default 0) and every item with value > 0 is served.
    """
    prm = params_of(params)
    r = np.asarray(reward_pred, dtype=np.float64)
    k = broadcast_cost(cost, r.shape)
    s0 = 0.0 if penalty is None else float(penalty)
    if s0 < 0 or not np.isfinite(s0):
        raise ValueError(f"penalty must be finite and >= 0, got {s0}")
    q = channel_values(r, action_probs, prm, k, s0, reward_std=reward_std)
    rows = np.arange(r.shape[0])
    if q.shape[0] and not np.all(np.isfinite(q).any(axis=1)):
        raise ValueError("a row has no allowed channel")
    if budget is None:
        s = s0
        c, v = choose(q, k, s, prm.channel_cost_weight)
        served = v > 0
    else:
        if not np.isfinite(budget):
            raise ValueError(f"budget must be finite, got {budget}")
        s, c, v, served = solve_penalty(q, k, budget, fill=prm.fill, channel_cost_weight=prm.channel_cost_weight)
    kb = k[rows, c]
    return Decision(channel=c.astype(np.int64), value=v, expected_reward=r[rows, c], cost=kb, served=served,
                    penalty=float(s), spend=float(kb[served].sum()))


def ranking(d: Decision) -> np.ndarray:
    """Item order by expected reward per cost of the served channel (free items first), stable."""
    ratio = np.divide(d.value + d.penalty * d.cost, d.cost, out=np.full(d.cost.shape, np.inf), where=d.cost > 0)
    return np.argsort(-ratio, kind="stable")


def decision_metrics(channel: np.ndarray, action_probs: np.ndarray, outcome: np.ndarray, reward_pred: np.ndarray,
                     cost: np.ndarray, propensity: np.ndarray | None = None, params: Any = None,
                     budget_fraction: float | None = 0.3, penalty: float | None = None,
                     epsilon: float = 0.05) -> dict[str, float]:
    """Validation metrics of the DECISIONS (for checkpoint selection and tuning), over N logged steps.

    channel (N,) logged a_t, action_probs (N, C), outcome (N,) y_t (1[g > 0] or r_t), reward_pred (N, C),
    cost (N,) logged w_t, propensity (N,) logged pi_b(a_t) (NaN / None: unknown).
        select_rate@budget  mean outcome of the steps the decision layer serves within
                            B = budget_fraction * sum(w) (steps priced at their logged cost; s solved;
                            0 when nothing is served)
        decision_penalty    that s
        decision_dr         DR value of the epsilon-greedy decision policy at s = penalty (no budget):
                            mean[sum_c pi_e(c) rhat_c + pi_e(a)/b (y - rhat_a)], only when every
                            propensity is known
        decision_dr@budget  DR value (per logged step) of the budgeted decision: channels priced at
                            their mean logged cost, s solved for B, served steps earn
                            rhat_{c*} + 1[a = c*]/b (y - rhat_a), unserved ones 0 (propensities needed)
    Names carry no prefix (the caller adds ``val/``).
    """
    out: dict[str, float] = {}
    r = np.asarray(reward_pred, dtype=np.float64)
    n = r.shape[0]
    if n == 0:
        return out
    y = np.asarray(outcome, dtype=np.float64)
    w = np.asarray(cost, dtype=np.float64)
    w = w if w.sum() > 0 else np.ones(n)
    if budget_fraction is not None:
        d = decide(r, action_probs, w, params, budget=float(budget_fraction) * float(w.sum()))
        out["select_rate@budget"] = float(y[d.served].mean()) if d.served.any() else 0.0  # nothing served: no reward
        out["decision_penalty"] = d.penalty
    if propensity is not None:
        b = np.asarray(propensity, dtype=np.float64)
        a = np.asarray(channel, dtype=np.int64)
        rows = np.arange(n)
        if budget_fraction is not None and np.all(np.isfinite(b) & (b > 0)):
            # the budgeted decision: channels priced at their mean logged cost, s solved for B
            cnt = np.bincount(a, minlength=r.shape[1]).astype(np.float64)
            kc = np.where(cnt > 0, np.bincount(a, weights=w, minlength=r.shape[1]) / np.maximum(cnt, 1), w.mean())
            d = decide(r, action_probs, kc, params, budget=float(budget_fraction) * float(w.sum()))
            hit = (a == d.channel) / b
            out["decision_dr@budget"] = float(np.mean(d.served * (d.expected_reward + hit * (y - r[rows, a]))))
        if np.all(np.isfinite(b) & (b > 0)):
            c = decide(r, action_probs, broadcast_cost(w, r.shape), params, penalty=penalty).channel
            pi_e = np.full(r.shape, epsilon / r.shape[1])
            pi_e[rows, c] += 1.0 - epsilon
            out["decision_dr"] = float(np.mean((pi_e * r).sum(axis=1) + pi_e[rows, a] / b * (y - r[rows, a])))
    return out
