"""Which modules RoRA adapts, and the layer class for each (:data:`rora_fast.kinds.KINDS`):
``nn.Linear`` (:class:`~rora_fast.layer.RoraLinear`), bitsandbytes
``Linear4bit``/``Linear8bitLt`` (:class:`~rora_fast.quantized.QuantRoraLinear`) and
transformers ``Conv1D`` (:class:`~rora_fast.conv1d.RoraConv1D`); with the checks
:func:`rora_fast.apply_rora` runs on every target before changing the model."""

from __future__ import annotations

import torch
from torch import nn

from . import validation as V
from .layer import RoraLinear
from .bases import QUANT_INSTALL_HINT, base_dims, base_for, base_kind
from .kinds import KINDS

__all__ = ["is_rora_target", "target_dims", "check_rora_target", "make_rora_layer",
           "compute_dtype_of", "default_target_modules", "DEFAULT_TARGET_MODULES"]

#: PEFT's default LoRA targets by ``config.model_type`` (a list of module-name suffixes,
#: or one regular expression), as in peft 0.21.2 ``utils/constants.py``
#: (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``). Kept here so that
#: ``apply_rora`` on a dense model does not import peft, whose import pulls in
#: bitsandbytes (and its hub-kernel probe) when that is installed;
#: tests/test_model.py checks it against the installed peft's table.
DEFAULT_TARGET_MODULES = {
    't5': ['q', 'v'],
    'mt5': ['q', 'v'],
    'bart': ['q_proj', 'v_proj'],
    'gpt2': ['c_attn'],
    'bloom': ['query_key_value'],
    'blip-2': ['q', 'v', 'q_proj', 'v_proj'],
    'opt': ['q_proj', 'v_proj'],
    'gptj': ['q_proj', 'v_proj'],
    'gpt_neox': ['query_key_value'],
    'gpt_neo': ['q_proj', 'v_proj'],
    'bert': ['query', 'value'],
    'roberta': ['query', 'value'],
    'xlm-roberta': ['query', 'value'],
    'electra': ['query', 'value'],
    'deberta-v2': ['query_proj', 'value_proj'],
    'deberta': ['in_proj'],
    'layoutlm': ['query', 'value'],
    'llama': ['q_proj', 'v_proj'],
    'llama4': ['q_proj', 'v_proj'],
    'chatglm': ['query_key_value'],
    'gpt_bigcode': ['c_attn'],
    'mpt': ['Wqkv'],
    'RefinedWebModel': ['query_key_value'],
    'RefinedWeb': ['query_key_value'],
    'falcon': ['query_key_value'],
    'btlm': ['c_proj', 'c_attn'],
    'codegen': ['qkv_proj'],
    'mistral': ['q_proj', 'v_proj'],
    'mixtral': ['q_proj', 'v_proj'],
    'stablelm': ['q_proj', 'v_proj'],
    'phi': ['q_proj', 'v_proj', 'fc1', 'fc2'],
    'gemma': ['q_proj', 'v_proj'],
    'gemma2': ['q_proj', 'v_proj'],
    'gemma3_text': ['q_proj', 'v_proj'],
    'gemma4': '.*language_model\\..*\\.(q_proj|v_proj)',
    'qwen2': ['q_proj', 'v_proj'],
    'qwen3': ['q_proj', 'v_proj'],
    'nemotron_h': ['q_proj', 'k_proj', 'v_proj', 'o_proj'],
    'rwkv': ['key', 'value', 'receptance', 'output'],
    'rwkv7': ['r_proj', 'k_proj', 'v_proj', 'o_proj', 'key', 'value'],
}


def is_rora_target(module: nn.Module) -> bool:
    """Whether :func:`make_rora_layer` can wrap ``module``: an ``nn.Linear``, a bitsandbytes
    4-bit/8-bit linear, or a transformers ``Conv1D``."""
    return base_kind(module) is not None


#: ``(in_features, out_features)`` of a RoRA target (:func:`rora_fast.bases.base_dims`)
target_dims = base_dims


def check_rora_target(module: nn.Module, config, name: str) -> None:
    """What :func:`rora_fast.model.plan_rora` checks for each target before changing the
    model: the ranks fit the shape; a dense weight is floating point, 2-D and finite (a
    ``Conv1D``'s on its ``(out, in)`` view); a quantized layer needs bitsandbytes
    importable (the install hint otherwise), is quantized already, and uses neither
    PiSSA/OLoRA nor DoRA."""
    n_in, n_out = target_dims(module)
    V.check_layer_shape(config.r, config.ortho_rank, n_in, n_out, name=name)
    base_for(module).check_target(module, name, config.variant)


def compute_dtype_of(module: nn.Module, name: str = "") -> torch.dtype:
    """The dtype a RoRA layer over ``module`` computes in: the weight's for ``nn.Linear``
    and ``Conv1D``, bitsandbytes' ``compute_dtype`` for a 4-bit base. ValueError for a
    base that has none (an 8-bit base computes in its input's dtype, unknown before the
    first call)."""
    cd = base_for(module).fixed_compute_dtype(module)
    if cd is not None:
        return cd
    label = f"{name!r}: " if name else ""
    raise ValueError(f"{label}autocast_adapter_dtype=False needs the base's compute dtype, "
                     f"which a {type(module).__name__} does not fix (it computes in its "
                     "input's dtype); keep autocast_adapter_dtype=True (float32 adapters)")


def make_rora_layer(module: nn.Module, name: str = "", config=None, **kwargs) -> RoraLinear:
    """The RoRA layer for ``module``: :class:`~rora_fast.quantized.QuantRoraLinear` for a
    bitsandbytes layer, :class:`~rora_fast.conv1d.RoraConv1D` for a ``Conv1D``,
    :class:`RoraLinear` for an ``nn.Linear`` (the row of :data:`rora_fast.kinds.KINDS`).

    ``config``: a :class:`rora_fast.RoraConfig` (its ``layer_kwargs()``) and/or keyword
    arguments of :class:`RoraLinear`. ``name`` only labels the error for an unsupported
    module type.
    """
    kw = dict(config.layer_kwargs()) if config is not None else {}
    kw.update(kwargs)
    row = KINDS.get(base_kind(module))
    if row is None:
        label = f"{name!r}: " if name else ""
        raise TypeError(f"{label}RoRA adapts nn.Linear, bitsandbytes Linear4bit/Linear8bitLt "
                        f"and transformers Conv1D layers, got {type(module).__name__}")
    w = getattr(module, "weight", None)
    if not row.base.child and w is not None and w.dtype in (torch.uint8, torch.int8):
        raise TypeError(f"the weight is {w.dtype}: a quantized layer that is not a "
                        "bitsandbytes Linear4bit/Linear8bitLt (RoRA supports "
                        f"bitsandbytes bases: {QUANT_INSTALL_HINT})")
    return row.build(module, **kw)


def default_target_modules(model: nn.Module):
    """PEFT's default LoRA targets for the model's architecture (``config.model_type``):
    :data:`DEFAULT_TARGET_MODULES`, or, for a type newer than that table, the installed
    peft's."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = DEFAULT_TARGET_MODULES.get(model_type)
    if targets is None and model_type is not None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if targets is None:
        raise ValueError(f"no default target modules for model_type {model_type!r}; pass "
                         "RoraConfig(target_modules=[...]) or target_modules='all-linear'")
    return targets if isinstance(targets, str) else list(targets)
