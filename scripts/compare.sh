#!/usr/bin/env bash
# The fair comparison of the README, on a sample's user-disjoint split:
#   scripts/compare.sh kuairand ../shared/data/kuairand_sequence.csv.gz          # test split (the tables)
#   SPLIT=val scripts/compare.sh kuairand ../shared/data/kuairand_sequence.csv.gz  # val split (to choose on)
#   scripts/compare.sh criteo   ../shared/data/criteo_sequence.csv.gz
# Needs the object store (`mtorl store up`, exported variables) and `mtorl` on PATH.
#
# Every row trains with the SAME spec (ray_jobs/specs/<ds>-train.yaml: same inputs, history statistics
# included, same epochs / lr / batch / size, checkpoint chosen on the same val metric); only model.name
# differs, and for the ablation rows the one field they ablate. One evaluation then scores every row and
# the history heuristics through the same decision layer. Writes docs/results/<ds>-compare[-val].{md,json}
# (rows + ablations, with the inputs each row had). Runs already trained are reused (delete them, or set
# RETRAIN=1, to train again; ONLY=label,... trains just those rows, to train rows in parallel; SKIP=label,...
# leaves rows out of the run and its tables); EPOCHS overrides the epochs of every row alike. The one row with another
# budget, logreg-lr0.03, is the linear model at the learning rate it needs to converge in that budget
# (chosen on val); it is labelled so in the tables.
set -euo pipefail
ds=$1; input=$2
workers=${WORKERS:-0}; split=${SPLIT:-test}; suffix=$([ "$split" = test ] && echo "" || echo "-$split")
common=(--set spec.trainer.workers=$workers --set spec.tracking.wandb=disabled)
[ -n "${EPOCHS:-}" ] && common+=(--set spec.trainer.epochs=$EPOCHS)
work=${WORK_DIR:-${TMPDIR:-/tmp}/mtorl-compare}; mkdir -p "$work"

# label | --set overrides (besides metadata.name)
rows=(
  "mtorl|"
  "logreg|spec.model.name=logreg"
  "logreg-lr0.03|spec.model.name=logreg spec.trainer.lr=0.03"
  "bc_mlp|spec.model.name=bc_mlp"
  "bc_seq|spec.model.name=bc_seq"
  "cql|spec.model.name=cql"
  "iql|spec.model.name=iql"
  "bcq|spec.model.name=bcq"
  "dt|spec.model.name=dt"
)
ablations=(
  "mtorl-no-stats|spec.model.history_stats=false"
  "mtorl-no-attention|spec.model.attention.layers=0"
  "mtorl-no-pref|spec.objective.pref_weight=0"
  "mtorl-mu0|spec.objective.reward_weight=0"
)
[ "${ABLATIONS:-1}" = 0 ] && ablations=()

# TRAINER=inprocess trains without Ray (scripts/train_inprocess.py: the same step, metrics and checkpoint
# layout as `mtorl train` with trainer.workers 0) for a machine too loaded for a local Ray cluster to start.
# A local Ray cluster can time out while starting on a loaded machine: try again (a re-run resumes).
train() {
  if [ "${TRAINER:-mtorl}" = inprocess ]; then python "$(dirname "$0")/train_inprocess.py" "$@"; return; fi
  for attempt in 1 2 3; do mtorl train "$@" && return 0; echo "train failed (attempt $attempt), retrying" >&2; sleep 5; done; return 1
}

[ "${PREPARE:-1}" = 0 ] || mtorl prepare ray_jobs/specs/$ds-prepare.yaml --set spec.input=$input   # PREPARE=0: reuse the prepared sample
args=(); uris=()
for entry in "${rows[@]}" "${ablations[@]}"; do
  label=${entry%%|*}; sets=${entry#*|}; name=$ds-${label//[_.]/-}
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$label,"* ]]; then continue; fi
  if [ -n "${SKIP:-}" ] && [[ ",$SKIP," == *",$label,"* ]]; then continue; fi
  over=(); for s in $sets; do over+=(--set "$s"); done
  if [ "${RETRAIN:-0}" = 1 ] || [ ! -s "$work/$name.train.json" ]; then
    train ray_jobs/specs/$ds-train.yaml --set metadata.name=$name "${common[@]}" "${over[@]}" --result "$work/$name.train.json"
  fi
  uris+=("s3://mtorl/runs/$name")
  case " ${ablations[*]} " in *" $entry "*) args+=(--ablation "$label=s3://mtorl/runs/$name");; *) args+=(--row "$label=s3://mtorl/runs/$name");; esac
done
[ -n "${ONLY:-}" ] && exit 0   # ONLY=label,label: train just those rows (run several shells in parallel), no evaluation
report=s3://mtorl/reports/$ds-compare$suffix
mtorl evaluate --checkpoint "${uris[0]}" --compare "${uris[@]:1}" --split "$split" --output "$report" \
  --result "$work/$ds-compare$suffix.evaluate.json"
python "$(dirname "$0")/compare_tables.py" --dataset "$ds" --split "$split" --report "$report" "${args[@]}" \
  --command "${SPLIT:+SPLIT=$SPLIT }${EPOCHS:+EPOCHS=$EPOCHS }${TRAINER:+TRAINER=$TRAINER }scripts/compare.sh $ds $input" --out docs/results/$ds-compare$suffix
