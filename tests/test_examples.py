"""The examples run as README says (``--tiny`` on a CPU) and write where they say."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def test_llama_trainer_tiny_writes_under_runs(tmp_path):
    proc = _run("llama_trainer.py", "--tiny", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = re.search(r"^\{$", proc.stdout, re.M).start()  # the final, indented summary
    summary = json.loads(proc.stdout[start:])
    assert summary["steps"] == 6 and summary["rescaled"]
    out = tmp_path / "runs" / "examples" / "llama_trainer"
    # the default output folder is per example and under the git-ignored runs/
    assert Path(summary["saved"]) == Path("runs/examples/llama_trainer/rora_adapter")
    assert (out / "rora_adapter").is_dir() and (out / "peft_adapter").is_dir()
    assert not (tmp_path / "rora_example_out").exists()
