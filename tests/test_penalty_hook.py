"""The penalty gradient λ∇Ω is added once per optimizer step, for all RoRA layers, by
one global optimizer step pre-hook (rora_fast.penalty). Every training loop below is
compared with the loss-mode reference (``penalty_mode="loss"`` and ``rora_penalty``
added to the loss once per step) or with the closed form, in float64.

Covered: plain loop, gradient accumulation (set_to_none True/False), backward /
zero_grad(set_to_none=False) / backward / step, a hand-written update with
add_penalty_grads (and the warning without it), foreach and fused AdamW, two
optimizers, GradScaler (unscaled, skipped steps, fused optimizer with grad_scale),
accelerate with gradient accumulation, PiSSA/OLoRA, DoRA, PEFT-registered layers,
parameters without a gradient, λ = 0, loss mode, copies of layers, grouping of layers
of equal shapes."""

import copy
import warnings

import pytest
import torch
from torch import nn

import rora_fast
from rora_fast import RoraConfig, apply_rora, rora_penalty
from rora_fast import penalty as pen
from rora_fast import reference as ref

LR = 0.1


def _model(mode="optimizer", p=0.1, lam=2.0, init="default", use_dora=False,
           dtype=torch.float64):
    """Three adapted layers: two of equal shape (one batched group) and one other."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                      nn.Linear(12, 6)).to(dtype)
    torch.manual_seed(1)
    apply_rora(m, RoraConfig(r=3, ortho_rank=4, ortho_lambda=lam, weight_dropout=p,
                             penalty_mode=mode, init=init, use_dora=use_dora,
                             target_modules=["0", "2", "4"]))
    with torch.no_grad():
        for _, lay in rora_fast.rora_layers(m):
            lay.lora_B.add_(0.3 * torch.randn_like(lay.lora_B))
            lay.lora_A.add_(0.3 * torch.randn_like(lay.lora_A))
    return m


def _data(n=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 12, generator=g, dtype=dtype), torch.randn(4, 6, generator=g,
                                                                        dtype=dtype))
            for _ in range(n)]


def _params(m):
    return [p for p in m.parameters() if p.requires_grad]


def _loss(m, x, t):
    return (m(x) - t).pow(2).mean()


def _assert_same(a, b, rtol=1e-9, atol=1e-11):
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=na)


def _reference(make_opt, steps=3, micro=2, model_kw=None):
    """Loss mode: ``rora_penalty`` added to the loss once per step."""
    m = _model("loss", **(model_kw or {}))
    opt = make_opt(_params(m))
    data = _data(steps * micro)
    for s in range(steps):
        opt.zero_grad()
        torch.manual_seed(100 + s)
        for j in range(micro):
            x, t = data[s * micro + j]
            loss = _loss(m, x, t) / micro
            if j == 0:
                loss = loss + rora_penalty(m)
            loss.backward()
        opt.step()
    return m


def _hooked(make_opt, steps=3, micro=2, set_to_none=True, model_kw=None, m=None):
    """Train ``m`` (default: a fresh optimizer-mode model) with the step hook."""
    m = _model("optimizer", **(model_kw or {})) if m is None else m
    opt = make_opt(_params(m))
    data = _data(steps * micro)
    for s in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        torch.manual_seed(100 + s)
        for j in range(micro):
            x, t = data[s * micro + j]
            (_loss(m, x, t) / micro).backward()
        opt.step()
    return m


def _moved(m):
    start = _model("loss")
    return max((a - b).abs().max().item() for a, b in zip(_params(m), _params(start)))


# ---------------------------------------------------------------------- loops
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("micro", [1, 3])
def test_sgd_loop_and_gradient_accumulation_equal_loss_mode(set_to_none, micro):
    make = lambda ps: torch.optim.SGD(ps, lr=LR)  # noqa: E731
    want = _reference(make, micro=micro)
    got = _hooked(make, micro=micro, set_to_none=set_to_none)
    _assert_same(got, want)
    # the test can tell: without the penalty (λ = 0) the result differs
    none = _hooked(make, micro=micro, model_kw=dict(lam=0.0))
    diff = max((a - b).abs().max().item() for a, b in zip(_params(got), _params(none)))
    assert diff > 1e-3


@pytest.mark.parametrize("kind", ["foreach", "fused", "single"])
def test_adamw_variants_equal_loss_mode(kind):
    kw = {"foreach": dict(foreach=True), "fused": dict(fused=True),
          "single": dict(foreach=False)}[kind]
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-2, **kw)  # noqa: E731
    _assert_same(_hooked(make), _reference(make))


def test_the_gradient_seen_by_the_optimizer_is_the_closed_form():
    """grad at step = data gradient + 2λ((A−A₀)V)Vᵀ (A), 2λU(Uᵀ(B−B₀)) (B), for each layer."""
    m = _model()
    seen = {}

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            for p in _params(m):
                seen[id(p)] = p.grad.clone()

    opt = Spy(_params(m), lr=LR)
    x, t = _data(1)[0]
    _loss(m, x, t).backward()
    data_grads = {id(p): p.grad.clone() for p in _params(m)}
    opt.step()
    for _, lay in rora_fast.rora_layers(m):
        gA, gB = ref.ortho_penalty_grads(lay.lora_A, lay.lora_B, lay.ortho_U, lay.ortho_V)
        for p_, g in ((lay.lora_A, gA), (lay.lora_B, gB)):
            torch.testing.assert_close(seen[id(p_)], data_grads[id(p_)] + lay.ortho_lambda * g,
                                       rtol=1e-10, atol=1e-12)


def test_backward_zero_grad_keep_backward_step_adds_it_once():
    """backward; zero_grad(set_to_none=False); backward; step: the update is the second
    backward's gradient plus λ∇Ω exactly once (the old backward-time rule lost it)."""
    m = _model()
    opt = torch.optim.SGD(_params(m), lr=1.0)
    (x1, t1), (x2, t2) = _data(2)
    _loss(m, x1, t1).backward()
    opt.zero_grad(set_to_none=False)
    torch.manual_seed(3)
    _loss(m, x2, t2).backward()
    before = [p.detach().clone() for p in _params(m)]
    g_data = [p.grad.clone() for p in _params(m)]
    pen_grads = {}
    for _, lay in rora_fast.rora_layers(m):
        gA, gB = ref.ortho_penalty_grads(lay.lora_A, lay.lora_B, lay.ortho_U, lay.ortho_V)
        pen_grads[id(lay.lora_A)] = lay.ortho_lambda * gA
        pen_grads[id(lay.lora_B)] = lay.ortho_lambda * gB
    opt.step()
    for p, b, g in zip(_params(m), before, g_data):
        want = b - (g + pen_grads.get(id(p), 0.0))
        torch.testing.assert_close(p.detach(), want, rtol=1e-10, atol=1e-12)


