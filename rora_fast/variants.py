"""The adapter's variant: one strategy object per ``(init, use_dora)``, as PEFT's
``LoraVariant`` (:func:`variant_for`, stored on every RoRA layer as ``layer.variant``).

* :class:`LoraStart` (``init="default"``: A Kaiming-uniform, B zero, as PEFT;
  ``"gaussian"``): LoRA's zero product, the update is ``BA``;
* :class:`PissaStart`, :class:`OloraStart` (``"pissa"``, ``"olora"``, as PEFT): start
  factors ``A₀, B₀`` taken from ``W_pre``; the frozen base becomes the residual
  ``W_pre − s₀·B₀A₀`` and the *update* the penalty and the rescaling act on is
  ``BA − B₀A₀``;
* :class:`Dora` (``use_dora``) on top of any start: the magnitude ``m`` and
  ``g = m / ‖W + s·BA‖_row`` (:func:`rora_fast.forward.dora_output` in the forward).

Each object owns everything that differs between variants: the init and the start
factors (:meth:`Variant.init_factors_`, :meth:`Variant.start_factors`, which are also what
the penalty subtracts), the update (:meth:`Variant.update_factors`, its σ_max), the
rescale's re-fold of the base (:meth:`Variant.refold_`), delta and merged weight, what a
save holds and the PEFT export, the forward's output (:attr:`Variant.output`) and which
doors refuse it (a quantized base, PEFT's). Its methods take the RoRA layer (its
``lora_A``/``lora_B``, ``scaling``, ``lora_A0``/``lora_B0``, ``init_scaling``,
``lora_magnitude``) and the dense base weight where they need one. The objects are
stateless singletons (copies and pickles give the same object back).

A new variant is one class here and its entry in :data:`VARIANTS` (plus its name in
``validation.INITS`` when it is a new ``init``).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .forward import dora_layer_output, lora_output, weight_norm
from .linalg import sigma_max_lowrank
from .validation import INITS, check_choice

__all__ = ["Variant", "LoraStart", "PissaStart", "OloraStart", "Dora", "VARIANTS",
           "variant_for", "peft_variant", "add_scaled_product_"]


def add_scaled_product_(weight: torch.Tensor, coef: float, B: torch.Tensor, A: torch.Tensor,
                        compute_dtype: torch.dtype = torch.float64) -> None:
    """``weight += coef · B A`` in place, computed in ``compute_dtype`` and rounded once to
    the weight's dtype: the PiSSA/OLoRA fold of the start factors into the frozen base
    (``W − s·BA`` at init, ``+ (s_old − s_new)·B₀A₀`` when the scale changes)."""
    with torch.no_grad():
        w = weight.detach().to(compute_dtype)
        prod = B.detach().to(compute_dtype) @ A.detach().to(compute_dtype)
        weight.copy_((w + coef * prod).to(weight.dtype))


class Variant:
    """The strategy of one adapter variant; this base class is LoRA's zero-product start
    without a magnitude (what :class:`LoraStart` is)."""

    #: the ``init`` it stands for
    init = "default"
    #: DoRA's magnitude on top
    dora = False
    #: the start rewrites the frozen base weight into a residual, in place (PiSSA/OLoRA)
    rewrites_base = False
    #: only a dense base can carry it (a quantized base would have to be requantized, or
    #: has no implementation of it)
    needs_dense_base = False
    #: the forward's output, ``output(call, x)`` (a :class:`rora_fast.forward.LayerCall`)
    output = staticmethod(lora_output)

    def __reduce__(self):  # copies (deepcopy, pickle) are the same singleton
        return (variant_for, (self.init, self.dora))

    def __repr__(self):
        return f"<rora_fast variant init={self.init!r} use_dora={self.dora}>"

    @property
    def label(self) -> str:
        """The user's argument that chose it, for messages."""
        return f"init={self.init!r}"

    # ------------------------------------------------------------------ start
    def init_factors_(self, layer: nn.Module, W: torch.Tensor) -> None:
        """Initialise ``layer.lora_A``/``lora_B`` and register the start-factor buffers
        ``lora_A0``/``lora_B0`` (None for LoRA's zero-product start)."""
        with torch.no_grad():
            if self.init == "default":
                nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
            else:  # gaussian
                nn.init.normal_(layer.lora_A, std=1 / layer.r)
            nn.init.zeros_(layer.lora_B)
        layer.register_buffer("lora_A0", None)
        layer.register_buffer("lora_B0", None)

    def start_factors(self, layer: nn.Module) -> Tuple[Optional[torch.Tensor],
                                                       Optional[torch.Tensor]]:
        """``(A₀, B₀)``: what the penalty subtracts from ``(A, B)``; ``(None, None)`` for
        LoRA's start."""
        return None, None

    def update_factors(self, layer: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B', A')`` with ``B'A'`` the trained update without ``scaling`` (detached)."""
        return layer.lora_B.detach(), layer.lora_A.detach()

    def sigma_update(self, layer: nn.Module) -> float:
        """Exact σ_max of the trained update (:meth:`update_factors`)."""
        return sigma_max_lowrank(layer.lora_B, layer.lora_A)

    def refold_(self, layer: nn.Module, W: torch.Tensor, s_new: float) -> None:
        """What a change of ``scaling`` to ``s_new`` does to the frozen base ``W``:
        nothing for LoRA's start."""

    # ------------------------------------------------------------------ magnitude, merge
    def init_magnitude(self, layer: nn.Module, W: torch.Tensor) -> Optional[nn.Parameter]:
        """DoRA's magnitude at init (None without DoRA)."""
        return None

    def delta_weight(self, layer: nn.Module, W: Optional[torch.Tensor]) -> torch.Tensor:
        """The weight change the adapter applies to the stored base weight ``W`` (adapter
        dtype): ``s·BA``."""
        with torch.no_grad():
            return layer.scaling * (layer.lora_B @ layer.lora_A)

    def merged_weight(self, layer: nn.Module, W: torch.Tensor) -> torch.Tensor:
        """``W + s·BA`` in float64, from the dense base ``W``."""
        with torch.no_grad():
            return _merged_float64(layer, W)

    # ------------------------------------------------------------------ saving, export
    def saved_tensors(self, layer: nn.Module) -> Dict[str, torch.Tensor]:
        """The layer's tensors a save holds besides ``lora_A``/``lora_B``."""
        return {}

    def saved_shapes(self, r: int, n_in: int, n_out: int) -> Dict[str, tuple]:
        """Their shapes, for a layer not built yet."""
        return {}

    def saved_meta(self, layer: nn.Module) -> dict:
        """What a save records of the layer besides its scale."""
        return {}

    def load_meta_(self, layer: nn.Module, meta: dict) -> None:
        """Restore what :meth:`saved_meta` recorded (after ``scaling`` is set)."""

    def export_rank(self, r: int) -> int:
        """The rank of the exported plain LoRA adapter."""
        return r

    def export_factors(self, layer: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(A', B')`` in float32 with ``B'A'`` the layer's whole change to ``W_pre`` and
        its scale folded into ``B'``: ``(A, s·B)``."""
        with torch.no_grad():
            return layer.lora_A.detach().float(), layer.lora_B.detach().float() * layer.scaling

    def export_tensors(self, layer: nn.Module) -> Dict[str, torch.Tensor]:
        """The layer's tensors in PEFT's adapter file, by key suffix."""
        A, B = self.export_factors(layer)
        return {"lora_A.weight": A.contiguous(), "lora_B.weight": B.contiguous()}

    def check_export(self) -> None:
        """Raise where no PEFT adapter can express the variant."""

    # ------------------------------------------------------------------ doors
    def peft_refusal(self, peft_init) -> Optional[str]:
        """Why RoRA through PEFT (:func:`rora_fast.register_rora`) cannot train it (None:
        it can); ``peft_init``: the ``LoraConfig.init_lora_weights`` it came from."""
        return None


def _merged_float64(layer: nn.Module, W: torch.Tensor) -> torch.Tensor:
    return W.to(torch.float64) + layer.scaling * (
        layer.lora_B.detach().to(torch.float64) @ layer.lora_A.detach().to(torch.float64))


class LoraStart(Variant):
    """LoRA's zero product: ``"default"`` (A Kaiming-uniform, B zero) or ``"gaussian"``."""

    def __init__(self, init: str = "default"):
        self.init = init


class _WeightStart(Variant):
    """A start from ``W_pre``'s components (PiSSA, OLoRA): ``A₀, B₀`` are kept as buffers,
    the base is the residual ``W_pre − s₀·B₀A₀`` (``s₀ = layer.init_scaling``), the update
    is ``BA − B₀A₀``."""

    rewrites_base = True
    needs_dense_base = True

    def start_from(self, layer: nn.Module, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(A₀, B₀)`` from the float32 base weight (as PEFT computes them)."""
        raise NotImplementedError

    def init_factors_(self, layer, W):
        """PiSSA/OLoRA rewrite the dense base weight ``W`` in place into the residual, as
        PEFT does to its base layer."""
        with torch.no_grad():
            A, B = self.start_from(layer, W.detach().to(torch.float32))
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            # The base becomes the residual, in place (as PEFT does to the base layer).
            add_scaled_product_(W, -layer.scaling, B, A, torch.float32)
        # Keep the initial factors: the merged model is W_res + s·BA, and an export to
        # plain LoRA needs ΔW = s·BA − s0·B0A0 relative to the original weight.
        layer.register_buffer("lora_A0", A.to(layer.lora_A.dtype).clone())
        layer.register_buffer("lora_B0", B.to(layer.lora_B.dtype).clone())
        layer.init_scaling = layer.scaling

    def start_factors(self, layer):
        b = layer._buffers
        return b.get("lora_A0"), b.get("lora_B0")

    def update_factors(self, layer):
        """``([B, B₀], [A; −A₀])``: ``BA − B₀A₀``."""
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        A0, B0 = self.start_factors(layer)
        return torch.cat([B, B0.to(B.dtype)], 1), torch.cat([A, -A0.to(A.dtype)], 0)

    def sigma_update(self, layer):
        return sigma_max_lowrank(*self.update_factors(layer))

    def refold_(self, layer, W, s_new):
        """The frozen base ``W_pre − s₀·B₀A₀`` becomes ``W_pre − s_new·B₀A₀`` (float64,
        rounded once)."""
        A0, B0 = self.start_factors(layer)
        add_scaled_product_(W, layer.init_scaling - s_new, B0, A0)
        layer.init_scaling = s_new

    def saved_tensors(self, layer):
        return dict(zip(("lora_A0", "lora_B0"), self.start_factors(layer)))

    def saved_shapes(self, r, n_in, n_out):
        return {"lora_A0": (r, n_in), "lora_B0": (n_out, r)}

    def saved_meta(self, layer):
        # the base is W_pre − init_scaling·B₀A₀ (moves when rescaled)
        return {"init_scaling": layer.init_scaling}

    def load_meta_(self, layer, meta):
        if "init_scaling" in meta:
            # rebuild the saved base W_pre − s₀'·B₀A₀ from this one, W_pre − s₀·B₀A₀
            layer._refold_start_(float(meta["init_scaling"]))

    def export_rank(self, r):
        return 2 * r

    def export_factors(self, layer):
        """The rank-2r ``([A; A₀], [s·B, −s₀·B₀])`` = ``s·BA − s₀·B₀A₀`` (the base is the
        residual)."""
        A, B = super().export_factors(layer)
        A0, B0 = self.start_factors(layer)
        with torch.no_grad():
            return (torch.cat([A, A0.float()], 0),
                    torch.cat([B, -layer.init_scaling * B0.float()], 1))

    def peft_refusal(self, peft_init):
        return f"init_lora_weights={peft_init!r}"


class PissaStart(_WeightStart):
    """PiSSA: ``A₀, B₀`` the top-r singular triplets of ``W_pre``, split as ``√(S/s)``."""

    init = "pissa"

    def start_from(self, layer, w):
        """As ``peft.tuners.lora.layer.LoraLayer.pissa_init``."""
        Vfull, S, Uh = torch.linalg.svd(w, full_matrices=False)
        Sr = S[: layer.r] / layer.scaling
        A = torch.diag(torch.sqrt(Sr)) @ Uh[: layer.r]
        B = Vfull[:, : layer.r] @ torch.diag(torch.sqrt(Sr))
        return A, B


class OloraStart(_WeightStart):
    """OLoRA: ``A₀, B₀`` the first r rows of R and columns of Q of ``W_pre = QR``."""

    init = "olora"

    def start_from(self, layer, w):
        """As ``peft.tuners.lora.layer.LoraLayer.olora_init``."""
        Q, R = torch.linalg.qr(w)
        return R[: layer.r].contiguous(), Q[:, : layer.r].contiguous()


class Dora(Variant):
    """DoRA's magnitude ``m`` on top of a start: the output is ``g ⊙ (W + s·BA)`` with
    ``g = m / ‖W + s·BA‖_row`` (norm detached), as PEFT's DoRA layer. Everything of the
    start (factors, update, re-fold, saving) is the start's."""

    dora = True
    needs_dense_base = True

    def __init__(self, start: Variant):
        self.start = start
        self.init = start.init
        self.rewrites_base = start.rewrites_base

    @property
    def label(self) -> str:
        return "use_dora=True"

    # the start's
    def init_factors_(self, layer, W):
        self.start.init_factors_(layer, W)

    def start_factors(self, layer):
        return self.start.start_factors(layer)

    def update_factors(self, layer):
        return self.start.update_factors(layer)

    def sigma_update(self, layer):
        return self.start.sigma_update(layer)

    def refold_(self, layer, W, s_new):
        self.start.refold_(layer, W, s_new)

    def saved_meta(self, layer):
        return self.start.saved_meta(layer)

    def load_meta_(self, layer, meta):
        self.start.load_meta_(layer, meta)

    def export_rank(self, r):
        return self.start.export_rank(r)

    def export_factors(self, layer):
        return self.start.export_factors(layer)

    # the magnitude's
    def output(self, call, x):
        """The DoRA forward (:func:`rora_fast.forward.dora_layer_output`) with the layer's
        magnitude."""
        return dora_layer_output(call, x, call.layer.lora_magnitude)

    def init_magnitude(self, layer, W):
        """``‖W + s·BA‖_row`` at init."""
        with torch.no_grad():
            norm = weight_norm(W, layer.scaling * (layer.lora_B @ layer.lora_A).detach())
        return nn.Parameter(norm.to(layer.lora_A.dtype))

    def delta_weight(self, layer, W):
        """``g ⊙ (W + s·BA) − W``."""
        with torch.no_grad():
            delta = layer.scaling * (layer.lora_B @ layer.lora_A)
            w = W.to(delta.dtype)
            g = (layer.lora_magnitude / weight_norm(w, delta)).unsqueeze(1)
            return g * (w + delta) - w

    def merged_weight(self, layer, W):
        """``g ⊙ (W + s·BA)``."""
        with torch.no_grad():
            merged = _merged_float64(layer, W)
            g = layer.lora_magnitude.to(torch.float64) / torch.linalg.norm(merged, dim=1)
            return g.unsqueeze(1) * merged

    def saved_tensors(self, layer):
        return {"lora_magnitude": layer.lora_magnitude, **self.start.saved_tensors(layer)}

    def saved_shapes(self, r, n_in, n_out):
        return {"lora_magnitude": (n_out,), **self.start.saved_shapes(r, n_in, n_out)}

    def export_tensors(self, layer):
        out = self.start.export_tensors(layer)
        out["lora_magnitude_vector"] = layer.lora_magnitude.detach().float().contiguous()
        return out

    def check_export(self):
        if self.start.rewrites_base:
            raise NotImplementedError("export of DoRA combined with PiSSA/OLoRA init is not "
                                      "supported")

    def peft_refusal(self, peft_init):
        return "use_dora=True"


def _starts():
    return [LoraStart("default"), LoraStart("gaussian"), PissaStart(), OloraStart()]


#: ``(init, use_dora)`` -> the variant object, one per pair
VARIANTS: Dict[Tuple[str, bool], Variant] = {
    **{(s.init, False): s for s in _starts()},
    **{(s.init, True): Dora(s) for s in _starts()},
}
assert {i for i, _ in VARIANTS} == set(INITS)


def variant_for(init: str = "default", use_dora: bool = False) -> Variant:
    """The variant object for a layer's ``init`` and ``use_dora`` (ValueError for an
    unknown ``init``, as the config's check)."""
    v = VARIANTS.get((init, bool(use_dora))) if isinstance(init, str) else None
    if v is None:
        check_choice("init", init, INITS)  # raises the config's message
    return v


def peft_variant(init_lora_weights=True, use_dora=False) -> Variant:
    """The variant of a PEFT ``LoraConfig``'s ``init_lora_weights`` (``True``, ``"gaussian"``,
    ``"pissa"``, ``"pissa_niter_16"``, ``"olora"``, ...) and ``use_dora``. An init PEFT
    owns alone (``False``, ``"eva"``, ``"loftq"``, ...) counts as LoRA's start."""
    init = init_lora_weights.lower().split("_")[0] if isinstance(init_lora_weights, str) \
        else "default"
    return variant_for(init if init in INITS else "default", bool(use_dora))
