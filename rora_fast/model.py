"""Model-level API: apply RoRA to a model, rescale, merge, save, load, export."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .layer import INITS, PENALTY_MODES, RoraLinear

__all__ = [
    "RoraConfig",
    "apply_rora",
    "rora_layers",
    "rora_penalty",
    "attach_penalty",
    "spectral_rescale_",
    "merge_rora",
    "save_rora",
    "load_rora",
    "export_peft_adapter",
    "block_index",
    "default_target_modules",
]

FORMAT_VERSION = 1
CONFIG_NAME = "rora_config.json"
WEIGHTS_NAME = "rora_adapter.safetensors"
_HEAD_NAMES = ("classifier", "score")
_OUTPUT_NAMES = ("lm_head", "classifier", "score", "cls", "qa_outputs", "output_layer")
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)(?:\.|$)")


@dataclass
class RoraConfig:
    """Hyper-parameters of RoRA for a whole model (paper defaults).

    ``target_modules``: ``None`` (PEFT's per-architecture default, e.g. ``query``/``value``
    for BERT and RoBERTa, ``q_proj``/``v_proj`` for LLaMA), a list of module-name
    suffixes, a regular expression (full match on the module name) or ``"all-linear"``.
    ``modules_to_save``: modules trained fully (``None``: the classification head,
    ``classifier`` or ``score``, if the model has one).
    """

    r: int = 8
    alpha: float = 16
    weight_dropout: float = 0.1
    lora_dropout: float = 0.0
    ortho_rank: int = 32
    ortho_lambda: float = 10.0
    target_modules: Optional[Union[str, List[str]]] = None
    modules_to_save: Optional[List[str]] = None
    rescale_layers: int = 3
    init: str = "default"
    use_dora: bool = False
    penalty_mode: str = "backward"
    svd_method: str = "auto"

    def __post_init__(self):
        if self.svd_method not in ("auto", "exact", "randomized"):
            raise ValueError(f"svd_method must be auto, exact or randomized, got "
                             f"{self.svd_method!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.penalty_mode not in PENALTY_MODES:
            raise ValueError(f"penalty_mode must be one of {PENALTY_MODES}, got "
                             f"{self.penalty_mode!r}")
        if isinstance(self.rescale_layers, bool) or not isinstance(self.rescale_layers, int) \
                or self.rescale_layers < 0:
            raise ValueError(f"rescale_layers must be an int >= 0, got {self.rescale_layers!r}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RoraConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown RoraConfig fields {sorted(unknown)}")
        return cls(**d)

    def layer_kwargs(self) -> dict:
        return dict(r=self.r, alpha=self.alpha, weight_dropout=self.weight_dropout,
                    lora_dropout=self.lora_dropout, ortho_rank=self.ortho_rank,
                    ortho_lambda=self.ortho_lambda, penalty_mode=self.penalty_mode,
                    init=self.init, use_dora=self.use_dora, svd_method=self.svd_method)


def default_target_modules(model: nn.Module) -> List[str]:
    """PEFT's default LoRA targets for the model's architecture."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in M:
        raise ValueError(f"no default target modules for model_type {model_type!r}; pass "
                         "RoraConfig(target_modules=[...]) or target_modules='all-linear'")
    return list(M[model_type])


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


def _resolve_modules_to_save(model: nn.Module, config: RoraConfig) -> List[str]:
    if config.modules_to_save is not None:
        return list(config.modules_to_save)
    names = dict(model.named_children())
    return [n for n in _HEAD_NAMES if n in names]


