"""Shared helpers of the fused kernels: interpreter detection, and the record of the
mask-strategy decision."""

from __future__ import annotations

import os

__all__ = ["interpreting"]

# ---------------------------------------------------------------------------------
# Mask strategy: the decision and the figures that made it
# ---------------------------------------------------------------------------------
# The fused op makes the transient masked weight (M ⊙ W)/(1-p) with one elementwise
# Triton kernel per call (mask.masked_weight, W's dtype, out x in) and lets cuBLAS do the
# GEMMs; the LoRA term is one addmm. Cost above the plain GEMMs: ~2 extra reads + 1
# write of W per forward and per backward, plus one transient W-sized buffer at a time.
#
# A second strategy, "inloop" (the mask regenerated from Philox inside the K-loop of
# Triton GEMMs, bias and LoRA term in the epilogue: no W-sized buffer, but Philox once
# per M-tile), was measured against it and deleted (issue 11, item 3):
# benchmarks/results/2026-11-28-nvidia-h200.md, bf16, 8192 tokens, r=16,
# forward+backward, median of 20, NVIDIA H200 (torch 2.11, triton 3.6):
#   4096x4096:  copy 1.647 ms, inloop 5.490 ms   (base GEMMs 0.784, PEFT LoRA 2.134)
#   4096x11008: copy 2.752 ms, inloop 13.421 ms  (base 1.855, PEFT 4.406)
#   11008x4096: copy 2.857 ms, inloop 13.338 ms  (base 1.853, PEFT 4.285)
# The masked weight wins by 3.3-4.9x (0.62-0.77x PEFT LoRA, peak memory below PEFT's);
# the in-loop GEMMs saved 30-80 MiB of transient memory at these shapes but re-ran
# Philox per M-tile and lost to cuBLAS. Neither met "<= 1.10x the base GEMMs" (copy is
# 1.48-2.10x): the transient masked weight costs ~2 extra passes over W per forward and
# per backward.


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
