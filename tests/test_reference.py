"""The torch reference (rora_fast.reference and RoraLinearFunction) against an
independent float64 autograd computation, and the Philox weight-mask generator."""

import contextlib
import math

import pytest
import torch

from rora_fast import reference as ref
from rora_fast.functional import RoraLinearFunction, rora_linear


# ----------------------------------------------------------------------------- Philox
def test_philox_known_values_seed0():
    c = ref.philox4x32(0, torch.arange(4))
    assert [int(v) for v in (c[0][0], c[1][0], c[2][0], c[3][0])] == [
        1713891541, 3781805453, 3159862348, 2600524760]
    # all four words are 32-bit unsigned values and differ between counters
    words = torch.stack(c, -1)
    assert int(words.min()) >= 0 and int(words.max()) < 2**32
    assert len({tuple(int(v) for v in row) for row in words}) == 4


def test_philox_known_values_seed1234():
    c = ref.philox4x32(1234, torch.tensor([0]))
    assert [int(w[0]) for w in c] == [546353992, 3665621163, 1140953199, 3419031310]


def test_philox_counter_independent_of_batching():
    g = torch.arange(0, 1000, 7)
    full = torch.stack(ref.philox4x32(99, g), -1)
    single = torch.stack([torch.stack(ref.philox4x32(99, g[i:i + 1]), -1)[0]
                          for i in (0, 5, 100, len(g) - 1)])
    assert torch.equal(full[[0, 5, 100, len(g) - 1]], single)


def test_philox_uses_high_key_word():
    a = torch.stack(ref.philox4x32(5, torch.arange(8)), -1)
    b = torch.stack(ref.philox4x32(5 + 2**32, torch.arange(8)), -1)
    assert not torch.equal(a, b)


