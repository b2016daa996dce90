"""What RoRA knows about the module it wraps (the *base*): its kind, its dimensions, its
dense weight and how it is quantized. Every layer class, the PEFT layers, saving and
loading ask here; nothing here knows a RoRA layer.

Kinds (:func:`base_kind`, decided from the class hierarchy by name, so that a quantized
layer is recognised, and a clear install error given, without importing bitsandbytes):

* ``"linear"``: ``nn.Linear``, weight ``(out, in)``;
* ``"conv1d"``: transformers' GPT-2 ``Conv1D``, weight stored ``(in, out)``;
* ``"4bit"``: bitsandbytes ``Linear4bit`` (NF4/FP4, double quantization on or off);
* ``"8bit"``: bitsandbytes ``Linear8bitLt``.

:func:`dense_weight` is the one place a quantized base is dequantized (training, eval,
SVD bases, merging); :func:`quant_descriptor` is what an adapter saved on a quantized base
records and :func:`check_quant_descriptor` compares on load.

Each kind has a strategy (:class:`Base`, one instance per kind in :data:`BASES`): its
dims, its dense weight for a call, its compute dtype, the one-pass masked weight where it
has a kernel, its descriptor and how a merged weight is stored back. Every RoRA layer
(:class:`rora_fast.RoraLinear`, its Conv1D and quantized subclasses, the PEFT layers) runs
its one forward (:func:`rora_fast.forward.layer_forward`) and its merge on it.

A new kind of base (say an fp8 weight): its recognition in :func:`base_kind` and a
:class:`Base` subclass (dequantization, compute dtype, target checks, merge; ``child =
True`` to be kept as the layer's ``base_layer`` like a bitsandbytes layer, which
:class:`rora_fast.quantized.QuantRoraLinear` then wraps) in :data:`BASES` here; its row in
:data:`rora_fast.kinds.KINDS` (which layer classes adapt it) and its PEFT layer class in
:mod:`rora_fast.peft_integration`; plus its tests.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from . import reference as ref
from . import validation as V

__all__ = ["QUANT_INSTALL_HINT", "require_bitsandbytes", "base_kind", "base_dims",
           "dense_weight", "quant_descriptor", "check_quant_descriptor",
           "check_saved_quantization", "cpu_repack_switches", "Base", "LinearBase",
           "Conv1DBase", "BnbBase", "Bnb4bitBase", "Bnb8bitBase", "BASES", "base_for",
           "base_for_kind", "dequantize_4bit_masked"]

QUANT_INSTALL_HINT = "pip install 'rora-fast[quant]'"


def require_bitsandbytes():
    """Import bitsandbytes or raise an ImportError that says how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("RoRA on a quantized (bitsandbytes 4-bit/8-bit) layer needs the "
                          f"bitsandbytes package: {QUANT_INSTALL_HINT}") from e
    return bnb


def _mro_names(module) -> list:
    return [(c.__module__ or "", c.__name__) for c in type(module).__mro__]


def base_kind(module: nn.Module) -> Optional[str]:
    """``"4bit"``, ``"8bit"``, ``"conv1d"``, ``"linear"`` or ``None`` (not a RoRA target).

    Decided from the class hierarchy by name, without importing bitsandbytes (so that a
    quantized layer is recognised, and a clear install error given, even when bitsandbytes
    itself cannot be imported)."""
    names = _mro_names(module)
    for mod, name in names:
        if mod.startswith("bitsandbytes"):
            if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
                return "4bit"
            if name == "Linear8bitLt":
                return "8bit"
    for mod, name in names:
        if name == "Conv1D" and mod.startswith("transformers"):
            return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def cpu_repack_switches(model: nn.Module) -> list:
    """The switches that let bitsandbytes repack the model's 4-bit weights at an eval
    forward: :func:`rora_fast.apply_rora` sets them False.

    On CPUs with AVX512-BF16, bitsandbytes (>= 0.49) switches a ``Linear4bit`` weight to a
    CPU inference layout at its first no-grad eval forward: the layer then computes with
    bfloat16 absmax scales and activations, and converting back (when the model is saved)
    requantizes the scales. In a model being fine-tuned that changes the frozen layers
    RoRA does not wrap under the next training step (train -> evaluate -> train loops).
    ``support_avx512bf16_for_cpu`` is the per-layer switch bitsandbytes reads for it.
    Returns ``(layer, attribute)`` for every 4-bit layer that has it (none where
    bitsandbytes has no such switch); the layers RoRA wraps are never called through
    bitsandbytes' forward anyway."""
    return [(m, "support_avx512bf16_for_cpu") for m in model.modules()
            if base_kind(m) == "4bit" and hasattr(m, "support_avx512bf16_for_cpu")]


