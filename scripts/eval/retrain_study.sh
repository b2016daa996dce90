#!/usr/bin/env bash
# Issue 24, the choices that need retraining: RoRA at the small preset with one change each,
# on SST-2 <- IMDB BadNet and CR <- MR BadNet, one `rora-fast seeds` folder per (variant,
# cell) under benchmarks/results/eval/retrain-study/. The LoRA reference and the default
# RoRA rows are the committed seeds folders (same seeds, same poisoned models).
#
# Variants (label in the study's README):
#   lam-mean  λ = 10 averaged over the 37 adapted layers instead of summed (= λ 10/37 summed)
#   lam1      λ = 1, the smallest value of the paper's grid (summed)
#   ep12      12 epochs on the same 2,000 rows (the paper trains 20 epochs on full splits)
#   ep12g     ep12 with length-grouped batches (--group-by-length: another draw of the same
#             schedule, about 2x faster on the CPU); un-repaired, so that METHOD
#             lora,rora,rora+repair gives the post-hoc repair row from the saved adapters
# Screen first (seeds 0 and 1), interleaved so that each variant gets a first seed early.
# A queue item is VARIANT:TASK:SEED[:METHOD] (METHOD default rora); issue 29's like-for-like
# reference is LoRA on the same 12-epoch schedule, in the same folder as the RoRA runs (so
# the folder's seeds.md pairs them by seed):
#   QUEUE="ep12:sst2_sentence:0:lora ep12:cr:0:lora ... ep12:cr:4:rora"
#
# Runs the code of a fixed commit from a separate worktree (RUN_TREE) and copies each
# finished folder into RESULT_TREE, committing only that folder. Resumable: finished runs are
# skipped (the harness's own check). Usage:
#   git worktree add /work/run24 HEAD && cp rora_fast/*.so /work/run24/rora_fast/
#   RUN_TREE=/work/run24 RESULT_TREE=/work/main COMMIT=1 THREADS=2 \
#     nohup bash scripts/eval/retrain_study.sh > /tmp/retrain.log 2>&1 &
set -u
HERE="$(cd "$(dirname "$0")/../.." && pwd)"
QUEUE=${QUEUE:-"lam-mean:sst2_sentence:0 ep12:sst2_sentence:0 lam-mean:sst2_sentence:1 lam-mean:cr:0 lam1:sst2_sentence:1 lam-mean:cr:1 ep12:sst2_sentence:1 lam1:cr:0 lam1:cr:1 ep12:cr:0 ep12:cr:1"}
. "$HERE/scripts/eval/run_env.sh"

variant_args() {
  case $1 in
    lam-mean) echo "--ortho-lambda 0.2702702702702703";;   # 10 / 37
    lam1) echo "--ortho-lambda 1";;
    ep12) echo "--epochs 12";;
    ep12g) echo "--epochs 12 --group-by-length --no-repair";;
    *) echo "unknown variant $1" >&2; return 1;;
  esac
}

for item in $QUEUE; do
  IFS=: read -r variant task seed method <<< "$item"
  method=${method:-rora}
  dir=$REL/retrain-study/$variant-$task
  reuse=""
  [ "$variant:$task" = "lam1:sst2_sentence" ] && reuse="--reuse $REL/sweep-sst2_sentence-badnet"
  args=$(variant_args "$variant") || exit 2
  echo "== $(date -u +%H:%M:%S) $variant $task seed $seed $method ($args)" >&2
  if nice -n 19 python -m rora_fast.cli seeds --task "$task" --attack badnet --methods "$method" \
      --seeds "$seed" --preset small --threads "$THREADS" $args $reuse --out "$dir"; then
    commit "$dir" "eval results: retrain study, $variant $task badnet seed $seed $method (small preset)"
  else
    echo "!! $variant $task seed $seed $method failed (exit $?)" >&2
  fi
done
echo "== $(date -u +%H:%M:%S) queue done" >&2
