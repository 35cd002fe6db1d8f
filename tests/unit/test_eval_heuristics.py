"""History heuristics on a hand-made 2-user log (exact expected probabilities)."""

import numpy as np
import pytest

from mtorl.evaluation.heuristics import (HistoryPrior, heuristic_predictions, last_channel_probs,
                                         majority_channel_probs, past_reward_rate)
from mtorl.evaluation.predictions import Predictions

PRIOR = HistoryPrior(channel_prior=np.array([0.5, 0.3, 0.2]), rate=0.25)


def _log(shuffle: bool = False) -> Predictions:
    # user 0: channels 1, 2, 2, 1 gains 1, 0, 1, 0 ; user 1: channels 0, 2 gains 0, 1
    user = np.array([0, 0, 0, 0, 1, 1])
    t = np.array([0, 1, 2, 3, 0, 1])
    ch = np.array([1, 2, 2, 1, 0, 2])
    g = np.array([1.0, 0, 1, 0, 0, 1])
    idx = np.array([5, 0, 3, 1, 4, 2]) if shuffle else np.arange(6)
    z = np.zeros((6, 3))
    return Predictions(user=user[idx], t=t[idx], channel=ch[idx], gain=g[idx], cost=np.ones(6),
                       reward=g[idx], propensity=np.full(6, np.nan), action_probs=z[idx], reward_pred=z[idx],
                       channels=["a", "b", "c"], binary=True, name="log"), idx


def test_prior_fit():
    pr = HistoryPrior.fit(np.array([0, 0, 1]), np.array([1.0, 0, 0]), 3, smoothing=1.0)
    assert np.allclose(pr.channel_prior, [3 / 6, 2 / 6, 1 / 6]) and pr.rate == pytest.approx(1 / 3)


@pytest.mark.parametrize("shuffle", [False, True])
def test_last_channel(shuffle):
    p, idx = _log(shuffle)
    expected = np.array([PRIOR.channel_prior, [0, 1, 0], [0, 0, 1], [0, 0, 1],
                         PRIOR.channel_prior, [1, 0, 0]])[idx]
    assert np.allclose(last_channel_probs(p, PRIOR), expected)


@pytest.mark.parametrize("shuffle", [False, True])
def test_majority_channel(shuffle):
    p, idx = _log(shuffle)
    pr = PRIOR.channel_prior
    expected = np.array([
        pr,                                       # no history
        (np.array([0, 1, 0]) + pr) / 2,           # counts b:1
        (np.array([0, 1, 1]) + pr) / 3,           # tie b/c -> broken by prior (b)
        (np.array([0, 1, 2]) + pr) / 4,           # c majority
        pr,
        (np.array([1, 0, 0]) + pr) / 2,
    ])[idx]
    got = majority_channel_probs(p, PRIOR)
    assert np.allclose(got, expected)
    assert np.allclose(got.sum(1), 1.0)
    assert np.argmax(got[np.argsort(idx)][2]) == 1   # the tie goes to the channel with the larger prior


@pytest.mark.parametrize("shuffle", [False, True])
def test_past_reward_rate(shuffle):
    p, idx = _log(shuffle)
    r = 0.25
    expected = np.array([r, (1 + r) / 2, (1 + r) / 3, (2 + r) / 4, r, (0 + r) / 2])[idx]
    got = past_reward_rate(p, PRIOR)
    assert np.allclose(got, expected[:, None].repeat(3, 1))
    # per channel: user 0 step 3: b seen once with y=1, c twice with y=0,1 ; a never
    pc = past_reward_rate(p, PRIOR, per_channel=True)[np.argsort(idx)]
    u = (2 + r) / 4
    assert np.allclose(pc[3], [u, (1 + u) / 2, (1 + u) / 3])


def test_heuristic_predictions_rows():
    p, _ = _log()
    h = heuristic_predictions(p, PRIOR)
    assert set(h) == {"history", "majority"}
    for name, q in h.items():
        assert q.name == name and q.action_probs.shape == (6, 3) and q.reward_pred.shape == (6, 3)
        assert np.array_equal(q.channel, p.channel)