def base_dims(module: nn.Module) -> tuple:
    """``(in_features, out_features)`` of a base (a ``Conv1D`` stores ``nx``/``nf`` and an
    ``(in, out)`` weight)."""
    return base_for(module).dims(module)


def check_saved_quantization(model: nn.Module, names, meta: dict) -> None:
    """Before loading adapters: every layer's base must be quantized as when they were
    saved (``meta[name]["quantization"]``, absent for a dense base)."""
    for n in names:
        if n in meta:
            check_quant_descriptor(n, model.get_submodule(n), meta[n].get("quantization"))


# ---------------------------------------------------------------------- bitsandbytes
def _cpu_packed(qs) -> bool:
    """Whether bitsandbytes has repacked a 4-bit weight into its CPU inference layout.

    bitsandbytes >= 0.49 does so at the first no-grad eval forward of a ``Linear4bit`` on a
    CPU with AVX512-BF16 (``_convert_weight_packed_for_cpu``): ``weight`` becomes
    ``(out, in/2)`` with the rows interleaved in blocks of 32, the absmax scales are
    dequantized (double quantization folded) into a bfloat16 ``(in/blocksize, out)``
    matrix and ``quant_state.dtype`` becomes bfloat16. ``dequantize_4bit`` does not know
    that layout (it returns wrong values), so :func:`dense_weight` reads it itself."""
    return bool(getattr(qs, "packing_format_for_cpu", False))


