"""Tests of the fused RoRA kernels (``rora_fast.kernels``) against ``rora_fast.reference``.

Without CUDA these run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below
before anything imports triton), in float32, on tiny ragged shapes: this is what CI
runs. With CUDA the same file runs the compiled kernels, and additionally checks
fp16/bf16 with the accuracy rule of flash-attention: the kernel's error against a
float64 reference is at most twice the error of the same computation done by the
torch reference in the same dtype (plus one ulp of slack).
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton kernels

import importlib  # noqa: E402

import pytest  # noqa: E402

from rora_fast import reference as ref  # noqa: E402
from rora_fast.functional import RoraLinearFunction  # noqa: E402

import rora_fast.kernels as K  # noqa: E402
from rora_fast.kernels import _common, mask  # noqa: E402
from rora_fast.kernels import rora_linear as rl  # noqa: E402


def _ensure_interpreted():
    """If something imported the kernels before TRITON_INTERPRET was set (another test
    module in the same process), reload them so that they run in the interpreter."""
    global K, mask, rl
    if CUDA or type(mask._mask_apply_kernel).__name__ == "InterpretedFunction":
        return
    for mod in (_common, mask, rl, K):
        importlib.reload(mod)
    import rora_fast.kernels as K_new
    K = K_new
    from rora_fast.kernels import mask as m2, rora_linear as rl2
    mask, rl = m2, rl2
    assert type(mask._mask_apply_kernel).__name__ == "InterpretedFunction"


_ensure_interpreted()

DEVICE = torch.device("cuda" if CUDA else "cpu")


# ------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------

def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def make_case(lead, in_f, out_f, r, seed=0, bias=True, k=3):
    """float64 CPU master copies of one layer's inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, *lead, in_f)
    keep = (torch.rand(*lead, in_f, generator=gen) > 0.1).double()
    U, _ = torch.linalg.qr(_randn(gen, out_f, k))
    V, _ = torch.linalg.qr(_randn(gen, in_f, k))
    return dict(
        x=x, x_lora=x * keep / 0.9,  # a LoRA-input-dropout-like x̃, distinct from x
        weight=_randn(gen, out_f, in_f, scale=in_f ** -0.5),
        bias=_randn(gen, out_f) if bias else None,
        lora_A=_randn(gen, r, in_f, scale=in_f ** -0.5),
        lora_B=_randn(gen, out_f, r, scale=0.5),
        grad=_randn(gen, *lead, out_f),
        U=U, V=V)


def cast(case, dtype, device=DEVICE):
    return {k: (v.to(device=device, dtype=dtype) if v is not None else None)
            for k, v in case.items()}


def run_fused(t, scaling, p, seed, *, lora_is_x=False, weight_grad=False):
    """Forward+backward through the fused op; returns y and the gradients by name."""
    x = t["x"].clone().requires_grad_(True)
    x_lora = x if lora_is_x else t["x_lora"].clone().requires_grad_(True)
    w = t["weight"].clone().requires_grad_(weight_grad)
    b = t["bias"].clone().requires_grad_(True) if t["bias"] is not None else None
    A = t["lora_A"].clone().requires_grad_(True)
    B = t["lora_B"].clone().requires_grad_(True)
    y = K.fused_rora_linear(x, x_lora, w, b, A, B, scaling, p, seed)
    y.backward(t["grad"])
    out = dict(y=y.detach(), dx=x.grad, dA=A.grad, dB=B.grad)
    if not lora_is_x:
        out["dxl"] = x_lora.grad
    if b is not None:
        out["db"] = b.grad
    if weight_grad:
        out["dW"] = w.grad
    return out


