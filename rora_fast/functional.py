"""Functional entry point of the RoRA linear op and its backend dispatch.

``rora_linear(...)`` computes the training forward of one RoRA layer and, in
backward, the gradients of the layer plus (once per optimizer step) the gradient of
the trigger-insensitive penalty. Two backends implement the same math:

* ``reference``: :class:`RoraLinearFunction` below, built on
  :mod:`rora_fast.reference`; any device, any floating dtype.
* ``triton``: the fused kernels of :mod:`rora_fast.kernels` (CUDA tensors only).

``backend="auto"`` (the default) takes the kernels for CUDA tensors they support and
the reference everywhere else. The environment variable ``RORA_FAST_BACKEND``
(``auto`` | ``reference`` | ``triton``) overrides the default for every call.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import torch

from . import reference as ref

__all__ = ["PenaltyHandle", "RoraLinearFunction", "rora_linear", "resolve_backend"]

_BACKENDS = ("auto", "reference", "triton")


class PenaltyHandle:
    """What the backward pass needs to add ``λ ∇Ω`` to ``dA``/``dB``.

    ``claim()`` is asked in backward and returns True when the penalty gradient
    must be added now. The owner (a :class:`rora_fast.RoraLinear`) decides that so
    that the penalty is applied once per optimizer step, whatever the number of
    backward calls (gradient accumulation, layers called twice).
    """

    def __init__(self, lam: float, U: torch.Tensor, V: torch.Tensor, claim,
                 anchor_A: Optional[torch.Tensor] = None,
                 anchor_B: Optional[torch.Tensor] = None):
        self.lam = float(lam)
        self.U = U
        self.V = V
        self.anchor_A = anchor_A  # A₀, B₀ of PiSSA/OLoRA (the penalty is on A − A₀, B − B₀)
        self.anchor_B = anchor_B
        self._claim = claim

    def claim(self) -> bool:
        return bool(self.lam) and self._claim()


_SCRATCH = threading.local()


def _weight_scratch(weight: torch.Tensor, p: float) -> Optional[torch.Tensor]:
    """A reusable per-thread buffer for the transient masked weight on the CPU.

    The masked weight lives only inside one forward or one backward call (it is never
    returned nor saved), so one buffer per weight shape can serve every call; reusing
    it saves the page faults of a fresh multi-MB allocation each time (~60 % of the
    masked copy's cost at 4096 x 4096). Not used on other devices, whose caching
    allocators already reuse memory.
    """
    if (weight.device.type != "cpu" or weight.dtype != torch.float32
            or not ref.native_mask_available() or ref.keep_threshold(p) == 0):
        return None
    cache = getattr(_SCRATCH, "buffers", None)
    if cache is None:
        cache = _SCRATCH.buffers = {}
    key = (tuple(weight.shape), weight.dtype)
    buf = cache.get(key)
    if buf is None:
        buf = cache[key] = torch.empty(weight.shape, dtype=weight.dtype)
    return buf


class RoraLinearFunction(torch.autograd.Function):
    """Reference autograd Function for the RoRA linear op.

    Forward: ``y = x (M ⊙ W)ᵀ / (1-p) + b + s (x̃ Aᵀ) Bᵀ`` with ``M`` regenerated from
    ``seed`` (nothing of size ``out x in`` is saved for backward).

    Backward, with ``G = dY`` flattened to ``(tokens, out)``::

        dX  = G (M ⊙ W) / (1-p)                       (∂y/∂x through the base path)
        dX̃  = s (G B) A                               (∂y/∂x̃ through the LoRA path)
        dA  = s (G B)ᵀ x̃        [+ λ · 2 (A Vₖ) Vₖᵀ]
        dB  = s Gᵀ (x̃ Aᵀ)       [+ λ · 2 Uₖ (Uₖᵀ B)]
        db  = Σ_tokens G                              (only if the bias is trainable)
        dW  = (Gᵀ x) ⊙ M / (1-p)                      (only if the weight is trainable)

    When ``x̃`` is ``x`` itself (no LoRA input dropout) ``dX + dX̃`` is returned once, for
    ``x``.
    The bracketed penalty terms are added when ``penalty.claim()`` says so.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed, penalty):
        ctx.save_for_backward(x, x_lora, weight, lora_A, lora_B)
        ctx.scaling, ctx.p, ctx.seed, ctx.penalty = scaling, p, seed, penalty
        ctx.has_bias = bias is not None
        ctx.same_input = x_lora is x  # no LoRA input dropout: return dX + dX̃ once
        return ref.rora_linear_forward(x, x_lora, weight, bias, lora_A, lora_B,
                                       scaling, p, seed, _weight_scratch(weight, p))

    @staticmethod
    def backward(ctx, grad_out):
        x, x_lora, weight, lora_A, lora_B = ctx.saved_tensors
        penalty = ctx.penalty
        lam, U, V, A0, B0 = 0.0, None, None, None, None
        if penalty is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5]) \
                and penalty.claim():
            lam, U, V = penalty.lam, penalty.U, penalty.V
            A0, B0 = getattr(penalty, "anchor_A", None), getattr(penalty, "anchor_B", None)
        dx, dx_lora, dA, dB = ref.rora_linear_backward(
            grad_out, x, x_lora, weight, lora_A, lora_B, ctx.scaling, ctx.p, ctx.seed,
            lam, U, V, _weight_scratch(weight, ctx.p), combine=ctx.same_input,
            anchor_A=A0, anchor_B=B0)
        db = dW = None
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if ctx.needs_input_grad[2]:
            g = grad_out.reshape(-1, grad_out.shape[-1])
            dW = ref.masked_weight(g.t() @ x.reshape(-1, x.shape[-1]), ctx.seed, ctx.p)
        return (dx if ctx.needs_input_grad[0] else None,
                dx_lora if ctx.needs_input_grad[1] else None,
                dW, db,
                dA if ctx.needs_input_grad[4] else None,
                dB if ctx.needs_input_grad[5] else None,
                None, None, None, None)


