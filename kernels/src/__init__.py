"""Fused Triton kernels for RoRA (this folder is installed as ``rora_fast.kernels``).

Public API, used by ``rora_fast.functional.rora_linear`` for CUDA tensors:

* ``supports(x, weight, lora_A, lora_B=None, bias=None, x_lora=None) -> bool``
* ``fused_rora_linear(x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed, *,
  validate=True, lora_p=0.0) -> y`` (``x_lora`` None: the LoRA input is ``x``, or, with
  ``lora_p``, its LoRA input dropout drawn by the mask kernel from the seed; ``seed`` an
  int or a one-element int64 tensor; no penalty work: its gradient is added at the
  optimizer step, ``rora_fast.penalty``)

Files, one op each (its autograd Function and backward derivation inside):

* ``mask.py``: the weight keep-mask drawn in Triton (bit-identical to
  ``rora_fast.reference.weight_keep_mask``), ``masked_weight``, ``effective_weight``
  (``c·M⊙W + s·BA`` in the same pass, when the LoRA input is x) and ``keep_mask``.
* ``rora_linear.py``: ``FusedRoraLinearFunction``, ``fused_rora_linear``, ``supports``.
* ``nf4.py``: bitsandbytes 4-bit dequantization and the weight mask in one pass.
* ``_common.py``: interpreter detection, and the record of the mask-strategy decision
  (the masked weight + cuBLAS; the in-loop Philox GEMMs were measured slower and deleted).

Importing this package needs triton but no GPU. Under ``TRITON_INTERPRET=1`` (set
before import) the kernels run on CPU tensors, which is how the tests run in CI.
"""

from .mask import effective_weight, keep_mask, masked_weight
from .rora_linear import FusedRoraLinearFunction, fused_rora_linear, supports

__all__ = [
    "supports",
    "fused_rora_linear",
    "FusedRoraLinearFunction",
    "masked_weight",
    "effective_weight",
    "keep_mask",
]