def run_reference(t, scaling, p, seed, *, lora_is_x=False, weight_grad=False):
    """The same quantities from rora_fast.reference (in t's dtype and device)."""
    x_lora = None if lora_is_x else t["x_lora"]
    y = ref.rora_linear_forward(t["x"], x_lora, t["weight"], t["bias"], t["lora_A"],
                                t["lora_B"], scaling, p, seed)
    dx, dxl, dA, dB = ref.rora_linear_backward(
        t["grad"], t["x"], x_lora, t["weight"], t["lora_A"], t["lora_B"], scaling, p,
        seed)
    out = dict(y=y, dx=dx, dA=dA, dB=dB)
    if not lora_is_x:
        out["dxl"] = dxl
    g2 = t["grad"].reshape(-1, t["grad"].shape[-1])
    if t["bias"] is not None:
        out["db"] = g2.sum(0)
    if weight_grad:
        out["dW"] = ref.masked_weight(g2.t() @ t["x"].reshape(-1, t["x"].shape[-1]), seed, p)
    return out


def assert_2x_rule(got, ref_lo, ref_hi, dtype, what):
    """err(kernel) <= 2 * err(torch reference in the same dtype) + ~1 ulp of max|ref|."""
    assert got.shape == ref_hi.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref_hi.shape)}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    hi = ref_hi.double().cpu()
    err_k = (got.double().cpu() - hi).abs().max().item() if hi.numel() else 0.0
    err_t = (ref_lo.double().cpu() - hi).abs().max().item() if hi.numel() else 0.0
    atol = torch.finfo(dtype).eps * max(1.0, hi.abs().max().item() if hi.numel() else 0.0)
    assert err_k <= 2 * err_t + atol, (
        f"{what}: kernel error {err_k:.3e} > 2 x torch {dtype} error {err_t:.3e} + {atol:.1e}")


def check_against_reference(case, dtype, scaling, p, seed, *, lora_is_x=False,
                            weight_grad=False):
    t = cast(case, dtype)
    got = run_fused(t, scaling, p, seed, lora_is_x=lora_is_x, weight_grad=weight_grad)
    lo = run_reference(t, scaling, p, seed, lora_is_x=lora_is_x, weight_grad=weight_grad)
    hi = run_reference(cast(case, torch.float64), scaling, p, seed,
                       lora_is_x=lora_is_x, weight_grad=weight_grad)
    assert set(got) == set(hi), (sorted(got), sorted(hi))
    for name in hi:
        assert got[name] is not None, f"{name} missing"
        assert_2x_rule(got[name], lo[name], hi[name], dtype, name)
    return got


# ------------------------------------------------------------------------------------
# the mask, bit for bit
# ------------------------------------------------------------------------------------

SEEDS = [0, 1, 2**31 - 1, 2**31 + 5, 2**40 + 3, 2**63 - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_keep_mask_bit_identical_to_reference(seed):
    for out_f, in_f in [(37, 33), (3, 1), (9, 70)]:
        for p in (0.1, 0.5):
            expected = ref.weight_keep_mask(seed, out_f, in_f, p)
            blocks = [(32, 128)] + ([(4, 8), (2, 16)] if (out_f, in_f, p) == (9, 70, 0.1) else [])
            for bn, bk in blocks:  # tiny tiles are slow in the interpreter: one shape only
                got = K.keep_mask(seed, out_f, in_f, p, DEVICE, block_n=bn, block_k=bk).cpu()
                assert torch.equal(got, expected), (seed, out_f, in_f, p, bn, bk)


def test_keep_mask_statistics_and_seed_dependence():
    m1 = K.keep_mask(7, 64, 256, 0.3, DEVICE).cpu()
    m2 = K.keep_mask(8, 64, 256, 0.3, DEVICE).cpu()
    assert not torch.equal(m1, m2)
    drop = 1 - m1.double().mean().item()
    assert abs(drop - 0.3) < 5 * (0.3 * 0.7 / m1.numel()) ** 0.5
    assert K.keep_mask(7, 5, 9, 0.0, DEVICE).all()


def test_keep_mask_threshold_boundary():
    """A lane equal to the threshold is kept (``>=``): set p so that thr equals the lane
    of element (0, j) for each lane j, whose result then hinges on the comparison."""
    seed = 4321
    words = [w.item() for w in ref.philox4x32(seed, torch.tensor([0]))]
    for j in range(8):
        lane = (words[j // 2] >> (16 * (j % 2))) & 0xFFFF
        if lane == 0:
            continue
        p = lane / 65536
        assert ref.keep_threshold(p) == lane
        got = K.keep_mask(seed, 3, 8, p, DEVICE).cpu()
        assert got[0, j], f"lane {j} equal to the threshold must be kept"
        assert torch.equal(got, ref.weight_keep_mask(seed, 3, 8, p))


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.float16, torch.bfloat16] if CUDA else []))
def test_masked_weight_bit_identical_to_reference(dtype):
    w = torch.randn(37, 33, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    for p in (0.1, 0.5):
        got = K.masked_weight(w, 12345, p)
        assert got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got.cpu(), ref.masked_weight(w, 12345, p).cpu())
    assert K.masked_weight(w, 12345, 0.0) is w
    wt = torch.randn(33, 37, dtype=torch.float64).to(dtype=dtype, device=DEVICE).t()  # strided
    assert torch.equal(K.masked_weight(wt, 9, 0.25).cpu(), ref.masked_weight(wt, 9, 0.25).cpu())




