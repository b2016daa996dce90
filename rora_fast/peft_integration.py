"""RoRA inside PEFT, for code built around ``get_peft_model``.

PEFT lets a ``LoraConfig`` map a layer type to a custom LoRA layer class
(``LoraConfig._register_custom_module``). :func:`register_rora` registers a subclass
of PEFT's own ``lora.Linear`` whose training forward is the RoRA op (weight dropout,
penalty gradient at the optimizer step): the one forward of
:class:`rora_fast.RoraLinear`, :func:`rora_fast.forward.layer_forward`, on the base
strategies of :mod:`rora_fast.bases` and the variant objects of :mod:`rora_fast.variants`
(the same ones :class:`rora_fast.RoraLinear` asks; one class per row of
:data:`rora_fast.kinds.KINDS`). Everything else
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

import warnings
from typing import Dict, Sequence, Union

import torch
from torch import nn

from . import penalty as _penalty
from . import reference as ref
from . import validation as V
from .bases import BASES, dense_weight
from .forward import layer_forward
from .kinds import KINDS
from .linalg import spectral_basis
from .model import spectral_rescale_ as _rescale
from .targets import is_rora_target
from .variants import peft_variant

__all__ = ["register_rora", "make_peft_rora_linear", "peft_custom_modules",
           "peft_layer_classes", "peft_rora_layers", "spectral_rescale_peft_"]


def _peft_base(base_layer):
    return base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer


def _bind(cls, base, weight_dropout, ortho_rank, ortho_lambda):
    cls._rora_base = base
    cls.rora_weight_dropout = float(weight_dropout)
    cls.rora_ortho_rank = ortho_rank
    cls.rora_ortho_lambda = float(ortho_lambda)
    return cls


class _PeftRoraMixin:
    """RoRA for a PEFT LoRA layer (one active vanilla-LoRA adapter): the training forward
    is :func:`rora_fast.forward.layer_forward`, as for :class:`rora_fast.RoraLinear`, on
    the base strategy ``_rora_base`` of the layer's kind (:data:`rora_fast.kinds.KINDS`;
    quantized bases dequantize for each call and again for backward) and the variant
    object of its ``LoraConfig`` (:func:`rora_fast.variants.peft_variant`); the eval,
    merged, disabled and multi-adapter paths are PEFT's."""

    rora_weight_dropout = 0.1
    rora_ortho_rank = 32
    rora_ortho_lambda = 10.0
    _rora_base = BASES["linear"]

    def _rora_variant_of(self, kwargs):
        """The variant of the layer's ``LoraConfig``. What the PEFT door cannot train as
        RoRA is refused when the model is built, naming the layer: DoRA (PEFT's variant
        forward has no weight dropout) and PiSSA/OLoRA starts (the penalty must be on
        B − B₀, A − A₀, which PEFT's layer does not keep).
        ``apply_rora(RoraConfig(use_dora=True | init="pissa" | "olora"))`` trains those."""
        cfg = kwargs.get("config")  # peft >= 0.19 passes the config, older ones its fields
        name = kwargs.get("target_name") or "a target layer"  # (the name: peft >= 0.19)
        init = kwargs.get("init_lora_weights", getattr(cfg, "init_lora_weights", True))
        variant = peft_variant(init, kwargs.get("use_dora", getattr(cfg, "use_dora", False)))
        reason = variant.peft_refusal(init)
        if reason is None:
            return variant
        raise ValueError(f"register_rora: {name}: RoRA through PEFT supports vanilla LoRA "
                         f"adapters only, not {reason} (its training forward or penalty would "
                         f"silently not be RoRA's); use rora_fast.apply_rora with RoraConfig("
                         f"use_dora=True) or RoraConfig(init='pissa'|'olora') instead")

    def _rora_basis(self, W: torch.Tensor):
        """Bases and σ_max of the original weight (before any init rewrites it)."""
        V.check_layer_shape(None, self.rora_ortho_rank, W.shape[1], W.shape[0])
        return spectral_basis(W, self.rora_ortho_rank)

    def _rora_setup(self, basis, variant) -> None:
        self.rora_variant = variant
        self.register_buffer("rora_ortho_U", basis.U, persistent=False)
        self.register_buffer("rora_ortho_V", basis.V, persistent=False)
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
        A0, B0 = self.rora_variant.start_factors(self)
        out = []
        for name in self.active_adapters:
            if name in self.lora_A:
                out.append((self.lora_A[name].weight, "A", self.rora_ortho_V, A0, lam))
                out.append((self.lora_B[name].weight, "B", self.rora_ortho_U, B0, lam))
        return out

    def rora_penalty(self) -> torch.Tensor:
        """λ Ω summed over this layer's adapters (detached, for logging)."""
        total = torch.zeros((), device=self.rora_ortho_U.device)
        start = self.rora_variant.start_factors(self)
        with torch.no_grad():
            for name in self.active_adapters:
                if name in self.lora_A:
                    total = total + self.rora_ortho_lambda * ref.ortho_penalty(
                        self.lora_A[name].weight, self.lora_B[name].weight,
                        self.rora_ortho_U, self.rora_ortho_V, *start)
        return total

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not self.training or self.disable_adapters or self.merged or not active:
            return super().forward(x, *args, **kwargs)  # eval / base only: LoRA's forward
        # a training forward is RoRA's or an error, never PEFT's plain LoRA in its place
        if len(active) != 1:
            raise RuntimeError(f"RoRA through PEFT trains one active adapter at a time; "
                               f"{len(active)} are active ({active}): set one with "
                               f"model.set_adapter(name)")
        if active[0] in self.lora_variant:
            raise RuntimeError(f"adapter {active[0]!r} is a PEFT LoRA variant "
                               f"({type(self.lora_variant[active[0]]).__name__}); RoRA through "
                               f"PEFT trains vanilla LoRA adapters (apply_rora for variants)")
        if args or kwargs:
            raise RuntimeError(f"RoRA's training forward takes the input alone; got extra "
                               f"arguments {sorted(kwargs) or len(args)} (e.g. PEFT's "
                               f"adapter_names for mixed batches, which RoRA does not support)")
        name = active[0]
        return layer_forward(self, self._rora_base, self.get_base_layer(), x,
                             self.lora_A[name].weight, self.lora_B[name].weight,
                             self.scaling[name], self.rora_weight_dropout,
                             self.lora_dropout[name], training=True,
                             variant=self.rora_variant)


