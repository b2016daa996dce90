"""RoRA inside PEFT, for code built around ``get_peft_model``.

PEFT lets a ``LoraConfig`` map a layer type to a custom LoRA layer class
(``LoraConfig._register_custom_module``). :func:`register_rora` registers a subclass
of PEFT's own ``lora.Linear`` whose training forward is the RoRA op (weight dropout,
penalty gradient at the optimizer step): the one training forward of
:class:`rora_fast.RoraLinear`, :func:`rora_fast.layer.training_forward`. Everything else
stays PEFT's: adapter names,
``merge_and_unload``, ``disable_adapter``, saving (only ``lora_``-prefixed tensors are
saved; the SVD bases are non-persistent buffers). Eval, merged and disabled paths
are PEFT's unchanged. The penalty gradient ``λ∇Ω`` of the active adapter is added at
each optimizer step, as for :class:`rora_fast.RoraLinear` (:mod:`rora_fast.penalty`).

    from peft import LoraConfig, get_peft_model
    import rora_fast
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
    rora_fast.register_rora(config, weight_dropout=0.1, ortho_rank=32, ortho_lambda=10.0)
    model = get_peft_model(model, config)        # train as usual
    rora_fast.spectral_rescale_peft_(model, layers=3)

The mapping is not saved by PEFT: call :func:`register_rora` on the config again
before ``PeftModel.from_pretrained(..., config=config)``; a saved adapter also loads
as a plain LoRA adapter (RoRA changes training, not the adapter format).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Sequence, Union

import torch
from torch import nn

from . import penalty as _penalty
from . import reference as ref
from .blocks import select_top_blocks
from .layer import training_forward
from .linalg import rescale_factor, sigma_max_lowrank, spectral_basis
from .bases import dense_weight
from .quantized import _compute_dtype, _saved_as_recompute
from .targets import is_rora_target

__all__ = ["register_rora", "make_peft_rora_linear", "peft_custom_modules",
           "peft_rora_layers", "spectral_rescale_peft_"]


def _peft_base(base_layer):
    return base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer


def _bind(cls, weight_dropout, ortho_rank, ortho_lambda):
    cls.rora_weight_dropout = float(weight_dropout)
    cls.rora_ortho_rank = ortho_rank
    cls.rora_ortho_lambda = float(ortho_lambda)
    return cls


class _PeftRoraMixin:
    """RoRA for a PEFT LoRA layer (one active vanilla-LoRA adapter): the training forward
    is :func:`rora_fast.layer.training_forward`, as for :class:`rora_fast.RoraLinear`; the
    eval, merged, disabled and multi-adapter paths are PEFT's. The subclass gives
    ``_rora_dense_weight(dtype)``, the base's dense ``(out, in)`` weight; with
    ``_rora_recompute`` (quantized bases) that weight is not kept for backward but
    dequantized again (:func:`rora_fast.quantized._saved_as_recompute`)."""

    rora_weight_dropout = 0.1
    rora_ortho_rank = 32
    rora_ortho_lambda = 10.0
    _rora_recompute = False

    def _rora_basis(self, W: torch.Tensor):
        """Bases and σ_max of the original weight (before any init rewrites it)."""
        k = self.rora_ortho_rank
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ortho_rank must be an int >= 1, got {k!r}")
        if k > min(W.shape):
            raise ValueError(f"ortho_rank {k} exceeds min(in, out) = {min(W.shape)}")
        return spectral_basis(W, k)

    def _rora_setup(self, basis) -> None:
        self.register_buffer("rora_U", basis.U, persistent=False)
        self.register_buffer("rora_V", basis.V, persistent=False)
        self.rora_sigma_pre = basis.sigma_max
        # λ∇Ω is added by the optimizer step hook of rora_fast.penalty
        _penalty.register_penalty_layer(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        _penalty.register_penalty_layer(self)

    def _penalty_terms(self):
        """The active adapters' terms for the optimizer step hook (rora_fast.penalty);
        looked up through the module at each step (FSDP2 swaps parameters)."""
        lam = self.rora_ortho_lambda
        if not lam:
            return []
        out = []
        for name in self.active_adapters:
            if name in self.lora_A:
                out.append((self.lora_A[name].weight, "A", self.rora_V, None, lam))
                out.append((self.lora_B[name].weight, "B", self.rora_U, None, lam))
        return out

    def rora_penalty(self) -> torch.Tensor:
        """λ Ω summed over this layer's adapters (detached, for logging)."""
        total = torch.zeros((), device=self.rora_U.device)
        with torch.no_grad():
            for name in self.active_adapters:
                if name in self.lora_A:
                    total = total + self.rora_ortho_lambda * ref.ortho_penalty(
                        self.lora_A[name].weight, self.lora_B[name].weight,
                        self.rora_U, self.rora_V)
        return total

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if (not self.training or self.disable_adapters or self.merged or args or kwargs
                or len(active) != 1 or active[0] in self.lora_variant):
            return super().forward(x, *args, **kwargs)
        name = active[0]
        base = self.get_base_layer()
        dev = x.device.type
        autocast = torch.is_autocast_enabled(dev)
        in_dtype = x.dtype
        if autocast:
            dtype = torch.get_autocast_dtype(dev)
        else:
            dtype = _compute_dtype(base, x) if self._rora_recompute else base.weight.dtype
        x = x.to(dtype)
        b = base.bias.to(dtype) if base.bias is not None else None
        A = self.lora_A[name].weight.to(dtype)
        B = self.lora_B[name].weight.to(dtype)
        ctx = (_saved_as_recompute(self, lambda: self._rora_dense_weight(dtype))
               if self._rora_recompute else contextlib.nullcontext())
        with torch.autocast(dev, enabled=False), ctx:
            W = self._rora_dense_weight(dtype)
            if self._rora_recompute:
                self.__dict__["_rora_dense"] = W  # recognised by the saved-tensor hook
            y, _, _ = training_forward(self, x, self.lora_dropout[name], W, b, A, B,
                                       self.scaling[name], self.rora_weight_dropout)
        return y if autocast else y.to(in_dtype)