# ------------------------------------------------------------------------------------
# the op against the reference
# ------------------------------------------------------------------------------------

def _shape_for_rank(r):
    # ragged everywhere; r = 64 needs in, out >= 64 for a meaningful low-rank adapter
    return (37, 33, 19) if r <= 16 else (29, 70, 67)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("r", [1, 4, 8, 16, 64])
def test_forward_backward_match_reference(p, r):
    tokens, in_f, out_f = _shape_for_rank(r)
    case = make_case((tokens,), in_f, out_f, r, seed=r * 10 + int(p * 10))
    check_against_reference(case, torch.float32, 0.75, p, 2024 + r)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_input_is_x(p):
    """x̃ is x (no LoRA input dropout): dX + dX̃ comes back as x's gradient."""
    case = make_case((37,), 33, 19, 4, seed=5)
    check_against_reference(case, torch.float32, 2.0, p, 99, lora_is_x=True)


def run_fused_lora_p(t, scaling, p, seed, lora_p):
    """The fused op drawing its own LoRA input dropout (``lora_p``)."""
    x = t["x"].clone().requires_grad_(True)
    b = t["bias"].clone().requires_grad_(True) if t["bias"] is not None else None
    A = t["lora_A"].clone().requires_grad_(True)
    B = t["lora_B"].clone().requires_grad_(True)
    y = K.fused_rora_linear(x, None, t["weight"], b, A, B, scaling, p, seed, lora_p=lora_p)
    y.backward(t["grad"])
    out = dict(y=y.detach(), dx=x.grad, dA=A.grad, dB=B.grad)
    if b is not None:
        out["db"] = b.grad
    return out


def run_reference_lora_p(t, scaling, p, seed, lora_p):
    """The reference with ``x̃ = lora_input(x)`` given, and ``dX`` = the base path's
    gradient + ``lora_input(dX̃)`` (the chain rule through the same mask)."""
    t = dict(t, x_lora=ref.lora_input(t["x"], seed, lora_p))
    out = run_reference(t, scaling, p, seed)
    out["dx"] = out["dx"] + ref.lora_input(out.pop("dxl"), seed, lora_p)
    return out


