#!/usr/bin/env bash
# One-call GPU check of the fused RoRA kernels (issue 3). On a lent GPU machine:
#
#     bash benchmarks/gpu/run.sh            # the GPU check (needs CUDA; ~8 min at most)
#     bash benchmarks/gpu/run.sh --cpu-smoke  # the same steps on a CPU, tiny, to test this script
#
# Steps, each time-boxed so the whole run ends within RORA_GPU_BUDGET_S (default 470 s):
#   0. preflight: one clear line and exit 3 when there is no CUDA device;
#   1. install the checkout (pip -e, no deps, no network), else a PYTHONPATH fallback;
#   2. tests/test_kernels.py on CUDA (fp32, fp16, bf16; 2x-error rule), then the CUDA tests
#      of tests/test_compile.py (the device seed, CUDA graphs under reduce-overhead);
#   3. one-layer forward+backward benchmark at LLaMA-7B shapes (bf16, 8192 tokens, r=16):
#      base GEMMs, PEFT LoRA (dropout 0.1), RoRA reference, fused RoRA;
#      writes benchmarks/results/<date>-<device>.json and .md;
#   3d. the fine-tune check (issue 31): rora_fast.finetune fused vs reference, merged model;
#   4. HOOK: the model-level suite of issue 5 (`pytest benchmarks/ --benchmark-only`),
#      only if present and time is left;
#   5. copy the results to $OUT (if set) and print the layer table last.
# Exit status: 0 all good, 3 no CUDA, otherwise the first failing step's status.
set -u
START=$SECONDS
RUN_STAMP=$(mktemp /tmp/rora_run_stamp.XXXXXX)  # files newer than this were written by this run
cd "$(dirname "$0")/../.." || { echo "run.sh: cannot cd to the repository root"; exit 2; }
ROOT=$PWD
PY=${PYTHON:-python3}
BUDGET=${RORA_GPU_BUDGET_S:-470}
export PYTHONUNBUFFERED=1
SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then SMOKE=1; fi
say() { echo "[run.sh +$((SECONDS - START))s] $*"; }
left() { echo $((BUDGET - (SECONDS - START))); }
status=0
fail() { [ "$status" -eq 0 ] && status=$1; }

# ---- 0. preflight ----------------------------------------------------------------
if [ "$SMOKE" -eq 1 ]; then
    export TRITON_INTERPRET=1
    say "CPU smoke run: kernels in the Triton interpreter, tiny shapes, results to a temp folder"
else
    "$PY" "$ROOT/benchmarks/gpu/env_check.py" || exit 3
fi

# ---- 1. install (no network there: --no-deps, no build isolation) -----------------
import_ok() { (cd /tmp && "$PY" - "$ROOT" <<'PYEOF'
import os, sys
import rora_fast.kernels as k
sys.exit(0 if os.path.realpath(k.__file__).startswith(os.path.realpath(sys.argv[1])) else 1)
PYEOF
) >/dev/null 2>&1; }
if import_ok; then
    say "rora_fast (this checkout) already importable"
elif "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >/tmp/rora_run_pip.log 2>&1 \
        && import_ok; then
    say "installed this checkout with pip -e"
