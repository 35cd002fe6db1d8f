"""Closed-loop ("online") evaluation of a policy in the simulator under a budget, and OPE ground truth.

``run_online`` plays N fresh users step by step. At each step the policy sees the active users'
observations; this step's share of the remaining budget is spent (pacing follows the expected number
of active users per step). Unserved steps get no exposure and no reward. A policy returns either

* per-channel scores ``q (B, C)`` (its expected reward of serving each channel; -inf = not allowed):
  then the decision layer (``mtorl.evaluation.decision.solve_penalty``, the same function as offline
  evaluation and ``/v1/allocate``) solves the penalty s for the step's budget and serves
  c* = argmax_c q_c - s kappa_c to the users with q_{c*} - s kappa_{c*} > 0; or
* ``(channel (B,) int, value (B,) float)``: users are served in order of value per cost of that channel
  (the logging policy, which does not rank users, uses random values).

Built-in policies: the logging policy, random, the full oracle (knows the hidden interest z: the
ceiling), and the observable oracle (knows the response model but sees only what a learner sees, so
it marginalises z over its posterior given the observed features and outcomes: the ceiling of what is
learnable). The gap between the two oracles is what no learner can close.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtorl.sim.model import STEP_FEATURES, Simulator, UserState

PolicyFn = Callable[["Observation"], "tuple[np.ndarray, np.ndarray] | np.ndarray"]


@dataclass
class Observation:
    """What a policy sees for the B active users at step t (all users of a run step in lockstep).

    ``state`` is raw (not normalised) ``concat(q_t, f)`` in the journeys column order
    (hour_sin, hour_cos, recency, f0..f{D-1}). ``prev_channel`` is -1 at the first step and after an
    unserved step; ``prev_reward`` is the previous outcome (0 when unserved).
    ``sim``, ``hidden`` and ``idx`` are the ground truth, for oracle policies only.
    """

    t: int
    user: np.ndarray  # (B,) user index in [0, n_users)
    state: np.ndarray  # (B, D_raw) float32
    prev_channel: np.ndarray  # (B,) int64
    prev_reward: np.ndarray  # (B,) float32
    sim: Simulator
    hidden: UserState
    idx: np.ndarray  # (B,) rows of ``hidden``
    _history: dict[str, np.ndarray] | None = None

    def history(self) -> dict[str, np.ndarray]:
        """Whole observable histories up to now: state (B, t+1, D_raw), prev_channel (B, t+1), prev_reward (B, t+1)."""
        if self._history is None:
            raise RuntimeError("run_online(..., keep_history=False) keeps no history")
        return {k: v[self.user, : self.t + 1] for k, v in self._history.items()}


def _ci(per_user: np.ndarray) -> dict[str, Any]:
    """Total over users with a normal 95% CI (per-user sums are i.i.d.)."""
    n = len(per_user)
    total = float(per_user.sum())
    half = 1.96 * float(per_user.std(ddof=1)) * np.sqrt(n) if n > 1 else float("nan")
    return {"value": total, "ci95": [total - half, total + half], "per_user": total / n}


def _ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int, rng: np.random.Generator) -> dict[str, Any]:
    """Ratio of totals with a percentile bootstrap 95% CI over users."""
    n = len(num)
    value = float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
    reps = []
    step = max(1, 5_000_000 // max(n, 1))  # resamples per chunk: bounded memory
    for chunk in range(0, n_boot, step):
        idx = rng.integers(0, n, (min(step, n_boot - chunk), n))
        d = den[idx].sum(axis=1)
        reps.append(np.where(d > 0, num[idx].sum(axis=1) / np.where(d > 0, d, 1.0), np.nan))
    r = np.concatenate(reps)
    lo, hi = (np.nanpercentile(r, [2.5, 97.5]).tolist() if np.isfinite(r).any() else [float("nan")] * 2)
    return {"value": value, "ci95": [lo, hi]}


def run_online(sim: Simulator, policy_fn: PolicyFn, n_users: int, budget: float, seed: int = 0,
               keep_history: bool = True, n_boot: int = 200, fill: bool = True,
               channel_cost_weight: float = 1.0) -> dict[str, Any]:
    """Closed-loop run of ``policy_fn`` on ``n_users`` fresh users with total budget ``budget``.

    Returns totals with 95% CIs over users: ``expected_reward`` (sum of the true probabilities of the
    served steps), ``realized_reward`` (sum of the drawn outcomes), ``spend``, ``roi_expected`` and
    ``roi_realized`` (reward / spend), plus counts, and ``penalty`` (the step penalties s solved for
    score policies: mean and quartiles over steps). ``spend <= budget`` always holds.
    ``channel_cost_weight``: the decision layer's g for a score policy's solve (``decision.choose``).
    """
    from mtorl.evaluation.decision import solve_penalty

    if budget < 0:
        raise ValueError("budget must be >= 0")
    rng = np.random.default_rng([seed, 2])
    st = sim.init_users(n_users, rng)
    T = int(st.length.max())
    C, Dq = sim.n_channels, len(STEP_FEATURES)
    # expected active users per step, from the length distribution (not the realised lengths)
    ref = sim.sample_lengths(100_000, np.random.default_rng([seed, 3]))
    surv = np.array([(ref > t).mean() for t in range(T)]) * n_users  # (T,)
    remaining_expected = np.cumsum(surv[::-1])[::-1]  # (T,) sum over t' >= t
    hist = None
    if keep_history:
        hist = {"state": np.zeros((n_users, T, Dq + sim.n_features), np.float32),
                "prev_channel": np.full((n_users, T), -1, np.int64),
                "prev_reward": np.zeros((n_users, T), np.float32)}
    prev_ch = np.full(n_users, -1, np.int64)
    exp_r, real_r, spend = np.zeros(n_users), np.zeros(n_users), np.zeros(n_users)
    served_steps = total_steps = 0
    spent = 0.0
    penalties: list[float] = []
    for t in range(T):
        idx = np.nonzero(st.length > t)[0]
        if len(idx) == 0:
            break
        total_steps += len(idx)
        state = np.concatenate([sim.step_features(st, idx), st.x[idx]], axis=1).astype(np.float32)  # (B, D_raw)
        if hist is not None:
            hist["state"][idx, t] = state
            hist["prev_channel"][idx, t] = prev_ch[idx]
            hist["prev_reward"][idx, t] = st.last_reward[idx]
        obs = Observation(t=t, user=idx, state=state, prev_channel=prev_ch[idx].copy(),
                          prev_reward=st.last_reward[idx].astype(np.float32), sim=sim, hidden=st, idx=idx, _history=hist)
        out = policy_fn(obs)
        # allocation: this step's share of the remaining budget
        step_budget = max((budget - spent) * surv[t] / max(remaining_expected[t], 1e-12), 0.0)
        if isinstance(out, np.ndarray):  # per-channel scores: the decision layer solves s for the step budget
            if out.shape != (len(idx), C):
                raise ValueError(f"policy returned scores of shape {out.shape} for {len(idx)} users and {C} channels")
            s_t, channel, _, served = solve_penalty(np.asarray(out, dtype=np.float64), np.broadcast_to(sim.costs, out.shape),
                                                    step_budget * (1 - 1e-12), fill=fill,
                                                    channel_cost_weight=channel_cost_weight)
            penalties.append(s_t)
            cost = sim.costs[channel]
        else:  # (channel, value): best value per cost of the given channel first
            channel, value = out
            channel = np.asarray(channel, dtype=np.int64).reshape(-1)
            value = np.asarray(value, dtype=np.float64).reshape(-1)
            if channel.shape != idx.shape or value.shape != idx.shape:
                raise ValueError(f"policy returned shapes {channel.shape}, {value.shape} for {len(idx)} users")
            if channel.min() < 0 or channel.max() >= C:
                raise ValueError(f"policy returned a channel outside [0, {C})")
            cost = sim.costs[channel]
            order = np.argsort(-(value / cost), kind="stable")
            order = order[value[order] > 0]
            fits = np.cumsum(cost[order]) <= step_budget * (1 + 1e-12) + 1e-12
            take = order[: int(np.argmin(fits)) if not fits.all() else len(order)]
            served = np.zeros(len(idx), bool)
            served[take] = True
        p = sim.true_reward_prob(st, channel, idx)  # (B,)
        g = (rng.random(len(idx)) < p).astype(np.float64)
        g[~served] = 0.0
        exp_r[idx[served]] += p[served]
        real_r[idx[served]] += g[served]
        spend[idx[served]] += cost[served]
        spent += float(cost[served].sum())
        served_steps += int(served.sum())
        sim.apply(st, idx, channel, served, g)
        prev_ch[idx] = np.where(served, channel, -1)
        sim.advance(st, idx, rng)
    brng = np.random.default_rng([seed, 4])
    return {
        "users": n_users,
        "steps": total_steps,
        "served_steps": served_steps,
        "budget": float(budget),
        "spend": _ci(spend),
        "expected_reward": _ci(exp_r),
        "realized_reward": _ci(real_r),
        "roi_expected": _ratio_ci(exp_r, spend, n_boot, brng),
        "roi_realized": _ratio_ci(real_r, spend, n_boot, brng),
        "penalty": ({"mean": float(np.mean(penalties)), "quartiles": np.percentile(penalties, [25, 50, 75]).tolist()}
                    if penalties else None),
    }


# ----------------------------------------------------------------------------- built-in policies

def logging_policy(sim: Simulator, seed: int = 0) -> PolicyFn:
    """The simulator's logging policy; it does not rank users (uniform random value)."""
    rng = np.random.default_rng([seed, 5])

    def fn(obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        pi = sim.logging_probs(obs.state[:, len(STEP_FEATURES):].astype(np.float64))
        return sim.sample_categorical(pi, rng.random(len(obs.user))), rng.random(len(obs.user))

    return fn


def random_policy(sim: Simulator, seed: int = 0) -> PolicyFn:
    """Uniform random channel and value."""
    rng = np.random.default_rng([seed, 6])

    def fn(obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        B = len(obs.user)
        return rng.integers(0, sim.n_channels, B), rng.random(B)

    return fn


def oracle_policy(sim: Simulator) -> PolicyFn:
    """Full oracle: knows the hidden state, returns the true reward probability of every channel (B, C)."""

    def fn(obs: Observation) -> np.ndarray:
        return obs.sim.reward_probs(obs.hidden, obs.idx)  # (B, C)

    return fn


def observable_oracle_policy(sim: Simulator, n_users: int, particles: int = 128, seed: int = 0) -> PolicyFn:
    """Observable oracle: knows the response model, sees only what a learner sees (B, C) scores.

    The hidden part of the state is the interest z_u. Everything else the response depends on is a
    function of the observed history: the hour, the exposure counts (served channels and times), the
    last outcome and the drift (after each observed positive outcome on c, z moves by drift * beta_c / |beta_c|).
    The oracle keeps a particle posterior of z_u given the observations: prior z_u | x_u =
    N(x_u / (1 + sigma_x^2), sigma_x^2 / (1 + sigma_x^2) I) (z ~ N(0, I), x = z + N(0, sigma_x^2 I)),
    reweighted by the likelihood p^y (1 - p)^(1 - y) of every served step's outcome, resampled
    (with a small jitter) when the effective sample size falls below a quarter. It scores channel c
    by E[p(u, c) | observations] = sum_k w_k sigmoid(logit_k,c): the best any learner could predict.
    """
    from mtorl.sim.model import SIGMA_X, sigmoid

    rng = np.random.default_rng([seed, 7])
    K, D = particles, sim.n_features
    shrink, sd = 1.0 / (1.0 + SIGMA_X**2), float(np.sqrt(SIGMA_X**2 / (1.0 + SIGMA_X**2)))
    Z = np.zeros((n_users, K, D))
    logw = np.zeros((n_users, K))
    last_p = np.zeros((n_users, K, sim.n_channels))  # per-particle probabilities at the user's last step
    seen = np.zeros(n_users, bool)
    nq = len(STEP_FEATURES)

    def fn(obs: Observation) -> np.ndarray:
        u = obs.user
        new = ~seen[u]
        if new.any():
            un = u[new]
            x = obs.state[new, nq:].astype(np.float64)  # (b, D) observed user features
            Z[un] = shrink * x[:, None, :] + sd * rng.standard_normal((len(un), K, D))
            logw[un] = 0.0
            seen[un] = True
        old = ~new & (obs.prev_channel >= 0)  # served at their previous step: an observed outcome
        if old.any():
            uo, c = u[old], obs.prev_channel[old]
            y = obs.prev_reward[old].astype(np.float64)
            pk = np.clip(last_p[uo, :, c], 1e-9, 1 - 1e-9)  # (b, K) per-particle p of the served channel
            logw[uo] += np.where(y[:, None] > 0, np.log(pk), np.log1p(-pk))
            pos = y > 0
            if pos.any():
                Z[uo[pos]] += sim.drift * sim._beta_unit[c[pos]][:, None, :]
            lw = logw[uo] - logw[uo].max(axis=1, keepdims=True)
            w = np.exp(lw)
            ess = w.sum(axis=1) ** 2 / (w**2).sum(axis=1)
            low = ess < K / 4
            if low.any():
                ur = uo[low]
                p = w[low] / w[low].sum(axis=1, keepdims=True)
                cdf = np.cumsum(p, axis=1)
                pick = (rng.random((len(ur), 1)) + np.arange(K)[None, :]) / K  # systematic resampling
                j = np.minimum((pick[:, :, None] > cdf[:, None, :]).sum(axis=2), K - 1)
                Z[ur] = Z[ur][np.arange(len(ur))[:, None], j] + 0.05 * sd * rng.standard_normal((len(ur), K, D))
                logw[ur] = 0.0
        # observable part of the logits: the model's logits with the hidden z term taken out
        base = sim.reward_logits(obs.hidden, obs.idx) - obs.hidden.z[obs.idx] @ sim.beta.T  # (B, C)
        pk = sigmoid(base[:, None, :] + Z[u] @ sim.beta.T)  # (B, K, C)
        last_p[u] = pk
        w = np.exp(logw[u] - logw[u].max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        return np.einsum("bk,bkc->bc", w, pk)

    return fn


# ----------------------------------------------------------------------------- OPE ground truth

def true_policy_value(sim: Simulator, policy_probs_fn: Callable[[dict[str, Any]], np.ndarray],
                      journeys: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Expected reward of a target policy on logged contexts: mean over steps of sum_c pi(c|s_t) p(s_t, c).

    ``journeys``: dicts with ``true_p (T, C)`` (as ``read_journeys`` yields; a dict may also hold many
    steps at once); ``policy_probs_fn(journey) -> (T, C)`` target probabilities. This is the per-step
    value that IPS/DR-style estimators of the mean reward estimate (contexts fixed to the logged ones).
    """
    sums, lens = [], []
    for j in journeys:
        tp = np.asarray(j["true_p"], dtype=np.float64)  # (T, C)
        if tp.ndim != 2 or tp.shape[1] != sim.n_channels:
            raise ValueError(f"true_p has shape {tp.shape}, expected (T, {sim.n_channels})")
        pi = np.asarray(policy_probs_fn(j), dtype=np.float64)  # (T, C)
        if pi.shape != tp.shape:
            raise ValueError(f"policy_probs_fn returned {pi.shape}, expected {tp.shape}")
        sums.append(float((pi * tp).sum()))
        lens.append(len(tp))
    s, n = np.asarray(sums), np.asarray(lens, dtype=np.float64)
    if n.sum() == 0:
        raise ValueError("true_policy_value: no steps")
    value = float(s.sum() / n.sum())
    # 95% CI of the per-step mean, clustered by journey (ratio estimator); it reflects the finite
    # sample of logged contexts, not noise in the truth
    k = len(s)
    half = 1.96 * float(np.sqrt(((s - value * n) ** 2).sum() * k / max(k - 1, 1))) / float(n.sum()) if k > 1 else float("nan")
    return {"value": value, "ci95": [value - half, value + half], "steps": int(n.sum()), "journeys": k,
            "per_journey": float(s.mean())}


def ope_error(estimates: dict[str, Any], true_value: float) -> dict[str, dict[str, float]]:
    """Absolute and relative error of each off-policy estimate against the simulator's true value.

    ``estimates``: name -> value, or name -> dict with a ``value`` (and optional ``ci95``; then
    ``covered`` says whether the interval holds the true value).
    """
    out: dict[str, dict[str, float]] = {}
    for name, est in estimates.items():
        v = float(est["value"] if isinstance(est, dict) else est)
        row = {"estimate": v, "true": float(true_value), "abs_error": abs(v - true_value),
               "rel_error": abs(v - true_value) / abs(true_value) if true_value else float("nan"),
               "squared_error": (v - true_value) ** 2}
        if isinstance(est, dict) and est.get("ci95") is not None:
            lo, hi = est["ci95"]
            row["covered"] = float(lo <= true_value <= hi)
        out[name] = row
    return out
