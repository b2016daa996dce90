"""RoRA over GPT-2's ``Conv1D`` (transformers' ``fan_in_fan_out`` linear, weight stored
``(in, out)``).

:class:`RoraConv1D` wraps a ``Conv1D`` whose weight is ``(in, out)``; the layer's ``weight``
is the ``(out, in)`` transposed *view* of the same storage (no copy), so everything of
:class:`~rora_fast.layer.RoraLinear` — weight mask, penalty, PiSSA/OLoRA, DoRA, merging —
runs on the ``(out, in)`` view, and the mask equals that of an ``nn.Linear`` holding
``conv.weight.t()``. Its state dict stores the weight in ``Conv1D``'s ``(in, out)`` layout
(as the checkpoint it came from), and merging gives back a ``Conv1D``.

Its base strategy is :class:`~rora_fast.bases.Conv1DBase`, the one PEFT's Conv1D layer
(:mod:`rora_fast.peft_integration`) runs on too; its holder (:attr:`RoraConv1D.base_module`)
shows the weight in Conv1D's ``(in, out)`` layout, as a Conv1D module would.
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import RoraLinear
from .bases import BASES, base_kind

__all__ = ["RoraConv1D"]


class _Conv1DLayout:
    """The holder of a :class:`RoraConv1D` for one call of its base strategy: the layer's
    weight in Conv1D's ``(in, out)`` layout (a view of the same storage, no copy) and its
    bias."""

    __slots__ = ("weight", "bias")

    def __init__(self, layer: "RoraConv1D"):
        self.weight: torch.Tensor = layer.weight.t()
        self.bias = layer.bias


class RoraConv1D(RoraLinear):
    """RoRA over a transformers ``Conv1D`` (GPT-2's linear, ``y = x W + b`` with ``W``
    stored ``(in, out)``). ``weight`` is the ``(out, in)`` view of the Conv1D's storage."""

    _base = BASES["conv1d"]

    @property
    def base_module(self) -> _Conv1DLayout:
        """The weight in Conv1D's ``(in, out)`` layout and the bias (:class:`_Conv1DLayout`),
        what :class:`~rora_fast.bases.Conv1DBase` reads."""
        return _Conv1DLayout(self)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, r: int = 8, alpha: float = 16,
                    weight_dropout: float = 0.1, lora_dropout: float = 0.0,
                    ortho_rank: int = 32, ortho_lambda: float = 10.0,
                    **kwargs) -> "RoraConv1D":
        if base_kind(conv) != "conv1d":
            raise TypeError(f"from_conv1d expects a transformers Conv1D, got "
                            f"{type(conv).__name__}")
        n_in, n_out = conv.weight.shape
        view = nn.Linear(n_in, n_out, bias=False, device="meta")
        # the (out, in) transposed view of the same storage: no copy
        view.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=False)
        view.bias = conv.bias
        layer = cls(n_in, n_out, conv.bias is not None, r=r, alpha=alpha,
                    weight_dropout=weight_dropout, lora_dropout=lora_dropout,
                    ortho_rank=ortho_rank, ortho_lambda=ortho_lambda, _base=view, **kwargs)
        layer._conv_cls = type(conv)
        return layer

    # The state dict keeps Conv1D's (in, out) layout, so checkpoints stay interchangeable.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if key in destination:
            destination[key] = destination[key].t()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict:
            state_dict = dict(state_dict)
            state_dict[key] = state_dict[key].t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def merged_linear(self) -> nn.Module:
        """A ``Conv1D`` computing this layer's eval output (weight merged in place)."""
        super().merged_linear()
        conv = self._conv_cls.__new__(self._conv_cls)
        nn.Module.__init__(conv)
        conv.nf = self.out_features
        conv.nx = self.in_features
        conv.weight = nn.Parameter(self.weight.detach().t(), requires_grad=False)
        conv.bias = self.bias
        return conv
