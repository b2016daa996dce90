"""RoRA used through PEFT's custom-module registration (rora_fast.register_rora)."""
import copy
import pytest
import torch

import rora_fast as rf

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny_bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4,
                                  num_attention_heads=2, intermediate_size=64, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def _lora_config(**kw):
    return peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                           task_type="SEQ_CLS", init_lora_weights="gaussian", **kw)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_register_rora_without_regularisers_is_exactly_peft_lora():
    base = _tiny_bert()
    ids = torch.randint(0, 100, (3, 7))
    labels = torch.tensor([0, 1, 0])
    torch.manual_seed(1)
    plain = peft.get_peft_model(copy.deepcopy(base), _lora_config())
    cfg = _lora_config()
    cls = rf.register_rora(cfg, weight_dropout=0.0, ortho_rank=8, ortho_lambda=0.0)
    torch.manual_seed(1)
    rora = peft.get_peft_model(copy.deepcopy(base), cfg)
    layer = rora.base_model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, cls)
    for m in (plain, rora):
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        m.train()
    l1 = plain(input_ids=ids, labels=labels).loss
    l1.backward()
    l2 = rora(input_ids=ids, labels=labels).loss
    l2.backward()
    torch.testing.assert_close(l1, l2)
    g1, g2 = _grads(plain), _grads(rora)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-7)


def test_peft_rora_trains_applies_penalty_and_rescales(tmp_path):
    base = _tiny_bert()
    ids = torch.randint(0, 100, (4, 7))
    labels = torch.tensor([0, 1, 0, 1])
    cfg = _lora_config()
    rf.register_rora(cfg, weight_dropout=0.1, ortho_rank=8, ortho_lambda=10.0)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    model.train()
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    # The penalty gradient arrives at the optimizer step: B = 0 makes dA from the loss
    # zero, so the gradient the optimizer sees for A is λ·2(AV)Vᵀ.
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    A = layer.lora_A["default"].weight
    assert not A.grad.abs().max() > 0
    expected = 10.0 * 2 * (A @ layer.rora_ortho_V) @ layer.rora_ortho_V.t()
    penalty = rf.rora_penalty(model)
    assert not penalty.requires_grad and penalty.item() > 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update(A=A.grad.clone()))
    opt.step()
    torch.testing.assert_close(seen["A"], expected.detach(), rtol=1e-4, atol=1e-6)
    opt.zero_grad()
    for _ in range(3):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    assert rf.rora_penalty(model).item() < penalty.item()
    scales = rf.spectral_rescale_peft_(model, layers=2)
    assert sorted(scales) == sorted(
        f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}"
        for i in (2, 3) for m in ("query", "value"))
    name = "base_model.model.bert.encoder.layer.3.attention.self.query"
    layer3 = model.get_submodule(name)
    sd = torch.linalg.matrix_norm(layer3.lora_B["default"].weight @ layer3.lora_A["default"].weight,
                                  ord=2).item()
    assert scales[name] == pytest.approx(layer3.rora_sigma_pre / sd, rel=1e-4)
    # The saved adapter is an ordinary PEFT LoRA adapter (no SVD buffers in it).
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert keys and not any("rora" in k for k in keys)


def test_register_rora_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="weight_dropout"):
        rf.register_rora(_lora_config(), weight_dropout=1.0)
    with pytest.raises(ValueError, match="ortho_lambda"):
        rf.register_rora(_lora_config(), ortho_lambda=-1.0)
    cfg = _lora_config()
    rf.register_rora(cfg, ortho_rank=64)
    with pytest.raises(ValueError, match="ortho_rank"):
        peft.get_peft_model(_tiny_bert(), cfg)


# ---------------------------------------------------------------- issue 30: the PEFT door
def _two_layer():
    from torch import nn
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(16, 16)
            self.v = nn.Linear(16, 16)

        def forward(self, x):
            return self.v(self.q(x))
    return M()


