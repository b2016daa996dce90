"""One home for the argument checks of RoRA, shared by :class:`rora_fast.RoraConfig`
(run in ``__post_init__``, before any model is touched), :class:`rora_fast.RoraLinear`
(built directly: the same :func:`check_hparams`), the PEFT entry points
(:func:`check_rora_hparams`) and the model surgery (:func:`check_layer_shape`,
:func:`check_base_weight`, per target). The per-call paths trust them.

Rules (a wrong type is a ``TypeError``, a value out of range a ``ValueError``, each
naming the argument and the value):

============== ==========================================================================
``r``          int, ``1 <= r``; for a layer also ``r <= min(in_features, out_features)``
``alpha``      finite number, ``> 0``
``weight_dropout``, ``lora_dropout``  finite number in ``[0, 1)`` (weight dropout also
               must not round to "drop everything" on the 16-bit mask)
``ortho_rank`` (k) int, ``1 <= k``; for a layer also ``k <= min(in_features, out_features)``.
               k = 0 is refused: the basis also gives ``σ_max(W_pre)`` for the spectral
               rescaling. To turn the penalty off, set ``ortho_lambda=0``.
``ortho_lambda`` finite number, ``>= 0`` (0: no penalty)
``penalty_mode`` one of :data:`PENALTY_MODES` (``"optimizer"``, the default, or ``"loss"``;
               configs saved by older versions: rora_fast.config.LEGACY_PENALTY_MODES);
               ``init`` one of :data:`INITS`;
               ``svd_method`` one of :data:`SVD_METHODS`; ``use_dora`` a bool
base weight    a floating dtype (float32/float16/bfloat16/float64), every entry finite
============== ==========================================================================
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

__all__ = ["PENALTY_MODES", "INITS", "SVD_METHODS", "FLOAT_DTYPES", "check_int",
           "check_number", "check_choice", "check_penalty_mode", "check_hparams", "check_layer_shape",
           "check_base_weight", "check_rora_hparams"]

PENALTY_MODES = ("optimizer", "loss")
INITS = ("default", "gaussian", "pissa", "olora")
SVD_METHODS = ("auto", "exact", "randomized")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _where(name: Optional[str]) -> str:
    return f"{name}: " if name else ""


def check_int(name: str, value, lo: Optional[int] = None) -> int:
    """``value`` is an int (not a bool) and ``>= lo``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value}")
    return int(value)


def check_number(name: str, value, lo=None, hi=None, lo_open: bool = False,
                 hi_open: bool = False) -> float:
    """``value`` is a finite real number (not a bool) within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_penalty_mode(value) -> str:
    """A ``penalty_mode``: ``"optimizer"`` or ``"loss"``."""
    return check_choice("penalty_mode", value, PENALTY_MODES)


def check_hparams(*, r=8, alpha=16, weight_dropout=0.1, lora_dropout=0.0, ortho_rank=32,
                  ortho_lambda=10.0, penalty_mode="optimizer", init="default",
                  use_dora=False, svd_method="auto", in_features: Optional[int] = None,
                  out_features: Optional[int] = None) -> str:
    """Every hyper-parameter rule of the module docstring. With ``in_features`` and
    ``out_features`` the shape-dependent upper bounds of ``r`` and ``ortho_rank`` are
    checked too. Returns the canonical ``penalty_mode`` (:func:`check_penalty_mode`)."""
    from .reference import keep_threshold

    if in_features is not None and out_features is not None:
        check_layer_shape(r, ortho_rank, in_features, out_features)
    else:
        check_int("r", r, lo=1)
        check_int("ortho_rank", ortho_rank, lo=1)
    check_number("alpha", alpha, lo=0, lo_open=True)
    check_number("weight_dropout", weight_dropout, lo=0, hi=1, hi_open=True)
    check_number("lora_dropout", lora_dropout, lo=0, hi=1, hi_open=True)
    check_number("ortho_lambda", ortho_lambda, lo=0)
    mode = check_penalty_mode(penalty_mode)
    check_choice("init", init, INITS)
    check_choice("svd_method", svd_method, SVD_METHODS)
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be a bool, got {use_dora!r}")
    keep_threshold(float(weight_dropout))  # p that rounds to "drop everything"
    keep_threshold(float(lora_dropout), "lora_dropout")
    return mode


def check_rora_hparams(weight_dropout, ortho_rank, ortho_lambda) -> None:
    """The RoRA hyper-parameters of a PEFT layer class (:func:`rora_fast.register_rora`,
    whose ``LoraConfig`` carries the LoRA ones): the rules of :func:`check_hparams`."""
    from .reference import keep_threshold

    check_number("weight_dropout", weight_dropout, lo=0, hi=1, hi_open=True)
    check_int("ortho_rank", ortho_rank, lo=1)
    check_number("ortho_lambda", ortho_lambda, lo=0)
    keep_threshold(float(weight_dropout))


def check_layer_shape(r, ortho_rank, in_features: int, out_features: int,
                      name: Optional[str] = None) -> None:
    """``1 <= r <= min(in, out)`` and ``1 <= ortho_rank <= min(in, out)`` (``r`` None:
    only ``ortho_rank``); ``name`` (a module name) prefixes the message."""
    pairs = [("ortho_rank", ortho_rank)] if r is None else [("r", r), ("ortho_rank", ortho_rank)]
    for arg, v in pairs:
        check_int(arg, v)
    top = min(in_features, out_features)
    for arg, v in pairs:
        if not 1 <= v <= top:
            raise ValueError(f"{_where(name)}{arg} must be in [1, min(in_features, "
                             f"out_features)] = [1, {top}], got {v} (layer shape "
                             f"out={out_features}, in={in_features})")


def check_base_weight(weight: torch.Tensor, name: Optional[str] = None) -> None:
    """A base weight RoRA can adapt: floating dtype, 2-D, every entry finite (NaN or
    Inf would give a NaN SVD basis, ``σ_max`` and rescaling). ``name`` is the module's."""
    where = f"base weight of {name!r}" if name else "base weight"
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"unsupported weight dtype {weight.dtype} ({where}); expected one "
                        "of float32, float16, bfloat16, float64")
    if weight.dim() != 2:
        raise ValueError(f"{where} must be 2-D, got shape {tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise ValueError(f"{where} is on the meta device (no values): load the weights "
                         "before adding RoRA")
    with torch.no_grad():
        finite = torch.isfinite(weight)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(weight).sum())
            n_inf = int(finite.numel() - int(finite.sum()) - n_nan)
            raise ValueError(f"{where} has non-finite entries ({n_nan} NaN, {n_inf} Inf of "
                             f"{weight.numel()}); RoRA needs a finite weight for its SVD "
                             "basis and σ_max")
