"""OPE on a synthetic contextual bandit whose policy values are known in closed form."""

import numpy as np
import pytest

from mtorl.evaluation.ope import (behaviour_propensities, evaluate_policies, fit_behaviour_model,
                                  greedy_policy, off_policy_estimates)
from mtorl.evaluation.predictions import Predictions

R = np.array([[0.1, 0.5, 0.3],      # reward probability per (context, arm)
              [0.6, 0.2, 0.1],
              [0.3, 0.3, 0.7]])
LOG = np.array([[0.5, 0.3, 0.2],    # logging policy per context
                [0.2, 0.5, 0.3],
                [0.4, 0.4, 0.2]])


def _bandit(n: int, seed: int = 0, steps_per_user: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, n)
    a = (rng.random(n)[:, None] > np.cumsum(LOG[x], axis=1)).sum(1)
    y = (rng.random(n) < R[x, a]).astype(float)
    user = np.arange(n) // steps_per_user
    t = np.arange(n) % steps_per_user
    p = Predictions(user=user, t=t, channel=a, gain=y, cost=np.ones(n), reward=y,
                    propensity=LOG[x, a], action_probs=LOG[x], reward_pred=R[x],
                    channels=["a", "b", "c"], binary=True, name="m")
    return p, x


def _true(pi):  # pi (3 contexts, 3 arms); contexts uniform
    return float((pi * R).sum(1).mean())


def _covers(est, truth):
    return est["ci_low"] <= truth <= est["ci_high"]


DET = np.eye(3)[[1, 0, 2]]                          # best arm per context
STOCH = np.array([[0.2, 0.6, 0.2], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])


@pytest.mark.parametrize("pi", [DET, STOCH], ids=["deterministic", "stochastic"])
def test_ips_snips_dr_unbiased_and_dm_exact(pi):
    p, x = _bandit(40_000, seed=1)
    res = off_policy_estimates(p, pi[x], p.propensity, n_boot=100, seed=0)
    truth = _true(pi)
    for k in ("ips", "snips", "dr"):
        assert _covers(res[k], truth), (k, res[k], truth)
        assert abs(res[k]["value"] - truth) < 0.02
    # perfect reward model: DM equals the expected value over the sampled contexts exactly
    assert res["dm"]["value"] == pytest.approx(float((pi[x] * R[x]).sum(1).mean()), abs=1e-12)
    assert abs(res["dm"]["value"] - truth) < 0.01
    # one step per journey: PDIS is IPS
    assert res["pdis"]["value"] == pytest.approx(res["ips"]["value"], rel=1e-9)
    assert res["ess"] > 0.1 * p.n_steps and res["n_missing_propensity"] == 0


def test_dr_correct_with_wrong_reward_model():
    p, x = _bandit(40_000, seed=1)
    wrong = p.with_outputs(p.action_probs, np.full_like(p.reward_pred, 0.9), "wrong")
    res = off_policy_estimates(wrong, STOCH[x], p.propensity, n_boot=100, seed=0)
    truth = _true(STOCH)
    assert _covers(res["dr"], truth) and abs(res["dr"]["value"] - truth) < 0.02
    assert abs(res["dm"]["value"] - 0.9) < 1e-12          # DM follows the wrong model


def test_pdis_two_step_journeys():
    p, x = _bandit(40_000, seed=3, steps_per_user=2)
    res = off_policy_estimates(p, STOCH[x], p.propensity, n_boot=100, seed=0, gamma=1.0, pdis_cap=1e6)
    truth = 2 * _true(STOCH)                           # independent steps: the journey return is 2 V
    assert _covers(res["pdis"], truth), (res["pdis"], truth)
    half = off_policy_estimates(p, STOCH[x], p.propensity, n_boot=10, seed=0, gamma=0.5, pdis_cap=1e6)
    assert half["pdis"]["value"] < res["pdis"]["value"]


def test_pdis_hand_computed_and_capped():
    # one user, 3 steps, weights 2, 0.5, 4 -> rho = 2, 1, 4 ; gamma 0.5 -> 2*1 + 0.5*1*0 + 0.25*4*1
    p = Predictions(user=[0, 0, 0], t=[0, 1, 2], channel=[0, 0, 0], gain=[1, 0, 1], cost=[1, 1, 1],
                    reward=[1, 0, 1], propensity=[0.25, 0.5, 0.125], action_probs=np.full((3, 2), 0.5),
                    reward_pred=np.full((3, 2), 0.5), channels=["a", "b"], binary=True)
    pi = np.array([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5]])
    res = off_policy_estimates(p, pi, p.propensity, n_boot=10, gamma=0.5)
    assert res["pdis"]["value"] == pytest.approx(2.0 + 0.25 * 4.0)
    capped = off_policy_estimates(p, pi, p.propensity, n_boot=10, gamma=0.5, pdis_cap=1.5)
    assert capped["pdis"]["value"] == pytest.approx(1.5 + 0.25 * 1.5)
    assert any("clipped" in w for w in capped["warnings"])


