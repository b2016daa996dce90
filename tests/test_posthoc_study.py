"""scripts/eval/posthoc_study.py (issue 24): the head re-fit sees clean target-task
training rows only (the spy pattern of tests/test_repair.py), the study's forward path
gives the harness's predictions, and the module partition of a block is right."""
import dataclasses
import importlib.util
import json
import os

import pytest
import torch

from rora_harness.data import load_dataset
from rora_harness import runner
from rora_harness.runner import RunSpec, run_defence

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "scripts", "eval", "posthoc_study.py")


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("posthoc_study", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_module_partition_of_a_minilm_block(study):
    block = ["attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"]
    kinds = [study.module_kind(f"bert.encoder.layer.5.{s}") for s in block]
    assert kinds == ["attn"] * 4 + ["ffn"] * 2
    assert study.module_kind("bert.pooler.dense") is None


def test_head_refit_receives_only_clean_training_rows(study, make_tiny_bert, tmp_path,
                                                      monkeypatch):
    """Spy on everything the head re-fit consumes (its rows and every text whose features
    it computes): each must be a row of the target task's clean *train* split, and none a
    dev, test, triggered or proxy (attacker's) row."""
    tiny = make_tiny_bert(2)
    seeds_dir = str(tmp_path / "seeds")
    cache = str(tmp_path / "cache")
    base = RunSpec(task="cr", attack="badnet", method="rora", preset="small", seed=0,
                   model=tiny, n_train=16, n_dev=16, n_test=24, epochs=1, max_length=32,
                   poison_n_train=16, poison_epochs=1, poison_asr_threshold=-1.0,
                   poison_min_clean_acc=0.0, ortho_rank=4,
                   repair=False)  # the committed seeds runs the study reads were not repaired
    for m in ("lora", "rora"):
        run_defence(dataclasses.replace(base, method=m), seeds_dir, cache,
                    log=lambda *a: None, adapter_dir=os.path.join(seeds_dir, "adapters"))

    triggered, refit_rows, refit_texts = [], [], []
    inside = {"refit": False}
    real_prepare, real_refit, real_ff = (runner.prepare_sets, study.refit_head_on_clean_,
                                         study.forward_features)

    def spy_prepare(*a, **kw):
        sets = real_prepare(*a, **kw)
        triggered.extend(sets["nt_trig"])
        return sets

    def spy_refit(model, tok, rows, L, head, seed, **kw):
        refit_rows.extend(rows)
        inside["refit"] = True
        try:
            return real_refit(model, tok, rows, L, head, seed, **kw)
        finally:
            inside["refit"] = False

    def spy_ff(model, tok, texts, *a, **kw):
        if inside["refit"]:
            refit_texts.extend(texts)
        return real_ff(model, tok, texts, *a, **kw)

    monkeypatch.setattr(runner, "prepare_sets", spy_prepare)
    monkeypatch.setattr(study, "refit_head_on_clean_", spy_refit)
    monkeypatch.setattr(study, "forward_features", spy_ff)
    monkeypatch.setattr(study, "ROOT", str(tmp_path))
    out = str(tmp_path / "out")
    variants = ["lora", "lora+head", "rora@top0", "rora@top1", "rora@top1+head",
                "rora@top1-attn+head", "rora@top3", "rora@top3-ffn+head"]
    res = {r["variant"]: r for r in study.run_cell_seed("cr", 0, variants, out, cache,
                                                        seeds_dir)}
    assert set(res) == set(variants)
    n_heads = sum(study.VARIANTS[v]["head"] for v in variants)
    assert len(refit_rows) == 16 * n_heads and refit_texts == [e.text for e in refit_rows]
    train = {(e.text, e.label) for e in load_dataset("cr", "train", limit=16, seed=0)}
    others = {e.text for split, n in (("dev", 16), ("test", 24))
              for e in load_dataset("cr", split, limit=n, seed=0)}
    proxy = {e.text for e in load_dataset("mr", "train", limit=16, seed=0)}
    trig = {e.text for e in triggered}
    assert trig
    for e in refit_rows:
        assert (e.text, e.label) in train, "the re-fit got a row that is not clean train data"
        assert e.text not in trig and e.text not in proxy and e.text not in others
    # the study's forward path gives the harness's metrics, and the reproduction check of
    # the committed runs holds (same adapter, same cached poisoned model)
    for v in ("lora", "rora@top0", "rora@top3"):
        assert res[v]["harness_evaluate_equal"] is True, v
        assert res[v]["reproduces_committed"] is True, v
    # the re-fit starts from, and leaves behind, the same head: plain variants do not move
    assert res["rora@top1+head"]["before_refit"] == res["rora@top1"]["metrics"]
    assert res["rora@top1"]["n_rescaled"] > 0 and res["rora@top0"]["n_rescaled"] == 0
    assert res["rora@top1-attn+head"]["n_rescaled"] < res["rora@top1"]["n_rescaled"]
    # resumable: a second call finds everything done and trains / re-fits nothing
    refit_rows.clear()
    assert study.run_cell_seed("cr", 0, variants, out, cache, seeds_dir) == []
    assert not refit_rows
    agg = study.write_aggregate(out)
    assert "rora@top1+head" in agg["cells"]["cr"]["variants"]
    assert os.path.exists(os.path.join(out, "aggregate.png"))
    with open(os.path.join(out, "aggregate.json")) as f:
        assert json.load(f)["cells"]["cr"]["variants"]["lora"]["CA"]["n"] == 1
