"""RoRA over bitsandbytes 4-bit (NF4/FP4, double quantization on/off) and 8-bit bases, on
the CPU (issue 13): layer equal to a dense RoRA layer on the dequantized weight, base kept
quantized, bases/σ_max from the dequantized W_pre, tiny quantized LLaMA trained through
apply_rora and register_rora, save/load/export/merge, memory model rows."""

import sys
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

import rora_fast  # noqa: E402
from rora_fast import conv1d as C  # noqa: E402
from rora_fast import bases as B  # noqa: E402
from rora_fast import quantized as Q  # noqa: E402
from rora_fast import targets as T  # noqa: E402
from rora_fast.linalg import weight_fingerprint  # noqa: E402
from rora_fast.peft_integration import peft_rora_layers  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

QUANTS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "int8": dict(load_in_8bit=True),
}


def _quant_layer(kind: str, out_f=48, in_f=64, bias=True, seed=0) -> nn.Module:
    """A bitsandbytes layer quantized on the CPU from a random fp32 weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    b = torch.randn(out_f, generator=g) * 0.1 if bias else None
    if kind == "int8":
        lin = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False)
        lin.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        qt = kind.split("-")[0]
        lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32,
                                quant_type=qt, compress_statistics=kind.endswith("-dq"))
        lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=qt,
                                       compress_statistics=kind.endswith("-dq"), blocksize=64)
    if bias:
        lin.bias = nn.Parameter(b, requires_grad=False)
    return lin.to("cpu")


def _dense_twin(qlayer: Q.QuantRoraLinear, **kw) -> rora_fast.RoraLinear:
    """A dense RoraLinear on the dequantized weight with the same adapters."""
    W = Q.dequantize_base(qlayer.base_layer, torch.float32)
    lin = nn.Linear(W.shape[1], W.shape[0], bias=qlayer.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(W)
        if qlayer.bias is not None:
            lin.bias.copy_(qlayer.bias)
    dense = rora_fast.RoraLinear.from_linear(lin, **kw)
    with torch.no_grad():
        dense.lora_A.copy_(qlayer.lora_A)
        dense.lora_B.copy_(qlayer.lora_B)
    return dense


# ---------------------------------------------------------------------- layer level
@pytest.mark.parametrize("kind", list(QUANTS))
def test_layer_equals_dense_rora_on_dequantized_weight(kind):
    kw = dict(r=4, alpha=8, weight_dropout=0.1, ortho_rank=8, ortho_lambda=10.0)
    base = _quant_layer(kind)
    layer = Q.QuantRoraLinear.from_quantized(base, **kw)
    assert layer.base_layer is base and layer.weight is base.weight  # kept, not copied
    assert layer.weight.dtype in (torch.uint8, torch.int8)
    with torch.no_grad():
        layer.lora_B.normal_()  # a nonzero update, so every gradient path is exercised
    dense = _dense_twin(layer, **kw)
    # σ_pre and the bases are those of the dequantized W_pre
    W = Q.dequantize_base(base, torch.float32)
    sig = float(torch.linalg.matrix_norm(W, ord=2))
    assert abs(layer.sigma_pre - sig) <= 1e-3 * max(1.0, sig)
    torch.testing.assert_close(layer.ortho_U.abs(), dense.ortho_U.abs())
    # training: the same mask function as the dense path (same seed -> same output/grads)
    x = torch.randn(3, 5, 64)
    outs = []
    for m in (layer, dense):
        m.train()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(123)
        y = m(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, m.lora_A.grad.clone(), m.lora_B.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # weight dropout is active: another seed gives another output; p=0 would not
    torch.manual_seed(124)
    with torch.no_grad():
        assert not torch.allclose(layer(x), outs[0][0])
    # eval: x Wᵀ + b on the dequantized W plus the adapter, deterministic; bitsandbytes'
    # weight is left as it was (its own CPU eval forward would repack it, and assert on
    # out_features = 48, not a multiple of 32)
    qs = getattr(base.weight, "quant_state", None)
    before = (base.weight.data.clone(), set(vars(qs)) if qs is not None else None)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
        expect = (nn.functional.linear(x, W, base.bias)
                  + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t())
    torch.testing.assert_close(y_eval, expect)
    assert torch.equal(base.weight.data, before[0])
    assert (set(vars(qs)) if qs is not None else None) == before[1]


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_no_dense_weight_kept_backward_dequantizes_again(kind, monkeypatch):
    layer = Q.QuantRoraLinear.from_quantized(_quant_layer(kind), r=4, ortho_rank=8)
    calls = []
    real = B.dense_weight

    def counting(base, dtype=None):
        calls.append(dtype)
        return real(base, dtype)

    monkeypatch.setattr(B, "dense_weight", counting)  # the one dequantization
    layer.train()
    x = torch.randn(4, 64, requires_grad=True)
    y = layer(x)
    assert len(calls) == 1  # forward: one dequantization
    y.sum().backward()
    assert len(calls) == 2  # backward: dequantized again (the dense W was not saved)
    assert x.grad is not None and layer.lora_A.grad is not None
    # between calls the layer holds no dense (out, in) floating tensor
    for t in list(layer.parameters()) + list(layer.buffers()):
        assert not (t.is_floating_point() and tuple(t.shape) == (48, 64))
    assert layer.__dict__.get("_rora_dense") is None


def test_gradient_checkpointing_replays_the_mask():
    from torch.utils.checkpoint import checkpoint

    layer = Q.QuantRoraLinear.from_quantized(_quant_layer("nf4-dq"), r=4, ortho_rank=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.train()
    x = torch.randn(4, 64)
    grads = []
    for ckpt in (False, True):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = checkpoint(layer, xi, use_reentrant=False) if ckpt else layer(xi)
        y.square().sum().backward()
        grads.append((xi.grad, layer.lora_A.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_svd_cache_keyed_by_dequantized_weight(tmp_path):
    base = _quant_layer("nf4-dq")
    Q.QuantRoraLinear.from_quantized(base, r=4, ortho_rank=8, svd_cache=str(tmp_path))
    key = weight_fingerprint(Q.dequantize_base(base, torch.float32))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"{key}-k8-exact.safetensors"]
    # the same quantized layer hits the entry; another quantization of it does not
    Q.QuantRoraLinear.from_quantized(base, r=4, ortho_rank=8, svd_cache=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 1
    Q.QuantRoraLinear.from_quantized(_quant_layer("fp4-dq"), r=4, ortho_rank=8,
                                     svd_cache=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_rescale_and_merge_requantizes_with_warning(kind):
    layer = Q.QuantRoraLinear.from_quantized(_quant_layer(kind), r=4, ortho_rank=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    s = layer.spectral_rescale_()
    sd = float(torch.linalg.matrix_norm((layer.lora_B @ layer.lora_A).double(), ord=2))
    assert s == pytest.approx(layer.sigma_pre / sd, rel=1e-5)
    layer.eval()
    x = torch.randn(6, 64)
    with torch.no_grad():
        y = layer(x)
        target = Q.dequantize_base(layer.base_layer, torch.float32) \
            + layer.scaling * layer.lora_B @ layer.lora_A
    with pytest.warns(UserWarning, match="rounding"):
        merged = layer.merged_linear()
    assert type(merged).__name__ in ("Linear4bit", "Linear8bitLt")
    assert merged.weight.dtype in (torch.uint8, torch.int8)
    Wm = Q.dequantize_base(merged, torch.float32)
    # requantized: the merged weight is the quantization of W + s·BA (rounding only)
    step = 0.2 if kind.startswith("nf4") else 0.02
    assert (Wm - target).abs().max() <= step * target.abs().max()
    with torch.no_grad():  # (on the dequantized weight: bitsandbytes' CPU forward asserts
        # out_features % 32 == 0, here 48)
        ym = nn.functional.linear(x, Wm, merged.bias)
        assert (ym - y).abs().max() <= step * y.abs().max()


@pytest.mark.parametrize("kw,match", [(dict(init="pissa"), "pissa"), (dict(init="olora"), "olora"),
                                      (dict(use_dora=True), "DoRA")])
def test_unsupported_variants_refused_clearly(kw, match):
    with pytest.raises(NotImplementedError, match=match):
        Q.QuantRoraLinear.from_quantized(_quant_layer("nf4-dq"), r=4, ortho_rank=8, **kw)


def test_without_bitsandbytes_the_error_says_how_to_install(monkeypatch):
    layer = _quant_layer("nf4-dq")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now fails
    with pytest.raises(ImportError, match=r"pip install 'rora-fast\[quant\]'"):
        T.make_rora_layer(layer, "q_proj", r=4, ortho_rank=8)
    # an nn.Linear holding quantized bytes (no bitsandbytes class) is refused clearly too
    lin = nn.Linear(8, 8)
    lin.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(TypeError, match=r"rora-fast\[quant\]"):
        T.make_rora_layer(lin, "x", r=2, ortho_rank=2)


# ---------------------------------------------------------------------- a tiny LLaMA
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return str(path)


def _load(path, quant, dtype=torch.float32):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    kw = dict(QUANTS[quant])
    if "load_in_4bit" in kw:
        kw["bnb_4bit_compute_dtype"] = dtype
    return LlamaForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**kw),
                                            device_map="cpu", dtype=dtype)


def _state_bytes(model) -> int:
    """Parameters + buffers + bitsandbytes quant-state tensors (absmax blocks, code books:
    not parameters, but memory the quantized model holds), each tensor counted once."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            for x in (qs.absmax, qs.code, qs.offset, getattr(qs.state2, "absmax", None),
                      getattr(qs.state2, "code", None)):
                add(x)
        scb = getattr(t, "SCB", None)  # Linear8bitLt's fp32 row scales
        if isinstance(scb, torch.Tensor):
            add(scb)
    return total


TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}


@pytest.mark.parametrize("quant,targets", [("nf4-dq", "qv"), ("nf4-dq", "all"),
                                           ("int8", "qv"), ("int8", "all")])
def test_tiny_llama_trains_saves_loads_exports(tiny_llama, tmp_path, quant, targets):
    cfg = rora_fast.RoraConfig(r=4, alpha=8, ortho_rank=8, target_modules=TARGETS[targets])
    model = rora_fast.apply_rora(_load(tiny_llama, quant), cfg)
    layers = dict(rora_fast.rora_layers(model))
    assert layers and all(isinstance(m, Q.QuantRoraLinear) for m in layers.values())
    assert len(layers) == 4 * (2 if targets == "qv" else 7)
    for m in layers.values():  # σ_pre of the dequantized weight
        sig = float(torch.linalg.matrix_norm(Q.dequantize_base(m.base_layer, torch.float32),
                                             ord=2))
        assert abs(m.sigma_pre - sig) <= 1e-3 * max(1.0, sig)

    # state bytes: at most PEFT QLoRA's plus the SVD bases
    qlora = peft.get_peft_model(_load(tiny_llama, quant), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[targets] if targets == "qv" else "all-linear"))
    bases = sum(m.ortho_U.numel() * 4 + m.ortho_V.numel() * 4 for m in layers.values())
    assert _state_bytes(model) <= _state_bytes(qlora) + bases

    # training: the loss falls, the penalty is logged
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 16), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses, penalties = [], []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        penalties.append(float(rora_fast.rora_penalty(model)))
    assert losses[-1] < losses[0] - 0.05
    assert all(p > 0 for p in penalties)
    with torch.no_grad():  # weight dropout active in training, not in eval
        torch.manual_seed(1)
        a = model(input_ids=ids).logits
        torch.manual_seed(2)
        b = model(input_ids=ids).logits
        assert not torch.allclose(a, b)
        model.eval()
        ref_logits = model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, ref_logits)

    # save -> load onto a model quantized the same way: the same logits
    rora_fast.save_rora(model, tmp_path / "rora")
    again = rora_fast.load_rora(_load(tiny_llama, quant), tmp_path / "rora").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ref_logits, rtol=0, atol=1e-6)
    # ... onto another quantization: a clear error
    other = "fp4-dq" if quant == "int8" else "int8"
    with pytest.raises(ValueError, match="quantized the same way"):
        rora_fast.load_rora(_load(tiny_llama, other), tmp_path / "rora")

    # PEFT export -> PeftModel.from_pretrained over the same quantized model: the same
    # adapters, bit for bit; the logits differ only by bitsandbytes' own rounding (PEFT's
    # layer calls bitsandbytes' forward: bf16 activations of its CPU 4-bit kernel, int8
    # activations of LLM.int8; ours multiplies by the dequantized weight), bounded by what
    # that rounding does to the base model alone (a fresh RoRA model: B = 0)
    rora_fast.export_peft_adapter(model, tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(_load(tiny_llama, quant), str(tmp_path / "peft")).eval()
    peft_layers = {n: m for n, m in pm.named_modules() if hasattr(m, "lora_A")
                   and "default" in getattr(m, "lora_A", {})}
    assert len(peft_layers) == len(layers)
    for name, m in layers.items():
        pl = next(v for n, v in peft_layers.items() if n.endswith(name))
        delta = pl.scaling["default"] * pl.lora_B["default"].weight @ pl.lora_A["default"].weight
        torch.testing.assert_close(delta, m.scaling * m.lora_B @ m.lora_A, rtol=1e-6, atol=1e-7)
    exact_base = rora_fast.apply_rora(_load(tiny_llama, quant), cfg).eval()
    with torch.no_grad():
        with pm.disable_adapter():
            d_base = (pm(input_ids=ids).logits - exact_base(input_ids=ids).logits).abs().max()
        d_peft = (pm(input_ids=ids).logits - ref_logits).abs().max()
    assert d_peft <= 3 * d_base + 1e-5, (float(d_peft), float(d_base))

    if targets == "qv":  # merge: what PEFT's merge_and_unload gives (requantized), from a
        # PeftModel not yet evaluated (``pm`` was: bitsandbytes has repacked its 4-bit
        # weights for CPU inference, and PEFT's merge does not read that layout)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged_peft = peft.PeftModel.from_pretrained(
                _load(tiny_llama, quant), str(tmp_path / "peft")).merge_and_unload()
            for m, attr in Q.cpu_repack_switches(merged_peft):  # as apply_rora's model
                setattr(m, attr, False)
            rora_fast.merge_rora(model)
        assert not list(rora_fast.rora_layers(model))
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits,
                                       merged_peft(input_ids=ids).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("quant", ["nf4-dq", "int8"])