def test_bootstrap_seeded_and_warnings():
    p, x = _bandit(2_000, seed=4)
    a = off_policy_estimates(p, STOCH[x], p.propensity, n_boot=50, seed=7)
    b = off_policy_estimates(p, STOCH[x], p.propensity, n_boot=50, seed=7)
    assert a["ips"] == b["ips"]
    tiny = p.propensity.copy()
    tiny[0] = 1e-5
    tiny[1:10] = np.nan
    res = off_policy_estimates(p, STOCH[x], tiny, n_boot=20)
    text = " ".join(res["warnings"])
    assert "no behaviour propensity" in text and "max importance weight" in text
    assert res["n_missing_propensity"] == 9


def test_behaviour_sources_and_fitted_model():
    p, x = _bandit(3_000, seed=5)
    feats = np.eye(3)[x]
    model = fit_behaviour_model(feats, p.channel, n_channels=3)
    probs = model.predict_proba(feats)
    assert probs.shape == (3_000, 3)
    assert np.abs(probs[:, :] - LOG[x]).max() < 0.06
    b, src = behaviour_propensities(p)
    assert src == "logged" and np.allclose(b, p.propensity)
    nolog = Predictions(**{**p.__dict__, "propensity": np.full(p.n_steps, np.nan)})
    b, src = behaviour_propensities(nolog, probs)
    assert src == "fitted" and np.allclose(b, probs[np.arange(p.n_steps), p.channel])
    _, src = behaviour_propensities(nolog)
    assert src == "none"
    res = evaluate_policies(nolog, probs, n_boot=20)
    assert res["behaviour_source"] == "fitted" and set(res) >= {"ips", "snips", "dm", "dr", "pdis", "ess", "warnings"}
    res = evaluate_policies(nolog, None, n_boot=20)
    assert res["dr"]["value"] is None and res["dm"]["value"] is not None


def test_greedy_policy():
    pi = greedy_policy(np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]]), epsilon=0.06)
    assert np.allclose(pi, [[0.02, 0.96, 0.02], [0.96, 0.02, 0.02]])


def test_ips_snips_pinned_to_hand_computed_values():
    """4 steps, 2 channels: w = pi_e(a)/b; IPS = mean(w*y); SNIPS = sum(w*y)/sum(w)."""
    p = Predictions(user=np.arange(4), t=np.zeros(4, int), channel=np.array([0, 1, 0, 1]),
                    gain=np.array([1.0, 0.0, 0.0, 1.0]), cost=np.ones(4), reward=np.array([1.0, 0.0, 0.0, 1.0]),
                    propensity=np.array([0.5, 0.25, 0.5, 0.8]), action_probs=np.full((4, 2), 0.5),
                    reward_pred=np.full((4, 2), 0.5), channels=["a", "b"], binary=True, name="m")
    target = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    res = off_policy_estimates(p, target, p.propensity, n_boot=10, seed=0)
    w = np.array([0.9 / 0.5, 0.8 / 0.25, 0.6 / 0.5, 0.5 / 0.8])      # 1.8, 3.2, 1.2, 0.625
    y = np.array([1.0, 0.0, 0.0, 1.0])
    assert res["ips"]["value"] == pytest.approx((1.8 + 0.625) / 4, abs=1e-12)             # 0.60625
    assert res["snips"]["value"] == pytest.approx((1.8 + 0.625) / w.sum(), abs=1e-12)     # 2.425 / 6.825
    assert res["ips"]["value"] == pytest.approx(float((w * y).mean()), abs=1e-12)


@pytest.mark.parametrize("target,needle", [
    (np.full((4, 2), 0.25), "row 0 (and 3 more) is not a distribution over channels (sum 0.5"),
    (np.array([[1.2, -0.2], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]), "row 0 (and 0 more)"),
    (np.array([[0.5, 0.5], [np.nan, 1.0], [0.5, 0.5], [0.5, 0.5]]), "row 1 (and 0 more)"),
])
def test_a_target_that_is_not_a_distribution_is_refused(target, needle):
    from mtorl.evaluation.ope import TargetPolicyError

    p, _ = _bandit(4)
    p = Predictions(user=p.user, t=p.t, channel=np.minimum(p.channel, 1), gain=p.gain, cost=p.cost, reward=p.reward,
                    propensity=p.propensity, action_probs=p.action_probs[:, :2], reward_pred=p.reward_pred[:, :2],
                    channels=["a", "b"], binary=True, name="m")
    with pytest.raises(TargetPolicyError) as e:
        off_policy_estimates(p, target, p.propensity, n_boot=10)
    assert str(e.value).startswith("target policy: ") and needle in str(e.value) and "\n" not in str(e.value)
