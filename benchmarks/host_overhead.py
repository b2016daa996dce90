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
* **time per iteration**: single iterations timed in alternating blocks (``--blocks``
  blocks of ``--block`` iterations per variant), wall clock and process CPU time;
  reported as the ratio RoRA / LoRA of the medians, of the 10th percentiles (the
  least-disturbed iterations), the median of the paired ratios, and of the medians of
  the per-block minima (``ratio_of_block_minima``: noise from other jobs only adds
  time). Compare ratios, not milliseconds; on a shared machine even these move by
  several percent from run to run;
* **one adapted layer** (``single_layer``): forward + backward of one 64→64 layer alone,
  the fastest call of each of 30 interleaved rounds (see :func:`time_layer`): the
  per-layer host cost without the rest of the model (it too moves between runs on a
  shared machine);
* **the penalty step** (RoRA): the optimizer step pre-hook alone, for all 48 layers;
* **paired single iterations** (``--pairs N``, default 800): the two variants' iterations
  alternating one by one (A B, B A, ...), each RoRA iteration divided by the LoRA
  iteration beside it, N such ratios: their median with a 95 % bootstrap interval. Two
  iterations ~0.1 s apart see the same machine speed, so this ratio does not move with
  the load of other jobs the way the block statistics do (on this shared 2-core machine
  a block's median moves by ±20 % from minute to minute; whole-run ratios by ±5 %).

``--repeats N`` repeats the interleaved timing and the single-layer timing N times in
the same process (the models built once): each repetition's ratios are kept
(``repetitions``), the top-level ratios are over all repetitions' iterations pooled, and
``across_repetitions`` gives each ratio's minimum, median and maximum over the
repetitions (on a shared machine one repetition's ratio moves by several percent). The
file records the library's git commit (``git``).

CUDA: ``--device cuda`` also counts kernel launches per adapted layer and splits one
iteration into GPU kernel time and wall time (``torch.profiler``). Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.host_overhead [--blocks 20] [--block 10] \
        [--repeats 1] [--json F]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import statistics
import sys
import time

import torch

from benchmarks import common

NAME = "launch-bound"


def build(variant: str, device: str):
    size = common.sizes(device)["model"][NAME]
    model, step, info = common.build_model_case(NAME, variant, device, size)
    return step, dict(info, adapted_layers=common.adapted_layers(model, variant))


def count_ops(step) -> collections.Counter:
    step()  # warm
    return common.count_aten_ops(step)


def time_penalty_step(step, device: str, n: int = 50) -> dict:
    """The optimizer step pre-hook alone (λ∇Ω for all layers, grouped), on the
    gradients of one backward: median and 10th percentile over ``n`` calls."""
    from rora_fast import penalty

    opt = step.optimizer
    step()
    step.backward_only()
    ts = []
    for _ in range(n):
        common.sync(device)
        t0 = time.perf_counter()
        penalty._step_pre_hook(opt, (), {})
        common.sync(device)
        ts.append(time.perf_counter() - t0)
    opt.zero_grad(set_to_none=True)
    return {"median_ms": round(1e3 * statistics.median(ts), 3),
            "p10_ms": round(1e3 * _q(ts, 0.1), 3)}


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


def time_interleaved(steps: dict, blocks: int, block: int, device: str):
    """Wall and process CPU time of single iterations, in ``blocks`` alternating blocks
    of ``block`` iterations per variant (A B B A A B ...: the order flips every round),
    so that load from other jobs on a shared machine hits both alike. Python's garbage
    collector is off while timing (as in ``timeit``) and runs between blocks.

    Blocks rather than iteration-by-iteration alternation: a training run repeats one
    model's iteration, so each timed iteration should follow one of its own (CPU
    caches, allocator free lists), not the other model's."""
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    names = list(steps)
    for step in steps.values():
        step()
    with _gc_paused():
        for b in range(blocks):
            for k in (names if b % 2 == 0 else names[::-1]):
                gc.collect()  # outside the timed iterations
                step = steps[k]
                step()  # the first iteration after the switch is not timed
                for _ in range(block):
                    common.sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    step()
                    common.sync(device)
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
    return wall, cpu


@contextlib.contextmanager
def _gc_paused():
    """Python's garbage collector off (as ``timeit`` does: a collection would land in
    whichever timed call it falls), restored on exit."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def time_layer(device: str, rounds: int = 30, reps: int = 50) -> dict:
    """One adapted layer of the case (64→64, 64 tokens, bias; PEFT LoRA vs RoraLinear
    through the reference path, benchmarks.common's ``launch-bound`` layer case), forward
    + backward, no optimizer step: ``rounds`` interleaved rounds of ``reps`` calls per
    variant, each round's fastest call kept (the least-disturbed one), the median over
    rounds reported in µs: the per-layer part of the difference without the rest of the
    model's noise."""
    fns = {v: common.build_layer_case("launch-bound", v, device)[0] for v in ("lora", "rora")}
    best = {v: [] for v in fns}
    for fn in fns.values():
        for _ in range(reps):
            fn()
    with _gc_paused():
        for r in range(rounds):
            for v in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                fn, ts = fns[v], []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                best[v].append(min(ts))
    out = {f"{v}_us": round(1e6 * statistics.median(best[v]), 1) for v in best}
    out["ratio_rora_over_lora"] = round(statistics.median(best["rora"])
                                        / statistics.median(best["lora"]), 3)
    out.update(rounds=rounds, reps=reps)
    return out


def time_paired(steps: dict, n: int, device: str, seed: int = 0) -> dict:
    """``n`` RoRA / LoRA ratios of single iterations run back to back (the order flips
    every pair; the garbage collector off, run every 50 pairs): the median ratio, its
    95 % bootstrap interval (2,000 resamples), the quartiles, and both variants' median
    and fastest iteration in ms."""
    import random

    ratios, t_l, t_r = [], [], []
    for step in steps.values():
        step()
    with _gc_paused():
        for i in range(n):
            t = {}
            for v in (("lora", "rora") if i % 2 == 0 else ("rora", "lora")):
                common.sync(device)
                t0 = time.perf_counter()
                steps[v]()
                common.sync(device)
                t[v] = time.perf_counter() - t0
            ratios.append(t["rora"] / t["lora"])
            t_l.append(t["lora"])
            t_r.append(t["rora"])
            if i % 50 == 49:
                gc.collect()
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(ratios, k=n)) for _ in range(2000))
    return {"pairs": n, "median_ratio": round(statistics.median(ratios), 4),
            "ci95": [round(boot[49], 4), round(boot[1949], 4)],
            "quartiles": [round(_q(ratios, 0.25), 4), round(_q(ratios, 0.75), 4)],
            "ms_median": {"lora": round(1e3 * statistics.median(t_l), 3),
                          "rora": round(1e3 * statistics.median(t_r), 3)},
            "ms_min": {"lora": round(1e3 * min(t_l), 3), "rora": round(1e3 * min(t_r), 3)}}


def _block_minima(xs, block: int) -> float:
    """The median over blocks of each block's fastest iteration."""
    return statistics.median(min(xs[i:i + block]) for i in range(0, len(xs), block))


def _q(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _ratios(t: dict, block: int) -> dict:
    """RoRA / LoRA of the iteration times ``t`` (variant -> list): the ratio of medians,
    of the 10th percentiles (the least-disturbed iterations), the median of the paired
    ratios, the ratio of the medians of per-block minima."""
    paired = [r / l for r, l in zip(t["rora"], t["lora"])]
    return {"ratio_of_medians": round(statistics.median(t["rora"])
                                      / statistics.median(t["lora"]), 3),
            "ratio_of_p10": round(_q(t["rora"], 0.1) / _q(t["lora"], 0.1), 3),
            "median_paired_ratio": round(statistics.median(paired), 3),
            "ratio_of_block_minima": round(_block_minima(t["rora"], block)
                                           / _block_minima(t["lora"], block), 3)}


def run(device: str = "cpu", blocks: int = 20, block: int = 10, repeats: int = 1,
        pairs: int = 800) -> dict:
    steps, infos, ops = {}, {}, {}
    for variant in ("lora", "rora"):
        steps[variant], infos[variant] = build(variant, device)
        ops[variant] = count_ops(steps[variant])
    out = {"case": __doc__.split("\n\n")[1].strip(), "device": device,
           "torch": torch.__version__, "git": common.git_state(), "blocks": blocks,
           "block": block, "repeats": repeats, "pairs": pairs, "variants": {}}
    times = {v: [] for v in steps}
    cpu = {v: [] for v in steps}
    reps = []
    for _ in range(repeats):
        t, c = time_interleaved(steps, blocks, block, device)
        layer = time_layer(device)
        reps.append({"time_ratio_rora_over_lora": _ratios(t, block),
                     "cpu_time_ratio_rora_over_lora": _ratios(c, block),
                     "ms_per_iter_median": {v: round(1e3 * statistics.median(t[v]), 3)
                                            for v in t},
                     "single_layer": layer,
                     "loadavg": common.loadavg()})
        for v in steps:
            times[v] += t[v]
            cpu[v] += c[v]
    for v in steps:
        n = infos[v]["adapted_layers"]
        total = sum(ops[v].values())
        entry = {"adapted_layers": n, "aten_ops_per_iter": total,
                 "aten_ops_per_layer": round(total / n, 2),
                 "ms_per_iter_median": round(1e3 * statistics.median(times[v]), 3),
                 "ms_per_iter_p10": round(1e3 * _q(times[v], 0.1), 3),
                 "cpu_ms_per_iter_median": round(1e3 * statistics.median(cpu[v]), 3),
                 "cpu_ms_per_iter_p10": round(1e3 * _q(cpu[v], 0.1), 3),
                 "top_ops": ops[v].most_common(12)}
        if v == "rora":
            entry["penalty_step"] = time_penalty_step(steps[v], device)
        if device == "cuda":
            prof = profile_cuda(steps[v])
            entry["kernels_per_layer"] = round(prof["kernels"] / n, 2)
            entry["profile"] = prof
        out["variants"][v] = entry
    if pairs:
        out["paired_iterations"] = time_paired(steps, pairs, device)
    # pooled over the repetitions (per-block minima: blocks of ``block`` iterations, in order)
    out["time_ratio_rora_over_lora"] = _ratios(times, block)
    out["cpu_time_ratio_rora_over_lora"] = _ratios(cpu, block)
    out["single_layer"] = reps[-1]["single_layer"] if repeats == 1 else {
        "ratio_rora_over_lora": round(statistics.median(
            r["single_layer"]["ratio_rora_over_lora"] for r in reps), 3),
        "note": "median over the repetitions; each repetition's figures in repetitions"}
    if repeats > 1:
        out["repetitions"] = reps
        out["across_repetitions"] = {
            key: {stat: [min(vals), round(statistics.median(vals), 3), max(vals)]
                  for stat in reps[0][key]
                  for vals in [[r[key][stat] for r in reps]]}
            for key in ("time_ratio_rora_over_lora", "cpu_time_ratio_rora_over_lora")}
        out["across_repetitions"]["single_layer_ratio"] = [
            min(r["single_layer"]["ratio_rora_over_lora"] for r in reps),
            out["single_layer"]["ratio_rora_over_lora"],
            max(r["single_layer"]["ratio_rora_over_lora"] for r in reps)]
        out["across_repetitions"]["format"] = "[min, median, max] over the repetitions"
    out["loadavg"] = common.loadavg()
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
    ap.add_argument("--blocks", type=int, default=20,
                    help="alternating blocks per variant (default 20)")
    ap.add_argument("--block", type=int, default=10,
                    help="timed iterations per block (default 10)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="repetitions of the timing, models built once (default 1)")
    ap.add_argument("--pairs", type=int, default=800,
                    help="paired single iterations (0: none; default 800)")
    ap.add_argument("--json", default=None, help="write the result here too")
    a = ap.parse_args(argv)
    if a.blocks < 1 or a.block < 1 or a.repeats < 1 or a.pairs < 0:
        ap.error("--blocks, --block and --repeats must be >= 1, --pairs >= 0")
    res = run(a.device, a.blocks, a.block, a.repeats, a.pairs)
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        from rora_fast.atomic import write_text

        write_text(a.json, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
