"""Channel scores, user-level allocation, online allocation and the budget curve."""

import numpy as np
import pytest

from mtorl.evaluation.allocation import (allocate_requests, allocate_users, budget_curve,
                                         channel_scores)
from mtorl.evaluation.decision import DecisionParams
from mtorl.evaluation.predictions import Predictions


def test_channel_scores_formula_and_degenerate():
    pi = np.array([[0.5, 0.3, 0.2]])
    r = np.array([[0.4, 0.9, 0.1]])
    w = channel_scores(pi, r, [1.0, 2.0, 0.5], penalty=0.1)
    assert np.allclose(w, [[0.5 * 0.3 / 1, 0.3 * 0.7 / 2, 0.2 * 0.05 / 0.5]])
    assert np.allclose(channel_scores(pi, r, 0.0, penalty=0.5), pi * r)        # zero costs: pi * rhat
    assert np.allclose(channel_scores(pi, r, [1.0, 1.0, 1.0], penalty=1.0), 0)  # all nets clipped
    n = np.ones(4)
    assert channel_scores(np.full((4, 3), 1 / 3), np.ones((4, 3)), n).shape == (4, 3)  # per-step cost
    with pytest.raises(ValueError):
        channel_scores(pi, r, [-1.0, 1.0, 1.0])


def test_unit_costs_are_top_k():
    rng = np.random.default_rng(0)
    v = rng.random(50)
    a = allocate_users(v, np.ones(50), 10.5)
    assert a.selected.sum() == 10 and a.spend == 10.0
    assert set(np.flatnonzero(a.selected)) == set(np.argsort(-v, kind="stable")[:10])


def test_ties_are_stable():
    a = allocate_users(np.array([1.0, 2.0, 1.0, 1.0]), np.ones(4), 2)
    assert a.selected.tolist() == [True, True, False, False]


@pytest.mark.parametrize("seed", range(5))
def test_varying_costs_spend_and_bisection(seed):
    rng = np.random.default_rng(seed)
    v, c = rng.random(200), rng.uniform(0.1, 3.0, 200)
    budget = 0.3 * c.sum()
    a = allocate_users(v, c, budget)
    assert a.spend <= budget and a.spend == pytest.approx(c[a.selected].sum())
    assert a.spend >= budget - c.max()                        # greedy prefix stops within one item
    lam_set = v - a.multiplier * c > 0
    assert c[lam_set].sum() <= budget
    assert c[v - (a.multiplier * 0.999) * c > 0].sum() > budget - 1e-9 or a.multiplier == 0
    assert np.all(lam_set <= a.selected)                      # the Lagrangian set is inside the greedy one
    ratio = v / c
    assert ratio[a.selected].min() >= ratio[~a.selected].max() - 1e-12


def test_slack_budget_and_require_positive():
    v = np.array([0.5, -0.1, 0.0, 0.2])
    a = allocate_users(v, np.ones(4), 100, require_positive=True)
    assert a.selected.tolist() == [True, False, False, True] and a.multiplier == 0.0
    assert allocate_users(v, np.ones(4), 100).selected.all()
    assert not allocate_users(v, np.ones(4), 0).selected.any()
    free = allocate_users(np.array([0.1, 0.9]), np.array([0.0, 5.0]), 1.0)
    assert free.selected.tolist() == [True, False] and free.spend == 0.0


def test_allocate_requests():
    users = [("u1", [0.1, 0.8], [0.5, 0.5], [1.0, 1.0]),
             ("u2", [0.6, 0.2], [0.9, 0.1], [1.0, 2.0]),
             ("u3", [0.05, 0.05], [0.5, 0.5], 1.0)]
    out = allocate_requests(users, budget=2.0, channels=["x", "y"])
    # served-channel reward per cost: u1 0.8 (y), u2 0.6 (x), u3 0.05; B = 2 -> s = 0.05, u3 out
    assert [s["user_id"] for s in out["selected"]] == ["u1", "u2"]
    assert out["selected"][0]["channel"] == "y" and out["selected"][1]["channel"] == "x"
    assert out["spend"] == 2.0 and out["total_expected_reward"] == pytest.approx(1.4)
    assert out["penalty"] == pytest.approx(0.05) and out["multiplier"] == out["penalty"]
    assert out["selected"][0]["value"] == pytest.approx(0.8 - 0.05)
    assert allocate_requests([], 1.0)["selected"] == []
    pen = allocate_requests(users, budget=10.0, penalty=0.5)   # s >= 0.5: u3's net return < 0 -> not selected
    assert "u3" not in [s["user_id"] for s in pen["selected"]] and pen["penalty"] == 0.5
    imi = allocate_requests(users, budget=2.0, decision=DecisionParams(policy="imitation"))
    assert [s["user_id"] for s in imi["selected"]] == ["u1", "u2"] and imi["spend"] <= 2.0


def _preds(n=300, seed=0):
    rng = np.random.default_rng(seed)
    ch = rng.integers(0, 3, n)
    rp = rng.random((n, 3))
    g = (rng.random(n) < rp[np.arange(n), ch]).astype(float)
    return Predictions(user=np.arange(n) // 5, t=np.arange(n) % 5, channel=ch, gain=g,
                       cost=rng.uniform(0.5, 2.0, n), reward=g, propensity=np.full(n, 1 / 3),
                       action_probs=rng.dirichlet(np.ones(3), n), reward_pred=rp,
                       channels=["a", "b", "c"], binary=True, name="m")


def test_budget_curve_monotone_and_bounded():
    p = _preds()
    fr = [round(0.1 * i, 1) for i in range(1, 11)]
    cur = budget_curve(p, fr)
    pts = cur["points"]
    spends = [pt["spend"] for pt in pts]
    assert all(a <= b + 1e-12 for a, b in zip(spends, spends[1:]))
    assert all(pt["spend"] <= pt["budget"] + 1e-12 for pt in pts)
    assert pts[-1]["selected"] == p.n_steps and pts[-1]["select_rate"] == pytest.approx(cur["base_rate"])
    assert cur["base_rate"] == pytest.approx(p.gain.mean())
    # informative predictions: the first decile beats the base rate
    assert pts[0]["select_rate"] > cur["base_rate"]
    for pt in pts:
        assert 0 <= pt["replay_rate"] <= pt["select_rate"]
    rnd = budget_curve(p, [0.5], policy="random")
    assert rnd["points"][0]["spend"] <= rnd["points"][0]["budget"]
