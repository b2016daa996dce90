"""All-or-nothing model changes and early validation (issue 12, items 3 and 4): every
failure case of the issue leaves named_modules(), parameters, buffers and requires_grad
flags equal to before, and a retry with a correct config works."""

import math

import pytest
import torch
from torch import nn

from rora_fast import (RoraConfig, RoraLinear, apply_rora, load_rora, merge_rora,
                       rora_layers, save_rora, spectral_rescale_)


def tiny_llama(n_layers=2, inter=48, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=inter, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
        max_position_embeddings=64)).eval()


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        vocab_size=64, max_position_embeddings=64)).eval()


def snapshot(model):
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "params": {n: (id(p), p.detach().clone(), p.requires_grad)
                   for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "config": getattr(model, "rora_config", None),
        "scales": {n: (lay.scaling, lay.rescaled) for n, lay in rora_layers(model)},
    }


def eq(a, b):
    """Bit-equal, NaN == NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def assert_same(model, snap):
    now = snapshot(model)
    assert now["modules"] == snap["modules"]
    assert now["params"].keys() == snap["params"].keys()
    for n, (i, t, flag) in snap["params"].items():
        j, u, f = now["params"][n]
        assert i == j and f == flag, n
        assert eq(t, u), n
    assert now["buffers"].keys() == snap["buffers"].keys()
    for n, t in snap["buffers"].items():
        assert eq(t, now["buffers"][n]), n
    assert now["config"] is snap["config"]
    assert now["scales"] == snap["scales"]


def trained(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, lay in rora_layers(model):
            lay.lora_A.add_(0.3 * torch.randn(lay.lora_A.shape, generator=g))
            lay.lora_B.add_(0.3 * torch.randn(lay.lora_B.shape, generator=g))
    return model


# ----------------------------------------------------------------------------- config (item 4)
@pytest.mark.parametrize("kw, match", [
    (dict(r=0), "r must be an int >= 1"),
    (dict(r=-2), "r must be an int >= 1"),
    (dict(r=2.5), "r must be an int"),
    (dict(weight_dropout=1.5), "weight_dropout must be < 1"),
    (dict(weight_dropout=-0.1), "weight_dropout must be >= 0"),
    (dict(weight_dropout=math.nan), "weight_dropout must be a finite"),
    (dict(lora_dropout=1.0), "lora_dropout must be < 1"),
    (dict(ortho_lambda=-5), "ortho_lambda must be >= 0"),
    (dict(ortho_lambda=math.inf), "ortho_lambda must be a finite"),
    (dict(alpha=math.inf), "alpha must be a finite"),
    (dict(alpha=0), "alpha must be > 0"),
    (dict(alpha=-1.0), "alpha must be > 0"),
    (dict(ortho_rank=0), "ortho_rank must be an int >= 1"),
    (dict(ortho_rank=True), "ortho_rank must be an int"),
    (dict(penalty_mode="never"), "penalty_mode must be one of"),
    (dict(svd_method="qr"), "svd_method must be one of"),
    (dict(use_dora="yes"), "use_dora must be a bool"),
    (dict(target_modules=[]), "target_modules must be"),
    (dict(modules_to_save="classifier"), "modules_to_save must be"),
])
def test_config_refuses_bad_values_at_creation(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        RoraConfig(**kw)


def test_config_and_layer_share_the_rules():
    """The same value is refused by RoraConfig and by RoraLinear with the same message."""
    for kw in (dict(alpha=math.inf), dict(ortho_lambda=math.inf), dict(weight_dropout=1.5),
               dict(ortho_lambda=-5), dict(r=0)):
        with pytest.raises((TypeError, ValueError)) as a:
            RoraConfig(**kw)
        with pytest.raises((TypeError, ValueError)) as b:
            RoraLinear.from_linear(nn.Linear(8, 8), **{"ortho_rank": 2, **kw})
        name = next(iter(kw))
        assert name in str(a.value) and name in str(b.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_base_weight_refused_naming_the_layer(bad):
    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[1].self_attn.v_proj.weight[3, 5] = bad
    snap = snapshot(m)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj.*non-finite"):
        apply_rora(m, RoraConfig(r=4, ortho_rank=4))
    assert_same(m, snap)
    with pytest.raises(ValueError, match="non-finite"):  # the layer alone too
        RoraLinear.from_linear(m.model.layers[1].self_attn.v_proj, r=2, ortho_rank=2)
    assert_same(m, snap)
    with torch.no_grad():
        m.model.layers[1].self_attn.v_proj.weight[3, 5] = 0.0
    apply_rora(m, RoraConfig(r=4, ortho_rank=4))
    assert len(list(rora_layers(m))) == 4


# ----------------------------------------------------------------------------- apply_rora
def test_apply_rank_too_large_for_one_layer_changes_nothing(tmp_path):
    """Issue 12: r=20 on all-linear raised on k_proj after wrapping q_proj and freezing
    every parameter; then apply_rora said 'already has RoRA' and save_rora 'has none'."""
    m = tiny_llama()
    snap = snapshot(m)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj: r must be in "
                                         r"\[1, min\(in_features, out_features\)\] = \[1, 16\]"):
        apply_rora(m, RoraConfig(r=20, ortho_rank=4, target_modules="all-linear"))
    assert_same(m, snap)
    assert all(p.requires_grad for p in m.parameters())
    apply_rora(m, RoraConfig(r=4, ortho_rank=4, target_modules="all-linear"))  # retry works
    assert len(list(rora_layers(m))) == 14
    save_rora(m, tmp_path / "ad")


@pytest.mark.parametrize("init", ["default", "pissa"])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_apply_failing_midway_restores_exactly(monkeypatch, init, exc):
    """A failure after some layers were built (PiSSA: after their base weights were
    rewritten) restores modules, flags and weights."""
    m = tiny_llama()
    snap = snapshot(m)
    from rora_fast.variants import variant_for

    cls = type(variant_for(init))
    real = cls.init_factors_
    calls = {"n": 0}

    def flaky(self, layer, W):
        real(self, layer, W)  # PiSSA has rewritten the base weight by now
        calls["n"] += 1
        if calls["n"] == 3:
            raise exc("injected")

    monkeypatch.setattr(cls, "init_factors_", flaky)
    with pytest.raises(exc):
        apply_rora(m, RoraConfig(r=4, ortho_rank=4, init=init, target_modules="all-linear"))
    monkeypatch.undo()
    assert_same(m, snap)
    apply_rora(m, RoraConfig(r=4, ortho_rank=4, init=init, target_modules="all-linear"))
    assert len(list(rora_layers(m))) == 14


def test_apply_bad_modules_to_save_changes_nothing():
    m = tiny_llama()
    snap = snapshot(m)
    with pytest.raises(ValueError, match="modules_to_save entry 'head'"):
        apply_rora(m, RoraConfig(r=4, ortho_rank=4, modules_to_save=["head"]))
    assert_same(m, snap)


# ----------------------------------------------------------------------------- load_rora
def test_load_into_other_mlp_width_changes_nothing(tmp_path):
    """Issue 12: raised after loading 4 of 14 layers."""
    src = trained(apply_rora(tiny_llama(), RoraConfig(r=4, ortho_rank=4,
                                                      target_modules="all-linear")))
    save_rora(src, tmp_path / "ad")
    other = tiny_llama(inter=40)
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj: file has shape"):
        load_rora(other, tmp_path / "ad")
    assert_same(other, snap)
    # the same into an already-wrapped model of the other width
    apply_rora(other, RoraConfig(r=4, ortho_rank=4, target_modules="all-linear"))
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj"):
        load_rora(other, tmp_path / "ad")
    assert_same(other, snap)
    ok = tiny_llama()  # retry with the right model works
    load_rora(ok, tmp_path / "ad")
    for (n, a), (_, b) in zip(rora_layers(ok), rora_layers(src)):
        assert torch.equal(a.lora_B, b.lora_B), n


def test_load_bert_adapter_into_llama_changes_nothing(tmp_path):
    """Issue 12: left the LLaMA wrapped and frozen."""
    bert = trained(apply_rora(tiny_bert(), RoraConfig(r=4, ortho_rank=4)))
    save_rora(bert, tmp_path / "bert")
    llama = tiny_llama()
    snap = snapshot(llama)
    with pytest.raises(ValueError, match="RoRA layers differ"):
        load_rora(llama, tmp_path / "bert")
    assert_same(llama, snap)
    llama_ad = apply_rora(tiny_llama(), RoraConfig(r=4, ortho_rank=4))
    save_rora(llama_ad, tmp_path / "llama")
    load_rora(llama, tmp_path / "llama")  # retry with the right adapter
    assert len(list(rora_layers(llama))) == 4


def test_load_failing_midway_restores_adapters_scales_and_head(tmp_path, monkeypatch):
    src = trained(apply_rora(tiny_bert(), RoraConfig(r=4, ortho_rank=4)))
    with torch.no_grad():
        src.classifier.weight.normal_()
    spectral_rescale_(src, layers=1)
    save_rora(src, tmp_path / "ad")
    dst = trained(apply_rora(tiny_bert(), RoraConfig(r=4, ortho_rank=4)), seed=7)
    snap = snapshot(dst)
    real_copy = torch.Tensor.copy_
    calls = {"n": 0}

    def flaky_copy(self, src_, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("injected copy failure")
        return real_copy(self, src_, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", flaky_copy)
    with pytest.raises(RuntimeError, match="injected"):
        load_rora(dst, tmp_path / "ad")
    monkeypatch.undo()
    assert_same(dst, snap)
    load_rora(dst, tmp_path / "ad")
    assert torch.equal(dst.classifier.weight, src.classifier.weight)
    assert [l.scaling for _, l in rora_layers(dst)] == [l.scaling for _, l in rora_layers(src)]


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_load_fresh_failing_midway_unwraps_again(tmp_path, monkeypatch, init):
    """Fails after apply_rora wrapped the fresh model (PiSSA: rewrote its base weights)
    and the first layer was loaded (PiSSA: its base re-folded to the saved scale)."""
    from rora_fast import persistence

    src = trained(apply_rora(tiny_bert(), RoraConfig(r=4, ortho_rank=4, init=init)))
    spectral_rescale_(src, layers=2)  # the saved init_scaling differs from a fresh one
    save_rora(src, tmp_path / "ad")
    dst = tiny_bert()
    snap = snapshot(dst)
    real = persistence._layer_tensors
    calls = {"n": 0}

    def flaky(layer):
        calls["n"] += 1
        if calls["n"] == 2:  # the copy loop, second layer
            raise RuntimeError("injected failure while loading")
        return real(layer)

    monkeypatch.setattr(persistence, "_layer_tensors", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        load_rora(dst, tmp_path / "ad")
    monkeypatch.undo()
    assert_same(dst, snap)
    load_rora(dst, tmp_path / "ad")  # retry works
    assert [l.scaling for _, l in rora_layers(dst)] == [l.scaling for _, l in rora_layers(src)]


# ----------------------------------------------------------------------------- rescale / merge
def test_rescale_zero_layer_changes_no_other_layer():
    m = trained(apply_rora(tiny_llama(), RoraConfig(r=4, ortho_rank=4)))
    with torch.no_grad():
        m.model.layers[1].self_attn.v_proj.lora_B.zero_()
    snap = snapshot(m)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj: cannot rescale"):
        spectral_rescale_(m, layers=1)
    assert_same(m, snap)  # q_proj of the same block was not rescaled either
    out = spectral_rescale_(m, layers=["model.layers.1.self_attn.q_proj"])
    assert list(out) == ["model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_rescale_failing_midway_restores_scales_and_weights(monkeypatch, init):
    m = trained(apply_rora(tiny_llama(), RoraConfig(r=4, ortho_rank=4, init=init,
                                                    target_modules="all-linear")))
    snap = snapshot(m)
    real = RoraLinear._set_rescaled_  # the per-layer step of spectral_rescale_
    calls = {"n": 0}

    def flaky(self, s):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected")
        return real(self, s)

    monkeypatch.setattr(RoraLinear, "_set_rescaled_", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        spectral_rescale_(m, layers=2)
    monkeypatch.undo()
    assert_same(m, snap)
    assert len(spectral_rescale_(m, layers=2)) == 14


def test_merge_failing_midway_restores_everything(monkeypatch):
    m = trained(apply_rora(tiny_llama(), RoraConfig(r=4, ortho_rank=4,
                                                    target_modules="all-linear")))
    snap = snapshot(m)
    real = RoraLinear.merged_linear
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected")
        return real(self)

    monkeypatch.setattr(RoraLinear, "merged_linear", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        merge_rora(m)
    monkeypatch.undo()
    assert_same(m, snap)
    ids = torch.randint(0, 64, (2, 7))
    m.eval()
    with torch.no_grad():
        want = m(input_ids=ids).logits
        merge_rora(m)
        got = m(input_ids=ids).logits
    assert not list(rora_layers(m))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merge_non_finite_result_refused():
    m = trained(apply_rora(tiny_llama(), RoraConfig(r=4, ortho_rank=4)))
    with torch.no_grad():
        m.model.layers[1].self_attn.q_proj.lora_A[0, 0] = math.inf
    snap = snapshot(m)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj: merging gives "
                                         "a non-finite weight"):
        merge_rora(m)
    assert_same(m, snap)


# ----------------------------------------------------------------------------- PEFT
def _peft_llama():
    import peft
    import rora_fast

    c = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    rora_fast.register_rora(c, weight_dropout=0.1, ortho_rank=4)
    return peft.get_peft_model(tiny_llama(), c)


def test_rescale_peft_all_or_nothing():
    from rora_fast import spectral_rescale_peft_
    from rora_fast.peft_integration import peft_rora_layers

    pm = _peft_llama()
    g = torch.Generator().manual_seed(0)
    layers = dict(peft_rora_layers(pm))
    with torch.no_grad():
        for lay in layers.values():
            lay.lora_B["default"].weight.copy_(torch.randn(lay.lora_B["default"].weight.shape,
                                                           generator=g))
        zero = [n for n in layers if ".1.self_attn.v_proj" in n][0]
        layers[zero].lora_B["default"].weight.zero_()
    before = {n: dict(l.scaling) for n, l in layers.items()}
    with pytest.raises(ValueError, match="v_proj: cannot rescale"):
        spectral_rescale_peft_(pm, layers=1)
    assert {n: dict(l.scaling) for n, l in layers.items()} == before
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        spectral_rescale_peft_(pm, layers=[n for n in layers if ".0." in n],
                               adapter_name="other")
    assert {n: dict(l.scaling) for n, l in layers.items()} == before
    out = spectral_rescale_peft_(pm, layers=[n for n in layers if ".0." in n])
    assert len(out) == 2


def test_register_rora_never_builds_plain_lora():
    """Targets register_rora has no RoRA class for are refused, not silently plain LoRA."""
    import peft
    import rora_fast

    m = tiny_llama()
    c = peft.LoraConfig(r=4, target_modules=["embed_tokens"])
    rora_fast.register_rora(c, ortho_rank=4)
    with pytest.raises(TypeError, match="register_rora cannot make a RoRA layer.*Embedding"):
        peft.get_peft_model(m, c)
    c = peft.LoraConfig(r=4, target_modules=["q_proj"])
    rora_fast.register_rora(c, ortho_rank=4)
    pm = peft.get_peft_model(tiny_llama(), c)
    from rora_fast.peft_integration import peft_rora_layers
    assert len(list(peft_rora_layers(pm))) == 2
