"""EvaluateJob end to end: a trained checkpoint on the KuaiRand test split and on raw held-back logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from mtorl import storage
from mtorl.data.prepare import split_of
from mtorl.spec import make_job
from tests.fixtures.compare import assert_close

pytestmark = pytest.mark.integration

KEYS = ("n_users", "n_steps", "channel", "reward", "base_rate", "budget", "ope")


def _check(m: dict) -> None:
    for k in KEYS:
        assert k in m, k
    ch = m["channel"]
    for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "mean_auc"):
        assert 0.0 <= ch[k] <= 1.0, (k, ch[k])
    assert set(ch["auc_per_channel"]) == {"short", "mid", "long"}
    assert 0.0 <= m["reward"]["auc"] <= 1.0 and m["reward"]["logloss"] > 0 and 0 <= m["reward"]["ece"] <= 1
    assert 0.0 < m["base_rate"] < 1.0
    fr = [b["fraction"] for b in m["budget"]]
    assert fr == sorted(fr) and fr[-1] == pytest.approx(1.0)
    for b in m["budget"]:
        assert b["spend"] <= b["fraction"] * m["budget"][-1]["budget"] / 1.0 + 1e-6
        assert 0.0 <= b["select_rate"] <= 1.0 and 0.0 <= b["replay_rate"] <= 1.0
    for est in ("ips", "snips", "dm", "dr", "pdis"):
        v = m["ope"][est]
        assert {"value", "ci_low", "ci_high"} <= set(v)
        assert math.isfinite(v["value"]) and v["ci_low"] <= v["value"] + 1e-9 <= v["ci_high"] + 2e-9


def test_evaluate_kuairand_test_split(kuairand_checkpoint: str, tmp_path: Path) -> None:
    from mtorl.evaluation.run import run_evaluate

    spec = make_job("EvaluateJob", "ev", {"checkpoint": kuairand_checkpoint, "output": str(tmp_path / "rep"), "bootstrap": 20}).spec
    res = run_evaluate(spec, progress=print)
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    _check(m)
    assert m["n_users"] > 400  # ~10% of 4839 users, all of them, every step
    assert {"history", "majority", "mtorl"} <= set(res["compare"])
    for png in ("budget_curve.png", "channel_auc.png", "reliability.png", "training_curves.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG", png
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "history" in report and "by user" in report


def test_evaluate_raw_held_back_logs_with_checkpoint_manifest(kuairand_checkpoint: str, shared_data: Path,
                                                              s3_bucket: str) -> None:
    from mtorl.evaluation.run import run_evaluate
    from mtorl.training.checkpoint import load_checkpoint

    man = load_checkpoint(kuairand_checkpoint).manifest
    df = pd.read_csv(shared_data / "kuairand_sequence.csv.gz")
    held = [u for u in df["user_id"].drop_duplicates() if split_of(str(u), man.split_salt, 0.8, 0.1) == "test"][:6]
    raw = df[df["user_id"].isin(held)]
    csv = f"{s3_bucket}/raw/held.csv"
    storage.write_bytes(csv, raw.to_csv(index=False).encode())
    spec = make_job("EvaluateJob", "ev-raw", {"checkpoint": kuairand_checkpoint, "input": csv, "source": "kuairand-sequence",
                                              "output": f"{s3_bucket}/report", "bootstrap": 20}).spec
    res = run_evaluate(spec, progress=print)
    m = json.loads(storage.read_bytes(f"{s3_bucket}/report/metrics.json"))
    assert m["n_users"] == 6 and m["n_steps"] == len(raw)
    assert "raw logs" in res["evaluated_on"]


def test_streaming_evaluation_equals_the_in_memory_one(kuairand_checkpoint: str, tmp_path: Path) -> None:
    """The same report whether the splits are read whole or in batches of users (streaming forced by
    threshold 0), scored here or by Ray Data; above exact_max_steps the sufficient-statistic metrics stay exact."""
    from mtorl.evaluation.run import run_evaluate

    runs = {"memory": {"stream_min_steps": 10**12}, "stream": {"stream_min_steps": 0},
            "ray": {"stream_min_steps": 0, "ray_min_steps": 0},
            "sample": {"stream_min_steps": 0, "exact_max_steps": 2_000}}
    m, res = {}, {}
    for name, over in runs.items():
        spec = make_job("EvaluateJob", f"ev-{name}", {"checkpoint": kuairand_checkpoint, "output": str(tmp_path / name),
                                                       "bootstrap": 20, **over}).spec
        res[name] = run_evaluate(spec, progress=print)
        m[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert res["memory"]["mode"].startswith("in memory") and res["stream"]["mode"].startswith("streaming")
    assert_close(m["memory"], m["stream"])
    assert_close(m["memory"], m["ray"])  # scored by Ray Data map_batches tasks, merged in shard order
    assert (tmp_path / "memory" / "report.md").read_text() == (tmp_path / "stream" / "report.md").read_text()

    s, ref = m["sample"], m["memory"]
    assert s["n_steps"] == ref["n_steps"] > 2_000 and s["n_users"] == ref["n_users"]
    for row in ref["compare"]:
        for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall"):
            assert s["compare"][row]["channel"][k] == pytest.approx(ref["compare"][row]["channel"][k], rel=1e-9), (row, k)
        for k in ("logloss", "ece"):
            assert s["compare"][row]["reward"][k] == pytest.approx(ref["compare"][row]["reward"][k], rel=1e-9), (row, k)
        assert abs(s["compare"][row]["reward"]["auc"] - ref["compare"][row]["reward"]["auc"]) < 0.1, row
    assert any("uniform sample" in n for n in s["notes"]) and not any("uniform sample" in n for n in ref["notes"])
