"""Where does RoRA's overhead over LoRA go? One model-level case, profiled.

    python -m benchmarks.profile_rora --model bert-large [--reps 3] [--out OUT.md]

1. Builds the LoRA and the RoRA model of ``benchmarks.common`` (device sizes), warms
   both up, then times them interleaved (LoRA, RoRA) ``--reps`` times; prints the
   medians.
2. Profiles one RoRA iteration with ``torch.profiler``; the torch mask generator
   (``weight_keep_mask``), the masked weight copy of the CPU reference path
   (``masked_weight``) and the grouped penalty step (``penalty_step``, once per
   optimizer step) are wrapped in ``record_function`` ranges (by patching module
   attributes inside this process only) so the table attributes time to them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time

import torch

from benchmarks import common


@contextlib.contextmanager
def ranges():
    """Wrap RoRA's hot spots in record_function ranges."""
    import rora_fast.functional as fn_mod
    import rora_fast.penalty as pen_mod
    import rora_fast.reference as ref

    targets = [(ref, "weight_keep_mask", "weight_keep_mask"),
               (fn_mod, "_masked_eager", "masked_weight"),
               (pen_mod, "_apply", "penalty_step")]
    old = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in targets]

    def wrap(label, f):
        @functools.wraps(f)
        def g(*a, **k):
            with torch.profiler.record_function(f"rora::{label}"):
                return f(*a, **k)
        return g

    for (mod, attr, label), (_, _, f) in zip(targets, old):
        setattr(mod, attr, wrap(label, f))
    try:
        yield
    finally:
        for mod, attr, f in old:
            setattr(mod, attr, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bert-large")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", help="write the Markdown here too")
    ap.add_argument("--no-profile", action="store_true")
    a = ap.parse_args(argv)
    device = common.bench_device()
    lines = [f"## Profile of one {a.model} training iteration ({device})", "",
             "```", "python -m benchmarks.profile_rora " + " ".join(argv or sys.argv[1:]),
             "```", ""]
    _, lora, linfo = common.build_model_case(a.model, "lora", device)
    _, rora, rinfo = common.build_model_case(a.model, "rora", device)
    lines.append(f"Sizes: {rinfo['layers']} layers × batch {rinfo['batch']} × seq "
                 f"{rinfo['seq']}, {rinfo['dtype']}, torch threads "
                 f"{torch.get_num_threads()}.\n")
    variants = [("LoRA (PEFT)", lora, contextlib.nullcontext),
                ("RoRA", rora, contextlib.nullcontext)]
    for _, fn, ctx in variants:  # warm-up
        with ctx():
            fn()
    times = {n: [] for n, _, _ in variants}
    loads = []
    for _ in range(a.reps):
        for n, fn, ctx in variants:
            loads.append(common.loadavg()[0])
            with ctx():
                t0 = time.perf_counter()
                fn()
                times[n].append(time.perf_counter() - t0)
    base = statistics.median(times["LoRA (PEFT)"])
    lines += ["| variant | median ms/iteration | × LoRA | all rounds (ms) |",
              "|---|---|---|---|"]
    for n, ts in times.items():
        m = statistics.median(ts)
        lines.append(f"| {n} | {1e3 * m:,.0f} | {m / base:.2f}× | "
                     + ", ".join(f"{1e3 * t:,.0f}" for t in ts) + " |")
    lines += ["", f"Load average (1 min) during the timing: {min(loads):.1f}–{max(loads):.1f}.",
              ""]
    if not a.no_profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        self_ms, walls = {}, {}
        for n, fn in (("LoRA", lora), ("RoRA", rora)):
            with ranges(), profile(activities=acts) as prof:
                t0 = time.perf_counter()
                fn()
                walls[n] = time.perf_counter() - t0
            ka = prof.key_averages()
            self_ms[n] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in ka}
            if n == "RoRA":
                tot = {e.key: e.cpu_time_total / 1e3 for e in ka}
                table_r = ka.table(sort_by="self_cpu_time_total", row_limit=12,
                                   max_name_column_width=40)
        mask = tot.get("rora::weight_keep_mask", 0)
        mw = tot.get("rora::masked_weight", 0)
        pen = tot.get("rora::penalty_step", 0)
        n_mask = self_ms["RoRA"].get("rora::weight_keep_mask", (0, 0))[1]
        n_mw = self_ms["RoRA"].get("rora::masked_weight", (0, 0))[1]
        wall = 1e3 * walls["RoRA"]
        lines += [f"Under the profiler: LoRA {1e3 * walls['LoRA']:,.0f} ms, RoRA {wall:,.0f} ms "
                  "wall (one iteration each).", "",
                  "| RoRA part | ms | share of the RoRA iteration |", "|---|---|---|"]
        if n_mask:
            lines += [f"| weight_keep_mask (Philox mask, {n_mask} calls) | {mask:,.0f} | "
                      f"{100 * mask / wall:.0f} % |",
                      f"| masked_weight minus the mask (masked, scaled copy of W) | "
                      f"{mw - mask:,.0f} | {100 * (mw - mask) / wall:.0f} % |"]
        else:
            lines += [f"| masked_weight ({n_mw} calls; C path: Philox mask and the masked, "
                      f"scaled copy of W in one pass) | {mw:,.0f} | {100 * mw / wall:.0f} % |"]
        lines += [f"| penalty step (all layers, once per optimizer step) | {pen:,.1f} | "
                  f"{100 * pen / wall:.1f} % |", "",
                  "Self CPU time by op, RoRA − LoRA, largest differences first:", "",
                  "| op | LoRA ms (calls) | RoRA ms (calls) | RoRA − LoRA ms |",
                  "|---|---|---|---|"]
        keys = set(self_ms["LoRA"]) | set(self_ms["RoRA"])
        diffs = sorted(keys, key=lambda k: -abs(self_ms["RoRA"].get(k, (0, 0))[0]
                                                - self_ms["LoRA"].get(k, (0, 0))[0]))
        for k in diffs[:12]:
            lt, lc = self_ms["LoRA"].get(k, (0.0, 0))
            rt, rc = self_ms["RoRA"].get(k, (0.0, 0))
            lines.append(f"| `{k}` | {lt:,.1f} ({lc}) | {rt:,.1f} ({rc}) | {rt - lt:+,.1f} |")
        lines += ["", "Top ops of the RoRA iteration by self CPU time:", "", "```", table_r,
                  "```", ""]
    text = "\n".join(lines)
    print(text)
    if a.out:
        from rora_fast.atomic import write_text

        write_text(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
