"""The rescale's factor (issue 29): ``scale = factor · σ_max(W_pre) / σ_max(update)``, the
paper's rule at factor 1, one option through every door -- :func:`rora_fast.spectral_rescale_`
(``factor``), :class:`rora_fast.FinetuneConfig` / ``rora-fast train --rescale-factor``,
:class:`rora_fast.trainer.RoraTrainerCallback` (``rescale_factor``) and the harness
(``RunSpec.rescale_factor``, ``Preset.rescale_factor``, ``--rescale-factor``); refused up front
where it means nothing."""
import dataclasses
import os
import sys

import pytest
import torch

import rora_fast
from rora_fast import FinetuneConfig, finetune
from rora_harness.data import load_dataset
from rora_harness.runner import RunSpec, run_id

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))


def _paper(layer) -> float:
    return float(layer.sigma_pre) / float(layer.sigma_delta())


def test_finetune_rescales_by_the_factor(make_tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = make_tiny_bert(2)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    rows = load_dataset("sst2_sentence", "train", limit=24, seed=1)
    rep = finetune(model, tok, rows[:18], rows[18:],
                   FinetuneConfig(epochs=1, ortho_rank=4, max_length=24, rescale_layers=1,
                                  rescale="paper", rescale_factor=0.5, repair=False),
                   progress=False, log=lambda *a: None)
    layers = dict(rora_fast.rora_layers(model))
    assert rep["config"]["rescale_factor"] == 0.5 and rep["rescale"]
    for name, s in rep["rescale"].items():
        assert s == pytest.approx(0.5 * _paper(layers[name]), rel=1e-6), name
        assert layers[name].scaling == pytest.approx(s, rel=1e-12)
        assert rep["amplification"][name] == pytest.approx(s / 2.0, rel=1e-5)  # α/r = 2


def test_finetune_config_refuses_a_meaningless_factor():
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rescale_factor"):
            FinetuneConfig(rescale_factor=bad)
    with pytest.raises(TypeError, match="rescale_factor"):
        FinetuneConfig(rescale_factor="0.5")
    for mode in ("adaptive", "none"):
        with pytest.raises(ValueError, match="needs rescale='paper'"):
            FinetuneConfig(rescale=mode, rescale_factor=0.75)
    FinetuneConfig(rescale="adaptive")  # the default factor is fine with any mode


def test_trainer_callback_rescales_by_the_factor(tmp_path):
    from test_trainer import _model, _train
    model = _model(p=0.1)
    _, cb = _train(model, tmp_path, cb_kwargs=dict(rescale_layers=1, rescale_factor=0.25))
    layers = dict(rora_fast.rora_layers(model))
    assert set(cb.scales) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    for name, s in cb.scales.items():
        assert s == pytest.approx(0.25 * _paper(layers[name]), rel=1e-6)
    with pytest.raises(ValueError, match="rescale_factor"):
        rora_fast.trainer.RoraTrainerCallback(rescale_factor=0)


def test_runspec_rescale_factor_option():
    base = RunSpec(task="sst2_sentence", method="rora", preset="small", seed=0,
                   rescale="paper", rescale_factor=1.0)
    assert "rescale_factor" not in base.resolved()  # the paper's rule: run ids as before
    half = dataclasses.replace(base, rescale_factor=0.5)
    assert half.resolved()["rescale_factor"] == 0.5 and run_id(half) != run_id(base)
    with pytest.raises(ValueError, match="rescale_factor must be a finite number > 0"):
        dataclasses.replace(base, rescale_factor=0.0).resolved()
    with pytest.raises(ValueError, match="needs a method with rescaling"):
        RunSpec(method="lora", rescale_factor=0.5).resolved()
    with pytest.raises(ValueError, match="--rescale paper"):
        RunSpec(method="rora", rescale="adaptive", rescale_factor=0.5).resolved()


def test_preset_factor_applies_to_the_paper_rescale_only(monkeypatch):
    """A preset's factor applies to methods with the paper rescale; explicit values win;
    a run file written before (no such key) keeps its run id (bias._spec_from)."""
    from rora_harness import presets
    from rora_harness.bias import _spec_from
    monkeypatch.setitem(presets.PRESETS, "small", dataclasses.replace(
        presets.PRESETS["small"], rescale="paper", rescale_factor=1.0))
    old = RunSpec(method="rora", preset="small", seed=0)
    old_id, old_res = run_id(old), old.resolved()
    monkeypatch.setitem(presets.PRESETS, "small", dataclasses.replace(
        presets.PRESETS["small"], rescale="paper",
        rescale_factor=0.75 if presets.PRESETS["small"].rescale_factor == 1.0 else 1.0))
    new_factor = presets.PRESETS["small"].rescale_factor
    new = RunSpec(method="rora", preset="small", seed=0).resolved()
    assert new.get("rescale_factor", 1.0) == new_factor and run_id(
        RunSpec(method="rora", preset="small", seed=0)) != old_id
    assert "rescale_factor" not in RunSpec(method="lora", preset="small", seed=0).resolved()
    adaptive = RunSpec(method="rora", preset="small", seed=0, rescale="adaptive").resolved()
    assert "rescale_factor" not in adaptive  # the adaptive rule chooses its own factors
    assert run_id(_spec_from(old_res)) == old_id  # a committed run file, re-read


def test_harness_cli_passes_the_factor():
    from rora_fast.cli import build_parser
    from rora_harness.cli import _spec
    args = build_parser().parse_args(["defend", "--methods", "rora", "--rescale", "paper",
                                      "--rescale-factor", "0.5"])
    assert _spec(args, "rora").resolved()["rescale_factor"] == 0.5


# ------------------------------------------------------------------ the adaptive rescale's settings
def test_adaptive_settings_come_from_the_preset_and_keep_old_run_ids(monkeypatch):
    """An adaptive rescale takes the preset's tolerance and factors and is judged after the
    repair when the repair follows; a paper rescale is untouched by them; old run files keep
    their run ids."""
    from rora_harness import presets
    from rora_harness.bias import _spec_from
    monkeypatch.setitem(presets.PRESETS, "small", dataclasses.replace(
        presets.PRESETS["small"], rescale="adaptive", repair=False, rescale_tolerance=1.0,
        rescale_factors=(0.25, 0.5, 1.0)))
    old = RunSpec(method="rora", preset="small", seed=0).resolved()
    for k in ("rescale_tolerance", "rescale_factors", "rescale_judge"):
        assert k not in old  # the library's defaults: not hashed
    old_id = run_id(_spec_from(old))
    monkeypatch.setitem(presets.PRESETS, "small", dataclasses.replace(
        presets.PRESETS["small"], rescale="adaptive", repair=True, rescale_tolerance=2.0,
        rescale_factors=(0.5, 0.75, 1.0)))
    new = RunSpec(method="rora", preset="small", seed=0).resolved()
    assert (new["rescale_tolerance"], new["rescale_factors"], new["rescale_judge"]) == (
        2.0, [0.5, 0.75, 1.0], "repaired")
    assert run_id(_spec_from(old)) == old_id  # re-read with the new preset: the same run
    paper = RunSpec(method="rora", preset="small", seed=0, rescale="paper").resolved()
    assert not {"rescale_tolerance", "rescale_factors", "rescale_judge"} & set(paper)
    model_judged = RunSpec(method="rora", preset="small", seed=0, repair=False).resolved()
    assert "rescale_judge" not in model_judged
    explicit = RunSpec(method="rora", preset="small", seed=0, rescale_judge="model",
                       rescale_tolerance=0.5, rescale_factors=(0.5, 1.0)).resolved()
    assert "rescale_judge" not in explicit and explicit["rescale_factors"] == [0.5, 1.0]


def test_adaptive_settings_are_checked():
    with pytest.raises(ValueError, match="weakest first"):
        RunSpec(method="rora", rescale="adaptive", rescale_factors=(1.0, 0.5)).resolved()
    with pytest.raises(ValueError, match="need --rescale adaptive"):
        RunSpec(method="rora", rescale="paper", rescale_factors=(0.5, 1.0)).resolved()
    with pytest.raises(ValueError, match="needs --repair"):
        RunSpec(method="rora", rescale="adaptive", repair=False,
                rescale_judge="repaired").resolved()
    with pytest.raises(ValueError, match="'model' or 'repaired'"):
        RunSpec(method="rora", rescale="adaptive", rescale_judge="test").resolved()
    with pytest.raises(ValueError, match="rescale_tolerance"):
        RunSpec(method="rora", rescale="adaptive", rescale_tolerance=-1).resolved()
    with pytest.raises(ValueError, match="weakest first"):
        FinetuneConfig(rescale_factors=(0.5, 0.5))
    from rora_fast.adaptive import parse_factors
    import argparse
    assert parse_factors("0.5, 0.75,1") == (0.5, 0.75, 1.0)
    for bad in ("", "1,0.5", "a", "0,1"):
        with pytest.raises(argparse.ArgumentTypeError, match="weakest first"):
            parse_factors(bad)


def test_every_door_passes_the_adaptive_settings(make_tiny_bert, monkeypatch):
    """finetune() and the harness's rescale hand adaptive_rescale_ the same ladder,
    tolerance and judge for the same settings."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    import rora_fast.adaptive as ad
    from rora_harness import runner
    seen = []
    real = ad.adaptive_rescale_

    def spy(model, batches, **kw):
        seen.append({"ladder": [(s.layers, s.factor) for s in kw["ladder"]],
                     "tolerance": kw["tolerance"], "after_repair": kw["after_repair"]})
        return real(model, batches, **kw)
    monkeypatch.setattr(ad, "adaptive_rescale_", spy)
    monkeypatch.setattr(rora_fast, "adaptive_rescale_", spy)
    path = make_tiny_bert(2)
    rows = load_dataset("sst2_sentence", "train", limit=40, seed=1)
    val = [e for e in rows if e.label == 0][:4] + [e for e in rows if e.label == 1][:4]
    train = [e for e in rows if e not in val]
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    finetune(model, tok, train, val,
             FinetuneConfig(epochs=1, ortho_rank=4, max_length=24, rescale_layers=1,
                            rescale="adaptive", rescale_factors=(0.5, 0.75, 1.0),
                            rescale_tolerance=2.0, repair=True),
             progress=False, log=lambda *a: None)
    res = RunSpec(method="rora", rescale="adaptive", repair=True, rescale_layers=1,
                  rescale_factors=(0.5, 0.75, 1.0), rescale_tolerance=2.0).resolved()
    model2 = AutoModelForSequenceClassification.from_pretrained(path)
    model2 = rora_fast.apply_rora(model2, rora_fast.RoraConfig(
        r=2, alpha=4, ortho_rank=2, target_modules="all-linear"))
    with torch.no_grad():
        for _, lay in rora_fast.rora_layers(model2):
            lay.lora_B.normal_(0, 0.1)
    runner.adaptive_rescale_on_dev_(model2, tok, val, 24, res)
    assert seen[0] == seen[1] == {"ladder": [(1, 0.5), (1, 0.75), (1, 1.0)], "tolerance": 2.0,
                                  "after_repair": True}
