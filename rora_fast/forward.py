"""The one forward of every RoRA layer: :class:`rora_fast.RoraLinear` and its Conv1D and
quantized subclasses, and the PEFT layers of :mod:`rora_fast.peft_integration`.

:func:`layer_forward` takes the layer's parts as arguments: its *base* (a
:class:`rora_fast.bases.Base` strategy and the module holding the weight), its adapter
factors and scale, the weight-dropout ``p``, the LoRA input dropout module and its
*variant* (:mod:`rora_fast.variants`). It decides the compute dtype (autocast's, else the
base's), gathers the call's parts in one :class:`LayerCall`, hands it to the variant's
``output`` (:func:`lora_output` or, for DoRA, :func:`dora_layer_output`: the eval output
or the RoRA training op), and casts back. The training
op itself is :func:`training_forward`: the call's mask seed, the forward count of the
penalty hook, and :func:`rora_fast.functional.rora_linear`. A base whose dense weight is not kept between
calls (bitsandbytes) has it rebuilt for backward instead of saved
(:func:`saved_as_recompute`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Optional

import torch
from torch import nn

from . import functional as F_rora
from . import penalty as _penalty

__all__ = ["layer_forward", "LayerCall", "lora_output", "dora_layer_output", "training_forward",
           "count_training_forward", "draw_seed", "saved_as_recompute", "dora_output",
           "weight_norm"]

_SEED_BUFFER = threading.local()


def draw_seed(device: Optional[torch.device] = None):
    """The seed of one call's masks. Eager: an int from torch's default CPU generator (no
    device work, no sync). Under ``torch.compile``: a one-element int64 tensor drawn in the
    graph (no host read, no graph break; see :mod:`rora_fast.functional`), on ``device``
    when that is a CUDA device (the weight's: then the graph has no CPU op and CUDA graphs
    can capture it; the seed comes from that device's generator, so compiled and eager
    masks differ on CUDA), else from the CPU generator like eager."""
    if torch.compiler.is_compiling():
        dev = device if device is not None and device.type == "cuda" else "cpu"
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=dev)
    # Eager: the same draw (``randint`` is ``random_`` on a fresh tensor) into a
    # per-thread buffer, saving the allocation and argument parsing per call; read
    # with ``tolist`` (a plain memory read, where ``item`` dispatches one more op).
    buf = getattr(_SEED_BUFFER, "t", None)
    if buf is None:
        buf = _SEED_BUFFER.t = torch.empty(1, dtype=torch.int64)
    return buf.random_(0, 2**62).tolist()[0]


def count_training_forward(layer: nn.Module) -> None:
    """Count a training forward of a RoRA layer since the last optimizer step; at
    :data:`rora_fast.penalty.WARN_AFTER_FORWARDS` the penalty hook warns (once) that no
    optimizer step holds the layer's adapters."""
    if torch.compiler.is_compiling():
        return
    d = layer.__dict__  # (nn.Module.__setattr__ is slow)
    n = d["_penalty_forwards"] = d.get("_penalty_forwards", 0) + 1
    if n == _penalty.WARN_AFTER_FORWARDS:
        _penalty._warn_no_step(layer)


class _RecomputeSaved:
    """Token saved by autograd instead of a dense weight; unpacked by recomputing it."""

    __slots__ = ("fn", "size", "stride", "offset")

    def __init__(self, fn, t: torch.Tensor):
        self.fn = fn
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


@contextlib.contextmanager
def saved_as_recompute(owner, recompute: Callable[[], torch.Tensor]):
    """While active, any tensor autograd saves that shares storage with the dense weight
    of this call (``owner.__dict__["_rora_dense"]``, set by :func:`training_forward`) is
    saved as a token, and rebuilt by ``recompute()`` when backward needs it: what lives
    between forward and backward is then the quantized weight only."""
    def pack(t):
        W = owner.__dict__.get("_rora_dense")
        if (W is not None and t.device == W.device and t.dtype == W.dtype
                and t.untyped_storage().data_ptr() == W.untyped_storage().data_ptr()):
            return _RecomputeSaved(recompute, t)
        return t

    def unpack(obj):
        if isinstance(obj, _RecomputeSaved):
            W = obj.fn()
            return W.as_strided(obj.size, obj.stride, obj.offset)
        return obj

    owner.__dict__["_rora_dense"] = None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        owner.__dict__["_rora_dense"] = None


