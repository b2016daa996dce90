"""PiSSA / OLoRA init and DoRA against PEFT's own implementations (weight_dropout=0,
ortho_lambda=0): same initial factors and residual base, same outputs and gradients."""

import copy

import pytest
import torch
from torch import nn

from rora_fast import RoraConfig, add_penalty_grads, apply_rora, rora_layers

NAMES = ("lin1", "lin2")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(12, 16)
        self.lin2 = nn.Linear(16, 10)

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x)))


def build(init="default", use_dora=False, lora_dropout=0.0, r=4, alpha=6):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Tiny()
    original = {n: getattr(base, n).weight.detach().clone() for n in NAMES}
    peft_base = copy.deepcopy(base)
    rora = apply_rora(base, RoraConfig(r=r, alpha=alpha, weight_dropout=0.0,
                                       lora_dropout=lora_dropout, ortho_rank=3,
                                       ortho_lambda=0.0, target_modules=list(NAMES),
                                       init=init, use_dora=use_dora))
    init_arg = {"default": True, "pissa": "pissa", "olora": "olora"}[init]
    pm = get_peft_model(peft_base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora_dropout,
                                              target_modules=list(NAMES),
                                              init_lora_weights=init_arg, use_dora=use_dora))
    return rora, pm, original


def peft_layer(pm, name):
    return getattr(pm.base_model.model, name)


def params(model, name, is_peft):
    if is_peft:
        pl = peft_layer(model, name)
        out = [pl.lora_A["default"].weight, pl.lora_B["default"].weight]
        if pl.use_dora["default"]:
            out.append(pl.lora_magnitude_vector["default"].weight)
        return out
    lay = getattr(model, name)
    out = [lay.lora_A, lay.lora_B]
    if lay.lora_magnitude is not None:
        out.append(lay.lora_magnitude)
    return out