def make_peft_rora_linear(weight_dropout: float = 0.1, ortho_rank: int = 32,
                          ortho_lambda: float = 10.0):
    """A PEFT LoRA ``Linear`` subclass bound to these RoRA hyper-parameters."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    ref.keep_threshold(weight_dropout)
    if ortho_lambda < 0:
        raise ValueError(f"ortho_lambda must be >= 0, got {ortho_lambda}")
    if isinstance(ortho_rank, bool) or not isinstance(ortho_rank, int) or ortho_rank < 1:
        raise ValueError(f"ortho_rank must be an int >= 1, got {ortho_rank!r}")

    class PeftRoraLinear(_PeftRoraMixin, PeftLinear):
        """PEFT ``lora.Linear`` trained with RoRA (one active vanilla-LoRA adapter)."""

        def __init__(self, base_layer, adapter_name, **kwargs):
            base = _peft_base(base_layer)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"RoRA adapts nn.Linear layers, got {type(base).__name__}")
            basis = self._rora_basis(base.weight)
            super().__init__(base_layer, adapter_name, **kwargs)
            self._rora_setup(basis)

        def _rora_dense_weight(self, dtype):
            w = self.get_base_layer().weight
            return w if w.dtype == dtype else w.to(dtype)

    return _bind(PeftRoraLinear, weight_dropout, ortho_rank, ortho_lambda)


def peft_custom_modules(weight_dropout: float = 0.1, ortho_rank: int = 32,
                        ortho_lambda: float = 10.0) -> Dict[type, type]:
    """``{base type: PEFT LoRA layer class trained with RoRA}`` for bitsandbytes
    ``Linear4bit``/``Linear8bitLt`` (when bitsandbytes is importable) and transformers
    ``Conv1D``, for ``LoraConfig._register_custom_module`` (see :func:`register_rora`).
    Specific types come first: PEFT takes the first ``isinstance`` match and bitsandbytes
    layers are ``nn.Linear`` subclasses."""
    from peft.tuners.lora.layer import Linear as PeftLinear
    from transformers.pytorch_utils import Conv1D

    ref.keep_threshold(weight_dropout)
    hp = (weight_dropout, ortho_rank, ortho_lambda)
    out: Dict[type, type] = {}
    try:
        import bitsandbytes as bnb
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        bnb = None
    if bnb is not None:
        class PeftRoraLinear4bit(_PeftRoraMixin, peft_bnb.Linear4bit):
            """PEFT's QLoRA 4-bit layer trained with RoRA."""

            _rora_recompute = True

            def __init__(self, base_layer, adapter_name, **kwargs):
                base = _peft_base(base_layer)
                kwargs.setdefault("compute_dtype", base.compute_dtype)
                kwargs.setdefault("compress_statistics", base.weight.compress_statistics)
                kwargs.setdefault("quant_type", base.weight.quant_type)
                basis = self._rora_basis(dense_weight(base, torch.float32))
                super().__init__(base_layer, adapter_name, **kwargs)
                self._rora_setup(basis)

            def _rora_dense_weight(self, dtype):
                return dense_weight(self.get_base_layer(), dtype)

        class PeftRoraLinear8bitLt(_PeftRoraMixin, peft_bnb.Linear8bitLt):
            """PEFT's 8-bit LoRA layer trained with RoRA."""

            _rora_recompute = True

            def __init__(self, base_layer, adapter_name, **kwargs):
                base = _peft_base(base_layer)
                kwargs.setdefault("has_fp16_weights", base.state.has_fp16_weights)
                kwargs.setdefault("threshold", base.state.threshold)
                kwargs.setdefault("index", getattr(base, "index", None))
                basis = self._rora_basis(dense_weight(base, torch.float32))
                super().__init__(base_layer, adapter_name, **kwargs)
                self._rora_setup(basis)

            def _rora_dense_weight(self, dtype):
                return dense_weight(self.get_base_layer(), dtype)

        out[bnb.nn.Linear4bit] = _bind(PeftRoraLinear4bit, *hp)
        out[bnb.nn.Linear8bitLt] = _bind(PeftRoraLinear8bitLt, *hp)

    class PeftRoraConv1D(_PeftRoraMixin, PeftLinear):
        """PEFT's LoRA over a GPT-2 ``Conv1D`` (``fan_in_fan_out``) trained with RoRA; the
        mask is on the ``(out, in)`` view of the weight."""

        def __init__(self, base_layer, adapter_name, **kwargs):
            base = _peft_base(base_layer)
            if not kwargs.get("fan_in_fan_out", False):
                warnings.warn("fan_in_fan_out is set to False but the target module is "
                              "`Conv1D`. Setting fan_in_fan_out to True.", UserWarning)
            kwargs["fan_in_fan_out"] = True
            kwargs["is_target_conv_1d_layer"] = True
            cfg = kwargs.get("config")
            if cfg is not None:
                cfg.fan_in_fan_out = True
            basis = self._rora_basis(base.weight.detach().t())
            super().__init__(base_layer, adapter_name, **kwargs)
            self._rora_setup(basis)

        def _rora_dense_weight(self, dtype):
            return self.get_base_layer().weight.t().to(dtype)

    out[Conv1D] = _bind(PeftRoraConv1D, *hp)
    return out


