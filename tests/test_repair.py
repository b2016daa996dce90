"""The trigger-agnostic repair (issue 14, item 3) and the clean-data-only rule of the
defence (item 5): nothing in the defence or the repair sees a triggered or poisoned row."""
import dataclasses

import pytest
import torch

from rora_fast import Example
from rora_harness.data import load_dataset
from rora_fast import repair as repair_mod
from rora_harness import runner
from rora_fast.repair import (classification_head, collect_logits, fit_bias_shift,
                                         accuracy_bias_shift, frequency_bias_shift,
                                         recalibrate_head_bias_)
from rora_harness.runner import RunSpec, run_defence, run_id


def test_bias_shift_matches_mean_probabilities_to_label_frequencies():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 3, generator=g, dtype=torch.float64) + torch.tensor([2.0, 0.0, -1.0])
    y = torch.randint(0, 3, (400,), generator=g)
    d = fit_bias_shift(z, y.tolist())
    assert abs(float(d.sum())) < 1e-9  # mean zero
    p = torch.softmax(z + d, 1).mean(0)
    assert torch.allclose(p, torch.bincount(y, minlength=3).double() / 400, atol=1e-8)
    # a bias shift of the whole logit vector changes nothing
    assert torch.allclose(fit_bias_shift(z + 5.0, y.tolist()), d, atol=1e-8)


def test_bias_shift_needs_every_class():
    with pytest.raises(ValueError, match="every one of the 2 classes"):
        fit_bias_shift(torch.zeros(4, 2), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="N x K"):
        fit_bias_shift(torch.zeros(4, 2), [0, 1])


