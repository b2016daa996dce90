"""The fused RoRA linear op: its autograd Function, the public entry point and ``supports``.

Math (one layer; ``W`` frozen ``out x in``, ``A`` r x in, ``B`` out x r, ``s`` the LoRA
scaling, ``M`` the weight keep-mask of :mod:`rora_fast.reference`, ``c = 1/(1-p_eff)``)::

    y = c · x (M ⊙ W)ᵀ + b + s · (x̃ Aᵀ) Bᵀ

``W' = c · (M ⊙ W)`` is made once per call by ``mask.masked_weight`` (a transient buffer,
freed when the call returns), then cuBLAS does the GEMMs (why this strategy, with the
figures of the one it beat, is recorded in ``kernels/src/_common.py``). When the LoRA
input is ``x`` itself (no LoRA input dropout) and W is masked, the same pass over W
writes the effective weight ``W_eff = c · (M ⊙ W) + s · B A`` instead
(``mask.effective_weight``), and ``y = x W_effᵀ + b``, ``dX = dY W_eff`` are single
GEMMs: no LoRA update pass over y (T x out) nor over dX (T x in). With the op's own LoRA
input dropout (``lora_p``), ``x̃`` is the same mask kernel applied to ``x`` (another
Philox key, ``reference.lora_input``), made in forward and again in backward: only
``x`` is kept.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch

from rora_fast import reference as ref

from . import _common
from .mask import effective_weight, masked_weight

__all__ = ["FusedRoraLinearFunction", "fused_rora_linear", "supports", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FusedRoraLinearFunction(torch.autograd.Function):
    """Fused RoRA linear: same inputs, outputs and gradients as
    ``rora_fast.functional.RoraLinearFunction``.

    Forward, with ``X`` = x as ``(T, in)``, ``X̃`` = x_lora as ``(T, in)``, ``c = 1/(1-p_eff)``::

        S = X̃ Aᵀ                                   (T x r, torch: a small GEMM)
        Y = c · X (M ⊙ W)ᵀ + b + s · S Bᵀ           (T x out)

    Backward. Write ``W' = c · (M ⊙ W)`` (constant: W is frozen, M is fixed by the
    seed). ``Y`` is linear in each input, so with ``G = ∂L/∂Y`` (T x out):

    * ``Y = X W'ᵀ + ...``: ``∂L/∂X_tj = Σ_i G_ti W'_ij``, i.e. ``dX = G W'``
      (``= c · G (M ⊙ W)``, the same mask regenerated from the seed; nothing of
      size out x in was stored).
    * ``Y = s · X̃ Aᵀ Bᵀ``: the chain through ``S``: ``dS = s · G B`` (T x r), then
      ``dX̃ = dS A = s · (G B) A`` and ``dA = dSᵀ X̃ = s · (G B)ᵀ X̃``.
    * ``Y = s · S Bᵀ`` with ``S`` fixed: ``dB = s · Gᵀ S = s · Gᵀ (X̃ Aᵀ)``.
    * ``db = Σ_t G_t``.
    * The penalty ``λ Ω`` is not part of this op: its gradient is added once per
      optimizer step for all layers (``rora_fast.penalty``).
    * ``dW`` (only if a caller made W trainable, not the RoRA setting):
      ``dW_ij = Σ_t G_ti c M_ij X_tj = c · M ⊙ (Gᵀ X)``: ``masked_weight(Gᵀ X)``.

    When ``x̃`` is ``x`` itself (no LoRA input dropout), autograd would add
    ``dX + dX̃``; the op returns the sum for ``x`` and None for the second slot. With a
    weight mask (p_eff > 0) that sum is ``dY (W' + s·BA) = dY W_eff``: one GEMM with the
    effective weight, rebuilt from the seed and the saved A, B (``Y = X W_effᵀ + b``
    likewise in forward; ``S = X Aᵀ`` is then computed only for dB). Without a mask the
    LoRA term is one addmm onto ``dY W``, as the masked weight would be ``W`` itself.

    ``lora_p`` > 0 (``x_lora`` None): ``X̃ = c_x · M_x ⊙ X`` is drawn by the mask kernel
    from the seed (``reference.lora_input``); backward regenerates it for dA and takes
    ``dX += c_x · M_x ⊙ dX̃``.

    Saved for backward: ``x̃`` (for dA; ``x`` instead with ``lora_p``), ``S`` (T x r,
    for dB), ``x`` when W is trainable; W, A, B are parameters (no copy).
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed, lora_p=0.0):
        return _autocast_off(x.device.type, FusedRoraLinearFunction._forward,
                             ctx, x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed,
                             lora_p)

    @staticmethod
    def _forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed, lora_p):
        in_f = x.shape[-1]
        out_f = weight.shape[0]
        lora_input_is_x = x_lora is None and not lora_p
        x2 = x.reshape(-1, in_f)
        if lora_p:
            xl2 = _mask(x2, ref.lora_seed(seed), lora_p)
        else:
            xl2 = x2 if lora_input_is_x else x_lora.reshape(-1, in_f)
        needs = ctx.needs_input_grad
        need_xl = needs[4]  # dA needs x̃
        need_s = needs[5]   # dB needs S
        # x̃ = x and a weight mask: one effective weight c·M⊙W + s·BA (made in the mask
        # kernel's pass over W anyway) serves forward and dX; no LoRA pass over y or dX.
        eff = lora_input_is_x and ref.keep_threshold(p) != 0
        if eff:
            w = _effective(weight, seed, p, lora_B, lora_A, scaling)
            y2 = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
            del w
            s_mat = x2 @ lora_A.t() if need_s else None
        else:
            s_mat = xl2 @ lora_A.t()  # (T, r) in the input dtype, as the reference rounds it
            wm = _mask(weight, seed, p)
            y2 = torch.addmm(bias, x2, wm.t()) if bias is not None else x2 @ wm.t()
            del wm
            y2.addmm_(s_mat, lora_B.t(), alpha=scaling)
        seed_t = seed if isinstance(seed, torch.Tensor) else None
        if lora_p:  # x is kept instead of x̃ (regenerated in backward)
            ctx.save_for_backward(x2 if needs[2] or need_xl else None, None,
                                  weight, lora_A, lora_B, s_mat if need_s else None, seed_t)
        else:
            ctx.save_for_backward(x2 if needs[2] else None,
                                  xl2 if need_xl else None,
                                  weight, lora_A, lora_B,
                                  s_mat if need_s else None, seed_t)
        del xl2
        ctx.scaling, ctx.p, ctx.lora_p = scaling, p, lora_p
        ctx.seed = None if seed_t is not None else seed
        ctx.lora_input_is_x = lora_input_is_x
        ctx.eff = eff
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y2.reshape(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad_out):
        return _autocast_off(grad_out.device.type, FusedRoraLinearFunction._backward,
                             ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x2, xl2, weight, lora_A, lora_B, s_mat, seed_t = ctx.saved_tensors
        needs = ctx.needs_input_grad
        s, p, lora_p = ctx.scaling, ctx.p, ctx.lora_p
        seed = seed_t if seed_t is not None else ctx.seed
        if lora_p and needs[4]:
            xl2 = _mask(x2, ref.lora_seed(seed), lora_p)
        out_f = weight.shape[0]
        g = grad_out.reshape(-1, out_f)
        if g.stride(-1) != 1:
            g = g.contiguous()
        lora_input_is_x = ctx.lora_input_is_x
        need_dx = needs[0]
        need_dxl = (needs[1] and not lora_input_is_x) or (lora_p and need_dx)
        eff = ctx.eff
        lora_in_dx = lora_input_is_x and need_dx and not eff
        need_dyb = needs[4] or need_dxl or lora_in_dx
        dyb = g @ lora_B if need_dyb else None  # (T, r)

        dx = dx_lora = dA = dB = db = dW = None
        if need_dx:
            if eff:  # dX = dY W_eff: the LoRA path is inside W_eff
                w = _effective(weight, seed, p, lora_B, lora_A, s)
                dx = g @ w
                del w
            else:
                wm = _mask(weight, seed, p)
                dx = g @ wm
                del wm
                if lora_in_dx:
                    dx.addmm_(dyb, lora_A, alpha=s)
            dx = dx.reshape(ctx.x_shape)
        if need_dxl:
            dx_lora = torch.mm(dyb, lora_A).mul_(s)
            if lora_p:  # dX += c_x · M_x ⊙ dX̃ (the same mask as x̃)
                dx.add_(_mask(dx_lora, ref.lora_seed(seed), lora_p).view(ctx.x_shape))
                dx_lora = None
            else:
                dx_lora = dx_lora.reshape(ctx.x_shape)
        if needs[4]:
            dA = torch.mm(dyb.t(), xl2).mul_(s)
        if needs[5]:
            dB = torch.mm(g.t(), s_mat).mul_(s)
        if ctx.has_bias and needs[3]:
            db = g.sum(0)
        if needs[2]:
            dW = _mask(g.t() @ x2, seed, p)
        return (dx, dx_lora, dW, db, dA, dB) + (None,) * 4


# ---------------------------------------------------------------------------------
# Validation, supports, entry point
# ---------------------------------------------------------------------------------

def _autocast_off(dev: str, fn, *args):
    """``fn(*args)`` with autocast off on ``dev``: the op computes in its inputs' dtype
    (the kernels see those dtypes), so an enclosing autocast must not recast the torch
    GEMMs around them. The context is entered only when autocast is on: entering it
    costs ~7 µs of host time, and RoraLinear has already left autocast before it calls
    the op (a backward run inside an autocast region still needs it)."""
    if torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):
            return fn(*args)
    return fn(*args)


