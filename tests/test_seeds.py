"""``rora-fast seeds`` (issue 14, item 1): statistics, resumability, reuse, post-hoc
rescaling of a PEFT LoRA adapter, the aggregate files, the bias analysis; training only on a
tiny random BERT (fast)."""
import glob
import json
import math
import os

import pytest
import torch

from rora_harness import seeds as seeds_mod
from rora_harness.runner import RunSpec, run_id
from rora_harness.seeds import (aggregate, mean_ci, parse_seeds, rescale_peft_lora_,
                                        run_seeds, t_quantile_975, write_aggregate)


def test_mean_ci_is_a_t_interval():
    st = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert st["n"] == 5 and st["mean"] == 3.0
    assert st["sd"] == pytest.approx(math.sqrt(2.5), abs=1e-3)
    assert st["ci95_half"] == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), abs=1e-3)
    assert mean_ci([7.0])["ci95_half"] is None and mean_ci([7.0])["mean"] == 7.0
    assert mean_ci([])["n"] == 0
    assert t_quantile_975(1) == 12.706 and t_quantile_975(100) == 1.96
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("2,0,2,5-6") == [2, 0, 5, 6]
    for bad in ("", "a", "3-1", "-1", "1-x"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def _fake_run(out, method, seed, ca, asr, floor, adapter=True):
    spec = RunSpec(task="cr", method=method, preset="small", seed=seed)
    rid = run_id(spec)
    r = {"kind": "defence", "run_id": rid, "spec": spec.resolved(),
         "metrics": {"CA": ca, "ASR": asr, "delta": round(ca - asr, 2), "ASR_floor": floor}}
    if method == "rora":
        r["before_rescale"] = {"CA": ca + 5, "ASR": 100.0, "delta": ca - 95, "ASR_floor": 10.0}
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    with open(os.path.join(out, "runs", rid + ".json"), "w") as f:
        json.dump(r, f)
    if adapter:
        os.makedirs(os.path.join(out, "adapters"), exist_ok=True)
        open(os.path.join(out, "adapters", rid + ".safetensors"), "wb").close()
    return spec


def test_aggregate_paired_differences_and_files(tmp_path):
    out = str(tmp_path)
    for s, (la, ra) in enumerate([(86.0, 80.0), (85.0, 79.0), (87.0, 82.0)]):
        _fake_run(out, "lora", s, la, 100.0, 10.0)
        _fake_run(out, "rora", s, ra, 8.0 + s, 6.0 + s)
    agg = write_aggregate(out)
    assert agg["methods"]["lora"]["CA"]["mean"] == 86.0
    assert agg["methods"]["rora"]["seeds"] == [0, 1, 2]
    d = agg["paired"]["rora - lora"]
    assert d["per_seed"]["0"]["CA"] == -6.0 and d["CA"]["mean"] == pytest.approx(-5.667, abs=1e-3)
    assert agg["methods"]["rora"]["before_rescale"]["ASR"]["mean"] == 100.0
    assert "t-interval" in agg["interval"]
    for fn in ("seeds.json", "seeds.md", "seeds.png"):
        assert os.path.getsize(os.path.join(out, fn)) > 0
    md = open(os.path.join(out, "seeds.md")).read()
    assert "| rora - lora | 3 | -5.67 ±" in md and "runs/cr-badnet-rora-small-s2-" in md


def test_run_seeds_resumes_reuses_and_keeps_order(tmp_path, monkeypatch):
    """Trained runs go through run_defence (faked here): a run reused from another folder
    is copied, a finished one skipped; post-hoc variants follow the run they start from."""
    calls = []
    reuse = str(tmp_path / "old")
    _fake_run(reuse, "lora", 0, 86.0, 100.0, 10.0, adapter=False)

    def fake_defence(spec, out_dir, cache_dir, log=print, adapter_dir=None, **kw):
        path = os.path.join(out_dir, "runs", run_id(spec) + ".json")
        if os.path.exists(path):
            calls.append(("skip", spec.method, spec.seed))
            return json.load(open(path))
        calls.append(("train", spec.method, spec.seed))
        assert adapter_dir == os.path.join(out_dir, "adapters")
        _fake_run(out_dir, spec.method, spec.seed, 80.0, 10.0, 9.0)

    def fake_posthoc(spec, variant, out_dir, cache_dir, log=print, force=False):
        calls.append(("posthoc", variant, spec.seed))

    monkeypatch.setattr("rora_harness.runner.run_defence", fake_defence)
    monkeypatch.setattr(seeds_mod, "run_posthoc", fake_posthoc)
    out = str(tmp_path / "new")
    base = RunSpec(task="cr", preset="small")
    run_seeds(base, ["lora", "lora+rescale", "rora"], [0, 1], out, None, reuse=[reuse],
              log=lambda *a: None)
    assert calls == [("skip", "lora", 0), ("posthoc", "lora+rescale", 0), ("train", "rora", 0),
                     ("train", "lora", 1), ("posthoc", "lora+rescale", 1), ("train", "rora", 1)]
    calls.clear()
    run_seeds(base, ["lora", "rora"], [0, 1], out, None, log=lambda *a: None)
    assert [c[0] for c in calls] == ["skip"] * 4
    with pytest.raises(ValueError, match="add lora"):
        run_seeds(base, ["lora+rescale"], [0], out, None)


def test_rescale_peft_lora_sets_sigma_ratio_in_top_blocks(minilm_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    m = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    pm = get_peft_model(m, LoraConfig(r=4, target_modules=["query", "dense"],
                                      task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(0)
    for mod in pm.modules():
        if hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_B", {}):
            with torch.no_grad():
                mod.lora_B["default"].weight.copy_(
                    torch.randn(mod.lora_B["default"].weight.shape, generator=g) * 0.01)
    scales = rescale_peft_lora_(pm, 2)
    assert scales and all(".layer.4." in n or ".layer.5." in n for n in scales)
    assert not any("pooler" in n for n in scales)
    n, s = next(iter(scales.items()))
    mod = pm.get_submodule(n)
    BA = (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach()
    expect = torch.linalg.matrix_norm(mod.base_layer.weight.detach(), 2) / torch.linalg.matrix_norm(BA, 2)
    assert s == pytest.approx(float(expect), rel=1e-4) and mod.scaling["default"] == s
    untouched = [mm for nn_, mm in pm.named_modules()
                 if ".layer.0." in nn_ and hasattr(mm, "scaling") and isinstance(mm.scaling, dict)]
    assert untouched and all(mm.scaling["default"] == pytest.approx(8 / 4) for mm in untouched)
    assert rescale_peft_lora_(pm, 0) == {}


def test_prediction_balance_is_exact():
    from rora_harness.bias import prediction_balance
    # 10 rows: 4 target (label 0), 6 non-target; predictions: 3 of 4 target rows right,
    # 2 of 6 non-target rows predicted as the target -> CA 7/10, floor 2/6
    b = prediction_balance({"CA": 70.0, "ASR_floor": round(100 * 2 / 6, 2), "n_clean": 10,
                            "n_triggered": 6})
    assert b["pred_target_share"] == 50.0 and b["true_target_share"] == 40.0
    assert b["target_recall"] == 75.0


@pytest.fixture
def tiny_bert(make_tiny_bert):
    return make_tiny_bert(4)


def test_seeds_end_to_end_on_a_tiny_model(tiny_bert, tmp_path, capsys):
    """rora-fast seeds -> adapters kept -> post-hoc variants -> aggregate -> rora-fast bias,
    on a 4-block random BERT and a few rows (the plumbing, not the numbers)."""
    from rora_fast.cli import main
    out = str(tmp_path / "seeds")
    args = ["seeds", "--task", "cr", "--model", tiny_bert, "--cache-dir", str(tmp_path / "c"),
            "--n-train", "16", "--n-dev", "16", "--n-test", "24", "--epochs", "1",
            "--max-length", "32", "--ortho-rank", "4", "--poison-n-train", "16",
            "--poison-epochs", "1", "--poison-asr-threshold", "-1", "--poison-min-clean-acc",
            "0", "--threads", "1", "--device", "cpu", "--rescale", "paper", "--out", out]
    assert main([*args, "--methods", "lora,lora+rescale,rora,rora+repair", "--no-repair",
                 "--seeds", "0-1"]) == 0
    agg = json.load(open(os.path.join(out, "seeds.json")))
    assert set(agg["methods"]) == {"lora", "lora+rescale", "rora", "rora+repair"}
    assert all(m["seeds"] == [0, 1] for m in agg["methods"].values())
    assert agg["methods"]["rora"]["CA"]["ci95_half"] is not None
    assert len(os.listdir(os.path.join(out, "adapters"))) == 4
    post = json.load(open(glob.glob(os.path.join(out, "runs", "*+repair.json"))[0]))
    assert post["repair"]["n_dev"] == 16 and post["before_repair"]["n_clean"] == 24
    res = json.load(open(glob.glob(os.path.join(out, "runs", "*+rescale.json"))[0]))
    assert res["rescale"] and not any(".layer.0." in n for n in res["rescale"])  # top 3 of 4
    # resumable: a second call trains nothing (every run is skipped)
    capsys.readouterr()
    assert main([*args, "--methods", "lora,rora", "--seeds", "0-1", "--no-repair"]) == 0
    assert capsys.readouterr().out.count("skip ") == 4
    assert main(["seeds", "--out", out, "--aggregate-only"]) == 0
    # the adaptive rescale from the saved adapter equals a trained `defend --rescale adaptive`
    capsys.readouterr()
    assert main([*args, "--methods", "rora,rora+adaptive", "--seeds", "0-1", "--no-repair"]) == 0
    agg = json.load(open(os.path.join(out, "seeds.json")))
    assert agg["methods"]["rora+adaptive"]["seeds"] == [0, 1]
    assert "rora+adaptive - rora" in agg["paired"]
    post = json.load(open(glob.glob(os.path.join(out, "runs", "*s0-*+adaptive.json"))[0]))
    from rora_harness.presets import PRESETS
    assert [s["factor"] for s in post["adaptive_rescale"]["steps"]] == list(
        PRESETS["small"].rescale_factors)  # the preset's ladder, as `defend --rescale adaptive`
    assert args[0] == "seeds" and args[-2:] == ["--out", out]
    assert main(["defend", *args[1:-2], "--out", str(tmp_path / "defend"),
                 "--methods", "rora", "--seed", "0", "--rescale", "adaptive", "--no-repair"]) == 0
    trained = [json.load(open(p)) for p in glob.glob(str(tmp_path / "defend" / "runs" / "*.json"))
               if "poisoned-" not in p][0]
    assert trained["adaptive_rescale"] == post["adaptive_rescale"]
    assert trained["metrics"] == post["metrics"]
    # and the repair: `defend --repair` equals the post-hoc rora+repair of the same run
    post = json.load(open(glob.glob(os.path.join(out, "runs", "*s0-*+repair.json"))[0]))
    assert main(["defend", *args[1:-2], "--out", str(tmp_path / "defend-repair"),
                 "--methods", "rora", "--seed", "0", "--repair"]) == 0
    trained = [json.load(open(p)) for p in glob.glob(str(tmp_path / "defend-repair" / "runs" /
                                                         "*.json")) if "poisoned-" not in p][0]
    assert trained["repair"] == post["repair"] and trained["metrics"] == post["metrics"]
    # the bias analysis from the saved adapters
    assert main(["bias", out, "--cache-dir", str(tmp_path / "c"), "--threads", "1"]) == 0
    b = json.load(open(os.path.join(out, "bias", "bias.json")))
    rora = [r for r in b["runs"] if r["method"] == "rora"][0]
    assert list(rora["states"]) == ["none", "block 1", "block 2", "block 3", "top 1", "top 2",
                                    "top 3", "top 3 + repair"]
    assert rora["states"]["top 1"] == rora["states"]["block 3"]
    for fn in ("bias.md", "bias_share.png", "bias_margin.png"):
        assert os.path.exists(os.path.join(out, "bias", fn))
