#!/usr/bin/env bash
# README quickstart, command 2 (and CI: .ci/run): install rora-fast and its harness (harness/) with the test tools into
# a virtual environment this script creates afresh, then run the test suite in it.
#
#   bash scripts/test.sh            the newest releases setup.py allows     (venv: .venv)
#   bash scripts/test.sh --lowest   every requirement at its floor in setup.py (.venv-lowest)
#
# A new venv each time: nothing installed by hand on the machine can hide a missing or
# broken dependency. torch is installed first, pinned (scripts/install_torch.sh: the CPU
# build where there is no GPU, instead of a multi-GB CUDA build). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=newest
if [ "${1:-}" = "--lowest" ]; then MODE=lowest; shift; fi
VENV=${RORA_TEST_VENV:-.venv}
[ "$MODE" = lowest ] && VENV=${RORA_TEST_VENV:-.venv-lowest}
PY=${PYTHON:-python3}

echo "== scripts/test.sh ($MODE): new venv $VENV"
"$PY" -m venv --clear "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
. scripts/install_torch.sh   # the torch build that fits this machine (CPU index when no GPU)
if [ "$MODE" = lowest ]; then
    python scripts/ci/lowest_constraints.py > "$VENV/constraints.txt"
    python -m pip install -q -c "$VENV/constraints.txt" -e '.[dev]' -e ./harness
else
    python -m pip install -q -e '.[dev]' -e ./harness
fi
python -m pip freeze --exclude-editable > "$VENV/tested-with.txt"
echo "== tested with: $(grep -iE '^(torch|transformers|peft|accelerate|bitsandbytes|kernels|triton|safetensors|numpy)==' "$VENV/tested-with.txt" | tr '\n' ' ')"
python -m pytest tests -q "$@"