def _check_supported_base(layer: nn.Module) -> None:
    """Raise for a PEFT target that :func:`register_rora` cannot make a RoRA layer.

    PEFT builds its own plain LoRA layer for any target type no registered class claims
    (no weight dropout, no penalty, no warning); :func:`register_rora` maps every type
    it does not support here, so that a target is RoRA or an error, never plain LoRA."""
    base = _peft_base(layer)
    if is_rora_target(base):
        return
    raise TypeError(
        f"register_rora cannot make a RoRA layer for a target of type "
        f"{type(base).__module__}.{type(base).__name__}: PEFT would silently build a plain "
        "LoRA layer for it (no weight dropout, no penalty). RoRA supports nn.Linear, "
        "bitsandbytes Linear4bit/Linear8bitLt and transformers Conv1D; remove this module "
        "from target_modules")


def _refuse_unsupported(target, adapter_name, **kwargs):
    """PEFT custom-module entry for every type not mapped to a RoRA class."""
    _check_supported_base(target)
    raise TypeError(f"register_rora: no RoRA layer class for {type(target).__name__}")


def register_rora(lora_config, weight_dropout: float = 0.1, ortho_rank: int = 32,
                  ortho_lambda: float = 10.0):
    """Make ``get_peft_model(model, lora_config)`` create RoRA layers for ``nn.Linear``
    (and bitsandbytes ``Linear4bit``/``Linear8bitLt``, transformers ``Conv1D``).
    Returns the layer class. The values follow :mod:`rora_fast.validation` (finite,
    ``0 <= weight_dropout < 1``, ``ortho_rank >= 1``, ``ortho_lambda >= 0``)."""
    from . import validation as V

    V.check_number("weight_dropout", weight_dropout, lo=0, hi=1, hi_open=True)
    V.check_int("ortho_rank", ortho_rank, lo=1)
    V.check_number("ortho_lambda", ortho_lambda, lo=0)
    cls = make_peft_rora_linear(weight_dropout, ortho_rank, ortho_lambda)
    # bitsandbytes and Conv1D first: PEFT takes the first isinstance match, and
    # bitsandbytes layers are nn.Linear subclasses
    lora_config._register_custom_module({**peft_custom_modules(weight_dropout, ortho_rank,
                                                               ortho_lambda),
                                         nn.Linear: cls,
                                         # last: every other target type is refused
                                         nn.Module: _refuse_unsupported})
    return cls