def check_own_lora_dropout(case, dtype, scaling, p, seed, lora_p):
    t = cast(case, dtype)
    got = run_fused_lora_p(t, scaling, p, seed, lora_p)
    lo = run_reference_lora_p(t, scaling, p, seed, lora_p)
    hi = run_reference_lora_p(cast(case, torch.float64), scaling, p, seed, lora_p)
    assert set(got) == set(hi)
    for name in hi:
        assert_2x_rule(got[name], lo[name], hi[name], dtype, name)
    return got


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_own_lora_dropout_matches_reference(p):
    """``lora_p``: x̃ drawn by the mask kernel from the seed (another Philox key) in
    forward and again in backward; only x is kept."""
    case = make_case((3, 5), 33, 19, 4, seed=21)
    seed, lora_p = 2**40 + 11, 0.3
    got = check_own_lora_dropout(case, torch.float32, 0.75, p, seed, lora_p)
    # the LoRA path really saw a dropped input: dA differs from the one with x̃ = x
    t = cast(case, torch.float32)
    plain = run_reference(dict(t, x_lora=t["x"]), 0.75, p, seed)
    assert not torch.allclose(got["dA"], plain["dA"], rtol=1e-3, atol=1e-4)


def test_own_lora_dropout_argument_errors():
    case = cast(make_case((4,), 16, 8, 2, seed=1), torch.float32)
    args = (case["x"], None, case["weight"], None, case["lora_A"], case["lora_B"], 1.0, 0.1, 3)
    with pytest.raises(ValueError, match="lora_p"):
        K.fused_rora_linear(*args, lora_p=1.0)
    with pytest.raises(ValueError, match="not both"):
        K.fused_rora_linear(case["x"], case["x_lora"], *args[2:], lora_p=0.2)