def test_register_rora_over_peft_bnb_layers(tiny_llama, quant, train_lm):
    """register_rora: PEFT's bnb LoRA layers, trained with RoRA. With p = 0 and λ = 0 the
    outputs and gradients are PEFT QLoRA's; with the defaults it trains and rescales."""
    ids = torch.randint(0, 128, (2, 12))
    results = []
    for rora in (False, True):
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                              init_lora_weights="gaussian")
        if rora:
            cls = rora_fast.register_rora(cfg, weight_dropout=0.0, ortho_rank=8,
                                          ortho_lambda=0.0)
            assert cls is not None
        torch.manual_seed(3)
        pm = peft.get_peft_model(_load(tiny_llama, quant), cfg).train()
        if rora:
            names = {type(m).__name__ for _, m in peft_rora_layers(pm)}
            assert names == {"PeftRoraLinear4bit" if quant != "int8" else "PeftRoraLinear8bitLt"}
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for k in results[0][1]:
        torch.testing.assert_close(results[0][1][k], results[1][1][k], rtol=1e-4, atol=1e-5)

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    rora_fast.register_rora(cfg, weight_dropout=0.1, ortho_rank=8, ortho_lambda=10.0)
    pm = peft.get_peft_model(_load(tiny_llama, quant), cfg).train()
    losses = train_lm(pm, ids)
    assert losses[-1] < losses[0]
    assert float(rora_fast.rora_penalty(pm)) > 0
    scales = rora_fast.spectral_rescale_peft_(pm, layers=2)
    assert len(scales) == 4 and all(s > 0 for s in scales.values())


