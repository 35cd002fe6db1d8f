"""Channel and reward metrics of one `Predictions` (scikit-learn based, pure).

Channel (next-channel prediction, predicted channel = argmax of action_probs):
    accuracy, macro_f1 / macro_precision / macro_recall (macro over the channels that occur in the
    labels or the predictions, zero_division=0), auc_per_channel {name: one-vs-rest AUC, None when
    the channel is absent or always present in the split}, mean_auc over the defined ones.
Reward (the logged channel's predicted reward vs the observed outcome):
    binary gains: auc, logloss, brier, ece (10 equal-width bins on [0, 1]) and the reliability
    diagram {bin_centers, mean_pred, frac_pos, counts} (empty bins: None).
    continuous gains: mse, mae, spearman; auc, logloss, ece and reliability are None.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import (accuracy_score, log_loss, mean_absolute_error, mean_squared_error,
                             precision_recall_fscore_support, roc_auc_score)

from mtorl.evaluation.predictions import Predictions, outcome

__all__ = ["channel_metrics", "reward_metrics", "calibration", "logged_reward_pred"]

_EPS = 1e-7


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    if y.size == 0 or y.min() == y.max():
        return None
    return float(roc_auc_score(y, score))


def channel_metrics(p: Predictions) -> dict[str, Any]:
    y = p.channel
    pred = np.argmax(p.action_probs, axis=1)
    prec, rec, f1, _ = precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    auc = {name: _auc((y == c).astype(int), p.action_probs[:, c]) for c, name in enumerate(p.channels)}
    defined = [v for v in auc.values() if v is not None]
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1),
        "macro_precision": float(prec),
        "macro_recall": float(rec),
        "auc_per_channel": auc,
        "mean_auc": float(np.mean(defined)) if defined else None,
    }


def logged_reward_pred(p: Predictions) -> np.ndarray:
    """(N,) predicted reward of the logged channel."""
    return p.reward_pred[np.arange(p.n_steps), p.channel]


def calibration(y: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> tuple[float, dict[str, list]]:
    """Expected calibration error with `n_bins` equal-width bins on [0, 1] and the reliability table.

    ECE = sum_b (n_b / N) |mean(y in b) - mean(prob in b)|; a probability of exactly 1 falls in the
    last bin.
    """
    prob = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(y, dtype=np.float64)
    b = np.minimum((prob * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(b, minlength=n_bins)
    sum_y = np.bincount(b, weights=y, minlength=n_bins)
    sum_p = np.bincount(b, weights=prob, minlength=n_bins)
    nz = counts > 0
    frac = np.where(nz, sum_y / np.maximum(counts, 1), np.nan)
    mean_p = np.where(nz, sum_p / np.maximum(counts, 1), np.nan)
    ece = float(np.sum(counts[nz] / max(y.size, 1) * np.abs(frac[nz] - mean_p[nz])))
    none = lambda a: [None if np.isnan(v) else float(v) for v in a]  # noqa: E731
    return ece, {
        "bin_centers": [float((i + 0.5) / n_bins) for i in range(n_bins)],
        "mean_pred": none(mean_p),
        "frac_pos": none(frac),
        "counts": [int(v) for v in counts],
    }


def reward_metrics(p: Predictions, n_bins: int = 10) -> dict[str, Any]:
    pred = logged_reward_pred(p)
    y = outcome(p)
    if p.binary:
        prob = np.clip(pred, _EPS, 1 - _EPS)
        ece, rel = calibration(y, prob, n_bins)
        return {
            "auc": _auc(y.astype(int), prob),
            "logloss": float(log_loss(y, prob, labels=[0, 1])) if y.size else None,
            "brier": float(mean_squared_error(y, prob)) if y.size else None,
            "ece": ece,
            "reliability": rel,
            "mean_pred": float(prob.mean()) if y.size else None,
            "mean_outcome": float(y.mean()) if y.size else None,
        }
    rho = spearmanr(pred, y).statistic if y.size > 1 and np.ptp(y) > 0 and np.ptp(pred) > 0 else None
    return {
        "auc": None, "logloss": None, "ece": None, "reliability": None,
        "mse": float(mean_squared_error(y, pred)) if y.size else None,
        "mae": float(mean_absolute_error(y, pred)) if y.size else None,
        "spearman": None if rho is None else float(rho),
        "mean_pred": float(pred.mean()) if y.size else None,
        "mean_outcome": float(y.mean()) if y.size else None,
    }