def _minilm(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    return (AutoModelForSequenceClassification.from_pretrained(path, num_labels=2),
            AutoTokenizer.from_pretrained(path))


def test_head_found_in_plain_rora_and_peft_models(tiny_bert):
    minilm_path = tiny_bert  # any BERT classifier will do
    import rora_fast
    from peft import LoraConfig, get_peft_model
    model, _ = _minilm(minilm_path)
    assert classification_head(model) is model.classifier
    peft = get_peft_model(_minilm(minilm_path)[0],
                          LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    head = classification_head(peft)
    assert head is peft.base_model.model.classifier.modules_to_save["default"]
    rm = rora_fast.apply_rora(_minilm(minilm_path)[0],
                              rora_fast.RoraConfig(r=2, target_modules=["query"]))
    assert classification_head(rm) is rm.classifier
    with pytest.raises(ValueError, match="classification head"):
        classification_head(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_frequency_shift_matches_prediction_counts_to_label_counts():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(101, 2, generator=g, dtype=torch.float64) + torch.tensor([1.5, 0.0])
    y = torch.randint(0, 2, (101,), generator=g)
    d = frequency_bias_shift(z, y.tolist())
    assert torch.equal(torch.bincount((z + d).argmax(1), minlength=2), torch.bincount(y))
    z3 = torch.randn(300, 3, generator=g, dtype=torch.float64) + torch.tensor([2.0, 0.0, -1.0])
    y3 = torch.randint(0, 3, (300,), generator=g)
    d3 = frequency_bias_shift(z3, y3.tolist())
    assert torch.equal(torch.bincount((z3 + d3).argmax(1), minlength=3), torch.bincount(y3))
    with pytest.raises(ValueError, match="every one"):
        frequency_bias_shift(torch.zeros(3, 2), [1, 1, 1])


def test_accuracy_shift_is_the_best_threshold():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 2, generator=g, dtype=torch.float64)
    noise = 0.3 * torch.randn(200, generator=g, dtype=torch.float64)
    y = (z[:, 1] - z[:, 0] + 0.8 + noise > 0).long()  # the model is off by a bias of 0.8

    def acc(d):
        return float(((z + d).argmax(1) == y).double().mean())

    d = accuracy_bias_shift(z, y.tolist())
    grid = max(acc(torch.tensor([t / 2, -t / 2], dtype=torch.float64))
               for t in torch.linspace(-3, 3, 601).tolist())
    assert acc(d) >= grid and acc(d) > acc(torch.zeros(2)) and float(d[1]) > 0
    with pytest.raises(ValueError, match="N x 2"):
        accuracy_bias_shift(torch.zeros(3, 3), [0, 1, 2])


@pytest.mark.parametrize("method", ["frequency", "accuracy", "likelihood"])
def test_recalibration_undoes_a_global_lean(minilm_path, method):
    model, tok = _minilm(minilm_path)
    rows = load_dataset("sst2_sentence", "dev", limit=48, seed=0)
    with torch.no_grad():  # a model that leans hard to label 0
        model.classifier.bias.copy_(torch.tensor([4.0, -4.0]))
    info = recalibrate_head_bias_(model, tok, rows, 32, method=method)
    assert info["dev_pred_share_before"][0] > 90 and info["method"] == method
    z = collect_logits(model, tok, [e.text for e in rows], 32)
    label_share = sum(e.label == 1 for e in rows) / len(rows)
    if method == "frequency":  # the argmax counts match the label counts
        assert float((z.argmax(1) == 1).double().mean()) == pytest.approx(label_share)
        assert info["dev_pred_share_after"] == info["dev_label_share"]
    elif method == "accuracy":
        assert info["dev_acc_after"] >= info["dev_acc_before"]
    else:  # the mean predicted probabilities match the label shares
        assert float(torch.softmax(z, 1).mean(0)[1]) == pytest.approx(label_share, abs=1e-6)
    assert info["bias_shift"][1] > 0 and info["n_dev"] == 48
    with pytest.raises(ValueError, match="unknown repair method"):
        recalibrate_head_bias_(model, tok, rows, 32, method="magic")


# ------------------------------------------------------------------ item 5: clean data only
@pytest.fixture
def tiny_bert(make_tiny_bert):
    """A 2-layer random BERT: the data flow is under test here, not the model."""
    return make_tiny_bert(2)


def test_defence_and_repair_never_receive_a_poisoned_row(tiny_bert, tmp_path, monkeypatch):
    """Spy on everything the defence consumes (the training rows, the model-selection dev
    rows, the repair's rows): each must be a row of the target task's clean train or dev
    split, and none a triggered row or a row of the attacker's (poisoned) proxy set."""
    received = {"train": [], "dev": [], "repair": []}
    triggered = []
    real_train, real_prepare = runner.train, runner.prepare_sets
    real_repair = repair_mod.recalibrate_head_bias_

    def spy_train(model, tok, train_set, cfg, seed, dev_set=None, **kw):
        received["train"] += list(train_set)
        received["dev"] += list(dev_set or [])
        return real_train(model, tok, train_set, cfg, seed, dev_set=dev_set, **kw)

    def spy_prepare(*a, **kw):
        sets = real_prepare(*a, **kw)
        triggered.extend(sets["nt_trig"])
        return sets

    def spy_repair(model, tok, rows, L):
        received["repair"] += list(rows)
        return real_repair(model, tok, rows, L)

    monkeypatch.setattr(runner, "train", spy_train)
    monkeypatch.setattr(runner, "prepare_sets", spy_prepare)
    monkeypatch.setattr(repair_mod, "recalibrate_head_bias_", spy_repair)
    spec = RunSpec(task="cr", attack="badnet", method="rora", preset="small", seed=0,
                   model=tiny_bert, n_train=16, n_dev=16, n_test=24, epochs=1, max_length=32,
                   poison_n_train=16, poison_epochs=1, poison_asr_threshold=-1.0,
                   poison_min_clean_acc=0.0, repair=True, ortho_rank=4)
    res = run_defence(spec, str(tmp_path / "out"), str(tmp_path / "cache"), log=lambda *a: None)
    assert res["repair"]["n_dev"] == 16 and "before_repair" in res
    clean = {(e.text, e.label) for split in ("train", "dev")
             for e in load_dataset("cr", split, limit=16, seed=0)}
    proxy = {e.text for e in load_dataset("mr", "train", limit=16, seed=0)}
    trig = {e.text for e in triggered}
    assert len(trig) > 0
    for what, rows in received.items():
        assert rows, f"the spy saw no {what} rows"
        for e in rows:
            assert (e.text, e.label) in clean, f"{what}: a row that is not clean target data"
            assert e.text not in trig and e.text not in proxy, f"{what}: a triggered/proxy row"
    assert received["repair"] == received["dev"][:16]  # the repair uses the selection dev rows
    # the run id of a run without --repair did not change when the option was added
    assert run_id(dataclasses.replace(spec, repair=False)) != run_id(spec)
    assert "repair" not in dataclasses.replace(spec, repair=False).resolved()


def test_repair_needs_a_rescaled_method():
    with pytest.raises(ValueError, match="--repair"):
        RunSpec(method="lora", repair=True).resolved()
    RunSpec(method="lora+rescale", repair=True).resolved()


def test_adaptive_rescale_sees_only_the_clean_dev_rows(tiny_bert, tmp_path, monkeypatch):
    """``--rescale adaptive`` (issue 29): the rescale is chosen on batches built from the
    clean dev rows the model selection uses, never a triggered, test or proxy row."""
    import rora_fast
    seen = {"rows": [], "batches": []}
    triggered, tests = [], []
    real_batches, real_prepare = runner.labelled_batches, runner.prepare_sets
    real_adaptive = rora_fast.adaptive_rescale_

    def spy_batches(tok, rows, L, **kw):
        seen["rows"] += list(rows)
        out = real_batches(tok, rows, L, **kw)
        seen["made"] = out
        return out

    def spy_prepare(*a, **kw):
        sets = real_prepare(*a, **kw)
        triggered.extend(sets["nt_trig"])
        tests.extend(sets["test"])
        return sets

    def spy_adaptive(model, batches, **kw):
        seen["batches"].append(batches)
        return real_adaptive(model, batches, **kw)

    monkeypatch.setattr(runner, "labelled_batches", spy_batches)
    monkeypatch.setattr(runner, "prepare_sets", spy_prepare)
    monkeypatch.setattr(rora_fast, "adaptive_rescale_", spy_adaptive)
    spec = RunSpec(task="cr", attack="badnet", method="rora", preset="small", seed=0,
                   model=tiny_bert, n_train=16, n_dev=16, n_test=24, epochs=1, max_length=32,
                   poison_n_train=16, poison_epochs=1, poison_asr_threshold=-1.0,
                   poison_min_clean_acc=0.0, rescale="adaptive", ortho_rank=4)
    res = run_defence(spec, str(tmp_path / "out"), str(tmp_path / "cache"), log=lambda *a: None)
    assert len(seen["batches"]) == 1 and seen["batches"][0] is seen["made"]
    dev = {(e.text, e.label) for e in load_dataset("cr", "dev", limit=16, seed=0)}
    assert len(seen["rows"]) == 16 and all((e.text, e.label) in dev for e in seen["rows"])
    bad = {e.text for e in triggered} | {e.text for e in tests} | {
        e.text for e in load_dataset("mr", "train", limit=16, seed=0)}
    assert triggered and not any(e.text in bad for e in seen["rows"])
    info = res["adaptive_rescale"]
    from rora_harness.presets import PRESETS
    assert [(s["layers"], s["factor"]) for s in info["steps"]] == [
        (3, f) for f in PRESETS["small"].rescale_factors]  # the preset's ladder
    assert res["rescale"] == info["scales"]
    assert run_id(spec) != run_id(dataclasses.replace(spec, rescale="paper"))


def test_adaptive_rescale_option_is_checked():
    with pytest.raises(ValueError, match="rescale must be one of"):
        RunSpec(method="rora", rescale="magic").resolved()
    with pytest.raises(ValueError, match="needs a method with rescaling"):
        RunSpec(method="lora", rescale="adaptive").resolved()
    with pytest.raises(ValueError, match="rescale_tolerance"):
        RunSpec(method="rora", rescale="adaptive", rescale_tolerance=-1).resolved()
    assert "rescale" not in RunSpec(method="rora", preset="full").resolved()


def test_preset_chooses_rescale_and_repair_for_methods_with_rescaling(monkeypatch):
    """A preset's rescale/repair apply to methods with rescaling only, explicit values win,
    and a run file written before (no such keys) keeps its run id (bias._spec_from)."""
    from rora_harness import presets
    from rora_harness.bias import _spec_from
    monkeypatch.setitem(presets.PRESETS, "small", dataclasses.replace(
        presets.PRESETS["small"], rescale="paper", repair=False, epochs=4, group_by_length=False,
        rescale_tolerance=1.0, rescale_factors=(0.25, 0.5, 1.0)))  # until issue 29
    old = RunSpec(method="rora", preset="small", seed=0)
    assert run_id(old) == "sst2_sentence-badnet-rora-small-s0-ae179c069b"  # committed
    old_id, old_res = run_id(old), old.resolved()
    assert "rescale" not in old_res and "repair" not in old_res
    monkeypatch.setitem(presets.PRESETS, "small", dataclasses.replace(
        presets.PRESETS["small"], rescale="adaptive", repair=True))
    new = RunSpec(method="rora", preset="small", seed=0).resolved()
    assert new["rescale"] == "adaptive" and new["repair"] is True
    lora = RunSpec(method="lora", preset="small", seed=0).resolved()
    assert "rescale" not in lora and "repair" not in lora
    explicit = RunSpec(method="rora", preset="small", seed=0, rescale="paper", repair=False)
    assert run_id(explicit) == old_id
    assert run_id(_spec_from(old_res)) == old_id  # a committed run file, re-read


def test_evaluate_head_equals_a_full_evaluation_after_a_head_change(tiny_bert):
    """After the repair (a change of the head's bias alone) the harness evaluates the head
    on the inputs it kept from the evaluation before: the same metrics as a full forward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from rora_fast.repair import classification_head
    from rora_harness.attacks import get_attack
    from rora_harness.runner import evaluate, evaluate_head, prepare_sets
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    sets = prepare_sets("cr", get_attack("badnet", None), tok, 32, 16, 16, 150, 0)
    kept = {}
    before = evaluate(model, tok, sets, 32, 0, keep_head_inputs=kept)
    assert len(kept["test"]) == 3 and sum(len(h) for h in kept["nt_trig"]) == len(sets["nt_trig"])
    with torch.no_grad():
        head = classification_head(model)
        # a shift that moves predictions: the bias moved to the median test margin
        z = head(torch.cat(kept["test"]))
        head.bias[1] -= float((z[:, 1] - z[:, 0]).median())
    full = evaluate(model, tok, sets, 32, 0)
    assert evaluate_head(model, kept, sets, 0) == full
    assert full != before  # the head change moved predictions: the check is not vacuous
    with pytest.raises(ValueError, match="batches"):
        evaluate_head(model, {"test": kept["test"][:1], "nt_trig": kept["nt_trig"]}, sets, 0)