def _direct_mask(seed, out_f, in_f, p):
    """Element-by-element recomputation of the documented layout rule."""
    groups = math.ceil(in_f / 8)
    thr = round(p * 65536)
    keep = torch.empty(out_f, in_f, dtype=torch.bool)
    for n in range(out_f):
        for k in range(in_f):
            g = n * groups + k // 8
            words = ref.philox4x32(seed, torch.tensor([g]))
            j = k % 8
            lane = (int(words[j // 2][0]) >> (16 * (j % 2))) & 0xFFFF
            keep[n, k] = lane >= thr
    return keep


@pytest.mark.parametrize("impl", ["torch", "auto"])  # auto: the C fast path when built
@pytest.mark.parametrize("shape", [(5, 19), (3, 16), (4, 1), (2, 8)])
def test_mask_layout_rule(shape, impl):
    seed, p = 424242 + 2**40, 0.3
    got = ref.weight_keep_mask(seed, *shape, p, impl=impl)
    assert got.shape == shape and got.dtype == torch.bool
    assert torch.equal(got, _direct_mask(seed, *shape, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_masked_weight_matches_definition_every_dtype(dtype):
    # float32 on the CPU takes the fused C path when it is built: it must equal the
    # torch expression on the torch-defined mask bit for bit
    W = torch.randn(37, 45).to(dtype)
    p, seed = 0.15, 2**62 + 12345
    keep = ref.weight_keep_mask(seed, 37, 45, p, impl="torch")
    want = torch.where(keep, W * (1.0 / (1.0 - ref.effective_drop_prob(p))),
                       torch.zeros((), dtype=dtype))
    got = ref.masked_weight(W, seed, p)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(ref.masked_weight(W.t().contiguous().t(), seed, p), want)


def test_mask_is_prefix_of_wider_padded_rows():
    # Column k of row n depends only on (n * ceil(in/8) + k // 8, k % 8): a weight whose
    # in-features round up to the same number of groups sees the same bits.
    a = ref.weight_keep_mask(7, 6, 13, 0.25)
    b = ref.weight_keep_mask(7, 6, 16, 0.25)
    assert torch.equal(a, b[:, :13])


def test_mask_chunking_does_not_change_bits(monkeypatch):
    full = ref.weight_keep_mask(11, 40, 100, 0.2)
    monkeypatch.setattr(ref, "_CHUNK", 37)
    assert torch.equal(full, ref.weight_keep_mask(11, 40, 100, 0.2))


@pytest.mark.parametrize("p", [0.03, 0.1, 0.5, 0.9])
def test_mask_zero_fraction_within_4_sigma(p):
    out_f, in_f = 512, 509
    keep = ref.weight_keep_mask(2024, out_f, in_f, p)
    n = keep.numel()
    zero_frac = 1.0 - keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(zero_frac - p) <= 4 * sigma
    pe = ref.effective_drop_prob(p)
    assert abs(zero_frac - pe) <= 4 * sigma
    # every lane (column residue mod 8) and every row block is unbiased too
    for j in range(8):
        lane = keep[:, j::8]
        s = math.sqrt(p * (1 - p) / lane.numel())
        assert abs(1.0 - lane.double().mean().item() - p) <= 4.5 * s


def test_masks_of_different_seeds_are_independent():
    a = ref.weight_keep_mask(1, 256, 256, 0.5)
    b = ref.weight_keep_mask(2, 256, 256, 0.5)
    agree = (a == b).double().mean().item()
    assert abs(agree - 0.5) <= 4 * math.sqrt(0.25 / a.numel())


def test_effective_drop_prob_and_threshold():
    for p in (0.0, 0.1, 0.25, 0.5, 0.123456, 0.99):
        pe = ref.effective_drop_prob(p)
        assert abs(pe - p) <= 0.5 / 65536 + 1e-12
        assert ref.keep_threshold(p) == round(p * 65536)
    assert ref.effective_drop_prob(0.25) == 0.25
    assert ref.weight_keep_mask(3, 4, 5, 0.0).all()


def test_masked_weight_scale_and_identity():
    W = torch.randn(16, 24, dtype=torch.float64)
    assert ref.masked_weight(W, 5, 0.0) is W
    p = 0.3
    Wm = ref.masked_weight(W, 5, p)
    keep = ref.weight_keep_mask(5, 16, 24, p)
    expected = torch.where(keep, W / (1 - ref.effective_drop_prob(p)), torch.zeros(()))
    assert torch.equal(Wm, expected)
    assert Wm.dtype == W.dtype


# ----------------------------------------------------------------------------- math
def _problem(lead=(3, 5), in_f=12, out_f=10, r=4, k=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = t(*lead, in_f)
    W, b, A, B = t(out_f, in_f), t(out_f), t(r, in_f), t(out_f, r)
    U = torch.linalg.qr(t(out_f, k))[0]
    V = torch.linalg.qr(t(in_f, k))[0]
    gy = t(*lead, out_f)
    return x, W, b, A, B, U, V, gy


def _autograd_reference(x, xl_mask, W, b, A, B, s, p, seed, lam=0.0, U=None, V=None,
                        lora_p=0.0):
    """Independent float64 autograd: y and the objective's gradients."""
    x = x.detach().clone().requires_grad_(True)
    A = A.detach().clone().requires_grad_(True)
    B = B.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    keep = ref.weight_keep_mask(seed, W.shape[0], W.shape[1], p).to(W.dtype)
    Wm = W * keep / (1 - ref.effective_drop_prob(p))
    xl = x if xl_mask is None else x * xl_mask / (1 - lora_p)
    y = x @ Wm.t() + b + s * (xl @ A.t()) @ B.t()
    return y, (x, A, B, b), lam


@pytest.mark.parametrize("p", [0.0, 0.1, 0.37])
def test_reference_forward_backward_vs_autograd(p):
    x, W, b, A, B, U, V, gy = _problem()
    s, seed = 1.7, 987654321
    y_auto, (xa, Aa, Ba, ba), _ = _autograd_reference(x, None, W, b, A, B, s, p, seed)
    (y_auto * gy).sum().backward()

    y = ref.rora_linear_forward(x, None, W, b, A, B, s, p, seed)
    torch.testing.assert_close(y, y_auto.detach(), rtol=1e-12, atol=1e-12)
    dx, dxl, dA, dB = ref.rora_linear_backward(gy, x, None, W, A, B, s, p, seed)
    assert dxl is None  # x̃ is x: one summed gradient
    torch.testing.assert_close(dx, xa.grad, rtol=1e-12, atol=1e-12)
    # x passed explicitly as x̃: the two paths' gradients separately
    dx2, dxl2, _, _ = ref.rora_linear_backward(gy, x, x, W, A, B, s, p, seed)
    torch.testing.assert_close(dx2 + dxl2, xa.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dA, Aa.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dB, Ba.grad, rtol=1e-12, atol=1e-12)


def test_reference_backward_with_separate_lora_input():
    x, W, b, A, B, U, V, gy = _problem(lead=(7,))
    s, p, seed, lora_p = 0.5, 0.2, 31337, 0.4
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) >= lora_p)
    mask = mask.to(x.dtype)
    y_auto, (xa, Aa, Ba, _), _ = _autograd_reference(x, mask, W, b, A, B, s, p, seed,
                                                     lora_p=lora_p)
    (y_auto * gy).sum().backward()
    xl = x * mask / (1 - lora_p)
    y = ref.rora_linear_forward(x, xl, W, b, A, B, s, p, seed)
    torch.testing.assert_close(y, y_auto.detach(), rtol=1e-12, atol=1e-12)
    dx, dxl, dA, dB = ref.rora_linear_backward(gy, x, xl, W, A, B, s, p, seed)
    torch.testing.assert_close(dx + dxl * mask / (1 - lora_p), xa.grad, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(dA, Aa.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dB, Ba.grad, rtol=1e-12, atol=1e-12)


def test_penalty_and_its_gradient_vs_autograd():
    _, _, _, A, B, U, V, _ = _problem(in_f=20, out_f=14, r=5, k=4)
    lam = 3.0
    Aa, Ba = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    omega = (U.t() @ Ba).pow(2).sum() + (Aa @ V).pow(2).sum()
    (lam * omega).backward()
    torch.testing.assert_close(ref.ortho_penalty(A, B, U, V), omega.detach(), rtol=1e-12,
                               atol=0)
    gA, gB = ref.ortho_penalty_grads(A, B, U, V)
    torch.testing.assert_close(lam * gA, Aa.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lam * gB, Ba.grad, rtol=1e-12, atol=1e-12)
    # the documented closed forms
    torch.testing.assert_close(gA, 2 * (A @ V) @ V.t())
    torch.testing.assert_close(gB, 2 * U @ (U.t() @ B))
    # and the differentiable ortho_penalty gives the same gradient
    A2, B2 = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    (lam * ref.ortho_penalty(A2, B2, U, V)).backward()
    torch.testing.assert_close(A2.grad, Aa.grad)
    torch.testing.assert_close(B2.grad, Ba.grad)


# --------------------------------------------------------------------- autograd Function
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("seed_as_tensor", [False, True])
def test_function_vs_autograd(p, seed_as_tensor):
    x, W, b, A, B, U, V, gy = _problem(lead=(2, 3, 4))
    s, seed = 2.0, 123
    y_auto, (xa, Aa, Ba, ba), _ = _autograd_reference(x, None, W, b, A, B, s, p, seed)
    (y_auto * gy).sum().backward()

    xf = x.clone().requires_grad_(True)
    Af, Bf, bf = (t.clone().requires_grad_(True) for t in (A, B, b))
    # a tensor seed is the graph-capture form (through the rora_fast::masked_weight op)
    seed_arg = torch.tensor([seed]) if seed_as_tensor else seed
    y = rora_linear(xf, xf, W, bf, Af, Bf, s, p, seed_arg, backend="reference")
    torch.testing.assert_close(y, y_auto.detach(), rtol=1e-12, atol=1e-12)
    y.backward(gy)
    for got, want in ((xf.grad, xa.grad), (Af.grad, Aa.grad), (Bf.grad, Ba.grad),
                      (bf.grad, ba.grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_function_weight_gradient_when_trainable():
    x, W, b, A, B, U, V, gy = _problem(lead=(6,))
    p, seed, s = 0.3, 77, 1.0
    Wa = W.clone().requires_grad_(True)
    keep = ref.weight_keep_mask(seed, *W.shape, p).to(W.dtype)
    y_auto = x @ (Wa * keep / (1 - ref.effective_drop_prob(p))).t() + b + s * x @ A.t() @ B.t()
    (y_auto * gy).sum().backward()
    Wf = W.clone().requires_grad_(True)
    y = RoraLinearFunction.apply(x, None, Wf, b, A, B, s, p, seed)
    y.backward(gy)
    torch.testing.assert_close(Wf.grad, Wa.grad, rtol=1e-12, atol=1e-12)


def test_function_saves_no_weight_sized_mask():
    # above SAVE_MASKED_MAX elements nothing out x in beyond the weight itself is kept
    from rora_fast.functional import SAVE_MASKED_MAX

    x, W, b, A, B, U, V, gy = _problem(lead=(4,), in_f=320, out_f=256)
    assert W.numel() > SAVE_MASKED_MAX
    xf = x.clone().requires_grad_(True)
    Af = A.clone().requires_grad_(True)
    y = RoraLinearFunction.apply(xf, None, W, b, Af, B, 1.0, 0.5, 9)
    saved = y.grad_fn.saved_tensors
    big = [t for t in saved if t is not None and t.numel() >= W.numel()]
    assert len(big) == 1 and big[0].data_ptr() == W.data_ptr()


def _grad_node_objects(y):
    """The autograd nodes reachable from ``y``."""
    seen, todo = [], [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.append(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return seen


def _grad_nodes(y):
    """Names of the autograd nodes reachable from ``y``."""
    return {type(f).__name__ for f in _grad_node_objects(y)}


@pytest.mark.parametrize("lead", [(), (7,), (2, 3)])
@pytest.mark.parametrize("lora_input", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_small_frozen_weight_path_vs_autograd(lead, lora_input, with_bias):
    """Small frozen weights take torch's own autograd nodes (no custom Function, the
    masked weight kept by autograd): the same forward and gradients as the independent
    float64 computation, for 1-d, 2-d and 3-d inputs, x̃ = x or not, with or without
    a bias."""
    from rora_fast import functional as F_rora

    x, W, b, A, B, U, V, gy = _problem(lead=lead, in_f=64, out_f=48)
    assert W.numel() <= F_rora.SAVE_MASKED_MAX
    s, p, seed, lora_p = 1.5, 0.3, 4242, 0.25
    mask = None
    if lora_input:
        mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) >= lora_p)
        mask = mask.to(x.dtype)
    y_auto, (xa, Aa, Ba, ba), _ = _autograd_reference(x, mask, W, b, A, B, s, p, seed,
                                                      lora_p=lora_p)
    if not with_bias:
        y_auto = y_auto - ba
    (y_auto * gy).sum().backward()

    xf = x.clone().requires_grad_(True)
    Af, Bf, bf = (t.clone().requires_grad_(True) for t in (A, B, b))
    xl = None if mask is None else xf * mask / (1 - lora_p)
    y = rora_linear(xf, xl, W, bf if with_bias else None, Af, Bf, s, p, seed,
                    backend="reference")
    assert "RoraLinearFunctionBackward" not in _grad_nodes(y)
    assert y.shape == y_auto.shape
    torch.testing.assert_close(y, y_auto.detach(), rtol=1e-12, atol=1e-12)
    y.backward(gy)
    pairs = [(xf.grad, xa.grad), (Af.grad, Aa.grad), (Bf.grad, Ba.grad)]
    if with_bias:
        pairs.append((bf.grad, ba.grad))
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_small_frozen_weight_path_only_where_it_applies():
    """The custom Function (mask regenerated in backward, nothing weight-sized saved)
    keeps every case the small-weight path does not take: a weight above
    SAVE_MASKED_MAX elements, a trainable weight, p = 0 (no mask), a tensor seed (graph
    capture), saved-tensor hooks (checkpointing, offloading); the small path keeps
    exactly one masked weight, equal to the reference's."""
    from rora_fast import functional as F_rora

    x, W, b, A, B, U, V, gy = _problem(lead=(4,), in_f=64, out_f=48)

    def run(weight, p=0.5, seed=9, hooks=False):
        xf = x.clone().requires_grad_(True)
        Af = A.clone().requires_grad_(True)
        if hooks:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                return rora_linear(xf, None, weight, b, Af, B, 1.0, p, seed,
                                   backend="reference")
        return rora_linear(xf, None, weight, b, Af, B, 1.0, p, seed, backend="reference")

    small = run(W)
    assert "RoraLinearFunctionBackward" not in _grad_nodes(small)
    saved = []
    for node in _grad_node_objects(small):
        for name in dir(node):
            if name.startswith("_saved_") and isinstance(getattr(node, name, None),
                                                          torch.Tensor):
                saved.append(getattr(node, name))
    masked = [t for t in saved if t.shape in (W.shape, W.t().shape)
              and not torch.equal(t.reshape(-1), W.reshape(-1))]
    want = ref.masked_weight(W, 9, 0.5)
    assert masked and all(torch.equal(t if t.shape == W.shape else t.t(), want)
                          for t in masked)

    old = F_rora.SAVE_MASKED_MAX
    try:
        F_rora.SAVE_MASKED_MAX = W.numel() - 1
        assert "RoraLinearFunctionBackward" in _grad_nodes(run(W))
    finally:
        F_rora.SAVE_MASKED_MAX = old
    for y in (run(W.clone().requires_grad_(True)), run(W, p=0.0),
              run(W, seed=torch.tensor([9])), run(W, hooks=True)):
        assert "RoraLinearFunctionBackward" in _grad_nodes(y)
    # the two mechanisms compute the same gradients
    grads = []
    for hooks in (False, True):
        xf = x.clone().requires_grad_(True)
        Af = A.clone().requires_grad_(True)
        ctx = (torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if hooks
               else contextlib.nullcontext())
        with ctx:
            y = rora_linear(xf, None, W, b, Af, B, 1.0, 0.5, 9, backend="reference")
        y.backward(gy)
        grads.append((y.detach(), xf.grad, Af.grad))
    for a, b_ in zip(*grads):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)


def test_reference_backend_env_and_errors(monkeypatch):
    from rora_fast.functional import resolve_backend

    monkeypatch.setenv("RORA_FAST_BACKEND", "Reference")
    assert resolve_backend() == "reference"
    monkeypatch.setenv("RORA_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown RoRA backend"):
        resolve_backend()
    monkeypatch.delenv("RORA_FAST_BACKEND")
    x, W, b, A, B, *_ = _problem(lead=(2,))
    with pytest.raises(RuntimeError, match="needs CUDA"):
        rora_linear(x, x, W, b, A, B, 1.0, 0.1, 1, backend="triton")


def test_fused_support_check_is_remembered_per_input_kind():
    """The CUDA dispatch asks kernels.supports once per combination of dtypes, devices
    and shapes, not on every call (checked here with a stand-in for the kernels)."""
    from rora_fast.functional import _SUPPORTS, _fused_ok

    calls = []

    class FakeKernels:
        @staticmethod
        def supports(x, weight, lora_A, lora_B=None, bias=None, x_lora=None):
            calls.append(1)
            return x.dtype == torch.float32

    _SUPPORTS.clear()
    W, A, B = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    for n in (3, 4, 7):  # a new number of tokens is not a new kind
        assert _fused_ok(FakeKernels, torch.randn(n, 5), None, W, None, A, B)
    assert len(calls) == 1
    assert not _fused_ok(FakeKernels, torch.randn(3, 5).double(), None, W, None, A, B)
    assert _fused_ok(FakeKernels, torch.randn(0, 5), None, W, None, A, B)  # empty: new kind
    assert _fused_ok(FakeKernels, torch.randn(3, 5), torch.randn(3, 5), W, None, A, B)
    assert len(calls) == 4


def test_lora_input_mask_statistics_and_independent_stream():
    """reference.lora_input: nn.Dropout's distribution (drop rate p, kept values scaled
    by 1/(1 − p_eff)) over x viewed as (tokens, in), keyed by seed XOR LORA_STREAM: not
    the weight mask of the same seed, and a fresh mask per seed."""
    p, seed = 0.3, 4242
    x = torch.randn(8, 16, 64, dtype=torch.float64)
    xl = ref.lora_input(x, seed, p)
    kept = xl != 0
    drop = 1 - kept.double().mean().item()
    assert abs(drop - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    torch.testing.assert_close(xl[kept], x[kept] / (1 - ref.effective_drop_prob(p)))
    want = ref.weight_keep_mask(ref.lora_seed(seed), 128, 64, p).view(x.shape)
    assert torch.equal(kept, want)
    assert not torch.equal(kept.view(128, 64), ref.weight_keep_mask(seed, 128, 64, p))
    assert not torch.equal(kept, ref.lora_input(x, seed + 1, p) != 0)
    assert ref.lora_input(x, seed, 0.0) is x
    # float32 (the C path) and float64 (torch) draw the same mask
    assert torch.equal(ref.lora_input(x.float(), seed, p) != 0, kept)
    # the graph-capture key is the same number, as a tensor
    assert int(ref.lora_seed(torch.tensor([seed]))) == ref.lora_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_differentiable_lora_input_equals_reference(dtype):
    """functional.lora_dropout_input (the x̃ DoRA and the small-weight path use) has
    reference.lora_input's values bit for bit, and the gradient x · m implies."""
    from rora_fast import functional as F_rora

    x = torch.randn(3, 7, 40, dtype=torch.float64).to(dtype).requires_grad_(True)
    for seed in (5, 2**62 + 1):
        xl = F_rora.lora_dropout_input(x, seed, 0.25)
        assert xl.dtype == dtype and xl.shape == x.shape
        assert torch.equal(xl.detach(), ref.lora_input(x.detach(), seed, 0.25))
    g = torch.randn(3, 7, 40, dtype=torch.float64).to(dtype)
    xl.backward(g)
    want = ref.lora_input(g.double(), seed, 0.25).to(dtype)
    torch.testing.assert_close(x.grad, want)
