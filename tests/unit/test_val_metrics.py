"""The per-epoch validation metrics (numpy, mtorl.training.step) equal scikit-learn's, and a hand-computed case."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from mtorl.training.step import macro_f1, roc_auc, val_metrics


def test_roc_auc_by_hand_with_a_tie() -> None:
    # positives score 0.9 and 0.5, negatives 0.5 and 0.1: pairs (pos > neg) 1 + 1 + 1, the tie 0.5 -> 3.5 of 4
    assert roc_auc(np.array([1, 1, 0, 0], bool), np.array([0.9, 0.5, 0.5, 0.1])) == pytest.approx(3.5 / 4)


def test_macro_f1_by_hand_with_an_absent_label() -> None:
    # label 0: tp 1, fp 1, fn 0 -> 2/3; label 1: tp 1, fp 0, fn 1 -> 2/3; label 2 in neither -> 0
    assert macro_f1(np.array([0, 1, 1]), np.array([0, 0, 1]), 3) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


@pytest.mark.parametrize("seed", range(5))
def test_both_equal_scikit_learn_on_random_data_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = 500, 4
    y = rng.random(n) < 0.3
    score = np.round(rng.random(n), 1)  # many ties
    assert roc_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    truth, pred = rng.integers(0, c - 1, n), rng.integers(0, c, n)  # label c-1 never in truth
    assert macro_f1(truth, pred, c) == pytest.approx(
        f1_score(truth, pred, average="macro", labels=np.arange(c), zero_division=0), abs=1e-12)


def test_val_metrics_match_scikit_learn_end_to_end() -> None:
    rng = np.random.default_rng(7)
    n, c = 300, 3
    probs = rng.dirichlet(np.ones(c), n).astype(np.float32)
    channel = rng.integers(0, c, n)
    reward = (rng.random(n) < 0.4).astype(np.float32)
    rhat = rng.random(n).astype(np.float32)
    m = val_metrics(channel, probs, reward, rhat, binary=True)
    assert m["reward_auc"] == pytest.approx(roc_auc_score(reward > 0.5, rhat), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(channel, probs.argmax(-1), average="macro", labels=np.arange(c),
                                                   zero_division=0), abs=1e-12)
    per_channel = [roc_auc_score(channel == k, probs[:, k]) for k in range(c)]
    assert m["mean_auc"] == pytest.approx(np.mean(per_channel), abs=1e-12)
