"""rora-fast: RoRA (Regularized Low-Rank Adaptation) as fast, drop-in PyTorch modules.

Swap ``nn.Linear`` for :class:`RoraLinear` (or call :func:`apply_rora` on a
transformers model), train with an unchanged loop, then :func:`spectral_rescale_`,
:func:`merge_rora`, :func:`save_rora` or :func:`export_peft_adapter`.
"""

from .functional import rora_linear
from .layer import RoraLinear
from .linalg import sigma_max, sigma_max_lowrank, spectral_basis
from .model import (RoraConfig, apply_rora, attach_penalty, block_index, export_peft_adapter,
                    load_rora,
                    merge_rora, rora_layers, rora_penalty, save_rora, spectral_rescale_)
from .peft_integration import register_rora, spectral_rescale_peft_
from .reference import effective_drop_prob, weight_keep_mask

__version__ = "0.1.0"

__all__ = [
    "RoraLinear",
    "RoraConfig",
    "apply_rora",
    "attach_penalty",
    "block_index",
    "export_peft_adapter",
    "load_rora",
    "merge_rora",
    "rora_layers",
    "rora_penalty",
    "rora_linear",
    "save_rora",
    "sigma_max",
    "sigma_max_lowrank",
    "spectral_basis",
    "spectral_rescale_",
    "effective_drop_prob",
    "register_rora",
    "spectral_rescale_peft_",
    "weight_keep_mask",
]
