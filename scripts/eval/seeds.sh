#!/usr/bin/env bash
# Seeds with confidence intervals (issue 14): SST-2 <- IMDB BadNet and CR <- MR BadNet,
# preset small, LoRA, LoRA + rescaling (post-hoc, from the LoRA adapter) and RoRA, seeds 0-4.
#
# Runs the code of a fixed commit from a separate worktree (RUN_TREE, default: this
# checkout), so a background run never imports a half-edited library, and copies each
# finished result folder into the checkout it commits from (RESULT_TREE, default: this
# checkout), committing only that folder. Resumable: finished runs are skipped.
# Interleaved so that complete seeds come early: SST-2 seed 2, CR seed 1, SST-2 seed 3, ...
# Seeds 0 and 1 on SST-2 and seed 0 on CR are copied from the single-seed folders (same
# run id = same spec); they have no saved adapter, so no post-hoc rows.
#
# Usage:
#   git worktree add /work/seedrun HEAD
#   RUN_TREE=/work/seedrun RESULT_TREE=/work/main COMMIT=1 THREADS=2 \
#     nohup nice -n 19 bash scripts/eval/seeds.sh > /tmp/seeds.log 2>&1 &
# Aggregate only (e.g. after a stop):  for t in sst2_sentence cr; do
#   rora-fast seeds --task $t --preset small --aggregate-only \
#     --out benchmarks/results/eval/seeds-$t-badnet; done
set -u
HERE="$(cd "$(dirname "$0")/../.." && pwd)"
QUEUE=${QUEUE:-"sst2_sentence:0 sst2_sentence:1 cr:0 sst2_sentence:2 cr:1 sst2_sentence:3 cr:2 sst2_sentence:4 cr:3 cr:4"}
. "$HERE/scripts/eval/run_env.sh"

for item in $QUEUE; do
  task=${item%%:*}; seed=${item##*:}
  dir=$REL/seeds-$task-badnet
  case $task in
    sst2_sentence) reuse="--reuse $REL/small-sst2_sentence-badnet --reuse $REL/small-sst2_sentence-badnet-seed1";;
    cr) reuse="--reuse $REL/small-cr-badnet";;
    *) reuse="";;
  esac
  for methods in lora,lora+rescale rora; do
    echo "== $(date -u +%H:%M:%S) $task seed $seed $methods" >&2
    if nice -n 19 python -m rora_fast.cli seeds --task "$task" --attack badnet \
        --methods "$methods" --seeds "$seed" --preset small --threads "$THREADS" $reuse \
        --out "$dir"; then
      commit "$dir" "eval results: seeds $task badnet seed $seed $methods (small preset)"
    else
      echo "!! $task seed $seed $methods failed (exit $?)" >&2
    fi
  done
done
echo "== $(date -u +%H:%M:%S) queue done" >&2
