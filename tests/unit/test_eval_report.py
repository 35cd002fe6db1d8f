"""evaluate_predictions bundles metrics, budget and OPE; write_report writes every documented file."""

import json
import os

import numpy as np

from mtorl.evaluation.heuristics import HistoryPrior, heuristic_predictions
from mtorl.evaluation.predictions import Predictions
from mtorl.evaluation.report import evaluate_predictions, plot_training_curves, write_report


def _preds(n=400, seed=0):
    rng = np.random.default_rng(seed)
    ch = rng.integers(0, 3, n)
    rp = rng.random((n, 3))
    g = (rng.random(n) < rp[np.arange(n), ch]).astype(float)
    return Predictions(user=np.arange(n) // 8, t=np.arange(n) % 8, channel=ch, gain=g, cost=np.ones(n),
                       reward=g, propensity=np.full(n, 1 / 3), action_probs=rng.dirichlet(np.ones(3), n),
                       reward_pred=rp, channels=["a", "b", "c"], binary=True, name="mtorl")


def test_write_report(tmp_path):
    p = _preds()
    fr = [0.1, 0.2, 0.5, 1.0]
    prior = HistoryPrior.from_predictions(_preds(seed=1))
    results = {"mtorl": evaluate_predictions(p, fr, n_boot=20, seed=0)}
    for name, h in heuristic_predictions(p, prior).items():
        results[name] = evaluate_predictions(h, fr, n_boot=20, seed=0)
    history = [
        {"epoch": e, "train/loss": 1.0 / (e + 1), "val/loss": 1.2 / (e + 1), "val/reward_auc": 0.6} for e in range(3)
    ]
    paths = write_report(str(tmp_path / "out"), results, primary="mtorl", notes=["a note"], history=history)
    names = {os.path.basename(x) for x in paths}
    assert names == {"metrics.json", "report.md", "budget_curve.png", "channel_auc.png", "reliability.png",
                     "training_curves.png"}
    for x in paths:
        assert os.path.getsize(x) > 0
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["n_users"] == 50 and m["n_steps"] == 400
    assert set(m["channel"]) >= {
        "accuracy",
        "macro_f1",
        "macro_precision",
        "macro_recall",
        "auc_per_channel",
        "mean_auc",
    }
    assert set(m["reward"]) >= {"auc", "logloss", "ece"}
    assert m["base_rate"] == p.gain.mean()
    assert [b["fraction"] for b in m["budget"]] == fr
    assert set(m["budget"][0]) >= {"fraction", "spend", "selected", "select_rate", "replay_rate", "roi"}
    for k in ("ips", "snips", "dm", "dr", "pdis"):
        assert set(m["ope"][k]) == {"value", "ci_low", "ci_high"}
    assert list(m["compare"]) == ["history", "majority", "mtorl"]       # heuristics first
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.index("| history") < md.index("| **mtorl**") and "split is by user" in md and "a note" in md


def test_training_curves_empty(tmp_path):
    assert plot_training_curves([], str(tmp_path / "x.png")) is None
