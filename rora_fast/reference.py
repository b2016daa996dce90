"""The one readable torch reference for RoRA's math.

Everything else in rora-fast (the CPU path of :class:`rora_fast.RoraLinear`, the
Triton kernels in :mod:`rora_fast.kernels`, the benchmarks) is checked against the
functions in this file. Keep them simple; speed lives elsewhere.

Notation (one adapted linear layer, ``W`` frozen with shape ``out x in``)::

    y  = x (M ⊙ W)ᵀ / (1 - p) + b + s (x̃ Aᵀ) Bᵀ
    dX = dY (M ⊙ W) / (1 - p)                      (plus s (dY B) A through x̃)
    dB = s dYᵀ (x̃ Aᵀ)          dA = s (dY B)ᵀ x̃
    Ω  = ‖Uₖᵀ B‖²_F + ‖A Vₖ‖²_F     ∇_B Ω = 2 Uₖ (Uₖᵀ B)     ∇_A Ω = 2 (A Vₖ) Vₖᵀ

``M`` is a Bernoulli keep-mask over the weight elements, one per call, shared by
every row of the batch. ``x̃`` is the (optional) LoRA input dropout of ``x``: either
given (any module's output), or drawn by :func:`lora_input` from the same seed (below).

The weight mask
---------------
The mask is drawn from a counter-based generator so that the forward pass, the
backward pass, activation-checkpoint replays and the GPU kernels all draw the
identical mask from one integer ``seed``, whatever their tile shapes:

* element ``(n, k)`` of the ``out x in`` weight belongs to Philox counter
  ``g = n * ceil(in / 8) + k // 8`` and uses 16-bit lane ``j = k % 8``;
* ``(c0, c1, c2, c3) = Philox4x32-10(key = seed, counter = (g, 0, 0, 0))``, the
  same stream as Triton's ``tl.randint4x(seed, g)`` with an int32 offset;
* the lane value is ``(c[j // 2] >> (16 * (j % 2))) & 0xFFFF``;
* the element is kept when the lane value is ``>= round(p * 65536)``.

One Philox call therefore yields eight mask bits, and the effective drop
probability is ``p_eff = round(p * 65536) / 65536`` (``|p_eff - p| <= 7.7e-6``);
kept weights are scaled by ``1 / (1 - p_eff)`` so the expectation is exactly ``W``.

The LoRA input mask
-------------------
RoRA layers draw their LoRA input dropout (``nn.Dropout(p)`` semantics: keep with
probability ``1 - p``, scale kept elements by ``1 / (1 - p)``) from the same scheme:
:func:`lora_input` applies the mask above to ``x`` viewed as ``(tokens, in)``, with key
``lora_seed(seed) = seed XOR LORA_STREAM`` (another Philox key: a stream independent of
the weight mask's, from the one seed a call draws). Forward and backward regenerate it
from the seed, so ``x̃`` (and torch's bool dropout mask) need not be kept for backward.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = [
    "PHILOX_ROUNDS",
    "MASK_LANES",
    "philox4x32",
    "keep_threshold",
    "effective_drop_prob",
    "weight_keep_mask",
    "native_mask_available",
    "check_seed",
    "check_counter_range",
    "masked_weight",
    "LORA_STREAM",
    "lora_seed",
    "lora_input",
    "effective_weight",
    "rora_linear_forward",
    "rora_linear_backward",
    "ortho_penalty",
    "ortho_penalty_grads",
]

PHILOX_ROUNDS = 10
MASK_LANES = 8  # 16-bit lanes per Philox call (4 words x 2 halves)
_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
# Counters are int32 in the kernels; refuse weights whose counters would overflow.
_MAX_COUNTER = 2**31 - 1
# Elements processed at once by the torch generator (bounds its temporary memory).
_CHUNK = 1 << 21


def _mulhilo32(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and a tensor of
    uint32 values held in int64, without overflowing int64 (split ``b`` in halves)."""
    b_hi = b >> 16
    b_lo = b & 0xFFFF
    t_hi = a * b_hi  # < 2**48
    t_lo = a * b_lo  # < 2**48
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & _MASK32
    return hi, lo


