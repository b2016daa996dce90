"""The penalty is applied once per optimizer step (single-layer loops; the full set of
loops is in test_penalty_hook.py), loss mode, and end-to-end training of a tiny
random LLaMA and of the real MiniLM classifier."""

import copy

import os

import pytest
import torch
from torch import nn

import rora_fast
from rora_fast import RoraConfig, RoraLinear, apply_rora, rora_penalty


def _layer(mode="optimizer", lam=2.0, in_f=16, out_f=16, p=0.0):
    lay = RoraLinear.from_linear(nn.Linear(in_f, out_f, dtype=torch.float64), r=3,
                                 ortho_rank=4, ortho_lambda=lam, weight_dropout=p,
                                 penalty_mode=mode)
    with torch.no_grad():
        lay.lora_B.normal_()
    return lay


def _manual_grads(lay, objective):
    """Gradients of objective(A, B) w.r.t. independent float64 copies of A and B."""
    A = lay.lora_A.detach().clone().requires_grad_(True)
    B = lay.lora_B.detach().clone().requires_grad_(True)
    objective(A, B).backward()
    return A.grad, B.grad


def _omega(lay, A, B):
    U, V = lay.ortho_U.double(), lay.ortho_V.double()
    return (U.t() @ B).pow(2).sum() + (A @ V).pow(2).sum()


def _y(lay, x, A, B):
    return x @ lay.weight.t() + lay.bias + lay.scaling * x @ A.t() @ B.t()


