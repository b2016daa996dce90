"""torch.compile(fullgraph=True) of models with RoRA layers: no graph break (the mask
seed is drawn in the graph as a tensor and the masked weight is the registered custom
op ``rora_fast::masked_weight``), training matches eager.

Kept fast for CI: the tiny BERT runs with the ``aot_eager`` backend (full Dynamo +
AOTAutograd capture, no C++ compilation); Inductor compiles one small layer twice.
"""

import pytest
import torch
from torch import nn

import rora_fast
from rora_fast import reference as ref

transformers = pytest.importorskip("transformers")


def _bert(p, seed=0, lora_dropout=0.0, use_dora=False):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(cfg)
    rora_fast.apply_rora(model, rora_fast.RoraConfig(r=4, ortho_rank=4, weight_dropout=p,
                                                     lora_dropout=lora_dropout,
                                                     use_dora=use_dora,
                                                     ortho_lambda=10.0, svd_method="exact"))
    with torch.no_grad():
        for _, lay in rora_fast.rora_layers(model):
            lay.lora_B.normal_(0, 0.1)
    return model


def _train(model, compiled: bool, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (4, 8), generator=g)
    labels = torch.tensor([0, 1, 1, 0])

    def loss_fn(ids, labels):
        return model(input_ids=ids, labels=labels).loss

    fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager") if compiled else loss_fn
    model.train()
    losses = []
    torch.manual_seed(123)  # the mask seeds
    for _ in range(steps):
        loss = fn(ids, labels)
        loss.backward()
        opt.step()  # eager: the penalty step hook runs here
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("p,lora_dropout,use_dora", [(0.0, 0.0, False), (0.1, 0.0, False),
                                                     (0.0, 0.2, False), (0.1, 0.2, False),
                                                     (0.1, 0.2, True)])
def test_tiny_bert_fullgraph_trains_like_eager(p, lora_dropout, use_dora):
    """fullgraph=True raises on any graph break. aot_eager runs the captured aten graph
    with the default generator, so even at p > 0 the masks (the weight's and the LoRA
    input's, drawn from the same seed; DoRA's differentiable x̃ too) and the run equal
    eager's."""
    torch._dynamo.reset()
    eager = _bert(p, lora_dropout=lora_dropout, use_dora=use_dora)
    comp = _bert(p, lora_dropout=lora_dropout, use_dora=use_dora)
    l_e = _train(eager, compiled=False)
    l_c = _train(comp, compiled=True)
    torch.testing.assert_close(l_c, l_e, rtol=1e-6, atol=1e-7)
    for (n, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=n)
    assert l_c[-1] < l_c[0]  # it trains


def _layer(p, lora_dropout=0.0):
    torch.manual_seed(0)
    lay = rora_fast.RoraLinear.from_linear(nn.Linear(40, 24), r=4, ortho_rank=4,
                                           weight_dropout=p, lora_dropout=lora_dropout,
                                           svd_cache=None)
    with torch.no_grad():
        lay.lora_B.normal_()
    return lay