def _peft_classes() -> Dict[str, type]:
    """The PEFT layer classes trained with RoRA by the names :data:`rora_fast.kinds.KINDS`
    gives them, new classes at each call (each registration binds its own
    hyper-parameters); the bitsandbytes ones where bitsandbytes is importable."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    class PeftRoraLinear(_PeftRoraMixin, PeftLinear):
        """PEFT ``lora.Linear`` trained with RoRA (one active vanilla-LoRA adapter)."""

        def __init__(self, base_layer, adapter_name, **kwargs):
            variant = self._rora_variant_of(kwargs)
            base = _peft_base(base_layer)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"RoRA adapts nn.Linear layers, got {type(base).__name__}")
            basis = self._rora_basis(base.weight)
            super().__init__(base_layer, adapter_name, **kwargs)
            self._rora_setup(basis, variant)

    class PeftRoraConv1D(_PeftRoraMixin, PeftLinear):
        """PEFT's LoRA over a GPT-2 ``Conv1D`` (``fan_in_fan_out``) trained with RoRA; the
        mask is on the ``(out, in)`` view of the weight."""

        def __init__(self, base_layer, adapter_name, **kwargs):
            variant = self._rora_variant_of(kwargs)
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
            self._rora_setup(basis, variant)

    out = {c.__name__: c for c in (PeftRoraLinear, PeftRoraConv1D)}
    try:
        import bitsandbytes  # noqa: F401
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return out

    class PeftRoraLinear4bit(_PeftRoraMixin, peft_bnb.Linear4bit):
        """PEFT's QLoRA 4-bit layer trained with RoRA."""

        def __init__(self, base_layer, adapter_name, **kwargs):
            variant = self._rora_variant_of(kwargs)
            base = _peft_base(base_layer)
            kwargs.setdefault("compute_dtype", base.compute_dtype)
            kwargs.setdefault("compress_statistics", base.weight.compress_statistics)
            kwargs.setdefault("quant_type", base.weight.quant_type)
            basis = self._rora_basis(dense_weight(base, torch.float32))
            super().__init__(base_layer, adapter_name, **kwargs)
            self._rora_setup(basis, variant)

    class PeftRoraLinear8bitLt(_PeftRoraMixin, peft_bnb.Linear8bitLt):
        """PEFT's 8-bit LoRA layer trained with RoRA."""

        def __init__(self, base_layer, adapter_name, **kwargs):
            variant = self._rora_variant_of(kwargs)
            base = _peft_base(base_layer)
            kwargs.setdefault("has_fp16_weights", base.state.has_fp16_weights)
            kwargs.setdefault("threshold", base.state.threshold)
            kwargs.setdefault("index", getattr(base, "index", None))
            basis = self._rora_basis(dense_weight(base, torch.float32))
            super().__init__(base_layer, adapter_name, **kwargs)
            self._rora_setup(basis, variant)

    out.update({c.__name__: c for c in (PeftRoraLinear4bit, PeftRoraLinear8bitLt)})
    return out


