#!/usr/bin/env bash
# Small-scale reproduction on the embedded MiniLM-L6 (CPU), in priority order.
# Resumable: runs whose JSON exists are skipped by rora-fast itself. With COMMIT=1 each
# finished run is committed (results only) as it comes.
# Usage: bash scripts/eval/reproduce.sh            (THREADS=1 by default)
set -u
cd "$(dirname "$0")/../.."
OUT=benchmarks/results/eval
THREADS=${THREADS:-1}
COMMON="--preset small --seed 0 --threads $THREADS"

commit() {
  if [ "${COMMIT:-0}" = "1" ] && [ -n "$(git status --porcelain -- "$OUT")" ]; then
    rora-fast report "$OUT" > /dev/null  # the cross-setting overview.md / overview.png
    for i in 1 2 3 4 5; do
      git add "$OUT" && git commit -q -m "eval results: $1 (measured, small preset)" -- "$OUT" && break
      sleep 5
    done
  fi
}

run() {  # task attack method
  local task=$1 attack=$2 method=$3 dir="$OUT/small-$1-$2"
  echo "== $task $attack $method" >&2
  rora-fast defend --task "$task" --attack "$attack" --methods "$method" $COMMON --out "$dir" \
    && commit "$task $attack $method"
}

# 1. SST-2 <- IMDB, BadNet: baselines, RoRA, LoRA+rescaling, ablation (CI / Tr / Pt)
for m in lora rora lora+rescale fft rora:ci+tr rora:ci rora:tr rora:ci+pt rora:tr+pt; do
  run sst2_sentence badnet "$m"
done
# figures 1-3 on the same setting (LoRA through rora_fast with p=0, λ=0, vs RoRA)
[ -f "$OUT/spectra-sst2_sentence-badnet/spectra.json" ] || {
  rora-fast spectra --task sst2_sentence --attack badnet --methods rora:none,rora $COMMON \
    --out "$OUT/spectra-sst2_sentence-badnet" && commit "spectra sst2 badnet"; }
# how deep to rescale, on the dev split (reuses the trained adapters; evaluation only)
[ -f "$OUT/rescale-sst2_sentence-badnet/rescale_layers_dev.json" ] || {
  rora-fast rescale-sweep --task sst2_sentence --attack badnet \
    --methods rora,rora:ci,rora:tr,rora:none $COMMON --out "$OUT/rescale-sst2_sentence-badnet" \
    && commit "rescale depth sweep sst2 badnet (dev)"; }
# 2. every other task/attack with LoRA and RoRA first (breadth before depth: a session
#    that ends early still leaves each setting covered), then FFT on each
for ta in "cr badnet" "sst2_sentence insent" "cola badnet" "cr insent" "cola insent"; do
  for m in lora rora; do run $ta "$m"; done
done
# 3. variants with and without RoRA on SST-2
for m in pissa rora-pissa dora rora-dora olora rora-olora; do run sst2_sentence badnet "$m"; done
# 4. FFT where the model learns the task (CoLA: see README), then the variants on CR
for ta in "cr badnet" "sst2_sentence insent"; do run $ta fft; done
# 5. variants with and without RoRA on CR
for m in pissa rora-pissa dora rora-dora olora rora-olora; do run cr badnet "$m"; done
for ta in "cola badnet" "cr insent" "cola insent"; do run $ta fft; done
run cr badnet lora+rescale
# 6. the paper's default targets (query, value) for comparison
for m in lora rora; do
  rora-fast defend --task sst2_sentence --attack badnet --methods "$m" $COMMON \
    --target-modules peft-default --out "$OUT/small-sst2_sentence-badnet-qv" && commit "qv $m"
done
rora-fast report "$OUT" > /dev/null && commit "overview"
