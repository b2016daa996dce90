"""RoRA over GPT-2's transformers ``Conv1D`` (weight stored in x out, fan_in_fan_out):
equal to PEFT's LoRA with p = 0 and λ = 0 (outputs and gradients), the mask defined on the
(out, in) view (equal to a transposed nn.Linear of the same weight), through apply_rora and
register_rora; save/load, PEFT export, merge back to Conv1D (issue 13)."""

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import rora_fast  # noqa: E402
from rora_fast.peft_integration import peft_rora_layers  # noqa: E402
from rora_fast.conv1d import RoraConv1D  # noqa: E402
from rora_fast.targets import make_rora_layer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _conv(n_in=32, n_out=48, seed=0) -> Conv1D:
    torch.manual_seed(seed)
    c = Conv1D(n_out, n_in)
    with torch.no_grad():
        c.weight.normal_(std=0.2)
        c.bias.normal_(std=0.1)
    return c


@pytest.fixture(scope="module")
def gpt2():
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).eval()


def test_mask_matches_a_transposed_linear_of_the_same_weight():
    conv = _conv()
    kw = dict(r=4, alpha=8, weight_dropout=0.1, ortho_rank=8, ortho_lambda=10.0)
    layer = make_rora_layer(conv, "c_attn", **kw)
    assert isinstance(layer, RoraConv1D)
    # no copy: the layer's (out, in) weight is a view of the Conv1D's storage
    assert layer.weight.shape == (48, 32)
    assert layer.weight.data_ptr() == conv.weight.data_ptr()
    lin = nn.Linear(32, 48)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    dense = rora_fast.RoraLinear.from_linear(lin, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()
        dense.lora_A.copy_(layer.lora_A)
        dense.lora_B.copy_(layer.lora_B)
    assert layer.sigma_pre == pytest.approx(dense.sigma_pre, rel=1e-6)
    x = torch.randn(3, 7, 32)
    res = []
    for m in (layer, dense):
        m.train()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(11)
        y = m(xi)
        y.square().sum().backward()
        res.append((y.detach(), xi.grad, m.lora_A.grad, m.lora_B.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)
    torch.manual_seed(12)
    with torch.no_grad():
        assert not torch.allclose(layer(x), res[0][0])  # dropout active


def _run(model, ids):
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _lora_grads_by_layer(grads):
    """{(module name, 'A'|'B'): grad}, from RoRA (``x.lora_A``) or PEFT
    (``base_model.model.x.lora_A.default.weight``) parameter names."""
    out = {}
    for n, g in grads.items():
        for ab in ("A", "B"):
            tag = f".lora_{ab}"
            if tag in n:
                mod = n.split(tag)[0].replace("base_model.model.", "")
                out[(mod, ab)] = g
    return out


@pytest.mark.parametrize("targets", [["c_attn"], "all-linear"])
def test_apply_rora_p0_lambda0_equals_peft_lora(gpt2, targets):
    ids = torch.randint(0, 128, (2, 10))
    peft_targets = ["c_attn", "c_proj", "c_fc"] if targets == "all-linear" else targets
    pm = peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=peft_targets, fan_in_fan_out=True,
        init_lora_weights="gaussian"))
    rm = rora_fast.apply_rora(copy.deepcopy(gpt2), rora_fast.RoraConfig(
        r=4, alpha=8, weight_dropout=0.0, ortho_lambda=0.0, ortho_rank=8,
        target_modules=targets))
    layers = dict(rora_fast.rora_layers(rm))
    assert layers and all(isinstance(m, RoraConv1D) for m in layers.values())
    peft_layers = {n.replace("base_model.model.", ""): m for n, m in pm.named_modules()
                   if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    assert set(peft_layers) == set(layers)
    with torch.no_grad():
        for n, m in layers.items():
            m.lora_A.copy_(peft_layers[n].lora_A["default"].weight)
            m.lora_B.copy_(peft_layers[n].lora_B["default"].weight)
    y_p, g_p = _run(pm, ids)
    y_r, g_r = _run(rm, ids)
    torch.testing.assert_close(y_r, y_p, rtol=1e-5, atol=1e-5)
    gp, gr = _lora_grads_by_layer(g_p), _lora_grads_by_layer(g_r)
    assert gp.keys() == gr.keys() and gp
    for k in gp:
        torch.testing.assert_close(gr[k], gp[k], rtol=1e-4, atol=1e-6)


def test_gpt2_trains_saves_loads_exports_merges(gpt2, tmp_path, train_lm):
    ids = torch.randint(0, 128, (4, 12))
    model = rora_fast.apply_rora(copy.deepcopy(gpt2), rora_fast.RoraConfig(
        r=4, alpha=8, ortho_rank=8, target_modules="all-linear"))
    # the state dict keeps Conv1D's (in, out) layout
    sd = model.state_dict()
    assert tuple(sd["transformer.h.0.attn.c_attn.weight"].shape) == (64, 192)
    torch.testing.assert_close(sd["transformer.h.0.attn.c_attn.weight"],
                               gpt2.state_dict()["transformer.h.0.attn.c_attn.weight"])
    losses = train_lm(model, ids)
    assert losses[-1] < losses[0]
    assert float(rora_fast.rora_penalty(model)) > 0
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    rora_fast.save_rora(model, tmp_path / "rora")
    again = rora_fast.load_rora(copy.deepcopy(gpt2), tmp_path / "rora").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ref)
    rora_fast.export_peft_adapter(model, tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    rora_fast.merge_rora(model)
    c = model.transformer.h[0].attn.c_attn
    assert type(c) is Conv1D and tuple(c.weight.shape) == (64, 192)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_register_rora_supports_conv1d(gpt2):
    """register_rora over GPT-2: RoRA layers (not silently plain LoRA); with p = 0, λ = 0
    PEFT LoRA's outputs and gradients; with p > 0 the mask of RoraConv1D."""
    ids = torch.randint(0, 128, (2, 10))
    runs = []
    for rora in (False, True):
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                              fan_in_fan_out=True, init_lora_weights="gaussian")
        if rora:
            rora_fast.register_rora(cfg, weight_dropout=0.0, ortho_rank=8, ortho_lambda=0.0)
        torch.manual_seed(5)
        pm = peft.get_peft_model(copy.deepcopy(gpt2), cfg)
        if rora:
            kinds = {type(m).__name__ for _, m in peft_rora_layers(pm)}
            assert kinds == {"PeftRoraConv1D"}
        runs.append(_run(pm, ids))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    for k in runs[0][1]:
        torch.testing.assert_close(runs[0][1][k], runs[1][1][k])

    # p > 0: the PEFT layer draws the same mask as RoraConv1D on the same Conv1D
    conv = _conv()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c"], fan_in_fan_out=True)
    rora_fast.register_rora(cfg, weight_dropout=0.1, ortho_rank=8, ortho_lambda=0.0)
    holder = nn.Module()
    holder.c = copy.deepcopy(conv)
    pm = peft.get_peft_model(holder, cfg)
    player = pm.base_model.model.c
    layer = RoraConv1D.from_conv1d(copy.deepcopy(conv), r=4, alpha=8, weight_dropout=0.1,
                                   ortho_rank=8, ortho_lambda=0.0)
    with torch.no_grad():
        player.lora_B["default"].weight.normal_()
        layer.lora_A.copy_(player.lora_A["default"].weight)
        layer.lora_B.copy_(player.lora_B["default"].weight)
    x = torch.randn(5, 32)
    player.train()
    layer.train()
    torch.manual_seed(9)
    y1 = player(x)
    torch.manual_seed(9)
    y2 = layer(x)
    torch.testing.assert_close(y1, y2)
    assert player.rora_sigma_pre == pytest.approx(layer.sigma_pre, rel=1e-6)


