#!/usr/bin/env bash
# README quickstart, command 1: install rora-fast and its backdoor harness (harness/) into a virtual
# environment (.venv, created if absent) and run the backdoor-removal demo on the embedded
# MiniLM model. Extra arguments go to `rora-fast demo`.
# torch is installed first, pinned: scripts/install_torch.sh takes the build that fits the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RORA_DEMO_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# --no-compile: no byte-compiling of every installed module up front (torch alone: about 20 s
# of the install here); Python compiles what it imports, when it imports it
export RORA_PIP_FLAGS="--no-compile"
. scripts/install_torch.sh   # the torch build that fits this machine (CPU index when no GPU)
python -m pip install -q --no-compile -e . -e ./harness
rora-fast demo "$@"
