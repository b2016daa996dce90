"""Issue 30, item 4: a variant is one object, and one table maps a base kind to its layers.

* every ``(init, use_dora)`` resolves to one variant object (:func:`variant_for`), the one
  a layer, a config and a PEFT layer hold;
* no module outside ``rora_fast/variants.py`` branches on ``init``, ``use_dora`` or the
  PiSSA/OLoRA names (an AST scan, so that it cannot come back);
* the base-kind table (:data:`rora_fast.kinds.KINDS`) covers every layer class and PEFT
  layer class, both layers of a kind run on the same base strategy, and every dispatcher
  (``make_rora_layer``, ``RoraLinear.from_linear``, ``register_rora``) asks it.
"""
import ast
import copy
import pathlib
import pickle

import pytest
import torch
from torch import nn

import rora_fast as rf
from rora_fast import kinds, variants
from rora_fast.bases import BASES
from rora_fast.kinds import KINDS
from rora_fast.validation import INITS
from rora_fast.variants import Dora, LoraStart, OloraStart, PissaStart, peft_variant, variant_for

PAIRS = [(init, dora) for init in INITS for dora in (False, True)]
PKG = pathlib.Path(rf.__file__).parent


# ---------------------------------------------------------------------- one object each
def test_every_init_and_use_dora_is_one_variant_object():
    objs = {pair: variant_for(*pair) for pair in PAIRS}
    assert len({id(v) for v in objs.values()}) == len(PAIRS)
    for (init, dora), v in objs.items():
        assert variant_for(init, dora) is v
        assert (v.init, v.dora) == (init, dora)
        assert copy.copy(v) is v and copy.deepcopy(v) is v and pickle.loads(pickle.dumps(v)) is v
        start = v.start if dora else v
        assert isinstance(v, Dora) == dora
        assert type(start) is {"default": LoraStart, "gaussian": LoraStart,
                               "pissa": PissaStart, "olora": OloraStart}[init]
        assert v.rewrites_base == (init in ("pissa", "olora"))
    with pytest.raises(ValueError, match="init"):
        variant_for("bogus")


@pytest.mark.parametrize("init,dora", PAIRS)
def test_layers_and_configs_hold_the_same_object(init, dora):
    torch.manual_seed(0)
    layer = rf.RoraLinear(16, 12, r=2, ortho_rank=2, init=init, use_dora=dora)
    v = variant_for(init, dora)
    assert layer.variant is v and (layer.init, layer.use_dora) == (init, dora)
    assert copy.deepcopy(layer).variant is v
    assert rf.RoraConfig(r=2, ortho_rank=2, init=init, use_dora=dora).variant is v


def test_peft_arguments_map_to_the_same_objects():
    assert peft_variant(True, False) is variant_for("default")
    assert peft_variant(False, False) is variant_for("default")
    assert peft_variant("gaussian", False) is variant_for("gaussian")
    assert peft_variant("pissa_niter_4", False) is variant_for("pissa")
    assert peft_variant("olora", False) is variant_for("olora")
    assert peft_variant("eva", False) is variant_for("default")
    assert peft_variant(True, True) is variant_for("default", True)
    assert peft_variant(True, False).peft_refusal(True) is None
    assert peft_variant("pissa", False).peft_refusal("pissa") == "init_lora_weights='pissa'"
    assert peft_variant("olora", True).peft_refusal("olora") == "use_dora=True"


# ---------------------------------------------------------------------- no branch outside
#: config validation of the user's arguments may check the values
ALLOWED = {"variants.py", "validation.py"}
#: the experiment harness (leaving the library, issue 30 item 7) names PEFT's methods
#: ("lora", "pissa", "dora", ...), its own vocabulary, not a layer's variant
HARNESS = {"evaluation"}
#: (the penalty's math, reference.ortho_penalty and the step hook, takes an optional start
#: ``A₀, B₀``: None is a zero start, not a variant)
NAMES = {"init", "use_dora", "START_INITS", "INITS", "magnitude", "lora_magnitude"}
VARIANT_STRINGS = {"pissa", "olora", "gaussian"}


def _mentions(node) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id in NAMES:
            return True
        if isinstance(n, ast.Attribute) and n.attr in NAMES:
            return True
        if isinstance(n, ast.Constant) and n.value in VARIANT_STRINGS:
            return True
    return False


