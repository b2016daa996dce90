"""One method through every door (issue 30): for every base kind, RoRA built by
``apply_rora`` and RoRA built by ``register_rora`` + ``peft.get_peft_model`` from the same
model and the same adapter factors give, under the same seed, the same training forward
(the same weight and LoRA-dropout masks), the same gradients, the same penalty and
penalty gradient, the same rescale factors and the same merged model. The variants PEFT's
door cannot train as RoRA (DoRA, PiSSA, OLoRA) are refused when the PEFT model is built,
on every base, naming the layer and the reason."""
import warnings

import pytest
import torch

import rora_fast as rf

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

P, LORA_P, K, LAM, R, ALPHA = 0.2, 0.1, 4, 3.0, 2, 4
BASES = ["dense", "conv1d", "nf4", "int8"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("matrix_llama")
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return str(path)


def _model(base, llama_dir):
    """``(fresh model, targets, peft kwargs)`` for a base kind."""
    if base == "conv1d":
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(cfg), ["c_attn", "c_fc"], {"fan_in_fan_out": True}
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    kw = {}
    if base in ("nf4", "int8"):
        pytest.importorskip("bitsandbytes")
        q = (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                  bnb_4bit_compute_dtype=torch.float32) if base == "nf4"
             else dict(load_in_8bit=True))
        kw = dict(quantization_config=BitsAndBytesConfig(**q), device_map="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, **kw)
    return m, ["q_proj", "v_proj", "down_proj"], {}


def _doors(base, llama_dir):
    model_a, targets, extra = _model(base, llama_dir)
    a = rf.apply_rora(model_a, rf.RoraConfig(
        r=R, alpha=ALPHA, weight_dropout=P, lora_dropout=LORA_P, ortho_rank=K,
        ortho_lambda=LAM, target_modules=targets, modules_to_save=[]))
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=LORA_P, target_modules=targets,
                          **extra)
    rf.register_rora(cfg, weight_dropout=P, ortho_rank=K, ortho_lambda=LAM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = peft.get_peft_model(_model(base, llama_dir)[0], cfg)
    # the same adapter factors in both (each door initialises with its own draws)
    g = torch.Generator().manual_seed(7)
    pairs = []
    for name, la in rf.rora_layers(a):
        lb = b.base_model.model.get_submodule(name)
        with torch.no_grad():
            la.lora_A.copy_(torch.randn(la.lora_A.shape, generator=g) * 0.2)
            la.lora_B.copy_(torch.randn(la.lora_B.shape, generator=g) * 0.2)
            lb.lora_A["default"].weight.copy_(la.lora_A)
            lb.lora_B["default"].weight.copy_(la.lora_B)
        pairs.append((name, la, lb))
    assert len(pairs) == 2 * len(targets) and len(pairs) == len(list(rf.model.peft_lora_layers(b)))
    return a, b, pairs


def _factor_grads(pairs):
    return [(la.lora_A.grad, lb.lora_A["default"].weight.grad,
             la.lora_B.grad, lb.lora_B["default"].weight.grad) for _, la, lb in pairs]


@pytest.mark.parametrize("base", BASES)
def test_apply_rora_and_the_peft_door_agree(base, llama_dir):
    a, b, pairs = _doors(base, llama_dir)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    tol = dict(rtol=1e-5, atol=1e-5) if base in ("dense", "conv1d") else dict(rtol=1e-4,
                                                                              atol=1e-4)
    a.train()
    b.train()
    # the training forward: same seed, same masks; two seeds differ (masks are drawn)
    outs = []
    for m in (a, b):
        torch.manual_seed(11)
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].logits, outs[1].logits, **tol)
    torch.manual_seed(12)
    with torch.no_grad():
        assert not torch.allclose(a(input_ids=ids).logits, outs[0].logits, atol=1e-6)
    for ga, gb, gBa, gBb in _factor_grads(pairs):
        torch.testing.assert_close(ga, gb, **tol)
        torch.testing.assert_close(gBa, gBb, **tol)
    # the penalty and its gradient (added by the optimizer-step hook; here explicitly)
    torch.testing.assert_close(rf.rora_penalty(a), rf.rora_penalty(b), rtol=1e-5, atol=1e-6)
    assert float(rf.rora_penalty(a)) > 0
    for m in (a, b):
        m.zero_grad(set_to_none=True)
        rf.add_penalty_grads(m)
    for ga, gb, gBa, gBb in _factor_grads(pairs):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gBa, gBb, rtol=1e-5, atol=1e-6)
    # the rescale: the same factors on the same layers
    sa = rf.spectral_rescale_(a, layers=1)
    sb = rf.spectral_rescale_peft_(b, layers=1)
    assert sorted(sa) == sorted(n.replace("base_model.model.", "", 1) for n in sb)
    for n, s in sa.items():
        assert sb["base_model.model." + n] == pytest.approx(s, rel=1e-4), n
    # eval: the same model. PEFT's eval forward of a quantized base is bitsandbytes' own
    # kernel, rora_fast's multiplies by the dequantized weight: they may differ by what the
    # two differ on the base alone (measured here on the un-adapted model, B = 0)
    a.eval()
    b.eval()
    with torch.no_grad():
        za, zb = a(input_ids=ids).logits, b(input_ids=ids).logits
        if base in ("nf4", "int8"):
            plain = _model(base, llama_dir)[0].eval()
            zero = rf.apply_rora(_model(base, llama_dir)[0], rf.RoraConfig(
                r=R, alpha=ALPHA, ortho_rank=K, target_modules=_model(base, llama_dir)[1],
                modules_to_save=[])).eval()
            d_base = float((plain(input_ids=ids).logits - zero(input_ids=ids).logits).abs().max())
            assert float((za - zb).abs().max()) <= 3 * d_base + 1e-5
        else:
            torch.testing.assert_close(za, zb, **tol)
    if base not in ("nf4", "int8"):  # (a quantized merge requantizes: tested in test_quantized)
        merged_a = rf.merge_rora(a)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged_b = b.merge_and_unload()
        with torch.no_grad():
            torch.testing.assert_close(merged_a(input_ids=ids).logits,
                                       merged_b(input_ids=ids).logits, **tol)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("variant", [{"use_dora": True}, {"init_lora_weights": "pissa"},
                                     {"init_lora_weights": "olora"}])
def test_the_peft_door_refuses_variants_when_the_model_is_built(base, variant, llama_dir):
    model, targets, extra = _model(base, llama_dir)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, **extra, **variant)
    rf.register_rora(cfg, weight_dropout=P, ortho_rank=K, ortho_lambda=LAM)
    types = [type(m) for m in model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"register_rora: .*: RoRA through PEFT supports "
                                             r"vanilla LoRA adapters only, not "):
            peft.get_peft_model(model, cfg)
    # refused at the first target: no layer of the model was replaced
    assert [type(m) for m in model.modules()] == types
