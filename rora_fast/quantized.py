"""RoRA over quantized bases (bitsandbytes ``Linear4bit``/``Linear8bitLt``), and the
recognition of non-dense bases by class name (:func:`base_kind`).

Quantized bases (QLoRA-style)
-----------------------------
:class:`QuantRoraLinear` keeps the bitsandbytes layer as its ``base_layer`` child, so the
weight stays quantized in memory (its state-dict entries are bitsandbytes' own, under
``base_layer.``, as in PEFT). No dense copy of ``W`` is kept between calls:

* training: each call dequantizes ``W`` (bitsandbytes' ``dequantize_4bit`` /
  ``int8_vectorwise_dequant``) in the compute dtype and hands it to the same RoRA op as a
  dense base (:func:`rora_fast.functional.rora_linear`), which applies the weight mask and
  ``1/(1-p)`` with :func:`rora_fast.reference.masked_weight` (or the fused kernels on
  CUDA). The dense ``W`` that op saves for backward is replaced, through
  ``torch.autograd.graph.saved_tensors_hooks``, by a token; backward dequantizes again
  and regenerates the mask from the seed. So what lives between forward and backward is
  the quantized weight only (plus the token), like bitsandbytes' own ``MatMul4Bit``.
  With ``RORA_FAST_NF4_KERNEL=1`` a 4-bit base takes the masked weight from one Triton
  kernel (``rora_fast.kernels.nf4``: dequantize + mask in one pass, CUDA), bit-identical.
* eval: ``x Wᵀ + b`` on the same dequantized ``W`` plus the adapter, so eval equals
  training without dropout exactly. bitsandbytes' own forward is not called: on the CPU
  it rewrites the weight into an inference layout at the first eval call (which would
  change the layer under the next training step) and it fails on output sizes that are
  not multiples of 32. (PEFT's QLoRA layer calls it: its outputs differ from ours by
  bitsandbytes' rounding of the activations.) :func:`dequantize_base` reads a weight
  bitsandbytes has already repacked, so a model evaluated before wrapping works too.
* SVD bases and ``σ_max(W_pre)`` come from the dequantized ``W_pre`` and are cached on
  disk like dense ones: the cache key is the fingerprint of the dequantized matrix, which
  is a deterministic function of the quantized bytes and the quant state (absmax blocks,
  code book, nested absmax), so it is exact — equal quantized layers share an entry, and
  two quantizations giving different dequantized values never do.
* merging (:func:`rora_fast.merge_rora`): dequantize, add ``s·BA`` (float32), requantize
  with the same settings — what PEFT's ``merge_and_unload`` does — with PEFT's warning
  that rounding changes the outputs slightly.
* not supported on quantized bases (clear errors): ``init="pissa"``/``"olora"`` (they
  rewrite the base weight into a residual) and ``use_dora=True``.

Without bitsandbytes, a quantized layer raises ``ImportError`` telling to
``pip install 'rora-fast[quant]'``.

The GPT-2 ``Conv1D`` layer class is in :mod:`rora_fast.conv1d`; which layer class wraps
which base, and the per-target checks, in :mod:`rora_fast.targets`.

Through PEFT, :func:`rora_fast.register_rora` maps bitsandbytes and ``Conv1D`` bases to
the layer classes of :func:`rora_fast.peft_integration.peft_custom_modules`, built on the
helpers here (:func:`dequantize_base`, the saved-weight recompute).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from . import reference as ref
from .layer import RoraLinear

__all__ = ["QUANT_INSTALL_HINT", "require_bitsandbytes", "base_kind", "cpu_repack_switches",
           "check_saved_quantization", "QuantRoraLinear", "dequantize_base",
           "dequantize_4bit_masked_base",
           "quant_descriptor", "check_quant_descriptor"]

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
    that layout (it returns wrong values), so :func:`dequantize_base` reads it itself."""
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