def apply_rora(model: nn.Module, config: Optional[RoraConfig] = None,
               progress: bool = False) -> nn.Module:
    """Replace the target ``nn.Linear`` modules of ``model`` with :class:`RoraLinear`,
    in place, and freeze everything else except ``config.modules_to_save``.

    Returns the model. Raises if the targets match nothing or match a module that is
    not an ``nn.Linear``.
    """
    config = config or RoraConfig()
    if any(True for _ in rora_layers(model)):
        raise ValueError("the model already has RoRA layers; apply_rora twice would wrap "
                         "them again")
    target = config.target_modules
    if target is None:
        target = default_target_modules(model)
    save = _resolve_modules_to_save(model, config)
    chosen: List[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if any(name == s or name.startswith(s + ".") or name.endswith("." + s) or
               (".%s." % s) in ("." + name + ".") for s in save):
            continue
        if target == "all-linear":
            if isinstance(module, nn.Linear) and not _is_output_layer(model, name, module):
                chosen.append(name)
        elif _matches(name, target):
            if not isinstance(module, nn.Linear):
                raise TypeError(f"target module {name!r} is a {type(module).__name__}, "
                                "not an nn.Linear; RoRA adapts linear layers only")
            chosen.append(name)
    if not chosen:
        raise ValueError(f"target_modules {target!r} match no nn.Linear in "
                         f"{type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    iterator: Iterable[str] = chosen
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(chosen, desc="RoRA: SVD bases", unit="layer")
    for name in iterator:
        linear = model.get_submodule(name)
        _set_submodule(model, name, RoraLinear.from_linear(linear, **config.layer_kwargs()))
    for s in save:
        found = False
        for name, module in model.named_modules():
            if name == s or name.endswith("." + s):
                found = True
                for p in module.parameters():
                    p.requires_grad_(True)
        if not found:
            raise ValueError(f"modules_to_save entry {s!r} matches no module")
    model.rora_config = config
    return model


def rora_penalty(model: nn.Module) -> torch.Tensor:
    """The current ``λ Σ_layers Ω(A, B)`` of the model.

    With ``penalty_mode="loss"`` it is differentiable: add it to the loss. In the
    other modes the layers apply the penalty's gradient themselves and this value is
    detached (for logging only), so adding it to a loss cannot count it twice.
    """
    values = [layer.penalty() for _, layer in rora_layers(model)]
    from .peft_integration import peft_rora_layers

    values += [layer.rora_penalty() for _, layer in peft_rora_layers(model)]
    if not values:
        raise ValueError("the model has no RoRA layers")
    total = values[0]
    for v in values[1:]:
        total = total + v.to(total.device)
    return total


def attach_penalty(optimizer: torch.optim.Optimizer, model: nn.Module):
    """For ``penalty_mode="optimizer"``: add ``λ∇Ω`` to the adapter gradients in a
    pre-step hook of ``optimizer``, exactly once per ``optimizer.step()`` (after AMP's
    gradient unscaling, before the update). Returns the hook handle."""
    layers = [layer for _, layer in rora_layers(model) if layer.penalty_mode == "optimizer"]
    if not layers:
        raise ValueError("the model has no RoRA layer with penalty_mode='optimizer'")
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for layer in layers:
        if id(layer.lora_A) not in owned and id(layer.lora_B) not in owned:
            raise ValueError("the optimizer does not hold the adapters of the model's RoRA "
                             "layers")
        layer._penalty_attached = True

    def hook(opt, args, kwargs):
        for layer in layers:
            layer.add_penalty_grad_()

    return optimizer.register_step_pre_hook(hook)


def block_index(name: str) -> Optional[int]:
    """Transformer block index read from a module name (``...layer.7.attention...``)."""
    m = None
    for m in _BLOCK_RE.finditer(name):
        pass
    return int(m.group(1)) if m else None


def select_top_blocks(model: nn.Module, candidates: List[str],
                      layers: Union[int, Sequence[str]]) -> List[str]:
    """The names among ``candidates`` chosen by ``layers``: an int ``n`` picks those in
    the last ``n`` transformer blocks of ``model`` (block index read from module names);
    a list of names is checked against ``candidates`` and returned as is."""
    if isinstance(layers, int) and not isinstance(layers, bool):
        if layers < 0:
            raise ValueError(f"layers must be >= 0, got {layers}")
        indices = [i for i in (block_index(n) for n, _ in model.named_modules())
                   if i is not None]
        if not indices:
            raise ValueError("cannot find transformer block indices in the module names; "
                             "pass an explicit list of layer names")
        first = max(indices) - layers + 1
        return [n for n in candidates if block_index(n) is not None and block_index(n) >= first]
    names = list(layers)
    missing = [n for n in names if n not in candidates]
    if missing:
        raise ValueError(f"not RoRA layers of this model: {missing}")
    return names


def spectral_rescale_(model: nn.Module, layers: Union[int, Sequence[str], None] = None
                      ) -> Dict[str, float]:
    """Post-training spectral rescaling: ``scaling = σ_max(W_pre) / σ_max(BA)``.

    ``layers``: an int ``n`` rescales the RoRA layers of the last ``n`` transformer
    blocks (block index read from module names; default ``config.rescale_layers`` or
    3); a list of module names rescales exactly those. Returns ``{name: s}``.
    """
    rl = dict(rora_layers(model))
    if not rl:
        raise ValueError("the model has no RoRA layers")
    if layers is None:
        layers = getattr(getattr(model, "rora_config", None), "rescale_layers", 3)
    names = select_top_blocks(model, list(rl), layers)
    out = {}
    for n in names:
        try:
            out[n] = rl[n].spectral_rescale_()
        except ValueError as e:
            raise ValueError(f"{n}: {e}") from None
    return out


def merge_rora(model: nn.Module) -> nn.Module:
    """Fold every RoRA layer's adapter into its base weight, leaving plain ``nn.Linear``s.

    The eval output is unchanged. The base weights are updated in place.
    """
    for name, layer in list(rora_layers(model)):
        _set_submodule(model, name, layer.merged_linear())
    if hasattr(model, "rora_config"):
        del model.rora_config
    return model


# ---------------------------------------------------------------------- save / load
def _extra_trainable(model: nn.Module) -> Dict[str, torch.Tensor]:
    rl = {n for n, _ in rora_layers(model)}
    out = {}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in rl:
            continue
        if p.requires_grad:
            out[name] = p
    return out


def _layer_tensors(layer: RoraLinear) -> Dict[str, torch.Tensor]:
    t = {"lora_A": layer.lora_A, "lora_B": layer.lora_B}
    if layer.lora_magnitude is not None:
        t["lora_magnitude"] = layer.lora_magnitude
    if getattr(layer, "lora_A0", None) is not None:
        t["lora_A0"] = layer.lora_A0
        t["lora_B0"] = layer.lora_B0
    return t


def save_rora(model: nn.Module, path: Union[str, Path]) -> Path:
    """Save the adapters (and the trainable head) to ``path/`` as safetensors + JSON."""
    from safetensors.torch import save_file

    config = getattr(model, "rora_config", None)
    layers = dict(rora_layers(model))
    if config is None or not layers:
        raise ValueError("the model has no RoRA layers (call apply_rora first)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    meta = {}
    for name, layer in layers.items():
        for k, v in _layer_tensors(layer).items():
            tensors[f"rora.{name}.{k}"] = v.detach().contiguous().cpu()
        meta[name] = {"in_features": layer.in_features, "out_features": layer.out_features,
                      "scaling": layer.scaling, "sigma_pre": layer.sigma_pre,
                      "rescaled": layer.rescaled}
        if getattr(layer, "lora_A0", None) is not None:
            # PiSSA/OLoRA: the base is W_pre − init_scaling·B₀A₀ (moves when rescaled)
            meta[name]["init_scaling"] = layer.init_scaling
    for name, p in _extra_trainable(model).items():
        tensors[f"extra.{name}"] = p.detach().contiguous().cpu()
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "rora-fast",
                                                            "version": str(FORMAT_VERSION)})
    doc = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "layers": meta}
    (path / CONFIG_NAME).write_text(json.dumps(doc, indent=2))
    return path


