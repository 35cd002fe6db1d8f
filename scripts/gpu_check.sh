#!/usr/bin/env bash
# The GPU check (about 10 minutes on one GPU): 1-GPU Ray Train run that checkpoints to object storage,
# loses its worker mid-run and recovers, is re-run and resumes, is evaluated on the CPU; then the GPU
# train bench (bench/results-cuda.json and the cuda table of BENCHMARKS.md).
#   scripts/gpu_check.sh ../shared/data/kuairand_sequence.csv.gz
# Needs a CUDA build of torch and `make install`; starts (and stops) its own object store and Ray.
set -euo pipefail
input=${1:?usage: scripts/gpu_check.sh KUAIRAND_CSV}
py=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
export MTORL_STORE_DIR=$work/store RAY_AUTH_MODE=disabled WANDB_MODE=disabled RAY_DATA_DISABLE_PROGRESS_BARS=1
mtorl() { "$py" -m mtorl "$@"; }
cleanup() { mtorl store down || true; }
trap cleanup EXIT

"$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mtorl store up
mtorl prepare ray_jobs/specs/kuairand-prepare.yaml --set spec.input="$input"

gpu=(--set spec.trainer.workers=1 --set spec.trainer.use_gpu=true --set spec.trainer.gpus_per_worker=1
     --set spec.trainer.batch_size=512 --set spec.tracking.wandb=disabled --set metadata.name=kuairand-gpu)
# 1. two epochs; the worker is killed once at step 3 of epoch 2 and Ray Train restarts it from the
#    epoch-1 checkpoint (model, then optimizer, then its state on the GPU).
steps=$("$py" - <<'EOF'
from mtorl.data.manifest import load_manifest
m = load_manifest("s3://mtorl/datasets/kuairand")
print(max(1, m["splits"]["train"]["steps"] // 50 // 512))   # window length 50 -> windows per epoch / batch
EOF
)
MTORL_TEST_CRASH_AT_STEP=$((steps + 3)) MTORL_TEST_CRASH_MARKER=$work/crashed \
  mtorl train ray_jobs/specs/kuairand-train.yaml "${gpu[@]}" --set spec.trainer.epochs=2 --result "$work/train1.json"
test -f "$work/crashed" && echo "gpu check: the worker was killed once and the run recovered"
# 2. the same run with more epochs resumes from its latest checkpoint
mtorl train ray_jobs/specs/kuairand-train.yaml "${gpu[@]}" --set spec.trainer.epochs=3 --result "$work/train2.json"
# 3. the GPU-trained checkpoint evaluated with no GPU visible
CUDA_VISIBLE_DEVICES= mtorl evaluate ray_jobs/specs/kuairand-evaluate.yaml \
  --set spec.checkpoint=s3://mtorl/runs/kuairand-gpu --set spec.output=s3://mtorl/reports/kuairand-gpu \
  --result "$work/eval.json"
# 4. the GPU bench: 1 GPU worker vs the plain loop on the same GPU
"$py" -m mtorl.bench --device cuda --quick --stages train --out bench --no-markdown
echo "gpu check: done ($work)"
