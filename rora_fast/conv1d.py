"""RoRA over GPT-2's ``Conv1D`` (transformers' ``fan_in_fan_out`` linear, weight stored
``(in, out)``).

:class:`RoraConv1D` wraps a ``Conv1D`` whose weight is ``(in, out)``; the layer's ``weight``
is the ``(out, in)`` transposed *view* of the same storage (no copy), so everything of
:class:`~rora_fast.layer.RoraLinear` — weight mask, penalty, PiSSA/OLoRA, DoRA, merging —
runs on the ``(out, in)`` view, and the mask equals that of an ``nn.Linear`` holding
``conv.weight.t()``. Its state dict stores the weight in ``Conv1D``'s ``(in, out)`` layout
(as the checkpoint it came from), and merging gives back a ``Conv1D``.
"""

from __future__ import annotations

from torch import nn

from .layer import RoraLinear
from .bases import base_kind

__all__ = ["RoraConv1D"]


class RoraConv1D(RoraLinear):
    """RoRA over a transformers ``Conv1D`` (GPT-2's linear, ``y = x W + b`` with ``W``
    stored ``(in, out)``). ``weight`` is the ``(out, in)`` view of the Conv1D's storage."""

    BASE_KINDS = ("conv1d",)
    # its strategy is the inherited LinearBase: ``weight`` is a dense (out, in) view

    @property
    def base_kind(self) -> str:
        return "conv1d"

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

    from_base = from_conv1d

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
        lin = super().merged_linear()
        conv = self._conv_cls.__new__(self._conv_cls)
        nn.Module.__init__(conv)
        conv.nf = self.out_features
        conv.nx = self.in_features
        conv.weight = nn.Parameter(lin.weight.detach().t(), requires_grad=False)
        conv.bias = lin.bias
        return conv
