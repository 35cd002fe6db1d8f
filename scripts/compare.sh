#!/usr/bin/env bash
# The MTORL-versus-baselines comparison of the README, on the user-disjoint test split of a sample:
#   scripts/compare.sh kuairand ../shared/data/kuairand_sequence.csv.gz
#   scripts/compare.sh criteo   ../shared/data/criteo_sequence.csv.gz
# Needs the object store (`mtorl store up`, exported variables). Trains MTORL and every learned
# baseline with the same spec (ray_jobs/specs/<ds>-train.yaml, model.name overridden), then evaluates
# them side by side with the history heuristics. Hyperparameters were chosen on the val split only.
set -euo pipefail
ds=$1; input=$2; workers=${WORKERS:-0}
mtorl prepare ray_jobs/specs/$ds-prepare.yaml --set spec.input=$input
ckpts=()
for m in mtorl bc_mlp bc_seq cql iql bcq dt; do
  name=$ds-${m//_/-}
  mtorl train ray_jobs/specs/$ds-train.yaml --set metadata.name=$name --set spec.model.name=$m \
    --set spec.trainer.workers=$workers --set spec.tracking.wandb=disabled
  ckpts+=("s3://mtorl/runs/$name")
done
mtorl evaluate --checkpoint "${ckpts[0]}" --compare "${ckpts[@]:1}" --output s3://mtorl/reports/$ds-compare \
  --result docs/results/$ds-compare.json
