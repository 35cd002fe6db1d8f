"""The decision layer: Lagrange bisection on s against hand-computed cases, and the served set against
a brute-force optimum (every assignment of a channel or nothing to every item)."""

import itertools

import numpy as np
import pytest

from mtorl.evaluation.decision import DecisionParams, channel_values, decide, ranking, solve_penalty, spend_at


def test_bisection_one_channel_hand_computed():
    # ratios q/kappa = 0.5, 0.3, 0.1; spend(s) = 4 for s < 0.1, 2 for 0.1 <= s < 0.3: B = 2 -> s* = 0.1
    q = np.array([[0.5], [0.3], [0.2]])
    k = np.array([[1.0], [1.0], [2.0]])
    s, c, v, served = solve_penalty(q, k, 2.0, fill=False)
    assert s == pytest.approx(0.1, abs=1e-9)
    assert served.tolist() == [True, True, False]
    assert spend_at(q, k, s) <= 2.0
    assert spend_at(q, k, s * (1 - 1e-6)) > 2.0          # the smallest s that fits
    assert v[:2] == pytest.approx([0.4, 0.2])


def test_bisection_two_channels_tie_takes_the_cheaper():
    # one user, q = (0.3, 0.5), kappa = (1, 3), B = 2: at s = 0 it would buy channel 1 (cost 3 > B);
    # the channels tie at s = (0.5 - 0.3) / (3 - 1) = 0.1, where the cheaper one (cost 1) is taken
    d = decide(np.array([[0.3, 0.5]]), None, np.array([1.0, 3.0]), budget=2.0)
    assert d.penalty == pytest.approx(0.1, abs=1e-9)
    assert d.channel.tolist() == [0] and d.served.tolist() == [True]
    assert d.spend == 1.0 and d.expected_reward.tolist() == [0.3]
    # a slack budget: s = 0 and the best channel
    d = decide(np.array([[0.3, 0.5]]), None, np.array([1.0, 3.0]), budget=3.0)
    assert d.penalty == 0.0 and d.channel.tolist() == [1]


def test_fill_spends_the_leftover_at_the_breakpoint():
    # three equal items (ratio 0.5), B = 2: every s < 0.5 spends 3, s = 0.5 spends 0; fill takes two
    q, k = np.full((3, 1), 0.5), np.ones((3, 1))
    s, _, _, served = solve_penalty(q, k, 2.0, fill=False)
    assert s == pytest.approx(0.5) and served.sum() == 0
    s, _, _, served = solve_penalty(q, k, 2.0, fill=True)
    assert served.tolist() == [True, True, False]


def _brute(q, k, budget):
    n, c = q.shape
    best = -np.inf
    for a in itertools.product(range(-1, c), repeat=n):
        spend = sum(k[i, x] for i, x in enumerate(a) if x >= 0)
        if spend <= budget + 1e-12:
            best = max(best, sum(q[i, x] for i, x in enumerate(a) if x >= 0))
    return best


@pytest.mark.parametrize("seed", range(25))
def test_served_set_is_optimal_for_what_it_spends(seed):
    rng = np.random.default_rng(seed)
    n, c = 5, 2
    q = rng.uniform(0.0, 1.0, (n, c))
    k = rng.integers(1, 4, (n, c)).astype(float)
    budget = float(rng.uniform(1, 8))
    d = decide(q, None, k, params=DecisionParams(fill=False), budget=budget)
    rows = np.arange(n)
    assert d.spend <= budget + 1e-9
    got = float(q[rows, d.channel][d.served].sum())
    assert got >= _brute(q, k, d.spend) - 1e-9           # Everett: optimal for the budget it spends
    f = decide(q, None, k, budget=budget)                 # fill: more reward, still within budget
    assert f.spend <= budget + 1e-9
    assert float(q[rows, f.channel][f.served].sum()) >= got - 1e-12


@pytest.mark.parametrize("seed", range(10))
def test_equal_costs_match_brute_force_exactly(seed):
    rng = np.random.default_rng(100 + seed)
    n = 6
    q = rng.uniform(-0.2, 1.0, (n, 1))
    k = np.full((n, 1), 2.0)
    budget = float(rng.integers(0, 14))
    d = decide(q, None, k, budget=budget)
    assert float(q[d.served, 0].sum()) == pytest.approx(_brute(q, k, budget))
    # ranking by the served channel's value per cost lists the selected items first
    order = ranking(d)
    assert set(order[: d.served.sum()].tolist()) == set(np.flatnonzero(d.served).tolist())