@pytest.mark.parametrize("extra", [{"use_dora": True}, {"init_lora_weights": "pissa"},
                                   {"init_lora_weights": "olora"}])
def test_register_rora_refuses_what_it_cannot_train_when_the_model_is_built(extra):
    """DoRA and PiSSA/OLoRA through register_rora would train PEFT's layer (no weight
    dropout) or put the penalty on B and A themselves: refused at get_peft_model, naming
    the layer and the reason, never a silent fallback at forward time."""
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], **extra)
    rf.register_rora(cfg, weight_dropout=0.3, ortho_rank=2)
    # (older PEFT does not pass the layer's name to the module: "a target layer")
    with pytest.raises(ValueError, match=r"register_rora: (q|a target layer): .*vanilla LoRA"
                                         r".*apply_rora"):
        peft.get_peft_model(_two_layer(), cfg)


def test_peft_rora_training_forward_refuses_instead_of_falling_back():
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"])
    rf.register_rora(cfg, weight_dropout=0.3, ortho_rank=2)
    m = peft.get_peft_model(_two_layer(), cfg)
    x = torch.randn(3, 16)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.equal(a, m(x))  # RoRA's weight dropout is drawn: not plain LoRA
    layer = m.base_model.model.q
    with pytest.raises(RuntimeError, match="extra arguments"):
        layer(x, adapter_names=["default"] * 3)
    m.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q", "v"]))
    layer.set_adapter(["default", "other"])
    with pytest.raises(RuntimeError, match="one active adapter"):
        layer(x)
    layer.set_adapter("default")
    m.eval()
    with torch.no_grad():
        layer(x)  # eval is LoRA's forward, multi-adapter or not


def _trained_plain(init, **kw):
    cfg = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                          task_type="SEQ_CLS", init_lora_weights=init, **kw)
    model = peft.get_peft_model(_tiny_bert(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.01 * torch.randn_like(p))
    return model


def test_rescale_of_plain_peft_lora_asks_the_variant():
    # plain PEFT LoRA (and DoRA on LoRA's start): sigma(W_pre)/sigma(BA), as RoraLinear does
    for kw in ({}, {"use_dora": True}):
        model = _trained_plain("gaussian", **kw)
        scales = rf.spectral_rescale_(model, layers=1)
        layer = model.base_model.model.bert.encoder.layer[3].attention.self.query
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        W = layer.get_base_layer().weight.detach()
        A, B = A.detach(), B.detach()
        want = float(torch.linalg.matrix_norm(W, 2) / torch.linalg.matrix_norm(B @ A, 2))
        name = [n for n in scales if n.endswith("layer.3.attention.self.query")][0]
        assert scales[name] == pytest.approx(want, rel=1e-4)
        assert layer.scaling["default"] == scales[name]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rescale_of_plain_peft_pissa_olora_is_refused_naming_the_layer(init):
    # PEFT keeps no start B0A0: a new scale would rescale W_pre's top components too
    model = _trained_plain(init)
    before = rf.adapter_scales(model)
    with pytest.raises(ValueError, match=r"layer\.[0-9]\.attention\.self\.(query|value).*"
                                         r"plain PEFT adapter with init='" + init):
        rf.spectral_rescale_(model, layers=1)
    name = next(iter(before))
    with pytest.raises(ValueError, match="plain PEFT adapter"):
        rf.set_scales_(model, {name: 2.0})
    assert rf.adapter_scales(model) == before


def test_rescale_of_peft_layers_without_their_config_is_refused():
    # a plain PEFT layer outside a model that says how it started: its start is unknown
    model = _trained_plain("gaussian")
    inner = torch.nn.Module()  # the PEFT layers held by a module without PEFT's config
    inner.bert = model.base_model.model.bert
    before = rf.adapter_scales(inner)
    with pytest.raises(ValueError, match=r"no peft_config\['default'\].*PeftModel"):
        rf.spectral_rescale_(inner, layers=1)
    assert rf.adapter_scales(inner) == before
