"""Off-policy evaluation of a target policy from logged journeys (pure numpy + scikit-learn).

Notation, per logged step i (N steps): logged channel a_i, outcome y_i (`outcome`: 1[g > 0] for
binary gains, r_t otherwise), behaviour propensity b_i = pi_b(a_i | .), target policy pi_e (N, C),
reward model rhat (N, C), importance weight w_i = pi_e(a_i) / b_i.

    IPS   = (1/N) sum_i w_i y_i
    SNIPS = sum_i w_i y_i / sum_i w_i
    DM    = (1/N) sum_i sum_c pi_e(c) rhat_c
    DR    = (1/N) sum_i [ sum_c pi_e(c) rhat_c + w_i (y_i - rhat_{a_i}) ]
    PDIS  = (1/U) sum_u sum_t gamma^t rho_{u,t} y_{u,t},   rho_{u,t} = min(prod_{k<=t} w_{u,k}, cap)

IPS/SNIPS/DM/DR are per-step values (comparable to the logged outcome rate); PDIS is a per-journey
return (sum over a journey). The cumulative product of PDIS is clipped at `pdis_cap` (default 1e3)
so that long journeys stay finite: clipping biases PDIS downwards where the target policy departs
far from the logging one, and the `warnings` say how often the cap was hit.

Steps without a behaviour propensity (NaN) are left out of IPS/SNIPS/DR and their users out of
PDIS (with a warning giving the missing share); DM uses every step. Intervals: percentile bootstrap
(95%) that resamples USERS with replacement (`n_boot` resamples, seeded); every estimator is
computed on the same resamples. ESS = (sum w)^2 / sum w^2 over the steps with a propensity.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from sklearn.linear_model import LogisticRegression

from mtorl.errors import MtorlError
from mtorl.evaluation.predictions import Predictions, journey_order, outcome

__all__ = ["BehaviourModel", "fit_behaviour_model", "behaviour_propensities", "greedy_policy",
           "off_policy_estimates", "target_policies", "evaluate_policies"]

ESTIMATORS = ("ips", "snips", "dm", "dr", "pdis")


class BehaviourModel:
    """Multinomial logistic regression of the logged channel on train features.

    `predict_proba(X)` always returns (N, n_channels) columns in channel order (a channel absent
    from train gets probability 0).
    """

    def __init__(self, model: LogisticRegression, n_channels: int):
        self.model = model
        self.n_channels = n_channels

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        p = self.model.predict_proba(np.asarray(X, dtype=np.float64))
        out = np.zeros((p.shape[0], self.n_channels))
        out[:, self.model.classes_.astype(np.int64)] = p
        return out


def fit_behaviour_model(X_train: np.ndarray, c_train: np.ndarray, n_channels: int | None = None,
                        C: float = 1.0, max_iter: int = 500, seed: int = 0) -> BehaviourModel:
    """Fit pi_b(a | x) on TRAIN: X_train (N, D) (normalised features), c_train (N,) logged channels."""
    c_train = np.asarray(c_train, dtype=np.int64)
    n = int(n_channels if n_channels is not None else c_train.max() + 1)
    if np.unique(c_train).size < 2:
        raise ValueError("fit_behaviour_model: train has a single channel; nothing to fit")
    m = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    m.fit(np.asarray(X_train, dtype=np.float64), c_train)
    return BehaviourModel(m, n)


def behaviour_propensities(p: Predictions, fitted_probs: np.ndarray | None = None,
                           floor: float = 1e-6) -> tuple[np.ndarray, str]:
    """(b (N,), source) with source in {"logged", "fitted", "logged+fitted", "none"}.

    Logged propensities where finite and > 0; elsewhere fitted_probs[i, a_i] (N, C) floored at
    `floor` when given; NaN where neither exists.
    """
    logged = np.where(np.isfinite(p.propensity) & (p.propensity > 0), p.propensity, np.nan)
    have = np.isfinite(logged)
    if have.all():
        return logged, "logged"
    if fitted_probs is None:
        return logged, "logged" if have.any() else "none"
    fp = np.asarray(fitted_probs, dtype=np.float64)
    if fp.shape != (p.n_steps, p.n_channels):
        raise ValueError(f"fitted_probs: expected ({p.n_steps}, {p.n_channels}), got {fp.shape}")
    fitted = np.maximum(fp[np.arange(p.n_steps), p.channel], floor)
    b = np.where(have, logged, fitted)
    return b, "logged+fitted" if have.any() else "fitted"


def greedy_policy(scores: np.ndarray, epsilon: float = 0.05, best: np.ndarray | None = None) -> np.ndarray:
    """epsilon-softened greedy policy (N, C): (1 - eps) on argmax (or `best`) + eps / C everywhere."""
    n, c = scores.shape
    a = np.argmax(scores, axis=1) if best is None else np.asarray(best)
    pi = np.full((n, c), epsilon / c)
    pi[np.arange(n), a] += 1.0 - epsilon
    return pi


def _interval(boot: np.ndarray, value: float | None) -> dict[str, float | None]:
    boot = boot[np.isfinite(boot)]
    if value is None or not np.isfinite(value):
        return {"value": None, "ci_low": None, "ci_high": None}
    if boot.size == 0:
        return {"value": float(value), "ci_low": None, "ci_high": None}
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"value": float(value), "ci_low": float(lo), "ci_high": float(hi)}


class TargetPolicyError(MtorlError, ValueError):
    """Off-policy estimation was given a target that is not a probability distribution per step."""


def check_target_policy(pi_e: np.ndarray, atol: float = 1e-4) -> None:
    """A target policy is a distribution over channels on every step: finite, >= 0, rows summing to 1.
    Otherwise the estimates are meaningless (a half-mass target halves IPS): one line naming the first bad row."""
    bad = ~np.isfinite(pi_e).all(axis=1) | (pi_e < 0).any(axis=1) | (np.abs(pi_e.sum(axis=1) - 1.0) > atol)
    if bad.any():
        i = int(np.argmax(bad))
        raise TargetPolicyError(f"target policy: row {i} (and {int(bad.sum()) - 1} more) is not a distribution "
                                f"over channels (sum {float(np.nansum(pi_e[i])):.6g}, min {float(np.nanmin(pi_e[i])):.3g}): "
                                "every row must be >= 0 and sum to 1")


def off_policy_estimates(p: Predictions, target: np.ndarray, behaviour: np.ndarray,
                         n_boot: int = 200, seed: int = 0, gamma: float = 1.0,
                         pdis_cap: float = 1e3, max_weight_warn: float = 100.0,
                         min_ess_frac: float = 0.01) -> dict[str, Any]:
    """IPS, SNIPS, DM, DR, PDIS of `target` (N, C) against behaviour propensities `behaviour` (N,).

    Returns {ips, snips, dm, dr, pdis: {value, ci_low, ci_high}, ess, ess_frac, max_weight,
    n_missing_propensity, warnings: [str]}.
    """
    n, c = p.n_steps, p.n_channels
    pi_e = np.asarray(target, dtype=np.float64)
    if pi_e.shape != (n, c):
        raise ValueError(f"target policy: expected ({n}, {c}), got {pi_e.shape}")
    check_target_policy(pi_e)
    b = np.asarray(behaviour, dtype=np.float64)
    y = outcome(p)
    rows = np.arange(n)
    ok = np.isfinite(b) & (b > 0)
    w = np.where(ok, pi_e[rows, p.channel] / np.where(ok, b, 1.0), 0.0)            # (N,)
    dm_i = (pi_e * p.reward_pred).sum(axis=1)                                         # (N,)
    dr_i = dm_i + w * (y - p.reward_pred[rows, p.channel])                           # (N,)

    # PDIS per user: log-space cumulative product of w within a journey, clipped at the cap
    order, start = journey_order(p.user, p.t)
    ws, oks = w[order], ok[order]
    is_zero = (oks & (ws <= 0)).astype(np.int64)                                     # (N,) sorted
    lw = np.log(np.where(oks & (ws > 0), ws, 1.0))                                    # 0 for zero/missing
    inclusive: Callable[[np.ndarray], np.ndarray] = lambda x: np.cumsum(x) - (np.cumsum(x) - x)[start]  # noqa: E731
    log_rho = inclusive(lw)                                                           # log prod_{k<=t} w_k
    zero_in = inclusive(is_zero)                                                      # a zero weight so far
    capped = log_rho > np.log(pdis_cap)
    rho = np.where(zero_in > 0, 0.0, np.exp(np.minimum(log_rho, np.log(pdis_cap))))
    disc = np.power(gamma, p.t[order].astype(np.float64))
    pd_step = disc * rho * y[order]

    uniq, uidx_sorted = np.unique(p.user[order], return_inverse=True)
    n_u = uniq.size
    user_missing = np.bincount(uidx_sorted, weights=(~ok[order]).astype(np.float64), minlength=n_u) > 0
    pd_user = np.bincount(uidx_sorted, weights=pd_step, minlength=n_u)
    uidx = np.empty(n, dtype=np.int64)
    uidx[order] = uidx_sorted

    # per-user sufficient statistics -> every estimator is a ratio of column sums (U, K)
    okf = ok.astype(np.float64)
    stats = np.stack([
        np.bincount(uidx, weights=okf, minlength=n_u),              # 0 steps with propensity
        np.bincount(uidx, weights=w * y, minlength=n_u),            # 1 sum w y
        np.bincount(uidx, weights=w, minlength=n_u),                # 2 sum w
        np.bincount(uidx, weights=dm_i, minlength=n_u),             # 3 sum dm (all steps)
        np.bincount(uidx, minlength=n_u).astype(np.float64),        # 4 steps
        np.bincount(uidx, weights=np.where(ok, dr_i, 0.0), minlength=n_u),  # 5 sum dr
        np.where(user_missing, 0.0, pd_user),                       # 6 pdis per user
        (~user_missing).astype(np.float64),                         # 7 users in pdis
    ], axis=1)

    def estimates(s: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.array([s[1] / s[0], s[1] / s[2], s[3] / s[4], s[5] / s[0], s[6] / s[7]])

    point = estimates(stats.sum(axis=0))
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, len(ESTIMATORS)))
    for j in range(n_boot):
        counts = np.bincount(rng.integers(0, n_u, n_u), minlength=n_u).astype(np.float64)
        boot[j] = estimates(counts @ stats)

    out: dict[str, Any] = {k: _interval(boot[:, i], point[i]) for i, k in enumerate(ESTIMATORS)}
    wv = w[ok]
    ess = float(wv.sum() ** 2 / np.sum(wv ** 2)) if wv.size and np.sum(wv ** 2) > 0 else 0.0
    n_ok = int(ok.sum())
    warnings: list[str] = []
    if n_ok < n:
        warnings.append(f"{n - n_ok} of {n} steps ({(n - n_ok) / max(n, 1):.1%}) have no behaviour propensity: "
                        f"left out of IPS/SNIPS/DR, their users out of PDIS")
    if n_ok and ess < min_ess_frac * n_ok:
        warnings.append(f"effective sample size {ess:.1f} is below {min_ess_frac:.0%} of {n_ok} steps: weights degenerate")
    max_w = float(wv.max()) if wv.size else 0.0
    if max_w > max_weight_warn:
        warnings.append(f"max importance weight {max_w:.1f} exceeds {max_weight_warn:g}")
    n_capped = int((capped & (zero_in == 0)).sum())
    if n_capped:
        warnings.append(f"PDIS cumulative weight clipped at {pdis_cap:g} on {n_capped} steps (biased low)")
    if n_ok and abs(float(wv.mean()) - 1.0) > 0.1:
        warnings.append(f"mean importance weight {float(wv.mean()):.3f} is far from 1: propensities or "
                        f"target support may be wrong")
    out.update({"ess": ess, "ess_frac": ess / n_ok if n_ok else 0.0, "max_weight": max_w,
                "n_missing_propensity": n - n_ok, "warnings": warnings})
    return out


def target_policies(p: Predictions, epsilon: float = 0.05, penalty: float = 0.0,
                    cost_per_channel: np.ndarray | None = None, decision: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The model's two target policies (N, C): epsilon-greedy on the decision layer's channel at the
    fixed penalty s = `penalty` (`decision.decide`, no budget: the channel choice alone; an ensemble's
    spread `p.reward_std` enters q with weight beta_e), and the action decoder's renormalised
    probabilities (see `evaluate_policies`)."""
    from mtorl.evaluation.allocation import channel_costs
    from mtorl.evaluation.decision import decide

    kc = channel_costs(p) if cost_per_channel is None else cost_per_channel
    best = decide(p.reward_pred, p.action_probs, kc, decision, penalty=penalty, reward_std=p.reward_std).channel
    greedy = greedy_policy(p.action_probs, epsilon, best=best)
    soft = p.action_probs / np.maximum(p.action_probs.sum(axis=1, keepdims=True), 1e-12)
    return greedy, soft


