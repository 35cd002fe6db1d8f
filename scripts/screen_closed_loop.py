"""Screen decision-layer settings of one checkpoint on held-out closed-loop seeds (not the reported ones).

    python scripts/screen_closed_loop.py CHECKPOINT --seeds 0 4 --users 1000 --budget 0.3 \\
        --settings 1:1 1:0.8 1:0.6      # beta_e:g pairs (decision ensemble_pessimism : channel_cost_weight)

Prints one JSON line per (seed, setting): the true reward of the checkpoint's decision layer and its share
of the logger->oracle gap, with the calls ``python -m mtorl.sim.benchmark`` makes (the same users, budget
and policies), without the bootstrap CIs and the OPE part, so a screen takes seconds.
"""

from __future__ import annotations

import argparse
import json

from mtorl.evaluation.decision import params_of
from mtorl.serving.predictor import Predictor
from mtorl.sim.closed_loop import checkpoint_policy, simulator_for
from mtorl.sim.online import logging_policy, oracle_policy, run_online
from mtorl.spec import DecisionSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 4])
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--settings", nargs="+", default=["0:1"], help="beta_e:g pairs")
    a = ap.parse_args()
    pred = Predictor.from_checkpoint(a.checkpoint)
    sim = simulator_for(pred.manifest)
    base = params_of(DecisionSpec.of_job(pred.meta.spec, None))
    settings = [tuple(float(x) for x in s.split(":")) for s in a.settings]
    for seed in a.seeds:
        free = run_online(sim, logging_policy(sim, seed), a.users, 1e18, seed=seed, keep_history=False)
        budget = a.budget * free["spend"]["value"]
        lo = run_online(sim, logging_policy(sim, seed), a.users, budget, seed=seed, keep_history=False, n_boot=20)
        hi = run_online(sim, oracle_policy(sim), a.users, budget, seed=seed, keep_history=False, n_boot=20)
        low, high = lo["expected_reward"]["value"], hi["expected_reward"]["value"]
        for beta_e, g in settings:
            prm = base._replace(ensemble_pessimism=beta_e, channel_cost_weight=g)
            r = run_online(sim, checkpoint_policy(pred, sim, prm), a.users, budget, seed=seed, keep_history=True, n_boot=20,
                           channel_cost_weight=g)
            v = r["expected_reward"]["value"]
            print(json.dumps({"seed": seed, "beta_e": beta_e, "g": g, "true_reward": round(v, 1),
                              "gap_closed_pct": round(100 * (v - low) / (high - low), 1)}), flush=True)


if __name__ == "__main__":
    main()