def test_hand_written_update_with_add_penalty_grads_equals_loss_mode():
    """p.data.sub_(lr * p.grad); p.grad.zero_(): with add_penalty_grads before each
    update the run equals the loss-mode run with SGD (the old rule added it once only)."""
    want = _reference(lambda ps: torch.optim.SGD(ps, lr=LR), micro=1, steps=4)
    m = _model()
    data = _data(4)
    for s in range(4):
        torch.manual_seed(100 + s)
        x, t = data[s]
        _loss(m, x, t).backward()
        assert rora_fast.add_penalty_grads(m) == 6  # 3 layers x (A, B)
        with torch.no_grad():
            for p in _params(m):
                p.data.sub_(LR * p.grad)
                p.grad.zero_()
    _assert_same(m, want)


def test_no_step_warns_once_after_the_documented_number_of_forwards():
    m = _model()
    pen._WARNED[0] = False
    x, t = _data(1)[0]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(pen.WARN_AFTER_FORWARDS - 1):
            _loss(m, x, t).backward()
        assert not [x for x in w if "add_penalty_grads" in str(x.message)]
        _loss(m, x, t).backward()
        for _ in range(3):
            _loss(m, x, t).backward()
    hits = [x for x in w if "add_penalty_grads" in str(x.message)]
    assert len(hits) == 1 and issubclass(hits[0].category, RuntimeWarning)