def sync_random_adapters(rora, pm, seed=7):
    """Perturb the adapters (so gradients through B and DoRA's norm matter) identically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in NAMES:
            mine, theirs = params(rora, n, False), params(pm, n, True)
            for a, b in zip(mine, theirs):
                a.add_(0.3 * torch.randn(a.shape, generator=g))
                b.copy_(a)


def run(model, x0, is_peft, train, seed=11, restart=None):
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    torch.manual_seed(seed)
    if restart is not None:
        restart()
    y = model(x)
    (y.sin() * torch.arange(y.shape[-1])).sum().backward()
    grads = [x.grad]
    for n in NAMES:
        grads += [p.grad for p in params(model, n, is_peft)]
    return y.detach(), grads


def compare(rora, pm, train, atol=1e-5, restart=None):
    # float32, gradients of order 1-10: 1e-5 is a few ulps of the largest entries. 2e-6 held
    # on an AVX-512 Xeon but not on an AMD EPYC, where PEFT's and our summation orders round
    # one small entry 3e-6 apart.
    x0 = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    ya, ga = run(rora, x0, False, train, restart=restart)
    yb, gb = run(pm, x0, True, train, restart=restart)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=atol)
    assert len(ga) == len(gb)
    for a, b in zip(ga, gb):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_init_matches_peft(init):
    rora, pm, original = build(init=init)
    for n in NAMES:
        lay, pl = getattr(rora, n), peft_layer(pm, n)
        torch.testing.assert_close(lay.lora_A, pl.lora_A["default"].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(lay.lora_B, pl.lora_B["default"].weight, rtol=0, atol=1e-6)
        # the base is the residual, exactly as PEFT rewrites it
        torch.testing.assert_close(lay.weight, pl.base_layer.weight, rtol=0, atol=1e-6)
        assert not torch.allclose(lay.weight, original[n])
        # bases and sigma_pre are those of the ORIGINAL weight, not the residual
        S = torch.linalg.svdvals(original[n].double())
        assert lay.sigma_pre == pytest.approx(S[0].item(), rel=1e-5)
        U, _, Vh = torch.linalg.svd(original[n].double())
        k = lay.ortho_rank
        torch.testing.assert_close(lay.ortho_V.double() @ lay.ortho_V.double().t(),
                                   Vh[:k].t() @ Vh[:k], atol=1e-4, rtol=0)
        torch.testing.assert_close(lay.ortho_U.double() @ lay.ortho_U.double().t(),
                                   U[:, :k] @ U[:, :k].t(), atol=1e-4, rtol=0)
        # and W_res + s·BA is the original weight
        torch.testing.assert_close(lay.weight + lay.scaling * lay.lora_B @ lay.lora_A,
                                   original[n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("train", [True, False])
def test_pissa_olora_outputs_and_grads_match_peft(init, train):
    rora, pm, _ = build(init=init)
    compare(rora, pm, train)
    sync_random_adapters(rora, pm)
    compare(rora, pm, train)


@pytest.mark.parametrize("train", [True, False])
def test_dora_outputs_and_grads_match_peft(train):
    rora, pm, _ = build(use_dora=True)
    for n in NAMES:
        torch.testing.assert_close(getattr(rora, n).lora_magnitude,
                                   peft_layer(pm, n).lora_magnitude_vector["default"].weight)
    sync_random_adapters(rora, pm)
    compare(rora, pm, train)


@pytest.mark.parametrize("train", [False, True])
def test_dora_with_lora_dropout_matches_peft(train, shared_lora_dropout):
    """PEFT's dropout modules given RoRA's LoRA input mask (the same seeds)."""
    rora, pm, _ = build(use_dora=True, lora_dropout=0.3)
    shared_lora_dropout.patch_peft([peft_layer(pm, n) for n in NAMES], 0.3)
    sync_random_adapters(rora, pm)
    compare(rora, pm, train, restart=shared_lora_dropout.restart)


def test_dora_pissa_combination_matches_peft():
    rora, pm, _ = build(init="pissa", use_dora=True)
    sync_random_adapters(rora, pm)
    compare(rora, pm, True)


def test_variant_layers_are_rora():
    rora, _, _ = build(init="olora", use_dora=True)
    assert len(list(rora_layers(rora))) == 2


# ---------------------------------------------------------------- RoRA on PiSSA / OLoRA
# Their adapter starts as W_pre's top components (B₀A₀): the penalty and the rescaling act
# on the update away from that start, else RoRA removes W_pre's own principal components
# (measured before this rule: RoRA-PiSSA on SST-2 collapsed to chance accuracy).

def _rora_variant(init, lam=10.0, p=0.0):
    torch.manual_seed(0)
    model = Tiny()
    w_pre = {n: getattr(model, n).weight.detach().double().clone() for n in NAMES}
    apply_rora(model, RoraConfig(r=4, alpha=6, weight_dropout=p, lora_dropout=0.0,
                                 ortho_rank=3, ortho_lambda=lam, target_modules=list(NAMES),
                                 init=init))
    return model, w_pre


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_variant_penalty_is_on_the_update(init):
    model, _ = _rora_variant(init)
    for _, lay in rora_layers(model):
        # zero at the start although B₀, A₀ lie on W_pre's principal directions
        assert float(lay.penalty()) == 0.0
        with torch.no_grad():
            lay.lora_A.add_(0.1 * torch.randn_like(lay.lora_A))
            lay.lora_B.add_(0.1 * torch.randn_like(lay.lora_B))
        A = lay.lora_A.detach().double().requires_grad_()
        B = lay.lora_B.detach().double().requires_grad_()
        U, V = lay.ortho_U.double(), lay.ortho_V.double()
        want = lay.ortho_lambda * ((U.t() @ (B - lay.lora_B0.double())).pow(2).sum()
                                   + ((A - lay.lora_A0.double()) @ V).pow(2).sum())
        assert float(lay.penalty()) == pytest.approx(want.item(), rel=1e-5)
        want.backward()
        lay.lora_A.grad = torch.zeros_like(lay.lora_A)
        lay.lora_B.grad = torch.zeros_like(lay.lora_B)
        assert add_penalty_grads(model) >= 2  # the step hook's own code path
        assert torch.allclose(lay.lora_A.grad.double(), A.grad, rtol=1e-5, atol=1e-5)
        assert torch.allclose(lay.lora_B.grad.double(), B.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_variant_penalty_gradient_at_the_step(init):
    """The optimizer step adds λ∇Ω of the update (A − A₀, B − B₀) to the gradients."""
    model, _ = _rora_variant(init)
    lay = model.lin1
    with torch.no_grad():
        lay.lora_B.add_(0.1 * torch.randn_like(lay.lora_B))
    x = torch.randn(5, 12)
    model.train()
    lay(x).sum().backward()
    data_grad = lay.lora_B.grad.clone()
    B_before = lay.lora_B.detach().clone()
    _, gB = __import__("rora_fast").reference.ortho_penalty_grads(
        lay.lora_A, lay.lora_B, lay.ortho_U, lay.ortho_V, lay.lora_A0, lay.lora_B0)
    torch.optim.SGD([lay.lora_A, lay.lora_B], lr=1.0).step()
    assert torch.allclose(lay.lora_B, B_before - (data_grad + lay.ortho_lambda * gB),
                          rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_variant_rescale_scales_only_the_update(init, tmp_path):
    from rora_fast import load_rora, save_rora, spectral_rescale_

    model, w_pre = _rora_variant(init)
    with torch.no_grad():
        for _, lay in rora_layers(model):
            lay.lora_A.add_(0.05 * torch.randn_like(lay.lora_A))
            lay.lora_B.add_(0.05 * torch.randn_like(lay.lora_B))
    model.eval()
    x = torch.randn(7, 12)
    trained = {n: getattr(model, n).lora_A.detach().clone() for n in NAMES}
    scales = spectral_rescale_(model, layers=[f"{n}" for n in NAMES])
    for n in NAMES:
        lay = getattr(model, n)
        upd = (lay.lora_B.double() @ lay.lora_A.double()
               - lay.lora_B0.double() @ lay.lora_A0.double())
        eff = lay.weight.double() + lay.scaling * (lay.lora_B.double() @ lay.lora_A.double())
        # the model is W_pre + s·(BA − B₀A₀), s = σ_max(W_pre)/σ_max(BA − B₀A₀)
        assert torch.allclose(eff, w_pre[n] + scales[n] * upd, atol=1e-5)
        assert scales[n] == pytest.approx(
            torch.linalg.svdvals(w_pre[n])[0].item() / torch.linalg.svdvals(upd)[0].item(),
            rel=1e-4)
        assert torch.equal(lay.lora_A, trained[n])
    y = model(x)
    save_rora(model, tmp_path / "ad")
    torch.manual_seed(0)
    again = Tiny()  # the same pretrained weights as _rora_variant's
    load_rora(again, tmp_path / "ad")
    again.eval()
    assert torch.allclose(again(x), y, atol=1e-5)