def load_rora(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load adapters saved by :func:`save_rora` into ``model``.

    ``model`` is either the same architecture without RoRA (RoRA is applied with the
    saved config first) or a model already wrapped with an equal config. Shapes, layer
    names and config are checked; a mismatch raises a ``ValueError`` naming it.
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.exists() or not w_file.exists():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME} and {WEIGHTS_NAME}")
    doc = json.loads(cfg_file.read_text())
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported rora-fast format version {doc.get('format_version')}")
    saved_cfg = RoraConfig.from_dict(doc["config"])
    have = getattr(model, "rora_config", None)
    if have is None:
        apply_rora(model, saved_cfg)
    else:
        for f in fields(RoraConfig):
            a, b = getattr(have, f.name), getattr(saved_cfg, f.name)
            if f.name in ("penalty_mode", "svd_method"):
                continue
            if a != b:
                raise ValueError(f"config mismatch in {f.name}: model has {a!r}, file has {b!r}")
    layers = dict(rora_layers(model))
    meta = doc["layers"]
    if set(meta) != set(layers):
        missing = sorted(set(meta) - set(layers))
        extra = sorted(set(layers) - set(meta))
        raise ValueError(f"RoRA layers differ: in file but not in model {missing}; in model "
                         f"but not in file {extra}")
    tensors = load_file(str(w_file))
    with torch.no_grad():
        for name, layer in layers.items():
            m = meta[name]
            if (m["in_features"], m["out_features"]) != (layer.in_features, layer.out_features):
                raise ValueError(f"{name}: file has shape ({m['out_features']}, "
                                 f"{m['in_features']}), model has ({layer.out_features}, "
                                 f"{layer.in_features})")
            for k, dst in _layer_tensors(layer).items():
                key = f"rora.{name}.{k}"
                if key not in tensors:
                    raise ValueError(f"{name}: tensor {k} missing from {w_file.name}")
                src = tensors[key]
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"{name}.{k}: file has shape {tuple(src.shape)}, model "
                                     f"has {tuple(dst.shape)}")
                dst.copy_(src)
            layer.scaling = float(m["scaling"])
            layer.rescaled = bool(m["rescaled"])
            if getattr(layer, "lora_A0", None) is not None and "init_scaling" in m:
                # rebuild the saved base W_pre − s₀'·B₀A₀ from this one, W_pre − s₀·B₀A₀
                s_saved = float(m["init_scaling"])
                fold = (layer.init_scaling - s_saved) * (layer.lora_B0.to(torch.float64)
                                                         @ layer.lora_A0.to(torch.float64))
                layer.weight.copy_((layer.weight.to(torch.float64) + fold)
                                   .to(layer.weight.dtype))
                layer.init_scaling = s_saved
        extra = _extra_trainable(model)
        for key, src in tensors.items():
            if not key.startswith("extra."):
                continue
            name = key[len("extra."):]
            if name not in extra:
                raise ValueError(f"{name}: saved trainable parameter not found in the model")
            if tuple(src.shape) != tuple(extra[name].shape):
                raise ValueError(f"{name}: file has shape {tuple(src.shape)}, model has "
                                 f"{tuple(extra[name].shape)}")
            extra[name].copy_(src)
    return model