@pytest.mark.parametrize("kw", [dict(init="pissa"), dict(init="olora"), dict(use_dora=True)])
def test_variants_on_conv1d_equal_a_transposed_linear(kw):
    """PiSSA / OLoRA (the residual written through the (out, in) view into the Conv1D's
    storage) and DoRA: the same outputs as on an nn.Linear holding conv.weight.t(), and
    merging gives a Conv1D with the same eval output."""
    conv = _conv()
    lin = nn.Linear(32, 48)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    args = dict(r=4, alpha=8, weight_dropout=0.1, ortho_rank=8, ortho_lambda=10.0, **kw)
    layer = RoraConv1D.from_conv1d(conv, **args)
    dense = rora_fast.RoraLinear.from_linear(lin, **args)
    torch.testing.assert_close(conv.weight.t(), lin.weight)  # same residual, in place
    with torch.no_grad():
        layer.lora_A.copy_(dense.lora_A)
        layer.lora_B.copy_(dense.lora_B + 0.05)
        dense.lora_B.add_(0.05)
    x = torch.randn(6, 32)
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        getattr(dense, mode)()
        torch.manual_seed(4)
        a = layer(x)
        torch.manual_seed(4)
        b = dense(x)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y = layer(x)
        merged = layer.merged_linear()
        assert type(merged) is Conv1D
        torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
