"""The RoRA weight keep-mask drawn inside Triton kernels, and the masked weight of W.

The mask is defined in :mod:`rora_fast.reference` (read it first). Element ``(n, k)``
of the ``out x in`` weight uses Philox counter ``g = n * ceil(in / 8) + k // 8`` and
16-bit lane ``j = k % 8`` of ``tl.randint4x(seed, g)``; lane ``j`` is
``(c[j // 2] >> (16 * (j % 2))) & 0xFFFF`` and the element is kept when that lane is
``>= thr = round(p * 65536)``.

``_keep_nk`` draws that mask for one tile. A tile of ``BLOCK_K``
columns starting at a multiple of 8 covers whole counter groups (a group never
straddles two rows, because each row starts a new group), so each tile makes one
``randint4x`` call per 8 elements on a ``[rows, BLOCK_K // 8]`` counter block and
expands the 8 lanes along a trailing axis of 8, which ``tl.reshape`` (row-major, no
reordering) folds back into the column axis. The result depends only on the
element's ``(n, k)``: tile shapes, launch grids and which kernel (forward, dX,
masked weight) draws it do not change a single bit. Tests check this against
``reference.weight_keep_mask`` for several tile shapes and seeds up to ``2**63 - 1``.

``masked_weight(W, seed, p)`` is mask strategy ``"copy"``: one small elementwise
kernel writes ``(M ⊙ W) / (1 - p_eff)`` in W's dtype, a transient ``out x in``
buffer that cuBLAS then consumes. The same kernel, applied to ``Gᵀ X``, gives the
masked weight gradient when a caller trains W. ``effective_weight(W, seed, p, B, A, s)``
is the same pass with the LoRA product added, ``(M ⊙ W) / (1 - p_eff) + s·BA``, the one
weight of a layer whose LoRA input is ``x``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rora_fast import reference as ref

__all__ = ["masked_weight", "effective_weight", "keep_mask", "mask_params",
           "check_counter_range"]

# Tile of the elementwise mask kernels (rows x columns); columns must be a multiple of 8.
# The tile: 8 rows x 128 columns with Triton's default 4 warps is 8 elements per thread,
# one Philox call (8 16-bit draws) each. 32 x 128 used 140-166 registers per thread (255 and
# spills with LOWRANK on sm_80/86/89); 8 x 128 uses 32-55 on sm_80..120 (Triton 3.6 and 3.9),
# none spilled
# (benchmarks/gpu/compile_matrix.py, benchmarks/results/*-compile-matrix-*). Any power-of-two
# tile draws the same mask: it is keyed by element coordinates, not by tile.
_COPY_BLOCK_N = 8
_COPY_BLOCK_K = 128


# The mask's parameters and range checks live once, in the reference (which defines it).
mask_params = ref.mask_params
check_counter_range = ref.check_counter_range


@triton.jit
def _lanes(c0, c1, c2, c3):
    """Expand four ``[R, C]`` uint32 Philox words to their ``[R, C, 8]`` 16-bit lanes
    (lane j = ``(c[j // 2] >> (16 * (j % 2))) & 0xFFFF`` on the trailing axis)."""
    lane = tl.arange(0, 8)[None, None, :]
    word = tl.where(lane < 2, c0[:, :, None],
                    tl.where(lane < 4, c1[:, :, None],
                             tl.where(lane < 6, c2[:, :, None], c3[:, :, None])))
    return (word >> ((lane % 2) * 16)) & 0xFFFF


@triton.jit
def _keep_nk(seed, row0, col0, n_groups, thr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep bits of the weight tile rows ``row0 + [0, BLOCK_N)`` x cols ``col0 + [0, BLOCK_K)``
    as a ``[BLOCK_N, BLOCK_K]`` tensor. ``col0`` must be a multiple of 8 and
    ``BLOCK_K`` a multiple of 8. Rows/cols beyond the weight give garbage bits that the
    caller's masked loads ignore."""
    rows = row0 + tl.arange(0, BLOCK_N)
    grp = col0 // 8 + tl.arange(0, BLOCK_K // 8)
    ctr = rows[:, None] * n_groups + grp[None, :]  # int32 [BLOCK_N, BLOCK_K // 8]
    c0, c1, c2, c3 = tl.randint4x(seed, ctr)
    half = _lanes(c0, c1, c2, c3)  # [BLOCK_N, BLOCK_K // 8, 8]
    return tl.reshape(half, (BLOCK_N, BLOCK_K)) >= thr


@triton.jit(do_not_specialize=["N", "K", "seed", "thr", "n_groups", "R"])
def _mask_apply_kernel(W, OUT, N, K, stride_wn, stride_wk, stride_on, stride_ok,
                       seed, thr, n_groups, scale,
                       LB, LA, R, stride_bn, stride_br, stride_ar, stride_ak, lr_scale,
                       WRITE_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SEED_PTR: tl.constexpr = False,
                       LOWRANK: tl.constexpr = False):
    """``OUT = where(keep, W * scale, 0)`` (or ``OUT = keep`` as int8 when WRITE_MASK).
    ``SEED_PTR``: ``seed`` points to a one-element int64 tensor on the device (graph
    capture: no host read of the seed) instead of being the seed's value.
    ``LOWRANK``: ``OUT = where(keep, W * scale, 0) + lr_scale · LB LA`` (``LB`` N x R,
    ``LA`` R x K), the sum accumulated in float32 rank by rank and rounded once."""
    if SEED_PTR:
        seed = tl.load(seed)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    inb = (rn[:, None] < N) & (rk[None, :] < K)
    keep = _keep_nk(seed, pid_n * BLOCK_N, pid_k * BLOCK_K, n_groups, thr, BLOCK_N, BLOCK_K)
    o_ptrs = OUT + rn[:, None].to(tl.int64) * stride_on + rk[None, :] * stride_ok
    if WRITE_MASK:
        tl.store(o_ptrs, keep.to(tl.int8), mask=inb)
    else:
        w_ptrs = W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :] * stride_wk
        w = tl.load(w_ptrs, mask=inb, other=0.0)
        val = tl.where(keep, w.to(tl.float32) * scale, 0.0)
        if LOWRANK:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for j in range(0, R):
                b = tl.load(LB + rn.to(tl.int64) * stride_bn + j * stride_br, mask=rn < N,
                            other=0.0).to(tl.float32)
                a = tl.load(LA + j * stride_ar + rk.to(tl.int64) * stride_ak, mask=rk < K,
                            other=0.0).to(tl.float32)
                acc += b[:, None] * a[None, :]
            val = val + lr_scale * acc
        tl.store(o_ptrs, val.to(OUT.dtype.element_ty), mask=inb)


def _check_blocks(block_n, block_k):
    for name, b in (("block_n", block_n), ("block_k", block_k)):
        if b < 1 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two, got {b}")
    if block_k < 8:
        raise ValueError(f"block_k must be a multiple of 8 (mask groups), got {block_k}")


def _launch(w, out, seed, thr, scale, write_mask, block_n, block_k, lowrank=None):
    n, k = out.shape
    _check_blocks(block_n, block_k)
    groups = check_counter_range(n, k)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    src = w if w is not None else out
    seed_ptr = isinstance(seed, torch.Tensor)
    if lowrank is None:  # the B/A arguments are unused: any pointer will do
        lr = (src, src, 0, 0, 0, 0, 0, 0.0)
    else:
        B, A, s = lowrank
        lr = (B, A, A.shape[0], B.stride(0), B.stride(1), A.stride(0), A.stride(1), float(s))
    _mask_apply_kernel[grid](src, out, n, k, src.stride(0), src.stride(1),
                             out.stride(0), out.stride(1), seed if seed_ptr else int(seed),
                             int(thr), groups, float(scale), *lr, WRITE_MASK=write_mask,
                             BLOCK_N=block_n, BLOCK_K=block_k, SEED_PTR=seed_ptr,
                             LOWRANK=lowrank is not None)
    return out


def _check_seed(seed, device=None):
    """An int seed checked by the reference (``[0, 2**63)``). A tensor seed (graph
    capture) stays on the device, unread: it must be a one-element int64 tensor on the
    kernel's device; its value is not checked here (that would be a host read). The
    seeds rora_fast draws lie in ``[0, 2**62)``; a negative value would give a valid
    mask that the reference does not define (it rejects such seeds)."""
    if not isinstance(seed, torch.Tensor):
        return ref.check_seed(seed)
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("a tensor seed must be a one-element int64 tensor, got "
                        f"{seed.dtype} of shape {tuple(seed.shape)}")
    if device is not None and seed.device != device:
        raise ValueError(f"a tensor seed must be on the kernel's device {device}, "
                         f"got {seed.device}")
    return seed


def masked_weight(weight: torch.Tensor, seed, p: float, *, block_n: int = _COPY_BLOCK_N,
                block_k: int = _COPY_BLOCK_K) -> torch.Tensor:
    """``(M ⊙ W) / (1 - p_eff)`` in W's dtype, a new contiguous tensor (``W`` itself when
    ``p_eff == 0``). Bit-identical to ``reference.masked_weight`` (same product
    ``w * scale`` in float32, rounded once to W's dtype). ``seed``: an int, or a
    one-element int64 tensor on W's device that the kernel reads (no host sync: what
    CUDA graph capture needs)."""
    thr, scale = mask_params(p)
    seed = _check_seed(seed, weight.device)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if thr == 0:
        return weight
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    return _launch(weight, out, seed, thr, scale, False, block_n, block_k)


def effective_weight(weight: torch.Tensor, seed, p: float, lora_B: torch.Tensor,
                     lora_A: torch.Tensor, scaling: float, *, block_n: int = _COPY_BLOCK_N,
                     block_k: int = _COPY_BLOCK_K) -> torch.Tensor:
    """``c · (M ⊙ W) + s · B A`` in W's dtype, one new tensor, one kernel: the single
    weight of a RoRA layer whose LoRA input is ``x`` itself (``y = x W_effᵀ + b``,
    ``dX = dY W_eff``). Bit-identical in the interpreter to
    ``reference.effective_weight`` (float32 sum, rank by rank, rounded once).
    ``seed`` as in :func:`masked_weight`; no argument checks beyond it (the callers, the
    fused op, have checked shapes, dtypes and devices)."""
    thr, scale = mask_params(p)
    seed = _check_seed(seed, weight.device)
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    return _launch(weight, out, seed, thr, scale, False, block_n, block_k,
                   lowrank=(lora_B, lora_A, scaling))


def keep_mask(seed, out_features: int, in_features: int, p: float, device=None, *,
              block_n: int = _COPY_BLOCK_N, block_k: int = _COPY_BLOCK_K) -> torch.Tensor:
    """The keep-mask the kernels draw, materialised as a bool ``(out, in)`` tensor.

    For tests and debugging: it runs the same ``_keep_nk`` as every kernel, so it must
    equal ``reference.weight_keep_mask(seed, out, in, p)`` bit for bit, whatever
    ``block_n``/``block_k`` (a multiple of 8)."""
    thr, _ = mask_params(p)
    out = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
    seed = _check_seed(seed, out.device)
    if out.numel() == 0:
        return out.bool()
    return _launch(None, out, seed, thr, 1.0, True, block_n, block_k).bool()
