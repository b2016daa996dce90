"""Memory: peak memory of one training iteration, PEFT LoRA vs RoRA, one fresh
subprocess per case (``benchmarks/_memory_case.py`` says how it is measured). The
figures are in each entry's ``extra_info`` (``first``/``steady`` peak bytes); the time
pytest-benchmark records for these entries is the subprocess's whole wall time
(imports, model build, two iterations) and means nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common

DEVICE = common.bench_device()
MODELS = ["tiny", "bert-large", "roberta-large", "llama-7b"]
VARIANTS = ["lora", "rora"]
CASES = [(m, v) for m in MODELS for v in VARIANTS]
ROOT = Path(__file__).resolve().parent.parent


def run_case(model: str, variant: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks._memory_case", model, variant],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("RORA_MEMORY_JSON "):
            return json.loads(line[len("RORA_MEMORY_JSON "):])
    raise RuntimeError(f"memory case {model}/{variant} failed (rc {proc.returncode}):\n"
                       f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize("model,variant", CASES, ids=[f"{m}-{v}" for m, v in CASES])
def bench_memory(benchmark, model, variant):
    benchmark.group = "memory"
    result = {}

    def run():
        result.update(run_case(model, variant))

    benchmark.extra_info["loadavg_before"] = common.loadavg()
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result, kind="memory", note="time = subprocess wall, ignore")
