"""``RoraLinear``: a drop-in replacement for ``nn.Linear`` that trains with RoRA.

A RoRA layer is LoRA (``W' = W_pre + s·BA``) plus

1. clean-strengthened regularisation: dropout on the frozen pretrained *weights*
   during training, ``W = Dropout_p(W_pre) + s·BA``;
2. trigger-insensitive regularisation: ``λ (‖Uₖᵀ B‖²_F + ‖A Vₖ‖²_F)`` added to the
   objective, ``Uₖ``, ``Vₖ`` the cached top-k singular vectors of ``W_pre``;
3. post-training spectral rescaling ``s = σ_max(W_pre) / σ_max(BA)``
   (:func:`rora_fast.spectral_rescale_`).

The math lives in :mod:`rora_fast.reference`; the op and its backends in
:mod:`rora_fast.functional`.
"""

from __future__ import annotations

import math
import threading
from typing import Optional

import torch
from torch import nn

from . import functional as F_rora
from . import reference as ref
from .linalg import rescale_factor, sigma_max_lowrank, spectral_basis
from . import penalty as _penalty
from .bases import base_kind

__all__ = ["RoraLinear", "PENALTY_MODES", "INITS", "training_forward",
           "count_training_forward", "add_scaled_product_"]


# The argument rules live in rora_fast/validation.py (shared with RoraConfig).
from .validation import FLOAT_DTYPES as _FLOAT_DTYPES  # noqa: E402
from .validation import INITS, PENALTY_MODES  # noqa: E402,F401
from .validation import check_base_weight as _check_base_weight  # noqa: E402
from .validation import check_hparams as _check_hparams  # noqa: E402


def add_scaled_product_(weight: torch.Tensor, coef: float, B: torch.Tensor, A: torch.Tensor,
                        compute_dtype: torch.dtype = torch.float64) -> None:
    """``weight += coef · B A`` in place, computed in ``compute_dtype`` and rounded once to
    the weight's dtype: the PiSSA/OLoRA fold of the start factors into the frozen base
    (``W − s·BA`` at init, ``+ (s_old − s_new)·B₀A₀`` when the scale changes)."""
    with torch.no_grad():
        w = weight.detach().to(compute_dtype)
        prod = B.detach().to(compute_dtype) @ A.detach().to(compute_dtype)
        weight.copy_((w + coef * prod).to(weight.dtype))


def count_training_forward(layer: nn.Module) -> None:
    """Count a training forward of a RoRA layer since the last optimizer step; at
    :data:`rora_fast.penalty.WARN_AFTER_FORWARDS` the penalty hook warns (once) that no
    optimizer step holds the layer's adapters."""
    if torch.compiler.is_compiling():
        return
    d = layer.__dict__  # (nn.Module.__setattr__ is slow)
    n = d["_penalty_forwards"] = d.get("_penalty_forwards", 0) + 1
    if n == _penalty.WARN_AFTER_FORWARDS:
        _penalty._warn_no_step(layer)


def training_forward(layer: nn.Module, x: torch.Tensor, lora_dropout: nn.Module,
                     W: torch.Tensor, b: Optional[torch.Tensor], A: torch.Tensor,
                     B: torch.Tensor, scaling: float, p: float,
                     backend: Optional[str] = None, need_x_lora: bool = False):
    """The training forward of every RoRA layer (:class:`RoraLinear`, its quantized and
    ``Conv1D`` subclasses, the PEFT layers of :mod:`rora_fast.peft_integration`), all
    tensors already in the compute dtype: the seed of the call's masks
    (:meth:`RoraLinear._draw_seed`; none when there is no mask to draw), the forward count
    of :func:`count_training_forward`, and the RoRA op ``x (M ⊙ W)ᵀ/(1−p) + b +
    s x̃ AᵀBᵀ``.

    The LoRA input ``x̃``: an ``nn.Dropout`` (what RoRA and PEFT layers hold) is drawn by
    the op itself from the call's seed (:func:`rora_fast.reference.lora_input`, the
    ``nn.Dropout`` distribution; nothing of ``x̃`` is kept for backward), or, with
    ``need_x_lora`` (DoRA needs ``x̃`` itself), returned as a differentiable tensor by
    :func:`rora_fast.functional.lora_dropout_input`; ``nn.Identity`` gives ``x̃ = x``;
    any other module is called. Returns ``(y, x̃ or None, seed)``."""
    kind = type(lora_dropout)
    x_lora = None
    lora_p = 0.0
    if kind is nn.Dropout:
        if lora_dropout.training:
            lora_p = lora_dropout.p
    elif kind is not nn.Identity:
        x_lora = lora_dropout(x)
    seed = RoraLinear._draw_seed(W.device) if p or lora_p else 0
    if lora_p and need_x_lora:
        x_lora, lora_p = F_rora.lora_dropout_input(x, seed, lora_p), 0.0
    count_training_forward(layer)
    y = F_rora.rora_linear(x, x_lora, W, b, A, B, scaling, p, seed, backend=backend,
                           lora_p=lora_p)
    return y, x_lora, seed


