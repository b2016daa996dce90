"""Functional entry point of the RoRA linear op and its backend dispatch.

``rora_linear(...)`` computes the training forward of one RoRA layer and, in
backward, its gradients (the penalty's gradient is not part of the op: it is added
once per optimizer step for all layers, see :mod:`rora_fast.penalty`). Two backends
implement the same math:

* ``reference``: :class:`RoraLinearFunction` below, built on
  :mod:`rora_fast.reference`; any device, any floating dtype. Small frozen weights
  (at most :data:`SAVE_MASKED_MAX` elements) take :func:`_rora_linear_small`, the same
  math in torch's own differentiable ops (launch-bound layers: no Python in backward).
* ``triton``: the fused kernels of :mod:`rora_fast.kernels` (CUDA tensors only).

``backend="auto"`` (the default) takes the kernels for CUDA tensors they support and
the reference everywhere else. The environment variable ``RORA_FAST_BACKEND``
(``auto`` | ``reference`` | ``triton``) overrides the default for every call.

Graph capture. The mask seed is either a Python int (eager: drawn from torch's CPU
generator and read on the host) or a one-element int64 tensor (under
``torch.compile``: drawn in the graph, no host sync; on the weight's device, so on
CUDA the Triton mask kernel reads it from device memory and the compiled graph has no
CPU op: CUDA graphs can capture it). With a tensor seed the masked weight comes from
the custom op ``rora_fast::masked_weight`` (registered with :mod:`torch.library`, a
fake implementation for tracing), so ``torch.compile(..., fullgraph=True)`` traces the
whole layer without a graph break.
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Union

import torch

from . import reference as ref

__all__ = ["RoraLinearFunction", "rora_linear", "resolve_backend", "masked_weight_op",
           "lora_dropout_input", "SAVE_MASKED_MAX"]

_BACKENDS = ("auto", "reference", "triton")
_ENV = "RORA_FAST_BACKEND"

_SCRATCH = threading.local()
_NATIVE = ref._native
#: Frozen weights with at most this many elements keep their masked weight from forward
#: to backward (:func:`_rora_linear_small`, torch's own autograd nodes); larger ones go
#: through :class:`RoraLinearFunction`, which regenerates the mask from the seed in
#: backward and saves nothing weight-sized.
SAVE_MASKED_MAX = 1 << 16
_SHAPES_OK: set = set()


_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _no_saved_tensor_hooks() -> bool:
    """True when no ``torch.autograd.graph.saved_tensors_hooks`` context is active."""
    return _top_hooks is not None and _top_hooks(False) is None


def _weight_scratch(weight: torch.Tensor) -> torch.Tensor:
    """A reusable per-thread buffer for the transient masked weight on the CPU.

    The masked weight lives only inside one forward or one backward call (it is never
    returned nor saved), so one buffer per weight shape can serve every call; reusing
    it saves the page faults of a fresh multi-MB allocation each time (~60 % of the
    masked weight's cost at 4096 x 4096). Not used on other devices, whose caching
    allocators already reuse memory, nor under graph capture.
    """
    cache = getattr(_SCRATCH, "buffers", None)
    if cache is None:
        cache = _SCRATCH.buffers = {}
    key = weight.shape
    buf = cache.get(key)
    if buf is None:
        buf = cache[key] = torch.empty(key, dtype=torch.float32)
    return buf


def _masked_eager(weight: torch.Tensor, seed: int, p: float, scratch: bool) -> torch.Tensor:
    """:func:`rora_fast.reference.masked_weight` with the per-call checks hoisted: the
    drop probability is validated once per value, the counter range once per shape,
    and a float32 CPU weight goes straight to the C kernel (bit-identical)."""
    thr, scale = ref.mask_params(p)
    if thr == 0:
        return weight
    if (_NATIVE is not None and weight.dtype is torch.float32 and weight.device.type == "cpu"
            and weight.dim() == 2 and weight.is_contiguous() and weight.numel()):
        shape = weight.shape
        if shape not in _SHAPES_OK:
            ref.check_counter_range(*shape)
            if len(_SHAPES_OK) > 1024:  # (activations' shapes vary with the batch)
                _SHAPES_OK.clear()
            _SHAPES_OK.add(shape)
        out = _weight_scratch(weight) if scratch else torch.empty_like(weight)
        _NATIVE.masked_f32(seed, weight.data_ptr(), out.data_ptr(), shape[0], shape[1], thr,
                           scale, torch.get_num_threads())
        return out
    return ref.masked_weight(weight, seed, p)


# ---------------------------------------------------------------------- custom op
def _kernel_seed(seed: torch.Tensor, weight: torch.Tensor):
    """The seed as the Triton kernels take it: the tensor itself when it lives on the
    weight's CUDA device (the kernel reads it: no host sync), else its value, read on
    the host."""
    if seed.is_cuda and seed.device == weight.device:
        return seed.reshape(1)
    return int(seed.reshape(()).item())


@torch.library.custom_op("rora_fast::masked_weight", mutates_args=())
def masked_weight_op(weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``(M ⊙ W)/(1 − p_eff)`` with the seed read from a one-element int64 tensor: the
    graph-capture form of :func:`rora_fast.reference.masked_weight` (the fused Triton
    copy for CUDA weights). A new tensor (never ``weight`` itself).

    A seed on the weight's CUDA device is read by the Triton kernel itself: no host
    sync, so the op can be captured in a CUDA graph (``mode="reduce-overhead"``). Any
    other seed is read on the host (free for a CPU tensor; a sync for a device tensor
    on the reference path)."""
    if weight.is_cuda:
        kernels = _kernels_module()
        if kernels is not None:
            out = kernels.masked_weight(weight, _kernel_seed(seed, weight), p)
            return out.clone() if out is weight else out
    out = ref.masked_weight(weight, int(seed.reshape(()).item()), p)
    return out.clone() if out is weight else out


@masked_weight_op.register_fake
def _(weight, seed, p):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _masked(weight, seed, p, scratch: bool):
    if isinstance(seed, torch.Tensor):
        return masked_weight_op(weight, seed, p)
    return _masked_eager(weight, seed, p, scratch)


def _lora_in(t: torch.Tensor, seed, p: float) -> torch.Tensor:
    """:func:`rora_fast.reference.lora_input` of ``t`` (``x`` in forward, ``dX̃`` in
    backward: the same mask and scale), not differentiable; int or tensor seed."""
    t2 = t.reshape(-1, t.shape[-1])
    return _masked(t2, ref.lora_seed(seed), p, False).view(t.shape)


def _scale_mask(rows: int, cols: int, seed: int, p: float, dtype) -> torch.Tensor:
    """``(M ⊙ 1)/(1 − p_eff)`` as a ``(rows, cols)`` CPU tensor in ``dtype`` (float32 or
    float64): the mask of :func:`rora_fast.reference.masked_weight` applied to ones, by
    the C kernel for float32 (reading a per-thread buffer of ones)."""
    if _NATIVE is not None and dtype is torch.float32 and rows * cols:
        ref.check_counter_range(rows, cols)
        ones = getattr(_SCRATCH, "ones", None)
        if ones is None or ones.numel() < rows * cols:
            ones = _SCRATCH.ones = torch.ones(rows * cols, dtype=torch.float32)
        thr, scale = ref.mask_params(p)
        out = torch.empty(rows, cols, dtype=torch.float32)
        _NATIVE.masked_f32(seed, ones.data_ptr(), out.data_ptr(), rows, cols, thr, scale,
                           torch.get_num_threads())
        return out
    return ref.masked_weight(torch.ones(rows, cols, dtype=dtype), seed, p)


def lora_dropout_input(x: torch.Tensor, seed, p: float) -> torch.Tensor:
    """The LoRA input dropout ``x̃`` of :func:`rora_fast.reference.lora_input` (the same
    values), differentiable in ``x`` (``dX = M_x ⊙ dX̃ / (1 − p_eff)``): ``x · m`` with
    ``m = M_x/(1 − p_eff)`` in float32 (float64 for a float64 ``x``), which autograd keeps,
    as torch's CPU dropout keeps its own scaled mask. For callers that need ``x̃`` itself
    (DoRA, the small-weight path); :func:`rora_linear` with ``lora_p`` draws it inside
    the op and keeps nothing of it. ``seed``: an int, or a one-element int64 tensor
    (graph capture: ``m`` from :func:`masked_weight_op` of ones, on ``x``'s device)."""
    if ref.mask_params(p)[0] == 0:
        return x
    shape = x.shape
    x2 = x if len(shape) == 2 else x.reshape(-1, shape[-1])  # (no view nodes for 2-d x)
    mdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    key = ref.lora_seed(seed)
    if isinstance(seed, torch.Tensor):
        m = masked_weight_op(torch.ones(x2.shape, dtype=mdtype, device=x.device), key, p)
    elif x.device.type == "cpu":
        m = _scale_mask(x2.shape[0], x2.shape[1], key, p, mdtype)
    else:  # CUDA: the kernels' mask (bit-identical) where they run, else the reference
        ones = torch.ones(x2.shape, dtype=mdtype, device=x.device)
        kernels = _kernels_module() if x.is_cuda and mdtype is torch.float32 else None
        m = (kernels.masked_weight(ones, key, p) if kernels is not None
             else ref.masked_weight(ones, key, p))
    out = x2 * m  # (a half-precision x: in float32, rounded once below, as lora_input)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out if len(shape) == 2 else out.view(shape)


class RoraLinearFunction(torch.autograd.Function):
    """Reference autograd Function for the RoRA linear op.

    Forward: ``y = x (M ⊙ W)ᵀ / (1-p) + b + s (x̃ Aᵀ) Bᵀ`` with ``M`` regenerated from
    ``seed`` in backward (nothing of size ``out x in`` is saved). (Small frozen weights
    take :func:`_rora_linear_small` instead, see :func:`rora_linear`.)

    Backward, with ``G = dY`` flattened to ``(tokens, out)``::

        dX  = G (M ⊙ W) / (1-p)                       (∂y/∂x through the base path)
        dX̃  = s (G B) A                               (∂y/∂x̃ through the LoRA path)
        dA  = s (G B)ᵀ x̃
        dB  = s Gᵀ (x̃ Aᵀ)                             (x̃ Aᵀ saved by the forward)
        db  = Σ_tokens G                              (only if the bias is trainable)
        dW  = (Gᵀ x) ⊙ M / (1-p)                      (only if the weight is trainable)

    ``x_lora`` None: ``x̃`` is ``x`` itself (no LoRA input dropout); ``dX + dX̃`` is then
    returned once, for ``x``. ``lora_p`` > 0 (``x_lora`` None): ``x̃`` is
    :func:`rora_fast.reference.lora_input` of ``x``, drawn here and regenerated in
    backward for ``dA`` (only ``x`` is kept, as without LoRA dropout), and ``dX`` gets
    ``dX̃`` through the same mask.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed, lora_p=0.0):
        w = _masked(weight, seed, p, not torch.compiler.is_compiling())
        xl = _lora_in(x, seed, lora_p) if lora_p else x_lora
        y, s_mat = ref._forward(x, x if xl is None else xl, weight, bias,
                                lora_A, lora_B, scaling, w)
        del xl
        seed_t = seed if isinstance(seed, torch.Tensor) else None
        ctx.save_for_backward(x, x_lora, weight, lora_A, lora_B, s_mat, seed_t)
        ctx.scaling, ctx.p, ctx.lora_p = scaling, p, lora_p
        ctx.seed = None if seed_t is not None else seed
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, x_lora, weight, lora_A, lora_B, s_mat, seed_t = ctx.saved_tensors
        needs = ctx.needs_input_grad
        seed = seed_t if seed_t is not None else ctx.seed
        if needs[0]:
            w = _masked(weight, seed, ctx.p, not torch.compiler.is_compiling())
        else:
            w = None
        lora_p = ctx.lora_p
        if lora_p:  # x̃ regenerated for dA (else x stands in: only its shape is read)
            xl = _lora_in(x, seed, lora_p) if needs[4] else x
            dx, dx_lora, dA, dB = ref._backward(grad_out, x, xl, w, lora_A, lora_B,
                                                ctx.scaling, s_mat,
                                                (needs[0], needs[0], needs[4], needs[5]))
            del xl
            if dx is not None:
                dx = dx.add_(_lora_in(dx_lora, seed, lora_p))
            dx_lora = None
        else:
            dx, dx_lora, dA, dB = ref._backward(grad_out, x, x_lora, w, lora_A, lora_B,
                                                ctx.scaling, s_mat,
                                                (needs[0], needs[1], needs[4], needs[5]))
        db = dW = None
        if ctx.has_bias and needs[3]:
            db = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if needs[2]:
            g = grad_out.reshape(-1, grad_out.shape[-1])
            dW = _masked(g.t() @ x.reshape(-1, x.shape[-1]), seed, ctx.p, False)
        return dx, dx_lora, dW, db, dA, dB, None, None, None, None


def _small_frozen(weight: torch.Tensor, p: float, seed) -> bool:
    """Whether :func:`_rora_linear_small` takes the call: a frozen weight of at most
    :data:`SAVE_MASKED_MAX` elements, a mask to draw (``p_eff`` > 0), an eager int seed,
    and no saved-tensor hooks (activation checkpointing, offloading, the quantized
    layers' recompute of W: there the weight itself is what must be saved)."""
    return (type(seed) is int and not weight.requires_grad
            and weight.numel() <= SAVE_MASKED_MAX and ref.mask_params(p)[0] != 0
            and _no_saved_tensor_hooks())


def _rora_linear_small(x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed, lora_p):
    """The RoRA op for a small frozen weight, in torch's own differentiable ops:
    ``linear(x, M ⊙ W/(1 − p_eff), b) + s · linear(linear(x̃, A), B)`` on the inputs
    flattened to ``(tokens, in)``, torch's C++ autograd nodes doing the backward.

    The masked weight (at most 256 KiB in float32) is kept from forward to backward by
    autograd instead of regenerated. On these small, launch-bound layers the custom
    Function's Python forward and backward cost more than the computation itself, and
    every autograd node counts: the inputs are flattened once (three ``linear`` calls on
    3-d inputs would add two view nodes each) and the scale rides on the ``add``
    (docs/performance.md#launch-bound-case-cpu-measured-2026-11-30)."""
    w = _masked_eager(weight, seed, p, False)
    shape = x.shape
    if len(shape) != 2:
        x = x.reshape(-1, shape[-1])
        if x_lora is not None:
            x_lora = x_lora.reshape(-1, shape[-1])
    if lora_p:
        x_lora = lora_dropout_input(x, seed, lora_p)
    y = torch.nn.functional.linear(x, w, bias)
    lora = torch.nn.functional.linear(
        torch.nn.functional.linear(x if x_lora is None else x_lora, lora_A), lora_B)
    out = y.add(lora, alpha=scaling)
    return out if len(shape) == 2 else out.view(*shape[:-1], out.shape[-1])


def resolve_backend(backend: Optional[str] = None) -> str:
    """The backend name in force: the argument, else ``RORA_FAST_BACKEND``, else auto."""
    name = backend if backend is not None else os.environ.get(_ENV, "auto")
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


_SUPPORTS: dict = {}


def _fused_ok(kernels, x, x_lora, weight, bias, lora_A, lora_B) -> bool:
    """``kernels.supports(...)``, remembered per combination of what it checks (dtypes,
    devices, shapes, presence of bias and x̃, empty input): one dictionary lookup per
    call instead of the full check (the layer's own tensors do not change between
    calls; the input's properties are part of the key)."""
    key = (x.dtype, x.device, x.shape[-1], x.numel() == 0,
           None if x_lora is None else (x_lora.dtype, x_lora.device, x_lora.shape == x.shape),
           weight.dtype, weight.device, weight.shape, weight.stride(),
           lora_A.dtype, lora_A.device, lora_A.shape,
           lora_B.dtype, lora_B.device, lora_B.shape,
           None if bias is None else (bias.dtype, bias.device, bias.shape))
    ok = _SUPPORTS.get(key)
    if ok is None:
        if len(_SUPPORTS) > 1024:
            _SUPPORTS.clear()
        ok = _SUPPORTS[key] = bool(kernels.supports(x, weight, lora_A, lora_B=lora_B,
                                                    bias=bias, x_lora=x_lora))
    return ok


def rora_linear(x: torch.Tensor, x_lora: Optional[torch.Tensor], weight: torch.Tensor,
                bias: Optional[torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, p: float, seed: Union[int, torch.Tensor],
                backend: Optional[str] = None, lora_p: float = 0.0) -> torch.Tensor:
    """Training forward of a RoRA linear layer; see :class:`RoraLinearFunction`.

    ``x_lora`` is the input of the LoRA path: a given ``x̃`` (any dropout module's
    output), or None (or ``x`` itself) when it is ``x``. ``lora_p`` > 0 (with ``x_lora``
    None): the op draws ``x̃`` itself, the LoRA input dropout of
    :func:`rora_fast.reference.lora_input` keyed by the same ``seed``, and regenerates it
    in backward (nothing of ``x̃``'s size, nor a dropout mask, is kept). ``seed``: an int
    in ``[0, 2**63)`` or a one-element int64 tensor holding one (graph capture).
    ``scaling``, ``p``, ``lora_p``: Python floats. Arguments are not validated here
    (:class:`rora_fast.RoraLinear` checks them once, at construction); the fused
    kernels' :func:`~rora_fast.kernels.supports` decides which CUDA inputs they take.
    """
    if x_lora is x:
        x_lora = None
    if lora_p and x_lora is not None:
        raise ValueError("rora_linear takes a LoRA input x_lora or a LoRA dropout lora_p, "
                         "not both")
    name = backend if backend is not None else os.environ.get(_ENV)
    if name is not None:
        name = resolve_backend(name)
        if name == "reference":
            return _reference(x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed,
                              lora_p)
        if name == "triton" and not x.is_cuda:
            raise RuntimeError("RORA_FAST_BACKEND=triton needs CUDA tensors; got "
                               f"x on {x.device}")
    if x.is_cuda:
        kernels = _kernels_module()
        if kernels is not None and _fused_ok(kernels, x, x_lora, weight, bias, lora_A, lora_B):
            return kernels.fused_rora_linear(x, x_lora, weight, bias, lora_A, lora_B,
                                             scaling, p, seed, validate=False,
                                             lora_p=lora_p)
        if name == "triton":
            raise RuntimeError(
                "RORA_FAST_BACKEND=triton but the fused kernels cannot take these "
                f"inputs (x {tuple(x.shape)} {x.dtype} on {x.device}, weight "
                f"{tuple(weight.shape)}); use backend 'auto' to fall back to the reference")
    return _reference(x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed, lora_p)


def _reference(x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed, lora_p):
    """The reference backend: :func:`_rora_linear_small` for small frozen weights,
    :class:`RoraLinearFunction` for the rest."""
    if _small_frozen(weight, p, seed):
        return _rora_linear_small(x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed,
                                  lora_p)
    return RoraLinearFunction.apply(x, x_lora, weight, bias, lora_A, lora_B,
                                    scaling, p, seed, lora_p)
