"""scripts/eval/retrain_summary.py (issue 24): paired differences and targets are computed
on the seeds both rows share, and a row meets the targets exactly when its means do."""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "scripts", "eval", "retrain_summary.py")


@pytest.fixture()
def summary(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("retrain_summary", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "REL", str(tmp_path))
    monkeypatch.setattr(mod, "STUDY", str(tmp_path / "retrain-study"))
    return mod


def _agg(path, variants):
    """An aggregate.json as posthoc_study writes it: {variant: {seed: (CA, ASR, floor)}}."""
    cells = {"sst2_sentence": {"variants": {
        v: {"per_seed": {str(s): {"CA": m[0], "ASR": m[1], "ASR_floor": m[2]}
                         for s, m in per.items()}} for v, per in variants.items()}}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"cells": cells}, f)


def test_pairs_on_common_seeds_and_checks_targets(summary, tmp_path):
    lora = {0: (86.0, 100.0, 10.0), 1: (84.0, 100.0, 12.0), 2: (85.0, 100.0, 11.0)}
    _agg(str(tmp_path / "posthoc-study" / "aggregate.json"),
         {"lora": lora, "rora@top3": {0: (80.0, 20.0, 18.0), 1: (79.0, 30.0, 20.0),
                                      2: (81.0, 25.0, 19.0)}})
    # a retrained variant on seeds 0 and 1 only: one that meets all targets on them
    _agg(str(tmp_path / "retrain-study" / "posthoc-ep12" / "aggregate.json"),
         {"lora": {s: lora[s] for s in (0, 1)},
          "rora@top2": {0: (85.5, 14.0, 12.0), 1: (83.8, 16.0, 13.0)},
          "rora@top3": {0: (84.0, 30.0, 12.0), 1: (83.0, 10.0, 13.0)}})
    # like for like (issue 29): LoRA trained 12 epochs, seeds 0 and 1, in the ep12 folder
    runs = tmp_path / "retrain-study" / "ep12-sst2_sentence" / "runs"
    os.makedirs(runs)
    for seed, (ca, asr, fl) in {0: (85.9, 100.0, 10.0), 1: (83.9, 100.0, 12.0)}.items():
        with open(runs / f"lora-s{seed}.json", "w") as f:
            json.dump({"kind": "defence", "spec": {"method": "lora", "seed": seed},
                       "metrics": {"CA": ca, "ASR": asr, "ASR_floor": fl}}, f)
    s = summary.summarise()
    rows = {(r["training"], r["depth"]): r for r in s["cells"]["sst2_sentence"]["rows"]}
    top2 = rows[("ep12", "rora@top2")]
    assert top2["seeds"] == [0, 1] and top2["reference"] == "LoRA, 12 epochs"
    assert top2["minus_lora"]["seeds"] == [0, 1]
    assert top2["minus_lora"]["CA"]["mean"] == pytest.approx(((85.5 - 85.9) + (83.8 - 83.9)) / 2)
    assert top2["minus_default"]["ASR"]["mean"] == pytest.approx(((14 - 20) + (16 - 30)) / 2)
    t = top2["targets"]
    # CA 84.65 >= (85.9 + 83.9) / 2 - 1 = 83.9; ASR 15 <= 12.5 + 5; floor 12.5 <= 11 + 5
    assert t["CA"]["met"] and t["ASR"]["met"] and t["floor"]["met"] and t["all_met"]
    top3 = rows[("ep12", "rora@top3")]
    assert top3["targets"]["CA"]["met"] is False
    assert top3["targets"]["CA"]["miss_by"] == pytest.approx(83.9 - 83.5)
    assert top3["targets"]["ASR"]["met"] is False  # 20 > 12.5 + 5
    default = rows[("default", "rora@top3")]
    assert "minus_default" not in default and default["seeds"] == [0, 1, 2]
    assert default["reference"] == "LoRA, 4 epochs" and default["reference_seeds"] == [0, 1, 2]
    assert set(s["cells"]["sst2_sentence"]["lora"]) == {"LoRA, 4 epochs", "LoRA, 12 epochs"}
    md = summary.markdown(s)
    assert "ep12 rora@top2 (seeds [0, 1])" in md and "LoRA, 12 epochs (0,1)" in md
