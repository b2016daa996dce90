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

A new kind of base (say an fp8 weight) adds its recognition to :func:`base_kind`, its
dequantization to :func:`dense_weight` and its descriptor here, and its layer class
(construction, merge) beside :mod:`rora_fast.quantized`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["QUANT_INSTALL_HINT", "require_bitsandbytes", "base_kind", "base_dims",
           "dense_weight", "quant_descriptor", "check_quant_descriptor",
           "check_saved_quantization", "cpu_repack_switches"]

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
    if base_kind(module) == "conv1d":
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return int(module.in_features), int(module.out_features)


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
    if kind == "4bit":
        w = base.weight
        return {"kind": "bnb-4bit", "quant_type": str(w.quant_type),
                "blocksize": int(w.blocksize), "double_quant": bool(w.compress_statistics)}
    if kind == "8bit":
        return {"kind": "bnb-8bit"}
    return None


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