def _seed_arg(seed: torch.Tensor, weight: torch.Tensor):
    """A tensor seed as the kernels take it: the tensor itself on the weight's CUDA device
    (the kernel reads it: no host sync), else its value, read on the host."""
    if seed.is_cuda and seed.device == weight.device:
        return seed.reshape(1)
    return int(seed.reshape(()).item())


# Graph capture (torch.compile) of a tensor seed: the masked copies go through these
# registered ops, so that the compiler sees no host read of the seed.
@torch.library.custom_op("rora_fast_kernels::masked_weight", mutates_args=())
def masked_weight_op(weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    out = masked_weight(weight, _seed_arg(seed, weight), p)
    return out.clone() if out is weight else out


@masked_weight_op.register_fake
def _(weight, seed, p):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.custom_op("rora_fast_kernels::effective_weight", mutates_args=())
def effective_weight_op(weight: torch.Tensor, seed: torch.Tensor, p: float,
                        lora_B: torch.Tensor, lora_A: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    return effective_weight(weight, _seed_arg(seed, weight), p, lora_B, lora_A, scaling)


@effective_weight_op.register_fake
def _(weight, seed, p, lora_B, lora_A, scaling):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _mask(weight, seed, p):
    """The masked weight; ``seed`` an int, or a one-element tensor (graph capture: through
    the registered op :func:`masked_weight_op`)."""
    if isinstance(seed, torch.Tensor):
        return masked_weight_op(weight, seed, p)
    return masked_weight(weight, seed, p)


def _effective(weight, seed, p, lora_B, lora_A, scaling):
    """``c·(M ⊙ W) + s·B A`` (see ``mask.effective_weight``); a tensor seed through the
    registered op :func:`effective_weight_op`, as :func:`_mask`."""
    if isinstance(seed, torch.Tensor):
        return effective_weight_op(weight, seed, p, lora_B, lora_A, scaling)
    return effective_weight(weight, seed, p, lora_B, lora_A, scaling)


def _validate(x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed, allow_cpu: bool):
    """Raise a clear TypeError/ValueError for inputs the fused op cannot take."""
    named = dict(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B)
    if x_lora is not None:
        named["x_lora"] = x_lora
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the in_features axis)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out x in), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {in_f} "
                         f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    if x_lora is not None and x_lora.shape != x.shape:
        raise ValueError(f"x_lora must have x's shape {tuple(x.shape)}, got {tuple(x_lora.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A must be r x {in_f}, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or lora_B.shape != (out_f, r):
        raise ValueError(f"lora_B must be {out_f} x {r}, got {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
    dtypes = {t.dtype for t in named.values()}
    if len(dtypes) != 1:
        raise TypeError("x, x_lora, weight, bias, lora_A and lora_B must share one dtype; got "
                        + ", ".join(f"{k}={v.dtype}" for k, v in named.items()))
    dtype = x.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {dtype} is not supported by the fused kernels "
                        f"(supported: {SUPPORTED_DTYPES})")
    devices = {t.device for t in named.values()}
    if len(devices) != 1:
        raise ValueError("all tensors must be on one device; got "
                         + ", ".join(f"{k}={v.device}" for k, v in named.items()))
    if not x.is_cuda:
        if not (allow_cpu and _common.interpreting()):
            raise ValueError(f"the fused kernels need CUDA tensors, got {x.device} "
                             "(CPU tensors only under TRITON_INTERPRET=1, for tests)")
        if dtype == torch.bfloat16:
            raise TypeError("bfloat16 is not supported by the Triton interpreter")
    if isinstance(scaling, bool) or not isinstance(scaling, Real) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite real number, got {scaling!r}")
    if isinstance(p, bool) or not isinstance(p, Real):
        raise ValueError(f"weight_dropout p must be a real number in [0, 1), got {p!r}")
    ref.keep_threshold(float(p))  # clear ValueError outside [0, 1)
    ref.check_seed(seed)
    ref.check_counter_range(out_f, in_f)


def supports(x, weight, lora_A, lora_B=None, bias=None, x_lora=None) -> bool:
    """Whether the fused kernels take these inputs: CUDA tensors on one device, one dtype
    in fp32/fp16/bf16 (bf16 on compute capability >= 8.0), consistent 2-D shapes,
    non-empty, r >= 1, and a weight small enough for int32 mask counters. Anything else
    makes the caller use the reference path. ``lora_B``, ``bias`` and ``x_lora`` are
    optional: pass them to have their dtype/device/shape checked too. This is the
    one check of a call: ``rora_fast.functional.rora_linear`` then calls
    :func:`fused_rora_linear` with ``validate=False``."""
    try:
        if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in (x, weight, lora_A)):
            return False
        if lora_B is None:
            lora_B = lora_A.new_empty((weight.shape[0], lora_A.shape[0])) \
                if weight.dim() == 2 and lora_A.dim() == 2 else lora_A
        _validate(x, x_lora, weight, bias, lora_A, lora_B, 1.0, 0.0, 0, allow_cpu=False)
        if x.numel() == 0 or weight.numel() == 0 or lora_A.shape[0] == 0:
            return False
        if x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] < 8:
            return False
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


