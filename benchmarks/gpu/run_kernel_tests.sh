#!/usr/bin/env bash
# Correctness runner: tests/test_kernels.py on this machine (compiled kernels on CUDA in
# fp32/fp16/bf16; the Triton interpreter on a CPU), then the CUDA tests of
# tests/test_compile.py (the seed drawn on the device, CUDA graph capture under
# mode="reduce-overhead"). Usage:
#   benchmarks/gpu/run_kernel_tests.sh [LOG_FILE] [TIME_LIMIT_S]
# Writes the full pytest output to LOG_FILE (default: a temporary file), prints the last
# lines, exits with pytest's status (124 if the time limit was hit).
set -u
cd "$(dirname "$0")/../.." || exit 2
PY=${PYTHON:-python3}
LOG=${1:-$(mktemp /tmp/rora_kernel_tests.XXXXXX.log)}
LIMIT=${2:-240}
extra=()
# one hung test must not eat the whole budget (pytest-timeout, when installed)
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
    extra+=(--timeout=180)
fi
START=$SECONDS
timeout -k 10 "$LIMIT" "$PY" -m pytest tests/test_kernels.py -q -rfEs -p no:cacheprovider \
    --durations=10 "${extra[@]}" >"$LOG" 2>&1
rc=$?
# the CUDA-only compile tests (the CPU ones run in CI; Inductor on the CPU would need a
# C++ compiler the GPU image may lack)
if [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ]; then
    REST=$(( LIMIT - (SECONDS - START) ))
    [ "$REST" -lt 30 ] && REST=30
    timeout -k 10 "$REST" "$PY" -m pytest tests/test_compile.py -k cuda -q -rfEs \
        -p no:cacheprovider "${extra[@]}" >>"$LOG" 2>&1
    rc2=$?
    [ "$rc2" -eq 5 ] && rc2=0  # none collected (no CUDA: they are skipped, not deselected)
    [ "$rc" -eq 0 ] && rc=$rc2
fi
tail -n 40 "$LOG"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "run_kernel_tests: stopped after ${LIMIT}s (time limit); full log in $LOG"
else
    echo "run_kernel_tests: pytest exit status $rc; full log in $LOG"
fi
exit "$rc"
