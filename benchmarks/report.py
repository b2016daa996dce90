"""Turn the pytest-benchmark JSON of this suite into Markdown tables and a PNG chart.

    python benchmarks/report.py RESULTS.json [MORE.json ...] [--md OUT.md] [--png OUT.png]
                                [--notes NOTES.md] [--include-tiny]
    python -m benchmarks.report RESULTS.json ...

Defaults: ``OUT.md``/``OUT.png`` beside the first JSON, same stem. Times are medians
over every timed round of every interleaved repetition of a case (``stats.data``);
the per-repetition medians are shown where they disagree. The paper's Table 3 figures
(ms/iteration on their GPU) are printed beside ours; the CPU cases are reduced in
size (stated in the tables), so compare the *overheads*, not the milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from rora_fast.atomic import save_figure, write_text

PAPER_MS = {"bert-large": (94.0, 100.0), "roberta-large": (90.0, 105.0),
            "llama-7b": (84.0, 90.0)}
MODEL_LABELS = {"bert-large": "BERT-large", "roberta-large": "RoBERTa-large",
                "llama-7b": "LLaMA-7B-shaped", "tiny": "tiny (smoke)",
                "launch-bound": "launch-bound BERT (24 × hidden 64, k 4)"}
LAYER_LABELS = {
    "1024x1024": "BERT-/RoBERTa-large q,v (1024→1024)",
    "4096x4096": "LLaMA-7B q/k/v/o (4096→4096)",
    "4096x11008": "LLaMA-7B gate/up (4096→11008)",
    "tiny": "tiny (48→40), smoke",
}
MODEL_TARGET = {"cpu": 1.10, "cuda": 1.00}


# ----------------------------------------------------------------------------- loading
def load(paths: List[Path]) -> dict:
    benches, meta = [], {}
    for p in paths:
        d = json.loads(Path(p).read_text())
        benches.extend(d.get("benchmarks", []))
        if not meta:
            meta = dict(d.get("rora_bench", {}), datetime=d.get("datetime"),
                        commit=(d.get("commit_info") or {}).get("id"),
                        dirty=(d.get("commit_info") or {}).get("dirty"),
                        machine=d.get("machine_info", {}))
    return {"benchmarks": benches, "meta": meta}


def _data(b: dict) -> List[float]:
    st = b["stats"]
    return list(st.get("data") or [st["median"]])


class Case:
    """All rounds of one case pooled over its repetitions."""

    def __init__(self):
        self.rounds: List[float] = []
        self.rep_medians: List[float] = []
        self.by_rep: Dict[int, float] = {}
        self.loads: List[float] = []
        self.info: dict = {}

    def add(self, b: dict):
        d = _data(b)
        self.rounds.extend(d)
        self.rep_medians.append(statistics.median(d))
        ei = b.get("extra_info", {})
        if ei.get("rep") is not None:
            self.by_rep[ei["rep"]] = statistics.median(d)
        for k in ("loadavg_before", "loadavg_after"):
            if ei.get(k):
                self.loads.append(ei[k][0])
        self.info = {**ei, **self.info} if self.info else dict(ei)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def ms(self) -> float:
        return 1e3 * self.median


def paired_ratio(num: "Case", den: "Case") -> Optional[float]:
    """Median over repetitions of (num / den) within the same repetition: the two ran
    back to back, so slow drifts of the machine's load cancel."""
    reps = sorted(set(num.by_rep) & set(den.by_rep))
    if not reps:
        return None
    return statistics.median(num.by_rep[r] / den.by_rep[r] for r in reps)


def group_cases(benches: List[dict], kind: str, key_fields) -> Dict[tuple, Case]:
    out: Dict[tuple, Case] = defaultdict(Case)
    for b in benches:
        ei = b.get("extra_info", {})
        if ei.get("kind") != kind:
            continue
        out[tuple(ei.get(k) for k in key_fields)].add(b)
    return out


# ----------------------------------------------------------------------------- formatting
def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "–"
    if ms >= 1000:
        return f"{ms:,.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.3g}"


def fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "–"
    if s >= 0.9995:
        return f"{s:.2f} s"
    if s >= 0.1:
        return f"{1e3 * s:.0f} ms"
    return f"{1e3 * s:.3g} ms"


def fmt_load(loads: List[float]) -> str:
    if not loads:
        return "–"
    return f"{min(loads):.1f}–{max(loads):.1f}"


def table(header: List[str], rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _keep(name, include_tiny):
    return include_tiny or name != "tiny"


# ----------------------------------------------------------------------------- sections
def _ops_cell(lo, ro) -> str:
    a = lo.info.get("aten_ops_per_layer") if lo else None
    b = ro.info.get("aten_ops_per_layer") if ro else None
    if a is None and b is None:
        return "–"
    return f"{a if a is not None else '–'} → {b if b is not None else '–'}"


def model_section(benches, device, include_tiny):
    cases = group_cases(benches, "model", ("model", "variant"))
    models = [m for m in ("tiny", "bert-large", "roberta-large", "llama-7b", "launch-bound")
              if any(k[0] == m for k in cases) and _keep(m, include_tiny)]
    if not models:
        return "", []
    has_ref = any(k[1] == "rora-ref" for k in cases)
    has_rad = any(k[1] == "rora-adapter-dtype" for k in cases)
    extra_lora = [v for v in ("lora-adapter-dtype", "lora-nodrop")
                  if any(k[1] == v for k in cases)]
    target = MODEL_TARGET.get(device, 1.10)
    header = ["Model", "paper LoRA → RoRA (ms, their GPU)", "paper overhead",
              "ours LoRA (ms)", "ours RoRA (ms)"]
    if has_ref:
        header.append("ours RoRA torch-ref (ms)")
    header += [{"lora-adapter-dtype": "PEFT LoRA, adapters in base dtype (ms)",
                "lora-nodrop": "PEFT LoRA, no dropout (ms)"}[v] for v in extra_lora]
    header += [f"RoRA / {v}" for v in extra_lora]
    if has_rad:
        header += ["ours RoRA, adapters in base dtype (ms)",
                   "RoRA / PEFT, both adapters in base dtype"]
    header += ["ours overhead", "paired ratio", f"target ≤ {target:.2f}×",
               "size (layers × batch × seq)", "aten ops / adapted layer LoRA → RoRA",
               "rounds LoRA/RoRA", "load avg (1 min)"]
    rows, chart = [], []
    for m in models:
        lo, ro = cases.get((m, "lora")), cases.get((m, "rora"))
        rf = cases.get((m, "rora-ref"))
        paper = PAPER_MS.get(m)
        ratio = ro.median / lo.median if lo and ro else None
        info = (lo or ro).info
        loads = (lo.loads if lo else []) + (ro.loads if ro else [])
        row = [MODEL_LABELS.get(m, m),
               f"{paper[0]:.0f} → {paper[1]:.0f}" if paper else "–",
               f"+{100 * (paper[1] / paper[0] - 1):.0f} %" if paper else "–",
               fmt_ms(lo.ms if lo else None), fmt_ms(ro.ms if ro else None)]
        if has_ref:
            row.append(fmt_ms(rf.ms if rf else None))
        extra = [cases.get((m, v)) for v in extra_lora]
        row += [fmt_ms(c.ms if c else None) for c in extra]
        row += [f"{ro.median / c.median:.2f}×" if (c and ro) else "–" for c in extra]
        if has_rad:
            rad, lad = cases.get((m, "rora-adapter-dtype")), cases.get((m, "lora-adapter-dtype"))
            row += [fmt_ms(rad.ms if rad else None),
                    f"{rad.median / lad.median:.2f}×" if (rad and lad) else "–"]
        pr = paired_ratio(ro, lo) if lo and ro else None
        row += [f"{100 * (ratio - 1):+.0f} % ({ratio:.2f}×)" if ratio else "–",
                f"{pr:.2f}×" if pr else "–",
                ("met" if ratio <= target else "**missed**") if ratio else "–",
                f"{info.get('layers')} × {info.get('batch')} × {info.get('seq')}",
                _ops_cell(lo, ro),
                f"{len(lo.rounds) if lo else 0}/{len(ro.rounds) if ro else 0}",
                fmt_load(loads)]
        rows.append(row)
        chart.append({"model": m, "lora_ms": lo.ms if lo else None,
                      "rora_ms": ro.ms if ro else None,
                      "paper": paper})
    text = ["### Training iteration, PEFT LoRA vs RoRA (Table 3 style)", "",
            table(header, rows), ""]
    any_info = (cases.get((models[0], "rora")) or cases.get((models[0], "lora"))).info
    text.append(
        f"One iteration = forward, backward (RoRA penalty gradient included), AdamW step, "
        f"zero_grad; sequence classification, random weights with the real hidden sizes, "
        f"{any_info.get('dtype')} on {device}. LoRA: PEFT, r = 8 (BERT, RoBERTa, "
        f"launch-bound) / 16 "
        f"(LLaMA), alpha 16, lora_dropout 0.1, PEFT's default targets (query,value / "
        f"q_proj,v_proj). RoRA: rora_fast.apply_rora, same r/alpha/lora_dropout, "
        f"weight_dropout 0.1, λ = 10, k = 32 (launch-bound: 4), backend "
        f"`{(cases.get((models[0], 'rora')) or Case()).info.get('backend', '?')}`. "
        f"Median over all timed rounds of the interleaved repetitions; model build, SVD "
        f"bases and one warm-up iteration untimed. 'paired ratio': median over the "
        f"repetitions of RoRA/LoRA within one repetition (the two ran back to back); the "
        f"target is judged on the pooled medians. 'aten ops': ops dispatched in one "
        f"iteration (TorchDispatchMode, views included) / adapted layers, counted once "
        f"per case (benchmarks/host_overhead.py).")
    if device == "cpu":
        text.append("")
        text.append("**CPU sizes are reduced** (layers, sequence length; column 'size'): "
                    "the milliseconds are not comparable with the paper's GPU figures, "
                    "the overheads are the comparison.")
    text.append("")
    return "\n".join(text), chart


def layer_section(benches, include_tiny):
    cases = group_cases(benches, "layer", ("shape", "variant"))
    shapes = [s for s in ("tiny", "1024x1024", "4096x4096", "4096x11008")
              if any(k[0] == s for k in cases) and _keep(s, include_tiny)]
    if not shapes:
        return "", []
    has_fused = any(k[1] == "fused" for k in cases)
    header = ["Layer (in→out)", "r", "tokens", "base GEMMs (ms)", "PEFT LoRA (ms)",
              "RoRA torch-ref (ms)"]
    if has_fused:
        header.append("RoRA fused (ms)")
    header += ["LoRA / base", "RoRA-ref / LoRA"]
    if has_fused:
        header += ["fused / base", "fused / LoRA"]
    header.append("load avg")
    rows, chart = [], []
    for s in shapes:
        c = {v: cases.get((s, v)) for v in ("base", "lora", "rora", "fused")}
        ms = {v: (c[v].ms if c[v] else None) for v in c}
        info = next(x for x in c.values() if x).info

        def ratio(a, b):
            return f"{ms[a] / ms[b]:.2f}×" if ms[a] and ms[b] else "–"

        row = [LAYER_LABELS.get(s, s), str(info.get("r")), str(info.get("tokens")),
               fmt_ms(ms["base"]), fmt_ms(ms["lora"]), fmt_ms(ms["rora"])]
        if has_fused:
            row.append(fmt_ms(ms["fused"]))
        row += [ratio("lora", "base"), ratio("rora", "lora")]
        if has_fused:
            row += [ratio("fused", "base"), ratio("fused", "lora")]
        row.append(fmt_load([l for x in c.values() if x for l in x.loads]))
        rows.append(row)
        chart.append({"shape": s, **ms})
    text = ["### One adapted linear layer, forward + backward", "", table(header, rows), "",
            "base = the frozen GEMMs alone (x·Wᵀ and dY·W, the floor); LoRA = PEFT "
            "`lora.Linear` with lora_dropout 0.1; RoRA = `RoraLinear` (weight_dropout 0.1, "
            "lora_dropout 0.1, λ = 10, k = 32, penalty gradient added every call). x "
            "requires grad, W frozen. Median over all rounds of all repetitions.", ""]
    return "\n".join(text), chart


def setup_section(benches, include_tiny):
    parts = []
    wrap = group_cases(benches, "setup", ("case", "model", "method", "cache"))
    wrap = {k[1:]: v for k, v in wrap.items() if k[0] == "wrap" and _keep(k[1], include_tiny)}
    if wrap:
        rows = []
        for m in ("tiny", "bert-large", "roberta-large", "llama-7b"):
            if not any(k[0] == m for k in wrap):
                continue
            t = {(me, ca): (wrap[(m, me, ca)].median if (m, me, ca) in wrap else None)
                 for me in ("exact", "randomized") for ca in ("cold", "warm")}
            info = next(wrap[k].info for k in wrap if k[0] == m)
            sp = (f"{t[('exact', 'cold')] / t[('randomized', 'cold')]:.1f}×"
                  if t[("exact", "cold")] and t[("randomized", "cold")] else "–")
            cw = [f"{me}: {t[(me, 'cold')] / t[(me, 'warm')]:.0f}×"
                  for me in ("exact", "randomized") if t[(me, "cold")] and t[(me, "warm")]]
            rows.append([MODEL_LABELS.get(m, m), str(info.get("layers")),
                         str(info.get("n_rora_layers")),
                         fmt_s(t[("exact", "cold")]), fmt_s(t[("exact", "warm")]),
                         fmt_s(t[("randomized", "cold")]), fmt_s(t[("randomized", "warm")]),
                         sp, ", ".join(cw) or "–"])
        parts += ["### Set-up: wrapping a whole model (`apply_rora`, SVD basis per target "
                  "layer)", "",
                  table(["Model", "layers", "RoRA layers", "exact, cold", "exact, warm",
                         "randomized, cold", "randomized, warm", "exact / randomized (cold)",
                         "cold / warm"], rows), "",
                  "cold = empty SVD-basis disk cache; warm = cache filled by an earlier wrap "
                  "of the same weights (content-hashed). Base-model construction untimed. "
                  "CPU: reduced layer counts (column 'layers').", ""]
    basis = group_cases(benches, "setup", ("case", "shape", "method", "cache"))
    basis = {k[1:]: v for k, v in basis.items() if k[0] == "basis"}
    sigma = group_cases(benches, "setup", ("case", "shape", "method"))
    sigma = {k[1:]: v for k, v in sigma.items() if k[0] == "sigma"}
    shapes = [s for s in ("tiny", "4096x4096") if _keep(s, include_tiny)
              and (any(k[0] == s for k in basis) or any(k[0] == s for k in sigma))]
    rows = []
    for s in shapes:
        g = lambda me, ca: basis[(s, me, ca)].median if (s, me, ca) in basis else None  # noqa
        ec, rc, ew, rw = g("exact", "cold"), g("randomized", "cold"), g("exact", "warm"), \
            g("randomized", "warm")
        sm = sigma.get((s, "sigma_max"))
        mn = sigma.get((s, "matrix_norm"))
        rows.append([s, fmt_s(ec), fmt_s(rc), f"{ec / rc:.1f}×" if ec and rc else "–",
                     fmt_s(rw), f"{rc / rw:.0f}×" if rc and rw else "–",
                     f"{ec / ew:.0f}×" if ec and ew else "–",
                     fmt_s(sm.median if sm else None), fmt_s(mn.median if mn else None),
                     f"{mn.median / sm.median:.1f}×" if sm and mn else "–",
                     (f"{abs(sm.info['value'] / mn.info['value'] - 1):.1e}"
                      if sm and mn and mn.info.get("value") else "–")])
    if rows:
        parts += ["### Set-up: one weight (k = 32)", "",
                  table(["W", "basis exact (cold)", "basis randomized (cold)",
                         "exact / randomized", "randomized warm", "randomized cold / warm",
                         "exact cold / warm", "σ_max (rora_fast.sigma_max)",
                         "σ_max (matrix_norm ord=2)", "speed-up", "rel. diff"], rows), "",
                  "Targets: randomized ≥ 10× faster than exact at 4096², warm ≥ 100× faster "
                  "than cold. Cold/warm ratios use the same method's cold time.", ""]
    return "\n".join(parts)


def memory_section(benches, device, include_tiny):
    mem = {}
    for b in benches:
        ei = b.get("extra_info", {})
        if ei.get("kind") == "memory" and _keep(ei.get("model"), include_tiny):
            mem[(ei["model"], ei["variant"])] = ei
    if not mem:
        return "", []
    rows, chart = [], []
    method = next(iter(mem.values()))["first"]["method"]
    for m in ("tiny", "bert-large", "roberta-large", "llama-7b"):
        lo, ro = mem.get((m, "lora")), mem.get((m, "rora"))
        if not lo and not ro:
            continue
        f = lambda e, k: e[k]["peak_bytes"] / 2**20 if e else None  # noqa: E731
        lf, rf, ls, rs = f(lo, "first"), f(ro, "first"), f(lo, "steady"), f(ro, "steady")
        info = lo or ro
        rows.append([MODEL_LABELS.get(m, m),
                     f"{info['layers']} × {info['batch']} × {info['seq']}",
                     f"{lf:,.0f}" if lf is not None else "–",
                     f"{rf:,.0f}" if rf is not None else "–",
                     f"{100 * (rf / lf - 1):+.1f} %" if lf and rf else "–",
                     f"{ls:,.0f}" if ls is not None else "–",
                     f"{rs:,.0f}" if rs is not None else "–"])
        chart.append({"model": m, "lora": lf, "rora": rf})
    text = ["### Peak memory of one training iteration", "",
            table(["Model", "size (layers × batch × seq)", "LoRA, 1st iter (MiB)",
                   "RoRA, 1st iter (MiB)", "RoRA vs LoRA", "LoRA, 2nd iter (MiB)",
                   "RoRA, 2nd iter (MiB)"], rows), "",
            f"Measured in a fresh subprocess per case: {method}, above the memory held "
            "after model construction. The 1st iteration includes the AdamW state; on the "
            "CPU the 2nd iteration reuses heap that glibc kept from the 1st, so only the "
            "1st is a peak." if device == "cpu" else
            f"Measured in a fresh subprocess per case: {method}, above the memory "
            "allocated before the iteration.", ""]
    return "\n".join(text), chart


# ----------------------------------------------------------------------------- chart
def chart(path: Path, model_rows, layer_rows, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("ratio", "model", "layer")
              if (p != "layer" and model_rows) or (p == "layer" and layer_rows)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2),
                             layout="constrained")
    if len(panels) == 1:
        axes = [axes]
    for ax, p in zip(axes, panels):
        if p == "ratio":
            names = [MODEL_LABELS.get(r["model"], r["model"]) for r in model_rows]
            ours = [r["rora_ms"] / r["lora_ms"] if r["lora_ms"] and r["rora_ms"] else 0
                    for r in model_rows]
            paper = [r["paper"][1] / r["paper"][0] if r["paper"] else 0 for r in model_rows]
            xs = range(len(names))
            ax.bar([x - 0.2 for x in xs], paper, 0.4, label="paper (GPU)", color="#bbbbbb")
            bars = ax.bar([x + 0.2 for x in xs], ours, 0.4, label="rora-fast (this run)",
                          color="#d62728")
            for b, v in zip(bars, ours):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}×", ha="center",
                        va="bottom", fontsize=8)
            ax.axhline(1.10, ls="--", color="k", lw=0.8, label="target 1.10×")
            ax.set_ylim(0.8, max(ours + paper + [1.2]) * 1.08)
            ax.axhline(1.0, color="k", lw=0.5)
            ax.set_xticks(list(xs), names, fontsize=8)
            ax.set_ylabel("RoRA / LoRA time per iteration")
            ax.set_title("Overhead of RoRA over LoRA")
            ax.legend(fontsize=7)
        elif p == "model":
            names = [MODEL_LABELS.get(r["model"], r["model"]) for r in model_rows]
            xs = range(len(names))
            ax.bar([x - 0.2 for x in xs], [r["lora_ms"] or 0 for r in model_rows], 0.4,
                   label="PEFT LoRA", color="#1f77b4")
            ax.bar([x + 0.2 for x in xs], [r["rora_ms"] or 0 for r in model_rows], 0.4,
                   label="RoRA", color="#d62728")
            ax.set_xticks(list(xs), names, fontsize=8)
            ax.set_ylabel("ms / training iteration (reduced sizes on CPU)")
            ax.set_title("Training iteration")
            ax.legend(fontsize=7)
        else:
            names = [r["shape"] for r in layer_rows]
            variants = [v for v in ("base", "lora", "rora", "fused")
                        if any(r.get(v) for r in layer_rows)]
            colors = {"base": "#7f7f7f", "lora": "#1f77b4", "rora": "#d62728",
                      "fused": "#2ca02c"}
            labels = {"base": "base GEMMs", "lora": "PEFT LoRA", "rora": "RoRA torch-ref",
                      "fused": "RoRA fused"}
            w = 0.8 / len(variants)
            for i, v in enumerate(variants):
                ax.bar([x - 0.4 + w * (i + 0.5) for x in range(len(names))],
                       [r.get(v) or 0 for r in layer_rows], w, label=labels[v],
                       color=colors[v])
            ax.set_xticks(list(range(len(names))), names, fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("ms, forward + backward (log)")
            ax.set_title("One linear layer")
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def render(data: dict, include_tiny: bool = False, notes: Optional[str] = None,
           png_name: Optional[str] = None, report_cmd: Optional[str] = None
           ) -> (str, list, list):
    meta, benches = data["meta"], data["benchmarks"]
    device = meta.get("device", "cpu")
    if not include_tiny and benches and all(
            b.get("extra_info", {}).get("model", b.get("extra_info", {}).get("shape"))
            == "tiny" for b in benches):
        include_tiny = True  # a smoke run: show what there is
    msec, mchart = model_section(benches, device, include_tiny)
    lsec, lchart = layer_section(benches, include_tiny)
    ssec = setup_section(benches, include_tiny)
    memsec, _ = memory_section(benches, device, include_tiny)
    date = (meta.get("datetime") or "")[:10]
    v = meta.get("versions", {})
    lines = [f"# rora-fast benchmarks: {date}, {device} ({meta.get('device_name', '?')})", "",
             "Produced by (from the repository root):", "", "```",
             meta.get("command", "?"),
             report_cmd or "python benchmarks/report.py <that JSON>", "```", "",
             _commit_line(meta, date),
             f"- RoRA CPU mask: "
             f"{ {True: 'C fast path (rora_fast._philox_cpu)', False: 'torch Philox (no C extension)', None: '?'}[meta.get('native_mask')] }",
             f"- device: {meta.get('device_name', '?')}, {meta.get('cpu_count', '?')} logical "
             f"CPUs, torch threads {meta.get('torch_threads', '?')}",
             f"- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- load average (1/5/15 min) at start {meta.get('loadavg_start')}, at end "
             f"{meta.get('loadavg_end')}; suite wall time {meta.get('wall_s', '?')} s",
             f"- interleaved repetitions per case: {meta.get('reps', '?')}", "",
             "## Performance", ""]
    if device == "cpu":
        lines += ["Measured on the CPU through the torch reference backend (the fused Triton "
                  "kernels need CUDA). Sizes are reduced to keep each case to seconds; every "
                  "table states them.", ""]
    for sec in (msec, lsec, ssec, memsec):
        if sec:
            lines.append(sec)
    if png_name:
        lines += [f"![benchmark chart]({png_name})", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines), mchart, lchart


def _commit_line(meta, date):
    g = meta.get("git_start")
    if g:
        state = " (rora_fast/kernels modified: " + ", ".join(
            x.strip() for x in g["dirty_files"]) + ")" if g["library_dirty"] else " (clean)"
        return f"- library at commit `{g['commit'][:10]}` when the run started{state}, {date}"
    return (f"- commit `{(meta.get('commit') or '?')[:10]}`"
            f"{' (dirty tree)' if meta.get('dirty') else ''}, {date}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--notes", type=Path, help="Markdown appended after the tables")
    ap.add_argument("--include-tiny", action="store_true")
    ap.add_argument("--no-png", action="store_true")
    a = ap.parse_args(argv)
    data = load(a.json)
    if not data["benchmarks"]:
        print("no benchmarks in the JSON", file=sys.stderr)
        return 1
    md = a.md or a.json[0].with_suffix(".md")
    png = None if a.no_png else (a.png or a.json[0].with_suffix(".png"))
    notes = a.notes.read_text() if a.notes else None
    import shlex

    args = argv if argv is not None else sys.argv[1:]
    text, mchart, lchart = render(data, a.include_tiny, notes, png.name if png else None,
                                  "python benchmarks/report.py "
                                  + " ".join(shlex.quote(x) for x in args))
    if png is not None and not (mchart or lchart):  # nothing to plot: no dangling link
        png = None
        text = render(data, a.include_tiny, notes, None,
                      "python benchmarks/report.py "
                      + " ".join(shlex.quote(x) for x in args))[0]
    if png is not None:
        meta = data["meta"]
        chart(png, mchart, lchart, f"rora-fast, {meta.get('device')} "
              f"({meta.get('device_name', '')}), {(meta.get('datetime') or '')[:10]}")
    write_text(md, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