@pytest.mark.parametrize("lora_dropout", [0.0, 0.3])
def test_inductor_same_masks_as_eager_with_fallback_random(lora_dropout):
    """Inductor with torch._inductor.config.fallback_random=True draws the seeds from
    torch's generator like eager: output and gradients are eager's, bit for bit."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    lay = _layer(0.25, lora_dropout)
    x = torch.randn(6, 40, requires_grad=True)
    with inductor_config.patch(fallback_random=True):
        comp = torch.compile(lay, fullgraph=True)
        torch.manual_seed(5)
        y_c = comp(x)
        y_c.sum().backward()
    g_c, gA_c = x.grad.clone(), lay.lora_A.grad.clone()
    x.grad = lay.lora_A.grad = lay.lora_B.grad = None
    torch.manual_seed(5)
    y_e = lay(x)
    y_e.sum().backward()
    assert torch.equal(y_c, y_e) and torch.equal(g_c, x.grad)
    torch.testing.assert_close(gA_c, lay.lora_A.grad, rtol=1e-6, atol=1e-7)


def test_inductor_mask_statistics_with_its_own_generator():
    """Default Inductor (its own random stream): a fresh mask per call with the right
    drop rate, kept weights scaled by 1/(1 − p_eff), exactly as in eager mode."""
    torch._dynamo.reset()
    p = 0.25
    lay = _layer(p)
    with torch.no_grad():
        lay.lora_B.zero_()  # y = x (M ⊙ W)ᵀ/(1−p) + b: with x = I, y − b = ((M ⊙ W)/(1−p))ᵀ
    comp = torch.compile(lay, fullgraph=True)
    eye = torch.eye(40)
    W = lay.weight.detach()
    scale = 1.0 / (1.0 - ref.effective_drop_prob(p))
    masks = []
    with torch.no_grad():
        for _ in range(3):
            wm = (comp(eye) - lay.bias).t()
            kept = wm != 0
            torch.testing.assert_close(wm[kept], W[kept] * scale, rtol=1e-6, atol=1e-6)
            masks.append(kept)
    n = W.numel()
    drop = 1 - torch.stack(masks).float().mean().item()
    sd = (p * (1 - p) / (3 * n)) ** 0.5
    assert abs(drop - p) < 5 * sd, (drop, p, sd)
    assert not torch.equal(masks[0], masks[1])  # one mask per call


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_compiled_seed_lives_on_the_device():
    """Under compilation on CUDA the seed is drawn on the weight's device (no CPU op in
    the graph) and read by the mask kernel itself; each call draws a fresh mask of the
    right rate."""
    torch._dynamo.reset()
    draw = torch.compile(lambda: rora_fast.RoraLinear._draw_seed(torch.device("cuda")),
                         fullgraph=True, backend="aot_eager")
    s = draw()
    assert s.is_cuda and s.dtype == torch.int64 and s.shape == (1,)
    assert 0 <= int(s.item()) < 2**62
    p = 0.25
    lay = _layer(p).cuda()
    comp = torch.compile(lay, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        lay.lora_B.zero_()
        eye = torch.eye(40, device="cuda")
        wms = [(comp(eye) - lay.bias).t() for _ in range(2)]
    W = lay.weight.detach()
    scale = 1.0 / (1.0 - ref.effective_drop_prob(p))
    for wm in wms:
        kept = wm != 0
        torch.testing.assert_close(wm[kept], W[kept] * scale, rtol=1e-6, atol=1e-6)
    assert not torch.equal(wms[0] != 0, wms[1] != 0)


@needs_cuda
def test_cuda_reduce_overhead_captures_cuda_graphs():
    """mode="reduce-overhead" (Inductor + CUDA graph trees): no cudagraph skip (every
    input and op of the graph is on the device, the custom op reads its seed there),
    a fresh mask per replay at the right drop rate, and a training step moves the loss."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    p = 0.25
    lay = _layer(p).cuda()
    opt = torch.optim.AdamW([lay.lora_A, lay.lora_B], lr=1e-2)
    comp = torch.compile(lay, fullgraph=True, mode="reduce-overhead")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 40, generator=g).cuda()
    target = torch.randn(16, 24, generator=g).cuda()
    losses = []
    for _ in range(6):
        torch.compiler.cudagraph_mark_step_begin()
        loss = ((comp(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert losses[-1] < losses[0]
    with torch.no_grad():
        lay.lora_B.zero_()
    eye = torch.eye(40, device="cuda")
    masks = []
    with torch.no_grad():
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            masks.append(((comp(eye) - lay.bias).t() != 0).clone())
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    drop = 1 - torch.stack(masks).float().mean().item()
    n = lay.weight.numel()
    assert abs(drop - p) < 5 * (p * (1 - p) / (3 * n)) ** 0.5, drop
    assert not torch.equal(masks[0], masks[1])
