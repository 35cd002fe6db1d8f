"""Metric functions against scikit-learn and hand values."""

import numpy as np
import pytest
from sklearn.metrics import f1_score, log_loss, roc_auc_score

from mtorl.evaluation.metrics import calibration, channel_metrics, reward_metrics
from mtorl.evaluation.predictions import Predictions


def _p(channel, probs, gain, rpred, binary=True, reward=None):
    n = len(channel)
    return Predictions(user=np.arange(n), t=np.zeros(n), channel=channel, gain=gain, cost=np.ones(n),
                       reward=gain if reward is None else reward, propensity=np.full(n, np.nan),
                       action_probs=probs, reward_pred=rpred, channels=["a", "b", "c"], binary=binary)


def test_channel_metrics_hand_values():
    ch = np.array([0, 0, 1, 1, 2])
    probs = np.array([[.8, .1, .1], [.3, .6, .1], [.2, .7, .1], [.1, .8, .1], [.5, .2, .3]])
    m = channel_metrics(_p(ch, probs, np.zeros(5), np.zeros((5, 3))))
    pred = probs.argmax(1)                                    # 0 1 1 1 0
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["macro_f1"] == pytest.approx(f1_score(ch, pred, average="macro", zero_division=0))
    assert m["auc_per_channel"]["a"] == pytest.approx(roc_auc_score(ch == 0, probs[:, 0]))
    assert m["auc_per_channel"]["c"] == pytest.approx(1.0)
    assert m["mean_auc"] == pytest.approx(np.mean(list(m["auc_per_channel"].values())))


def test_channel_auc_none_when_one_class():
    ch = np.array([0, 1, 0, 1])
    probs = np.full((4, 3), 1 / 3)
    m = channel_metrics(_p(ch, probs, np.zeros(4), np.zeros((4, 3))))
    assert m["auc_per_channel"]["c"] is None and m["mean_auc"] == pytest.approx(0.5)


def test_reward_metrics_binary():
    ch = np.array([0, 1, 2, 0, 1, 2])
    g = np.array([1, 0, 1, 0, 0, 1.0])
    rp = np.tile(np.array([[0.9, 0.2, 0.6]]), (6, 1))
    rp[3, 0] = 0.15
    m = reward_metrics(_p(ch, np.full((6, 3), 1 / 3), g, rp))
    logged = rp[np.arange(6), ch]                             # .9 .2 .6 .15 .2 .6
    assert m["auc"] == pytest.approx(roc_auc_score(g, logged))
    assert m["logloss"] == pytest.approx(log_loss(g, logged))
    ece, rel = calibration(g, logged)
    assert m["ece"] == pytest.approx(ece)
    # bins: .15 -> 1, .2 -> 2 (x2), .6 -> 6 (x2), .9 -> 9
    assert rel["counts"] == [0, 1, 2, 0, 0, 0, 2, 0, 0, 1]
    hand = (1 * abs(0 - .15) + 2 * abs(0 - .2) + 2 * abs(1 - .6) + 1 * abs(1 - .9)) / 6
    assert ece == pytest.approx(hand)
    assert rel["frac_pos"][0] is None and len(rel["bin_centers"]) == 10


def test_calibration_edges():
    ece, rel = calibration(np.array([1.0, 0.0]), np.array([1.0, 0.0]))
    assert ece == 0.0 and rel["counts"][-1] == 1 and rel["counts"][0] == 1


def test_reward_metrics_continuous():
    r = np.array([0.1, 0.4, 0.2, 0.9])
    rp = np.tile(r[:, None], (1, 3)) + 0.1
    m = reward_metrics(_p(np.array([0, 1, 2, 0]), np.full((4, 3), 1 / 3), r, rp, binary=False, reward=r))
    assert m["auc"] is None and m["mse"] == pytest.approx(0.01) and m["mae"] == pytest.approx(0.1)
    assert m["spearman"] == pytest.approx(1.0)