def peft_rora_layers(model: nn.Module):
    """Iterate ``(name, layer)`` over the PEFT RoRA layers of a model."""
    for name, m in model.named_modules():
        if hasattr(m, "rora_sigma_pre") and hasattr(m, "lora_A"):
            yield name, m


def spectral_rescale_peft_(model: nn.Module, layers: Union[int, Sequence[str]] = 3,
                           adapter_name: str = "default") -> Dict[str, float]:
    """Spectral rescaling for a PEFT model built with :func:`register_rora`: sets
    ``scaling[adapter] = σ_max(W_pre) / σ_max(BA)`` for the chosen layers.

    All or nothing: every chosen layer's scale is computed and checked (the adapter
    exists, the product is non-zero and finite) before any layer changes; a failure
    while setting them puts every scale back."""
    rl = dict(peft_rora_layers(model))
    if not rl:
        raise ValueError("the model has no PEFT RoRA layers (use register_rora)")
    names = select_top_blocks(model, list(rl), layers)
    new = {}
    for n in names:
        layer = rl[n]
        if adapter_name not in layer.lora_A:
            raise ValueError(f"{n}: no adapter named {adapter_name!r} (has "
                             f"{sorted(layer.lora_A.keys())})")
        sd = sigma_max_lowrank(layer.lora_B[adapter_name].weight,
                               layer.lora_A[adapter_name].weight)
        new[n] = rescale_factor(layer.rora_sigma_pre, sd, n)
    old = {n: rl[n].scaling[adapter_name] for n in names}
    try:
        for n, s in new.items():
            rl[n].scaling[adapter_name] = s
    except BaseException:
        for n, s in old.items():
            rl[n].scaling[adapter_name] = s
        raise
    return dict(new)
