"""Host overhead of RoRA vs PEFT LoRA on a launch-bound model (issue 11).

The case: a 24-block BERT with hidden size 64 (4 heads; compute negligible, so the
iteration time is Python and dispatcher overhead), query/value adapted (48 layers),
r 8, alpha 16, lora_dropout 0.1; RoRA with weight_dropout 0.1, λ 10, k 4; AdamW;
batch 4 x 16 tokens; one iteration = forward, backward, ``optimizer.step()`` (which
adds RoRA's penalty gradient), ``zero_grad``.

Reported, per variant:

* **aten ops per adapted layer per iteration**: every op that reaches the dispatcher's
  Python mode (``TorchDispatchMode``: what runs kernels, after composite ops are
  decomposed; views included), for a whole iteration divided by the 48 adapted layers
  (so the frozen rest of the model is counted too: the *difference* between the two
  variants is what RoRA adds or saves per layer);
* **time per iteration**: median over ``--reps`` interleaved repetitions (LoRA, RoRA,
  LoRA, ... each ``--iters`` iterations), wall clock and process CPU time, and the
  ratio RoRA / LoRA per repetition (the ratios, not the absolute times, are what to
  compare on a shared machine; the CPU-time ratio is the steadier one there).

CUDA: ``--device cuda`` also counts kernel launches per adapted layer and splits one
iteration into GPU kernel time and wall time (``torch.profiler``). Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.host_overhead [--reps 7] [--iters 20] [--json F]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import common

NAME = "launch-bound"


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def build(variant: str, device: str):
    size = common.sizes(device)["model"][NAME]
    model, step, info = common.build_model_case(NAME, variant, device, size)
    return step, dict(info, adapted_layers=common.adapted_layers(model, variant))


def count_ops(step) -> collections.Counter:
    step()  # warm
    with _Count() as c:
        step()
    return c.ops


def profile_cuda(step) -> dict:
    """Kernel launches and the split of one iteration into GPU kernel time and wall time
    (torch.profiler, CUDA activity): ``kernel_ms / wall_ms`` near 1 means device-bound,
    near 0 host-bound."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.device_time for e in kernels)
    return {"kernels": len(kernels), "kernel_ms": round(kernel_us / 1e3, 3),
            "wall_ms_profiled": round(wall * 1e3, 3)}


def time_interleaved(steps: dict, reps: int, iters: int, device: str):
    """Wall time and process CPU time per iteration, ``reps`` interleaved repetitions.
    On a CPU shared with other jobs the process CPU time (single-threaded run) is the
    steadier of the two: time spent waiting for a core is not counted."""
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    for _ in range(reps):
        for k, step in steps.items():
            step()
            common.sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(iters):
                step()
            common.sync(device)
            wall[k].append((time.perf_counter() - t0) / iters)
            cpu[k].append((time.process_time() - c0) / iters)
    return wall, cpu


def run(device: str = "cpu", reps: int = 7, iters: int = 20) -> dict:
    steps, infos, ops = {}, {}, {}
    for variant in ("lora", "rora"):
        steps[variant], infos[variant] = build(variant, device)
        ops[variant] = count_ops(steps[variant])
    out = {"case": __doc__.split("\n\n")[1].strip(), "device": device,
           "torch": torch.__version__, "reps": reps, "iters": iters, "variants": {}}
    times, cpu = time_interleaved(steps, reps, iters, device)
    for v in steps:
        n = infos[v]["adapted_layers"]
        total = sum(ops[v].values())
        entry = {"adapted_layers": n, "aten_ops_per_iter": total,
                 "aten_ops_per_layer": round(total / n, 2),
                 "ms_per_iter_median": round(1e3 * statistics.median(times[v]), 3),
                 "ms_per_iter_all": [round(1e3 * t, 3) for t in times[v]],
                 "cpu_ms_per_iter_median": round(1e3 * statistics.median(cpu[v]), 3),
                 "top_ops": ops[v].most_common(12)}
        if device == "cuda":
            prof = profile_cuda(steps[v])
            entry["kernels_per_layer"] = round(prof["kernels"] / n, 2)
            entry["profile"] = prof
        out["variants"][v] = entry
    for key, t in (("time_ratio_rora_over_lora", times), ("cpu_time_ratio_rora_over_lora", cpu)):
        ratios = [r / l for r, l in zip(t["rora"], t["lora"])]
        out[key] = {"median": round(statistics.median(ratios), 3),
                    "per_rep": [round(x, 3) for x in ratios]}
    out["ops_ratio_rora_over_lora"] = round(
        out["variants"]["rora"]["aten_ops_per_iter"] / out["variants"]["lora"]["aten_ops_per_iter"],
        3)
    diff = collections.Counter(ops["rora"])
    diff.subtract(ops["lora"])
    out["op_difference_rora_minus_lora"] = {k: v for k, v in sorted(
        diff.items(), key=lambda kv: -abs(kv[1])) if v}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=common.bench_device())
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None, help="write the result here too")
    a = ap.parse_args(argv)
    if a.reps < 1 or a.iters < 1:
        ap.error("--reps and --iters must be >= 1")
    res = run(a.device, a.reps, a.iters)
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
