"""PiSSA / OLoRA init and DoRA against PEFT's own implementations (weight_dropout=0,
ortho_lambda=0): same initial factors and residual base, same outputs and gradients."""

import copy

import pytest
import torch
from torch import nn

from rora_fast import RoraConfig, apply_rora, rora_layers

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


def run(model, x0, is_peft, train, seed=11):
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = model(x)
    (y.sin() * torch.arange(y.shape[-1])).sum().backward()
    grads = [x.grad]
    for n in NAMES:
        grads += [p.grad for p in params(model, n, is_peft)]
    return y.detach(), grads


def compare(rora, pm, train, atol=2e-6):
    x0 = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    ya, ga = run(rora, x0, False, train)
    yb, gb = run(pm, x0, True, train)
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
def test_dora_with_lora_dropout_matches_peft(train):
    rora, pm, _ = build(use_dora=True, lora_dropout=0.3)
    sync_random_adapters(rora, pm)
    compare(rora, pm, train)


def test_dora_pissa_combination_matches_peft():
    rora, pm, _ = build(init="pissa", use_dora=True)
    sync_random_adapters(rora, pm)
    compare(rora, pm, True)


def test_variant_layers_are_rora():
    rora, _, _ = build(init="olora", use_dora=True)
    assert len(list(rora_layers(rora))) == 2
