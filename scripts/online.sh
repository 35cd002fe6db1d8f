#!/usr/bin/env bash
# The closed-loop results of the README: simulated logs with a known response model -> prepare ->
# train -> `evaluate --online` (true reward under a budget vs the logging policy, the full oracle and
# the observable oracle, and each OPE estimator's error against the simulator's truth on the logged
# test users) -> the benchmark table at budgets 10/30/50% over 3 seeds (docs/results/sim-closed-loop.md).
# Needs the object store (`mtorl store up`, exported variables). Seed 0 of the closed loop was used to
# choose the decision layer and the training spec; the table reports seeds 1-3.
set -euo pipefail
mtorl simulate ray_jobs/specs/simulate.yaml
mtorl prepare ray_jobs/specs/sim-prepare.yaml
mtorl train ray_jobs/specs/sim-train.yaml --set spec.tracking.wandb=disabled
mtorl evaluate ray_jobs/specs/sim-evaluate.yaml --result online-sim.json
python -m mtorl.sim.benchmark --checkpoint s3://mtorl/runs/sim-mtorl --out docs/results/sim-closed-loop \
    --budgets 0.1 0.3 0.5 --seeds 1 2 3 --users 2000
