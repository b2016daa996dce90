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
# DEFAULT_MASK_STRATEGY is "copy" because it is the simplest to prove correct (its
# GEMMs are cuBLAS; its mask kernel is compared bit for bit with the reference), and
# because no GPU measurement exists yet (2026-11, issue 3: the task that wrote the
# kernels had no GPU).
#
# TODO(issue 3, GPU figures): when benchmarks/gpu/run.sh has run on a GPU, record here
# the median forward+backward times (ms) and peak memory of both strategies at the
# LLaMA-7B shapes (benchmarks/results/<date>-<device>.json), and set the default to
# the winner. Remove the loser only if it never wins.
#   device: -      4096x4096: copy -    inloop -      4096x11008: copy -  inloop -
#                  11008x4096: copy -   inloop -      (ms, fwd+bwd, 8192 tokens, r=16, bf16)
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