def test_leading_dims_and_non_contiguous():
    in_f, out_f, r, p, seed = 33, 19, 8, 0.2, 31337
    case = make_case((2, 3), in_f, out_f, r, seed=11)
    t = cast(case, torch.float32)

    def strided(a):  # same values, transposed memory layout
        return a.t().contiguous().t() if a.dim() == 2 else a

    nt = dict(t)
    nt["x"] = t["x"].transpose(0, 1).contiguous().transpose(0, 1)  # [2,3,in], non-contiguous
    nt["x_lora"] = t["x_lora"].permute(1, 0, 2).contiguous().permute(1, 0, 2)
    nt["weight"], nt["lora_A"], nt["lora_B"] = (strided(t[k]) for k in ("weight", "lora_A", "lora_B"))
    nt["grad"] = t["grad"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not nt["x"].is_contiguous() and not nt["weight"].is_contiguous()
    assert not nt["lora_B"].is_contiguous() and not nt["grad"].is_contiguous()
    got = run_fused(nt, 0.5, p, seed)
    hi = run_reference(cast(case, torch.float64), 0.5, p, seed)
    lo = run_reference(t, 0.5, p, seed)
    assert got["y"].shape == (2, 3, out_f) and got["dx"].shape == (2, 3, in_f)
    for name in hi:
        assert_2x_rule(got[name], lo[name], hi[name], torch.float32, name)


def test_one_dimensional_input():
    case = make_case((), 33, 19, 4, seed=3)
    check_against_reference(case, torch.float32, 1.0, 0.1, 5)


def test_no_penalty_work_in_the_fused_backward():
    """The op's gradients are the layer's alone: λ∇Ω is added at the optimizer step."""
    import inspect

    src = inspect.getsource(K.FusedRoraLinearFunction)
    assert "ortho" not in src and "penalty." not in src


@pytest.mark.parametrize("seed", [0, 7, 2**31 + 5, 2**62 - 1, 2**63 - 1])
def test_masked_weight_reads_a_device_seed(seed):
    """The graph-capture form of the kernel: the seed read from a one-element int64
    tensor on the kernel's device (no host read) draws the int seed's mask, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(37, 52, generator=gen).to(DEVICE)
    t_seed = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    got = mask.masked_weight(w, t_seed, 0.3)
    assert torch.equal(got, mask.masked_weight(w, seed, 0.3))
    assert torch.equal(got.cpu(), ref.masked_weight(w.cpu(), seed, 0.3))
    assert torch.equal(mask.keep_mask(t_seed, 37, 52, 0.3, device=DEVICE).cpu(),
                       ref.weight_keep_mask(seed, 37, 52, 0.3))


def test_masked_weight_rejects_bad_tensor_seeds():
    w = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(TypeError, match="one-element int64"):
        mask.masked_weight(w, torch.tensor([1.0], device=DEVICE), 0.1)
    with pytest.raises(TypeError, match="one-element int64"):
        mask.masked_weight(w, torch.tensor([1, 2], device=DEVICE), 0.1)
    with pytest.raises(ValueError, match="kernel's device"):
        mask.masked_weight(w, torch.tensor([1], device="meta"), 0.1)


@pytest.mark.parametrize("shape", [(37, 52, 3), (64, 128, 16), (5, 9, 1)])
@pytest.mark.parametrize("seed", [0, 2**40 + 3])
def test_effective_weight_bit_identical_to_reference(shape, seed):
    """``c·M⊙W + s·BA`` from the kernel equals reference.effective_weight bit for bit
    (float32, the same rank-by-rank sum), for several tile shapes and a tensor seed."""
    out_f, in_f, r = shape
    gen = torch.Generator().manual_seed(out_f)
    w = torch.randn(out_f, in_f, generator=gen).to(DEVICE)
    B = torch.randn(out_f, r, generator=gen).to(DEVICE)
    A = torch.randn(r, in_f, generator=gen).to(DEVICE)
    want = ref.effective_weight(w.cpu(), seed, 0.2, B.cpu(), A.cpu(), 0.75)
    for bn, bk in ((32, 128), (16, 8), (64, 64)):
        got = mask.effective_weight(w, seed, 0.2, B, A, 0.75, block_n=bn, block_k=bk)
        if CUDA:  # FMA contraction on the GPU: equal to rounding, not bit for bit
            torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, want), (bn, bk)
    t_seed = torch.tensor([seed], device=DEVICE)
    assert torch.equal(mask.effective_weight(w, t_seed, 0.2, B, A, 0.75),
                       mask.effective_weight(w, seed, 0.2, B, A, 0.75))
    # the math: c·M⊙W + s·BA
    math = ref.masked_weight(w.cpu(), seed, 0.2) + 0.75 * B.cpu() @ A.cpu()
    torch.testing.assert_close(want, math, rtol=1e-5, atol=1e-5)


def test_no_lora_pass_over_y_or_dx_when_lora_input_is_x():
    """x̃ = x with a weight mask: forward is one GEMM with the effective weight (no
    in-place LoRA update of y), backward's dX one GEMM (no in-place update of dX)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    t = cast(make_case((9,), 33, 19, 4, seed=2), torch.float32)
    for lora_is_x, p, expect_inplace in ((True, 0.2, False), (True, 0.0, True), (False, 0.2, True)):
        x = t["x"].clone().requires_grad_(True)
        xl = x if lora_is_x else t["x_lora"].clone().requires_grad_(True)
        A = t["lora_A"].clone().requires_grad_(True)
        B = t["lora_B"].clone().requires_grad_(True)
        with Ops() as ops:
            y = K.fused_rora_linear(x, xl, t["weight"], t["bias"], A, B, 0.5, p, 11)
            y.backward(t["grad"])
        assert ("addmm_" in ops.names) == expect_inplace, (lora_is_x, p, ops.names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 33, 19, 4), (300, 520, 264, 16)])