def test_steps_and_add_penalty_grads_reset_the_warning_count():
    m = _model()
    pen._WARNED[0] = False
    opt = torch.optim.SGD(_params(m), lr=1e-3)
    x, t = _data(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for i in range(3 * pen.WARN_AFTER_FORWARDS):
            _loss(m, x, t).backward()
            if i % 8 == 7:
                if i % 16 == 7:
                    opt.step()
                else:
                    rora_fast.add_penalty_grads(m)
                opt.zero_grad()
        m.eval()  # eval forwards and no-grad forwards do not count
        with torch.no_grad():
            for _ in range(pen.WARN_AFTER_FORWARDS + 1):
                m(x)


def test_two_optimizers_each_add_their_own_layers_penalty_once():
    make_ref = lambda ps: torch.optim.SGD(ps, lr=LR)  # noqa: E731
    want = _reference(make_ref, steps=2, micro=2)
    m = _model()
    layers = [lay for _, lay in rora_fast.rora_layers(m)]
    first = [layers[0].lora_A, layers[0].lora_B, layers[1].lora_A]
    rest = [p for p in _params(m) if all(p is not q for q in first)]
    opts = [torch.optim.SGD(first, lr=LR), torch.optim.SGD(rest, lr=LR)]
    data = _data(4)
    for s in range(2):
        for o in opts:
            o.zero_grad()
        torch.manual_seed(100 + s)
        for j in range(2):
            x, t = data[s * 2 + j]
            (_loss(m, x, t) / 2).backward()
        for o in opts:
            o.step()
    _assert_same(m, want)


@pytest.mark.parametrize("name", ["lbfgs", "sgd"])
def test_step_with_closure_equals_loss_mode(name):
    """step(closure) re-evaluates the gradients inside step: the penalty is added after
    each evaluation (and λΩ to the loss LBFGS compares), like the loss-mode run."""
    def make(ps):
        if name == "lbfgs":
            return torch.optim.LBFGS(ps, lr=0.5, max_iter=4, history_size=3)
        return torch.optim.SGD(ps, lr=LR)

    runs = {}
    for mode in ("loss", "optimizer"):
        m = _model(mode, p=0.0)
        opt = make(_params(m))
        x, t = _data(1)[0]
        losses = []

        def closure():
            opt.zero_grad()
            loss = _loss(m, x, t)
            if mode == "loss":
                loss = loss + rora_penalty(m)
            loss.backward()
            return loss

        for _ in range(2):
            losses.append(float(opt.step(closure).detach()))
        runs[mode] = (m, losses)
    _assert_same(runs["optimizer"][0], runs["loss"][0], rtol=1e-8, atol=1e-10)
    assert runs["optimizer"][1] == pytest.approx(runs["loss"][1], rel=1e-10)


def test_a_parameter_without_gradient_gets_nothing():
    """A layer that took no part in this step's backward is not moved by the penalty
    (torch optimizers skip parameters whose grad is None)."""
    m = _model()
    opt = torch.optim.SGD(_params(m), lr=LR)
    unused = m[4]
    before = unused.lora_A.detach().clone()
    x, _ = _data(1)[0]
    m[2](m[0](x)).sum().backward()  # m[4] not called
    assert unused.lora_A.grad is None
    opt.step()
    assert unused.lora_A.grad is None and torch.equal(unused.lora_A, before)


def test_loss_mode_and_zero_lambda_get_nothing_from_the_hook():
    for kw in (dict(mode="loss"), dict(lam=0.0)):
        m = _model(**kw)
        seen = []
        x, t = _data(1)[0]
        _loss(m, x, t).backward()
        grads = [p.grad.clone() for p in _params(m)]
        h = torch.optim.SGD(_params(m), lr=LR)
        # a pre-hook registered after rora's global one sees the gradients it left
        h.register_step_pre_hook(lambda o, a, k: seen.extend(p.grad.clone() for p in _params(m)))
        h.step()
        for a, b in zip(seen, grads):
            assert torch.equal(a, b)


def test_copies_of_a_model_are_penalised_too():
    make = lambda ps: torch.optim.SGD(ps, lr=LR)  # noqa: E731
    want = _reference(make, steps=2, micro=1)
    m = copy.deepcopy(_model())
    _assert_same(_hooked(make, steps=2, micro=1, m=m), want)


def test_parameters_replaced_by_load_state_dict_assign_are_followed():
    """The hook reads the adapters through the module at each step: Parameters replaced
    by load_state_dict(assign=True) (as FSDP2 also does) get the penalty, not the old ones."""
    make = lambda ps: torch.optim.SGD(ps, lr=LR)  # noqa: E731
    want = _reference(make, steps=2, micro=1)
    m = _model()
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    _assert_same(_hooked(make, steps=2, micro=1, m=m), want)


def test_grouped_penalty_equals_per_layer_closed_form_mixed_shapes_and_dtypes():
    """Layers of equal shape are batched; different shapes, dtypes (fp32 adapters on a
    bf16 base, fp64) and λ per layer each get their own closed form."""
    torch.manual_seed(0)
    lays = []
    for (i, o, dt, lam) in [(16, 16, torch.float64, 1.0), (16, 16, torch.float64, 3.0),
                            (16, 24, torch.float64, 2.0), (16, 16, torch.bfloat16, 5.0),
                            (16, 16, torch.bfloat16, 0.5)]:
        lay = rora_fast.RoraLinear.from_linear(nn.Linear(i, o, dtype=dt), r=4, ortho_rank=3,
                                               ortho_lambda=lam, svd_cache=None)
        with torch.no_grad():
            lay.lora_B.normal_()
        lays.append(lay)
    model = nn.ModuleList(lays)
    for lay in lays:
        lay.lora_A.grad = torch.zeros_like(lay.lora_A)
        lay.lora_B.grad = torch.zeros_like(lay.lora_B)
    assert rora_fast.add_penalty_grads(model) == 10
    for lay in lays:
        gA, gB = ref.ortho_penalty_grads(lay.lora_A, lay.lora_B, lay.ortho_U, lay.ortho_V)
        tol = dict(rtol=1e-10, atol=1e-12) if lay.lora_A.dtype == torch.float64 else \
            dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lay.lora_A.grad, lay.ortho_lambda * gA, **tol)
        torch.testing.assert_close(lay.lora_B.grad, lay.ortho_lambda * gB, **tol)