class _SeenSGD(torch.optim.SGD):
    """SGD that records the gradients its step() sees (after the penalty hook)."""

    def step(self, closure=None):
        self.seen = [p.grad.clone() if p.grad is not None else None
                     for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def _step_grads(lay, opt):
    opt.step()
    return dict(zip(("A", "B"), opt.seen[:2]))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradient_accumulation_adds_penalty_once_per_step(set_to_none):
    lay = _layer()
    opt = _SeenSGD([lay.lora_A, lay.lora_B], lr=0.05)
    n = 4
    for step in range(3):  # the penalty is due again at every step
        xs = [torch.randn(5, 16, dtype=torch.float64) for _ in range(n)]
        ts = [torch.randn(5, 16, dtype=torch.float64) for _ in range(n)]
        opt.zero_grad(set_to_none=set_to_none)
        for x, t in zip(xs, ts):
            ((lay(x) - t).pow(2).mean() / n).backward()
        gA, gB = _manual_grads(lay, lambda A, B: sum(
            (_y(lay, x, A, B) - t).pow(2).mean() for x, t in zip(xs, ts)) / n
            + lay.ortho_lambda * _omega(lay, A, B))
        seen = _step_grads(lay, opt)
        torch.testing.assert_close(seen["A"], gA, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(seen["B"], gB, rtol=1e-10, atol=1e-12)


def test_penalty_once_per_step_with_frozen_lora_A():
    lay = _layer()
    lay.lora_A.requires_grad_(False)
    opt = _SeenSGD([lay.lora_B, lay.lora_A], lr=0.05)
    xs = [torch.randn(5, 16, dtype=torch.float64) for _ in range(3)]
    for x in xs:
        (lay(x).pow(2).mean() / 3).backward()
    _, gB = _manual_grads(lay, lambda A, B: sum(
        _y(lay, x, A, B).pow(2).mean() for x in xs) / 3 + lay.ortho_lambda * _omega(lay, A, B))
    opt.step()
    torch.testing.assert_close(opt.seen[0], gB, rtol=1e-10, atol=1e-12)
    assert lay.lora_A.grad is None


def test_layer_called_twice_in_one_forward_adds_penalty_once():
    lay = _layer()
    opt = _SeenSGD([lay.lora_A, lay.lora_B], lr=0.05)
    x = torch.randn(6, 16, dtype=torch.float64)
    (lay(torch.tanh(lay(x)))).sum().backward()
    gA, gB = _manual_grads(lay, lambda A, B: _y(lay, torch.tanh(_y(lay, x, A, B)), A, B).sum()
                           + lay.ortho_lambda * _omega(lay, A, B))
    seen = _step_grads(lay, opt)
    torch.testing.assert_close(seen["A"], gA, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(seen["B"], gB, rtol=1e-10, atol=1e-12)


def test_two_losses_two_backwards_add_penalty_once():
    # e.g. a separate auxiliary loss with its own backward before the step
    lay = _layer()
    opt = _SeenSGD([lay.lora_A, lay.lora_B], lr=0.05)
    x1, x2 = torch.randn(3, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    lay(x1).sum().backward()
    lay(x2).pow(2).sum().backward()
    gA, gB = _manual_grads(lay, lambda A, B: _y(lay, x1, A, B).sum()
                           + _y(lay, x2, A, B).pow(2).sum() + lay.ortho_lambda * _omega(lay, A, B))
    seen = _step_grads(lay, opt)
    torch.testing.assert_close(seen["A"], gA, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(seen["B"], gB, rtol=1e-10, atol=1e-12)


def test_loss_mode_adds_nothing_in_backward_and_penalty_is_differentiable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8)).double()
    apply_rora(model, RoraConfig(r=3, ortho_rank=4, ortho_lambda=2.0, weight_dropout=0.0,
                                 penalty_mode="loss", target_modules=["0", "2"]))
    for _, lay in rora_fast.rora_layers(model):
        with torch.no_grad():
            lay.lora_B.normal_()
    x = torch.randn(5, 16, dtype=torch.float64)
    model(x).sum().backward()
    lay, l2 = model[0], model[2]
    A2, B2 = l2.lora_A.detach(), l2.lora_B.detach()
    gA, gB = _manual_grads(lay, lambda A, B: _y(l2, torch.tanh(_y(lay, x, A, B)), A2, B2).sum())
    torch.testing.assert_close(lay.lora_A.grad, gA, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lay.lora_B.grad, gB, rtol=1e-10, atol=1e-12)
    pen = rora_penalty(model)
    assert pen.requires_grad
    want = sum(l.ortho_lambda * _omega(l, l.lora_A.double(), l.lora_B.double())
               for _, l in rora_fast.rora_layers(model))
    torch.testing.assert_close(pen.detach(), want.detach())
    model.zero_grad(set_to_none=True)
    pen.backward()
    gA, gB = _manual_grads(lay, lambda A, B: lay.ortho_lambda * _omega(lay, A, B))
    torch.testing.assert_close(lay.lora_A.grad, gA)
    torch.testing.assert_close(lay.lora_B.grad, gB)


def test_automatic_mode_penalty_value_is_detached():
    model = nn.Sequential(_layer(), nn.Tanh(), _layer())
    pen = rora_penalty(model)
    assert not pen.requires_grad and pen.grad_fn is None
    want = sum(l.ortho_lambda * _omega(l, l.lora_A.double(), l.lora_B.double())
               for l in (model[0], model[2]))
    torch.testing.assert_close(pen, want.detach())
    # adding it to the loss cannot count it twice: the gradient is the data one only
    x = torch.randn(4, 16, dtype=torch.float64)
    (model(x).sum() + rora_penalty(model)).backward()
    g_with = model[0].lora_A.grad.clone()
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    torch.testing.assert_close(model[0].lora_A.grad, g_with)


def test_rora_penalty_zero_when_lambda_zero_and_error_without_layers():
    lay = _layer(lam=0.0)
    assert float(rora_penalty(nn.Sequential(lay))) == 0.0
    with pytest.raises(ValueError, match="no RoRA layers"):
        rora_penalty(nn.Sequential(nn.Linear(3, 3)))


def _pair_of_models(mode_a, mode_b):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8)).double()
    models = []
    for mode in (mode_a, mode_b):
        m = copy.deepcopy(base)
        torch.manual_seed(1)
        apply_rora(m, RoraConfig(r=3, ortho_rank=4, ortho_lambda=2.0, weight_dropout=0.1,
                                 penalty_mode=mode, target_modules=["0", "2"]))
        models.append(m)
    return models


@pytest.mark.parametrize("mode", ["optimizer"])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_automatic_modes_equal_loss_mode(opt_name, mode):
    """The step hook ("optimizer") adds exactly what the loss term ("loss") would."""
    m_loss, m_opt = _pair_of_models("loss", mode)
    make = (lambda ps: torch.optim.SGD(ps, lr=0.1)) if opt_name == "sgd" else \
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    o_loss = make([p for p in m_loss.parameters() if p.requires_grad])
    o_opt = make([p for p in m_opt.parameters() if p.requires_grad])
    data = [(torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64))
            for _ in range(4)]
    for step in range(3):
        for m, o in ((m_loss, o_loss), (m_opt, o_opt)):
            o.zero_grad()
            torch.manual_seed(100 + step)
            for x, t in data[:2]:  # two micro-batches
                loss = (m(x) - t).pow(2).mean() / 2
                if m is m_loss:
                    loss = loss + rora_penalty(m) / 2
                loss.backward()
            o.step()
    for (na, a), (nb, b) in zip(m_loss.named_parameters(), m_opt.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=na)
    assert not torch.equal(m_opt[0].lora_B, torch.zeros_like(m_opt[0].lora_B))


