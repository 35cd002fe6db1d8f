"""Budget allocation (pure numpy): the decision layer applied to a batch, offline and online.

Every decision goes through `mtorl.evaluation.decision.decide`: the channel comes from the
per-channel reward head (pessimistic where the logs give little support), users are served in
order of the expected reward of the served channel per cost, and the penalty s is the budget's
Lagrange multiplier, solved by bisection. The same function serves offline evaluation
(`budget_curve`), the online `/v1/allocate` endpoint (`allocate_requests`), `/v1/recommend`
(`decide` at the checkpoint's fixed penalty) and the simulator's closed loop.

The pi-reweighted channel module of earlier versions is kept as the decision layer's "imitation"
policy (per step / user, C channels, policy pi, predicted reward rhat, cost kappa, penalty s >= 0):

    net_c = max(rhat_c - s * kappa_c, 0)
    w_c   = pi_c * net_c / kappa_c     if kappa_c > 0
    w_c   = pi_c * max(rhat_c, 0)      if kappa_c == 0   (no division: with all costs zero, w = pi * rhat)

    c* = argmax_c w_c; a row whose weights are all zero falls back to argmax pi (ties: lowest index).

`allocate_users` is the plain greedy knapsack over fixed item values v_i and costs c_i (ranked by
v_i / c_i, free items with v_i > 0 first, the longest prefix with cumulative cost <= B; its
multiplier lam is the smallest with {v_i - lam c_i > 0} inside the budget).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from mtorl.evaluation.decision import bisect_smallest, broadcast_cost
from mtorl.evaluation.predictions import Predictions, outcome

__all__ = ["channel_scores", "recommended_channel", "Allocation", "allocate_users",
           "allocate_requests", "budget_curve", "channel_costs"]


def channel_scores(action_probs: np.ndarray, reward_pred: np.ndarray,
                   cost: np.ndarray | Sequence[float] | float, penalty: float = 0.0) -> np.ndarray:
    """Channel-level reweighting (formula in the module docstring).

    action_probs (N, C), reward_pred (N, C), cost scalar | (C,) | (N,) | (N, C)  ->  w (N, C) >= 0.
    A (N,) cost is used for every channel of the row. When N == C a 1-D cost is read as per channel.
    """
    pi = np.asarray(action_probs, dtype=np.float64)
    r = np.asarray(reward_pred, dtype=np.float64)
    if pi.shape != r.shape or pi.ndim != 2:
        raise ValueError(f"action_probs {pi.shape} and reward_pred {r.shape} must both be (N, C)")
    k = broadcast_cost(cost, pi.shape)
    paid = k > 0
    net = np.maximum(r - penalty * k, 0.0)
    per_cost = np.divide(net, k, out=np.zeros_like(net), where=paid)
    return pi * np.where(paid, per_cost, np.maximum(r, 0.0))


def recommended_channel(weights: np.ndarray, action_probs: np.ndarray) -> np.ndarray:
    """(N,) argmax of the weights; argmax of the policy where every weight of the row is 0."""
    best: np.ndarray = np.argmax(weights, axis=1)
    dead = weights.max(axis=1) <= 0
    if np.any(dead):
        best = np.where(dead, np.argmax(action_probs, axis=1), best)
    return best


class Allocation(NamedTuple):
    selected: np.ndarray      # (N,) bool
    multiplier: float         # Lagrange multiplier lam of the budget (0 when the budget is slack)
    spend: float              # sum of the selected costs, <= budget


def _spend_at(lam: float, v: np.ndarray, c: np.ndarray, free: np.ndarray) -> float:
    return float(c[(v - lam * c > 0) & ~free].sum())


def allocate_users(values: np.ndarray, costs: np.ndarray, budget: float,
                   require_positive: bool = False, tol: float = 1e-9, max_iter: int = 100) -> Allocation:
    """User-level module: greedy by value per cost within `budget` (see the module docstring).

    values (N,), costs (N,) >= 0, budget >= 0 -> Allocation(selected (N,) bool, multiplier, spend).
    require_positive=False also fills the budget with items of value <= 0 after the positive ones
    (top-k semantics, used by `budget_curve`); True never selects them (online allocation).
    Free items (cost 0) are always selected (when their value is positive, or require_positive is off).
    """
    v = np.asarray(values, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    if v.shape != c.shape or v.ndim != 1:
        raise ValueError(f"values {v.shape} and costs {c.shape} must both be (N,)")
    if np.any(c < 0) or not np.all(np.isfinite(c)) or not np.all(np.isfinite(v)):
        raise ValueError("costs must be finite and >= 0, values finite")
    budget = max(float(budget), 0.0)
    free = c == 0
    ratio = np.divide(v, c, out=np.where(v > 0, np.inf, v).astype(np.float64), where=~free)
    order = np.argsort(-ratio, kind="stable")
    eligible = (v[order] > 0) if require_positive else np.ones(v.size, dtype=bool)
    cum = np.cumsum(np.where(eligible, c[order], 0.0))
    fits = cum <= budget
    # longest prefix that fits: everything before the first item that does not fit
    stop = int(np.argmin(fits)) if not fits.all() else v.size
    take = np.zeros(v.size, dtype=bool)
    take[:stop] = True
    take |= free[order]                # cost nothing: always within budget
    take &= eligible
    selected = np.zeros(v.size, dtype=bool)
    selected[order] = take
    spend = float(c[selected].sum())

    # Lagrange multiplier: smallest lam >= 0 with spend({v - lam c > 0}) <= budget (bisection)
    lam = 0.0
    if v.size and _spend_at(0.0, v, c, free) > budget:
        _, lam = bisect_smallest(lambda x: _spend_at(x, v, c, free) <= budget, 0.0,
                                 float(np.max(ratio[np.isfinite(ratio)], initial=0.0)) + 1.0, tol, max_iter, floor=1.0)
    return Allocation(selected=selected, multiplier=float(lam), spend=spend)


def allocate_requests(users: Sequence[tuple[Any, Sequence[float], Sequence[float], Sequence[float] | float]],
                      budget: float, penalty: float | None = None,
                      channels: Sequence[str] | None = None, decision: Any = None,
                      reward_std: np.ndarray | None = None) -> dict[str, Any]:
    """Online allocation for a batch of users (the `/v1/allocate` body), through the decision layer.

    users: [(user_id, reward_pred (C,), action_probs (C,), cost (C,) or scalar)], budget >= 0,
    penalty: a floor on s (None = 0), decision: DecisionParams / DecisionSpec (None = defaults),
    reward_std (U, C): an ensemble's spread of reward_pred, row per user (None = a single model).
    `decision.decide` solves the smallest penalty s whose rule (channel c* = argmax_c q_c - s kappa_c,
    serve when q_{c*} - s kappa_{c*} > 0) spends <= budget; s = max(that, penalty).
    Returns {selected: [{user_id, channel, channel_index, expected_reward, value, cost}] ranked by
    expected reward per cost of the served channel, total_expected_reward, spend, multiplier, penalty};
    `penalty` and `multiplier` are both the s used (s is the budget's Lagrange multiplier); `channel`
    is the name when `channels` is given, else the index; expected_reward is rhat of the served
    channel and value = q_{c*} - s kappa_{c*}.
    """
    from mtorl.evaluation.decision import decide, ranking

    floor = 0.0 if penalty is None else float(penalty)
    if not users:
        return {"selected": [], "total_expected_reward": 0.0, "spend": 0.0, "multiplier": floor, "penalty": floor}
    ids = [u[0] for u in users]
    r = np.stack([np.asarray(u[1], dtype=np.float64) for u in users])           # (U, C)
    pi = np.stack([np.asarray(u[2], dtype=np.float64) for u in users])          # (U, C)
    k = np.stack([np.broadcast_to(np.asarray(u[3], dtype=np.float64), r.shape[1:]) for u in users])
    if r.shape != pi.shape:
        raise ValueError(f"reward_pred {r.shape[1:]} and action_probs {pi.shape[1:]} differ in channels")
    if channels is not None and len(channels) != r.shape[1]:
        raise ValueError(f"{len(channels)} channel names for {r.shape[1]} channels")
    d = decide(r, pi, k, decision, budget=budget, reward_std=reward_std)
    if d.penalty < floor:
        d = decide(r, pi, k, decision, penalty=floor, reward_std=reward_std)  # spend(floor) <= spend(s) <= budget
    idx = [i for i in ranking(d) if d.served[i]]
    out = [{"user_id": ids[i],
            "channel": channels[d.channel[i]] if channels is not None else int(d.channel[i]),
            "channel_index": int(d.channel[i]),
            "expected_reward": float(d.expected_reward[i]),
            "value": float(d.value[i]),
            "cost": float(d.cost[i])} for i in idx]
    return {"selected": out,
            "total_expected_reward": float(d.expected_reward[idx].sum()),
            "spend": float(d.cost[idx].sum()),
            "multiplier": d.penalty, "penalty": d.penalty}


def channel_costs(p: Predictions) -> np.ndarray:
    """(C,) mean logged cost per channel in `p` (a channel never logged gets the overall mean)."""
    c = p.n_channels
    n = np.bincount(p.channel, minlength=c).astype(np.float64)
    tot = np.bincount(p.channel, weights=p.cost, minlength=c)
    overall = float(p.cost.mean()) if p.n_steps else 1.0
    return np.where(n > 0, tot / np.maximum(n, 1), overall)


def budget_curve(p: Predictions, fractions: Sequence[float], policy: str = "model",
                 penalty: float = 0.0, cost_per_channel: np.ndarray | None = None,
                 seed: int = 0, decision: Any = None) -> dict[str, Any]:
    """Offline budget curve over user-steps of a split, through the decision layer.

    For each fraction f: budget B = f * (total logged cost) (unit costs when the logged costs sum to
    0). Each step costs its LOGGED cost whatever the channel (the spend the log can vouch for, and
    the same for every model), and `decision.decide` picks the channel (argmax of the pessimistic
    reward q) and solves the smallest penalty s whose served set {q_{c*} - s w_t > 0} fits B (s is
    floored at `penalty`), filling the leftover at the breakpoint. So steps are served in order of
    q_{c*} / w_t, the expected reward of the served channel per cost. q subtracts beta_e * the
    ensemble's spread (`p.reward_std`, None for a single model) as the closed loop does.
        select_rate = mean outcome of the selected steps
        replay_rate = sum of outcomes over selected steps whose chosen channel == logged channel,
                      divided by the number selected (as the reference notebooks do)
        roi         = sum of logged gain of the selected steps / spend (None when spend is 0)
    policy: "model" (the decision layer as configured), "reward" (no support constraint: uniform pi),
    "random" (random values, seeded; the channel is still the model's). `cost_per_channel` is
    accepted for compatibility; the curve prices steps at their logged cost.
    Returns {base_rate, total_cost, policy, points: [{fraction, budget, spend, selected, select_rate,
    replay_rate, roi, multiplier, penalty}]}; base_rate = mean outcome of every step; multiplier =
    penalty = s.
    """
    from mtorl.evaluation.decision import decide

    y = outcome(p)
    pi: np.ndarray | None = p.action_probs
    if policy == "reward":
        pi = None
    elif policy not in ("model", "random"):
        raise ValueError(f"unknown policy {policy!r}: model, reward or random")
    step_cost = p.cost if p.cost.sum() > 0 else np.ones(p.n_steps)
    total = float(step_cost.sum())
    reward_pred, sd = p.reward_pred, p.reward_std
    if policy == "random":
        best = decide(p.reward_pred, pi, step_cost, decision, reward_std=sd).channel
        reward_pred = np.broadcast_to(np.random.default_rng(seed).random(p.n_steps)[:, None], p.reward_pred.shape)
        pi, sd = None, None
    points = []
    for f in fractions:
        budget = float(np.round(float(f) * total, 9))
        d = decide(reward_pred, pi, step_cost, decision, budget=budget, reward_std=sd)
        if d.penalty < penalty:
            d = decide(reward_pred, pi, step_cost, decision, penalty=penalty, reward_std=sd)
        sel = d.served
        match = (d.channel if policy != "random" else best) == p.channel
        n_sel = int(sel.sum())
        spend = float(step_cost[sel].sum())
        points.append({
            "fraction": float(f),
            "budget": budget,
            "spend": spend,
            "selected": n_sel,
            "select_rate": float(y[sel].mean()) if n_sel else None,
            "replay_rate": float(y[sel & match].sum() / n_sel) if n_sel else None,
            "roi": float(p.gain[sel].sum() / spend) if spend > 0 else None,
            "multiplier": d.penalty,
            "penalty": d.penalty,
        })
    return {"base_rate": float(y.mean()) if p.n_steps else None, "total_cost": total,
            "policy": policy, "points": points}
