"""rora-fast report: the cross-setting overview table and figure, on hand-made result files."""

import json
import os

import pytest

from rora_fast.cli import main
from rora_harness.overview import collect_runs, overview_markdown, write_overview


def _run(task, attack, method, ca, asr, floor=10.0, targets="all-linear", finished=1.0):
    return {"kind": "defence",
            "spec": {"task": task, "attack": attack, "method": method, "preset": "small",
                     "seed": 0, "model": "m", "target_modules": targets},
            "metrics": {"CA": ca, "ASR": asr, "delta": ca - asr, "ASR_floor": floor},
            "poisoned_baseline": {"CA": 70.0, "ASR": 100.0, "ASR_floor": 8.0},
            "sizes": {"train": 20, "test": 10, "nt_trig": 5}, "finished_at": finished}


def _write(root, folder, name, obj):
    d = os.path.join(root, folder, "runs")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        json.dump(obj, f)


def test_overview_groups_settings_and_keeps_latest_rerun(tmp_path):
    root = str(tmp_path)
    _write(root, "a", "l.json", _run("sst2_sentence", "badnet", "lora", 85.0, 100.0))
    _write(root, "a", "r.json", _run("sst2_sentence", "badnet", "rora", 80.0, 6.0))
    _write(root, "a", "r2.json", _run("sst2_sentence", "badnet", "rora", 79.0, 5.0, finished=2))
    _write(root, "b/deeper", "c.json", _run("cr", "insent", "rora", 88.5, 3.25))
    _write(root, "b/deeper", "q.json", _run("cr", "insent", "lora", 88.0, 90.0, targets=None))
    _write(root, "a", "poisoned.json", {"kind": "poisoned-baseline"})  # not a defence: skipped
    runs = collect_runs(root)
    assert len(runs) == 5
    md = write_overview(root)
    assert os.path.exists(tmp_path / "overview.png") and "overview.png" in md
    # the SST-2 setting keeps the later rerun of rora (79 / 5 → Δ 74)
    sst2 = md[md.index("## sst2_sentence"):md.index("## cr")]
    assert "| rora | 79.00 | 5.00 | 74.00 |" in sst2 and "80.00" not in sst2
    # paper numbers beside ours; the PEFT-default targets form their own setting
    assert "92.46 / 7.48 / 84.98" in sst2
    assert "query,value (PEFT default)" in md and md.count("## cr") == 2
    glance = md[md.index("## Δ at a glance"):]
    assert "| setting | lora | rora |" in glance
    assert "| cr insent (all-linear, small, s0) |  | 85.25 |" in glance
    assert "| cr insent (qv, small, s0) | -2.00 |  |" in glance
    # BadNet settings come before InSent, SST-2 before CR
    assert md.index("## sst2_sentence") < md.index("## cr")


def test_overview_leaves_sensitivity_runs_out(tmp_path):
    root = str(tmp_path)
    _write(root, "a", "r.json", _run("sst2_sentence", "badnet", "rora", 80.0, 6.0))
    other = _run("sst2_sentence", "badnet", "rora", 60.0, 1.0, finished=5)
    other["spec"]["weight_dropout"] = 0.3  # a sweep run: newer, but not at the defaults
    _write(root, "sweep", "r.json", other)
    md = write_overview(root)
    assert "| rora | 80.00 | 6.00 | 74.00 |" in md and "60.00" not in md
    assert "1 run(s) with non-default hyperparameters" in md


def test_method_label_names_nondefault_hyperparameters():
    from rora_harness.presets import DEFENCE_DEFAULTS, method_label, nondefault_hparams
    spec = {"method": "rora", **DEFENCE_DEFAULTS}
    assert method_label(spec) == "rora" and nondefault_hparams(spec) == {}
    spec.update(weight_dropout=0.05, ortho_lambda=1.0)
    assert method_label(spec) == "rora (p=0.05, λ=1)"


def test_overview_empty_and_errors(tmp_path):
    assert "No defence runs found" in overview_markdown([])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_overview(str(tmp_path / "missing"))
    bad = tmp_path / "x" / "runs"
    bad.mkdir(parents=True)
    (bad / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        collect_runs(str(tmp_path))


def test_cli_report(tmp_path, capsys):
    _write(str(tmp_path), "s", "l.json", _run("cola", "badnet", "lora", 70.0, 100.0))
    assert main(["report", str(tmp_path), "--title", "T"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# T") and "| lora | 70.00 | 100.00 | -30.00 |" in out
    assert (tmp_path / "overview.md").read_text().startswith("# T")
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_overview_leaves_multi_seed_folders_out(tmp_path):
    """``seeds-*`` folders (rora-fast seeds) are reported by their own seeds.md."""
    from rora_harness.overview import collect_runs
    for folder in ("small-cr-badnet", "seeds-cr-badnet"):
        d = tmp_path / folder / "runs"
        d.mkdir(parents=True)
        (d / "a.json").write_text(json.dumps({"kind": "defence", "spec": {}}))
    assert [r["_path"] for r in collect_runs(str(tmp_path))] == ["small-cr-badnet/runs/a.json"]
