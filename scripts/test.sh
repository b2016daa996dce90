#!/usr/bin/env bash
# Installs rora-fast with its test tools and runs the test suite (README quickstart, command 2).
# torch is installed first, pinned, so that pip takes the CPU wheel instead of a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
python -m pytest tests -q
