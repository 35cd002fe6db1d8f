"""report.html: the evaluation report as one self-contained page, checked in headless chromium."""

import base64
import re

import numpy as np
import pytest

from mtorl.evaluation.heuristics import HistoryPrior, heuristic_predictions
from mtorl.evaluation.html import write_html
from mtorl.evaluation.predictions import Predictions
from mtorl.evaluation.report import evaluate_predictions, write_report
from tests.fixtures.browser import chromium, load_pages


def _preds(n=240, seed=0):
    rng = np.random.default_rng(seed)
    ch = rng.integers(0, 3, n)
    rp = rng.random((n, 3))
    g = (rng.random(n) < rp[np.arange(n), ch]).astype(float)
    return Predictions(
        user=np.arange(n) // 8,
        t=np.arange(n) % 8,
        channel=ch,
        gain=g,
        cost=np.ones(n),
        reward=g,
        propensity=np.full(n, 1 / 3),
        action_probs=rng.dirichlet(np.ones(3), n),
        reward_pred=rp,
        channels=["a", "b", "c"],
        binary=True,
        name="mtorl",
    )


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    p = _preds()
    results = {"mtorl": evaluate_predictions(p, [0.2, 0.5, 1.0], n_boot=10, seed=0)}
    for name, h in heuristic_predictions(p, HistoryPrior.from_predictions(_preds(seed=1))).items():
        results[name] = evaluate_predictions(h, [0.2, 0.5, 1.0], n_boot=10, seed=0)
    history = [
        {"epoch": e, "train/loss": 1.0 / (e + 1), "val/loss": 1.2 / (e + 1), "val/reward_auc": 0.6} for e in range(3)
    ]
    write_report(str(out), results, primary="mtorl", history=history)
    write_html(str(out))
    return out


def test_html_is_self_contained_with_every_plot_embedded(report_dir):
    page = (report_dir / "report.html").read_text()
    srcs = re.findall(r'<img\b[^>]*\bsrc="([^"]*)"', page)
    assert len(srcs) == 4  # budget curve, per-channel AUC, reliability + the training curves
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'\b(?:src|href)="(?!data:)', page)  # nothing loaded from elsewhere
    assert "<table>" in page and "<script" not in page
    assert "<title>Evaluation report: mtorl</title>" in page


@pytest.mark.skipif(chromium() is None, reason="chromium not installed (make test installs it)")
def test_html_renders_in_headless_chromium(report_dir, tmp_path):
    broken = tmp_path / "broken.html"  # the check must catch a console error and an image that doesn't decode
    broken.write_text(
        '<!DOCTYPE html><html><head><title>x</title><link rel="icon" href="data:,"></head><body>'
        '<img src="data:image/png;base64,iVBORw0KGgoAAAAN"><script>console.error("boom")</script></body></html>'
    )
    good, bad = load_pages([(report_dir / "report.html").as_uri(), broken.as_uri()])
    assert good["errors"] == [] and good["title"] == "Evaluation report: mtorl"
    assert len(good["images"]) == 4 and all(i["ok"] and i["width"] > 100 and i["height"] > 100 for i in good["images"])
    assert good["tables"] >= 3
    assert any("boom" in e for e in bad["errors"]) and not bad["images"][0]["ok"]