def fused_rora_linear(x: torch.Tensor, x_lora: Optional[torch.Tensor], weight: torch.Tensor,
                      bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scaling: float, p: float, seed, *,
                      validate: bool = True, lora_p: float = 0.0) -> torch.Tensor:
    """Training forward of a RoRA linear layer through the fused kernels.

    Same arguments and semantics as ``rora_fast.functional.rora_linear`` (minus
    ``backend``): ``x_lora`` None (or ``x`` itself) when the LoRA input is ``x``;
    ``seed`` an int or a one-element int64 tensor. See
    :class:`FusedRoraLinearFunction` for the math.

    ``lora_p``: the op's own LoRA input dropout (``x_lora`` must then be None), as in
    ``rora_fast.functional.rora_linear``.

    ``validate=False`` skips the argument checks (for callers that ran :func:`supports`).

    Inputs must be CUDA tensors (``supports`` says which); under ``TRITON_INTERPRET=1``
    CPU tensors are accepted too so that the kernels can be tested on a CPU.
    """
    if x_lora is x:
        x_lora = None
    if validate:
        _validate(x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed, allow_cpu=True)
        scaling, p = float(scaling), float(p)
        if not isinstance(seed, torch.Tensor):
            seed = int(seed)
        if (isinstance(lora_p, bool) or not isinstance(lora_p, Real)
                or not 0.0 <= lora_p < 1.0):
            raise ValueError(f"lora_p (LoRA input dropout) must be a real number in [0, 1), "
                             f"got {lora_p!r}")
        lora_p = float(lora_p)
        if lora_p and x_lora is not None:
            raise ValueError("pass a LoRA input x_lora or a LoRA dropout lora_p, not both")
    if lora_p and x.shape[-1]:
        ref.check_counter_range(x.numel() // x.shape[-1], x.shape[-1])
    return FusedRoraLinearFunction.apply(x, x_lora, weight, bias, lora_A, lora_B,
                                         scaling, p, seed, lora_p)
