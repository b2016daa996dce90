"""Peak memory of one training iteration, measured in a fresh process.

``python -m benchmarks._memory_case MODEL VARIANT`` builds the model-level case of
``benchmarks.common`` (no warm-up), then measures two iterations and prints one JSON
line: ``first`` (includes the allocation of the AdamW state) and ``steady`` (the
second iteration).

* CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocated bytes just before
  the iteration (peak statistics reset before it).
* CPU: the process's peak RSS (``VmHWM``, reset before the iteration by writing 5 to
  ``/proc/self/clear_refs``) minus its RSS just before the iteration. Where the reset
  is not allowed, a 1 ms psutil polling thread gives the peak instead.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import threading
import time


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Poller:
    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure(step, device: str) -> dict:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - before,
                "method": "torch.cuda.max_memory_allocated"}
    before = _rss()
    if _reset_hwm():
        step()
        return {"peak_bytes": _hwm() - before, "method": "VmHWM (clear_refs reset) - VmRSS"}
    with _Poller() as p:
        step()
    return {"peak_bytes": p.peak - before, "method": "psutil RSS polling (1 ms)"}


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    model_name, variant = argv[0], argv[1]
    from benchmarks import common

    device = common.bench_device()
    model, step, info = common.build_model_case(model_name, variant, device)
    gc.collect()
    baseline = _rss() if device == "cpu" else None
    first = measure(step, device)
    steady = measure(step, device)
    out = dict(info, first=first, steady=steady, rss_after_build=baseline,
               ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               loadavg=common.loadavg())
    print("RORA_MEMORY_JSON " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