def peft_layer_classes(weight_dropout: float = 0.1, ortho_rank: int = 32,
                       ortho_lambda: float = 10.0) -> Dict[type, type]:
    """``{module type: PEFT LoRA layer class trained with RoRA}``, one per row of
    :data:`rora_fast.kinds.KINDS` whose packages are importable (bitsandbytes' only with
    bitsandbytes), each on its row's base strategy and bound to these hyper-parameters.
    Specific types come first: PEFT takes the first ``isinstance`` match and bitsandbytes
    layers are ``nn.Linear`` subclasses."""
    V.check_rora_hparams(weight_dropout, ortho_rank, ortho_lambda)
    classes = _peft_classes()
    out: Dict[type, type] = {}
    for row in KINDS.values():
        if row.peft_layer not in classes:
            continue
        try:
            target = row.peft_target_type()
        except ImportError:
            continue
        out[target] = _bind(classes[row.peft_layer], row.base, weight_dropout, ortho_rank,
                            ortho_lambda)
    return out


def make_peft_rora_linear(weight_dropout: float = 0.1, ortho_rank: int = 32,
                          ortho_lambda: float = 10.0):
    """A PEFT LoRA ``Linear`` subclass bound to these RoRA hyper-parameters."""
    return peft_layer_classes(weight_dropout, ortho_rank, ortho_lambda)[nn.Linear]


def peft_custom_modules(weight_dropout: float = 0.1, ortho_rank: int = 32,
                        ortho_lambda: float = 10.0) -> Dict[type, type]:
    """:func:`peft_layer_classes` but ``nn.Linear``'s (:func:`make_peft_rora_linear`'s):
    bitsandbytes ``Linear4bit``/``Linear8bitLt`` (when bitsandbytes is importable) and
    transformers ``Conv1D``, for ``LoraConfig._register_custom_module`` (see
    :func:`register_rora`)."""
    classes = peft_layer_classes(weight_dropout, ortho_rank, ortho_lambda)
    return {t: c for t, c in classes.items() if t is not nn.Linear}


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
    (and bitsandbytes ``Linear4bit``/``Linear8bitLt``, transformers ``Conv1D``: every row of
    :data:`rora_fast.kinds.KINDS`). Returns the ``nn.Linear`` layer class. The values follow
    :mod:`rora_fast.validation` (finite, ``0 <= weight_dropout < 1``, ``ortho_rank >= 1``,
    ``ortho_lambda >= 0``)."""
    classes = peft_layer_classes(weight_dropout, ortho_rank, ortho_lambda)
    # most specific first (KINDS' order), last: every other target type is refused
    lora_config._register_custom_module({**classes, nn.Module: _refuse_unsupported})
    return classes[nn.Linear]


def peft_rora_layers(model: nn.Module):
    """Iterate ``(name, layer)`` over the PEFT RoRA layers of a model."""
    for name, m in model.named_modules():
        if hasattr(m, "rora_sigma_pre") and hasattr(m, "lora_A"):
            yield name, m


def spectral_rescale_peft_(model: nn.Module, layers: Union[int, Sequence[str]] = 3,
                           adapter_name: str = "default") -> Dict[str, float]:
    """Spectral rescaling for a PEFT model built with :func:`register_rora`: sets
    ``scaling[adapter] = σ_max(W_pre) / σ_max(BA)`` for the chosen layers. The same rescale
    as :func:`rora_fast.spectral_rescale_` (all or nothing), refusing a model without
    PEFT RoRA layers."""
    rl = dict(peft_rora_layers(model))
    if not rl:
        raise ValueError("the model has no PEFT RoRA layers (use register_rora)")
    if not any(adapter_name in lay.lora_A for lay in rl.values()):
        raise ValueError(f"no adapter named {adapter_name!r} in the PEFT RoRA layers")
    if not isinstance(layers, (int, str)):
        for n in layers:
            if n in rl and adapter_name not in rl[n].lora_A:
                raise ValueError(f"{n}: no adapter named {adapter_name!r} (has "
                                 f"{sorted(rl[n].lora_A.keys())})")
    return _rescale(model, layers, adapter_name=adapter_name)