def philox4x32(seed: int, counter: torch.Tensor, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 with key ``seed`` (64-bit, split lo/hi) and counter ``(counter, 0, 0, 0)``.

    Bit-identical to Triton's ``tl.randint4x(seed, counter)`` for int32 counters.
    Returns four int64 tensors holding uint32 values.
    """
    seed = check_seed(seed)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = counter.to(torch.int64) & _MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def check_seed(seed) -> int:
    """The seed as an int; ValueError outside ``[0, 2**63)``, TypeError if not an integer."""
    if isinstance(seed, bool) or not isinstance(seed, int) and not (
            isinstance(seed, torch.Tensor) and seed.numel() == 1
            and not seed.dtype.is_floating_point):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def check_counter_range(out_features: int, in_features: int) -> int:
    """Philox counter groups per weight row; ValueError if the int32 counters of an
    ``out x in`` weight would overflow."""
    groups = -(-in_features // MASK_LANES)
    if out_features * groups - 1 > _MAX_COUNTER:
        raise ValueError(
            f"weight of shape ({out_features}, {in_features}) is too large for the "
            f"int32 mask counter ({out_features * groups} > 2**31)")
    return groups


def keep_threshold(p: float, name: str = "weight_dropout") -> int:
    """16-bit threshold: an element is kept when its lane value is >= this. ``name``: the
    hyperparameter ``p`` is, for the error message."""
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {p!r}")
    thr = int(round(p * 65536))
    if thr >= 65536:
        raise ValueError(f"{name}={p} is too close to 1 (keeps no element)")
    return thr


def effective_drop_prob(p: float) -> float:
    """The drop probability the 16-bit mask really has (``round(p * 65536) / 65536``)."""
    return keep_threshold(p) / 65536.0


_MASK_PARAMS: dict = {}


def mask_params(p: float):
    """``(thr, scale)`` of a drop probability: the 16-bit keep threshold
    (:func:`keep_threshold`) and ``1 / (1 - p_eff)``, the factor of the kept elements.
    The one definition every backend uses; validated once per value (cached)."""
    v = _MASK_PARAMS.get(p)
    if v is None:
        thr = keep_threshold(p)  # validates p, raises ValueError with a clear message
        v = _MASK_PARAMS[p] = (thr, 1.0 / (1.0 - thr / 65536.0))
    return v


try:  # optional C fast path, bit-identical to the torch code below (tests check it)
    from . import _philox_cpu as _native
except ImportError:  # not built: the torch implementation serves every device
    _native = None


def native_mask_available() -> bool:
    """Whether the C fast path of the mask (built by setup.py) is importable."""
    return _native is not None


def weight_keep_mask(seed: int, out_features: int, in_features: int, p: float,
                     device=None, impl: str = "auto") -> torch.Tensor:
    """Boolean keep-mask of shape ``(out_features, in_features)`` (True = kept).

    ``impl="torch"`` is the definition (the Philox stream in torch ops, any device);
    ``"native"`` is the C fast path for CPU tensors (``rora_fast/csrc/philox_mask.c``);
    ``"auto"`` takes the C path on the CPU when it is built, torch otherwise.
    """
    thr = keep_threshold(p)
    if impl not in ("auto", "torch", "native"):
        raise ValueError(f"impl must be auto, torch or native, got {impl!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if thr == 0:
        return torch.ones(out_features, in_features, dtype=torch.bool, device=device)
    groups = check_counter_range(out_features, in_features)
    seed = check_seed(seed)
    use_native = impl == "native" or (impl == "auto" and device.type == "cpu"
                                      and _native is not None)
    if use_native:
        if _native is None:
            raise RuntimeError("the C mask extension rora_fast._philox_cpu is not built")
        if device.type != "cpu":
            raise ValueError("impl='native' computes the mask on the CPU only")
        out = torch.empty(out_features, in_features, dtype=torch.bool)
        if out.numel():
            _native.keep_mask(seed, out.data_ptr(), out_features, in_features, thr,
                              torch.get_num_threads())
        return out
    total = out_features * groups
    halves = torch.empty(total * MASK_LANES, dtype=torch.int32, device=device)
    shifts = torch.tensor([0, 16], dtype=torch.int64, device=device)
    for start in range(0, total, _CHUNK):
        stop = min(total, start + _CHUNK)
        g = torch.arange(start, stop, dtype=torch.int64, device=device)
        words = torch.stack(philox4x32(seed, g), dim=-1)  # (chunk, 4)
        lanes = (words.unsqueeze(-1) >> shifts) & 0xFFFF  # (chunk, 4, 2)
        halves[start * MASK_LANES:stop * MASK_LANES] = lanes.reshape(-1).to(torch.int32)
    halves = halves.view(out_features, groups * MASK_LANES)[:, :in_features]
    return halves >= thr


def masked_weight(weight: torch.Tensor, seed: int, p: float,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(M ⊙ W) / (1 - p_eff)`` in the weight's dtype (``W`` itself when ``p == 0``).

    ``out``: an optional buffer of the weight's shape and dtype to write into (the CPU
    fast path reuses it, saving the page faults of a fresh allocation per call).
    """
    if keep_threshold(p) == 0:
        return weight
    scale = mask_params(p)[1]
    if (_native is not None and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.dim() == 2 and weight.numel()):
        # C fast path: one pass, bit-identical to the torch expression below.
        w = weight.contiguous()
        if (out is None or out.shape != w.shape or out.dtype != w.dtype
                or out.device != w.device or not out.is_contiguous()):
            out = torch.empty_like(w)
        rows, cols = w.shape
        check_counter_range(rows, cols)
        _native.masked_f32(int(seed), w.data_ptr(), out.data_ptr(), rows, cols,
                           keep_threshold(p), scale, torch.get_num_threads())
        return out
    keep = weight_keep_mask(seed, weight.shape[0], weight.shape[1], p, weight.device)
    return torch.where(keep, weight * scale, torch.zeros((), dtype=weight.dtype,
                                                         device=weight.device))


#: XOR-ed into a call's seed to key the LoRA input mask (< 2**62: the key stays in
#: ``[0, 2**63)``).
LORA_STREAM = 0x3C6EF372FE94F82B


def lora_seed(seed):
    """The LoRA input mask's key for a call's ``seed`` (an int, or a one-element int64
    tensor under graph capture: then a tensor, computed on its device)."""
    if isinstance(seed, torch.Tensor):
        return torch.bitwise_xor(seed, LORA_STREAM)
    return seed ^ LORA_STREAM


def lora_input(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """The LoRA input dropout ``x̃ = (M_x ⊙ x) / (1 - p_eff)`` (``x`` itself when
    ``p_eff == 0``): ``M_x`` the keep-mask of :func:`weight_keep_mask` over ``x`` viewed
    as ``(tokens, in)`` (row-major over the leading dimensions), keyed by
    :func:`lora_seed`. Not differentiable (the masks are data): ``dX`` gets the LoRA
    path's gradient through the same mask, ``lora_input(dX̃, seed, p)``."""
    if keep_threshold(p, "lora_dropout") == 0:
        return x
    x2 = x.reshape(-1, x.shape[-1])
    return masked_weight(x2, lora_seed(seed), p).view(x.shape)


def effective_weight(weight: torch.Tensor, seed: int, p: float, lora_B: torch.Tensor,
                     lora_A: torch.Tensor, scaling: float) -> torch.Tensor:
    """``(M ⊙ W)/(1 - p_eff) + s · B A`` in float32, rounded once to the weight's dtype.

    When the LoRA input is ``x`` itself (no LoRA input dropout), the layer is one linear
    map, ``y = x W_effᵀ + b`` and ``dX = dY W_eff``: the fused kernels build this weight
    in one pass (``rora_fast.kernels.effective_weight``) instead of adding the LoRA term
    to ``y`` and ``dX`` afterwards. The low-rank sum is accumulated in float32 one rank
    at a time (``j = 0 .. r-1``), the order the kernel uses."""
    keep = weight_keep_mask(seed, weight.shape[0], weight.shape[1], p, weight.device)
    scale = mask_params(p)[1]
    val = torch.where(keep, weight.float() * scale, torch.zeros((), device=weight.device))
    B, A = lora_B.float(), lora_A.float()
    acc = torch.zeros_like(val)
    for j in range(A.shape[0]):
        acc += B[:, j:j + 1] * A[j:j + 1, :]
    return (val + scaling * acc).to(weight.dtype)


def rora_linear_forward(x: torch.Tensor, x_lora: Optional[torch.Tensor], weight: torch.Tensor,
                        bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                        lora_B: torch.Tensor, scaling: float, p: float,
                        seed: int, weight_buffer: Optional[torch.Tensor] = None
                        ) -> torch.Tensor:
    """``x (M ⊙ W)ᵀ / (1-p) + b + s (x̃ Aᵀ) Bᵀ`` for inputs of shape ``[..., in]``.
    ``x_lora``: ``x̃``, or None when it is ``x`` (no LoRA input dropout).
    ``weight_buffer``: optional scratch for the masked weight (see :func:`masked_weight`)."""
    return _forward(x, x if x_lora is None else x_lora, weight, bias, lora_A, lora_B,
                    scaling, masked_weight(weight, seed, p, out=weight_buffer))[0]


def _forward(x, x_lora, weight, bias, lora_A, lora_B, scaling, w):
    """The forward with the masked weight ``w`` given; returns ``(y, S = x̃ Aᵀ)``."""
    y = torch.nn.functional.linear(x, w, bias)
    s_mat = x_lora.reshape(-1, x_lora.shape[-1]) @ lora_A.t()  # (tokens, r)
    # y += s · (x̃Aᵀ)Bᵀ, accumulated in place (no extra tokens x out temporaries)
    y.view(-1, y.shape[-1]).addmm_(s_mat, lora_B.t(), alpha=scaling)
    return y, s_mat


def rora_linear_backward(grad_out: torch.Tensor, x: torch.Tensor,
                         x_lora: Optional[torch.Tensor], weight: torch.Tensor,
                         lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                         p: float, seed: int,
                         weight_buffer: Optional[torch.Tensor] = None,
                         s_mat: Optional[torch.Tensor] = None):
    """Gradients ``(dX, dX̃, dA, dB)`` of the forward above for upstream ``grad_out``.

    ``x_lora`` None means ``x̃`` is ``x`` (no LoRA input dropout): ``dX`` is then the sum of
    the base-path and LoRA-path gradients and ``dX̃`` is None; otherwise ``dX`` is the
    base-path gradient only and ``dX̃`` the LoRA-path one. ``s_mat``: ``x̃ Aᵀ`` as the
    forward computed it (recomputed when not given). The scale ``s`` multiplies the
    small (tokens x r) factor once. The penalty's gradient is not part of this (it is
    added at the optimizer step, see :mod:`rora_fast.penalty`).
    """
    w = masked_weight(weight, seed, p, out=weight_buffer)
    return _backward(grad_out, x, x_lora, w, lora_A, lora_B, scaling, s_mat,
                     (True, x_lora is not None, True, True))


def _backward(grad_out, x, x_lora, w, lora_A, lora_B, scaling, s_mat, needs):
    """``needs``: which of ``(dX, dX̃, dA, dB)`` to compute (the others are None).

    The scale ``s`` is folded into the GEMMs' ``alpha`` (``addmm`` with ``beta=0``
    ignores its first operand, which only gives the output's shape)."""
    in_f = x.shape[-1]
    dy = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, in_f)
    xl = x2 if x_lora is None else x_lora.reshape(-1, in_f)
    need_dx, need_dxl, need_dA, need_dB = needs
    lora_in_dx = x_lora is None and need_dx
    dx = dx_lora = dA = dB = None
    dyb = None
    if lora_in_dx or need_dxl or need_dA:
        dyb = torch.mm(dy, lora_B)  # dY B, (tokens, r)
    if need_dx:
        dx = torch.mm(dy, w)
        if lora_in_dx:
            dx.addmm_(dyb, lora_A, alpha=scaling)
        dx = dx.view(x.shape)
    if need_dxl:
        dx_lora = torch.addmm(xl, dyb, lora_A, beta=0, alpha=scaling).view(x_lora.shape)
    if need_dA:
        dA = torch.addmm(lora_A, dyb.t(), xl, beta=0, alpha=scaling)
    if need_dB:
        if s_mat is None:
            s_mat = xl @ lora_A.t()
        dB = torch.addmm(lora_B, dy.t(), s_mat, beta=0, alpha=scaling)
    return dx, dx_lora, dA, dB


def ortho_penalty(lora_A: torch.Tensor, lora_B: torch.Tensor, ortho_U: torch.Tensor,
                  ortho_V: torch.Tensor, lora_A0: Optional[torch.Tensor] = None,
                  lora_B0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Ω(A, B) = ‖Uₖᵀ (B − B₀)‖²_F + ‖(A − A₀) Vₖ‖²_F`` (differentiable, float32 or wider).

    The start factors ``A₀ = lora_A0, B₀ = lora_B0`` are zero for LoRA's initialisation
    (the paper's Ω). PiSSA and OLoRA start the adapter *on* W_pre's principal
    directions; there the penalty is on the update away from that start, else it would
    remove W_pre's own top components.
    """
    dt = torch.promote_types(lora_A.dtype, torch.float32)
    A, B = lora_A.to(dt), lora_B.to(dt)
    if lora_A0 is not None:
        A = A - lora_A0.to(dt)
    if lora_B0 is not None:
        B = B - lora_B0.to(dt)
    ub = ortho_U.to(dt).t() @ B
    av = A @ ortho_V.to(dt)
    return ub.pow(2).sum() + av.pow(2).sum()


def ortho_penalty_grads(lora_A: torch.Tensor, lora_B: torch.Tensor,
                        ortho_U: torch.Tensor, ortho_V: torch.Tensor,
                        lora_A0: Optional[torch.Tensor] = None,
                        lora_B0: Optional[torch.Tensor] = None):
    """``(∇_A Ω, ∇_B Ω) = (2 ((A − A₀) Vₖ) Vₖᵀ, 2 Uₖ (Uₖᵀ (B − B₀)))`` in the dtypes of A, B."""
    dt = torch.promote_types(lora_A.dtype, torch.float32)
    U = ortho_U.to(dt)
    V = ortho_V.to(dt)
    A, B = lora_A.to(dt), lora_B.to(dt)
    if lora_A0 is not None:
        A = A - lora_A0.to(dt)
    if lora_B0 is not None:
        B = B - lora_B0.to(dt)
    gA = 2.0 * ((A @ V) @ V.t())
    gB = 2.0 * (U @ (U.t() @ B))
    return gA.to(lora_A.dtype), gB.to(lora_B.dtype)