class LayerCall:
    """One call of a RoRA layer, as every step of its forward reads it: the layer, its
    *base* strategy and the module holding the weight, the adapter factors ``A``/``B``
    and scale, the weight-dropout ``p``, the LoRA input dropout module, train/eval, the
    backend and the compute dtype. Built once per call by :func:`layer_forward` and
    handed on whole (the variant's ``output``, :func:`training_forward`), instead of
    the same dozen values passed along positionally at every step."""

    __slots__ = ("layer", "base", "holder", "A", "B", "scaling", "p", "lora_dropout",
                 "training", "backend", "cdtype")

    def __init__(self, layer, base, holder, A, B, scaling, p, lora_dropout, training,
                 backend, cdtype):
        self.layer, self.base, self.holder = layer, base, holder
        self.A, self.B, self.scaling, self.p = A, B, scaling, p
        self.lora_dropout, self.training, self.backend = lora_dropout, training, backend
        self.cdtype = cdtype

    def dense_weight(self) -> torch.Tensor:
        """The base's dense weight in the compute dtype."""
        return self.base.dense_weight(self.holder, self.cdtype)


def training_forward(call: LayerCall, x: torch.Tensor, b: Optional[torch.Tensor],
                     A: torch.Tensor, B: torch.Tensor, need_x_lora: bool = False):
    """The RoRA training op of one call, all tensors in the compute dtype (``A``, ``B``,
    ``b``: the call's factors and bias cast to it):
    ``x (M ⊙ W)ᵀ/(1−p) + b + s x̃ AᵀBᵀ``.

    The base gives the dense weight ``W`` (:meth:`LayerCall.dense_weight`) or, where it
    has one (a 4-bit base's one-pass dequantize+mask kernel), ``(M ⊙ W)/(1−p)`` directly
    (``masked_weight_fn``); the op is then called with ``p = 0`` on it (bit-identical).
    A base with ``recompute`` has that weight rebuilt for backward instead of saved.

    The LoRA input ``x̃``: an ``nn.Dropout`` (what RoRA and PEFT layers hold) is drawn by
    the op itself from the call's seed (:func:`rora_fast.reference.lora_input`, the
    ``nn.Dropout`` distribution; nothing of ``x̃`` is kept for backward), or, with
    ``need_x_lora`` (DoRA needs ``x̃`` itself), returned as a differentiable tensor by
    :func:`rora_fast.functional.lora_dropout_input`; ``nn.Identity`` gives ``x̃ = x``;
    any other module is called. Returns ``(y, x̃ or None, seed, W)``.

    The op below (:func:`rora_fast.functional.rora_linear`) takes its tensors
    positionally, like ``torch.nn.functional.linear``: it is public, and the autograd
    Function under it must receive every tensor it differentiates as an argument."""
    lora_dropout, p, base = call.lora_dropout, call.p, call.base
    kind = type(lora_dropout)
    x_lora = None
    lora_p = 0.0
    if kind is nn.Dropout:
        if lora_dropout.training:
            lora_p = lora_dropout.p
    elif kind is not nn.Identity:
        x_lora = lora_dropout(x)
    masked_weight = base.masked_weight_fn(call.holder, x, call.cdtype)
    if masked_weight is not None and p:
        seed = draw_seed()
        get_w = _bind_masked(masked_weight, seed, p)
        p = 0.0
    else:
        get_w = call.dense_weight
        seed = draw_seed(x.device) if p or lora_p else 0
    if lora_p and need_x_lora:
        x_lora, lora_p = F_rora.lora_dropout_input(x, seed, lora_p), 0.0
    layer = call.layer
    count_training_forward(layer)
    if not base.recompute:
        W = get_w()
        y = F_rora.rora_linear(x, x_lora, W, b, A, B, call.scaling, p, seed,
                               backend=call.backend, lora_p=lora_p)
        return y, x_lora, seed, W
    with saved_as_recompute(layer, get_w):
        W = layer.__dict__["_rora_dense"] = get_w()  # recognised by the saved-tensor hook
        y = F_rora.rora_linear(x, x_lora, W, b, A, B, call.scaling, p, seed,
                               backend=call.backend, lora_p=lora_p)
    return y, x_lora, seed, W


def _bind_masked(masked_weight, seed, p):
    return lambda: masked_weight(seed, p)


def weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Row norms of ``W + ΔW`` (DoRA's ‖·‖_c for an out x in weight)."""
    return torch.linalg.norm(weight.to(delta.dtype) + delta, dim=1)


def dora_output(call: LayerCall, y, b, x, x_lora, W, A, B, magnitude, p, seed):
    """DoRA on top of ``y = x Ŵᵀ + s x̃ AᵀBᵀ`` (no bias), as PEFT's DoRA layer:
    ``g = m / ‖W + s·BA‖_row`` (norm detached, undropped ``W``), and
    ``out = y + (g − 1) ⊙ (x̃ Ŵᵀ + s x̃ AᵀBᵀ) + b``; when ``x̃`` is ``x`` this is
    ``g ⊙ y + b``. In eval, ``p = 0``."""
    scaling, cdtype = call.scaling, call.cdtype
    with torch.no_grad():
        norm = weight_norm(W, scaling * (B @ A)).to(cdtype)
    g = magnitude.to(cdtype) / norm
    if x_lora is x:
        out = g * y
    else:
        inner = F_rora.rora_linear(x_lora, None, W, None, A, B, scaling, p, seed,
                                   backend=call.backend)
        out = y + (g - 1) * inner
    return out + b if b is not None else out


def _cast(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def layer_forward(layer: nn.Module, base, holder: nn.Module, x: torch.Tensor,
                  A: torch.Tensor, B: torch.Tensor, scaling: float, p: float,
                  lora_dropout: nn.Module, *, training: bool, variant,
                  strict: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """The forward of a RoRA layer: ``base`` (a :class:`rora_fast.bases.Base`) reads the
    weight and bias of ``holder`` (the layer itself for a dense ``RoraLinear``, the wrapped
    module otherwise); ``variant`` (a :class:`rora_fast.variants.Variant`) gives the output
    (:func:`lora_output`, or DoRA's :func:`dora_layer_output`) of the call
    (:class:`LayerCall`).

    Compute dtype: autocast's when autocast is on (the output stays in it), else the
    base's (:meth:`~rora_fast.bases.Base.compute_dtype`); the input is cast to it and the
    output cast back to the input's dtype, except with ``strict`` (a dense
    ``RoraLinear``, like ``nn.Linear``), where an input of another dtype is an error."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        cdtype = torch.get_autocast_dtype(dev)
        call = LayerCall(layer, base, holder, A, B, scaling, p, lora_dropout, training,
                         backend, cdtype)
        with torch.autocast(dev, enabled=False):
            return variant.output(call, _cast(x, cdtype))
    cdtype = base.compute_dtype(holder, x)
    in_dtype = x.dtype
    if in_dtype != cdtype:
        if not x.is_floating_point():
            raise TypeError(f"unsupported input dtype {in_dtype}; expected float32, float16, "
                            "bfloat16 or float64")
        if strict:
            raise TypeError(f"input dtype {in_dtype} does not match the layer's dtype "
                            f"{cdtype} (cast the input or use torch.autocast)")
        x = x.to(cdtype)
    y = variant.output(LayerCall(layer, base, holder, A, B, scaling, p, lora_dropout,
                                 training, backend, cdtype), x)
    return y if y.dtype == in_dtype else y.to(in_dtype)


def lora_output(call: LayerCall, x: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ + b + s x̃ AᵀBᵀ`` in the compute dtype (in training with the masked ``W``):
    the output of every variant without a magnitude."""
    cdtype = call.cdtype
    b = _cast(call.holder.bias, cdtype)
    A, B = _cast(call.A, cdtype), _cast(call.B, cdtype)
    if not call.training:
        lora = call.scaling * ((x @ A.t()) @ B.t())
        return nn.functional.linear(x, call.dense_weight(), b) + lora
    return training_forward(call, x, b, A, B)[0]


def dora_layer_output(call: LayerCall, x: torch.Tensor, magnitude) -> torch.Tensor:
    """DoRA's output (:func:`dora_output`) with the magnitude ``magnitude``."""
    cdtype = call.cdtype
    b = _cast(call.holder.bias, cdtype)
    A, B = _cast(call.A, cdtype), _cast(call.B, cdtype)
    if not call.training:
        lora = call.scaling * ((x @ A.t()) @ B.t())
        W = call.dense_weight()
        y = nn.functional.linear(x, W) + lora
        return dora_output(call, y, b, x, x, W, A, B, magnitude, 0.0, 0)
    y, x_lora, seed, W = training_forward(call, x, None, A, B, need_x_lora=True)
    return dora_output(call, y, b, x, x if x_lora is None else x_lora, W, A, B, magnitude,
                       call.p, seed)