# ---------------------------------------------------------------------- AMP
def _scaler_run(mode, opt_kw, steps=3, inf_at=None):
    m = _model(mode, dtype=torch.float32, p=0.0)
    opt = torch.optim.AdamW(_params(m), lr=1e-2, **opt_kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    data = _data(steps, dtype=torch.float32)
    for s in range(steps):
        opt.zero_grad()
        x, t = data[s]
        loss = _loss(m, x, t)
        if mode == "loss":
            loss = loss + rora_penalty(m)
        scaler.scale(loss).backward()
        if s == inf_at:
            m[0].lora_A.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    return m


@pytest.mark.parametrize("opt_kw", [dict(foreach=False), dict(fused=True)],
                         ids=["unscaled-before-step", "fused-grad_scale"])
def test_grad_scaler_equals_loss_mode(opt_kw):
    _assert_same(_scaler_run("optimizer", opt_kw), _scaler_run("loss", opt_kw),
                 rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt_kw", [dict(foreach=False), dict(fused=True)],
                         ids=["unscaled-before-step", "fused-grad_scale"])
def test_grad_scaler_skipped_step_adds_nothing(opt_kw):
    """An inf gradient makes the scaler skip the step: neither run moves there, and the
    runs stay equal (the penalty is not carried into the next step)."""
    got = _scaler_run("optimizer", opt_kw, inf_at=1)
    want = _scaler_run("loss", opt_kw, inf_at=1)
    _assert_same(got, want, rtol=1e-5, atol=1e-6)
    one_step_less = _scaler_run("optimizer", opt_kw, steps=2)
    assert not torch.allclose(got[0].lora_A, one_step_less[0].lora_A)


# ---------------------------------------------------------------------- accelerate
def test_accelerate_with_gradient_accumulation_equals_loss_mode():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    # accelerate's state is process-wide: a Trainer run earlier (bf16, other
    # accumulation) must not leak into this one
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    make = lambda ps: torch.optim.SGD(ps, lr=LR)  # noqa: E731
    want = _reference(make, steps=3, micro=2)
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2,
                                 mixed_precision="no")
    m = _model()
    opt = make(_params(m))
    m, opt = acc.prepare(m, opt)
    data = _data(6)
    for s in range(3):
        torch.manual_seed(100 + s)
        for j in range(2):
            with acc.accumulate(m):
                x, t = data[s * 2 + j]
                acc.backward(_loss(m, x, t))  # accelerate divides by the accumulation steps
                opt.step()
                opt.zero_grad()
    _assert_same(acc.unwrap_model(m), want)
    acc.free_memory()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ---------------------------------------------------------------------- variants