_SEED_BUFFER = threading.local()

def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


class RoraLinear(nn.Module):
    """Linear layer with a RoRA adapter: ``y = x Wᵀ + b + s · (x̃ Aᵀ) Bᵀ``.

    In training, ``W`` is replaced by ``(M ⊙ W) / (1 - p)`` with a fresh Bernoulli
    keep-mask ``M`` per call (seeded from torch's default generator, regenerated in
    backward, replayed by activation checkpointing), and the gradient of
    ``λ Ω(A, B)`` is added to the adapter gradients once per optimizer step, by every
    torch optimizer's ``step()`` (see :mod:`rora_fast.penalty`).

    Args:
        in_features, out_features, bias: as for ``nn.Linear`` (ignored by
            :meth:`from_linear`, which wraps an existing layer).
        r: adapter rank, ``1 <= r <= min(in, out)``.
        alpha: LoRA alpha; ``scaling = alpha / r`` until rescaled.
        weight_dropout: ``p`` of the weight dropout, in ``[0, 1)`` (paper: 0.1).
        lora_dropout: PEFT-style dropout on the adapter's input, in ``[0, 1)``: the
            ``nn.Dropout`` distribution, drawn from the call's seed with the weight mask
            (:func:`rora_fast.reference.lora_input`), so that backward regenerates it
            instead of keeping ``x̃`` and a mask per layer.
        ortho_rank: ``k``, number of singular vectors of ``W_pre`` penalised.
        ortho_lambda: ``λ`` (paper: 10); 0 turns the penalty off.
        penalty_mode: ``"optimizer"`` (``λ∇Ω`` added to the adapter gradients at each
            ``step()`` of a torch optimizer holding them; :func:`rora_fast.add_penalty_grads`
            for hand-written updates; the default) or ``"loss"`` (nothing automatic: add
            :func:`rora_fast.rora_penalty` to the loss). ``"backward"``, the deprecated
            name of ``"optimizer"``, becomes ``"optimizer"`` with a ``DeprecationWarning``.
        init: ``"default"`` (A Kaiming-uniform, B zero, like PEFT), ``"gaussian"``,
            ``"pissa"`` or ``"olora"`` (base weight replaced by the residual, as PEFT).
        use_dora: DoRA magnitude/direction decomposition on top (as PEFT's DoRA).
        adapter_dtype: dtype of A and B (default: float32 for a half-precision base,
            else the base dtype — what PEFT does with ``autocast_adapter_dtype``).
        svd_method, svd_cache: see :func:`rora_fast.linalg.spectral_basis`.
        backend: ``None`` (``RORA_FAST_BACKEND`` or auto), ``"reference"``, ``"triton"``.
    """

    #: the :func:`rora_fast.bases.base_kind` values this class wraps; a subclass for
    #: another kind of base declares its own and a ``from_base`` constructor
    BASE_KINDS: tuple = ("linear",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 r: int = 8, alpha: float = 16, weight_dropout: float = 0.1,
                 lora_dropout: float = 0.0, ortho_rank: int = 32,
                 ortho_lambda: float = 10.0, penalty_mode: str = "optimizer",
                 init: str = "default", use_dora: bool = False,
                 adapter_dtype: Optional[torch.dtype] = None, svd_method: str = "auto",
                 svd_cache="default", backend: Optional[str] = None,
                 device=None, dtype=None, _base: Optional[nn.Linear] = None):
        super().__init__()
        if _base is None:
            _base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if not isinstance(_base, nn.Linear):
            raise TypeError(f"RoraLinear wraps an nn.Linear, got {type(_base).__name__}")
        in_features, out_features = _base.in_features, _base.out_features
        penalty_mode = _check_hparams(  # ("backward", deprecated, becomes "optimizer")
            r=r, alpha=alpha, weight_dropout=weight_dropout, lora_dropout=lora_dropout,
            ortho_rank=ortho_rank, ortho_lambda=ortho_lambda, penalty_mode=penalty_mode,
            init=init, use_dora=use_dora, svd_method=svd_method,
            in_features=in_features, out_features=out_features)
        _check_base_weight(_base.weight)  # floating dtype, finite entries
        r, ortho_rank = int(r), int(ortho_rank)  # numpy ints pass the check: plain ints

        self.in_features, self.out_features = in_features, out_features
        # Share the base parameters (same Parameter objects, no copy) and freeze them.
        self.weight = _base.weight
        self.weight.requires_grad_(False)
        self.bias = _base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

        self.r = r
        self.lora_alpha = float(alpha)
        self.scaling = self.lora_alpha / r
        self.weight_dropout = float(weight_dropout)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.ortho_rank = ortho_rank
        self.ortho_lambda = float(ortho_lambda)
        self.penalty_mode = penalty_mode
        self.init = init
        self.use_dora = bool(use_dora)
        self.backend = backend
        self.rescaled = False

        wdtype, wdev = self.weight.dtype, self.weight.device
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if wdtype in (torch.float16, torch.bfloat16) else wdtype
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=adapter_dtype, device=wdev))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=adapter_dtype, device=wdev))

        # Spectral quantities of the *original* W_pre, before any init rewrites it.
        basis = spectral_basis(self.weight, ortho_rank, method=svd_method, cache_dir=svd_cache)
        self.register_buffer("ortho_U", basis.U.to(adapter_dtype), persistent=False)
        self.register_buffer("ortho_V", basis.V.to(adapter_dtype), persistent=False)
        self.sigma_pre = basis.sigma_max

        self._init_adapter(init)
        if self.use_dora:
            with torch.no_grad():
                norm = self._weight_norm(self.weight, self._delta_weight().detach())
            self.lora_magnitude = nn.Parameter(norm.to(adapter_dtype))
        else:
            self.lora_magnitude = None

        # The optimizer step hook adds λ∇Ω (rora_fast.penalty); it looks the adapters up
        # through the module at each step (FSDP2 and load_state_dict(assign=True)
        # replace the Parameter objects).
        _penalty.register_penalty_layer(self)

    def __setstate__(self, state):
        # Copies (copy.deepcopy, pickle) are layers of their own for the step hook too.
        super().__setstate__(state)
        _penalty.register_penalty_layer(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16,
                    weight_dropout: float = 0.1, lora_dropout: float = 0.0,
                    ortho_rank: int = 32, ortho_lambda: float = 10.0,
                    **kwargs) -> "RoraLinear":
        """Wrap an existing ``nn.Linear`` (its weight and bias are shared, not copied).

        A bitsandbytes ``Linear4bit``/``Linear8bitLt`` or a transformers ``Conv1D`` gets its
        own layer class (:class:`rora_fast.quantized.QuantRoraLinear`,
        :class:`rora_fast.conv1d.RoraConv1D`): the subclass whose ``BASE_KINDS`` holds the
        base's :func:`rora_fast.bases.base_kind` builds it (``from_base``)."""
        kind = base_kind(linear)
        if cls is RoraLinear and kind not in ("linear", None):
            for sub in _subclasses(RoraLinear):
                if kind in sub.BASE_KINDS:
                    return sub.from_base(linear, r=r, alpha=alpha,
                                         weight_dropout=weight_dropout,
                                         lora_dropout=lora_dropout, ortho_rank=ortho_rank,
                                         ortho_lambda=ortho_lambda, **kwargs)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, linear.bias is not None,
                   r=r, alpha=alpha, weight_dropout=weight_dropout, lora_dropout=lora_dropout,
                   ortho_rank=ortho_rank, ortho_lambda=ortho_lambda, _base=linear, **kwargs)

    def _init_adapter(self, init: str) -> None:
        with torch.no_grad():
            if init in ("default", "gaussian"):
                if init == "default":
                    nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                else:
                    nn.init.normal_(self.lora_A, std=1 / self.r)
                nn.init.zeros_(self.lora_B)
                self.register_buffer("lora_A0", None)
                self.register_buffer("lora_B0", None)
                return
            w = self.weight.detach().to(torch.float32)
            if init == "pissa":  # as peft.tuners.lora.layer.LoraLayer.pissa_init
                Vfull, S, Uh = torch.linalg.svd(w, full_matrices=False)
                Sr = S[: self.r] / self.scaling
                A = torch.diag(torch.sqrt(Sr)) @ Uh[: self.r]
                B = Vfull[:, : self.r] @ torch.diag(torch.sqrt(Sr))
            else:  # olora, as peft.tuners.lora.layer.LoraLayer.olora_init
                Q, R = torch.linalg.qr(w)
                A, B = R[: self.r].contiguous(), Q[:, : self.r].contiguous()
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
            # The base becomes the residual, in place (as PEFT does to the base layer).
            add_scaled_product_(self.weight, -self.scaling, B, A, torch.float32)
            # Keep the initial factors: the merged model is W_res + s·BA, and an export to
            # plain LoRA needs ΔW = s·BA − s0·B0A0 relative to the original weight.
            self.register_buffer("lora_A0", A.to(self.lora_A.dtype).clone())
            self.register_buffer("lora_B0", B.to(self.lora_B.dtype).clone())
            self.init_scaling = self.scaling

    # ------------------------------------------------------------------ helpers
    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, scaling={self.scaling:.4g}, "
                f"weight_dropout={self.weight_dropout}, ortho_rank={self.ortho_rank}, "
                f"ortho_lambda={self.ortho_lambda}, init={self.init}, use_dora={self.use_dora}")

    def _delta_weight(self) -> torch.Tensor:
        """``s · B A`` (out x in) in the adapter dtype."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @staticmethod
    def _weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Row norms of ``W + ΔW`` (DoRA's ‖·‖_c for an out x in weight)."""
        return torch.linalg.norm(weight.to(delta.dtype) + delta, dim=1)

    def delta_weight(self) -> torch.Tensor:
        """The weight change this adapter applies, relative to the stored base weight."""
        with torch.no_grad():
            if not self.use_dora:
                return self._delta_weight()
            delta = self._delta_weight()
            w = self.weight.to(delta.dtype)
            g = (self.lora_magnitude / self._weight_norm(w, delta)).unsqueeze(1)
            return g * (w + delta) - w

    # ------------------------------------------------------------------ penalty
    def _start_factors(self):
        """``(lora_A0, lora_B0)`` for PiSSA/OLoRA (the penalty and the rescaling act on the
        update away from that start), ``(None, None)`` for LoRA's zero-product start."""
        return getattr(self, "lora_A0", None), getattr(self, "lora_B0", None)

    def penalty(self) -> torch.Tensor:
        """``λ Ω(A, B)``; differentiable only with ``penalty_mode="loss"`` so that the
        penalty cannot be counted twice (the other modes apply its gradient themselves)."""
        if not self.ortho_lambda:
            return torch.zeros((), device=self.lora_A.device)
        if self.penalty_mode == "loss":
            return self.ortho_lambda * ref.ortho_penalty(self.lora_A, self.lora_B,
                                                         self.ortho_U, self.ortho_V,
                                                         *self._start_factors())
        with torch.no_grad():
            return self.ortho_lambda * ref.ortho_penalty(self.lora_A, self.lora_B,
                                                         self.ortho_U, self.ortho_V,
                                                         *self._start_factors())

    #: the name every RoRA layer (this class and the PEFT layers) answers to
    rora_penalty = penalty

    def _penalty_terms(self):
        """What the optimizer step hook adds (see :mod:`rora_fast.penalty`). Read
        through the module's dicts at every step (cheap; FSDP2 and
        ``load_state_dict(assign=True)`` replace the Parameter objects)."""
        lam = self.ortho_lambda
        if not lam or self.penalty_mode == "loss":
            return []
        P, Bf = self._parameters, self._buffers
        return [(P["lora_A"], "A", Bf["ortho_V"], Bf.get("lora_A0"), lam),
                (P["lora_B"], "B", Bf["ortho_U"], Bf.get("lora_B0"), lam)]

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"RoraLinear expects a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"RoraLinear expects inputs of shape [..., {self.in_features}], "
                             f"got {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"unsupported input dtype {x.dtype}; expected float32, float16, "
                            "bfloat16 or float64")
        if x.device != self.weight.device:
            raise ValueError(f"input is on {x.device} but the layer's weight is on "
                             f"{self.weight.device}")

    # Hooks for bases that are not a dense nn.Linear weight (quantized bases override
    # them): the dense W for one call, and the eval-mode base output.
    def _base_weight(self, cdtype: torch.dtype) -> torch.Tensor:
        """The dense base weight ``W`` (out x in) in ``cdtype`` for one call."""
        w = self.weight
        return w if w.dtype == cdtype else w.to(cdtype)

    def _base_eval_output(self, x: torch.Tensor, b: Optional[torch.Tensor],
                          cdtype: torch.dtype) -> torch.Tensor:
        """``x Wᵀ + b`` in eval mode (no weight dropout)."""
        return nn.functional.linear(x, self._base_weight(cdtype), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The per-call path is kept lean (small models are launch-bound): the layer's
        # arguments were checked at construction, and the input is checked in full
        # only when the cheap test below fails.
        try:
            ok = x.shape[-1] == self.in_features
        except (AttributeError, IndexError, TypeError):
            ok = False
        if not ok:
            self._check_input(x)  # raises the precise error
        # (a device mismatch surfaces in the first op, with torch's own message)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            cdtype = torch.get_autocast_dtype(dev)
            with torch.autocast(dev, enabled=False):
                return self._forward(x if x.dtype == cdtype else x.to(cdtype), cdtype)
        # Without autocast the layer computes in its base weight's dtype, like nn.Linear.
        return self._forward(x, self.weight.dtype)

    def _forward(self, x: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
        if x.dtype != cdtype:
            self._check_input(x)  # a non-floating input gets its own message
            raise TypeError(f"input dtype {x.dtype} does not match the layer's dtype {cdtype} "
                            "(cast the input or use torch.autocast)")
        # Casts only where the stored dtype differs (autocast, half-precision bases).
        b = self.bias
        if b is not None and b.dtype != cdtype:
            b = b.to(cdtype)
        A, B = self.lora_A, self.lora_B
        if A.dtype != cdtype:
            A = A.to(cdtype)
        if B.dtype != cdtype:
            B = B.to(cdtype)
        if not self.training:
            lora = self.scaling * ((x @ A.t()) @ B.t())
            if self.use_dora:
                W = self._base_weight(cdtype)
                y = nn.functional.linear(x, W) + lora
                return self._dora_output(y, b, x, x, W, A, B, cdtype, None)
            return self._base_eval_output(x, b, cdtype) + lora
        W = self._base_weight(cdtype)
        y, x_lora, seed = training_forward(self, x, self.lora_dropout, W,
                                           None if self.use_dora else b, A, B, self.scaling,
                                           self.weight_dropout, backend=self.backend,
                                           need_x_lora=self.use_dora)
        if self.use_dora:
            y = self._dora_output(y, b, x, x if x_lora is None else x_lora, W, A, B,
                                  cdtype, seed)
        return y

    @staticmethod
    def _draw_seed(device: Optional[torch.device] = None):
        """The weight mask's seed. Eager: an int from torch's default CPU generator (no
        device work, no sync). Under ``torch.compile``: a one-element int64 tensor drawn
        in the graph (no host read, no graph break; see :mod:`rora_fast.functional`), on
        ``device`` when that is a CUDA device (the weight's: then the graph has no CPU op
        and CUDA graphs can capture it; the seed comes from that device's generator, so
        compiled and eager masks differ on CUDA), else from the CPU generator like eager."""
        if torch.compiler.is_compiling():
            dev = device if device is not None and device.type == "cuda" else "cpu"
            return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=dev)
        # Eager: the same draw (``randint`` is ``random_`` on a fresh tensor) into a
        # per-thread buffer, saving the allocation and argument parsing per call; read
        # with ``tolist`` (a plain memory read, where ``item`` dispatches one more op).
        buf = getattr(_SEED_BUFFER, "t", None)
        if buf is None:
            buf = _SEED_BUFFER.t = torch.empty(1, dtype=torch.int64)
        return buf.random_(0, 2**62).tolist()[0]

    def _dora_output(self, y, b, x, x_lora, W, A, B, cdtype, seed):
        """DoRA on top of ``y = x Ŵᵀ + s x̃ AᵀBᵀ`` (no bias), as PEFT's DoRA layer:
        ``g = m / ‖W + s·BA‖_row`` (norm detached, undropped ``W``), and
        ``out = y + (g − 1) ⊙ (x̃ Ŵᵀ + s x̃ AᵀBᵀ) + b``; when ``x̃`` is ``x`` this is
        ``g ⊙ y + b``."""
        with torch.no_grad():
            norm = self._weight_norm(W, self.scaling * (B @ A)).to(cdtype)
        g = self.lora_magnitude.to(cdtype) / norm
        if x_lora is x:
            out = g * y
        else:
            inner = F_rora.rora_linear(x_lora, None, W, None, A, B, self.scaling,
                                       self.weight_dropout, seed, backend=self.backend)
            out = y + (g - 1) * inner
        return out + b if b is not None else out

    # ------------------------------------------------------------------ rescaling / merging
    def sigma_delta(self) -> float:
        """Exact σ_max of the trained update without ``scaling``: ``B A`` (LoRA start), or
        ``B A − B₀ A₀`` for PiSSA/OLoRA, whose adapter starts as W_pre's top components."""
        A0, B0 = self._start_factors()
        if A0 is None:
            return sigma_max_lowrank(self.lora_B, self.lora_A)
        B = torch.cat([self.lora_B.detach(), B0.to(self.lora_B.dtype)], 1)
        A = torch.cat([self.lora_A.detach(), -A0.to(self.lora_A.dtype)], 0)
        return sigma_max_lowrank(B, A)

    def spectral_rescale_(self) -> float:
        """Set the update's scale to ``σ_max(W_pre) / σ_max(update)`` and return it.

        LoRA start: ``scaling = σ_max(W_pre)/σ_max(BA)``. PiSSA/OLoRA: the model is
        ``W_pre + s·(BA − B₀A₀)``; only the update is rescaled, W_pre's own top components
        (``B₀A₀``, carried by the adapter) keep their weight: the frozen base (the
        residual ``W_pre − s₀B₀A₀``) absorbs ``(s₀ − s)·B₀A₀`` so that the layer is still
        ``base + scaling·BA``.
        """
        s_new = rescale_factor(self.sigma_pre, self.sigma_delta())
        if self._start_factors()[0] is not None:
            self._refold_start_(s_new)
        self.scaling = s_new
        self.rescaled = True
        return self.scaling

    def _refold_start_(self, s_new: float) -> None:
        """PiSSA/OLoRA: the frozen base ``W_pre − s₀·B₀A₀`` (``s₀ = init_scaling``) becomes
        ``W_pre − s_new·B₀A₀`` (float64, rounded once)."""
        A0, B0 = self._start_factors()
        add_scaled_product_(self.weight, self.init_scaling - s_new, B0, A0)
        self.init_scaling = s_new

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer's eval output (base weight updated
        in place, the same storage as before)."""
        with torch.no_grad():
            # W + s·BA (DoRA: g ⊙ (W + s·BA)) in float64, rounded once to the weight dtype.
            w64 = self.weight.to(torch.float64)
            merged = w64 + self.scaling * (self.lora_B.to(torch.float64)
                                           @ self.lora_A.to(torch.float64))
            if self.use_dora:
                g = self.lora_magnitude.to(torch.float64) / torch.linalg.norm(merged, dim=1)
                merged = g.unsqueeze(1) * merged
            self.weight.copy_(merged)
            del w64, merged
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin
