"""The multi-seed results the demo shows beside its single run (harness/rora_harness/
reference_runs.py, scripts/eval/reference_runs.py)."""
import json
import os
import subprocess
import sys

from rora_harness import reference_runs as R
from rora_harness.runner import RunSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seeds_folder(tmp_path, specs, metrics):
    runs = tmp_path / "runs"
    runs.mkdir(parents=True)
    per_seed = {}
    for spec, met in zip(specs, metrics):
        name = f"runs/r{spec['seed']}.json"
        (tmp_path / name).write_text(json.dumps({"kind": "defence", "spec": spec,
                                                 "metrics": met}))
        per_seed[str(spec["seed"])] = {"file": name}
    (tmp_path / "seeds.json").write_text(json.dumps({"methods": {"rora": {"per_seed":
                                                                           per_seed}}}))
    return tmp_path


def test_key_ignores_only_the_seed():
    a = RunSpec(method="rora", seed=0).resolved()
    b = RunSpec(method="rora", seed=3).resolved()
    c = RunSpec(method="rora", seed=0, ortho_lambda=5.0).resolved()
    assert R.setting_key(a) == R.setting_key(b) != R.setting_key(c)


def test_generator_and_lookup(tmp_path, monkeypatch):
    specs = [dict(RunSpec(method="rora", seed=s).resolved()) for s in range(3)]
    mets = [{"CA": 80.0 + s, "ASR": 10.0 * s, "ASR_floor": 5.0} for s in range(3)]
    folder = _seeds_folder(tmp_path / "seeds", specs, mets)
    out = tmp_path / "ref.json"
    sys.path.insert(0, os.path.join(ROOT, "scripts", "eval"))
    try:
        import reference_runs as gen
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(R, "REFERENCE_FILE", str(out))
    entries = list(gen.entries_of(str(folder)))
    assert len(entries) == 1 and entries[0]["seeds"] == [0, 1, 2]
    ca = entries[0]["metrics"]["CA"]
    assert (ca["mean"], ca["min"], ca["max"], ca["n"]) == (81.0, 80.0, 82.0, 3)
    out.write_text(json.dumps({"entries": entries}))
    hit = R.reference_for(RunSpec(method="rora", seed=7).resolved(), str(out))
    assert hit is not None and hit["method"] == "rora"
    assert R.reference_for(RunSpec(method="rora", seed=0, r=4).resolved(), str(out)) is None
    line = R.format_reference("rora", hit)
    assert "3 seeds (0,1,2)" in line and "CA 81.00 ± " in line and "range 80.00–82.00" in line
    assert "no multi-seed result" in R.format_reference("lora", None)


def test_generator_refuses_seeds_of_different_settings(tmp_path):
    specs = [dict(RunSpec(method="rora", seed=0).resolved()),
             dict(RunSpec(method="rora", seed=1, ortho_lambda=1.0).resolved())]
    mets = [{"CA": 80.0, "ASR": 10.0, "ASR_floor": 5.0}] * 2
    folder = _seeds_folder(tmp_path / "seeds", specs, mets)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import reference_runs as g; "
            "list(g.entries_of(sys.argv[2]))")
    p = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "scripts", "eval"),
                        str(folder)], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "differ beyond the seed" in p.stderr


def test_shipped_file_parses_and_names_committed_sources():
    data = R._load()
    for e in data["entries"]:
        assert os.path.isdir(os.path.join(ROOT, e["source"])), e["source"]
        assert set(e["metrics"]) == set(R.METRICS)


def test_the_demo_default_has_its_own_multi_seed_results_shipped():
    """Issue 29: `rora-fast demo` prints beside its one draw the 5-seed spread of exactly
    its configuration (every method it runs, the preset's repair included), and LoRA's of
    the same schedule when it does not train LoRA itself."""
    from rora_fast.cli import build_parser
    from rora_harness.cli import _spec
    args = build_parser().parse_args(["demo"])
    for m in args.methods.split(",") + ["lora"]:
        spec = _spec(args, m).resolved()
        e = R.reference_for(spec)
        assert e is not None, f"no shipped multi-seed result for the demo's {m}"
        assert len(e["seeds"]) == 5 and e["spec"] == {k: v for k, v in spec.items() if k != "seed"}


def test_study_entries_are_the_trained_configuration_of_their_rung(tmp_path, monkeypatch):
    """``study:SCHEDULE:FACTOR:repair``: the adaptive study's rung, entered under the spec of
    ``defend --rescale-factor FACTOR --repair`` of the same runs (one entry per cell)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts", "eval"))
    try:
        import reference_runs as gen
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(gen, "ROOT", str(tmp_path))
    runs = tmp_path / "benchmarks" / "results" / "eval" / "adaptive-study" / "runs"
    runs.mkdir(parents=True)
    (tmp_path / "trained").mkdir()
    for s in (0, 1):
        spec = RunSpec(task="cr", method="rora", preset="small", seed=s, rescale="paper",
                       repair=False, group_by_length=True).resolved()
        (tmp_path / "trained" / f"r{s}.json").write_text(json.dumps({"spec": spec}))
        rungs = [{"layers": 0, "factor": 0.0}] + [
            {"layers": 3, "factor": f, "test": {"CA": 80.0 + f, "ASR": 20.0, "ASR_floor": 9.0},
             "test_repaired": {"CA": 84.0 + s, "ASR": 12.0 + s, "ASR_floor": 10.0}}
            for f in (0.5, 0.75, 1.0)]
        (runs / f"ep12g-cr-s{s}.json").write_text(json.dumps(
            {"schedule": "ep12g", "cell": "cr", "seed": s, "rungs": rungs,
             "from_run": f"trained/r{s}.json"}))
    (e,) = gen.study_entries("study:ep12g:0.75:repair")
    want = RunSpec(task="cr", method="rora", preset="small", seed=0, group_by_length=True,
                   repair=True, rescale="paper", rescale_factor=0.75).resolved()
    assert e["spec"] == {k: v for k, v in want.items() if k != "seed"}
    assert e["setting_key"] == R.setting_key(want) and e["seeds"] == [0, 1]
    assert e["metrics"]["CA"]["mean"] == 84.5 and e["metrics"]["ASR"]["max"] == 13.0
    (plain,) = gen.study_entries("study:ep12g:0.75")
    assert plain["metrics"]["CA"]["mean"] == 80.75 and plain["method"] == "rora"
    # the adaptive rule, judged after the repair: replayed on the recorded dev accuracies
    for s in (0, 1):
        p = runs / f"ep12g-cr-s{s}.json"
        rec = json.loads(p.read_text())
        rec["rungs"][0]["dev_acc_repaired"] = 80.0
        for r, acc in zip(rec["rungs"][1:], (79.0, 79.5 - s, 70.0)):
            r["dev_acc_repaired"] = acc  # x0.75 within 1 point at seed 0 only
            r["test_repaired"]["CA"] = 90.0 + 10 * r["factor"]
        p.write_text(json.dumps(rec))
    (ad,) = gen.study_entries("study:ep12g:adaptive:0.5,0.75,1:1:repair")
    want = RunSpec(task="cr", method="rora", preset="small", seed=0, group_by_length=True,
                   repair=True, rescale="adaptive", rescale_factors=(0.5, 0.75, 1.0),
                   rescale_tolerance=1.0).resolved()
    assert ad["spec"] == {k: v for k, v in want.items() if k != "seed"}
    assert ad["spec"]["rescale_judge"] == "repaired"
    assert ad["metrics"]["CA"]["mean"] == 96.25  # seed 0: x0.75 (97.5), seed 1: x0.5 (95)
