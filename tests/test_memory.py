"""The memory model against what a real (small) model holds, on the CPU."""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rora_fast
from rora_fast.memory import (GiB, PRESETS, activation_bytes_per_token_block, fits_table,
                              llama_block_saved_bytes_per_token, main, max_batch, model_shape,
                              parse_size, plan_memory)
from tiny import tiny_llama_config  # examples/tiny.py


@pytest.mark.parametrize("name", ["llama-7b", "llama-3-8b", "llama-13b"])
def test_parameter_count_matches_transformers(name):
    h, f, L, a, kv, V, tied = PRESETS[name]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=L,
                      num_attention_heads=a, num_key_value_heads=kv, vocab_size=V,
                      tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert model_shape(name).n_params() == n
    assert model_shape(cfg).n_params() == n
    if name == "llama-7b":
        assert n == 6_738_415_616


def _small_cfg():
    return tiny_llama_config(hidden_size=128, intermediate_size=352, num_attention_heads=4,
                             num_key_value_heads=2, num_hidden_layers=2, vocab_size=300)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_static_bytes_exact(targets):
    """Base weights, adapters + grads + AdamW states and SVD bases, byte for byte."""
    cfg = _small_cfg()
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    rora_fast.apply_rora(model, rora_fast.RoraConfig(
        r=4, ortho_rank=8, target_modules=list(targets) if targets != "all-linear" else targets))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = torch.randint(0, 256, (2, 16))
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    train = [p for p in model.parameters() if p.requires_grad]
    adapters = sum(p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size()
                   for p in train)
    adapters += sum(t.numel() * t.element_size() for p in train
                    for k, t in opt.state[p].items() if k != "step")
    bases = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                if n.endswith(("ortho_U", "ortho_V")))
    plan = plan_memory(cfg, base_dtype="bf16", r=4, ortho_rank=8, target_modules=targets)
    assert plan.base_weights == frozen
    assert plan.adapters_and_optimizer == adapters
    assert plan.svd_bases == bases
    assert plan.adapter_params == sum(p.numel() for p in train)


def _llama(cfg):
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_block_activation_formula_matches_saved_tensors(targets, lora_dropout):
    """Per-token bytes autograd saves for one bf16 LLaMA block (SDPA) vs the formula;
    with LoRA input dropout too (x̃ is regenerated in backward, nothing more is kept)."""
    cfg = _small_cfg()
    model = _llama(cfg)
    rora_fast.apply_rora(model, rora_fast.RoraConfig(
        r=4, ortho_rank=8, lora_dropout=lora_dropout,
        target_modules=list(targets) if targets != "all-linear" else targets))
    measured = llama_block_saved_bytes_per_token(model)
    tm = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj") \
        if targets == "all-linear" else targets
    want = activation_bytes_per_token_block(model_shape(cfg), 2, tm)
    # the rest is per-block constants (RoPE cos/sin, bf16 copies of A and B)
    assert want <= measured <= want * 1.03, (measured, want)


def test_lora_dropout_keeps_less_than_peft():
    """q_proj and v_proj with LoRA dropout 0.1: PEFT LoRA keeps each layer's x̃ and
    torch's bool dropout mask for backward; RoRA keeps the shared input x once (it
    regenerates x̃ from the seed), so it saves at least 2·x̃ + 2 masks − x = 4 bytes per
    hidden unit per token less (more with PEFT's fp32 x̃)."""
    from peft import LoraConfig, get_peft_model

    cfg = _small_cfg()
    rora = _llama(cfg)
    rora_fast.apply_rora(rora, rora_fast.RoraConfig(
        r=4, ortho_rank=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    peft = get_peft_model(_llama(cfg), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1,
                                                  target_modules=["q_proj", "v_proj"]))
    saved_rora = llama_block_saved_bytes_per_token(rora)
    saved_peft = llama_block_saved_bytes_per_token(peft)
    assert saved_peft - saved_rora >= 4 * cfg.hidden_size, (saved_peft, saved_rora)


def test_plan_is_consistent():
    a = plan_memory("llama-7b", batch=1, seq=2048)
    b = plan_memory("llama-7b", batch=2, seq=2048)
    c = plan_memory("llama-7b", batch=1, seq=2048, checkpointing=False)
    assert b.peak > a.peak and c.activations > 4 * a.activations
    assert a.base_weights == pytest.approx(2 * 6_738_415_616)
    assert plan_memory("llama-7b", base_dtype="nf4").base_weights < a.base_weights / 3
    assert parse_size("24GB") == 24 * GiB and parse_size("512MiB") == 0.5 * GiB
    assert max_batch("llama-13b", 2048, parse_size("24GB")) == 0  # bf16 13B does not fit
    assert max_batch("llama-7b", 512, parse_size("24GB")) >= 1
    with pytest.raises(ValueError):
        plan_memory("llama-7b", target_modules=["nope"])


def test_cli_prints_table(capsys):
    assert main(["--model", "llama-7b", "--gpu-mem", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "fits in 24GB" in out and "| bf16 | yes |" in out


def test_docs_table_is_current():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "memory.md").read_text()
    assert fits_table() in doc
