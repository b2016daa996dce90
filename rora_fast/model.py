"""Model-level API: apply RoRA to a model, rescale, merge (this module); save, load and
export are in :mod:`rora_fast.persistence` (still importable from here).

Every function here that changes a model is all-or-nothing: it checks what it can
before changing anything (targets, shapes, ranks, finite base weights, saved
adapters), and if something still fails midway it puts the model back exactly as it
was -- module tree, parameters and buffers, ``requires_grad`` flags, the weights it
wrote and the layers' scales (:class:`ModelState`).
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .blocks import block_index, select_top_blocks  # noqa: F401 (block_index: public)
from .config import RoraConfig
from .layer import RoraLinear
from .linalg import paper_scale
from .variants import peft_variant
from .bases import base_for, cpu_repack_switches
from .targets import (check_rora_target, compute_dtype_of,  # bnb, Conv1D
                      default_target_modules, is_rora_target, make_rora_layer)

__all__ = [
    "RoraConfig",
    "apply_rora",
    "rora_layers",
    "spectral_rescale_",
    "peft_lora_layers",
    "merge_rora",
    "block_index",
    "default_target_modules",
    "ModelState",
]

HEAD_NAMES = ("classifier", "score")
_OUTPUT_NAMES = ("lm_head", "classifier", "score", "cls", "qa_outputs", "output_layer")
_MISSING = object()


# ---------------------------------------------------------------------- all-or-nothing
class ModelState:
    """What a model change may touch, recorded so that :meth:`restore` puts it back
    exactly: every module's child modules, parameters and buffers (the objects), every
    parameter's ``requires_grad``, copies of the given ``tensors`` (those the change
    writes in place) and the given ``(object, attribute)`` values (``_MISSING``-aware:
    an attribute that did not exist is deleted again).

    Cost: references for the tree, plus one copy of each tensor in ``tensors`` -- pass
    only what the change writes (adapters, or the base weights a merge or a
    PiSSA/OLoRA fold rewrites)."""

    def __init__(self, model: nn.Module, tensors: Iterable[torch.Tensor] = (),
                 attrs: Iterable[Tuple[object, str]] = ()):
        self.modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers))
                        for m in model.modules()]
        seen = set()
        self.flags = []
        for _, _, params, _ in self.modules:
            for p in params.values():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    self.flags.append((p, p.requires_grad))
        self.data = []
        seen = set()
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                self.data.append((t, t.detach().clone()))
        # values, not copies: restored by identity (scales are floats, configs objects)
        self.attrs = [(obj, name, getattr(obj, name, _MISSING)) for obj, name in attrs]

    def restore(self) -> None:
        for m, children, params, buffers in self.modules:
            for d, saved in ((m._modules, children), (m._parameters, params),
                             (m._buffers, buffers)):
                d.clear()
                d.update(saved)
        with torch.no_grad():
            for t, saved in self.data:
                t.copy_(saved)
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for obj, name, value in self.attrs:
            if value is _MISSING:
                if name in getattr(obj, "__dict__", {}):
                    delattr(obj, name)
            else:
                setattr(obj, name, value)


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, tensors: Iterable[torch.Tensor] = (),
                   attrs: Iterable[Tuple[object, str]] = ()):
    """Run the block as one change of ``model``: on any exception (``KeyboardInterrupt``
    included) the model is restored (:class:`ModelState`) and the exception re-raised."""
    state = ModelState(model, tensors, attrs)
    try:
        yield state
    except BaseException:
        state.restore()
        raise


def layer_attrs(layer) -> List[Tuple[object, str]]:
    return [(layer, n) for n in ("scaling", "rescaled", "init_scaling")]


def _reraise_named(e: Exception, name: str):
    """The same exception type with the module name in front of the message."""
    try:
        new = type(e)(f"{name}: {e}")
    except Exception:  # an exception type that does not take one message
        raise e
    raise new from e


# ---------------------------------------------------------------------- targets
def _matches(name: str, target) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _is_output_layer(model: nn.Module, name: str, module: nn.Module) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and module is out:
        return True
    first = name.split(".")[0]
    return first in _OUTPUT_NAMES


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def rora_layers(model: nn.Module) -> Iterator[Tuple[str, RoraLinear]]:
    """Iterate ``(name, layer)`` over the RoRA layers of a model."""
    for name, module in model.named_modules():
        if isinstance(module, RoraLinear):
            yield name, module


def resolve_modules_to_save(model: nn.Module, config: RoraConfig) -> List[str]:
    if config.modules_to_save is not None:
        return list(config.modules_to_save)
    names = dict(model.named_children())
    return [n for n in HEAD_NAMES if n in names]


def plan_rora(model: nn.Module, config: RoraConfig) -> Tuple[List[str], List[str]]:
    """What :func:`apply_rora` would do, checked without changing anything: returns
    ``(target layer names, modules_to_save)``. Raises (naming the module) for a model
    that already has RoRA layers, targets that match nothing or a non-``nn.Linear``,
    a rank or ``ortho_rank`` too large for a target's shape, a base weight that is not
    floating point or not finite, and ``modules_to_save`` entries that match nothing."""
    if not isinstance(config, RoraConfig):
        raise TypeError(f"config must be a RoraConfig, got {type(config).__name__}")
    if any(True for _ in rora_layers(model)):
        raise ValueError("the model already has RoRA layers; apply_rora twice would wrap "
                         "them again")
    chosen, save = resolve_targets(model, config)
    for name in chosen:
        check_rora_target(model.get_submodule(name), config, name)
    return chosen, save


def resolve_targets(model: nn.Module, config: RoraConfig) -> Tuple[List[str], List[str]]:
    """The names :func:`apply_rora` would adapt and train fully, from the module names and
    types alone (a model built on the ``meta`` device will do: no weight is read). Raises
    for targets that match nothing (or only ``modules_to_save`` modules) or a module that
    is not linear, and ``modules_to_save`` entries that match nothing; warns, naming them,
    about ``target_modules`` list entries that match nothing while others do."""
    target = config.target_modules
    if target is None:
        target = default_target_modules(model)
    save = resolve_modules_to_save(model, config)
    chosen: List[str] = []
    in_save: List[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if any(name == s or name.startswith(s + ".") or name.endswith("." + s) or
               (".%s." % s) in ("." + name + ".") for s in save):
            if target != "all-linear" and _matches(name, target):
                in_save.append(name)
            continue
        if target == "all-linear":
            if is_rora_target(module) and not _is_output_layer(model, name, module):
                chosen.append(name)
        elif _matches(name, target):
            if not is_rora_target(module):
                raise TypeError(f"target module {name!r} is a {type(module).__name__}, "
                                "not an nn.Linear, bitsandbytes Linear4bit/Linear8bitLt or "
                                "Conv1D; RoRA adapts linear layers only")
            chosen.append(name)
    if not chosen:
        if in_save:
            raise ValueError(f"target_modules {target!r} match only modules that are trained "
                             f"fully (modules_to_save {save}): {in_save}; RoRA adapts the "
                             f"frozen layers, so name others or change modules_to_save")
        raise ValueError(f"target_modules {target!r} match no nn.Linear in "
                         f"{type(model).__name__}")
    if isinstance(target, (list, tuple)):
        unmatched = [t for t in target if not any(_matches(n, [t]) for n in chosen + in_save)]
        if unmatched:
            warnings.warn(f"target_modules entries {unmatched} match no module of "
                          f"{type(model).__name__}; the others adapt {len(chosen)} layers",
                          UserWarning, stacklevel=4)
    names = [n for n, _ in model.named_modules()]
    for s in save:
        if not any(n == s or n.endswith("." + s) for n in names):
            raise ValueError(f"modules_to_save entry {s!r} matches no module")
    return chosen, save


def apply_rora(model: nn.Module, config: Optional[RoraConfig] = None,
               progress: bool = False, *, autocast_adapter_dtype: bool = True) -> nn.Module:
    """Replace the target ``nn.Linear`` modules of ``model`` with :class:`RoraLinear`,
    in place, and freeze everything else except ``config.modules_to_save``.

    ``autocast_adapter_dtype`` (as PEFT's ``get_peft_model`` argument): True keeps the
    adapters of a float16/bfloat16 base in float32 (each training call casts them to the
    compute dtype); False stores them in the base's compute dtype (no casts; half-precision
    adapters and SVD bases). Not a ``RoraConfig`` field: it says how this model's
    parameters are stored, not what is trained (``load_rora`` casts to the model's
    dtypes).

    Returns the model. Everything is checked first (:func:`plan_rora`); if wrapping
    still fails on some layer, the model is restored exactly (nothing wrapped, nothing
    frozen) and the error names the layer.
    """
    config = RoraConfig() if config is None else config
    if not isinstance(autocast_adapter_dtype, bool):
        raise TypeError(f"autocast_adapter_dtype must be a bool, got {autocast_adapter_dtype!r}")
    chosen, save = plan_rora(model, config)
    extra = {} if autocast_adapter_dtype else {
        name: dict(adapter_dtype=compute_dtype_of(model.get_submodule(name), name))
        for name in chosen}
    # PiSSA/OLoRA rewrite the base weight in place: keep copies to undo that
    rewritten = [model.get_submodule(n).weight for n in chosen] \
        if config.variant.rewrites_base else []
    # bitsandbytes must not rewrite the frozen 4-bit layers at an eval forward (on the CPU)
    repack = cpu_repack_switches(model)
    with all_or_nothing(model, rewritten, [(model, "rora_config"), *repack]):
        for m, attr in repack:
            setattr(m, attr, False)
        for p in model.parameters():
            p.requires_grad_(False)
        iterator: Iterable[str] = chosen
        if progress:
            from .progress import progress_bar

            iterator = progress_bar(chosen, desc="RoRA: SVD bases", unit="layer")
        for name in iterator:
            linear = model.get_submodule(name)
            try:
                layer = make_rora_layer(linear, name, config, **extra.get(name, {}))
            except Exception as e:
                _reraise_named(e, name)
            _set_submodule(model, name, layer)
        for s in save:
            for name, module in model.named_modules():
                if name == s or name.endswith("." + s):
                    for p in module.parameters():
                        p.requires_grad_(True)
        model.rora_config = config
    return model


def peft_lora_layers(model: nn.Module, adapter_name: str = "default"
                     ) -> Iterator[Tuple[str, nn.Module]]:
    """Iterate ``(name, layer)`` over the PEFT LoRA layers of a model that hold the adapter
    ``adapter_name`` (the RoRA layers :func:`rora_fast.register_rora` makes, and plain
    PEFT LoRA layers); recognised by their ``lora_A`` module dict, without importing
    PEFT."""
    for name, m in model.named_modules():
        lora_A = getattr(m, "lora_A", None)
        if (isinstance(lora_A, nn.ModuleDict) and adapter_name in lora_A
                and hasattr(m, "get_base_layer")):
            yield name, m


def _peft_sigma_pre(layer: nn.Module) -> float:
    """σ_max(W_pre) of a PEFT layer: the RoRA basis's (register_rora's layers, taken before
    any init rewrote the base), else exactly from the base weight (plain PEFT LoRA)."""
    s = getattr(layer, "rora_sigma_pre", None)
    if s is not None:
        return s
    base = layer.get_base_layer()
    W = base_for(base).dense_weight(base, torch.float32)
    return float(torch.linalg.matrix_norm(W.detach(), 2))


def spectral_rescale_(model: nn.Module, layers: Union[int, Sequence[str], None] = None,
                      adapter_name: str = "default", factor: float = 1.0) -> Dict[str, float]:
    """Post-training spectral rescaling: ``scaling = factor · σ_max(W_pre) / σ_max(update)``
    (``factor`` 1: the paper's rule), the one rescale of every RoRA layer.

    The layers: rora_fast's (:func:`apply_rora`; the update is ``BA``, or ``BA − B₀A₀``
    for PiSSA/OLoRA, whose base absorbs the change of scale,
    :meth:`RoraLinear.spectral_rescale_`) and PEFT LoRA layers holding the adapter
    ``adapter_name`` (those :func:`rora_fast.register_rora` makes, and plain PEFT LoRA:
    ``scaling[adapter_name]`` set, σ_max(W_pre) computed exactly from the base weight).
    Every layer's σ_max(update) comes from its variant object (:func:`peft_layer_variant`
    for PEFT layers: a plain PEFT PiSSA/OLoRA adapter is refused, naming the layer).

    ``layers``: an int ``n`` rescales those of the last ``n`` transformer blocks (block
    index read from module names; default ``config.rescale_layers`` or 3); a list of
    module names rescales exactly those. Returns ``{name: s}``.

    ``factor``: a finite positive multiple of the paper's scale (below 1 a milder
    amplification of the trained update; :func:`rora_fast.adaptive_rescale_` chooses it
    on clean data).

    All or nothing: every chosen layer's new scale is computed and checked (finite,
    > 0: a zero update is an error naming the layer) before any layer changes; a
    failure while applying them restores every scale and weight.
    """
    if (isinstance(factor, bool) or not isinstance(factor, (int, float))
            or not math.isfinite(factor) or factor <= 0):
        raise ValueError(f"factor must be a finite number > 0, got {factor!r}")
    rl = dict(rora_layers(model))
    pl = dict(peft_lora_layers(model, adapter_name))
    if not rl and not pl:
        raise ValueError("the model has no RoRA layers (apply_rora, or register_rora before "
                         "get_peft_model) and no PEFT LoRA layers with the adapter "
                         f"{adapter_name!r}")
    if layers is None:
        layers = getattr(getattr(model, "rora_config", None), "rescale_layers", 3)
    names = select_top_blocks(model, list(rl) + list(pl), layers)
    new = {}
    for n in names:  # check every layer before changing any
        factors = ((rl[n].lora_A, rl[n].lora_B) if n in rl else
                   (pl[n].lora_A[adapter_name].weight, pl[n].lora_B[adapter_name].weight))
        if not all(bool(torch.isfinite(t).all()) for t in factors):
            raise ValueError(f"{n}: cannot rescale: the adapter (lora_A / lora_B) holds NaN or "
                             f"inf (did training diverge?); no layer was changed")
        if n in rl:
            new[n] = factor * paper_scale(rl[n].sigma_pre, rl[n].sigma_delta(), n)
        else:
            sigma = peft_layer_variant(model, n, pl[n], adapter_name).sigma_update(
                _PeftAdapter(pl[n], adapter_name))
            new[n] = factor * paper_scale(_peft_sigma_pre(pl[n]), sigma, n)
    return _apply_scales(model, rl, pl, new, adapter_name)


class _PeftAdapter:
    """One adapter of a PEFT LoRA layer seen as the variant objects see a layer
    (``lora_A``/``lora_B`` tensors)."""

    def __init__(self, layer: nn.Module, adapter_name: str):
        self.lora_A = layer.lora_A[adapter_name].weight
        self.lora_B = layer.lora_B[adapter_name].weight


def peft_layer_variant(model: nn.Module, name: str, layer: nn.Module,
                       adapter_name: str = "default"):
    """The variant object (:mod:`rora_fast.variants`) of a PEFT LoRA layer's adapter:
    the one :func:`rora_fast.register_rora`'s layers carry, else the one of the model's
    ``peft_config[adapter_name]`` (plain PEFT LoRA). Refused, naming the layer: a plain
    PEFT layer of a model without that config (its start is unknown), and a PiSSA/OLoRA
    start (PEFT keeps neither the start ``B₀A₀`` nor a way to re-fold the base, so a new
    scale would also rescale W_pre's top components that the adapter carries)."""
    variant = getattr(layer, "rora_variant", None)
    if variant is not None:
        return variant
    configs = getattr(model, "peft_config", None)
    cfg = configs.get(adapter_name) if isinstance(configs, Mapping) else None
    if cfg is None:
        raise ValueError(f"{name}: a plain PEFT LoRA layer, and the model has no "
                         f"peft_config[{adapter_name!r}] saying how its adapter started; "
                         "pass the PeftModel that get_peft_model returned")
    variant = peft_variant(getattr(cfg, "init_lora_weights", True),
                           getattr(cfg, "use_dora", False))
    if variant.rewrites_base:
        raise ValueError(f"{name}: cannot rescale a plain PEFT adapter with {variant.label}: "
                         "PEFT keeps neither its start B0A0 nor a way to re-fold the base, "
                         "so a new scale would rescale W_pre's top components too; train it "
                         "with rora_fast.apply_rora(RoraConfig(init=...)) instead")
    return variant


def _apply_scales(model, rl, pl, new: Dict[str, float], adapter_name: str,
                  training_scale_resets: bool = False) -> Dict[str, float]:
    """Set checked scales, all or nothing: rora_fast layers through their rescale (the
    PiSSA/OLoRA re-fold of the base; ``rescaled`` True, or with ``training_scale_resets``
    False for a scale equal to the training scale ``alpha/r``), PEFT layers'
    ``scaling[adapter_name]``."""
    ours = [n for n in new if n in rl]
    rewritten = [rl[n].weight for n in ours if rl[n].variant.rewrites_base]
    attrs = [a for n in ours for a in layer_attrs(rl[n])]
    old_peft = {n: pl[n].scaling[adapter_name] for n in new if n not in rl}
    out = {}
    with all_or_nothing(model, rewritten, attrs):
        try:
            for n, s in new.items():
                if n in rl:
                    out[n] = rl[n]._set_rescaled_(s)
                    if training_scale_resets:
                        rl[n].rescaled = s != rl[n].lora_alpha / rl[n].r
                else:
                    pl[n].scaling[adapter_name] = out[n] = s
        except BaseException:
            for n, s in old_peft.items():
                pl[n].scaling[adapter_name] = s
            raise
    return out


def adapter_scales(model: nn.Module, adapter_name: str = "default") -> Dict[str, float]:
    """``{name: scale}`` of every RoRA layer and PEFT LoRA layer (``adapter_name``): the
    state :func:`set_scales_` restores."""
    out = {n: float(m.scaling) for n, m in rora_layers(model)}
    out.update({n: float(m.scaling[adapter_name])
                for n, m in peft_lora_layers(model, adapter_name)})
    return out


def set_scales_(model: nn.Module, scales: Mapping[str, float],
                adapter_name: str = "default") -> Dict[str, float]:
    """Set the update's scale of the named layers (rora_fast or PEFT LoRA), the way the
    rescale sets it: a PiSSA/OLoRA base absorbs the change (re-fold), a layer set back to
    its training scale ``alpha/r`` counts as not rescaled. For scale sweeps and for
    restoring :func:`adapter_scales`. Every name and value is checked first (finite,
    > 0); all or nothing. Returns ``{name: s}``."""
    rl = dict(rora_layers(model))
    pl = dict(peft_lora_layers(model, adapter_name))
    new = {}
    for n, s in scales.items():
        if n not in rl and n not in pl:
            raise ValueError(f"set_scales_: {n!r} is not a RoRA or PEFT LoRA layer "
                             f"(adapter {adapter_name!r}) of the model")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) \
                or s <= 0:
            raise ValueError(f"set_scales_: the scale of {n} must be a finite number > 0, "
                             f"got {s!r}")
        if n not in rl:
            peft_layer_variant(model, n, pl[n], adapter_name)  # refuses what it cannot rescale
        new[n] = float(s)
    return _apply_scales(model, rl, pl, new, adapter_name, training_scale_resets=True)


def merge_rora(model: nn.Module) -> nn.Module:
    """Fold every RoRA layer's adapter into its base weight, leaving plain ``nn.Linear``s.

    The eval output is unchanged. The base weights are updated in place. All or
    nothing: the base weights are copied first (one copy of the adapted layers'
    weights) and restored, with the RoRA layers, if any merge fails or gives a
    non-finite weight.
    """
    layers = list(rora_layers(model))
    with all_or_nothing(model, [lay.weight for _, lay in layers], [(model, "rora_config")]):
        for name, layer in layers:
            lin = layer.merged_linear()
            if not bool(torch.isfinite(lin.weight).all()):
                raise ValueError(f"{name}: merging gives a non-finite weight (adapter or "
                                 "DoRA magnitude not finite?); the model was left unmerged")
            _set_submodule(model, name, lin)
        if hasattr(model, "rora_config"):
            del model.rora_config
    return model