def _variant_branches(path: pathlib.Path):
    text = path.read_text(encoding="utf-8")
    for n in ast.walk(ast.parse(text)):
        tests = []
        if isinstance(n, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            tests.append(n.test)
        elif isinstance(n, ast.comprehension):
            tests.extend(n.ifs)
        elif isinstance(n, (ast.Compare, ast.BoolOp)):
            tests.append(n)
        elif isinstance(n, ast.Name) and n.id == "START_INITS":
            tests.append(n)
        for t in tests:
            if _mentions(t):
                yield n.lineno, ast.get_source_segment(text, t)


def test_no_variant_branch_outside_the_variant_module():
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if (path.name in ALLOWED and path.parent == PKG) or rel.parts[0] in HARNESS:
            continue
        found += sorted({f"{rel}:{line}: {src}" for line, src in _variant_branches(path)})
    assert not found, "variant branches outside rora_fast/variants.py:\n" + "\n".join(found)


def test_the_scan_sees_a_branch(tmp_path):
    src = "def f(layer, config, magnitude):\n" \
          "    if config.init in START_INITS or layer.use_dora:\n" \
          "        return 1\n    x = 2 if init == 'pissa' else 3\n" \
          "    return x if magnitude is None else -x\n"
    p = tmp_path / "probe.py"
    p.write_text(src)
    assert len({line for line, _ in _variant_branches(p)}) == 3


# ---------------------------------------------------------------------- the base-kind table
def _rora_layer_classes():
    out, todo = set(), [rf.RoraLinear]
    while todo:
        c = todo.pop()
        if c.__module__.startswith("rora_fast."):
            out.add(c)
        todo.extend(c.__subclasses__())
    return out


def test_the_table_covers_every_kind_and_layer_class():
    assert set(KINDS) == set(BASES)
    for kind, row in KINDS.items():
        assert row.base is BASES[kind]
        cls = row.layer_class()
        assert callable(getattr(cls, row.constructor))
        if not row.base.child:  # a class per dense kind, on that kind's strategy
            assert cls._base is BASES[kind]
    assert {row.layer_class() for row in KINDS.values()} == _rora_layer_classes()


def test_the_peft_layers_are_the_tables_on_the_same_strategies():
    pytest.importorskip("peft")
    from rora_fast.peft_integration import _peft_classes, peft_layer_classes

    classes = peft_layer_classes()
    names = {row.peft_layer for row in KINDS.values()}
    assert set(_peft_classes()) <= names
    rows = [row for row in KINDS.values() if row.peft_layer in _peft_classes()]
    assert list(classes) == [row.peft_target_type() for row in rows]  # table order
    for row, (target, cls) in zip(rows, classes.items()):
        assert cls.__name__ == row.peft_layer
        assert cls._rora_base is row.base
    # GPT-2's Conv1D: the rora_fast layer and the PEFT layer run on one strategy
    from transformers.pytorch_utils import Conv1D
    assert classes[Conv1D]._rora_base is rf.conv1d.RoraConv1D._base is BASES["conv1d"]


def test_every_dispatcher_asks_the_table(monkeypatch):
    from transformers.pytorch_utils import Conv1D

    asked = []
    real = kinds.Kind.build

    def spy(self, module, **kw):
        asked.append(self.kind)
        return real(self, module, **kw)

    monkeypatch.setattr(kinds.Kind, "build", spy)
    torch.manual_seed(0)
    conv, lin = Conv1D(12, 16), nn.Linear(16, 12)
    kw = dict(r=2, ortho_rank=2)
    assert type(rf.targets.make_rora_layer(lin, **kw)) is rf.RoraLinear
    assert type(rf.targets.make_rora_layer(conv, **kw)) is rf.conv1d.RoraConv1D
    assert type(rf.RoraLinear.from_linear(Conv1D(12, 16), **kw)) is rf.conv1d.RoraConv1D
    assert asked == ["linear", "conv1d", "conv1d"]


def test_register_rora_registers_the_tables_classes():
    peft = pytest.importorskip("peft")
    from rora_fast.peft_integration import peft_layer_classes

    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["x"])
    cls = rf.register_rora(cfg)
    mapping = cfg._custom_modules
    assert list(mapping)[:-1] == list(peft_layer_classes())
    assert list(mapping)[-1] is nn.Module
    assert mapping[nn.Linear] is cls and cls._rora_base is KINDS["linear"].base


@pytest.mark.parametrize("kw", [{}, {"use_dora": True, "lora_dropout": 0.1},
                                {"init": "pissa"}])
def test_conv1d_on_its_strategy_computes_what_it_did_on_the_linear_one(kw):
    """RoraConv1D now runs on Conv1DBase (as PEFT's Conv1D layer); before, it ran on
    LinearBase with itself as the holder of its ``(out, in)`` view. Both give the same
    bits: forward (eval and training, the same masks), gradients and merged weight."""
    from transformers.pytorch_utils import Conv1D

    from rora_fast.forward import layer_forward

    torch.manual_seed(0)
    a = rf.RoraLinear.from_linear(Conv1D(12, 16), r=2, ortho_rank=2, weight_dropout=0.3, **kw)
    assert a.base_kind == "conv1d" and a._base is BASES["conv1d"]
    with torch.no_grad():
        a.lora_B.normal_()
    x = torch.randn(3, 16)
    for train in (True, False):
        a.train(train)
        torch.manual_seed(1)
        ya = a(x)
        ga = torch.autograd.grad(ya.sum(), [a.lora_A, a.lora_B])
        torch.manual_seed(1)
        yb = layer_forward(a, BASES["linear"], a, x, a.lora_A, a.lora_B, a.scaling,
                           a.weight_dropout, a.lora_dropout, training=train,
                           variant=a.variant, strict=True)
        gb = torch.autograd.grad(yb.sum(), [a.lora_A, a.lora_B])
        assert torch.equal(ya, yb)
        assert all(torch.equal(u, v) for u, v in zip(ga, gb))
    assert torch.equal(a.dense_weight(torch.float64),
                       BASES["linear"].dense_weight(a, torch.float64))
    expect = a.variant.merged_weight(a, a.weight.to(torch.float64)).to(a.weight.dtype)
    merged = a.merged_linear()
    assert type(merged) is Conv1D and torch.equal(merged.weight.t(), expect)
