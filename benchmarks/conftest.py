"""pytest configuration of the benchmark suite.

* The device is picked once, at collection (CUDA when present, else CPU; override
  with ``RORA_BENCH_DEVICE``), and every case's sizes come from
  :func:`benchmarks.common.sizes` for that device.
* The ``tiny`` cases exist for the CI smoke test; they are deselected unless the
  ``-k`` expression names them.
* The SVD-basis disk cache points at a fresh temporary folder for the session, so a
  run never measures a cache warmed by an earlier run (set-up cases pass their own
  cache folders explicitly).
* The JSON written by ``--benchmark-json`` gains a ``rora_bench`` block: the command
  line, device, sizes, load averages at start and end, torch/transformers/peft versions.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import tempfile
import time

import pytest

from benchmarks import common

_STATE = {}
_ENV_KEYS = ("RORA_FAST_BACKEND", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def pytest_configure(config):
    _STATE["device"] = common.bench_device()
    _STATE["loadavg_start"] = common.loadavg()
    _STATE["t0"] = time.time()
    _STATE["cache"] = tempfile.mkdtemp(prefix="rora-bench-svd-")
    _STATE["git_start"] = common.git_state()
    os.environ["RORA_FAST_CACHE_DIR"] = _STATE["cache"]
    os.environ.pop("RORA_FAST_CACHE", None)


def pytest_report_header(config):
    s = common.sizes(_STATE["device"])
    return [f"rora-fast benchmarks: device={_STATE['device']} dtype={s['dtype']} "
            f"reps={common.reps()} loadavg={_STATE['loadavg_start']}"]


def pytest_collection_modifyitems(config, items):
    keyword = config.getoption("keyword") or ""
    if "tiny" in keyword:
        return
    keep, drop = [], []
    for item in items:
        (drop if "tiny" in item.name else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def bench_device():
    return _STATE["device"]


@pytest.fixture(scope="session")
def bench_sizes(bench_device):
    return common.sizes(bench_device)


def _native_mask():
    try:
        from rora_fast import reference

        return bool(getattr(reference, "native_mask_available", lambda: False)())
    except Exception:  # noqa: BLE001
        return None


def _versions():
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "peft", "rora_fast", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    return out


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    import torch

    dev = _STATE["device"]
    env = {k: v for k, v in os.environ.items()
           if k.startswith("RORA_BENCH") or k in _ENV_KEYS}
    prefix = [f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    info = {
        "command": " ".join(prefix + [shlex.quote(a) for a in ["pytest"] + sys.argv[1:]]),
        "cwd": os.getcwd(),
        "device": dev,
        "device_name": (torch.cuda.get_device_name(0) if dev == "cuda" else _cpu_name()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "sizes": common.sizes(dev),
        "reps": common.reps(),
        "loadavg_start": _STATE["loadavg_start"],
        "loadavg_end": common.loadavg(),
        "wall_s": round(time.time() - _STATE["t0"], 1),
        "versions": _versions(),
        "git_start": _STATE.get("git_start"),
        "native_mask": _native_mask(),
        "env": env,
    }
    output_json["rora_bench"] = info
