"""The user's stage: fine-tune the (poisoned) model on clean target data with a defence.

Method names (``--method``):

* ``fft``: full fine-tuning of every parameter.
* ``lora``, ``pissa``, ``dora``, ``olora``: PEFT itself (``peft.LoraConfig`` with
  ``init_lora_weights="pissa"/"olora"`` or ``use_dora=True``; PEFT defaults otherwise,
  ``task_type="SEQ_CLS"`` so the classification head is trained fully).
* ``rora``, ``rora-pissa``, ``rora-dora``, ``rora-olora``: :func:`rora_fast.apply_rora`
  with every RoRA mechanism: CI (weight dropout p), Tr (orthogonality penalty λ) and Pt
  (post-training spectral rescaling of the last ``rescale_layers`` blocks).
* Ablations through ``rora_fast`` with a subset of the mechanisms: ``rora:ci``,
  ``rora:tr``, ``rora:pt``, ``rora:ci+tr``, ``rora:ci+pt``, ``rora:tr+pt``,
  ``rora:none`` (= LoRA computed by rora_fast), ``rora-dora:ci+tr`` etc.
  ``lora+rescale`` is an alias of ``rora:pt`` (LoRA, p = 0, λ = 0, then rescaling).
"""
from __future__ import annotations

import warnings

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch

from .presets import DEFENCE_DEFAULTS

__all__ = ["DefenceConfig", "Method", "parse_method", "build_defence", "finish_defence",
           "METHODS", "adapter_layers"]

PEFT_METHODS = ("lora", "pissa", "dora", "olora")
RORA_BASES = ("rora", "rora-pissa", "rora-dora", "rora-olora")
METHODS = ("fft",) + PEFT_METHODS + RORA_BASES + ("lora+rescale",)
ALIASES = {"lora+rescale": "rora:pt"}


@dataclass(frozen=True)
class Method:
    name: str
    kind: str              # fft | peft | rora
    variant: str = "lora"  # lora | pissa | dora | olora
    ci: bool = False
    tr: bool = False
    pt: bool = False


def parse_method(name: str) -> Method:
    key = ALIASES.get(name.lower(), name.lower())
    if key == "fft":
        return Method(name, "fft")
    if key in PEFT_METHODS:
        return Method(name, "peft", key)
    base, _, comps = key.partition(":")
    if base not in RORA_BASES:
        raise ValueError(f"unknown defence method {name!r}; choose one of {', '.join(METHODS)} "
                         f"or an ablation like rora:ci+tr")
    variant = "lora" if base == "rora" else base.split("-", 1)[1]
    if not comps:
        return Method(name, "rora", variant, True, True, True)
    parts = set() if comps == "none" else set(comps.split("+"))
    bad = parts - {"ci", "tr", "pt"}
    if bad:
        raise ValueError(f"unknown RoRA component(s) {sorted(bad)} in {name!r}; use ci, tr, pt")
    return Method(name, "rora", variant, "ci" in parts, "tr" in parts, "pt" in parts)


@dataclass
class DefenceConfig:
    """Paper presets (A.1): LoRA r=8, alpha=16, dropout 0.1; RoRA p=0.1, λ=10, k=32,
    rescaling of the last 3 blocks; lr 2e-3 for adapters (PSIM), 2e-5 for FFT."""
    r: int = DEFENCE_DEFAULTS["r"]
    alpha: float = DEFENCE_DEFAULTS["alpha"]
    lora_dropout: float = 0.1
    weight_dropout: float = DEFENCE_DEFAULTS["weight_dropout"]
    ortho_lambda: float = DEFENCE_DEFAULTS["ortho_lambda"]
    ortho_rank: int = DEFENCE_DEFAULTS["ortho_rank"]
    rescale_layers: int = DEFENCE_DEFAULTS["rescale_layers"]
    rescale_factor: float = 1.0   # the rescale: factor x σ_max(W_pre)/σ_max(BA) (1: paper)
    target_modules: Optional[Union[str, List[str]]] = None  # None: PEFT defaults (query, value)
    lr: Optional[float] = None                              # None: 2e-5 for FFT, 2e-3 otherwise

    def lr_for(self, method: Method) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-5 if method.kind == "fft" else 2e-3


def _targets(cfg: DefenceConfig):
    return cfg.target_modules


def build_defence(model, method: Method, cfg: DefenceConfig):
    """Wrap ``model`` for training with ``method``; returns the model to train."""
    if method.kind == "fft":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method.kind == "peft":
        from peft import LoraConfig, get_peft_model
        kw = {}
        if method.variant in ("pissa", "olora"):
            kw["init_lora_weights"] = method.variant
        if method.variant == "dora":
            kw["use_dora"] = True
        pcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=_targets(cfg), task_type="SEQ_CLS", **kw)
        with warnings.catch_warnings():
            # PeftModel.__init__ (peft 0.21) reads transformers' deprecated
            # ``is_gradient_checkpointing`` (a FutureWarning in transformers >= 5.2x); the
            # harness does not use checkpointing, and the read is PEFT's, not ours
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                    category=FutureWarning)
            return get_peft_model(model, pcfg)
    import rora_fast
    rcfg = rora_fast.RoraConfig(
        r=cfg.r, alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
        weight_dropout=cfg.weight_dropout if method.ci else 0.0,
        ortho_lambda=cfg.ortho_lambda if method.tr else 0.0,
        ortho_rank=cfg.ortho_rank, target_modules=_targets(cfg),
        rescale_layers=cfg.rescale_layers,
        init="default" if method.variant in ("lora", "dora") else method.variant,
        use_dora=method.variant == "dora")
    import inspect
    if "progress" in inspect.signature(rora_fast.apply_rora).parameters:
        # the SVD bases of every adapted layer are computed here (minutes on a CPU for a
        # large model): show a bar instead of minutes without output
        return rora_fast.apply_rora(model, rcfg, progress=True)
    print("RoRA: computing the SVD bases of the adapted layers ...", flush=True)
    return rora_fast.apply_rora(model, rcfg)


def finish_defence(model, method: Method, cfg: DefenceConfig) -> Dict[str, float]:
    """Post-training step: spectral rescaling for methods with Pt.  Returns {name: s}."""
    if method.kind == "rora" and method.pt:
        import rora_fast
        return {k: float(v) for k, v in rora_fast.spectral_rescale_(
            model, layers=cfg.rescale_layers, factor=cfg.rescale_factor).items()}
    return {}


def adapter_layers(model) -> List[Tuple[str, torch.Tensor, torch.Tensor, float, object]]:
    """``(name, W_pre, ΔW/scaling (=B·A), scaling, module)`` for every adapted layer.

    Works for rora_fast layers and PEFT LoRA layers (the ``default`` adapter).  ``W_pre`` is
    the frozen base weight (the residual base for PiSSA/OLoRA).
    """
    out = []
    try:
        import rora_fast
        for name, mod in rora_fast.rora_layers(model):
            BA = (mod.lora_B.detach().float() @ mod.lora_A.detach().float())
            out.append((name, mod.weight.detach().float(), BA, float(mod.scaling), mod))
    except (ImportError, AttributeError):
        pass
    if out:
        return out
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer") and "default" in getattr(mod, "lora_A", {}):
            A = mod.lora_A["default"].weight.detach().float()
            B = mod.lora_B["default"].weight.detach().float()
            out.append((name, mod.base_layer.weight.detach().float(), B @ A,
                        float(mod.scaling["default"]), mod))
    return out
