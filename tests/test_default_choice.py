"""Issue 29: the harness's default is the best configuration measured. The presets choose
what scripts/eval/default_choice.py picks from the committed run files (the complete
harness configuration with the best worst margin to the three targets over SST-2 and CR,
5 seeds, against LoRA of the same schedule)."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "default_choice", os.path.join(ROOT, "scripts", "eval", "default_choice.py"))
dc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dc)


def test_presets_run_the_best_measured_configuration():
    from rora_harness.presets import PRESETS
    rows = dc.margins(dc.per_seed_tables())
    pick = dc.choose(rows)
    fields = rows[pick]["harness"]
    for name in ("small", "demo"):
        assert {"rescale": PRESETS[name].rescale, "repair": PRESETS[name].repair,
                "epochs": PRESETS[name].epochs,
                "group_by_length": PRESETS[name].group_by_length,
                "rescale_factor": PRESETS[name].rescale_factor,
                "rescale_tolerance": PRESETS[name].rescale_tolerance,
                "rescale_factors": tuple(PRESETS[name].rescale_factors)} == fields, name
    # rora-fast train / finetune() defaults: the same configuration
    from rora_fast import FinetuneConfig
    d = FinetuneConfig()
    assert {"rescale": d.rescale, "repair": d.repair, "epochs": d.epochs,
            "group_by_length": d.group_by_length, "rescale_factor": d.rescale_factor,
            "rescale_tolerance": d.rescale_tolerance,
            "rescale_factors": tuple(d.rescale_factors)} == fields
    # it is complete and at least as good as the paper's rule alone
    assert rows[pick]["complete"]
    assert rows[pick]["worst_margin"] >= rows["rora (paper rule)"]["worst_margin"]


def test_margins_and_choice_on_hand_made_numbers():
    lora = {c: {s: {"CA": 86.0, "ASR": 100.0, "ASR_floor": 10.0} for s in dc.SEEDS}
            for c in dc.CELLS}
    good = {c: {s: {"CA": 85.5, "ASR": 12.0, "ASR_floor": 11.0} for s in dc.SEEDS}
            for c in dc.CELLS}
    bad = {c: {s: {"CA": 80.0, "ASR": 12.0, "ASR_floor": 11.0} for s in dc.SEEDS}
           for c in dc.CELLS}
    partial = {"sst2_sentence": {0: {"CA": 90.0, "ASR": 0.0, "ASR_floor": 0.0}}}
    rows = dc.margins({"lora": lora, "rora + repair": good, "rora (paper rule)": bad,
                       "rora, adaptive rescale": partial})
    assert rows["rora + repair"]["cells"]["cr"]["margins"] == {
        "CA": pytest.approx(0.5), "ASR": pytest.approx(4.0), "floor": pytest.approx(4.0)}
    assert rows["rora (paper rule)"]["worst_margin"] == pytest.approx(-5.0)
    assert not rows["rora, adaptive rescale"]["complete"]
    assert dc.choose(rows) == "rora + repair"
    # a configuration of another schedule is judged against LoRA of that schedule
    lora12 = {c: {s: {"CA": 80.0, "ASR": 100.0, "ASR_floor": 10.0} for s in dc.SEEDS}
              for c in dc.CELLS}
    rows = dc.margins({"lora": lora, dc.LORA12: lora12, "rora + repair, 12 epochs": bad})
    assert rows["rora + repair, 12 epochs"]["reference"] == dc.LORA12
    assert rows["rora + repair, 12 epochs"]["cells"]["cr"]["margins"]["CA"] == pytest.approx(1.0)