def evaluate_policies(p: Predictions, behaviour_probs: np.ndarray | None = None, n_boot: int = 200,
                      seed: int = 0, gamma: float = 1.0, epsilon: float = 0.05, penalty: float = 0.0,
                      cost_per_channel: np.ndarray | None = None, decision: Any = None, **kw: Any) -> dict[str, Any]:
    """OPE of the model's two policies.

    greedy:  epsilon-greedy (epsilon=0.05) on the decision layer's channel (`decision.decide` with
             `decision` at the fixed penalty s = `penalty`: argmax_c q_c - s kappa_c, q the
             pessimistic per-channel reward; with the default policy and s = 0, argmax rhat_c
             among the supported channels).
    softmax: the action decoder's own probabilities (action_probs, renormalised).
    Returns {greedy: {...}, softmax: {...}, logged_value, behaviour_source} where {...} is
    `off_policy_estimates`; the greedy estimates are also copied to the top level (ips, ..., pdis,
    ess, warnings) as the headline numbers.
    """
    b, source = behaviour_propensities(p, behaviour_probs)
    greedy, soft = target_policies(p, epsilon, penalty, cost_per_channel, decision)
    res_g = off_policy_estimates(p, greedy, b, n_boot=n_boot, seed=seed, gamma=gamma, **kw)
    res_s = off_policy_estimates(p, soft, b, n_boot=n_boot, seed=seed, gamma=gamma, **kw)
    if source == "none":
        for r in (res_g, res_s):
            r["warnings"].insert(0, "no behaviour propensities (none logged, no behaviour model): "
                                    "only DM is defined")
    top = {k: res_g[k] for k in (*ESTIMATORS, "ess", "ess_frac", "max_weight", "warnings")}
    y = outcome(p)
    return {**top, "policy": "greedy", "epsilon": epsilon, "greedy": res_g, "softmax": res_s,
            "logged_value": float(y.mean()) if p.n_steps else None, "behaviour_source": source}
