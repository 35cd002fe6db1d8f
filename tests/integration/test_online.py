"""Closed loop: a policy trained by mtorl on simulated logs, run inside the simulator under a budget."""

from __future__ import annotations


import pytest

from mtorl.spec import make_job
from tests.fixtures.datasets import train_small

pytestmark = pytest.mark.integration


def test_trained_policy_beats_logging_policy_at_same_budget(ray_session: None, s3_bucket: str) -> None:
    from mtorl import storage
    from mtorl.data.prepare import prepare
    from mtorl.sim.closed_loop import run_online_evaluation
    from mtorl.sim.generate import journeys_format, simulate

    raw, ds = f"{s3_bucket}/raw/sim", f"{s3_bucket}/datasets/sim"
    simulate(make_job("SimulateJob", "sim", {"output": raw, "users": 3000, "seed": 0}).spec, progress=None)
    prepare(make_job("PrepareJob", "p", {"source": "journeys", "input": raw, "output": ds,
                                         "journeys": journeys_format(raw)}).spec, progress=lambda *_: None)
    ck = train_small(ds, f"{s3_bucket}/runs", "sim", epochs=4, steps=None)
    res = run_online_evaluation(make_job("EvaluateJob", "e", {"checkpoint": ck, "output": f"{s3_bucket}/rep",
                                                              "bootstrap": 50}).spec, users=1500, budget=0.3)
    r = res["results"]
    value = {k: v["expected_reward"]["value"] for k, v in r.items()}
    for k, v in r.items():  # the same budget for all, never exceeded
        assert v["spend"]["value"] <= res["budget"] + 1e-6, k
    assert value["oracle"] > value["mtorl"] > value["logging"], value
    assert storage.exists(f"{s3_bucket}/rep/online.json") and storage.exists(f"{s3_bucket}/rep/online.md")
    # every off-policy estimate of the trained policy, against the simulator's truth on unseen users
    ope = res["ope_vs_truth"]
    assert ope["unaligned_users"] == 0 and ope["users"] > 100 and ope["behaviour_source"] == "logged"
    for pol in ("greedy", "softmax"):
        errs = ope["policies"][pol]["errors"]
        assert set(errs) == {"ips", "snips", "dm", "dr"}
        assert 0.0 < ope["policies"][pol]["truth"]["value"] < 1.0
        # importance-weighted estimators on logged propensities are unbiased: within 25% of the truth
        assert errs["snips"]["rel_error"] < 0.25 and errs["dr"]["rel_error"] < 0.25, (pol, errs)
