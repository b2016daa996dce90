"""The one table from a kind of base (:func:`rora_fast.bases.base_kind`) to the layer that
adapts it: its base strategy (:data:`rora_fast.bases.BASES`), the rora_fast layer class
and its constructor, the PEFT layer class (:mod:`rora_fast.peft_integration`) and the
module type PEFT matches for it. Every dispatcher asks here:
:func:`rora_fast.targets.make_rora_layer`, :meth:`rora_fast.RoraLinear.from_linear` and
:func:`rora_fast.register_rora`; the rora_fast layer and the PEFT layer of a kind run on
the same base strategy.

Classes and types are named, not imported: the table sits below the layer modules that
use it (no import cycle), and PEFT, transformers and bitsandbytes are imported only when
a PEFT layer is asked for.

A new kind of base: its :class:`rora_fast.bases.Base` (and recognition in ``base_kind``),
a row here, and its PEFT layer class in :mod:`rora_fast.peft_integration`; a new
rora_fast layer class only when an existing one cannot hold it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict

from .bases import BASES, Base

__all__ = ["Kind", "KINDS", "layer_kind"]


def _resolve(path: str):
    module, _, name = path.partition(":")
    mod = importlib.import_module(module, __package__) if module.startswith(".") \
        else importlib.import_module(module)
    return getattr(mod, name)


@dataclass(frozen=True)
class Kind:
    """One row of :data:`KINDS`."""

    #: the :func:`rora_fast.bases.base_kind` value
    kind: str
    #: the rora_fast layer class (``module:Class``, relative to ``rora_fast``)
    layer: str
    #: its constructor from a base module
    constructor: str
    #: the PEFT layer class's name in :mod:`rora_fast.peft_integration`
    peft_layer: str
    #: the module type PEFT's custom-module mapping matches (``module:Class``)
    peft_target: str

    @property
    def base(self) -> Base:
        """The base strategy both layers run on."""
        return BASES[self.kind]

    def layer_class(self) -> type:
        return _resolve(self.layer)

    def build(self, module, **kwargs):
        """The rora_fast layer over ``module`` (keyword arguments of ``RoraLinear``)."""
        return getattr(self.layer_class(), self.constructor)(module, **kwargs)

    def peft_target_type(self) -> type:
        """ImportError where its package is not installed."""
        return _resolve(self.peft_target)


#: base kind -> its layers, the most specific module type first (PEFT takes the first
#: ``isinstance`` match, and bitsandbytes layers are ``nn.Linear`` subclasses)
KINDS: Dict[str, Kind] = {k.kind: k for k in (
    Kind("4bit", ".quantized:QuantRoraLinear", "from_quantized", "PeftRoraLinear4bit",
         "bitsandbytes.nn:Linear4bit"),
    Kind("8bit", ".quantized:QuantRoraLinear", "from_quantized", "PeftRoraLinear8bitLt",
         "bitsandbytes.nn:Linear8bitLt"),
    Kind("conv1d", ".conv1d:RoraConv1D", "from_conv1d", "PeftRoraConv1D",
         "transformers.pytorch_utils:Conv1D"),
    Kind("linear", ".layer:RoraLinear", "from_linear", "PeftRoraLinear", "torch.nn:Linear"),
)}
assert set(KINDS) == set(BASES)


def layer_kind(kind: str) -> Kind:
    """The row for a base kind (TypeError for a kind without one)."""
    try:
        return KINDS[kind]
    except KeyError:
        raise TypeError(f"no RoRA layer for a base of kind {kind!r} (kinds: "
                        f"{sorted(KINDS)})") from None