else
    # kernels/src/ is installed as rora_fast.kernels (setup.py package_dir): rebuild that
    # layout with symlinks in a temporary site folder.
    SITE=$(mktemp -d /tmp/rora_site.XXXXXX)
    mkdir -p "$SITE/rora_fast"
    for entry in "$ROOT"/rora_fast/* "$ROOT"/rora_fast/.[!.]*; do
        [ -e "$entry" ] && ln -s "$entry" "$SITE/rora_fast/$(basename "$entry")"
    done
    ln -s "$ROOT/kernels/src" "$SITE/rora_fast/kernels"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if import_ok; then
        say "pip -e failed; using PYTHONPATH=$SITE (last lines of /tmp/rora_run_pip.log:)"
        tail -n 5 /tmp/rora_run_pip.log
    else
        echo "run.sh: cannot make rora_fast.kernels importable from $ROOT (pip log: /tmp/rora_run_pip.log)"
        exit 2
    fi
fi

# the harness (its datasets: the fine-tune check's rows) from the checkout, no install
export PYTHONPATH="$ROOT/harness${PYTHONPATH:+:$PYTHONPATH}"

if [ "$SMOKE" -eq 1 ]; then
    RESULTS=$(mktemp -d /tmp/rora_gpu_smoke.XXXXXX)
else
    RESULTS="$ROOT/benchmarks/results"
fi
mkdir -p "$RESULTS"
STAMP=$(date +%Y-%m-%d)
# file names carry the device (e.g. 2026-11-28-nvidia-h200-...) like the layer benchmark's
if [ "$SMOKE" -eq 1 ]; then DEV=cpu-smoke; else
    DEV=$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))" 2>/dev/null || echo cuda)
fi
STAMP="$STAMP-$DEV"
TESTLOG="$RESULTS/$STAMP-kernel-tests.log"

# ---- 2. correctness on this device -------------------------------------------------
T_TESTS=$(( $(left) * 45 / 100 ))
say "kernel tests (limit ${T_TESTS}s)"
bash "$ROOT/benchmarks/gpu/run_kernel_tests.sh" "$TESTLOG" "$T_TESTS" || fail $?

# ---- 3. layer benchmark --------------------------------------------------------------
T_BENCH=$(( $(left) - 60 ))
[ "$T_BENCH" -lt 60 ] && T_BENCH=60
MANIFEST=$(mktemp /tmp/rora_bench_manifest.XXXXXX)
say "layer benchmark (limit ${T_BENCH}s)"
bench_args=(--out-dir "$RESULTS")
[ "$SMOKE" -eq 1 ] && bench_args+=(--cpu-smoke)
RORA_BENCH_MANIFEST="$MANIFEST" timeout -k 10 "$T_BENCH" \
    "$PY" "$ROOT/benchmarks/gpu/layer_benchmark.py" "${bench_args[@]}"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then say "layer benchmark hit its ${T_BENCH}s limit"; fi
[ "$rc" -ne 0 ] && fail "$rc"

# ---- 3b. memory model (issue 6): predicted vs measured peak memory -----------------
if [ "$SMOKE" -eq 1 ]; then
    say "memory check (issue 6): skipped in --cpu-smoke"
elif [ "$(left)" -lt 150 ]; then
    say "memory check (issue 6): only $(left)s left, skipped"
else
    T_MEM=$(( $(left) / 3 ))
    [ "$T_MEM" -gt 120 ] && T_MEM=120
    say "memory check (issue 6) (limit ${T_MEM}s)"
    timeout -k 10 "$T_MEM" "$PY" "$ROOT/benchmarks/gpu/memory_check.py" --layers 8 --out "$RESULTS/$STAMP-memory-check" \
        >"$RESULTS/$STAMP-memory-check.log" 2>&1
    rc=$?
    tail -n 12 "$RESULTS/$STAMP-memory-check.log"
    [ "$rc" -ne 0 ] && fail "$rc"
fi

[ "$SMOKE" -eq 0 ] && [ "$(left)" -ge 130 ] && { say "qlora check (issue 13: RoRA-NF4 vs PEFT QLoRA, dequant+mask kernel, NF4 memory) (limit 110s)"; timeout -k 10 110 "$PY" "$ROOT/benchmarks/gpu/qlora_check.py" --out-dir "$RESULTS" >"$RESULTS/$STAMP-qlora-check.log" 2>&1 || { say "qlora check failed (log: $RESULTS/$STAMP-qlora-check.log)"; fail 1; }; }

# ---- 3c. host overhead (issue 11): launch-bound 24-layer BERT, RoRA vs PEFT LoRA ----
# aten ops and kernel launches per adapted layer, kernel time vs wall time, interleaved
# time ratios (benchmarks/host_overhead.py)
if [ "$SMOKE" -eq 0 ] && [ "$(left)" -ge 150 ]; then
    say "host overhead (issue 11) (limit 60s)"
    (cd "$ROOT" && timeout -k 5 60 "$PY" -m benchmarks.host_overhead --device cuda --blocks 6 --pairs 150 \
        --json "$RESULTS/$STAMP-host-overhead.json") >"$RESULTS/$STAMP-host-overhead.log" 2>&1 \
        || say "host overhead step failed or timed out (log: $RESULTS/$STAMP-host-overhead.log)"
fi

# ---- 3d. the user's door (issue 31): rora_fast.finetune on this device, fused vs reference
# backend, merged model vs adapter model (benchmarks/gpu/finetune_check.py)
if [ "$SMOKE" -eq 1 ] || [ "$(left)" -ge 200 ]; then
    fc_args=(--out "$RESULTS/$STAMP-finetune-check")
    [ "$SMOKE" -eq 1 ] && fc_args+=(--device cpu --rows 96)
    say "fine-tune check (issue 31) (limit 120s)"
    timeout -k 5 120 "$PY" "$ROOT/benchmarks/gpu/finetune_check.py" "${fc_args[@]}" \
        >"$RESULTS/$STAMP-finetune-check.log" 2>&1 \
        || say "fine-tune check failed or timed out (log: $RESULTS/$STAMP-finetune-check.log)"
fi

# ---- 4. HOOK (issue 5): model-level benchmark suite --------------------------------
# The suite lives in benchmarks/ (bench_*.py collected by benchmarks/pytest.ini) and is
# written separately; run it only if it is there, pytest-benchmark is installed and
# enough of the budget is left. Its absence or failure does not hide the layer results.
MODEL_JSON="$RESULTS/$STAMP-model-benchmarks.json"
if [ "$SMOKE" -eq 1 ]; then
    say "model-level suite (issue 5): skipped in --cpu-smoke"
elif ! ls "$ROOT"/benchmarks/bench_*.py >/dev/null 2>&1; then
    say "model-level suite (issue 5): not present, skipped"
elif ! "$PY" -c "import pytest_benchmark" >/dev/null 2>&1; then
    say "model-level suite (issue 5): pytest-benchmark not installed, skipped"
elif [ "$(left)" -lt 45 ]; then
    say "model-level suite (issue 5): only $(left)s left, skipped"
else
    T_MODEL=$(( $(left) - 15 ))
    say "model-level suite (issue 5) (limit ${T_MODEL}s)"
    (cd "$ROOT" && RORA_BENCH_REPS=${RORA_BENCH_REPS:-3} timeout -k 10 "$T_MODEL" "$PY" -m pytest \
        benchmarks/bench_model.py benchmarks/bench_memory.py --benchmark-only -q \
        --benchmark-json="$MODEL_JSON") >"$RESULTS/$STAMP-model-benchmarks.log" 2>&1
    rc=$?
    if [ -f "$MODEL_JSON" ]; then
        (cd "$ROOT" && "$PY" benchmarks/report.py "$MODEL_JSON" \
            --md "$RESULTS/$STAMP-model-benchmarks.md" --png "$RESULTS/$STAMP-model-benchmarks.png") \
            >>"$RESULTS/$STAMP-model-benchmarks.log" 2>&1 || say "report step failed"
    fi
    tail -n 15 "$RESULTS/$STAMP-model-benchmarks.log"
    say "model-level suite exit status $rc (log: $RESULTS/$STAMP-model-benchmarks.log)"
    [ "$rc" -ne 0 ] && fail "$rc"
fi

# ---- 4b. where the model-level overhead goes (torch.profiler, BERT-large) -----------
if [ "$SMOKE" -eq 0 ] && [ "$(left)" -ge 100 ]; then
    say "profile (BERT-large, fused path) (limit 90s)"
    (cd "$ROOT" && timeout -k 5 90 "$PY" -m benchmarks.profile_rora --model bert-large --reps 3 \
        --out "$RESULTS/$STAMP-profile-bert-large.md") >"$RESULTS/$STAMP-profile-bert-large.log" 2>&1 \
        || say "profile step failed or timed out (log: $RESULTS/$STAMP-profile-bert-large.log)"
fi

# ---- 5. results --------------------------------------------------------------------
TABLE=$(sed -n 2p "$MANIFEST" 2>/dev/null)
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    # one archive (the device tool returns at most 8 files): everything this run wrote
    (cd "$ROOT" && find "${RESULTS#$ROOT/}" -type f -newer "$RUN_STAMP" -print0 \
        | tar czf "$OUT/gpu-results.tgz" --null -T -)
    [ -n "$TABLE" ] && [ -f "$TABLE" ] && cp "$TABLE" "$OUT/"
    say "results archived to \$OUT/gpu-results.tgz (unpack in the repository root)"
fi
say "done in $((SECONDS - START))s; kernel tests: $(grep -E '^[0-9]+ [a-z]+.* in [0-9.]+s' "$TESTLOG" | head -n 1); compile tests: $(grep -E '^[0-9]+ [a-z]+.* in [0-9.]+s' "$TESTLOG" | sed -n 2p); exit status $status"
if [ -n "$TABLE" ] && [ -f "$TABLE" ]; then
    echo
    cat "$TABLE"
else
    echo "run.sh: the layer benchmark wrote no table"
fi
exit "$status"
