"""Activation checkpointing replays RoRA's weight mask; the layer follows autocast."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaForCausalLM

import rora_fast
from tiny import ByteLMDataset, tiny_llama_config  # examples/tiny.py


class _Block(nn.Module):
    def __init__(self, d=48, h=80):
        super().__init__()
        self.up = rora_fast.RoraLinear.from_linear(nn.Linear(d, h), r=4, ortho_rank=8,
                                                   weight_dropout=0.3, ortho_lambda=2.0)
        self.down = rora_fast.RoraLinear.from_linear(nn.Linear(h, d), r=4, ortho_rank=8,
                                                     weight_dropout=0.3, ortho_lambda=2.0)
        with torch.no_grad():
            self.up.lora_B.normal_()
            self.down.lora_B.normal_()

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


def _grads(block, x, how, micro_batches=1):
    block.zero_grad(set_to_none=True)
    xs = []
    for m in range(micro_batches):
        torch.manual_seed(123 + m)
        xi = x.clone().requires_grad_(True)
        if how == "plain":
            y = block(xi)
        elif how == "no-rng":
            y = checkpoint(block, xi, use_reentrant=False, preserve_rng_state=False)
        else:
            y = checkpoint(block, xi, use_reentrant=(how == "reentrant"))
        # another draw between forward and backward, as a real model would make
        torch.rand(3)
        (y.pow(2).mean()).backward()
        xs.append(xi.grad)
    out = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    out.update({f"x{m}": g for m, g in enumerate(xs)})
    return out


@pytest.mark.parametrize("how", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_torch_checkpoint_replays_mask(how, micro_batches):
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(2, 5, 48)
    want = _grads(block, x, "plain", micro_batches)
    got = _grads(block, x, how, micro_batches)
    assert want.keys() == got.keys() and {"up.lora_A", "down.lora_B"} <= set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)


def test_checkpoint_without_rng_stash_would_differ():
    """Negative control: without the RNG stash the replayed mask is another one."""
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(2, 5, 48)
    want = _grads(block, x, "plain")
    got = _grads(block, x, "no-rng")
    assert (got["up.lora_A"] - want["up.lora_A"]).abs().max() > 1e-4


def _llama():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    rora_fast.apply_rora(model, rora_fast.RoraConfig(
        r=4, ortho_rank=8, weight_dropout=0.2, ortho_lambda=5.0, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in rora_fast.rora_layers(model):
            layer.lora_B.normal_(0, 0.05)
    return model


def _llama_grads(model, batches):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    for b in batches:
        model(**b).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_same_gradients(reentrant):
    data = ByteLMDataset(n=4, max_length=20)
    batches = [{k: torch.stack([data[i][k] for i in (2 * j, 2 * j + 1)]) for k in data[0]}
               for j in range(2)]  # two micro-batches: the penalty must count once
    model = _llama()
    want = _llama_grads(model, batches)
    from common import enable_checkpointing  # examples/common.py: the name this transformers has
    enable_checkpointing(model, use_reentrant=reentrant)
    assert model.model.gradient_checkpointing
    got = _llama_grads(model, batches)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-4, msg=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_follows_cpu_autocast_like_linear(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    layer = rora_fast.RoraLinear.from_linear(lin, r=4, ortho_rank=8, weight_dropout=0.1,
                                             ortho_lambda=1.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(3, 7, 64)
    for train in (False, True):
        layer.train(train)
        torch.manual_seed(1)
        ref32 = layer(x)
        with torch.autocast("cpu", dtype=dtype):
            y_lin = lin(x)
            torch.manual_seed(1)
            xr = x.clone().requires_grad_(True)
            y = layer(xr)
        assert y.dtype == y_lin.dtype == dtype
        torch.testing.assert_close(y.float(), ref32, atol=0.05, rtol=0.05)
        layer.zero_grad(set_to_none=True)
        y.float().pow(2).mean().backward()
        if train:
            for g in (layer.lora_A.grad, layer.lora_B.grad, xr.grad):
                assert g is not None and torch.isfinite(g).all()
            # adapter grads stay in the adapter dtype (fp32), as PEFT's with autocast
            assert layer.lora_A.grad.dtype == torch.float32
    assert layer.weight.grad is None