# ----------------------------------------------------------------------- end to end
def _eval_out(model, **inputs):
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    return out.logits


def _train(model, batch, steps, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _check_rescale_merge(model, inputs, n_layers):
    scales = rora_fast.spectral_rescale_(model, layers=n_layers)
    assert scales and all(s > 0 for s in scales.values())
    before = _eval_out(model, **inputs)
    rora_fast.merge_rora(model)
    assert not list(rora_fast.rora_layers(model))
    after = _eval_out(model, **inputs)
    # fp32, 1e-5 relative to the outputs' scale (see test_model's merge test)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())


def test_tiny_llama_trains_rescales_merges():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                      max_position_embeddings=64, initializer_range=0.3)
    # (with the default init range 0.02 the frozen lm_head caps the logits at ~0.6, so
    # no adapter can move the loss much; 0.3 makes a tiny batch learnable)
    model = LlamaForCausalLM(cfg)
    apply_rora(model, RoraConfig(r=4, alpha=8, ortho_rank=4, target_modules="all-linear"))
    names = [n for n, _ in rora_fast.rora_layers(model)]
    assert "lm_head" not in names and len(names) == 2 * 7
    ids = torch.randint(0, 64, (4, 16))
    batch = dict(input_ids=ids, labels=ids)
    losses = _train(model, batch, steps=40, lr=5e-2)
    assert all(map(lambda v: v == v, losses))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    _check_rescale_merge(model, dict(input_ids=ids), n_layers=1)


def _sst2_sentences(n):
    from rora_harness.data import load_dataset
    rows = [(ex.text, ex.label) for ex in load_dataset("sst2_sentence", "train")[:200]]
    pos = [r for r in rows if r[1] == 1][: n // 2]
    neg = [r for r in rows if r[1] == 0][: n // 2]
    return pos + neg


def test_minilm_classifier_trains_rescales_merges(minilm_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    apply_rora(model, RoraConfig(r=8, alpha=16, ortho_rank=32))
    rl = dict(rora_fast.rora_layers(model))
    assert len(rl) == 12 and all(n.endswith(("query", "value")) for n in rl)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("classifier.")} == \
        {f"{n}.{k}" for n in rl for k in ("lora_A", "lora_B")}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    data = _sst2_sentences(8)
    enc = tok([s for s, _ in data], padding="max_length", truncation=True, max_length=32,
              return_tensors="pt")
    batch = dict(enc, labels=torch.tensor([l for _, l in data]))
    losses = _train(model, batch, steps=20, lr=1e-2)
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    # the adapters moved, the frozen weights did not
    assert all(torch.count_nonzero(l.lora_B) > 0 for l in rl.values())
    inputs = {k: v for k, v in enc.items()}
    _check_rescale_merge(model, inputs, n_layers=3)
