"""RoraLinear: math against float64 autograd, weight-dropout statistics and mask
bookkeeping (one mask per call, same mask in backward, checkpoint replay,
reproducibility), eval mode, exact LoRA equivalence with PEFT, low precision."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import rora_fast
from rora_fast import RoraLinear
from rora_fast import functional as F_rora
from rora_fast import reference as ref


class CallRecorder:
    """Records (p, seed) of every call the layer makes into rora_fast.functional."""

    def __init__(self, monkeypatch):
        self.calls = []
        orig = F_rora.rora_linear

        def wrapped(x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed, *a, **k):
            self.calls.append((float(p), int(seed)))
            return orig(x, x_lora, weight, bias, lora_A, lora_B, scaling, p, seed, *a, **k)

        monkeypatch.setattr(F_rora, "rora_linear", wrapped)

    @property
    def seed(self):
        return self.calls[-1][1]


def make_layer(in_f=24, out_f=20, r=4, dtype=torch.float64, b_random=True, **kw):
    kw.setdefault("ortho_rank", 5)
    lin = nn.Linear(in_f, out_f, dtype=dtype)
    layer = RoraLinear.from_linear(lin, r=r, **kw)
    if b_random:
        with torch.no_grad():
            layer.lora_B.normal_()
    return layer


def masked_w(layer, seed):
    p = layer.weight_dropout
    keep = ref.weight_keep_mask(seed, layer.out_features, layer.in_features, p)
    return layer.weight.detach() * keep.to(layer.weight.dtype) / (1 - ref.effective_drop_prob(p))


def autograd_objective(layer, x, gy, seed, lora_mask=None, lam=0.0):
    """Independent float64 computation of sum(y*gy) + lam*Omega; returns y and grads."""
    xa = x.detach().clone().requires_grad_(True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    Wm = masked_w(layer, seed)
    xl = xa if lora_mask is None else xa * lora_mask / (1 - ref.effective_drop_prob(
        layer.lora_dropout.p))
    y = xa @ Wm.t() + layer.bias.detach() + layer.scaling * (xl @ A.t()) @ B.t()
    obj = (y * gy).sum()
    if lam:
        U, V = layer.ortho_U.double(), layer.ortho_V.double()
        obj = obj + lam * ((U.t() @ B).pow(2).sum() + (A @ V).pow(2).sum())
    obj.backward()
    return y.detach(), xa.grad, A.grad, B.grad


# ----------------------------------------------------------------------------- basics
def test_from_linear_shares_storage_and_freezes():
    lin = nn.Linear(24, 20)
    layer = RoraLinear.from_linear(lin, r=4, alpha=12, ortho_rank=6)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (20, 4)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = 1 / math.sqrt(24)  # kaiming_uniform(a=sqrt(5)) as PEFT / nn.Linear
    assert layer.lora_A.abs().max() <= bound
    assert layer.scaling == pytest.approx(3.0)
    assert layer.ortho_U.shape == (20, 6) and layer.ortho_V.shape == (24, 6)
    assert "ortho_U" not in layer.state_dict() and "ortho_V" not in layer.state_dict()
    S = torch.linalg.svdvals(lin.weight.detach().double())
    assert layer.sigma_pre == pytest.approx(S[0].item(), rel=1e-5)
    U, S2, Vh = torch.linalg.svd(lin.weight.detach().double())
    # the bases span the top-k singular subspaces (compare projectors)
    torch.testing.assert_close(layer.ortho_U.double() @ layer.ortho_U.double().t(),
                               U[:, :6] @ U[:, :6].t(), atol=1e-4, rtol=0)
    torch.testing.assert_close(layer.ortho_V.double() @ layer.ortho_V.double().t(),
                               Vh[:6].t() @ Vh[:6], atol=1e-4, rtol=0)


def test_constructor_equivalent_to_from_linear():
    torch.manual_seed(3)
    a = RoraLinear(10, 7, r=2, ortho_rank=3)
    assert isinstance(a.weight, nn.Parameter) and a.bias is not None
    assert a.in_features == 10 and a.out_features == 7
    b = RoraLinear(10, 7, bias=False, r=2, ortho_rank=3)
    assert b.bias is None
    y = b(torch.randn(3, 10))
    assert y.shape == (3, 7)


# ----------------------------------------------------------------------------- math
@pytest.mark.parametrize("p", [0.0, 0.1, 0.4])
@pytest.mark.parametrize("lam", [0.0, 2.5])
def test_layer_train_vs_float64_autograd(monkeypatch, p, lam):
    layer = make_layer(weight_dropout=p, ortho_lambda=lam)
    layer.train()
    rec = CallRecorder(monkeypatch)
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 5, 20, dtype=torch.float64)
    y = layer(x)
    y.backward(gy)
    rora_fast.add_penalty_grads(layer)  # what an optimizer's step adds (λ∇Ω)
    seed = rec.seed
    y_ref, dx, dA, dB = autograd_objective(layer, x, gy, seed, lam=lam)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_A.grad, dA, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_B.grad, dB, rtol=1e-10, atol=1e-10)
    assert layer.weight.grad is None and layer.bias.grad is None


def test_layer_trainable_bias_gets_gradient(monkeypatch):
    layer = make_layer(weight_dropout=0.2, ortho_lambda=0.0)
    layer.bias.requires_grad_(True)
    x = torch.randn(6, 24, dtype=torch.float64)
    gy = torch.randn(6, 20, dtype=torch.float64)
    layer(x).backward(gy)
    torch.testing.assert_close(layer.bias.grad, gy.sum(0))


def lora_mask(seed, x, p):
    """The LoRA input keep-mask the layer drew for ``x`` (reference.lora_input's)."""
    x2 = x.reshape(-1, x.shape[-1])
    keep = ref.weight_keep_mask(ref.lora_seed(seed), x2.shape[0], x2.shape[1], p)
    return keep.to(x.dtype).view(x.shape)


@pytest.mark.parametrize("lam", [0.0, 1.5])
@pytest.mark.parametrize("in_f,out_f", [(24, 20), (320, 300)])  # small path, Function
def test_layer_with_lora_dropout_vs_autograd(monkeypatch, lam, in_f, out_f):
    layer = make_layer(in_f, out_f, weight_dropout=0.15, lora_dropout=0.3, ortho_lambda=lam)
    assert F_rora._small_frozen(layer.weight, 0.15, 1) == (in_f * out_f <= F_rora.SAVE_MASKED_MAX)
    rec = CallRecorder(monkeypatch)
    x = torch.randn(4, 7, in_f, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(4, 7, out_f, dtype=torch.float64)
    y = layer(x)
    y.backward(gy)
    rora_fast.add_penalty_grads(layer)  # what an optimizer's step adds (λ∇Ω)
    mask = lora_mask(rec.seed, x, 0.3)
    assert 0.2 < 1 - mask.mean().item() < 0.4  # dropout really happened
    y_ref, dx, dA, dB = autograd_objective(layer, x, gy, rec.seed, lora_mask=mask, lam=lam)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_A.grad, dA, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_B.grad, dB, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(24,), (2, 3, 4, 24), (0, 24)])
