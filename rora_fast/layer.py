"""``RoraLinear``: a drop-in replacement for ``nn.Linear`` that trains with RoRA.

A RoRA layer is LoRA (``W' = W_pre + s·BA``) plus

1. clean-strengthened regularisation: dropout on the frozen pretrained *weights*
   during training, ``W = Dropout_p(W_pre) + s·BA``;
2. trigger-insensitive regularisation: ``λ (‖Uₖᵀ B‖²_F + ‖A Vₖ‖²_F)`` added to the
   objective, ``Uₖ``, ``Vₖ`` the cached top-k singular vectors of ``W_pre``;
3. post-training spectral rescaling ``s = σ_max(W_pre) / σ_max(BA)``
   (:func:`rora_fast.spectral_rescale_`).

The layer is a shell over two strategies: its *base* (:mod:`rora_fast.bases`: dense
``nn.Linear``, GPT-2 ``Conv1D``, bitsandbytes 4-bit and 8-bit; how the weight is read,
evaluated and merged) and its *variant* (:mod:`rora_fast.variants`: LoRA's start,
PiSSA/OLoRA start factors, DoRA). Its forward is the one forward of every RoRA layer,
:func:`rora_fast.forward.layer_forward`. The math lives in :mod:`rora_fast.reference`; the
op and its backends in :mod:`rora_fast.functional`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import penalty as _penalty
from . import reference as ref
from .bases import BASES, base_kind
from .forward import draw_seed, layer_forward
from .kinds import layer_kind
from .linalg import paper_scale, spectral_basis
from .validation import FLOAT_DTYPES as _FLOAT_DTYPES
from .validation import INITS, PENALTY_MODES  # noqa: F401
from .validation import check_base_weight as _check_base_weight
from .validation import check_hparams as _check_hparams
from .variants import Variant, variant_for

__all__ = ["RoraLinear", "PENALTY_MODES", "INITS"]


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
            :func:`rora_fast.rora_penalty` to the loss).
        init: ``"default"`` (A Kaiming-uniform, B zero, like PEFT), ``"gaussian"``,
            ``"pissa"`` or ``"olora"`` (base weight replaced by the residual, as PEFT).
        use_dora: DoRA magnitude/direction decomposition on top (as PEFT's DoRA).
        adapter_dtype: dtype of A and B (default: float32 for a half-precision base,
            else the base dtype — what PEFT does with ``autocast_adapter_dtype``).
        svd_method, svd_cache: see :func:`rora_fast.linalg.spectral_basis`.
        backend: ``None`` (``RORA_FAST_BACKEND`` or auto), ``"reference"``, ``"triton"``.
    """

    #: how this layer reads, evaluates and merges its base (:mod:`rora_fast.bases`; which
    #: layer class wraps which kind of base: :data:`rora_fast.kinds.KINDS`)
    _base = BASES["linear"]
    #: the adapter's variant (:mod:`rora_fast.variants`), from ``init`` and ``use_dora``
    variant: Variant

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
        _check_base_weight(_base.weight)  # floating dtype, finite entries
        # Share the base parameters (same Parameter objects, no copy) and freeze them.
        self.weight = _base.weight
        self.weight.requires_grad_(False)
        self.bias = _base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._setup(self.weight, r=r, alpha=alpha, weight_dropout=weight_dropout,
                    lora_dropout=lora_dropout, ortho_rank=ortho_rank,
                    ortho_lambda=ortho_lambda, penalty_mode=penalty_mode, init=init,
                    use_dora=use_dora, adapter_dtype=adapter_dtype, svd_method=svd_method,
                    svd_cache=svd_cache, backend=backend)

    def _setup(self, W: torch.Tensor, *, r, alpha, weight_dropout, lora_dropout, ortho_rank,
               ortho_lambda, penalty_mode, init, use_dora, adapter_dtype, svd_method,
               svd_cache, backend) -> None:
        """Everything of a RoRA layer but its base: checks, hyper-parameters, adapter
        factors, SVD bases and σ_max of ``W`` (the dense ``(out, in)`` base weight, which
        PiSSA/OLoRA rewrite in place into the residual), DoRA's magnitude, the penalty
        hook's registration."""
        out_features, in_features = W.shape
        penalty_mode = _check_hparams(
            r=r, alpha=alpha, weight_dropout=weight_dropout, lora_dropout=lora_dropout,
            ortho_rank=ortho_rank, ortho_lambda=ortho_lambda, penalty_mode=penalty_mode,
            init=init, use_dora=use_dora, svd_method=svd_method,
            in_features=in_features, out_features=out_features)
        r, ortho_rank = int(r), int(ortho_rank)  # numpy ints pass the check: plain ints
        self.in_features, self.out_features = in_features, out_features
        self.r = r
        self.lora_alpha = float(alpha)
        self.scaling = self.lora_alpha / r
        self.weight_dropout = float(weight_dropout)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.ortho_rank = ortho_rank
        self.ortho_lambda = float(ortho_lambda)
        self.penalty_mode = penalty_mode
        self.variant = variant_for(init, use_dora)
        self.backend = backend
        self.rescaled = False

        wdtype, wdev = W.dtype, W.device
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if wdtype in (torch.float16, torch.bfloat16) else wdtype
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=adapter_dtype, device=wdev))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=adapter_dtype, device=wdev))

        # Spectral quantities of the *original* W_pre, before any init rewrites it.
        basis = spectral_basis(W, ortho_rank, method=svd_method, cache_dir=svd_cache)
        self.register_buffer("ortho_U", basis.U.to(adapter_dtype), persistent=False)
        self.register_buffer("ortho_V", basis.V.to(adapter_dtype), persistent=False)
        self.sigma_pre = basis.sigma_max

        self.variant.init_factors_(self, W)
        self.lora_magnitude = self.variant.init_magnitude(self, W)

        # The optimizer step hook adds λ∇Ω (rora_fast.penalty); it looks the adapters up
        # through the module at each step (FSDP2 and load_state_dict(assign=True)
        # replace the Parameter objects).
        _penalty.register_penalty_layer(self)

    def __setstate__(self, state):
        # Copies (copy.deepcopy, pickle) are layers of their own for the step hook too.
        if "variant" not in state:  # pickled before the variant was an object
            state = dict(state, variant=variant_for(state.pop("init", "default"),
                                                    state.pop("use_dora", False)))
        super().__setstate__(state)
        _penalty.register_penalty_layer(self)

    @property
    def init(self) -> str:
        """``"default"``, ``"gaussian"``, ``"pissa"`` or ``"olora"`` (:attr:`variant`'s)."""
        return self.variant.init

    @property
    def use_dora(self) -> bool:
        """Whether DoRA's magnitude is on top (:attr:`variant`'s)."""
        return self.variant.dora

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16,
                    weight_dropout: float = 0.1, lora_dropout: float = 0.0,
                    ortho_rank: int = 32, ortho_lambda: float = 10.0,
                    **kwargs) -> "RoraLinear":
        """Wrap an existing ``nn.Linear`` (its weight and bias are shared, not copied).

        A bitsandbytes ``Linear4bit``/``Linear8bitLt`` or a transformers ``Conv1D`` gets its
        own layer class (:class:`rora_fast.quantized.QuantRoraLinear`,
        :class:`rora_fast.conv1d.RoraConv1D`), built by its constructor as
        :data:`rora_fast.kinds.KINDS` says for the base's kind."""
        # a bad argument raises before the layer exists: the caller's module keeps its
        # requires_grad flags (the constructor freezes the shared weight and bias)
        flags = [(p, p.requires_grad) for p in linear.parameters()] \
            if isinstance(linear, nn.Module) else []
        try:
            return cls._from_linear(linear, r=r, alpha=alpha, weight_dropout=weight_dropout,
                                    lora_dropout=lora_dropout, ortho_rank=ortho_rank,
                                    ortho_lambda=ortho_lambda, **kwargs)
        except BaseException:
            for p, flag in flags:
                p.requires_grad_(flag)
            raise

    @classmethod
    def _from_linear(cls, linear, r, alpha, weight_dropout, lora_dropout, ortho_rank,
                     ortho_lambda, **kwargs) -> "RoraLinear":
        kind = base_kind(linear)
        row = None if kind is None else layer_kind(kind)
        if cls is RoraLinear and row is not None and row.layer_class() is not cls:
            return row.build(linear, r=r, alpha=alpha, weight_dropout=weight_dropout,
                             lora_dropout=lora_dropout, ortho_rank=ortho_rank,
                             ortho_lambda=ortho_lambda, **kwargs)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, linear.bias is not None,
                   r=r, alpha=alpha, weight_dropout=weight_dropout, lora_dropout=lora_dropout,
                   ortho_rank=ortho_rank, ortho_lambda=ortho_lambda, _base=linear, **kwargs)

    # ------------------------------------------------------------------ the base
    @property
    def base_module(self) -> nn.Module:
        """The module holding the base weight and bias: this layer itself for a dense
        base (``weight``/``bias`` are its own entries, as ``nn.Linear``'s), the wrapped
        ``base_layer`` for a base kept as a child (bitsandbytes)."""
        return self

    @property
    def base_kind(self) -> str:
        """``"linear"``, ``"conv1d"``, ``"4bit"`` or ``"8bit"`` (:mod:`rora_fast.bases`)."""
        return self._base.kind

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense ``(out, in)`` base weight in ``dtype`` (dequantized for a quantized
        base)."""
        return self._base.dense_weight(self.base_module, dtype)

    # ------------------------------------------------------------------ helpers
    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, scaling={self.scaling:.4g}, "
                f"weight_dropout={self.weight_dropout}, ortho_rank={self.ortho_rank}, "
                f"ortho_lambda={self.ortho_lambda}, init={self.init}, use_dora={self.use_dora}")

    def delta_weight(self) -> torch.Tensor:
        """The weight change this adapter applies, relative to the stored base weight."""
        return self.variant.delta_weight(self, self.weight)

    # ------------------------------------------------------------------ penalty
    def penalty(self) -> torch.Tensor:
        """``λ Ω(A, B)``; differentiable only with ``penalty_mode="loss"`` so that the
        penalty cannot be counted twice (the other modes apply its gradient themselves)."""
        if not self.ortho_lambda:
            return torch.zeros((), device=self.lora_A.device)
        args = (self.lora_A, self.lora_B, self.ortho_U, self.ortho_V,
                *self.variant.start_factors(self))
        if self.penalty_mode == "loss":
            return self.ortho_lambda * ref.ortho_penalty(*args)
        with torch.no_grad():
            return self.ortho_lambda * ref.ortho_penalty(*args)

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
        A0, B0 = self.variant.start_factors(self)
        return [(P["lora_A"], "A", Bf["ortho_V"], A0, lam),
                (P["lora_B"], "B", Bf["ortho_U"], B0, lam)]

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The per-call path is kept lean (small models are launch-bound): the layer's
        # arguments were checked at construction, and the input is checked in full
        # only when the cheap test below fails.
        # (a device mismatch surfaces in the first op, with torch's own message)
        try:
            ok = x.shape[-1] == self.in_features
        except (AttributeError, IndexError, TypeError):
            ok = False
        if not ok:
            self._check_input(x)  # raises the precise error
        return layer_forward(self, self._base, self.base_module, x, self.lora_A,
                             self.lora_B, self.scaling, self.weight_dropout,
                             self.lora_dropout, training=self.training,
                             variant=self.variant, strict=self._base.strict,
                             backend=self.backend)

    #: the mask seed of one call (:func:`rora_fast.forward.draw_seed`)
    _draw_seed = staticmethod(draw_seed)

    # ------------------------------------------------------------------ rescaling / merging
    def sigma_delta(self) -> float:
        """Exact σ_max of the trained update without ``scaling``: ``B A`` (LoRA start), or
        ``B A − B₀ A₀`` for PiSSA/OLoRA, whose adapter starts as W_pre's top components."""
        return self.variant.sigma_update(self)

    def spectral_rescale_(self) -> float:
        """Set the update's scale to ``σ_max(W_pre) / σ_max(update)`` and return it.

        LoRA start: ``scaling = σ_max(W_pre)/σ_max(BA)``. PiSSA/OLoRA: the model is
        ``W_pre + s·(BA − B₀A₀)``; only the update is rescaled, W_pre's own top components
        (``B₀A₀``, carried by the adapter) keep their weight: the frozen base (the
        residual ``W_pre − s₀B₀A₀``) absorbs ``(s₀ − s)·B₀A₀`` so that the layer is still
        ``base + scaling·BA``.
        """
        return self._set_rescaled_(paper_scale(self.sigma_pre, self.sigma_delta()))

    def _set_rescaled_(self, s_new: float) -> float:
        """Apply a checked rescaling factor (:meth:`spectral_rescale_` computes it;
        :func:`rora_fast.spectral_rescale_` has computed it while checking every layer)."""
        self._refold_start_(s_new)
        self.scaling = s_new
        self.rescaled = True
        return self.scaling

    def _refold_start_(self, s_new: float) -> None:
        """PiSSA/OLoRA: the frozen base ``W_pre − s₀·B₀A₀`` (``s₀ = init_scaling``) becomes
        ``W_pre − s_new·B₀A₀`` (float64, rounded once); nothing for LoRA's start."""
        self.variant.refold_(self, self.weight, s_new)

    def merged_linear(self) -> nn.Module:
        """A plain module computing this layer's eval output: an ``nn.Linear`` for a dense
        base (its weight updated in place, the same storage as before), the base module
        with the merged weight otherwise (:meth:`rora_fast.bases.Base.store_merged`)."""
        holder = self.base_module
        merged = self.variant.merged_weight(self, self._base.dense_weight(holder, torch.float64))
        return self._base.store_merged(holder, merged)
