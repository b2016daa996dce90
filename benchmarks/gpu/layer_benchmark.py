"""One RoRA layer, forward + backward, against its floor and its competitors.

For each weight shape (in x out) at ``--tokens`` tokens, rank ``--rank``, it times
``y = layer(x); y.backward(dY)`` (x requires grad, as inside a network) for:

* ``base``            the frozen GEMMs alone: ``x·Wᵀ`` and ``dY·W`` in torch (the floor);
* ``peft_lora``       PEFT's ``lora.Linear`` (get_peft_model on one nn.Linear), lora_dropout 0.1,
                      PEFT's defaults (adapter weights kept in float32 for a bf16 base);
* ``peft_lora_adapter_dtype``  the same with ``autocast_adapter_dtype=False`` (adapters in
                      the base dtype: bf16 on the GPU);
* ``peft_lora_nodrop`` PEFT's defaults without LoRA dropout (RoRA here has none either);
* ``rora_reference``  ``rora_fast.functional.rora_linear(..., backend="reference")`` (plain torch);
* ``rora_fused``      ``rora_fast.kernels.fused_rora_linear`` (Triton masked weight + cuBLAS;
                      the in-loop Philox GEMM strategy was deleted after losing 3.3-4.9x,
                      benchmarks/results/2026-11-28-nvidia-h200.md).

RoRA runs with weight dropout ``--weight-dropout`` (0.1), no LoRA input dropout (RoRA
drops W, not x). The orthogonality penalty is not part of the op: its gradient is added
once per optimizer step for all layers (rora_fast.penalty), so it is timed at the
model level (benchmarks/bench_model.py, benchmarks/host_overhead.py), not here.
Reported: median / p20 / p80 wall time per forward+backward (CUDA events); for base,
PEFT LoRA and fused RoRA also the time per call back to back (no sync between calls) and
per replay of a CUDA graph of the call (no host work: the device floor); and the peak
memory allocated above what existed before the call (saved activations, transients
and gradients); at the first shape, for base, PEFT LoRA without dropout and fused RoRA,
the split of one call by kernel (torch.profiler: launches, device time per kernel name),
to show which passes cost what. Also a correctness spot check of the fused op against the
reference at the full shape (relative max error of y and of every gradient).

Usage::

    python benchmarks/gpu/layer_benchmark.py                 # GPU, LLaMA-7B shapes, bf16
    python benchmarks/gpu/layer_benchmark.py --cpu-smoke     # CPU, tiny shapes, interpreter

Writes ``<out-dir>/<YYYY-MM-DD>-<device-slug>.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import statistics
import sys
import time

TARGET_VS_BASE = 1.10   # fused fwd+bwd within 1.10x of the base GEMMs alone
TARGET_VS_PEFT = 0.80   # and at most 0.8x PEFT LoRA with dropout
LLAMA_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
# methods also timed back to back and as a CUDA-graph replay
REPLAY_METHODS = ("base", "peft_lora", "peft_lora_nodrop", "rora_fused")
# methods whose call is split by kernel (torch.profiler), at the first shape
PROFILE_METHODS = ("base", "peft_lora_nodrop", "rora_fused")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on the CPU (fused kernels in the Triton interpreter); "
                         "checks the script, measures nothing meaningful")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shapes", default=None, help="comma list of INxOUT (default: LLaMA-7B)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--weight-dropout", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--methods", default=None, help="comma list (default: all)")
    ap.add_argument("--out-dir", default=None,
                    help="where the .json/.md go (default benchmarks/results; "
                         "--cpu-smoke: a temporary folder unless given)")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    args.tokens = args.tokens or (24 if smoke else 8192)
    args.dtype = args.dtype or ("fp32" if smoke else "bf16")
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    args.reps = args.reps if args.reps is not None else (3 if smoke else 20)
    if args.shapes:
        args.shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        args.shape_list = [(40, 24), (24, 56)] if smoke else LLAMA_SHAPES
    if smoke and args.rank == 16:
        args.rank = 4
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton kernels

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


# ------------------------------------------------------------------------------ timing

class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn, warmup, reps):
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        q = lambda f: times[min(len(times) - 1, int(round(f * (len(times) - 1))))]  # noqa: E731
        return dict(median_ms=statistics.median(times), p20_ms=q(0.2), p80_ms=q(0.8),
                    reps=len(times))

    def back_to_back(self, fn, n):
        """ms per call over ``n`` calls issued with no synchronisation between them (the
        host runs ahead of the device as in training; launch overhead hidden where the
        kernels are long enough)."""
        fn()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3 / n

    def graph_replay(self, fn, n):
        """ms per replay of ``fn`` captured once in a CUDA graph: no host work at all, the
        device-time floor of the call. The capture fixes every input, the mask seed
        included (each replay draws the same mask: a timing, not training). None on a
        CPU."""
        if not self.cuda:
            return None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        self.sync()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n

    def kernel_split(self, fn, n=3, top=8):
        """Where one call's time goes (torch.profiler over ``n`` calls): on CUDA the
        kernels by device time (launches per call, µs per call, the ``top`` largest by
        name); on a CPU the ops by self CPU time (smoke runs only)."""
        from torch.profiler import ProfilerActivity, profile

        fn()
        self.sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(n):
                fn()
            self.sync()
        want = torch.autograd.DeviceType.CUDA if self.cuda else torch.autograd.DeviceType.CPU
        agg = {}
        for e in prof.events():
            if e.device_type != want:
                continue
            us = e.device_time if self.cuda else e.self_cpu_time_total
            calls, tot = agg.get(e.name, (0, 0.0))
            agg[e.name] = (calls + 1, tot + us)
        ranked = sorted(agg.items(), key=lambda kv: -kv[1][1])
        return dict(kind="cuda kernels" if self.cuda else "cpu ops (self time)",
                    per_call=round(sum(c for c, _ in agg.values()) / n, 2),
                    us_per_call=round(sum(t for _, t in agg.values()) / n, 2),
                    top=[[name[:90], round(c / n, 2), round(t / n, 2)]
                         for name, (c, t) in ranked[:top]])

    def peak_mib(self, fn):
        if not self.cuda:
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - before) / 2**20


# ------------------------------------------------------------------------------ methods

def make_methods(in_f, out_f, args, device, dtype):
    """name -> (step function doing one forward+backward, outputs getter)."""
    from rora_fast import functional as F_rora

    gen = torch.Generator(device="cpu").manual_seed(0)
    T, r = args.tokens, args.rank
    W = (torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5).to(device, dtype)
    x = torch.randn(T, in_f, generator=gen).to(device, dtype).requires_grad_(True)
    dy = torch.randn(T, out_f, generator=gen).to(device, dtype)
    A = (torch.randn(r, in_f, generator=gen) * in_f ** -0.5).to(device, dtype).requires_grad_(True)
    B = (torch.randn(out_f, r, generator=gen) * 0.02).to(device, dtype).requires_grad_(True)
    scaling, p, seed = 2.0, args.weight_dropout, 1234567

    def clear(*ts):
        for t in ts:
            t.grad = None

    methods = {}

    def base():
        y = x.detach() @ W.t()
        dx = dy @ W
        return y, dx
    methods["base"] = base

    def peft_method(dropout=0.1, autocast_adapter_dtype=True):
        import peft
        from torch import nn

        class One(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)

            def forward(self, inp):
                return self.lin(inp)

        module = One()
        with torch.no_grad():
            module.lin.weight.copy_(W)
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                              target_modules=["lin"])
        peft_model = peft.get_peft_model(module, cfg,
                                         autocast_adapter_dtype=autocast_adapter_dtype)
        peft_model.train()
        with torch.no_grad():  # non-zero B, as after some training
            for name, prm in peft_model.named_parameters():
                if "lora_B" in name:
                    prm.normal_(0, 0.02)
        peft_params = [q for q in peft_model.parameters() if q.requires_grad]

        def peft_lora():
            clear(x, *peft_params)
            y = peft_model(x)
            y.backward(dy)
            return y
        return peft_lora

    for name, kw in (("peft_lora", {}),
                     ("peft_lora_adapter_dtype", dict(autocast_adapter_dtype=False)),
                     ("peft_lora_nodrop", dict(dropout=0.0))):
        try:
            methods[name] = peft_method(**kw)
        except Exception as exc:  # reported, not fatal: the other methods still run
            methods[name] = exc

    def rora(backend=None):
        def step():
            clear(x, A, B)
            if backend == "reference":
                y = F_rora.rora_linear(x, None, W, None, A, B, scaling, p, seed,
                                       backend="reference")
            else:
                from rora_fast import kernels
                y = kernels.fused_rora_linear(x, None, W, None, A, B, scaling, p, seed)
            y.backward(dy)
            return y
        return step

    methods["rora_reference"] = rora("reference")
    try:
        from rora_fast import kernels  # noqa: F401 (needs triton)
        methods["rora_fused"] = rora()
    except Exception as exc:
        methods["rora_fused"] = exc

    def outputs(step):
        y = step()
        return [y.detach().clone(), x.grad.clone(), A.grad.clone(), B.grad.clone()]

    return methods, outputs


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------ main

def run(args):
    smoke = args.cpu_smoke
    if smoke:
        device = torch.device("cpu")
        device_name = f"cpu-smoke-{platform.machine()}"
    else:
        if not torch.cuda.is_available():
            print("layer_benchmark: no CUDA device (torch.cuda.is_available() is False); "
                  "use --cpu-smoke on a CPU", file=sys.stderr)
            return 3
        device = torch.device("cuda")
        device_name = torch.cuda.get_device_name(0)
    dtype = DTYPES[args.dtype]
    timer = Timer(device)
    wanted = set(args.methods.split(",")) if args.methods else None
    rows, errors = [], []
    for in_f, out_f in args.shape_list:
        methods, outputs = make_methods(in_f, out_f, args, device, dtype)
        ref_out = None
        shape_rows = []
        if "rora_reference" in methods and not isinstance(methods["rora_reference"], Exception):
            ref_out = outputs(methods["rora_reference"])
        for name, fn in methods.items():
            if wanted and name not in wanted:
                continue
            row = dict(in_features=in_f, out_features=out_f, tokens=args.tokens,
                       rank=args.rank, dtype=args.dtype, method=name)
            if isinstance(fn, Exception):
                row["error"] = f"{type(fn).__name__}: {fn}"
                errors.append(f"{name} {in_f}x{out_f}: {row['error']}")
                rows.append(row)
                continue
            try:
                if name.startswith("rora_fused") and ref_out is not None:
                    got = outputs(fn)
                    row["max_rel_err_vs_reference"] = dict(
                        zip(("y", "dx", "dA", "dB"), (rel_err(g, e) for g, e in zip(got, ref_out))))
                row.update(timer.measure(fn, args.warmup, args.reps))
                row["peak_mem_mib"] = timer.peak_mib(fn)
            except Exception as exc:  # one failing method must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                errors.append(f"{name} {in_f}x{out_f}: {row['error']}")
            rows.append(row)
            shape_rows.append(row)
            print(f"  {in_f}x{out_f} {name}: " + (
                f"{row['median_ms']:.3f} ms" if "median_ms" in row else row.get("error", "?")),
                flush=True)
        # back-to-back and CUDA-graph replay timings (issue 11), after the main timings so
        # that a failed capture cannot disturb them; a failure is reported in its row
        for row in shape_rows:
            if row["method"] not in REPLAY_METHODS or "error" in row:
                continue
            for key, how in (("back_to_back_ms", timer.back_to_back),
                             ("graph_replay_ms", timer.graph_replay)):
                try:
                    row[key] = how(methods[row["method"]], args.reps)
                except Exception as exc:
                    row[key + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
        # where the time goes, first shape only (issue 11 item 3: which passes to fuse)
        if (in_f, out_f) == tuple(args.shape_list[0]):
            for row in shape_rows:
                if row["method"] in PROFILE_METHODS and "error" not in row:
                    try:
                        row["profile"] = timer.kernel_split(methods[row["method"]])
                    except Exception as exc:
                        row["profile_error"] = f"{type(exc).__name__}: {exc}"[:300]
        del methods, outputs, ref_out
        if device.type == "cuda":
            torch.cuda.empty_cache()

    add_ratios(rows)
    meta = environment(device, device_name, args)
    date = _dt.date.today().isoformat()
    out_dir = args.out_dir
    if out_dir is None:
        if smoke:
            import tempfile
            out_dir = tempfile.mkdtemp(prefix="rora_layer_bench_")
        else:
            out_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   "results")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{date}-{slug(device_name)}")
    table = markdown(rows, meta)
    from rora_fast.atomic import write_json, write_text

    write_json(stem + ".json", dict(meta=meta, targets=dict(fused_vs_base=TARGET_VS_BASE,
                                                            fused_vs_peft=TARGET_VS_PEFT),
                                    results=rows, errors=errors), indent=2)
    write_text(stem + ".md", table)
    print(f"layer_benchmark: wrote {stem}.json and {stem}.md")
    manifest = os.environ.get("RORA_BENCH_MANIFEST")
    if manifest:  # run.sh reads where the files went (to print the table last, copy them)
        write_text(manifest, f"{stem}.json\n{stem}.md\n")
    if errors:
        print("layer_benchmark: errors:\n  " + "\n  ".join(errors))
    print()
    print(table)
    return 1 if errors else 0


def add_ratios(rows):
    by_shape = {}
    for row in rows:
        by_shape.setdefault((row["in_features"], row["out_features"]), {})[row["method"]] = row
    for group in by_shape.values():
        base = group.get("base", {}).get("median_ms")
        peft_t = group.get("peft_lora", {}).get("median_ms")
        peft_m = group.get("peft_lora", {}).get("peak_mem_mib")
        for row in group.values():
            t = row.get("median_ms")
            if t is None:
                continue
            row["x_base"] = t / base if base else None
            row["x_peft"] = t / peft_t if peft_t else None
            if row["method"].startswith("rora_fused"):
                row["meets_time_targets"] = bool(
                    row["x_base"] is not None and row["x_base"] <= TARGET_VS_BASE
                    and row["x_peft"] is not None and row["x_peft"] <= TARGET_VS_PEFT)
                if row.get("peak_mem_mib") is not None and peft_m is not None:
                    row["meets_memory_target"] = row["peak_mem_mib"] <= peft_m


def environment(device, device_name, args):
    import triton
    meta = dict(date=_dt.datetime.now().isoformat(timespec="seconds"), device=device_name,
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                tokens=args.tokens, rank=args.rank, dtype=args.dtype,
                weight_dropout=args.weight_dropout, warmup=args.warmup, reps=args.reps,
                cpu_smoke=args.cpu_smoke,
                penalty="not in the op (added once per optimizer step, rora_fast.penalty)",
                peft_lora_dropout=0.1)
    try:
        import peft
        meta["peft"] = peft.__version__
    except Exception:
        pass
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return meta


def markdown(rows, meta):
    head = (f"### RoRA layer forward+backward, {meta['device']}, {meta['dtype']}, "
            f"{meta['tokens']} tokens, r={meta['rank']}, weight dropout {meta['weight_dropout']}"
            f"{' (CPU SMOKE: timings meaningless)' if meta['cpu_smoke'] else ''}\n\n"
            f"torch {meta['torch']}, triton {meta['triton']}; median of {meta['reps']} "
            f"(p20-p80); peak = memory allocated above the pre-call level. Targets for "
            f"fused RoRA: <= {TARGET_VS_BASE}x base, <= {TARGET_VS_PEFT}x PEFT, "
            f"peak <= PEFT.\n\n")
    lines = ["| in x out | method | median ms | p20-p80 ms | x base | x PEFT | peak MiB | "
             "targets | max rel err vs ref |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for row in rows:
        shape = f"{row['in_features']}x{row['out_features']}"
        if "error" in row:
            lines.append(f"| {shape} | {row['method']} | error | | | | | | "
                         f"{row['error'][:80].replace('|', '/')} |")
            continue
        targets = ""
        if "meets_time_targets" in row:
            targets = "time ok" if row["meets_time_targets"] else "time MISSED"
            if "meets_memory_target" in row:
                targets += ", mem ok" if row["meets_memory_target"] else ", mem MISSED"
        err = row.get("max_rel_err_vs_reference")
        err_s = ", ".join(f"{k} {v:.1e}" for k, v in err.items()) if err else ""
        lines.append(f"| {shape} | {row['method']} | {f(row['median_ms'])} | "
                     f"{f(row['p20_ms'])}-{f(row['p80_ms'])} | {f(row.get('x_base'), 2)} | "
                     f"{f(row.get('x_peft'), 2)} | {f(row.get('peak_mem_mib'), 0)} | "
                     f"{targets} | {err_s} |")
    replay = [r for r in rows if "back_to_back_ms" in r or "back_to_back_ms_error" in r]
    if replay:
        lines += ["", "Back to back (no sync between calls, ms per call) and CUDA-graph replay "
                  "(captured once, no host work; the same mask every replay):", "",
                  "| in x out | method | back to back ms | graph replay ms | x base (replay) |",
                  "|---|---|---:|---:|---:|"]
        base_g = {(r["in_features"], r["out_features"]): r.get("graph_replay_ms")
                  for r in replay if r["method"] == "base"}
        for row in replay:
            g = row.get("graph_replay_ms")
            b = base_g.get((row["in_features"], row["out_features"]))
            bb = f(row.get("back_to_back_ms")) if "back_to_back_ms" in row else "error"
            gs = f(g) if "graph_replay_ms_error" not in row else \
                "error: " + row["graph_replay_ms_error"][:60].replace("|", "/")
            lines.append(f"| {row['in_features']}x{row['out_features']} | {row['method']} | "
                         f"{bb} | {gs} | {f(g / b if g and b else None, 2)} |")
    prof = [r for r in rows if "profile" in r or "profile_error" in r]
    if prof:
        lines += ["", "Where one call's time goes (torch.profiler, 3 calls, first shape): "
                  "launches per call, time per call, the largest entries by name:", "",
                  "| in x out | method | what | per call | µs per call | largest (calls, µs per call) |",
                  "|---|---|---|---:|---:|---|"]
        for row in prof:
            pr = row.get("profile")
            shape = f"{row['in_features']}x{row['out_features']}"
            if pr is None:
                lines.append(f"| {shape} | {row['method']} | error | | | "
                             f"{row['profile_error'][:80].replace('|', '/')} |")
                continue
            top = "; ".join(f"{n.replace('|', '/')[:48]} ({c:g}, {t:.1f})"
                            for n, c, t in pr["top"][:5])
            lines.append(f"| {shape} | {row['method']} | {pr['kind']} | {pr['per_call']:g} | "
                         f"{pr['us_per_call']:.1f} | {top} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(run(ARGS))