def test_ranking_uses_the_served_channel_reward_not_pi():
    # user 0: the logger is unsure (pi flat) but the reward of the best channel is high; user 1 the reverse
    r = np.array([[0.6, 0.1], [0.3, 0.2]])
    pi = np.array([[0.5, 0.5], [0.99, 0.01]])
    d = decide(r, pi, np.array([1.0, 1.0]), budget=1.0)
    assert d.served.tolist() == [True, False] and d.channel.tolist() == [0, 0]


def test_support_threshold_and_pessimism():
    r = np.array([[0.2, 0.5]])
    pi = np.array([[0.95, 0.05]])
    free = DecisionParams(support_threshold=0.0)
    assert decide(r, pi, 1.0, params=free).channel.tolist() == [1]
    assert decide(r, pi, 1.0).channel.tolist() == [0]                     # default tau = 0.5: unsupported
    assert decide(r, pi, 1.0, params=DecisionParams(support_threshold=0.1)).channel.tolist() == [0]
    q = channel_values(r, pi, DecisionParams(support_threshold=0.0, pessimism=0.1))
    assert q[0, 1] == pytest.approx(0.5 - 0.1 * np.sqrt(0.25 / 0.05))
    assert decide(r, pi, 1.0, params=DecisionParams(support_threshold=0.0, pessimism=0.2)).channel.tolist() == [0]
    # imitation: the pi-reweighted channel, the value is the reward of that channel
    d = decide(r, pi, 1.0, params=DecisionParams(policy="imitation"))
    assert d.channel.tolist() == [0] and d.value.tolist() == [0.2]


def test_ensemble_pessimism_subtracts_the_members_spread():
    # q_c = rhat_c - beta_e * sd_c: channel 1 (0.5, spread 0.2) loses to channel 0 (0.4, spread 0) at beta_e = 1
    r, sd = np.array([[0.4, 0.5]]), np.array([[0.0, 0.2]])
    prm = DecisionParams(support_threshold=0.0, ensemble_pessimism=1.0)
    assert channel_values(r, None, prm, reward_std=sd)[0].tolist() == pytest.approx([0.4, 0.3])
    assert channel_values(r, None, DecisionParams(support_threshold=0.0), reward_std=sd)[0].tolist() == [0.4, 0.5]
    assert channel_values(r, None, prm)[0].tolist() == [0.4, 0.5]          # a single model: no spread, no change
    with pytest.raises(ValueError, match="reward_std"):
        channel_values(r, None, prm, reward_std=np.zeros((1, 3)))


def test_decide_with_the_members_spread_hand_computed():
    # two users, unit costs, budget 1 (one user). beta_e = 0: user 0's best is channel 1 (0.5) over user 1's 0.45,
    # so user 0 is served on channel 1 at s = 0.45. beta_e = 1: user 0's scores are (0.4, 0.5 - 0.2) -> channel 0
    # at 0.4 < 0.45, so user 1 is served at s = 0.4 with value 0.45 - 0.4; expected_reward stays r_hat.
    r = np.array([[0.4, 0.5], [0.45, 0.1]])
    sd = np.array([[0.0, 0.2], [0.0, 0.0]])
    prm = DecisionParams(support_threshold=0.0, ensemble_pessimism=1.0)
    d0 = decide(r, None, 1.0, DecisionParams(support_threshold=0.0), budget=1.0, reward_std=sd)
    assert d0.served.tolist() == [True, False] and d0.channel.tolist() == [1, 0]
    assert d0.penalty == pytest.approx(0.45, abs=1e-9)
    d = decide(r, None, 1.0, prm, budget=1.0, reward_std=sd)
    assert d.served.tolist() == [False, True] and d.channel.tolist() == [0, 0]
    assert d.penalty == pytest.approx(0.4, abs=1e-9) and d.value[1] == pytest.approx(0.05, abs=1e-9)
    assert d.expected_reward.tolist() == [0.4, 0.45] and d.spend == 1.0
    # no spread (a single model), or a zero one: exactly the beta_e = 0 decision
    for none in (None, np.zeros_like(sd)):
        got, ref = decide(r, None, 1.0, prm, budget=1.0, reward_std=none), d0
        assert all(np.array_equal(a, b) for a, b in zip(got, ref))
    # /v1/allocate's code path
    from mtorl.evaluation.allocation import allocate_requests

    res = allocate_requests([("a", r[0], [0.5, 0.5], 1.0), ("b", r[1], [0.5, 0.5], 1.0)], 1.0, decision=prm,
                            reward_std=sd)
    assert [u["user_id"] for u in res["selected"]] == ["b"] and res["penalty"] == pytest.approx(0.4, abs=1e-9)


