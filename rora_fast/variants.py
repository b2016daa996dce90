"""The adapter's variant: how its factors start and what sits on top of them.

* **start**: LoRA's zero product (``init="default"``: A Kaiming-uniform, B zero, as PEFT;
  ``"gaussian"``), or PiSSA/OLoRA start factors ``A₀, B₀`` taken from ``W_pre``
  (``"pissa"``, ``"olora"``, as PEFT): the frozen base becomes the residual
  ``W_pre − s₀·B₀A₀`` and the *update* the penalty and the rescaling act on is
  ``BA − B₀A₀``;
* **DoRA** (``use_dora``): the magnitude ``m`` and ``g = m / ‖W + s·BA‖_row`` on top
  (:func:`rora_fast.forward.dora_output` in the forward).

Every function takes the RoRA layer (:class:`rora_fast.RoraLinear` and subclasses; its
``lora_A``/``lora_B``, ``scaling``, start factors ``lora_A0``/``lora_B0`` and
``lora_magnitude``) and the dense base weight where it needs one; the layer delegates its
init, update, rescale, delta and merge here, and the base strategy
(:mod:`rora_fast.bases`) stores the merged weight.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .forward import weight_norm
from .linalg import sigma_max_lowrank

__all__ = ["START_INITS", "init_factors_", "init_magnitude", "has_start_factors",
           "export_factors", "start_factors", "update_factors",
           "sigma_update", "refold_start_", "delta_weight", "merged_weight",
           "add_scaled_product_"]

#: the inits that start from W_pre's components (and rewrite the base into a residual)
START_INITS = ("pissa", "olora")


def add_scaled_product_(weight: torch.Tensor, coef: float, B: torch.Tensor, A: torch.Tensor,
                        compute_dtype: torch.dtype = torch.float64) -> None:
    """``weight += coef · B A`` in place, computed in ``compute_dtype`` and rounded once to
    the weight's dtype: the PiSSA/OLoRA fold of the start factors into the frozen base
    (``W − s·BA`` at init, ``+ (s_old − s_new)·B₀A₀`` when the scale changes)."""
    with torch.no_grad():
        w = weight.detach().to(compute_dtype)
        prod = B.detach().to(compute_dtype) @ A.detach().to(compute_dtype)
        weight.copy_((w + coef * prod).to(weight.dtype))


def init_factors_(layer: nn.Module, W: torch.Tensor, init: str) -> None:
    """Initialise ``layer.lora_A``/``lora_B`` and register the start-factor buffers
    ``lora_A0``/``lora_B0`` (None for LoRA's zero-product start). PiSSA/OLoRA rewrite the
    dense base weight ``W`` in place into the residual, as PEFT does to its base layer."""
    A_, B_ = layer.lora_A, layer.lora_B
    with torch.no_grad():
        if init not in START_INITS:
            if init == "default":
                nn.init.kaiming_uniform_(A_, a=math.sqrt(5))
            else:  # gaussian
                nn.init.normal_(A_, std=1 / layer.r)
            nn.init.zeros_(B_)
            layer.register_buffer("lora_A0", None)
            layer.register_buffer("lora_B0", None)
            return
        w = W.detach().to(torch.float32)
        if init == "pissa":  # as peft.tuners.lora.layer.LoraLayer.pissa_init
            Vfull, S, Uh = torch.linalg.svd(w, full_matrices=False)
            Sr = S[: layer.r] / layer.scaling
            A = torch.diag(torch.sqrt(Sr)) @ Uh[: layer.r]
            B = Vfull[:, : layer.r] @ torch.diag(torch.sqrt(Sr))
        else:  # olora, as peft.tuners.lora.layer.LoraLayer.olora_init
            Q, R = torch.linalg.qr(w)
            A, B = R[: layer.r].contiguous(), Q[:, : layer.r].contiguous()
        A_.copy_(A)
        B_.copy_(B)
        # The base becomes the residual, in place (as PEFT does to the base layer).
        add_scaled_product_(W, -layer.scaling, B, A, torch.float32)
        # Keep the initial factors: the merged model is W_res + s·BA, and an export to
        # plain LoRA needs ΔW = s·BA − s0·B0A0 relative to the original weight.
        layer.register_buffer("lora_A0", A.to(A_.dtype).clone())
        layer.register_buffer("lora_B0", B.to(B_.dtype).clone())
        layer.init_scaling = layer.scaling


def init_magnitude(layer: nn.Module, W: torch.Tensor) -> Optional[nn.Parameter]:
    """DoRA's magnitude ``‖W + s·BA‖_row`` at init (None without DoRA)."""
    if not layer.use_dora:
        return None
    with torch.no_grad():
        norm = weight_norm(W, layer.scaling * (layer.lora_B @ layer.lora_A).detach())
    return nn.Parameter(norm.to(layer.lora_A.dtype))


def has_start_factors(layer: nn.Module) -> bool:
    """Whether the layer started from PiSSA/OLoRA factors (its base is the residual)."""
    return getattr(layer, "lora_A0", None) is not None


def export_factors(layer: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` in float32 with ``B'A'`` the layer's whole change to ``W_pre`` and its
    scale folded into ``B'``: ``(A, s·B)``, or, for PiSSA/OLoRA (whose base is the
    residual), the rank-2r ``([A; A₀], [s·B, −s₀·B₀])`` = ``s·BA − s₀·B₀A₀``."""
    with torch.no_grad():
        A = layer.lora_A.detach().float()
        B = layer.lora_B.detach().float() * layer.scaling
        if has_start_factors(layer):
            A = torch.cat([A, layer.lora_A0.float()], 0)
            B = torch.cat([B, -layer.init_scaling * layer.lora_B0.float()], 1)
    return A, B


def start_factors(layer: nn.Module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(lora_A0, lora_B0)`` for PiSSA/OLoRA, ``(None, None)`` for LoRA's start."""
    return getattr(layer, "lora_A0", None), getattr(layer, "lora_B0", None)


def update_factors(layer: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B', A')`` with ``B'A'`` the trained update without ``scaling``: ``(B, A)``, or
    ``([B, B₀], [A; −A₀])`` for PiSSA/OLoRA (``BA − B₀A₀``). Detached."""
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    A0, B0 = start_factors(layer)
    if A0 is None:
        return B, A
    return torch.cat([B, B0.to(B.dtype)], 1), torch.cat([A, -A0.to(A.dtype)], 0)


def sigma_update(layer: nn.Module) -> float:
    """Exact σ_max of the trained update (:func:`update_factors`)."""
    A0, _ = start_factors(layer)
    if A0 is None:
        return sigma_max_lowrank(layer.lora_B, layer.lora_A)
    return sigma_max_lowrank(*update_factors(layer))


def refold_start_(layer: nn.Module, W: torch.Tensor, s_new: float) -> None:
    """PiSSA/OLoRA: the frozen base ``W_pre − s₀·B₀A₀`` (``s₀ = init_scaling``) becomes
    ``W_pre − s_new·B₀A₀`` (float64, rounded once); nothing for LoRA's start."""
    A0, B0 = start_factors(layer)
    if A0 is None:
        return
    add_scaled_product_(W, layer.init_scaling - s_new, B0, A0)
    layer.init_scaling = s_new


def delta_weight(layer: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """The weight change the adapter applies to the stored base weight ``W`` (adapter
    dtype): ``s·BA``, with DoRA ``g ⊙ (W + s·BA) − W``."""
    with torch.no_grad():
        delta = layer.scaling * (layer.lora_B @ layer.lora_A)
        if not layer.use_dora:
            return delta
        w = W.to(delta.dtype)
        g = (layer.lora_magnitude / weight_norm(w, delta)).unsqueeze(1)
        return g * (w + delta) - w


def merged_weight(layer: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """``W + s·BA`` (DoRA: ``g ⊙ (W + s·BA)``) in float64, from the dense base ``W``."""
    with torch.no_grad():
        merged = W.to(torch.float64) + layer.scaling * (
            layer.lora_B.detach().to(torch.float64) @ layer.lora_A.detach().to(torch.float64))
        if layer.use_dora:
            g = layer.lora_magnitude.to(torch.float64) / torch.linalg.norm(merged, dim=1)
            merged = g.unsqueeze(1) * merged
    return merged
