"""Triton GEMMs of the RoRA layer with the weight mask drawn in the K-loop (strategy
``"inloop"``) and the bias / LoRA term fused into the epilogue.

Forward  ``Y  = (X (M ⊙ W)ᵀ) · scale + b + s · S Bᵀ``        S = X̃ Aᵀ  (tokens x r)
Backward ``dX = (G (M ⊙ W)) · scale [+ s · (G B) A]``         G = dY

``M ⊙ W`` is never materialised: each W tile is loaded, multiplied by the keep bits
of :func:`kernels.mask._keep_kn` / ``_keep_nk`` (bit-identical to the reference mask
whatever the tile shape) and fed to ``tl.dot``; ``scale = 1 / (1 - p_eff)`` is applied
once to the fp32 accumulator. Both kernels accept arbitrary strides (non-contiguous
inputs) and ragged sizes (masked loads and stores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from .mask import _keep_kn, _keep_nk, check_counter_range, mask_params

__all__ = ["gemm_forward", "gemm_dx", "DEFAULT_INTERPRETER_CONFIG"]

# One small configuration under the interpreter (no autotuning on the CPU).
DEFAULT_INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def _gpu_configs():
    """Autotuning candidates (H100/H200-class first; smaller ones for small shapes and
    for fp32, whose big tiles may not fit shared memory: the autotuner skips those)."""
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (64, 128, 32, 4, 4),
    ]:
        cfgs.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                                  num_warps=warps, num_stages=stages))
    return cfgs


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped launch order (L2 reuse of the operand shared by neighbouring tiles)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# Sizes, seed and mask parameters change from call to call: do not compile a variant
# per value (Triton would specialise ints equal to 1 or divisible by 16; a random seed
# would then compile two kernels). Strides stay specialised (vectorised loads).
_NO_SPECIALIZE = ["M", "N", "K", "R", "M_BUCKET", "seed", "thr", "n_groups"]


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(X, W, S, LB, BIAS, Y, M, N, K, R, M_BUCKET,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr,
                stride_bn, stride_br, stride_ym, stride_yn,
                seed, thr, n_groups, w_scale, lora_scale,
                HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr):
    """Y[M, N] = X[M, K] (M ⊙ W[N, K])ᵀ · w_scale + bias + lora_scale · S[M, R] LB[N, R]ᵀ."""
    pid = tl.program_id(0)
    pid_m, pid_n = _swizzle(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    w_ptrs = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk  # Wᵀ tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_MASK:
            keep = _keep_kn(seed, pid_n * BLOCK_N, k0, n_groups, thr, BLOCK_K, BLOCK_N)
            b = tl.where(keep, b, tl.zeros_like(b))
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_MASK:
        acc = acc * w_scale
    if HAS_BIAS:
        bias = tl.load(BIAS + rn, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r_ok = (r0 + rr) < R
            s = tl.load(S + rm[:, None].to(tl.int64) * stride_sm + (r0 + rr)[None, :] * stride_sr,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            bt = tl.load(LB + rn[None, :].to(tl.int64) * stride_bn + (r0 + rr)[:, None] * stride_br,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            lora = tl.dot(s, bt, lora, input_precision=INPUT_PRECISION)
        acc += lora * lora_scale
    y_ptrs = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _dx_kernel(G, W, DYB, A, DX, M, N, K, R, M_BUCKET,
               stride_gm, stride_gn, stride_wn, stride_wk, stride_dm, stride_dr,
               stride_ar, stride_ak, stride_xm, stride_xk,
               seed, thr, n_groups, w_scale, lora_scale,
               HAS_MASK: tl.constexpr, HAS_LORA: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP_M: tl.constexpr):
    """DX[M, K] = G[M, N] (M ⊙ W[N, K]) · w_scale + lora_scale · DYB[M, R] A[R, K].

    Output tiles are BLOCK_M x BLOCK_K (K = in_features, tile starts are multiples of
    BLOCK_K, itself a multiple of 8, as the mask groups need); the loop runs over N."""
    pid = tl.program_id(0)
    pid_m, pid_k = _swizzle(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    k_ok = rk < K
    g_ptrs = G + rm[:, None].to(tl.int64) * stride_gm + rn[None, :] * stride_gn
    w_ptrs = W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_ok = (n0 + rn) < N
        g = tl.load(g_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_MASK:
            keep = _keep_nk(seed, n0, pid_k * BLOCK_K, n_groups, thr, BLOCK_N, BLOCK_K)
            w = tl.where(keep, w, tl.zeros_like(w))
        acc = tl.dot(g, w, acc, input_precision=INPUT_PRECISION)
        g_ptrs += BLOCK_N * stride_gn
        w_ptrs += BLOCK_N * stride_wn
    if HAS_MASK:
        acc = acc * w_scale
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        lora = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r_ok = (r0 + rr) < R
            d = tl.load(DYB + rm[:, None].to(tl.int64) * stride_dm + (r0 + rr)[None, :] * stride_dr,
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            a = tl.load(A + (r0 + rr)[:, None].to(tl.int64) * stride_ar + rk[None, :] * stride_ak,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            lora = tl.dot(d, a, lora, input_precision=INPUT_PRECISION)
        acc += lora * lora_scale
    dx_ptrs = DX + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
    tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :])


_fwd_tuned = triton.autotune(configs=_gpu_configs(), key=["M_BUCKET", "N", "K", "R"])(_fwd_kernel)
_dx_tuned = triton.autotune(configs=_gpu_configs(), key=["M_BUCKET", "N", "K", "R"])(_dx_kernel)


def _check_config(config):
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        b = config[key]
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"{key} must be a power of two >= 16 (tl.dot), got {config}")
    return config


def _launch(tuned, raw, grid_fn, args, consts, config):
    """Run the autotuned kernel on a GPU, the raw kernel with a fixed ``config`` otherwise
    (the interpreter, or a caller that pins a configuration)."""
    if config is None and not _common.interpreting():
        tuned[grid_fn](*args, **consts)
        return
    cfg = dict(_check_config(dict(config or DEFAULT_INTERPRETER_CONFIG)))
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    raw[grid_fn(cfg)](*args, **consts, **cfg, **launch)


def gemm_forward(x2, weight, s, lora_B, bias, scaling, p, seed, *, config=None):
    """``(x2 (M ⊙ W)ᵀ)/(1-p_eff) + bias + scaling · s lora_Bᵀ`` for 2-D ``x2`` (tokens x in).

    ``s`` is ``x̃ Aᵀ`` (tokens x r) or None (no LoRA term). Returns tokens x out in x2's dtype.
    """
    m, k = x2.shape
    n = weight.shape[0]
    thr, w_scale = mask_params(p)
    groups = check_counter_range(n, k)
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return y
    has_lora = s is not None and s.shape[1] > 0
    r = s.shape[1] if has_lora else 0
    s_t = s if has_lora else y
    b_t = lora_B if has_lora else y
    bias_t = bias if bias is not None else y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    args = (x2, weight, s_t, b_t, bias_t, y, m, n, k, r, _common.m_bucket(m),
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
            s_t.stride(0), s_t.stride(1), b_t.stride(0), b_t.stride(1),
            y.stride(0), y.stride(1), int(seed), thr, groups, float(w_scale), float(scaling))
    consts = dict(HAS_MASK=thr > 0, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
                  INPUT_PRECISION=_common.input_precision(x2.dtype),
                  BLOCK_R=_common.block_r(r))
    _launch(_fwd_tuned, _fwd_kernel, grid, args, consts, config)
    return y


def gemm_dx(g, weight, dyb, lora_A, scaling, p, seed, *, config=None):
    """``(g (M ⊙ W))/(1-p_eff) [+ scaling · dyb lora_A]`` for 2-D ``g`` (tokens x out).

    ``dyb`` is ``g B`` (tokens x r) or None. Returns tokens x in in g's dtype.
    """
    m, n = g.shape
    k = weight.shape[1]
    thr, w_scale = mask_params(p)
    groups = check_counter_range(n, k)
    dx = torch.empty((m, k), dtype=g.dtype, device=g.device)
    if m == 0 or k == 0:
        return dx
    has_lora = dyb is not None and dyb.shape[1] > 0
    r = dyb.shape[1] if has_lora else 0
    d_t = dyb if has_lora else dx
    a_t = lora_A if has_lora else dx

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)

    args = (g, weight, d_t, a_t, dx, m, n, k, r, _common.m_bucket(m),
            g.stride(0), g.stride(1), weight.stride(0), weight.stride(1),
            d_t.stride(0), d_t.stride(1), a_t.stride(0), a_t.stride(1),
            dx.stride(0), dx.stride(1), int(seed), thr, groups, float(w_scale), float(scaling))
    consts = dict(HAS_MASK=thr > 0, HAS_LORA=has_lora,
                  INPUT_PRECISION=_common.input_precision(g.dtype),
                  BLOCK_R=_common.block_r(r))
    _launch(_dx_tuned, _dx_kernel, grid, args, consts, config)
    return dx