def dequantize_base(base: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense ``(out, in)`` weight of a bitsandbytes 4-bit or 8-bit linear: the one
    place a quantized base is dequantized (training, eval, bases, merging all read it).

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


def dequantize_4bit_masked_base(base: nn.Module, dtype: torch.dtype, seed: int,
                                p: float) -> torch.Tensor:
    """``(M ⊙ W) / (1 - p)`` of a bitsandbytes 4-bit layer in one Triton kernel
    (:func:`rora_fast.kernels.nf4.dequantize_4bit_masked`); equal to
    ``reference.masked_weight(dequantize_base(base, dtype), seed, p)``."""
    from .kernels.nf4 import dequantize_4bit_masked

    w = base.weight
    qs = w.quant_state
    if _cpu_packed(qs):  # bitsandbytes' CPU layout (the kernel reads the standard one)
        return ref.masked_weight(dequantize_base(base, dtype), seed, p)
    packed = w.data.reshape(-1).view(torch.uint8)  # any bnb_4bit_quant_storage dtype
    kw = dict(nested_code=qs.state2.code, nested_absmax=qs.state2.absmax,
              nested_blocksize=qs.state2.blocksize, offset=qs.offset) if qs.nested else {}
    if qs.dtype != dtype:  # dequantize_base rounds to the quant dtype first, then casts
        W = dequantize_4bit_masked(packed, qs.code, qs.absmax, qs.blocksize, qs.shape,
                                   out_dtype=qs.dtype, **kw).to(dtype)
        return ref.masked_weight(W, seed, p)
    return dequantize_4bit_masked(packed, qs.code, qs.absmax, qs.blocksize, qs.shape,
                                  seed=seed, p=p, out_dtype=dtype, **kw)


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


class _RecomputeSaved:
    """Token saved by autograd instead of a dense weight; unpacked by recomputing it."""

    __slots__ = ("fn", "size", "stride", "offset")

    def __init__(self, fn, t: torch.Tensor):
        self.fn = fn
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


@contextlib.contextmanager
def _saved_as_recompute(owner, recompute: Callable[[], torch.Tensor]):
    """While active, any tensor autograd saves that shares storage with the dense weight
    produced by ``owner._rora_dense`` (set by the owner's weight hook) is saved as a token,
    and rebuilt by ``recompute()`` when backward needs it."""
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


def _compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a bitsandbytes layer computes in for input ``x`` (as bitsandbytes:
    ``compute_dtype`` of a Linear4bit when set, else the input's dtype)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    cd = getattr(base, "compute_dtype", None)
    return cd if cd is not None else x.dtype


class QuantRoraLinear(RoraLinear):
    """RoRA over a bitsandbytes ``Linear4bit`` (NF4/FP4, double quantization on or off)
    or ``Linear8bitLt`` base, kept quantized (see the module docstring).

    Build it with :meth:`from_quantized` (or :func:`rora_fast.apply_rora` on a model
    loaded with ``BitsAndBytesConfig``). ``weight``/``bias`` are the base layer's.
    """

    def __init__(self, base: nn.Module, **kwargs):
        require_bitsandbytes()
        kind = base_kind(base)
        if kind not in ("4bit", "8bit"):
            raise TypeError(f"QuantRoraLinear wraps a bitsandbytes Linear4bit or Linear8bitLt, "
                            f"got {type(base).__name__}")
        init = kwargs.get("init", "default")
        if init in ("pissa", "olora"):
            raise NotImplementedError(
                f"init={init!r} is not supported on a quantized base: it rewrites the base "
                "weight into a residual, which would have to be requantized (use "
                "init='default' or 'gaussian', or a bf16 base)")
        if kwargs.get("use_dora"):
            raise NotImplementedError("use_dora=True is not supported on a quantized base "
                                      "(use a bf16 base for RoRA-DoRA)")
        for k in ("in_features", "out_features", "bias", "_base", "device", "dtype"):
            if k in kwargs:
                raise TypeError(f"QuantRoraLinear takes its shape from the base layer; "
                                f"unexpected argument {k!r}")
        # RoraLinear's construction (checks, SVD bases and σ_max of the dequantized W_pre,
        # adapter init) runs on a transient dense copy, freed on return; afterwards the
        # layer reads its weight only through the quantized base.
        W = dequantize_base(base, torch.float32)
        dense = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
        dense.weight = nn.Parameter(W, requires_grad=False)
        super().__init__(W.shape[1], W.shape[0], False, _base=dense, **kwargs)
        del dense, W
        del self.weight   # the transient dense parameter
        del self.bias     # None; both now resolve to the base layer's (see __getattr__)
        self.base_layer = base
        self.quant_kind = kind
        for p in base.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_quantized(cls, layer: nn.Module, r: int = 8, alpha: float = 16,
                       weight_dropout: float = 0.1, lora_dropout: float = 0.0,
                       ortho_rank: int = 32, ortho_lambda: float = 10.0,
                       **kwargs) -> "QuantRoraLinear":
        """Wrap a bitsandbytes ``Linear4bit``/``Linear8bitLt`` (kept, not copied)."""
        require_bitsandbytes()
        return cls(layer, r=r, alpha=alpha, weight_dropout=weight_dropout,
                   lora_dropout=lora_dropout, ortho_rank=ortho_rank,
                   ortho_lambda=ortho_lambda, **kwargs)

    def __getattr__(self, name):
        if name in ("weight", "bias"):
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is not None:
                return getattr(base, name)
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return f"quant={self.quant_kind}, " + super().extra_repr()

    # ------------------------------------------------------------------ the two hooks
    def _base_weight(self, cdtype: torch.dtype) -> torch.Tensor:
        fused = self.__dict__.get("_rora_premask")
        if fused is not None:  # (seed, p): the masked weight, one kernel (see _quant_forward)
            W = dequantize_4bit_masked_base(self.base_layer, cdtype, *fused)
        else:
            W = dequantize_base(self.base_layer, cdtype)
        if self.training:  # recognised by the saved-tensor hook (reset when the call ends)
            self.__dict__["_rora_dense"] = W
        return W

    # eval: the inherited ``x Wᵀ + b`` on this dequantized W. bitsandbytes' own forward is
    # never called: on the CPU it would switch the weight to its inference layout, and it
    # asserts on shapes that layout cannot hold (out_features % 32 != 0).

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        dev = x.device.type
        cdtype = _compute_dtype(self.base_layer, x)
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return self._quant_forward(x.to(cdtype), cdtype)
        return self._quant_forward(x.to(cdtype), cdtype).to(x.dtype)

    def _use_nf4_kernel(self, x: torch.Tensor) -> bool:
        """The one-pass dequantize+mask kernel (``rora_fast.kernels.nf4``): opt-in with
        ``RORA_FAST_NF4_KERNEL=1``, for 4-bit bases with weight dropout, on CUDA (or on
        CPU tensors under ``TRITON_INTERPRET=1``, for tests)."""
        if (os.environ.get("RORA_FAST_NF4_KERNEL", "0") != "1" or self.quant_kind != "4bit"
                or not ref.keep_threshold(self.weight_dropout)):
            return False
        return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"

    def _quant_forward(self, x: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
        if not self.training:
            return self._forward(x, cdtype)
        if not self._use_nf4_kernel(x):
            with _saved_as_recompute(self, lambda: dequantize_base(self.base_layer, cdtype)):
                return self._forward(x, cdtype)
        # The kernel writes the masked weight M ⊙ W / (1 - p) directly: draw the seed as
        # the layer would, hand the op the masked weight with p = 0 for this call (so it
        # masks nothing itself and draws no seed), and rebuild it from the same seed in
        # backward. Bit-identical to the default path (kernel == dequantize + mask).
        p = self.weight_dropout
        seed = RoraLinear._draw_seed()  # (p > 0: the kernel is used only with a mask)
        premask = (seed, p)
        self.__dict__["_rora_premask"] = premask
        self.weight_dropout = 0.0
        try:
            with _saved_as_recompute(self, lambda: dequantize_4bit_masked_base(
                    self.base_layer, cdtype, *premask)):
                return self._forward(x, cdtype)
        finally:
            self.weight_dropout = p
            self.__dict__["_rora_premask"] = None

    # ------------------------------------------------------------------ merging
    def merged_linear(self) -> nn.Module:
        """The base layer with ``s·BA`` merged in and requantized with the same settings
        (PEFT's ``merge_and_unload`` for bitsandbytes layers): rounding changes the
        outputs slightly, and a warning says so."""
        bnb = require_bitsandbytes()
        base = self.base_layer
        warnings.warn(f"merging RoRA into a {self.quant_kind} bitsandbytes layer requantizes "
                      "the weight: outputs may differ slightly due to rounding errors",
                      UserWarning, stacklevel=2)
        with torch.no_grad():
            W = dequantize_base(base, torch.float32)
            merged = (W.to(torch.float64) + self.scaling * (
                self.lora_B.detach().to(torch.float64, copy=False)
                @ self.lora_A.detach().to(torch.float64, copy=False))).to(torch.float32)
            w = base.weight
            dev = w.device
            if self.quant_kind == "4bit":
                kw = {k: v for k, v in w.__dict__.items()
                      if not k.startswith("_") and k not in ("data", "quant_state", "module")}
                kw["bnb_quantized"] = False
                kw["requires_grad"] = False
                qs = w.quant_state  # (original_dtype: set when bitsandbytes repacked it)
                dtype = getattr(qs, "original_dtype", None) or qs.dtype
                new = bnb.nn.Params4bit(merged.to(dtype).cpu(), **kw).to(dev)
                new.module = base
                base.weight = new
            else:
                new = bnb.nn.Int8Params(merged.to(torch.float16).cpu(), requires_grad=False,
                                        has_fp16_weights=False).to(dev)
                base.weight = new
                state = getattr(base, "state", None)
                if state is not None:
                    state.CB = None
                    state.SCB = None
        return base
