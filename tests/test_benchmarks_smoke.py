"""CI smoke test of the benchmark harness (not of performance).

Runs the ``tiny`` layer- and model-level cases through the real harness
(``pytest benchmarks/ --benchmark-only -k tiny --benchmark-json ...`` in a
subprocess) and checks that ``benchmarks/report.py`` turns the JSON into the
Markdown tables and the PNG chart.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("pytest_benchmark")


def _load_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_benchmark_and_report(tmp_path):
    out = tmp_path / "tiny.json"
    env = dict(os.environ, RORA_BENCH_DEVICE="cpu", RORA_BENCH_REPS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "benchmarks/bench_layer.py",
           "benchmarks/bench_model.py", "--benchmark-only", "-k", "tiny", "-q",
           "-p", "no:randomly", f"--benchmark-json={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert {"bench_layer[tiny-base-rep0]", "bench_layer[tiny-lora-rep0]",
            "bench_layer[tiny-rora-rep0]", "bench_model[tiny-lora-rep0]",
            "bench_model[tiny-rora-rep0]"} <= names, names
    assert not any("tiny" not in n for n in names)
    assert data["rora_bench"]["device"] == "cpu"

    md, png = tmp_path / "tiny.md", tmp_path / "tiny.png"
    report = _load_report()
    assert report.main([str(out), "--md", str(md), "--png", str(png)]) == 0
    text = md.read_text()
    assert "### Training iteration, PEFT LoRA vs RoRA" in text
    assert "### One adapted linear layer" in text
    row = next(line for line in text.splitlines() if line.startswith("| tiny (smoke)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3].replace(",", "")) > 0 and float(cells[4].replace(",", "")) > 0
    assert "pytest benchmarks/bench_layer.py" in text  # the command is recorded
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_host_overhead_case_counts_fewer_ops_than_peft(monkeypatch):
    """benchmarks/host_overhead.py end to end on the CPU with the fewest iterations (its
    timings are not checked: one iteration per block says nothing), two repetitions;
    and issue 11's op target on the launch-bound 24-layer BERT, which does not depend on
    timing: RoRA dispatches no more aten ops per iteration than PEFT LoRA."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import host_overhead

    fast_layer = host_overhead.time_layer
    monkeypatch.setattr(host_overhead, "time_layer",
                        lambda device: fast_layer(device, rounds=2, reps=2))
    res = host_overhead.run("cpu", blocks=2, block=1, repeats=2, pairs=4)
    assert res["ops_ratio_rora_over_lora"] <= 1.0, res["op_difference_rora_minus_lora"]
    for v in ("lora", "rora"):
        assert res["variants"][v]["adapted_layers"] == 48
    assert len(res["repetitions"]) == 2
    lo, mid, hi = res["across_repetitions"]["time_ratio_rora_over_lora"]["ratio_of_medians"]
    assert 0 < lo <= mid <= hi
    assert res["variants"]["rora"]["penalty_step"]["median_ms"] > 0
    paired = res["paired_iterations"]
    assert paired["pairs"] == 4 and paired["ci95"][0] <= paired["median_ratio"] <= paired["ci95"][1]
    json.dumps(res)  # what --json writes


def test_cost_model_counts_the_ops_the_code_issues():
    """benchmarks/cost_model.py (issue 32): per-layer FLOPs are the GEMMs' (the two base
    GEMMs dominate), RoRA with LoRA input dropout moves W four times more than PEFT (two
    masked copies, each read + write) and launches 17 kernels per layer against PEFT's 14."""
    from benchmarks import cost_model as cm
    K = N = 1024
    T, r = 4096, 8
    rora, peft = cm.rora_ops(K, N, T, r), cm.peft_ops(K, N, T, r)
    assert len(rora) == 17 and len(peft) == 14 and len(cm.rora_ops(K, N, T, r, lora_p=False)) == 10
    base = 2 * 2.0 * T * K * N
    # six rank-r GEMMs: S, the LoRA term of y, dyb, dX̃, dA, dB
    assert sum(o[1] for o in rora) == pytest.approx(base + 6 * 2.0 * T * r * K, rel=1e-9)
    w_bytes = sum(o[2] for o in rora if "mask W" in o[0])
    assert w_bytes == 4 * N * K * 2
    t = cm.roofline([("x", 1e12, 0.0)], 1e12, 1e12)
    assert t == pytest.approx(1.0)
    rows = cm.summarise(True)
    assert {row["case"] for row in rows} == {c[0] for c in cm.CASES}