def test_effective_weight_half_precision_error(dtype, shape):
    """The rounding design of the effective weight, on the CPU: W_eff rounded once to
    the half dtype, then a GEMM with float32 accumulation (emulated in float64, rounded
    once), stays within the 2x rule of the torch reference in that dtype, for y and dX
    (the GPU kernel tests check the kernel itself)."""
    tokens, in_f, out_f, r = shape
    case = make_case((tokens,), in_f, out_f, r, seed=tokens)
    for s in (2.0, 0.5):
        hi, lo = cast(case, torch.float64, "cpu"), cast(case, dtype, "cpu")
        y_hi = ref.rora_linear_forward(hi["x"], None, hi["weight"], hi["bias"], hi["lora_A"],
                                       hi["lora_B"], s, 0.1, 7)
        y_lo = ref.rora_linear_forward(lo["x"], None, lo["weight"], lo["bias"], lo["lora_A"],
                                       lo["lora_B"], s, 0.1, 7)
        weff = ref.effective_weight(lo["weight"], 7, 0.1, lo["lora_B"], lo["lora_A"], s)
        y_k = (lo["x"].double() @ weff.double().t() + lo["bias"].double()).to(dtype)
        assert_2x_rule(y_k, y_lo, y_hi, dtype, "y")
        dx_hi = ref.rora_linear_backward(hi["grad"], hi["x"], None, hi["weight"], hi["lora_A"],
                                         hi["lora_B"], s, 0.1, 7)[0]
        dx_lo = ref.rora_linear_backward(lo["grad"], lo["x"], None, lo["weight"], lo["lora_A"],
                                         lo["lora_B"], s, 0.1, 7)[0]
        dx_k = (lo["grad"].double() @ weff.double()).to(dtype)
        assert_2x_rule(dx_k, dx_lo, dx_hi, dtype, "dx")


def test_seed_tensor_equals_int_seed():
    """The graph-capture form (seed in a one-element int64 tensor, through the custom
    op) draws the same mask as the int seed."""
    t = cast(make_case((9,), 33, 19, 4, seed=2), torch.float32)
    outs = []
    for seed in (4321, torch.tensor([4321])):
        x = t["x"].clone().requires_grad_(True)
        A = t["lora_A"].clone().requires_grad_(True)
        y = K.fused_rora_linear(x, None, t["weight"], t["bias"], A, t["lora_B"], 0.5, 0.2,
                                seed)
        y.backward(t["grad"])
        outs.append((y.detach(), x.grad, A.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_trainable_weight_no_bias():
    case = make_case((37,), 33, 19, 4, seed=4, bias=False)
    check_against_reference(case, torch.float32, 0.5, 0.25, 77,
                            weight_grad=True)


def test_matches_reference_autograd_function():
    """Same gradients, slot by slot, as functional.RoraLinearFunction (the reference op)."""
    t = cast(make_case((37,), 33, 19, 4, seed=9), torch.float32)
    ins = [t["x"], t["x_lora"], t["weight"], t["bias"], t["lora_A"], t["lora_B"]]
    a = [v.clone().requires_grad_(i != 2) for i, v in enumerate(ins)]
    b = [v.clone().requires_grad_(i != 2) for i, v in enumerate(ins)]
    y1 = K.fused_rora_linear(*a, 0.5, 0.1, 11)
    y2 = RoraLinearFunction.apply(*b, 0.5, 0.1, 11)
    g1 = torch.autograd.grad(y1, [a[i] for i in (0, 1, 3, 4, 5)], t["grad"])
    g2 = torch.autograd.grad(y2, [b[i] for i in (0, 1, 3, 4, 5)], t["grad"])
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora_input", ["x_lora", "x"])
def test_enclosing_autocast_does_not_change_the_op(lora_input):
    """Under torch.autocast the op still computes in its inputs' dtype, forward and
    backward (a backward run inside the autocast region too); without it, the op does
    not enter an autocast context at all."""
    t = cast(make_case((37,), 33, 19, 4, seed=12), torch.float32)

    def run(autocast: bool):
        ins = [t[k].detach().clone().requires_grad_(k in ("x", "lora_A", "lora_B"))
               for k in ("x", "x_lora", "weight", "bias", "lora_A", "lora_B")]
        if lora_input == "x":
            ins[1] = None
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            y = K.fused_rora_linear(*ins, 0.5, 0.1, 3)
            y.backward(torch.ones_like(y))
        return y, [ins[i].grad for i in (0, 4, 5)]

    y0, g0 = run(False)
    y1, g1 = run(True)
    assert y1.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g1)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nothing_weight_sized_saved():
    """Between forward and backward only W itself (the parameter, not a copy) has the
    weight's shape among the saved tensors."""
    t = cast(make_case((37,), 33, 19, 4, seed=2), torch.float32)
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.data_ptr()))
        return tensor

    x = t["x"].clone().requires_grad_(True)
    A = t["lora_A"].clone().requires_grad_(True)
    B = t["lora_B"].clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        y = K.fused_rora_linear(x, x, t["weight"], t["bias"], A, B, 1.0, 0.5, 1)
    y.sum().backward()
    assert saved
    for shape, ptr in saved:
        if shape in ((19, 33), (33, 19)):
            assert ptr == t["weight"].data_ptr(), f"a weight-sized tensor {shape} was saved"


