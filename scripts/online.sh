#!/usr/bin/env bash
# The closed-loop result of the README: simulated logs with a known response model -> prepare ->
# train -> `evaluate --online` (true reward under a budget vs the logging policy and an oracle, and
# each OPE estimator's error against the simulator's truth on the logged test users).
# Needs the object store (`mtorl store up`, exported variables).
set -euo pipefail
mtorl simulate ray_jobs/specs/simulate.yaml
mtorl prepare ray_jobs/specs/sim-prepare.yaml
mtorl train ray_jobs/specs/sim-train.yaml --set spec.tracking.wandb=disabled
mtorl evaluate ray_jobs/specs/sim-evaluate.yaml --online --users 2000 --budget 0.3 --result online-sim.json
