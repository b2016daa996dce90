"""Shared helpers of the fused kernels: interpreter detection, mask-strategy choice,
launch configurations."""

from __future__ import annotations

import os

import torch
import triton

__all__ = [
    "MASK_STRATEGIES",
    "DEFAULT_MASK_STRATEGY",
    "interpreting",
    "resolve_mask_strategy",
    "input_precision",
    "block_r",
    "m_bucket",
]

# ---------------------------------------------------------------------------------
# Mask strategy: the decision and the figures that decide it
# ---------------------------------------------------------------------------------
# "copy":   one elementwise Triton kernel writes the transient (M ⊙ W)/(1-p) (W's dtype,
#           out x in) per call; cuBLAS does the GEMMs; the LoRA term is one addmm.
#           Cost above the plain GEMMs: ~2 extra reads + 1 write of W per forward and
#           per backward, plus one transient W-sized buffer at a time.
# "inloop": the mask is regenerated from Philox inside the K-loop of Triton GEMMs
#           (forward x·Wᵀ and backward dY·W), bias and LoRA term in the epilogue; no
#           W-sized buffer, but Philox runs once per M-tile (tokens / BLOCK_M times).
#
# Measured (benchmarks/results/2026-11-28-nvidia-h200.md, bf16, 8192 tokens, r=16,
# forward+backward, median of 20; bit-identical to the reference for "copy"):
#   device: NVIDIA H200 (torch 2.11, triton 3.6)
#   4096x4096:  copy 1.647 ms, inloop 5.490 ms   (base GEMMs 0.784, PEFT LoRA 2.134)
#   4096x11008: copy 2.752 ms, inloop 13.421 ms  (base 1.855, PEFT 4.406)
#   11008x4096: copy 2.857 ms, inloop 13.338 ms  (base 1.853, PEFT 4.285)
# "copy" wins by 3.3-4.9x (it is 0.62-0.77x PEFT LoRA; peak memory below PEFT's), so it
# stays the default. "inloop" uses less memory (66-176 MiB vs 96-258 MiB) but its Triton
# GEMMs re-run Philox per M-tile and lose to cuBLAS; it is kept for memory-bound users
# (RORA_FAST_MASK_STRATEGY=inloop) and because the tests hold both to the reference.
# Neither meets "<= 1.10x the base GEMMs" (copy is 1.48-2.10x): the transient masked
# copy costs ~2 extra passes over W per forward and per backward.
MASK_STRATEGIES = ("copy", "inloop")
DEFAULT_MASK_STRATEGY = "copy"
_STRATEGY_ENV = "RORA_FAST_MASK_STRATEGY"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_mask_strategy(strategy=None) -> str:
    """The strategy in force: the argument, else ``RORA_FAST_MASK_STRATEGY``, else the default."""
    name = strategy if strategy is not None else os.environ.get(_STRATEGY_ENV, "")
    name = (name or DEFAULT_MASK_STRATEGY).strip().lower()
    if name not in MASK_STRATEGIES:
        raise ValueError(f"unknown mask strategy {name!r} (from "
                         f"{'argument' if strategy is not None else _STRATEGY_ENV}); "
                         f"expected one of {MASK_STRATEGIES}")
    return name


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision. fp32 inputs: full fp32 ("ieee", what torch does by default),
    TF32 only when torch itself allows it (``torch.backends.cuda.matmul.allow_tf32``).
    fp16/bf16 inputs: Triton's default ("tf32", which only affects fp32 operands)."""
    if dtype != torch.float32:
        return "tf32"
    if not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def block_r(r: int) -> int:
    """Chunk of the LoRA rank handled per ``tl.dot`` in the epilogues (>= 16 for tl.dot)."""
    return 16 if r <= 16 else (32 if r <= 32 else 64)


def m_bucket(m: int) -> int:
    """Token count rounded up to a power of two: the autotune key, so that a new
    sequence length does not trigger a new tuning run."""
    return triton.next_power_of_2(max(int(m), 1))
