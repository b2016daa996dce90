#!/usr/bin/env bash
# The paper's Figure 5 at small scale: RoRA on SST-2 <- IMDB, BadNet, against λ and against p,
# one training run per value, everything else at its default. A sensitivity study on the test
# split (as the paper reports it), not a selection: the defaults stay p = 0.1, λ = 10.
# The values are added one at a time, alternating λ and p, extremes first, and the sweep files
# are rewritten after each run, so a session that ends early still leaves usable curves.
# The default run is copied from the main SST-2 BadNet folder, not retrained. Resumable.
# Usage: COMMIT=1 THREADS=2 bash scripts/eval/sensitivity.sh
set -u
cd "$(dirname "$0")/../.."
OUT=benchmarks/results/eval/sweep-sst2_sentence-badnet
COMMON="--task sst2_sentence --attack badnet --methods rora --preset small --seed 0 --threads ${THREADS:-1}"
REUSE="--reuse benchmarks/results/eval/small-sst2_sentence-badnet"
lam=10 p=0.1
for step in "ortho_lambda 1" "weight_dropout 0.3" "ortho_lambda 20" "weight_dropout 0.05" \
            "ortho_lambda 5" "weight_dropout 0.2" "ortho_lambda 15" "weight_dropout 0.15"; do
  set -- $step
  if [ "$1" = ortho_lambda ]; then lam="$lam,$2"; vals=$lam; else p="$p,$2"; vals=$p; fi
  echo "== $1 $vals" >&2
  rora-fast sweep $COMMON --param "$1" --values "$vals" $REUSE --out "$OUT" > /dev/null || exit 1
  if [ "${COMMIT:-0}" = "1" ] && [ -n "$(git status --porcelain -- "$OUT")" ]; then
    for i in 1 2 3 4 5; do
      git add "$OUT" && git commit -q -m "eval results: sensitivity sst2 badnet, $1 = $vals (measured, small preset)" -- "$OUT" && break
      sleep 5
    done
  fi
done