@pytest.mark.parametrize("kw", [dict(init="pissa"), dict(init="olora"), dict(use_dora=True)],
                         ids=["pissa", "olora", "dora"])
def test_variants_equal_loss_mode(kw):
    make = lambda ps: torch.optim.SGD(ps, lr=LR)  # noqa: E731
    _assert_same(_hooked(make, model_kw=kw), _reference(make, model_kw=kw))


def test_peft_registered_layers_get_the_penalty_at_the_step():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32, num_labels=2)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(cfg)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                           task_type="SEQ_CLS", init_lora_weights="gaussian")
    rora_fast.register_rora(lcfg, weight_dropout=0.1, ortho_rank=4, ortho_lambda=3.0)
    model = peft.get_peft_model(base, lcfg)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(0, 50, (2, 5))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    layer = model.base_model.model.bert.encoder.layer[1].attention.self.value
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    before_A, before_B = A.detach().clone(), B.detach().clone()
    gA_data, gB_data = A.grad.clone(), B.grad.clone()
    gA, gB = ref.ortho_penalty_grads(before_A, before_B, layer.rora_ortho_U, layer.rora_ortho_V)
    opt.step()
    torch.testing.assert_close(A.detach(), before_A - gA_data - 3.0 * gA, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B.detach(), before_B - gB_data - 3.0 * gB, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- API
def test_add_penalty_grads_bad_input_errors():
    m = _model()
    opt = torch.optim.SGD(_params(m), lr=LR)
    assert not hasattr(rora_fast, "attach_penalty")  # removed (it was a deprecated no-op)
    with pytest.raises(TypeError, match="nn.Module"):
        rora_fast.add_penalty_grads(opt)
    assert rora_fast.add_penalty_grads(nn.Linear(2, 2)) == 0


def test_import_installs_no_optimizer_hook():
    """Importing rora_fast (and transformers, peft through it) changes no optimizer: the
    global step pre-hook is installed when the first RoRA layer registers."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from torch.optim import optimizer as O
        before = len(O._global_optimizer_pre_hooks)
        import rora_fast, rora_fast.peft_integration, rora_fast.trainer
        from rora_fast import penalty
        assert penalty._HOOK is None and len(O._global_optimizer_pre_hooks) == before
        rora_fast.RoraLinear(8, 8, r=2, ortho_rank=2, svd_cache=None)
        rora_fast.RoraLinear(8, 8, r=2, ortho_rank=2, svd_cache=None)
        assert penalty._HOOK is not None
        print(len(O._global_optimizer_pre_hooks) - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1"  # installed once
