"""Every bad input gets a clear ValueError/TypeError naming the problem; NaN/Inf
propagate like nn.Linear."""

import math

import pytest
import torch
from torch import nn

from rora_fast import RoraConfig, RoraLinear, apply_rora


def layer(**kw):
    kw.setdefault("r", 2)
    kw.setdefault("ortho_rank", 3)
    return RoraLinear.from_linear(nn.Linear(8, 6), **kw)


# ----------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("train", [True, False])
def test_wrong_input_feature_size(train):
    lay = layer().train(train)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\].*\(4, 7\)"):
        lay(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        lay(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_unsupported_input_dtype(dtype):
    lay = layer()
    x = torch.ones(3, 8, dtype=dtype)
    with pytest.raises(TypeError, match="unsupported input dtype"):
        lay(x)


def test_input_dtype_mismatch_without_autocast():
    lay = layer()
    with pytest.raises(TypeError, match="does not match the layer's dtype"):
        lay(torch.randn(3, 8, dtype=torch.float64))


def test_non_tensor_input():
    with pytest.raises(TypeError, match="expects a tensor"):
        layer()([[0.0] * 8])


# ----------------------------------------------------------------------------- hyper-parameters
@pytest.mark.parametrize("r", [0, -1])
def test_r_not_positive(r):
    with pytest.raises(ValueError, match=r"r must be in \[1, min\(in_features, out_features\)\]"):
        layer(r=r)


def test_r_too_large():
    with pytest.raises(ValueError, match=r"r must be .*\[1, 6\], got 7"):
        layer(r=7)
    layer(r=6)  # the limit itself is fine


def test_r_not_int():
    with pytest.raises(TypeError, match="r must be an int"):
        layer(r=2.0)


def test_ortho_rank_too_large():
    with pytest.raises(ValueError, match=r"ortho_rank must be .*\[1, 6\], got 7"):
        layer(ortho_rank=7)
    with pytest.raises(ValueError, match="ortho_rank"):
        layer(ortho_rank=0)


@pytest.mark.parametrize("name", ["weight_dropout", "lora_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_dropouts_outside_unit_interval(name, value):
    with pytest.raises(ValueError, match=name):
        layer(**{name: value})


@pytest.mark.parametrize("name", ["weight_dropout", "lora_dropout"])
def test_dropout_nan_or_wrong_type(name):
    with pytest.raises((TypeError, ValueError), match=name):
        layer(**{name: math.nan})
    with pytest.raises(TypeError, match=name):
        layer(**{name: "0.1"})


def test_weight_dropout_that_rounds_to_one():
    with pytest.raises(ValueError, match="weight_dropout"):
        layer(weight_dropout=1 - 1e-7)


@pytest.mark.parametrize("alpha", [0, -4, 0.0])
def test_alpha_not_positive(alpha):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        layer(alpha=alpha)


def test_negative_lambda_and_bad_modes():
    with pytest.raises(ValueError, match="ortho_lambda"):
        layer(ortho_lambda=-1.0)
    with pytest.raises(ValueError, match="penalty_mode"):
        layer(penalty_mode="sometimes")
    with pytest.raises(ValueError, match="init must be one of"):
        layer(init="loftq")
    with pytest.raises(ValueError, match="init must be one of"):
        RoraConfig(init="loftq")


def test_from_linear_on_non_linear():
    with pytest.raises(TypeError, match="from_linear expects an nn.Linear, got Conv1d"):
        RoraLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="got Embedding"):
        RoraLinear.from_linear(nn.Embedding(10, 4))


def test_integer_weight_refused():
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="unsupported weight dtype"):
        RoraLinear.from_linear(lin, r=1, ortho_rank=1)


# ----------------------------------------------------------------------------- model level
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.emb = nn.Embedding(5, 8)

    def forward(self, x):
        return self.norm(self.proj(x))


def test_targets_matching_nothing():
    with pytest.raises(ValueError, match=r"target_modules \['nothing_here'\] match no nn.Linear"):
        apply_rora(Net(), RoraConfig(r=2, ortho_rank=2, target_modules=["nothing_here"]))
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_rora(Net(), RoraConfig(r=2, ortho_rank=2, target_modules=r"zzz.*"))


def test_target_that_is_not_linear():
    with pytest.raises(TypeError, match="'norm' is a LayerNorm, not an nn.Linear"):
        apply_rora(Net(), RoraConfig(r=2, ortho_rank=2, target_modules=["proj", "norm"]))
    with pytest.raises(TypeError, match="'emb' is a Embedding"):
        apply_rora(Net(), RoraConfig(r=2, ortho_rank=2, target_modules=["emb"]))


def test_failed_apply_leaves_model_unchanged():
    net = Net()
    with pytest.raises(TypeError):
        apply_rora(net, RoraConfig(r=2, ortho_rank=2, target_modules=["proj", "norm"]))
    assert type(net.proj) is nn.Linear and net.proj.weight.requires_grad


def test_model_level_hyper_parameter_errors():
    with pytest.raises(ValueError, match="r must be"):
        apply_rora(Net(), RoraConfig(r=9, ortho_rank=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match="ortho_rank must be"):
        apply_rora(Net(), RoraConfig(r=2, ortho_rank=32, target_modules=["proj"]))
    with pytest.raises(ValueError, match="no default target modules"):
        apply_rora(Net(), RoraConfig(r=2, ortho_rank=2))
    with pytest.raises(ValueError, match="modules_to_save entry 'head'"):
        apply_rora(Net(), RoraConfig(r=2, ortho_rank=2, target_modules=["proj"],
                                     modules_to_save=["head"]))
    with pytest.raises(ValueError, match="unknown RoraConfig fields"):
        RoraConfig.from_dict({"r": 2, "rank": 3})
    with pytest.raises(ValueError, match="rescale_layers"):
        RoraConfig(rescale_layers=-1)


# ----------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_inf_propagate_like_linear(train, bad):
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    lay = RoraLinear.from_linear(lin, r=2, ortho_rank=3, weight_dropout=0.0,
                                 ortho_lambda=0.0).train(train)
    x = torch.randn(4, 8)
    x[1, 3] = bad
    want = lin(x)
    got = lay(x)
    assert got.shape == want.shape
    # The same entries are non-finite as through nn.Linear, and the finite ones equal
    # (B = 0). An Inf may come out as NaN: inf·0 in the zero-initialised LoRA path,
    # exactly as in PEFT's LoRA layer.
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin])
    assert torch.isnan(got[1]).any() or torch.isinf(got[1]).any()
    assert torch.isfinite(got[[0, 2, 3]]).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_inf_with_weight_dropout_no_crash(bad):
    lay = layer(weight_dropout=0.3)
    with torch.no_grad():
        lay.lora_B.normal_()
    x = torch.randn(4, 8, requires_grad=True)
    xb = x.detach().clone()
    xb[2, 0] = bad
    xb.requires_grad_(True)
    y = lay(xb)
    assert not torch.isfinite(y[2]).all()  # not silently replaced
    assert torch.isfinite(y[[0, 1, 3]]).all()
    y.sum().backward()  # no crash
    assert xb.grad is not None


# ----------------------------------------------------------------------------- non-finite (issue 12)
@pytest.mark.parametrize("name, value", [("alpha", math.inf), ("ortho_lambda", math.inf),
                                         ("ortho_lambda", math.nan), ("alpha", math.nan),
                                         ("lora_dropout", math.inf)])
def test_non_finite_hyper_parameters_refused(name, value):
    """ortho_lambda=inf and alpha=inf were accepted and gave non-finite adapters."""
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        layer(**{name: value})
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        RoraConfig(**{name: value})


def test_register_rora_validates_like_the_layer():
    import peft
    from rora_fast import register_rora

    for kw, match in ((dict(ortho_lambda=math.inf), "ortho_lambda must be a finite"),
                      (dict(ortho_lambda=-1.0), "ortho_lambda must be >= 0"),
                      (dict(weight_dropout=1.0), "weight_dropout must be < 1"),
                      (dict(ortho_rank=0), "ortho_rank must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            register_rora(peft.LoraConfig(r=2, target_modules=["x"]), **kw)


def test_non_finite_base_weight_names_the_problem():
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight[2, 3] = math.nan
        lin.weight[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"base weight has non-finite entries \(1 NaN, 1 Inf"):
        RoraLinear.from_linear(lin, r=2, ortho_rank=2)


def test_numpy_scalars_become_plain_values(tmp_path):
    """numpy scalars pass the checks and are stored as plain ints/floats (the saved JSON)."""
    import numpy as np
    from rora_fast import save_rora

    c = RoraConfig(r=np.int64(2), alpha=np.float32(4.0), ortho_rank=np.int32(2),
                   target_modules={"proj"})
    assert type(c.r) is int and type(c.alpha) is float and c.target_modules == ["proj"]
    lay = RoraLinear.from_linear(nn.Linear(8, 6), r=np.int64(2), ortho_rank=np.int64(3))
    assert type(lay.r) is int and type(lay.ortho_rank) is int
    net = apply_rora(Net(), c)
    save_rora(net, tmp_path / "ad")