def resolve_backend(backend: Optional[str] = None) -> str:
    """The backend name in force: the argument, else ``RORA_FAST_BACKEND``, else auto."""
    name = backend if backend is not None else os.environ.get("RORA_FAST_BACKEND", "auto")
    name = name.strip().lower()
    if name not in _BACKENDS:
        raise ValueError(f"unknown RoRA backend {name!r}; expected one of {_BACKENDS}")
    return name


def _kernels_module():
    try:
        from . import kernels  # noqa: WPS433 - optional, needs triton
    except ImportError:
        return None
    return kernels


def rora_linear(x: torch.Tensor, x_lora: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, p: float, seed: int,
                penalty: Optional[PenaltyHandle] = None,
                backend: Optional[str] = None) -> torch.Tensor:
    """Training forward of a RoRA linear layer; see :class:`RoraLinearFunction`.

    ``x_lora`` is the input of the LoRA path (``x`` itself, or ``lora_dropout(x)``).
    """
    name = resolve_backend(backend)
    if name != "reference" and x.is_cuda:
        kernels = _kernels_module()
        if kernels is not None and kernels.supports(x, weight, lora_A, lora_B=lora_B, bias=bias,
                                                       x_lora=x_lora):
            return kernels.fused_rora_linear(x, x_lora, weight, bias, lora_A, lora_B,
                                             scaling, p, seed, penalty)
        if name == "triton":
            raise RuntimeError(
                "RORA_FAST_BACKEND=triton but the fused kernels cannot take these "
                f"inputs (x {tuple(x.shape)} {x.dtype} on {x.device}, weight "
                f"{tuple(weight.shape)}); use backend 'auto' to fall back to the reference")
    elif name == "triton":
        raise RuntimeError("RORA_FAST_BACKEND=triton needs CUDA tensors; got "
                           f"x on {x.device}")
    return RoraLinearFunction.apply(x, x_lora, weight, bias, lora_A, lora_B,
                                    float(scaling), float(p), int(seed), penalty)