def test_any_leading_shape(monkeypatch, shape):
    layer = make_layer(weight_dropout=0.2, ortho_lambda=0.0)
    rec = CallRecorder(monkeypatch)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == shape[:-1] + (20,)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref, dx, dA, dB = autograd_objective(layer, x, gy, rec.seed)
    torch.testing.assert_close(y.detach(), y_ref)
    torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(layer.lora_A.grad, dA)
    torch.testing.assert_close(layer.lora_B.grad, dB)


def test_eval_has_no_dropout_and_equals_linear_plus_lora():
    layer = make_layer(weight_dropout=0.5, lora_dropout=0.5, dtype=torch.float32)
    layer.eval()
    x = torch.randn(9, 24)
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    expected = nn.functional.linear(x, layer.weight, layer.bias) + \
        layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(y1, expected, rtol=1e-6, atol=1e-6)
    layer.train()
    assert not torch.allclose(layer(x), y1)


# ------------------------------------------------------------------ dropout statistics
def test_expected_output_equals_undropped_output():
    p, n_calls = 0.3, 600
    layer = make_layer(in_f=32, out_f=48, weight_dropout=p, dtype=torch.float64,
                       b_random=False)
    x = torch.randn(1, 32, dtype=torch.float64)
    with torch.no_grad():
        layer.eval()
        y0 = layer(x)[0]
        layer.train()
        ys = torch.stack([layer(x)[0] for _ in range(n_calls)])
    pe = ref.effective_drop_prob(p)
    var = pe / (1 - pe) * (x[0].pow(2) * layer.weight.pow(2)).sum(1)  # per output
    z = (ys.mean(0) - y0) / torch.sqrt(var / n_calls)
    assert z.abs().max().item() < 5.0, z
    # and the calls really differ (fresh mask per call)
    assert ys.std(0).min().item() > 0
    # the spread matches the Bernoulli variance (within 25 %)
    ratio = ys.var(0).mean() / var.mean()
    assert 0.75 < ratio.item() < 1.25


