"""Edges of issue 30 item 5: a full or read-only SVD cache, a bad argument to from_linear,
a non-finite adapter at rescale and at save. Each fails (or warns) naming the problem and
leaves the caller's objects as they were."""
import os
import warnings

import pytest
import torch
from torch import nn

import rora_fast
from rora_fast import RoraLinear, spectral_basis


def test_full_cache_disk_warns_names_the_cache_and_trains_on(tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch
    from rora_fast import linalg

    def full_disk(*a, **kw):
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    monkeypatch.setattr(linalg, "_UNWRITABLE", set())
    W = torch.randn(24, 20)
    with pytest.warns(RuntimeWarning, match="RORA_FAST_CACHE_DIR") as rec:
        b = spectral_basis(W, 4, method="exact", cache_dir=tmp_path)
    assert str(tmp_path) in str(rec[0].message) and "No space left" in str(rec[0].message)
    assert b.U.shape == (24, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per folder: the second write is quiet
        spectral_basis(W * 2, 4, method="exact", cache_dir=tmp_path)
    assert not any(f.suffix == ".safetensors" for f in tmp_path.rglob("*"))


def test_from_linear_with_a_bad_argument_leaves_the_linear_trainable():
    lin = nn.Linear(8, 6)
    for bad in ({"r": 0}, {"weight_dropout": 1.5}, {"ortho_rank": 100}):
        with pytest.raises((ValueError, TypeError)):
            RoraLinear.from_linear(lin, **bad)
        assert lin.weight.requires_grad and lin.bias.requires_grad, bad
    lin.bias.requires_grad_(False)
    with pytest.raises(ValueError):
        RoraLinear.from_linear(lin, r=0)
    assert lin.weight.requires_grad and not lin.bias.requires_grad  # restored, not forced


def _model():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList(nn.ModuleDict({"query": nn.Linear(8, 8)}) for _ in range(2))
            self.classifier = nn.Linear(8, 2)
    torch.manual_seed(0)
    m = rora_fast.apply_rora(M(), rora_fast.RoraConfig(r=2, ortho_rank=2, target_modules=["query"]))
    with torch.no_grad():
        for _, lay in rora_fast.rora_layers(m):
            lay.lora_B.normal_()
    return m


def test_rescale_of_a_non_finite_adapter_names_the_layer_and_changes_nothing():
    m = _model()
    with torch.no_grad():
        m.layer[1].query.lora_B[0, 0] = float("nan")
    before = {n: lay.scaling for n, lay in rora_fast.rora_layers(m)}
    with pytest.raises(ValueError, match=r"layer\.1\.query: cannot rescale: the adapter"):
        rora_fast.spectral_rescale_(m, layers=2)
    assert {n: lay.scaling for n, lay in rora_fast.rora_layers(m)} == before


def test_save_of_a_non_finite_adapter_keeps_the_good_save(tmp_path):
    m = _model()
    path = tmp_path / "adapter"
    rora_fast.save_rora(m, path)
    good = {f: (path / f).read_bytes() for f in os.listdir(path)}
    with torch.no_grad():
        m.layer[0].query.lora_A[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or inf \(rora\.layer\.0\.query\.lora_A"):
        rora_fast.save_rora(m, path)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == good
