"""rora-fast: RoRA (Regularized Low-Rank Adaptation) as fast, drop-in PyTorch modules.

Swap ``nn.Linear`` for :class:`RoraLinear` (or call :func:`apply_rora` on a
transformers model), train with an unchanged loop, then :func:`spectral_rescale_`,
:func:`merge_rora`, :func:`save_rora` or :func:`export_peft_adapter`.
"""

import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys


class _SourceKernelsFinder(_abc.MetaPathFinder):
    """``rora_fast.kernels`` in a source checkout that was not installed.

    setup.py installs the folder ``kernels/src/`` as ``rora_fast.kernels`` (``package_dir``;
    kernels/README.md says why). Run from the repository root without an install
    (``PYTHONPATH=.``, or a machine where ``pip install -e`` is impossible), ``rora_fast`` is imported from
    ``./rora_fast`` and the kernels sit beside it, not inside: this finder, consulted
    after every other one, maps the name to ``./kernels/src``. Installed copies never reach it.
    """

    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname != __name__ + ".kernels":
            return None
        init = _os.path.join(self.root, "kernels", "src", "__init__.py")
        return _util.spec_from_file_location(
            fullname, init, submodule_search_locations=[_os.path.dirname(init)])


def _register_source_kernels() -> None:
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    if (not _os.path.isdir(_os.path.join(here, "kernels"))
            and _os.path.isfile(_os.path.join(root, "kernels", "src", "__init__.py"))
            and _os.path.isfile(_os.path.join(root, "setup.py"))
            and not any(isinstance(f, _SourceKernelsFinder) for f in _sys.meta_path)):
        _sys.meta_path.append(_SourceKernelsFinder(root))


_register_source_kernels()

from .functional import rora_linear  # noqa: E402
from .adaptive import (RescaleStep, adaptive_rescale_, dev_accuracy, dev_logits,  # noqa: E402
                       factor_ladder)
from .data import Example  # noqa: E402
from .finetuning import FinetuneConfig, finetune, save_finetuned  # noqa: E402
from .layer import RoraLinear  # noqa: E402
from . import conv1d, quantized  # noqa: E402,F401 (layer classes of kinds.KINDS, named there)
from .linalg import sigma_max, sigma_max_lowrank, spectral_basis  # noqa: E402
from .model import (RoraConfig, adapter_scales, apply_rora, block_index,  # noqa: E402
                    merge_rora, resolve_targets, rora_layers, set_scales_,
                    spectral_rescale_)
from .persistence import export_peft_adapter, load_rora, save_rora  # noqa: E402
from .peft_integration import register_rora, spectral_rescale_peft_  # noqa: E402
from .penalty import add_penalty_grads, rora_penalty  # noqa: E402
from .reference import effective_drop_prob, weight_keep_mask  # noqa: E402
# the public submodules (named in __all__, as numpy names linalg): each lists its API in its
# own __all__; every other module is internal. trainer and distributed import on first use
# (transformers' Trainer takes seconds to import).
from . import adaptive, atomic, blocks, loop, repair, userdata  # noqa: E402,F401
_LAZY_MODULES = ("trainer", "distributed")


def __getattr__(name):
    if name in _LAZY_MODULES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "RoraLinear",
    "RoraConfig",
    "RescaleStep",
    "Example",
    "FinetuneConfig",
    "finetune",
    "save_finetuned",
    "adaptive_rescale_",
    "dev_accuracy",
    "dev_logits",
    "factor_ladder",
    "apply_rora",
    "adapter_scales",
    "set_scales_",
    "add_penalty_grads",
    "block_index",
    "export_peft_adapter",
    "load_rora",
    "merge_rora",
    "resolve_targets",
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
    # public submodules
    "adaptive",
    "atomic",
    "blocks",
    "distributed",
    "loop",
    "repair",
    "trainer",
    "userdata",
]
