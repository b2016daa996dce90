#!/usr/bin/env bash
# Issue 24: the rescaling depths (top 0-3 blocks) of every retrained variant of
# retrain_study.sh, post hoc from its saved adapters (scripts/eval/posthoc_study.py
# --rora-dir), with the committed LoRA run of the same seed as the reference; one folder
# per variant, benchmarks/results/eval/retrain-study/posthoc-<variant>/. Resumable (finished
# results are skipped); run it again as more retrained seeds land.
# Usage: COMMIT=1 bash scripts/eval/retrain_posthoc.sh
set -u
cd "$(dirname "$0")/../.."
REL=benchmarks/results/eval/retrain-study
VARIANTS=${VARIANTS:-"lam-mean lam1 ep12"}
SEEDS=${SEEDS:-0-4}
commit=""; [ "${COMMIT:-0}" = "1" ] && commit="--commit"
for v in $VARIANTS; do
  cells=""; dirs=""
  for c in sst2_sentence cr; do
    if [ -d "$REL/$v-$c/runs" ]; then
      cells="$cells${cells:+,}$c"; dirs="$dirs --rora-dir $c=$REL/$v-$c"
    fi
  done
  [ -z "$cells" ] && continue
  echo "== $(date -u +%H:%M:%S) $v: $cells" >&2
  python scripts/eval/posthoc_study.py --cells "$cells" --seeds "$SEEDS" \
    --variants "${PH_VARIANTS:-lora,rora@top0,rora@top1,rora@top2,rora@top3,rora@top2+head,rora@top3+head}" $dirs \
    --out "$REL/posthoc-$v" --cache-dir "${RORA_FAST_POISON_CACHE:-$HOME/.cache/rora_fast/poisoned}" \
    --threads "${THREADS:-2}" $commit || echo "!! $v failed" >&2
done