# ---------------------------------------------------------------------- memory model
@pytest.mark.parametrize("quant,base_dtype", [("nf4-dq", "nf4"), ("int8", "int8")])
def test_memory_model_rows_match_quantized_tiny_llama(tiny_llama, quant, base_dtype):
    """plan-memory's static terms (base weights, adapters, SVD bases) equal the bytes a
    bf16 tiny LLaMA quantized by bitsandbytes really holds with RoRA on (q/v and
    all-linear), to the byte, except the rotary-embedding buffers it does not model."""
    from transformers import AutoConfig

    from rora_fast.memory import plan_memory

    shape_cfg = AutoConfig.from_pretrained(tiny_llama)
    for targets in (["q_proj", "v_proj"], "all-linear"):
        model = rora_fast.apply_rora(_load(tiny_llama, quant, dtype=torch.bfloat16),
                                     rora_fast.RoraConfig(r=4, ortho_rank=8,
                                                          target_modules=targets))
        rotary = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                     if "rotary" in n)
        actual = _state_bytes(model) - rotary
        plan = plan_memory(shape_cfg, batch=1, seq=16, base_dtype=base_dtype, r=4,
                           ortho_rank=8, target_modules=targets)
        adapters = plan.adapter_params * 4  # fp32 A and B (no gradients/moments yet)
        assert actual == plan.base_weights + adapters + plan.svd_bases, targets


def test_example_llama_qlora_tiny_writes_under_its_output_dir(tmp_path):
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(root / "examples" / "llama_qlora.py"), "--tiny",
                           "--max-steps", "3", "--n-train", "16"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "examples" / "llama_qlora"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["rora_layers"] == 8 and summary["rescaled"]
    assert summary["reload_max_abs_diff"]["load_rora"] <= 1e-5
    d = summary["reload_max_abs_diff"]  # PEFT: bitsandbytes' forward, see the test above
    assert d["peft_from_pretrained"] <= 3 * d["bnb_forward_on_base"] + 1e-5
    assert (out / "rora_adapter").is_dir() and (out / "peft_adapter").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


# ---------------------------------------------------------------------- the NF4 kernel
def _kernel_args(p4):
    qs = p4.quant_state
    kw = dict(packed=p4.data, code=qs.code, absmax=qs.absmax, blocksize=qs.blocksize,
              shape=tuple(qs.shape))
    if qs.nested:
        kw.update(nested_code=qs.state2.code, nested_absmax=qs.state2.absmax,
                  nested_blocksize=qs.state2.blocksize, offset=qs.offset)
    return kw


@pytest.mark.parametrize("kind,shape", [("nf4-dq", (48, 64)), ("nf4-dq", (37, 72)),
                                        ("nf4", (37, 72)), ("fp4-dq", (48, 64))])
def test_dequant_mask_kernel_matches_bnb_dequantize_and_reference_mask(kind, shape):
    """kernels/src/nf4.py in the Triton interpreter (CPU, float32) on tiny shapes: bit-equal
    to bitsandbytes' dequantize_4bit, and with p > 0 to reference.masked_weight of it."""
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from rora_fast import reference as ref
    from rora_fast.kernels.nf4 import dequantize_4bit_masked

    layer = _quant_layer(kind, out_f=shape[0], in_f=shape[1])
    W = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    kw = _kernel_args(layer.weight)
    out0 = dequantize_4bit_masked(**kw, out_dtype=torch.float32)
    assert torch.equal(out0, W)
    for seed, p in ((5, 0.1), (2**63 - 1, 0.3)):
        out = dequantize_4bit_masked(**kw, seed=seed, p=p, out_dtype=torch.float32,
                                     block_n=16, block_k=32)
        assert torch.equal(out, ref.masked_weight(W, seed, p))


@pytest.mark.parametrize("kind", ["nf4-dq", "fp4"])
def test_layer_with_the_nf4_kernel_equals_the_default_path(kind, monkeypatch):
    """RORA_FAST_NF4_KERNEL=1: the layer takes its masked weight from the one-pass kernel
    (Triton interpreter here) and gives the default path's outputs and gradients, bit for
    bit, backward included (the masked weight is rebuilt from the same seed)."""
    import os

    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    layer = Q.QuantRoraLinear.from_quantized(_quant_layer(kind), r=4, ortho_rank=8,
                                             weight_dropout=0.2).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    res = []
    for flag in ("0", "1"):
        monkeypatch.setenv("RORA_FAST_NF4_KERNEL", flag)
        kernel = layer._base.masked_weight_fn(layer.base_module, x, torch.float32)
        assert (kernel is not None) == (flag == "1")
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(21)
        y = layer(xi)
        y.square().sum().backward()
        res.append((y.detach(), xi.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
        assert layer.weight_dropout == 0.2
    for a, b in zip(*res):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_optimizer_step_adds_the_penalty_as_for_a_dense_layer(kind):
    """λ∇Ω reaches a quantized layer's adapters at the optimizer step exactly as for the
    dense RoRA layer on the dequantized weight (same update after one SGD step)."""
    kw = dict(r=4, alpha=8, weight_dropout=0.1, ortho_rank=8, ortho_lambda=10.0)
    layer = Q.QuantRoraLinear.from_quantized(_quant_layer(kind), **kw)
    with torch.no_grad():
        layer.lora_B.normal_()
    dense = _dense_twin(layer, **kw)
    no_penalty = _dense_twin(layer, **dict(kw, ortho_lambda=0.0))
    x = torch.randn(4, 64)
    for m in (layer, dense, no_penalty):
        opt = torch.optim.SGD([m.lora_A, m.lora_B], lr=0.1)
        torch.manual_seed(3)
        m.train()(x).sum().backward()
        opt.step()
    torch.testing.assert_close(layer.lora_A, dense.lora_A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B, dense.lora_B, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(layer.lora_B, no_penalty.lora_B)  # the penalty was applied
    assert float(layer.penalty()) > 0


def test_from_linear_dispatches_quantized_and_conv1d_bases():
    from transformers.pytorch_utils import Conv1D

    q = rora_fast.RoraLinear.from_linear(_quant_layer("nf4-dq"), r=4, ortho_rank=8)
    assert isinstance(q, Q.QuantRoraLinear) and q.quant_kind == "4bit"
    q8 = rora_fast.RoraLinear.from_linear(_quant_layer("int8"), r=4, ortho_rank=8)
    assert isinstance(q8, Q.QuantRoraLinear) and q8.quant_kind == "8bit"
    c = rora_fast.RoraLinear.from_linear(Conv1D(24, 16), r=2, ortho_rank=4)
    assert isinstance(c, C.RoraConv1D) and c.weight.shape == (24, 16)
    # one name for the kind of base, on every layer class
    lin = rora_fast.RoraLinear.from_linear(nn.Linear(16, 24), r=2, ortho_rank=4)
    assert [x.base_kind for x in (lin, c, q, q8)] == ["linear", "conv1d", "4bit", "8bit"]


def test_apply_rora_refusals_leave_the_model_unchanged(tiny_llama, monkeypatch):
    model = _load(tiny_llama, "nf4-dq")
    before = {n: type(m) for n, m in model.named_modules()}
    for cfg, exc, match in ((dict(init="pissa"), NotImplementedError, "pissa"),
                            (dict(use_dora=True), NotImplementedError, "DoRA")):
        with pytest.raises(exc, match=match):
            rora_fast.apply_rora(model, rora_fast.RoraConfig(r=4, ortho_rank=8, **cfg))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"pip install 'rora-fast\[quant\]'"):
        rora_fast.apply_rora(model, rora_fast.RoraConfig(r=4, ortho_rank=8))
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert not hasattr(model, "rora_config")


def test_autocast_adapter_dtype_false_on_quantized_bases(tiny_llama):
    """A 4-bit base computes in its bitsandbytes compute dtype: the adapters take it. An
    8-bit base has none (it computes in its input's dtype): a clear error, model unchanged."""
    m = _load(tiny_llama, "nf4-dq", torch.bfloat16)
    rora_fast.apply_rora(m, rora_fast.RoraConfig(r=4, ortho_rank=4, target_modules=["q_proj"]),
                         autocast_adapter_dtype=False)
    lay = m.get_submodule("model.layers.0.self_attn.q_proj")
    assert lay.lora_A.dtype == lay.lora_B.dtype == torch.bfloat16
    m8 = _load(tiny_llama, "int8")
    before = [type(x) for x in m8.modules()]
    with pytest.raises(ValueError, match="q_proj.*autocast_adapter_dtype=False needs"):
        rora_fast.apply_rora(m8, rora_fast.RoraConfig(r=4, ortho_rank=4,
                                                      target_modules=["q_proj"]),
                             autocast_adapter_dtype=False)
    assert [type(x) for x in m8.modules()] == before


# ------------------------------------------ what bitsandbytes does to its weight at run time
# bitsandbytes >= 0.49 repacks a 4-bit weight into a CPU inference layout at its first
# no-grad eval forward (Linear4bit.forward -> _convert_weight_packed_for_cpu, on CPUs with
# AVX512-BF16): the weight's shape, the quant state's dtype and double quantization change.
def _bnb_repacks_on_this_cpu() -> bool:
    lin = _quant_layer("nf4", out_f=64)
    lin.eval()
    with torch.no_grad():
        lin(torch.randn(2, 64))
    return B._cpu_packed(lin.weight.quant_state)


@pytest.mark.parametrize("kind", ["nf4-dq", "nf4", "fp4-dq", "int8"])
def test_training_after_evaluation_is_exact(kind):
    """Eval does not touch bitsandbytes' weight: training-mode outputs and gradients after
    an eval forward equal those before it, bit for bit (p = 0 and p = 0.1, same seed)."""
    layer = Q.QuantRoraLinear.from_quantized(_quant_layer(kind, out_f=64), r=4, ortho_rank=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    x = torch.randn(3, 64)

    def train_step():
        layer.train()
        torch.manual_seed(7)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.square().sum().backward()
        g = (y.detach(), xi.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
        layer.lora_A.grad = layer.lora_B.grad = None
        return g

    before = train_step()
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    for a, b in zip(before, train_step()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["forced", "bitsandbytes"])
def test_weight_repacked_by_bitsandbytes_is_read_correctly(how):
    """A 4-bit layer bitsandbytes has already repacked (the model was evaluated before
    RoRA wrapped it): dequantize_base reads the CPU layout; the RoRA layer's output equals
    bitsandbytes' own on it (up to its bf16 activations) and the weight before the repack
    (up to the bf16 absmax the repack stores)."""
    # every CPU tests the repacked layout: where bitsandbytes' own eval forward does not
    # repack (no AVX512-BF16), the conversion it would call is called directly
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu
    native = how == "bitsandbytes"
    if native and not _bnb_repacks_on_this_cpu():
        pytest.skip("bitsandbytes' own forward repacks only on AVX512-BF16 CPUs; the "
                    "'forced' case tests the repacked layout here")
    for kind in ("nf4-dq", "nf4", "fp4-dq"):
        base = _quant_layer(kind, out_f=96, in_f=128, seed=3)
        W0 = Q.dequantize_base(base, torch.float32)
        desc0 = Q.quant_descriptor(base)
        base.eval()
        x = torch.randn(5, 128)
        if native:
            with torch.no_grad():
                y_bnb = base(x)
        else:
            base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu(
                base.weight.data, base.weight.quant_state)
            y_bnb = nn.functional.linear(x, W0, base.bias)
        assert B._cpu_packed(base.weight.quant_state)
        W1 = Q.dequantize_base(base, torch.float32)
        assert W1.shape == W0.shape
        assert (W1 - W0).abs().max() <= 2 ** -7 * W0.abs().max()  # bf16 absmax
        assert Q.quant_descriptor(base) == desc0  # the config's, not the rewritten state
        layer = Q.QuantRoraLinear.from_quantized(base, r=4, ortho_rank=8).eval()
        with torch.no_grad():
            y = layer(x)
        torch.testing.assert_close(y, nn.functional.linear(x, W1, base.bias))
        assert (y - y_bnb).abs().max() <= 2e-2 * y_bnb.abs().max()
        layer.train()
        layer(x).sum().backward()  # training on the repacked base works
        assert layer.lora_B.grad is not None


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_odd_shapes_eval_and_train(kind):
    """out_features not a multiple of 32 (bitsandbytes' CPU eval forward asserts there):
    the RoRA layer evaluates and trains, eval = training without dropout."""
    layer = Q.QuantRoraLinear.from_quantized(_quant_layer(kind, out_f=80, in_f=64), r=4,
                                             ortho_rank=8, weight_dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05)
    x = torch.randn(2, 7, 64)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    layer.train()
    y_train = layer(x)
    y_train.sum().backward()
    torch.testing.assert_close(y_eval, y_train.detach(), rtol=1e-6, atol=1e-6)
    assert y_eval.shape == (2, 7, 80) and layer.lora_A.grad is not None


def _tiny_llama_128(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path))
    return str(tmp_path)


@pytest.mark.parametrize("quant", ["nf4-dq", "int8"])
def test_tiny_llama_eval_between_training_and_save(tmp_path, quant):
    """The issue's case: a 4-bit LLaMA (hidden 128, q/v/o, p = 0): training logits before
    and after an eval forward are identical; save_rora after eval records the config's
    quantization and loads into a freshly quantized model (same logits)."""
    path = _tiny_llama_128(tmp_path / "base")
    cfg = rora_fast.RoraConfig(r=4, alpha=8, ortho_rank=8, weight_dropout=0.0,
                               target_modules=["q_proj", "v_proj", "o_proj"])
    model = rora_fast.apply_rora(_load(path, quant), cfg)
    for m in dict(rora_fast.rora_layers(model)).values():
        with torch.no_grad():
            m.lora_B.normal_(std=0.05)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.eval()
        ref = model(input_ids=ids).logits
        model.train()
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    rora_fast.save_rora(model, tmp_path / "rora")
    meta_q = [Q.quant_descriptor(m) for _, m in rora_fast.rora_layers(model)]
    assert all(d == meta_q[0] for d in meta_q) and "quant_dtype" not in meta_q[0]
    again = rora_fast.load_rora(_load(path, quant), tmp_path / "rora").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ref, rtol=0, atol=1e-6)


def test_saved_descriptor_with_quant_dtype_still_loads():
    """Adapters saved before the descriptor lost ``quant_dtype`` still load; a different
    BitsAndBytesConfig setting is still refused."""
    base = _quant_layer("nf4-dq")
    old = dict(Q.quant_descriptor(base), quant_dtype="float32")
    Q.check_quant_descriptor("q", base, old)
    with pytest.raises(ValueError, match="quantized the same way"):
        Q.check_quant_descriptor("q", base, dict(old, double_quant=False))
    with pytest.raises(ValueError, match="quantized the same way"):
        Q.check_quant_descriptor("q", base, None)
