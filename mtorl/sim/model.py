"""Advertising-journey simulator with a known ground truth (numpy only).

Generative model, for user u at step t of a journey and channel c (C channels, D features):

    z_u ~ N(0, I_D)                          latent interest (hidden)
    x_u = z_u + N(0, sigma_x^2 I_D)          observable static user features f0..f{D-1}
    p(u, c, t) = sigmoid( b_c + <z_u, beta_c> + carry * r_{t-1}
                          - fatigue_c * e_{u,c}(t) + tod * cos(2 pi (h_t - peak_c) / 24) )

* ``e_{u,c}`` counts past exposures to c, decayed with a half-life in hours (fatigue);
* ``r_{t-1}`` is the previous outcome (carry-over); after a positive outcome on c the interest
  drifts towards the channel: ``z_u += drift * beta_c / |beta_c|``;
* ``h_t`` is the hour of day of the step, ``peak_c`` the channel's best hour.
* Observable step features q_t = (sin, cos of the hour, log1p(hours since the previous step)).
* Logging policy: ``pi(c | x_u) = softmax((a_c + <x_u, w_c>) / temperature)`` with ``w_c`` a noisy
  copy of ``beta_c``: informative, suboptimal, full support.
* Journey length: ``2 + NegBin(k, mean = mean_steps - 2)``, capped.

The offsets ``b_c`` (and ``a_c`` when target shares are given) are calibrated by Monte-Carlo
so that the mean reward rate under the logging policy hits ``base_rate`` (or the per-channel
``channel_rates``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mtorl.spec.models import SimulateSpec

STEP_FEATURES = ["hour_sin", "hour_cos", "recency"]
SIGMA_X = 0.5  # observation noise of the user features
INTEREST_SCALE = 1.0  # std of <z_u, beta_c>
LOG_WEIGHT_NOISE = 0.7  # noise of the logging weights relative to beta
CARRY = 0.6  # logit bump after a positive outcome
DRIFT = 0.1  # interest drift towards a channel after a positive outcome on it
FATIGUE_HALFLIFE_H = 48.0
TOD_AMPLITUDE = 0.3
MEAN_GAP_H = 6.0  # mean time between steps
HORIZON_S = 30 * 86400  # journeys start uniformly in the first 30 days
EPOCH_S = 1_700_000_000  # first possible timestamp (seconds)


def sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class UserState:
    """Mutable state of N users (hidden and observable), all arrays indexed by user."""

    z: np.ndarray  # (N, D) latent interest, hidden
    x: np.ndarray  # (N, D) observable user features
    length: np.ndarray  # (N,) journey length
    time: np.ndarray  # (N,) int64 timestamp (s) of the current step
    prev_time: np.ndarray  # (N,) int64 timestamp of the previous step, -1 before the first
    exposure: np.ndarray  # (N, C) decayed exposure counts
    last_reward: np.ndarray  # (N,) previous outcome (0 at the first step / when not served)
    t: np.ndarray  # (N,) step index

    @property
    def n(self) -> int:
        return len(self.length)


class Simulator:
    """Ground-truth response model + logging policy, built from a ``SimulateSpec`` (seeded)."""

    def __init__(self, spec: SimulateSpec, calibration_users: int | None = None) -> None:
        self.spec = spec
        C, D = len(spec.channels), spec.n_features
        if C < 2:
            raise ValueError("a simulation needs at least 2 channels")
        self.n_channels, self.n_features = C, D
        self.channels = list(spec.channels)
        costs = spec.channel_costs if spec.channel_costs is not None else [float(i + 1) for i in range(C)]
        self.costs = np.asarray(costs, dtype=np.float64)
        for name, v in (
            ("channel_costs", costs),
            ("channel_shares", spec.channel_shares),
            ("channel_rates", spec.channel_rates),
        ):
            if v is not None and len(v) != C:
                raise ValueError(f"{name} has {len(v)} entries for {C} channels")
        if np.any(self.costs <= 0):
            raise ValueError("channel_costs must be > 0")
        if spec.channel_shares is not None:
            s = np.asarray(spec.channel_shares, dtype=np.float64)
            if np.any(s <= 0) or abs(s.sum() - 1) > 1e-3:
                raise ValueError("channel_shares must be positive and sum to 1")
        if spec.channel_rates is not None and any(not 0 < r < 1 for r in spec.channel_rates):
            raise ValueError("channel_rates must be in (0, 1)")

        rng = np.random.default_rng([spec.seed, 0])
        self.beta = rng.normal(0, INTEREST_SCALE / math.sqrt(D), (C, D))  # (C, D)
        self.log_weight = self.beta + rng.normal(0, LOG_WEIGHT_NOISE * INTEREST_SCALE / math.sqrt(D), (C, D))
        self.log_bias = np.zeros(C)
        self.tod_peak = rng.uniform(0, 24, C)
        self.fatigue = rng.uniform(0.05, 0.15, C)
        self.offset = np.full(C, logit(np.array(spec.base_rate)) - 0.5)  # calibrated below
        self.temperature = spec.logging_temperature
        self.carry, self.drift, self.tod_amplitude = CARRY, DRIFT, TOD_AMPLITUDE
        self._beta_unit = self.beta / np.linalg.norm(self.beta, axis=1, keepdims=True)

        m = max(spec.mean_steps - 2.0, 0.0)
        self.length_k = spec.length_dispersion or 1.0
        self.length_extra_mean = m
        self.max_length = int(min(max(10, math.ceil(6 * spec.mean_steps)), spec.shard_steps))

        self.target_rates = np.zeros(C)
        self._calibrate(calibration_users)

    # ------------------------------------------------------------------ users and dynamics

    def sample_lengths(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.length_extra_mean <= 0:
            return np.full(n, 2, dtype=np.int64)
        k = self.length_k
        extra = rng.negative_binomial(k, k / (k + self.length_extra_mean), n)
        return np.minimum(2 + extra, self.max_length).astype(np.int64)

    def init_users(self, n: int, rng: np.random.Generator) -> UserState:
        D, C = self.n_features, self.n_channels
        z = rng.normal(0, 1, (n, D))
        x = z + rng.normal(0, SIGMA_X, (n, D))
        length = self.sample_lengths(n, rng)
        start = EPOCH_S + rng.integers(0, HORIZON_S, n)
        return UserState(z=z, x=x, length=length, time=start.astype(np.int64), prev_time=np.full(n, -1, np.int64),
                         exposure=np.zeros((n, C)), last_reward=np.zeros(n), t=np.zeros(n, np.int64))

    @staticmethod
    def hour_of_day(time: np.ndarray) -> np.ndarray:
        return (time % 86400) / 3600.0

    def step_features(self, st: UserState, idx: np.ndarray) -> np.ndarray:
        """Observable q_t of users ``idx`` at their current step: (B, 3) hour_sin, hour_cos, recency."""
        h = self.hour_of_day(st.time[idx])
        prev = st.prev_time[idx]
        rec = np.where(prev >= 0, np.log1p((st.time[idx] - prev) / 3600.0), 0.0)
        ang = 2 * np.pi * h / 24.0
        return np.stack([np.sin(ang), np.cos(ang), rec], axis=1)

    def reward_logits(self, st: UserState, idx: np.ndarray) -> np.ndarray:
        """(B, C) logits of the response model for users ``idx`` at their current step."""
        h = self.hour_of_day(st.time[idx])[:, None]
        tod = self.tod_amplitude * np.cos(2 * np.pi * (h - self.tod_peak[None, :]) / 24.0)
        return (self.offset[None, :] + st.z[idx] @ self.beta.T + self.carry * st.last_reward[idx, None]
                - self.fatigue[None, :] * st.exposure[idx] + tod)

    def reward_probs(self, st: UserState, idx: np.ndarray | None = None) -> np.ndarray:
        """(B, C) true click/conversion probability of every channel."""
        idx = np.arange(st.n) if idx is None else idx
        return sigmoid(self.reward_logits(st, idx))

    def true_reward_prob(self, st: UserState, channel: np.ndarray | int, idx: np.ndarray | None = None) -> np.ndarray:
        """(B,) true probability of a positive outcome if ``channel`` is shown now (the oracle's model)."""
        idx = np.arange(st.n) if idx is None else idx
        p = self.reward_probs(st, idx)
        ch = np.broadcast_to(np.asarray(channel, dtype=np.int64), (len(idx),))
        return p[np.arange(len(idx)), ch]

    def logging_probs(self, x: np.ndarray) -> np.ndarray:
        """(B, C) logging policy probabilities given observable user features x (B, D)."""
        return softmax((self.log_bias[None, :] + x @ self.log_weight.T) / self.temperature)

    def apply(self, st: UserState, idx: np.ndarray, channel: np.ndarray, served: np.ndarray, gain: np.ndarray) -> None:
        """Record the outcome of the current step for users ``idx`` (unserved: no exposure, reward 0)."""
        s_idx, s_ch = idx[served], channel[served]
        st.exposure[s_idx, s_ch] += 1.0
        g = np.where(served, gain, 0.0)
        st.last_reward[idx] = g
        pos = served & (gain > 0)
        if pos.any():
            st.z[idx[pos]] += self.drift * self._beta_unit[channel[pos]]

    def advance(self, st: UserState, idx: np.ndarray, rng: np.random.Generator) -> None:
        """Move users ``idx`` to their next step: time passes, fatigue decays."""
        gap = np.maximum(1, np.rint(rng.exponential(MEAN_GAP_H * 3600.0, len(idx)))).astype(np.int64)
        st.prev_time[idx] = st.time[idx]
        st.time[idx] += gap
        st.exposure[idx] *= (0.5 ** (gap / (FATIGUE_HALFLIFE_H * 3600.0)))[:, None]
        st.t[idx] += 1

    @staticmethod
    def sample_categorical(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Inverse-CDF sampling: probs (B, C), u (B,) uniforms -> (B,) int64."""
        c = (u[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
        return np.minimum(c, probs.shape[1] - 1).astype(np.int64)

    # ------------------------------------------------------------------ logged journeys

    def run_logged(self, st: UserState, rng: np.random.Generator, record: bool = True) -> dict[str, np.ndarray]:
        """Play whole journeys of ``st`` under the logging policy, vectorised over users.

        Returns user-major step arrays (N_steps = st.length.sum(); user i's steps are contiguous):
        user (N,), t (N,), timestamp (N,), channel (N,), gain (N,), propensity (N,), q (N, 3),
        true_p (N, C). With ``record=False`` only per-channel sums (for calibration) are returned.
        """
        C = self.n_channels
        start = np.concatenate([[0], np.cumsum(st.length)[:-1]])
        total = int(st.length.sum())
        pi = self.logging_probs(st.x)  # (n, C), static per user
        out: dict[str, np.ndarray] = {}
        if record:
            out = {"timestamp": np.empty(total, np.int64), "channel": np.empty(total, np.int64),
                   "gain": np.empty(total, np.float32), "propensity": np.empty(total, np.float32),
                   "q": np.empty((total, 3), np.float32), "true_p": np.empty((total, C), np.float32)}
        p_sum, g_sum, count = np.zeros(C), np.zeros(C), np.zeros(C)
        for t in range(int(st.length.max())):
            idx = np.nonzero(st.length > t)[0]
            P = self.reward_probs(st, idx)  # (B, C)
            a = self.sample_categorical(pi[idx], rng.random(len(idx)))
            p_a = P[np.arange(len(idx)), a]
            g = (rng.random(len(idx)) < p_a).astype(np.float64)
            if record:
                pos = start[idx] + t
                out["timestamp"][pos] = st.time[idx]
                out["q"][pos] = self.step_features(st, idx)
                out["channel"][pos] = a
                out["gain"][pos] = g
                out["propensity"][pos] = pi[idx, a]
                out["true_p"][pos] = P
            p_sum += np.bincount(a, weights=p_a, minlength=C)
            g_sum += np.bincount(a, weights=g, minlength=C)
            count += np.bincount(a, minlength=C)
            self.apply(st, idx, a, np.ones(len(idx), bool), g)
            self.advance(st, idx, rng)
        out.update(p_sum=p_sum, g_sum=g_sum, count=count)
        return out

    # ------------------------------------------------------------------ calibration

    def _calibrate(self, n_users: int | None) -> None:
        """Fit logging biases to channel_shares and offsets to the target rates (Monte-Carlo, common random numbers)."""
        spec = self.spec
        if n_users is None:
            n_users = int(np.clip(150_000 / max(spec.mean_steps, 2.0), 1000, 8000))
        if spec.channel_shares is not None:
            x = self.init_users(20_000, np.random.default_rng([spec.seed, 9])).x
            target = np.asarray(spec.channel_shares, dtype=np.float64)
            for _ in range(200):
                share = self.logging_probs(x).mean(axis=0)
                self.log_bias += self.temperature * (np.log(target) - np.log(share))
                if np.max(np.abs(share - target)) < 1e-4:
                    break
        fixed_rates = np.asarray(spec.channel_rates, dtype=np.float64) if spec.channel_rates is not None else None
        k = np.sqrt(self.costs / self.costs.mean())  # costlier channels convert more by default
        for _ in range(12):
            rng = np.random.default_rng([spec.seed, 8])
            res = self.run_logged(self.init_users(n_users, rng), rng, record=False)
            count = np.maximum(res["count"], 1)
            rate = res["p_sum"] / count
            if fixed_rates is not None:
                target = fixed_rates
            else:
                share = count / count.sum()
                target = np.clip(spec.base_rate * k / float((share * k).sum()), 1e-4, 0.95)
            self.target_rates = target
            self.offset += logit(target) - logit(rate)
            if np.max(np.abs(rate - target) / target) < 2e-3:
                break

    def parameters(self) -> dict:
        """The ground-truth parameters, JSON-ready."""
        return {
            "beta": self.beta.tolist(),
            "offset": self.offset.tolist(),
            "log_weight": self.log_weight.tolist(),
            "log_bias": self.log_bias.tolist(),
            "temperature": self.temperature,
            "tod_peak": self.tod_peak.tolist(),
            "tod_amplitude": self.tod_amplitude,
            "fatigue": self.fatigue.tolist(),
            "fatigue_halflife_h": FATIGUE_HALFLIFE_H,
            "carry": self.carry,
            "drift": self.drift,
            "sigma_x": SIGMA_X,
            "mean_gap_h": MEAN_GAP_H,
            "length": {"min": 2, "extra_mean": self.length_extra_mean, "k": self.length_k, "max": self.max_length},
            "target_rates": self.target_rates.tolist(),
        }
