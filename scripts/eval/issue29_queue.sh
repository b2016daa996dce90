#!/usr/bin/env bash
# Issue 29's background work, in the order the foreground needs it:
#  1. the poisoned models of SST-2 <- IMDB BadNet and CR <- MR BadNet, seeds 0-4 (preset
#     small; the demo preset shares them), into the harness's poison cache: every post-hoc
#     study (adaptive rescale on the committed adapters) needs them, and poisoning is the
#     same deterministic procedure every committed run used (cache key unchanged);
#  2. the like-for-like LoRA reference on the 12-epoch schedule (retrain_study.sh, variant
#     ep12, method lora) and RoRA's missing CR seed 4, paired by seed in
#     retrain-study/ep12-<task>/.
# Runs the code of RUN_TREE (a fixed worktree), commits each finished folder (COMMIT=1).
# Resumable: cached models and finished runs are skipped. Usage:
#   git worktree add /work/run29 <commit> && cp rora_fast/*.so /work/run29/rora_fast/
#   RUN_TREE=/work/run29 RESULT_TREE=/work/main COMMIT=1 THREADS=2 \
#     nohup bash scripts/eval/issue29_queue.sh > /tmp/issue29.log 2>&1 &
set -u
HERE="$(cd "$(dirname "$0")/../.." && pwd)"
. "$HERE/scripts/eval/run_env.sh"
for seed in 0 1 2 3 4; do
  for task in sst2_sentence cr; do
    echo "== $(date -u +%H:%M:%S) poison $task seed $seed" >&2
    nice -n 19 python -m rora_fast.cli poison --task "$task" --attack badnet --preset small \
      --seed "$seed" --threads "$THREADS" | tail -n 3 >&2 || echo "!! poison $task $seed failed" >&2
  done
done
QUEUE=${LFL_QUEUE:-"ep12:sst2_sentence:0:lora ep12:cr:0:lora ep12:sst2_sentence:1:lora ep12:cr:1:lora ep12:cr:4:rora ep12:sst2_sentence:2:lora ep12:cr:2:lora ep12:sst2_sentence:3:lora ep12:cr:3:lora ep12:sst2_sentence:4:lora ep12:cr:4:lora"} \
  bash "$HERE/scripts/eval/retrain_study.sh"
