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
from .bases import (QUANT_INSTALL_HINT, _cpu_packed, base_kind,  # noqa: F401 (also public here)
                    check_quant_descriptor, check_saved_quantization, cpu_repack_switches,
                    quant_descriptor, require_bitsandbytes)
from .bases import dense_weight as dequantize_base
from .layer import RoraLinear

__all__ = ["QUANT_INSTALL_HINT", "require_bitsandbytes", "base_kind", "cpu_repack_switches",
           "check_saved_quantization", "QuantRoraLinear", "dequantize_base",
           "dequantize_4bit_masked_base",
           "quant_descriptor", "check_quant_descriptor"]

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

    BASE_KINDS = ("4bit", "8bit")

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

    from_base = from_quantized

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
