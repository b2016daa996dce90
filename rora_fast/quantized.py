"""RoRA over quantized bases (bitsandbytes ``Linear4bit``/``Linear8bitLt``).

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

What a bitsandbytes base is to RoRA (its dequantization, compute dtype, one-pass masked
weight, descriptor, requantizing merge) is its strategy in :mod:`rora_fast.bases`
(:class:`~rora_fast.bases.Bnb4bitBase`, :class:`~rora_fast.bases.Bnb8bitBase`); the
forward and the saved-weight recompute are :mod:`rora_fast.forward`'s, shared with every
RoRA layer. This module holds the layer class only. Through PEFT,
:func:`rora_fast.register_rora` maps bitsandbytes and ``Conv1D`` bases to the layer
classes of :func:`rora_fast.peft_integration.peft_layer_classes`, on the same strategies
(:data:`rora_fast.kinds.KINDS`).
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from .bases import (BASES, QUANT_INSTALL_HINT, base_for, base_kind,  # noqa: F401 (public)
                    check_quant_descriptor, check_saved_quantization, cpu_repack_switches,
                    dequantize_4bit_masked, quant_descriptor, require_bitsandbytes)
from .bases import dense_weight as dequantize_base
from .layer import RoraLinear
from .variants import variant_for

__all__ = ["QUANT_INSTALL_HINT", "require_bitsandbytes", "base_kind", "cpu_repack_switches",
           "check_saved_quantization", "QuantRoraLinear", "dequantize_base",
           "dequantize_4bit_masked_base", "quant_descriptor", "check_quant_descriptor"]

#: the one-pass dequantize+mask of a 4-bit base (:func:`rora_fast.bases.dequantize_4bit_masked`)
dequantize_4bit_masked_base = dequantize_4bit_masked

_SHAPE_ARGS = ("in_features", "out_features", "bias", "_base", "device", "dtype")
#: RoraLinear's keyword arguments and defaults, but those of a dense base's shape
_SETUP_DEFAULTS = {k: p.default for k, p in inspect.signature(RoraLinear.__init__).parameters.items()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in _SHAPE_ARGS}


class QuantRoraLinear(RoraLinear):
    """RoRA over a base kept as a child module ``base_layer``, quantized: a bitsandbytes
    ``Linear4bit`` (NF4/FP4, double quantization on or off) or ``Linear8bitLt`` (any
    :class:`rora_fast.bases.Base` with ``child = True``), see the module docstring.

    Build it with :meth:`from_quantized` (or :func:`rora_fast.apply_rora` on a model
    loaded with ``BitsAndBytesConfig``). ``weight``/``bias`` are the base layer's.
    """

    def __init__(self, base: nn.Module, **kwargs):
        kind = base_kind(base)
        if kind is None or not BASES[kind].child:
            raise TypeError(f"QuantRoraLinear wraps a bitsandbytes Linear4bit or Linear8bitLt, "
                            f"got {type(base).__name__}")
        strategy = base_for(base)
        strategy.check_target(base, type(base).__name__,
                              variant_for(kwargs.get("init", "default"),
                                          kwargs.get("use_dora", False)))
        for k in _SHAPE_ARGS:
            if k in kwargs:
                raise TypeError(f"QuantRoraLinear takes its shape from the base layer; "
                                f"unexpected argument {k!r}")
        kw = dict(_SETUP_DEFAULTS)
        unknown = set(kwargs) - set(kw)
        if unknown:
            raise TypeError(f"QuantRoraLinear got unexpected arguments {sorted(unknown)}")
        kw.update(kwargs)
        nn.Module.__init__(self)
        self._base = strategy
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        # SVD bases, σ_max and the adapter init from the dequantized W_pre (float32, freed
        # on return); afterwards the layer reads its weight only through the base layer.
        self._setup(dequantize_base(base, torch.float32), **kw)

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

    @property
    def base_module(self) -> nn.Module:
        return self._modules["base_layer"]

    @property
    def weight(self):
        """The base layer's (quantized) weight."""
        return self._modules["base_layer"].weight

    @property
    def bias(self):
        """The base layer's bias."""
        return self._modules["base_layer"].bias

    @property
    def quant_kind(self) -> str:
        """``"4bit"`` or ``"8bit"`` (the same as :attr:`base_kind`)."""
        return self._base.kind

    def extra_repr(self) -> str:
        return f"quant={self._base.kind}, " + super().extra_repr()

    def merged_linear(self) -> nn.Module:
        """The base layer with ``s·BA`` merged in and requantized with the same settings
        (PEFT's ``merge_and_unload`` for bitsandbytes layers): rounding changes the
        outputs slightly, and a warning says so."""
        warnings.warn(f"merging RoRA into a {self._base.kind} bitsandbytes layer requantizes "
                      "the weight: outputs may differ slightly due to rounding errors",
                      UserWarning, stacklevel=2)
        return super().merged_linear()
