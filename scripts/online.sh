#!/usr/bin/env bash
# The closed-loop results of the README: simulated logs with a known response model (40000 users) ->
# prepare -> train the spec with five training seeds (0-4) -> their ensemble (`mtorl ensemble`: the mean
# of the members' predictions; its decision block set to channel cost weight g = 0.6, so evaluate and
# serve act by it) -> `evaluate --online` (true reward under a budget vs the logging policy, the full
# oracle and the observable oracle, and each OPE estimator's error against the simulator's truth on the
# logged test users) -> the benchmark table at budgets 10/30/50% over 3 seeds
# (docs/results/sim-closed-loop-40k.md: the ensemble's own row, plus the plain rule g = 1 for
# comparison). Needs the object store (`mtorl store up`, exported variables).
# Closed-loop seeds 0 and 4 were used to choose the data size, the decision layer (beta_e = 0, g = 0.6),
# the training spec and the ensemble of five members; the table reports seeds 1-3. Re-running resumes:
# finished runs and the ensemble are kept.
set -euo pipefail
mtorl simulate ray_jobs/specs/simulate.yaml
mtorl prepare ray_jobs/specs/sim-prepare.yaml
mtorl train ray_jobs/specs/sim-train.yaml --set spec.tracking.wandb=disabled
for seed in 1 2 3 4; do
    mtorl train ray_jobs/specs/sim-train.yaml --set spec.tracking.wandb=disabled \
        --set metadata.name=sim-mtorl-s$seed --set spec.trainer.seed=$seed
done
mtorl ensemble s3://mtorl/runs/sim-mtorl s3://mtorl/runs/sim-mtorl-s1 s3://mtorl/runs/sim-mtorl-s2 \
    s3://mtorl/runs/sim-mtorl-s3 s3://mtorl/runs/sim-mtorl-s4 --out s3://mtorl/runs/sim-mtorl-ens5 \
    --decision channel_cost_weight=0.6
mtorl evaluate ray_jobs/specs/sim-evaluate.yaml --set spec.checkpoint=s3://mtorl/runs/sim-mtorl-ens5 --result online-sim.json
python -m mtorl.sim.benchmark --checkpoint s3://mtorl/runs/sim-mtorl-ens5 --out docs/results/sim-closed-loop-40k \
    --budgets 0.1 0.3 0.5 --seeds 1 2 3 --users 2000 --imitation-at --channel-cost-weight 1