def export_peft_adapter(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write a vanilla PEFT LoRA adapter equivalent to the model's RoRA adapters (eval).

    Each layer's current ``scaling`` (rescaled or not) is folded into ``lora_B`` so
    that PEFT's ``lora_alpha / r`` reproduces it. PiSSA/OLoRA layers, whose base weight
    is the residual, export the rank-2r update ``s·BA − s0·B0A0`` relative to the
    original weight (as PEFT's own PiSSA conversion does). Load it with unmodified
    ``peft.PeftModel.from_pretrained(base_model, directory)``.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = getattr(model, "rora_config", None)
    layers = dict(rora_layers(model))
    if config is None or not layers:
        raise ValueError("the model has no RoRA layers (call apply_rora first)")
    variant = config.init in ("pissa", "olora")
    if variant and config.use_dora:
        raise NotImplementedError("export of DoRA combined with PiSSA/OLoRA init is not "
                                  "supported")
    r_out = 2 * config.r if variant else config.r
    alpha_out = float(r_out)  # PEFT scaling 1; the real scale is folded into lora_B
    tensors = {}
    for name, layer in layers.items():
        with torch.no_grad():
            A = layer.lora_A.detach().float()
            B = layer.lora_B.detach().float() * layer.scaling
            if variant:
                A = torch.cat([A, layer.lora_A0.float()], 0)
                B = torch.cat([B, -layer.init_scaling * layer.lora_B0.float()], 1)
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = A.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.contiguous()
        if layer.use_dora:
            tensors[f"{prefix}.lora_magnitude_vector"] = \
                layer.lora_magnitude.detach().float().contiguous()
    save = _resolve_modules_to_save(model, config)
    for name, p in _extra_trainable(model).items():
        tensors[f"base_model.model.{name}"] = p.detach().float().contiguous()
    target = "^(" + "|".join(re.escape(n) for n in sorted(layers)) + ")$"
    task_type = None
    if save and any(s in _HEAD_NAMES for s in save):
        task_type = "SEQ_CLS"
    lcfg = LoraConfig(r=r_out, lora_alpha=alpha_out, target_modules=target,
                      modules_to_save=save or None, use_dora=config.use_dora,
                      lora_dropout=config.lora_dropout, task_type=task_type,
                      base_model_name_or_path=getattr(getattr(model, "config", None),
                                                      "_name_or_path", None))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lcfg.save_pretrained(str(directory))
    save_file({k: v.cpu() for k, v in tensors.items()},
              str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory
