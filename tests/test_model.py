"""Model-level API: apply_rora targets and freezing, spectral_rescale_, merge_rora,
save_rora/load_rora and export_peft_adapter (loaded by unmodified PEFT)."""

import copy
import json

import pytest
import torch
from torch import nn

import rora_fast
from rora_fast import (RoraConfig, RoraLinear, apply_rora, export_peft_adapter, load_rora,
                       merge_rora, rora_layers, save_rora, spectral_rescale_)


def tiny_llama(n_layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def cfg(**kw):
    kw.setdefault("r", 4)
    kw.setdefault("alpha", 8)
    kw.setdefault("ortho_rank", 4)
    return RoraConfig(**kw)


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, lay in rora_layers(model):
            lay.lora_A.copy_(torch.randn(lay.lora_A.shape, generator=g) * 0.3)
            lay.lora_B.copy_(torch.randn(lay.lora_B.shape, generator=g) * 0.3)


def resign(folder, changes):
    """Replace tensors of a save_rora folder and write fresh, valid checksums (what a
    deliberate edit looks like, unlike corruption)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from rora_fast.persistence import WEIGHTS_NAME, tensor_checksum

    f = folder / WEIGHTS_NAME
    with safe_open(str(f), framework="pt") as h:
        meta = dict(h.metadata())
        t = {k: h.get_tensor(k) for k in h.keys()}
    t.update(changes)
    meta["checksums"] = json.dumps({k: tensor_checksum(v) for k, v in t.items()})
    save_file(t, str(f), metadata=meta)


IDS = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(5))


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------- apply
def test_default_targets_llama_and_freezing():
    m = apply_rora(tiny_llama(2), cfg())
    names = [n for n, _ in rora_layers(m)]
    assert sorted(names) == sorted(f"model.layers.{i}.self_attn.{p}"
                                   for i in range(2) for p in ("q_proj", "v_proj"))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in names for k in ("lora_A", "lora_B")}
    assert m.rora_config.r == 4


def test_default_targets_bert(minilm_path):
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3)
    apply_rora(m, cfg(r=2, ortho_rank=2))
    names = [n for n, _ in rora_layers(m)]
    assert len(names) == 12 and {n.rsplit(".", 1)[1] for n in names} == {"query", "value"}
    assert m.classifier.weight.requires_grad and m.classifier.bias.requires_grad
    assert not m.bert.pooler.dense.weight.requires_grad
    assert not isinstance(m.classifier, RoraLinear)


def test_all_linear_list_and_regex_targets():
    m = apply_rora(tiny_llama(2), cfg(target_modules="all-linear"))
    names = {n for n, _ in rora_layers(m)}
    assert len(names) == 14 and "lm_head" not in names
    m = apply_rora(tiny_llama(2), cfg(target_modules=["o_proj", "down_proj"]))
    assert {n.rsplit(".", 1)[1] for n, _ in rora_layers(m)} == {"o_proj", "down_proj"}
    m = apply_rora(tiny_llama(2), cfg(target_modules=r".*\.1\.mlp\.up_proj"))
    assert [n for n, _ in rora_layers(m)] == ["model.layers.1.mlp.up_proj"]


def test_autocast_adapter_dtype_false_keeps_bf16_adapters_without_casts(tmp_path):
    """As PEFT's get_peft_model(autocast_adapter_dtype=...): by default a bf16 base gets
    float32 adapters (cast per call); False stores them in bf16, so a training forward
    casts nothing; a save of either loads into the other (cast to the model's dtypes)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_to_copy":
                Casts.n += 1
            return func(*args, **(kwargs or {}))

    counts, models = {}, {}
    for auto in (True, False):
        m = apply_rora(tiny_llama(2).to(torch.bfloat16), cfg(), autocast_adapter_dtype=auto)
        lay = m.get_submodule("model.layers.0.self_attn.q_proj")
        want = torch.float32 if auto else torch.bfloat16
        assert lay.lora_A.dtype == lay.lora_B.dtype == lay.ortho_U.dtype == want
        m.train()
        Casts.n = 0
        with Casts():
            m(input_ids=IDS).logits.float().square().mean().backward()
        counts[auto] = Casts.n
        assert lay.lora_A.grad is not None and lay.lora_A.grad.dtype == want
        models[auto] = m
    # 4 adapted layers, each casting A and B forward and their grads back
    assert counts[True] - counts[False] >= 4 * 4, counts
    randomize_adapters(models[False])
    save_rora(models[False], tmp_path / "bf16")
    load_rora(models[True], tmp_path / "bf16")
    for (_, a), (_, b) in zip(rora_layers(models[False]), rora_layers(models[True])):
        assert torch.equal(a.lora_A.float(), b.lora_A)
    with pytest.raises(TypeError, match="autocast_adapter_dtype must be a bool"):
        apply_rora(tiny_llama(1), cfg(), autocast_adapter_dtype="no")


def test_apply_twice_refused():
    m = apply_rora(tiny_llama(2), cfg())
    with pytest.raises(ValueError, match="already has RoRA layers"):
        apply_rora(m, cfg())


def test_apply_keeps_outputs_at_init():
    base = tiny_llama(2)
    before = logits(base)
    m = apply_rora(base, cfg(target_modules="all-linear"))
    torch.testing.assert_close(logits(m), before, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- rescale
def test_rescale_last_n_blocks_exact_scaling():
    m = apply_rora(tiny_llama(4), cfg())
    randomize_adapters(m)
    out = spectral_rescale_(m, layers=2)
    assert sorted(out) == sorted(f"model.layers.{i}.self_attn.{p}"
                                 for i in (2, 3) for p in ("q_proj", "v_proj"))
    for n, lay in rora_layers(m):
        if n in out:
            want = torch.linalg.svdvals(lay.weight.double())[0] / torch.linalg.svdvals(
                lay.lora_B.double() @ lay.lora_A.double())[0]
            assert out[n] == pytest.approx(want.item(), rel=1e-6)
            assert lay.scaling == out[n] and lay.rescaled
        else:
            assert lay.scaling == 8 / 4 and not lay.rescaled


def test_rescale_default_uses_config_and_explicit_list():
    m = apply_rora(tiny_llama(4), cfg(rescale_layers=1))
    randomize_adapters(m)
    assert sorted(spectral_rescale_(m)) == ["model.layers.3.self_attn.q_proj",
                                            "model.layers.3.self_attn.v_proj"]
    pick = ["model.layers.0.self_attn.v_proj"]
    assert list(spectral_rescale_(m, layers=pick)) == pick
    with pytest.raises(ValueError, match="not RoRA layers"):
        spectral_rescale_(m, layers=["model.layers.0.mlp.up_proj"])


def test_rescale_zero_adapter_names_layer():
    m = apply_rora(tiny_llama(2), cfg())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj.*zero"):
        spectral_rescale_(m, layers=1)
    lay = m.model.layers[1].self_attn.q_proj
    assert lay.scaling == 2.0 and torch.isfinite(torch.tensor(lay.scaling))


# ----------------------------------------------------------------------------- merge
@pytest.mark.parametrize("rescale", [False, True])
def test_merge_outputs_identical_and_plain_linear(rescale):
    m = apply_rora(tiny_llama(2), cfg(target_modules="all-linear"))
    randomize_adapters(m)
    if rescale:
        spectral_rescale_(m, layers=1)
    before = logits(m)
    merge_rora(m)
    assert not list(rora_layers(m))
    for n, mod in m.named_modules():
        if n.endswith(("_proj",)):
            assert type(mod) is nn.Linear, n
            assert mod.weight.device.type == "cpu"
    after = logits(m)
    # fp32, 1e-5 relative to the outputs' scale (elementwise relative error is meaningless
    # on logits that are ~0: two fp32 evaluation orders differ by a few ulps of the sums)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    assert not hasattr(m, "rora_config")


@pytest.mark.parametrize("kw", [dict(init="pissa"), dict(init="olora"), dict(use_dora=True),
                                dict(init="pissa", use_dora=True)])
def test_variants_merge_and_save_load(tmp_path, kw):
    base = tiny_llama(2)
    fresh = copy.deepcopy(base)
    m = apply_rora(base, cfg(target_modules="all-linear", **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, lay in rora_layers(m):
            lay.lora_A.add_(0.1 * torch.randn(lay.lora_A.shape, generator=g))
            lay.lora_B.add_(0.1 * torch.randn(lay.lora_B.shape, generator=g))
    spectral_rescale_(m, layers=1)
    want = logits(m)
    save_rora(m, tmp_path)
    load_rora(fresh, tmp_path)
    assert torch.equal(logits(fresh), want)
    merge_rora(m)
    assert all(type(mod) is nn.Linear for n, mod in m.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(logits(m), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- save/load
def test_save_load_roundtrip_fresh_and_wrapped(tmp_path):
    base = tiny_llama(2)
    fresh, wrapped = copy.deepcopy(base), copy.deepcopy(base)
    m = apply_rora(base, cfg(weight_dropout=0.2))
    randomize_adapters(m)
    spectral_rescale_(m, layers=1)
    want = logits(m)
    save_rora(m, tmp_path / "ad")
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == ["rora_adapter.safetensors", "rora_config.json"]
    raw = (tmp_path / "ad" / "rora_adapter.safetensors").read_bytes()
    assert not raw.startswith(b"PK") and not raw.startswith(b"\x80")  # no zip/pickle
    from safetensors.torch import load_file
    load_file(str(tmp_path / "ad" / "rora_adapter.safetensors"))
    json.loads((tmp_path / "ad" / "rora_config.json").read_text())

    load_rora(fresh, tmp_path / "ad")
    apply_rora(wrapped, cfg(weight_dropout=0.2))
    load_rora(wrapped, tmp_path / "ad")
    for other in (fresh, wrapped):
        lays = dict(rora_layers(other))
        for n, lay in rora_layers(m):
            assert torch.equal(lays[n].lora_A, lay.lora_A)
            assert torch.equal(lays[n].lora_B, lay.lora_B)
            assert lays[n].scaling == lay.scaling and lays[n].rescaled == lay.rescaled
        assert torch.equal(logits(other), want)


def test_old_config_with_backward_penalty_mode_loads(tmp_path):
    """Adapters saved when the default penalty_mode was called "backward" (the mechanism
    now named "optimizer") still load, as "optimizer", without a warning (a file format
    migration); the name itself is no longer accepted from code."""
    import warnings

    base = tiny_llama(2)
    fresh = copy.deepcopy(base)
    m = apply_rora(base, cfg())
    randomize_adapters(m)
    m.rora_config.penalty_mode = "backward"  # what an old version wrote
    save_rora(m, tmp_path / "ad")
    doc = json.loads((tmp_path / "ad" / "rora_config.json").read_text())
    assert doc["config"]["penalty_mode"] == "backward"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_rora(fresh, tmp_path / "ad")
    assert not [w for w in caught if "backward" in str(w.message)]
    with pytest.raises(ValueError, match="penalty_mode"):
        rora_fast.RoraConfig(penalty_mode="backward")
    assert fresh.rora_config.penalty_mode == "optimizer"
    assert all(lay.penalty_mode == "optimizer" for _, lay in rora_layers(fresh))
    assert torch.equal(logits(fresh), logits(m))


def test_save_load_includes_classifier(tmp_path, minilm_path):
    from transformers import AutoModelForSequenceClassification

    def make():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)

    m = apply_rora(make(), cfg(r=2, ortho_rank=2))
    randomize_adapters(m)
    with torch.no_grad():
        m.classifier.weight.normal_()
    save_rora(m, tmp_path)
    other = make()
    load_rora(other, tmp_path)
    assert torch.equal(other.classifier.weight, m.classifier.weight)
    ids = torch.randint(0, 1000, (2, 9))
    m.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, other(input_ids=ids).logits)


def test_load_refuses_mismatches(tmp_path):
    m = apply_rora(tiny_llama(2), cfg())
    save_rora(m, tmp_path / "a")
    # config field differs
    other = apply_rora(tiny_llama(2), cfg(r=2))
    with pytest.raises(ValueError, match=r"config mismatch in r\b"):
        load_rora(other, tmp_path / "a")
    other = apply_rora(tiny_llama(2), cfg(ortho_lambda=1.0))
    with pytest.raises(ValueError, match="ortho_lambda"):
        load_rora(other, tmp_path / "a")
    # layer names differ (a deeper model)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn"):
        load_rora(tiny_llama(3), tmp_path / "a")
    # shapes differ: same names, different hidden size
    from transformers import LlamaConfig, LlamaForCausalLM
    wide = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"model\.layers\.\d\.self_attn\.[qv]_proj"):
        load_rora(wide, tmp_path / "a")
    # a tensor of the wrong shape in the file names the module and tensor (the file is
    # re-signed, so that the shape check and not the checksum check catches it)
    resign(tmp_path / "a", {"rora.model.layers.1.self_attn.v_proj.lora_A": torch.zeros(3, 32)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj\.lora_A"):
        load_rora(tiny_llama(2), tmp_path / "a")
    # rewritten without rora-fast's checksums: refused as unverifiable
    from safetensors.torch import load_file, save_file
    f = tmp_path / "a" / "rora_adapter.safetensors"
    save_file(load_file(str(f)), str(f))
    with pytest.raises(ValueError, match="no rora-fast checksums"):
        load_rora(tiny_llama(2), tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        load_rora(tiny_llama(2), tmp_path / "missing")


def test_save_requires_rora(tmp_path):
    with pytest.raises(ValueError, match="no RoRA layers"):
        save_rora(tiny_llama(1), tmp_path)


# ----------------------------------------------------------------------------- export
def _peft_logits(base, directory, ids=IDS):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(base, str(directory))
    pm.eval()
    with torch.no_grad():
        return pm(input_ids=ids).logits


@pytest.mark.parametrize("variant", ["default", "rescaled", "pissa", "olora", "dora",
                                     "dora_rescaled", "lora_dropout"])
def test_export_peft_adapter_same_outputs(tmp_path, variant):
    base = tiny_llama(2)
    clean = copy.deepcopy(base)  # PiSSA/OLoRA rewrite the base weights in place
    kw = {}
    if variant in ("pissa", "olora"):
        kw["init"] = variant
    if variant.startswith("dora"):
        kw["use_dora"] = True
    if variant == "lora_dropout":
        kw["lora_dropout"] = 0.3
    m = apply_rora(base, cfg(target_modules="all-linear", **kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, lay in rora_layers(m):
            lay.lora_A.add_(0.2 * torch.randn(lay.lora_A.shape, generator=g))
            lay.lora_B.add_(0.2 * torch.randn(lay.lora_B.shape, generator=g))
            if lay.lora_magnitude is not None:
                lay.lora_magnitude.mul_(1 + 0.1 * torch.randn(lay.lora_magnitude.shape,
                                                              generator=g))
    if variant in ("rescaled", "dora_rescaled", "pissa"):
        spectral_rescale_(m, layers=1)
    want = logits(m)
    export_peft_adapter(m, tmp_path)
    assert (tmp_path / "adapter_config.json").exists()
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    got = _peft_logits(clean, tmp_path)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_export_peft_adapter_classifier(tmp_path, minilm_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    def make():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)

    m = apply_rora(make(), cfg(r=2, ortho_rank=2))
    randomize_adapters(m)
    with torch.no_grad():
        m.classifier.weight.normal_()
        m.classifier.bias.normal_()
    spectral_rescale_(m, layers=2)
    ids = torch.randint(0, 1000, (2, 9))
    m.eval()
    with torch.no_grad():
        want = m(input_ids=ids).logits
    export_peft_adapter(m, tmp_path)
    pm = PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    with torch.no_grad():
        got = pm(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_default_targets_match_peft_and_dense_apply_does_not_import_bitsandbytes():
    """rora_fast's copy of PEFT's default-target table equals the installed peft's on
    every architecture both know, and apply_rora on a dense model with those defaults
    imports neither peft nor bitsandbytes (peft's import pulls bitsandbytes in)."""
    import subprocess
    import sys
    import textwrap

    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M

    from rora_fast.targets import DEFAULT_TARGET_MODULES as D

    common = set(D) & set(M)
    assert len(common) >= 30 and {"bert", "roberta", "llama"} <= common
    for k in common:
        assert D[k] == M[k], k
    code = textwrap.dedent("""
        import sys, torch, rora_fast
        from transformers import BertConfig, BertForSequenceClassification
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)
        m = rora_fast.apply_rora(BertForSequenceClassification(cfg),
                                 rora_fast.RoraConfig(r=2, ortho_rank=2))
        print(len(dict(rora_fast.rora_layers(m))),
              sorted(n for n in ("peft", "bitsandbytes") if n in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "4 []"
    assert "kernels-community" not in out.stderr