def test_one_mask_per_call_shared_by_all_rows(monkeypatch):
    layer = make_layer(in_f=40, out_f=30, weight_dropout=0.5, ortho_lambda=0.0)
    rec = CallRecorder(monkeypatch)
    row = torch.randn(40, dtype=torch.float64)
    x = row.expand(6, 2, 40).contiguous()
    y = layer(x)
    flat = y.reshape(-1, 30)
    for i in range(1, flat.shape[0]):
        torch.testing.assert_close(flat[i], flat[0], rtol=1e-13, atol=1e-13)
    # different rows: every row sees the one mask of this call
    x2 = torch.randn(5, 40, dtype=torch.float64)
    y2 = layer(x2)
    Wm = masked_w(layer, rec.seed)
    expected = x2 @ Wm.t() + layer.bias + layer.scaling * x2 @ layer.lora_A.t() @ layer.lora_B.t()
    torch.testing.assert_close(y2, expected.detach())
    # a second call draws a different mask
    assert rec.calls[-1][1] != rec.calls[-2][1]


def test_backward_uses_the_forward_mask(monkeypatch):
    layer = make_layer(in_f=40, out_f=30, weight_dropout=0.5, ortho_lambda=0.0)
    rec = CallRecorder(monkeypatch)
    x = torch.randn(8, 40, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    seed = rec.seed
    # draw more masks between forward and backward: backward must not pick them up
    with torch.no_grad():
        layer(torch.randn(2, 40, dtype=torch.float64))
    torch.manual_seed(12345)
    gy = torch.randn(8, 30, dtype=torch.float64)
    y.backward(gy)
    Wm = masked_w(layer, seed)
    lora_dx = layer.scaling * (gy @ layer.lora_B) @ layer.lora_A
    torch.testing.assert_close(x.grad, gy @ Wm + lora_dx.detach(), rtol=1e-12, atol=1e-12)
    # it is not the undropped weight
    assert not torch.allclose(x.grad, gy @ layer.weight + lora_dx.detach())


def test_reproducible_from_manual_seed():
    layer = make_layer(dtype=torch.float32, weight_dropout=0.3, lora_dropout=0.2,
                       ortho_lambda=1.0)
    x = torch.randn(5, 24)

    def run(seed):
        torch.manual_seed(seed)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.square().sum().backward()
        return y.detach(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    a, b, c = run(7), run(7), run(8)
    for t1, t2 in zip(a, b):
        assert torch.equal(t1, t2)
    assert not torch.equal(a[0], c[0])


class _Stack(nn.Module):
    def __init__(self, lam):
        super().__init__()
        self.l1 = make_layer(in_f=16, out_f=24, weight_dropout=0.3, lora_dropout=0.25,
                             ortho_lambda=lam, dtype=torch.float32, ortho_rank=4)
        self.l2 = make_layer(in_f=24, out_f=12, weight_dropout=0.2, ortho_lambda=lam,
                             dtype=torch.float32, ortho_rank=4)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.l2(self.drop(torch.tanh(self.l1(x))))


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_checkpoint_replay_gives_identical_gradients(use_reentrant, lam):
    torch.manual_seed(1)
    m = _Stack(lam)
    x0 = torch.randn(4, 3, 16)
    gy = torch.randn(4, 3, 12)

    def run(ckpt):
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(2024)
        y = checkpoint(m, x, use_reentrant=use_reentrant) if ckpt else m(x)
        # consume RNG after the forward: the replay must not see it
        torch.rand(100)
        y.backward(gy)
        return [y.detach(), x.grad] + [p.grad.clone() for p in m.parameters()
                                       if p.requires_grad]

    plain, ck = run(False), run(True)
    assert len(plain) == 6
    for a, b in zip(plain, ck):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------ LoRA / PEFT
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(12, 16)
        self.lin2 = nn.Linear(16, 8)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)))


