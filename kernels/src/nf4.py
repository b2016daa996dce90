"""Dequantize a 4-bit (NF4 / FP4) blockwise-quantized weight and apply the RoRA weight
mask in one pass: ``OUT = (M ⊙ W) / (1 - p_eff)``, ``W`` the dequantized weight.

Input layout (the one bitsandbytes' ``Linear4bit`` uses; this module knows nothing of
bitsandbytes objects, only of tensors):

* ``packed``: uint8, two 4-bit codes per byte for the row-major ``(out, in)`` weight,
  element ``i`` (flat index ``n·in + k``) in byte ``i // 2``, the high nibble for even
  ``i`` and the low nibble for odd ``i``;
* ``code``: the 16 float32 values a code stands for (NF4 or FP4 table);
* ``absmax``: one scale per ``blocksize`` consecutive elements, float32, or, with double
  quantization, uint8 codes into ``nested_code`` (256 float32) scaled by
  ``nested_absmax[j // nested_blocksize]`` (float32), plus ``offset``;
* ``W[i] = code[nibble(i)] · absmax[i // blocksize]``.

The value is rounded to the output dtype first, then multiplied by the mask scale in
float32 and rounded once more: bit for bit what bitsandbytes' ``dequantize_4bit`` to that
dtype followed by :func:`rora_fast.reference.masked_weight` gives (the tests check it in
the Triton interpreter against both). The keep-mask is :func:`rora_fast.kernels.mask`'s
``_keep_nk``, the same bits as every other kernel and the torch reference. A bf16
masked weight is written after reading half a byte (plus 1/64 B of absmax) per element:
a quarter of the bytes the masked weight of a bf16 weight reads.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .mask import _keep_nk, check_counter_range, mask_params

__all__ = ["dequantize_4bit_masked"]

# 4 x 128 with 4 warps: 4 elements per thread. 31-42 registers per thread on sm_80..120
# with Triton 3.6 and 3.9, none spilled; 8 x 128 used up to 64 (3.9) / 72 and a 4-byte spill
# (3.6, sm_120, nested + mask), 32 x 128 up to 255 (benchmarks/gpu/compile_matrix.py). The
# price: with the mask, a [4, 16] block of 8-column Philox groups over 128 threads may have
# two threads compute each group (up to twice the Philox arithmetic of mask.py's 8 x 128);
# its cost on a GPU is not measured.
_BLOCK_N = 4
_BLOCK_K = 128


@triton.jit(do_not_specialize=["N", "K", "seed", "thr", "n_groups", "blocksize",
                               "nested_blocksize"])
def _dequant_mask_kernel(PACKED, CODE, ABSMAX, NCODE, NABSMAX, OFFSET, OUT,
                         N, K, stride_on, stride_ok, blocksize, nested_blocksize,
                         seed, thr, n_groups, scale,
                         NESTED: tl.constexpr, APPLY_MASK: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    inb = (rn[:, None] < N) & (rk[None, :] < K)
    flat = rn[:, None].to(tl.int64) * K + rk[None, :]
    byte = tl.load(PACKED + flat // 2, mask=inb, other=0).to(tl.int32)
    nib = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    val = tl.load(CODE + nib, mask=inb, other=0.0)
    blk = flat // blocksize
    if NESTED:
        a8 = tl.load(ABSMAX + blk, mask=inb, other=0).to(tl.int32)
        am = tl.load(NCODE + a8, mask=inb, other=0.0) \
            * tl.load(NABSMAX + blk // nested_blocksize, mask=inb, other=0.0) \
            + tl.load(OFFSET)
    else:
        am = tl.load(ABSMAX + blk, mask=inb, other=0.0)
    w = (val * am).to(OUT.dtype.element_ty)
    if APPLY_MASK:
        keep = _keep_nk(seed, pid_n * BLOCK_N, pid_k * BLOCK_K, n_groups, thr,
                        BLOCK_N, BLOCK_K)
        w = tl.where(keep, w.to(tl.float32) * scale, 0.0).to(OUT.dtype.element_ty)
    o_ptrs = OUT + rn[:, None].to(tl.int64) * stride_on + rk[None, :] * stride_ok
    tl.store(o_ptrs, w, mask=inb)


def dequantize_4bit_masked(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                           blocksize: int, shape, seed: int = 0, p: float = 0.0,
                           out_dtype: torch.dtype = torch.bfloat16, *,
                           nested_code: Optional[torch.Tensor] = None,
                           nested_absmax: Optional[torch.Tensor] = None,
                           nested_blocksize: int = 256,
                           offset: Optional[torch.Tensor] = None,
                           block_n: int = _BLOCK_N, block_k: int = _BLOCK_K) -> torch.Tensor:
    """The ``(out, in)`` weight in ``out_dtype``, dequantized and, when ``p > 0``, masked
    and scaled by ``1 / (1 - p_eff)`` with the RoRA keep-mask of ``seed``; one kernel.

    Double quantization: pass ``absmax`` as the uint8 codes with ``nested_code``,
    ``nested_absmax``, ``nested_blocksize`` and ``offset`` (all tensors on the device).
    """
    n, k = (int(s) for s in shape)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if packed.numel() * 2 < n * k:
        raise ValueError(f"packed holds {packed.numel() * 2} codes, shape {(n, k)} needs "
                         f"{n * k}")
    if code.numel() != 16:
        raise ValueError(f"code must hold the 16 values of the 4-bit codes, got {code.numel()}")
    nested = nested_code is not None
    if nested and (nested_absmax is None or offset is None):
        raise ValueError("double quantization needs nested_code, nested_absmax and offset")
    if blocksize < 1 or nested_blocksize < 1:
        raise ValueError("blocksize and nested_blocksize must be >= 1")
    if block_k % 8 or block_k & (block_k - 1) or block_n & (block_n - 1):
        raise ValueError("block_n and block_k must be powers of two, block_k >= 8")
    thr, scale = mask_params(p)
    groups = check_counter_range(n, k) if thr else 1
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    out = torch.empty(n, k, dtype=out_dtype, device=packed.device)
    if out.numel() == 0:
        return out
    f32 = torch.float32
    code = code.to(f32).contiguous()
    if nested:
        absmax = absmax.contiguous()
        ncode = nested_code.to(f32).contiguous()
        nabs = nested_absmax.to(f32).contiguous()
        off = offset.to(f32).reshape(1).contiguous()
    else:
        absmax = absmax.to(f32).contiguous()
        ncode = nabs = off = code  # unused
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_mask_kernel[grid](packed.contiguous().reshape(-1), code, absmax, ncode, nabs, off,
                               out, n, k, out.stride(0), out.stride(1), int(blocksize),
                               int(nested_blocksize), seed, int(thr), groups, float(scale),
                               NESTED=nested, APPLY_MASK=bool(thr),
                               BLOCK_N=block_n, BLOCK_K=block_k)
    return out