# ------------------------------------------------------------------------------------
# API: validation, supports
# ------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    t = cast(make_case((4,), 33, 19, 4, seed=0), torch.float32)
    args = [t["x"], t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 1.0, 0.1, 3]

    def call(i, v, **kw):
        a = list(args)
        a[i] = v
        return K.fused_rora_linear(*a, **kw)

    with pytest.raises(ValueError, match="features"):
        call(0, torch.randn(4, 32, device=DEVICE))
    with pytest.raises(ValueError, match="lora_B"):
        call(5, torch.randn(19, 5, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        call(3, torch.randn(7, device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        call(4, t["lora_A"].double())
    with pytest.raises(ValueError, match="weight_dropout"):
        call(7, 1.0)
    with pytest.raises(ValueError, match="seed"):
        call(8, -1)
    with pytest.raises(ValueError, match="seed"):
        call(8, 2**63)
    with pytest.raises(ValueError, match="scaling"):
        call(6, float("nan"))
    with pytest.raises(ValueError, match="power of two"):
        K.keep_mask(1, 5, 9, 0.1, DEVICE, block_k=24)
    with pytest.raises(ValueError, match="too large"):
        mask.check_counter_range(2**20, 2**15)


def test_supports():
    t = cast(make_case((4,), 33, 19, 4, seed=0), torch.float32)
    cpu = cast(make_case((4,), 33, 19, 4, seed=0), torch.float32, torch.device("cpu"))
    # CPU tensors never go to the kernels in production, even under the interpreter
    assert not K.supports(cpu["x"], cpu["weight"], cpu["lora_A"])
    if not CUDA:
        return
    assert K.supports(t["x"], t["weight"], t["lora_A"])
    assert K.supports(t["x"], t["weight"], t["lora_A"], t["lora_B"], t["bias"], t["x_lora"])
    assert not K.supports(t["x"].double(), t["weight"].double(), t["lora_A"].double())
    assert not K.supports(t["x"], t["weight"], t["lora_A"].half())
    assert not K.supports(t["x"][:, :32], t["weight"], t["lora_A"])
    assert not K.supports(t["x"][:0], t["weight"], t["lora_A"])
    assert not K.supports(t["x"], t["weight"], t["lora_A"], t["lora_B"][:, :2])


# ------------------------------------------------------------------------------------
# CUDA only: dtypes, bigger shapes, dispatch from rora_fast.functional
# ------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 33, 19, 4), (300, 520, 264, 16), (1000, 1024, 768, 64)])
def test_cuda_dtypes_2x_rule(dtype, shape):
    tokens, in_f, out_f, r = shape
    case = make_case((tokens,), in_f, out_f, r, seed=tokens)
    check_against_reference(case, dtype, 0.5, 0.1, 4242)
    check_against_reference(case, dtype, 2.0, 0.0, 7, lora_is_x=True)
    check_against_reference(case, dtype, 2.0, 0.1, 7, lora_is_x=True)  # effective weight
    check_own_lora_dropout(case, dtype, 0.5, 0.1, 4242, 0.1)  # x̃ drawn from the seed


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_differentiable_lora_input_equals_reference(dtype):
    """functional.lora_dropout_input on CUDA (DoRA's x̃: the mask kernel applied to ones)
    has reference.lora_input's values bit for bit, and x · m's gradient."""
    from rora_fast import functional as F_rora

    x = torch.randn(6, 40, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    x.requires_grad_(True)
    xl = F_rora.lora_dropout_input(x, 2**40 + 3, 0.25)
    assert xl.dtype == dtype
    assert torch.equal(xl.detach().cpu(), ref.lora_input(x.detach().cpu(), 2**40 + 3, 0.25))
    g = torch.randn(6, 40, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    xl.backward(g)
    torch.testing.assert_close(x.grad.cpu(), ref.lora_input(g.cpu().double(), 2**40 + 3,
                                                            0.25).to(dtype))


@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_functional_dispatch_to_kernels(backend, monkeypatch):
    from rora_fast.functional import rora_linear
    calls = []
    real = K.fused_rora_linear

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(K, "fused_rora_linear", spy)
    t = cast(make_case((37,), 33, 19, 4, seed=1), torch.float16)
    y = rora_linear(t["x"], t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"],
                    0.5, 0.1, 3, backend=backend)
    assert calls, "rora_linear did not use the fused kernels for CUDA tensors"
    y_ref = ref.rora_linear_forward(t["x"], t["x"], t["weight"], t["bias"], t["lora_A"],
                                    t["lora_B"], 0.5, 0.1, 3)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------
# a whole RoraLinear training step through the kernels equals the reference step
# ------------------------------------------------------------------------------------

def _route_layer_to_kernels(monkeypatch):
    """Make RoraLinear use the fused kernels: functional.rora_linear, which the layer
    calls, is replaced by the fused op for the duration of the test. (On the CPU the
    dispatcher never sends CPU tensors to the kernels. The CUDA dispatch itself is
    checked by test_functional_dispatch_to_kernels.) Returns the list of recorded calls."""
    from rora_fast import functional as F_rora
    calls = []

    def fused(x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed, backend=None,
              lora_p=0.0):
        calls.append(1)
        return K.fused_rora_linear(x, x_lora, weight, bias, lora_A, lora_B, scaling, p,
                                   seed, lora_p=lora_p)

    monkeypatch.setattr(F_rora, "rora_linear", fused)
    return calls


def _train_two_steps(layer, x, target):
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    layer.train()
    outs = []
    for _ in range(2):
        opt.zero_grad()
        y = layer(x)
        loss = torch.nn.functional.mse_loss(y, target)
        loss.backward()
        outs.append((y.detach().clone(), loss.detach().clone(),
                     layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
        opt.step()
    return outs


@pytest.mark.parametrize("lora_dropout", [0.0, 0.2])
def test_rora_linear_training_step_matches_reference(lora_dropout, monkeypatch):
    from rora_fast import RoraLinear

    def build():
        torch.manual_seed(123)
        layer = RoraLinear(33, 19, bias=True, r=4, alpha=8, weight_dropout=0.1,
                           lora_dropout=lora_dropout, ortho_rank=3, ortho_lambda=10.0,
                           svd_cache=None, device=DEVICE)
        with torch.no_grad():  # a non-zero B, so that dA and the dX̃ path are exercised
            layer.lora_B.normal_(0, 0.1)
        return layer

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 33, generator=gen).to(DEVICE)
    target = torch.randn(2, 5, 19, generator=gen).to(DEVICE)

    ref_layer = build()
    ref_layer.backend = "reference"
    torch.manual_seed(7)
    expected = _train_two_steps(ref_layer, x, target)

    fused_layer = build()
    calls = _route_layer_to_kernels(monkeypatch)
    torch.manual_seed(7)
    got = _train_two_steps(fused_layer, x, target)
    assert len(calls) == 2, "the layer did not go through the fused op"

    for step, (e, g) in enumerate(zip(expected, got)):
        for name, a, b in zip(("y", "loss", "dA", "dB"), g, e):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"step {step} {name}: {m}")
    torch.testing.assert_close(fused_layer.lora_A, ref_layer.lora_A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_layer.lora_B, ref_layer.lora_B, rtol=1e-4, atol=1e-5)
