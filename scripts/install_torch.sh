#!/usr/bin/env bash
# Sourced by the quickstart scripts (demo.sh, test.sh) inside their venv: install the torch
# build that fits this machine, before anything that depends on torch.
#   - a CUDA device (nvidia-smi lists a GPU): PyPI's torch==2.13.0, a CUDA build (about
#     2.7 GB of nvidia-* packages beside torch);
#   - no CUDA device: PyTorch's own CPU wheel index first (torch 2.13.0+cpu, 0.75 GB
#     installed), and where that index cannot be reached (a machine that sees only package
#     registries) the plain pin, which a local wheel folder configured for pip
#     (find-links) satisfies with its CPU wheel.
# RORA_TORCH_INDEX overrides the CPU index URL ("" skips it). RORA_PIP_FLAGS: extra pip
# install flags (the demo passes --no-compile).
install_torch() {
  local pin="torch==2.13.0"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    echo "== torch: a CUDA device is present: $pin from PyPI (CUDA build)"
    python -m pip install -q ${RORA_PIP_FLAGS:-} "$pin"
    return
  fi
  local index=${RORA_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
  if [ -n "$index" ] && python -m pip install -q ${RORA_PIP_FLAGS:-} --timeout 15 --retries 1 \
      --index-url "$index" "$pin" 2>/dev/null; then
    # (a wheel folder pip is configured with, find-links, is searched too)
    echo "== torch: no CUDA device: $(python -c 'import torch; print(torch.__version__)') via" \
         "PyTorch's CPU index ($index) or a local wheel folder"
    return
  fi
  echo "== torch: no CUDA device and ${index:-no CPU index}: unreachable; $pin as pip resolves it here"
  python -m pip install -q ${RORA_PIP_FLAGS:-} "$pin"
  python - <<'PY'
import torch, sys
if torch.version.cuda:
    print(f"== note: torch {torch.__version__} is a CUDA build (no CPU wheel was reachable)",
          file=sys.stderr)
PY
}
install_torch