def _dequantize_cpu_packed(packed: torch.Tensor, qs, block_n: int = 32) -> torch.Tensor:
    """The float32 ``(out, in)`` weight of a 4-bit weight in bitsandbytes' CPU packed
    layout (see :func:`_cpu_packed`): code-book value of each nibble times its block's
    absmax, exactly what bitsandbytes' packed matmul multiplies by (in float32)."""
    n_out, n_in = (int(d) for d in qs.shape)
    half = n_in // 2
    if (packed.dtype != torch.uint8 or tuple(packed.shape) != (n_out, half)
            or n_out % block_n or n_in % qs.blocksize):
        raise ValueError(f"unrecognised bitsandbytes CPU-packed 4-bit weight: "
                         f"{tuple(packed.shape)} {packed.dtype} for a {n_out}x{n_in} layer")
    # the inverse of the packing permutation: 32 low nibbles then 32 high nibbles per
    # 32-byte group, groups ordered (row block, column pair, row in block)
    p = packed.reshape(-1, block_n)
    codes = torch.cat([p & 0xF, p >> 4], dim=-1)
    codes = codes.reshape(n_out // block_n, half, block_n, 2).transpose(1, 2)
    codes = codes.reshape(n_out, n_in).long()
    scale = qs.absmax.t().to(torch.float32)                  # (out, in / blocksize)
    W = qs.code.to(torch.float32)[codes].view(n_out, n_in // qs.blocksize, qs.blocksize)
    return (W * scale.unsqueeze(-1)).view(n_out, n_in)


def dense_weight(base: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense ``(out, in)`` weight of a bitsandbytes 4-bit or 8-bit base: the one place
    a quantized base is dequantized (training, eval, SVD bases, merging all read it).

    It reads the weight in whatever layout bitsandbytes keeps it, including the CPU
    inference layout bitsandbytes switches a 4-bit weight to at an eval forward
    (:func:`_cpu_packed`). ``dtype`` None: the dtype the layer was quantized from."""
    bnb = require_bitsandbytes()
    kind = base_kind(base)
    w = base.weight
    if kind == "4bit":
        qs = getattr(w, "quant_state", None)
        if qs is None:
            raise ValueError("the Linear4bit weight is not quantized yet (no quant_state): "
                             "move the layer to its device (bitsandbytes quantizes on .to())")
        if _cpu_packed(qs):
            W = _dequantize_cpu_packed(w.data, qs)
            if dtype is None:  # the dtype it was quantized from, as dequantize_4bit's
                dtype = getattr(qs, "original_dtype", None) or torch.float32
            return W.to(dtype)
        W = bnb.functional.dequantize_4bit(w.data, qs)
    elif kind == "8bit":
        if w.dtype != torch.int8:
            raise ValueError("the Linear8bitLt weight is not quantized (has_fp16_weights=True "
                             "or not yet moved to its device)")
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(base, "state", None), "SCB", None)
        if scb is None:
            raise ValueError("the Linear8bitLt weight has no SCB scales")
        W = bnb.functional.int8_vectorwise_dequant(w.data, scb)
    else:
        raise TypeError(f"not a bitsandbytes 4-bit/8-bit linear: {type(base).__name__}")
    return W if dtype is None else W.to(dtype)


def quant_descriptor(layer: nn.Module) -> Optional[dict]:
    """How a layer's base is quantized (``None`` for a dense base): saved with an adapter
    so that loading it onto a base quantized differently is an error.

    It holds what the user's ``BitsAndBytesConfig`` decides (quant type, block size,
    double quantization: the ``Params4bit`` attributes bitsandbytes sets from it, also
    for pre-quantized checkpoints), never the quant state, which bitsandbytes rewrites at
    run time (its CPU eval layout folds the double quantization, makes the dtype
    bfloat16)."""
    base = getattr(layer, "base_layer", layer)
    kind = base_kind(base)
    return None if kind is None else BASES[kind].descriptor(base)


def check_quant_descriptor(name: str, layer: nn.Module, saved: Optional[dict]) -> None:
    """Raise a ValueError when an adapter saved on one base quantization is loaded onto a
    layer quantized differently (or dense vs quantized). Keys a save has beyond
    :func:`quant_descriptor`'s (``quant_dtype``, written before 2026-12) are ignored."""
    have = quant_descriptor(layer)
    same = (have is None and saved is None) or (
        have is not None and isinstance(saved, dict)
        and all(saved.get(k) == v for k, v in have.items()))
    if not same:
        def show(d):
            return "a dense (unquantized) base" if d is None else \
                ", ".join(f"{k}={v}" for k, v in d.items())
        raise ValueError(f"{name}: the adapter was trained on {show(saved)}, but the model's "
                         f"layer has {show(have)}; load the model quantized the same way "
                         "(same BitsAndBytesConfig)")


# ---------------------------------------------------------------------- strategies
class Base:
    """How a RoRA layer uses one kind of base: the strategy every layer class (and every
    PEFT layer) runs its one forward (:func:`rora_fast.forward.layer_forward`) and its merge
    on. Stateless: each method takes the module that holds the weight and bias (the
    *holder*: the layer itself for a dense :class:`rora_fast.RoraLinear`, the wrapped
    module otherwise). One instance per kind, :func:`base_for`.

    A new kind of base (say an fp8 weight) is one subclass here, its entry in
    :data:`BASES`, its recognition in :func:`base_kind` and its row in
    :data:`rora_fast.kinds.KINDS`."""

    kind: str = ""
    #: the dense weight is rebuilt for backward instead of being saved (quantized bases)
    recompute = False
    #: an input in another dtype than the compute dtype is an error (as for nn.Linear)
    strict = False
    #: kept as the layer's child module ``base_layer`` (its state-dict entries its own,
    #: under ``base_layer.``), not shared as the layer's own ``weight``/``bias``
    child = False

    def __reduce__(self):  # copies (deepcopy, pickle) are the same singleton
        return (base_for_kind, (self.kind,))

    def __repr__(self):
        return f"<rora_fast base {self.kind!r}>"

    def dims(self, module: nn.Module) -> tuple:
        """``(in_features, out_features)``."""
        return int(module.in_features), int(module.out_features)

    def dense_weight(self, holder: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The dense ``(out, in)`` weight in ``dtype`` for one call."""
        raise NotImplementedError

    def compute_dtype(self, holder: nn.Module, x: torch.Tensor) -> torch.dtype:
        """The dtype the layer computes in for input ``x`` outside autocast."""
        return holder.weight.dtype

    def fixed_compute_dtype(self, module: nn.Module) -> Optional[torch.dtype]:
        """The compute dtype known before any call (None: it follows the input)."""
        return module.weight.dtype

    def check_target(self, module: nn.Module, name: str, variant=None) -> None:
        """Refuse, naming the module, a base this kind cannot adapt with this variant (a
        :class:`rora_fast.variants.Variant`; None: LoRA's start)."""
        w = module.weight
        if w.dtype in (torch.uint8, torch.int8):
            raise TypeError(f"{name!r}: the weight is {w.dtype}, a quantized layer that is not "
                            "a bitsandbytes Linear4bit/Linear8bitLt (RoRA supports "
                            f"bitsandbytes bases: {QUANT_INSTALL_HINT})")
        V.check_base_weight(self.dense_weight(module, w.dtype).detach(), name=name)

    def masked_weight_fn(self, holder: nn.Module, x: torch.Tensor, dtype: torch.dtype):
        """``(seed, p) -> (M ⊙ W)/(1−p)`` in one pass where the base has such a kernel for
        this input, else None (the op masks the dense weight itself)."""
        return None

    def descriptor(self, holder: nn.Module) -> Optional[dict]:
        """How the base is quantized, as saved with an adapter (None: dense)."""
        return None

    def store_merged(self, holder: nn.Module, merged: torch.Tensor) -> nn.Module:
        """The plain module computing ``x mergedᵀ + b`` (``merged``: the ``(out, in)``
        merged weight in float64), built from the holder's storage."""
        raise NotImplementedError


class LinearBase(Base):
    """``nn.Linear``: weight ``(out, in)``."""

    kind = "linear"
    strict = True

    def dense_weight(self, holder, dtype):
        w = holder.weight
        return w if w.dtype == dtype else w.to(dtype)

    def store_merged(self, holder, merged):
        """In place: the same storage as before, rounded once to its dtype."""
        with torch.no_grad():
            holder.weight.copy_(merged)
        n_out, n_in = holder.weight.shape
        lin = nn.Linear(n_in, n_out, bias=holder.bias is not None, device="meta")
        lin.weight = holder.weight
        lin.bias = holder.bias
        return lin


class Conv1DBase(Base):
    """transformers' GPT-2 ``Conv1D``: weight stored ``(in, out)`` (the holder: the Conv1D
    itself under PEFT, the ``(in, out)`` view of a :class:`rora_fast.RoraConv1D`'s
    weight)."""

    kind = "conv1d"
    strict = True  # as Conv1D's own addmm

    def dims(self, module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)

    def dense_weight(self, holder, dtype):
        w = holder.weight.t()
        return w if w.dtype == dtype else w.to(dtype)

    def store_merged(self, holder, merged):
        with torch.no_grad():
            holder.weight.copy_(merged.t())
        return holder


class BnbBase(Base):
    """bitsandbytes ``Linear4bit``/``Linear8bitLt``, kept quantized: each call dequantizes
    (:func:`dense_weight`), backward dequantizes again instead of keeping the dense weight,
    and the layer computes in bitsandbytes' ``compute_dtype`` (4-bit, when set) or the
    input's dtype, as bitsandbytes does."""

    recompute = True
    child = True

    def dense_weight(self, holder, dtype):
        return dense_weight(holder, dtype)

    def fixed_compute_dtype(self, module):
        return getattr(module, "compute_dtype", None)

    def check_target(self, module, name, variant=None):
        """bitsandbytes importable, no variant that needs a dense base (PiSSA/OLoRA rewrite
        the base into a residual, which would have to be requantized; DoRA), the weight
        quantized."""
        require_bitsandbytes()
        if variant is not None and variant.needs_dense_base:
            raise NotImplementedError(f"{name!r}: {variant.label} is not supported on a "
                                      "quantized (bitsandbytes) base (PiSSA/OLoRA rewrite the "
                                      "base, DoRA is not implemented for it); use a bf16 base")
        w = module.weight
        if (self.kind == "4bit" and getattr(w, "quant_state", None) is None) or \
                (self.kind == "8bit" and w.dtype != torch.int8):
            raise ValueError(f"{name!r}: the bitsandbytes weight is not quantized yet "
                             "(load the model with BitsAndBytesConfig or move it to its device)")

    def compute_dtype(self, holder, x):
        cd = getattr(holder, "compute_dtype", None)
        return cd if cd is not None else x.dtype



class Bnb4bitBase(BnbBase):
    kind = "4bit"

    def descriptor(self, holder):
        w = holder.weight
        return {"kind": "bnb-4bit", "quant_type": str(w.quant_type),
                "blocksize": int(w.blocksize), "double_quant": bool(w.compress_statistics)}

    def masked_weight_fn(self, holder, x, dtype):
        """The one-pass dequantize+mask kernel (``rora_fast.kernels.nf4``): opt-in with
        ``RORA_FAST_NF4_KERNEL=1``, on CUDA (or on CPU tensors under
        ``TRITON_INTERPRET=1``, for tests); bit-identical to dequantize then mask."""
        if os.environ.get("RORA_FAST_NF4_KERNEL", "0") != "1":
            return None
        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            return None
        return lambda seed, p: dequantize_4bit_masked(holder, dtype, seed, p)

    def store_merged(self, holder, merged):
        """Requantized with the same settings (what PEFT's ``merge_and_unload`` does)."""
        bnb = require_bitsandbytes()
        w = holder.weight
        kw = {k: v for k, v in w.__dict__.items()
              if not k.startswith("_") and k not in ("data", "quant_state", "module")}
        kw["bnb_quantized"] = False
        kw["requires_grad"] = False
        qs = w.quant_state  # (original_dtype: set when bitsandbytes repacked it)
        dtype = getattr(qs, "original_dtype", None) or qs.dtype
        new = bnb.nn.Params4bit(merged.to(torch.float32).to(dtype).cpu(), **kw).to(w.device)
        new.module = holder
        holder.weight = new
        return holder


class Bnb8bitBase(BnbBase):
    kind = "8bit"

    def descriptor(self, holder):
        return {"kind": "bnb-8bit"}

    def store_merged(self, holder, merged):
        bnb = require_bitsandbytes()
        dev = holder.weight.device
        holder.weight = bnb.nn.Int8Params(merged.to(torch.float32).to(torch.float16).cpu(),
                                          requires_grad=False,
                                          has_fp16_weights=False).to(dev)
        state = getattr(holder, "state", None)
        if state is not None:
            state.CB = None
            state.SCB = None
        return holder


#: one strategy per kind of base
BASES = {b.kind: b for b in (LinearBase(), Conv1DBase(), Bnb4bitBase(), Bnb8bitBase())}


def base_for_kind(kind: str) -> Base:
    try:
        return BASES[kind]
    except KeyError:
        raise TypeError(f"no RoRA base of kind {kind!r} (kinds: {sorted(BASES)})") from None


def base_for(module: nn.Module) -> Base:
    """The strategy for ``module`` (TypeError for a module RoRA cannot adapt)."""
    kind = base_kind(module)
    if kind is None:
        raise TypeError(f"RoRA adapts nn.Linear, bitsandbytes Linear4bit/Linear8bitLt and "
                        f"transformers Conv1D layers, got {type(module).__name__}")
    return BASES[kind]


def dequantize_4bit_masked(base: nn.Module, dtype: torch.dtype, seed: int,
                           p: float) -> torch.Tensor:
    """``(M ⊙ W) / (1 - p)`` of a bitsandbytes 4-bit layer in one Triton kernel
    (:func:`rora_fast.kernels.nf4.dequantize_4bit_masked`); equal to
    ``reference.masked_weight(dense_weight(base, dtype), seed, p)``."""
    from .kernels.nf4 import dequantize_4bit_masked as kernel  # optional: needs triton

    w = base.weight
    qs = w.quant_state
    if _cpu_packed(qs):  # bitsandbytes' CPU layout (the kernel reads the standard one)
        return ref.masked_weight(dense_weight(base, dtype), seed, p)
    packed = w.data.reshape(-1).view(torch.uint8)  # any bnb_4bit_quant_storage dtype
    kw = dict(nested_code=qs.state2.code, nested_absmax=qs.state2.absmax,
              nested_blocksize=qs.state2.blocksize, offset=qs.offset) if qs.nested else {}
    if qs.dtype != dtype:  # dense_weight rounds to the quant dtype first, then casts
        W = kernel(packed, qs.code, qs.absmax, qs.blocksize, qs.shape,
                   out_dtype=qs.dtype, **kw).to(dtype)
        return ref.masked_weight(W, seed, p)
    return kernel(packed, qs.code, qs.absmax, qs.blocksize, qs.shape, seed=seed, p=p,
                  out_dtype=dtype, **kw)
