#!/usr/bin/env bash
# Correctness runner: tests/test_kernels.py on this machine (compiled kernels on CUDA in
# fp32/fp16/bf16; the Triton interpreter on a CPU), then tests/test_compile.py
# (torch.compile of RoRA layers; on CUDA also the device seed and CUDA graph capture
# under mode="reduce-overhead"). Usage:
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
timeout -k 10 "$LIMIT" "$PY" -m pytest tests/test_kernels.py tests/test_compile.py -q -rfEs -p no:cacheprovider \
    --durations=10 "${extra[@]}" >"$LOG" 2>&1
rc=$?
tail -n 40 "$LOG"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "run_kernel_tests: stopped after ${LIMIT}s (time limit); full log in $LOG"
else
    echo "run_kernel_tests: pytest exit status $rc; full log in $LOG"
fi
exit "$rc"