def test_penalty_without_budget_and_bad_input():
    d = decide(np.array([[0.3, 0.5]]), None, np.array([1.0, 3.0]), penalty=0.2)
    assert d.channel.tolist() == [0] and d.value == pytest.approx([0.1]) and d.penalty == 0.2
    with pytest.raises(ValueError, match="costs"):
        decide(np.array([[0.3]]), None, -1.0)
    with pytest.raises(ValueError, match="penalty"):
        decide(np.array([[0.3]]), None, 1.0, penalty=-1)


def test_decision_metrics_select_rate_and_dr():
    from mtorl.evaluation.decision import decision_metrics

    # 4 steps, unit costs, budget 50% -> the two with the highest best-channel reward are served
    r = np.array([[0.9, 0.1], [0.2, 0.3], [0.1, 0.8], [0.05, 0.1]])
    y = np.array([1.0, 0.0, 0.0, 1.0])
    ch = np.array([0, 1, 1, 0])
    out = decision_metrics(ch, np.full((4, 2), 0.5), y, r, np.ones(4), np.full(4, 0.5), budget_fraction=0.5)
    assert out["select_rate@budget"] == pytest.approx(0.5)      # steps 0 and 2 served
    assert out["decision_penalty"] == pytest.approx(0.3, abs=1e-9)
    eps = 0.05
    pe = np.full((4, 2), eps / 2)
    pe[np.arange(4), [0, 1, 1, 1]] += 1 - eps
    dr = (pe * r).sum(1) + pe[np.arange(4), ch] / 0.5 * (y - r[np.arange(4), ch])
    assert out["decision_dr"] == pytest.approx(dr.mean())
    assert "decision_dr" not in decision_metrics(ch, np.full((4, 2), 0.5), y, r, np.ones(4), np.full(4, np.nan))


def test_params_defaults_match_the_spec():
    from mtorl.evaluation.decision import params_of
    from mtorl.spec import DecisionSpec

    assert params_of(DecisionSpec()) == DecisionParams()
    assert params_of(None) == DecisionParams()
    assert params_of(DecisionSpec(ensemble_pessimism=1.5)).ensemble_pessimism == 1.5


def test_decision_dr_at_budget_hand_computed():
    from mtorl.evaluation.decision import decision_metrics

    # B = 0.5 * 2 = 1: only step 0 is served (channel 0, the logged one): DR = (0.6 + (1 - 0.6) / 0.5 + 0) / 2
    r = np.array([[0.6, 0.2], [0.1, 0.3]])
    out = decision_metrics(np.array([0, 1]), np.full((2, 2), 0.5), np.array([1.0, 0.0]), r, np.ones(2),
                           np.full(2, 0.5), budget_fraction=0.5)
    assert out["decision_dr@budget"] == pytest.approx(0.7)


def test_channel_cost_weight_hand_computed():
    # one user, q = (0.3, 0.5), kappa = (1, 3). At s = 0.15 the Lagrangian rule (g = 1) compares
    # 0.3 - 0.15 = 0.15 with 0.5 - 0.45 = 0.05 and takes channel 0. With g = 0.5 the choice compares
    # 0.3 - 0.075 = 0.225 with 0.5 - 0.225 = 0.275 and takes channel 1, served on 0.5 - 0.15 * 3 = 0.05 > 0.
    q, k = np.array([[0.3, 0.5]]), np.array([[1.0, 3.0]])
    d1 = decide(q, None, k[0], penalty=0.15)
    assert d1.channel.tolist() == [0] and d1.value == pytest.approx([0.15])
    d = decide(q, None, k[0], DecisionParams(channel_cost_weight=0.5), penalty=0.15)
    assert d.channel.tolist() == [1] and d.value == pytest.approx([0.05]) and d.served.tolist() == [True]
    # at s = 0.18 channel 1 is still chosen (0.3 - 0.09 = 0.21 < 0.5 - 0.27 = 0.23) but its value 0.5 - 0.54 < 0
    d = decide(q, None, k[0], DecisionParams(channel_cost_weight=0.5), penalty=0.18)
    assert d.channel.tolist() == [1] and d.served.tolist() == [False]


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("g", [0.0, 0.6])
def test_channel_cost_weight_never_spends_over_the_budget(seed, g):
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.0, 1.0, (30, 3))
    k = rng.integers(1, 5, (30, 3)).astype(float)
    budget = float(rng.uniform(2.0, 20.0))
    for fill in (False, True):
        s, c, v, served = solve_penalty(q, k, budget, fill=fill, channel_cost_weight=g)
        assert k[np.arange(30), c][served].sum() <= budget + 1e-9
        assert np.all(v[served] > 0) or fill  # without fill, served means a positive penalised value
    # g = 1 is the Lagrangian rule itself
    assert solve_penalty(q, k, budget, channel_cost_weight=1.0)[0] == solve_penalty(q, k, budget)[0]