@pytest.mark.parametrize("lora_dropout", [0.0, 0.3])
def test_zero_dropout_zero_lambda_is_exactly_peft_lora(lora_dropout, shared_lora_dropout):
    """With LoRA dropout, PEFT's dropout modules are given RoRA's mask (the same seeds):
    then the outputs and gradients are equal, as without it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Tiny().double()
    peft_base = copy.deepcopy(base)
    rora = rora_fast.apply_rora(base, rora_fast.RoraConfig(
        r=4, alpha=6, weight_dropout=0.0, lora_dropout=lora_dropout, ortho_rank=3,
        ortho_lambda=0.0, target_modules=["lin1", "lin2"]))
    peft_model = get_peft_model(peft_base, LoraConfig(
        r=4, lora_alpha=6, lora_dropout=lora_dropout, target_modules=["lin1", "lin2"]))
    with torch.no_grad():
        for name in ("lin1", "lin2"):
            lay = getattr(rora, name)
            lay.lora_B.normal_()
            pl = getattr(peft_model.base_model.model, name)
            pl.lora_A["default"].weight.copy_(lay.lora_A)
            pl.lora_B["default"].weight.copy_(lay.lora_B)
            assert pl.scaling["default"] == lay.scaling
    if lora_dropout:
        shared_lora_dropout.patch_peft([getattr(peft_model.base_model.model, n)
                                        for n in ("lin1", "lin2")], lora_dropout)
    x0 = torch.randn(5, 12, dtype=torch.float64)
    for train in (True, False):
        rora.train(train)
        peft_model.train(train)
        outs = []
        for m in (rora, peft_model):
            m.zero_grad(set_to_none=True)
            x = x0.clone().requires_grad_(True)
            torch.manual_seed(99)
            shared_lora_dropout.restart()
            y = m(x)
            y.sin().sum().backward()
            grads = [x.grad]
            for name in ("lin1", "lin2"):
                if m is rora:
                    lay = getattr(rora, name)
                    grads += [lay.lora_A.grad, lay.lora_B.grad]
                else:
                    pl = getattr(peft_model.base_model.model, name)
                    grads += [pl.lora_A["default"].weight.grad,
                              pl.lora_B["default"].weight.grad]
            outs.append((y.detach(), grads))
        (ya, ga), (yb, gb) = outs
        torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
        for a, b in zip(ga, gb):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------ precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_backward(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    lay32 = make_layer(dtype=torch.float32, in_f=64, out_f=48, weight_dropout=0.1,
                       ortho_lambda=0.0)
    lay_lo = RoraLinear.from_linear(nn.Linear(64, 48).to(dtype), r=4, ortho_rank=5,
                                    weight_dropout=0.1, ortho_lambda=0.0)
    with torch.no_grad():
        lay_lo.weight.copy_(lay32.weight)
        lay_lo.bias.copy_(lay32.bias)
        lay_lo.lora_A.copy_(lay32.lora_A)
        lay_lo.lora_B.copy_(lay32.lora_B)
    assert lay_lo.lora_A.dtype == torch.float32  # adapters stay fp32 like PEFT
    x = torch.randn(6, 64)
    gy = torch.randn(6, 48)
    res = []
    for lay, xin in ((lay32, x), (lay_lo, x.to(dtype))):
        xin = xin.clone().requires_grad_(True)
        torch.manual_seed(5)
        y = lay(xin)
        assert y.dtype == xin.dtype
        y.backward(gy.to(y.dtype))
        assert xin.grad.dtype == xin.dtype
        res.append((y.float(), xin.grad.float(), lay.lora_A.grad.float(),
                    lay.lora_B.grad.float()))
    for a, b in zip(*res):
        assert torch.isfinite(b).all()
        rel = (a - b).norm() / a.norm()
        assert rel < 3e-2, rel


def test_autocast_bf16_close_to_fp32():
    lay = make_layer(dtype=torch.float32, in_f=64, out_f=48, weight_dropout=0.1,
                     ortho_lambda=1.0)
    x = torch.randn(6, 64)
    gy = torch.randn(6, 48)
    res = []
    for ac in (False, True):
        lay.zero_grad(set_to_none=True)
        xin = x.clone().requires_grad_(True)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            y = lay(xin)
        assert y.dtype == (torch.bfloat16 if ac else torch.float32)
        y.float().backward(gy)
        assert lay.lora_A.grad.dtype == torch.float32
        res.append((y.float(), xin.grad, lay.lora_A.grad, lay.lora_B.grad))
    for a, b in zip(*res):
        rel = (a - b).norm() / a.norm()
        assert rel < 3e-2, rel


def test_mask_seeds_come_from_torchs_default_generator():
    """The eager seed draw is ``torch.randint(0, 2**62, (1,))`` of the default generator
    (so ``torch.manual_seed`` and checkpointing's RNG replay fix the masks), also
    from several threads."""
    import threading

    torch.manual_seed(11)
    want = [int(torch.randint(0, 2**62, (1,), dtype=torch.int64)) for _ in range(4)]
    torch.manual_seed(11)
    assert [RoraLinear._draw_seed() for _ in range(4)] == want
    got = []
    torch.manual_seed(11)
    threads = [threading.Thread(target=lambda: got.append(RoraLinear._draw_seed()))
               for _ in range(4)]
    for t in threads:
        t.start()
        t.join()
    assert got == want
