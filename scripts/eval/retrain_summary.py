"""Issue 24's retraining study, summarised: every retrained variant (retrain_study.sh) at
every rescaling depth (retrain_posthoc.sh), against the committed LoRA runs and the
library default (RoRA as committed, top 3 blocks), on the seeds each has.

Reads ``benchmarks/results/eval/posthoc-study/aggregate.json`` (the default's runs) and
``benchmarks/results/eval/retrain-study/posthoc-<variant>/aggregate.json`` (written by
``scripts/eval/posthoc_study.py`` from the retrained adapters); writes
``benchmarks/results/eval/retrain-study/summary.{json,md,png}``. Statistics: mean ± the
two-sided 95 % t-interval over seeds (``rora_harness.seeds.mean_ci``), paired
differences on the seeds both rows have; the targets of issue 24 on the means.

    python scripts/eval/retrain_summary.py
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

REL = os.path.join(ROOT, "benchmarks", "results", "eval")
STUDY = os.path.join(REL, "retrain-study")
CELLS = {"sst2_sentence": "SST-2 <- IMDB, BadNet", "cr": "CR <- MR, BadNet"}
KEYS = ("CA", "ASR", "ASR_floor")

#: retrained variant -> (label, what changes in training; everything else the default)
TRAINING = {
    "default": ("library default", "as committed (λ = 10 summed over the 37 adapted layers, "
                                   "4 epochs on 2,000 rows)"),
    "lam-mean": ("paper-faithful reading", "λ = 10 averaged over the 37 adapted layers "
                                           "(= λ 10/37 summed; the paper does not say sum "
                                           "or mean)"),
    "lam1": ("paper-faithful", "λ = 1, the smallest value of the paper's grid (summed)"),
    "ep12": ("paper-faithful direction", "12 epochs on the same rows (the paper: 20 on full "
                                         "splits)"),
}
DEPTH = {"rora@top0": "no rescaling (variant)", "rora@top1": "top 1 block = 1/8 of depth "
         "(paper-faithful)", "rora@top2": "top 2 blocks (variant)",
         "rora@top3": "top 3 blocks (library default)",
         "rora@top2+head": "top 2 blocks, then the head re-fit on clean train rows (variant, "
                           "opt-in)",
         "rora@top3+head": "top 3 blocks, then the head re-fit on clean train rows (variant, "
                           "opt-in)"}


def _load(path: str) -> Dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sources() -> Dict[str, Dict]:
    out = {}
    p = os.path.join(REL, "posthoc-study", "aggregate.json")
    if os.path.exists(p):
        out["default"] = _load(p)
    for v in TRAINING:
        p = os.path.join(STUDY, f"posthoc-{v}", "aggregate.json")
        if v != "default" and os.path.exists(p):
            out[v] = _load(p)
    return out


def scales(train: str) -> Dict[tuple, Dict]:
    """``{(cell, variant): {"s_median", "multiplier_median", "n_modules"}}`` over the seeds
    of a posthoc folder's run files: the median over seeds of each seed's median rescaled
    ``s`` and of its median ``s / (α/r)`` (the factor the update was multiplied by)."""
    folder = os.path.join(REL, "posthoc-study") if train == "default" else \
        os.path.join(STUDY, f"posthoc-{train}")
    by: Dict[tuple, List[Dict]] = {}
    runs = os.path.join(folder, "runs")
    for f in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        if f.endswith(".json"):
            r = _load(os.path.join(runs, f))
            if r.get("rescale"):
                by.setdefault((r["cell"], r["variant"]), []).append(r)
    out = {}
    for key, rs in by.items():
        out[key] = {"seeds": sorted(r["seed"] for r in rs),
                    "s_median": round(statistics.median(
                        statistics.median(r["rescale"].values()) for r in rs), 2),
                    "multiplier_median": round(statistics.median(
                        r["scale_multiplier_median"] for r in rs), 2),
                    "n_modules": statistics.median(len(r["rescale"]) for r in rs)}
    return out


#: training whose LoRA reference is trained on the same schedule in its own folder (issue
#: 29: like for like); every other training keeps the 4-epoch schedule of the committed LoRA
SAME_SCHEDULE_LORA = {"ep12": ("LoRA, 12 epochs", "ep12-{cell}")}


def schedule_lora(train: str, cell: str) -> Dict[int, Dict]:
    """``{seed: metrics}`` of the LoRA runs trained on ``train``'s schedule (empty if the
    training has none of its own, or none finished yet)."""
    from rora_harness.seeds import run_files
    if train not in SAME_SCHEDULE_LORA:
        return {}
    folder = os.path.join(STUDY, SAME_SCHEDULE_LORA[train][1].format(cell=cell))
    return {r["spec"]["seed"]: r["metrics"] for _, r in run_files(folder)
            if r.get("kind") == "defence" and r["spec"]["method"] == "lora"}


def _per_seed(st: Dict) -> Dict[int, Dict]:
    return {int(s): m for s, m in st["per_seed"].items()}


def summarise() -> Dict:
    from rora_harness.seeds import mean_ci

    src = sources()
    sc = {t: scales(t) for t in src}
    cells = {}
    for cell, title in CELLS.items():
        lora = None
        default = None
        for agg in src.values():
            c = agg["cells"].get(cell)
            if c and "lora" in c["variants"]:
                ps = _per_seed(c["variants"]["lora"])
                lora = ps if lora is None else {**ps, **lora}
        d = src.get("default", {}).get("cells", {}).get(cell)
        if d and "rora@top3" in d["variants"]:
            default = _per_seed(d["variants"]["rora@top3"])
        if not lora:
            continue
        rows: List[Dict] = []
        lora4 = lora
        for train, agg in src.items():
            c = agg["cells"].get(cell)
            if not c:
                continue
            # like for like: LoRA trained on this training's schedule where it exists
            lora = schedule_lora(train, cell) if train in SAME_SCHEDULE_LORA else lora4
            ref_label = SAME_SCHEDULE_LORA.get(train, ("LoRA, 4 epochs",))[0]
            for v, st in c["variants"].items():
                if v not in DEPTH:
                    continue
                ps = _per_seed(st)
                seeds = sorted(ps)
                row = {"training": train, "training_label": TRAINING[train][0],
                       "reference": ref_label, "reference_seeds": sorted(lora),
                       "training_change": TRAINING[train][1], "depth": v,
                       "depth_label": DEPTH[v], "seeds": seeds,
                       **{k: mean_ci([ps[s][k] for s in seeds]) for k in KEYS}}
                if (cell, v) in sc[train]:
                    row["scales"] = sc[train][(cell, v)]
                for name, ref in (("lora", lora), ("default", default)):
                    if ref is None or (train == "default" and v == "rora@top3"
                                       and name == "default"):
                        continue
                    common = [s for s in seeds if s in ref]
                    if common:
                        row[f"minus_{name}"] = {"seeds": common, **{
                            k: mean_ci([ps[s][k] - ref[s][k] for s in common]) for k in KEYS}}
                common = [s for s in seeds if s in lora]
                if common:
                    m = lambda d_, k: statistics.fmean(d_[s][k] for s in common)
                    ca, asr, fl = m(ps, "CA"), m(ps, "ASR"), m(ps, "ASR_floor")
                    lca, lfl = m(lora, "CA"), m(lora, "ASR_floor")
                    row["targets"] = {
                        "seeds": common,
                        "CA": {"value": round(ca, 2), "bound": round(lca - 1, 2),
                               "met": ca >= lca - 1, "miss_by": round(max(0, lca - 1 - ca), 2)},
                        "ASR": {"value": round(asr, 2), "bound": round(fl + 5, 2),
                                "met": asr <= fl + 5, "miss_by": round(max(0, asr - fl - 5), 2)},
                        "floor": {"value": round(fl, 2), "bound": round(lfl + 5, 2),
                                  "met": fl <= lfl + 5, "miss_by": round(max(0, fl - lfl - 5), 2)}}
                    row["targets"]["all_met"] = all(row["targets"][k]["met"]
                                                    for k in ("CA", "ASR", "floor"))
                rows.append(row)
        refs = {"LoRA, 4 epochs": lora4}
        for train, (label, _) in SAME_SCHEDULE_LORA.items():
            refs[label] = schedule_lora(train, cell)
        cells[cell] = {"title": title, "lora": {
            label: {"seeds": sorted(ref), **{k: mean_ci([ref[s][k] for s in sorted(ref)])
                                             for k in KEYS}}
            for label, ref in refs.items() if ref}, "rows": rows}
    return {"interval": "two-sided 95 % Student t-interval over seeds (mean_ci); none for "
                        "n = 1", "targets": "on the means over the seeds the row and LoRA "
                                            "share: CA >= LoRA CA - 1; ASR <= own floor + 5; "
                                            "floor <= LoRA floor + 5, LoRA trained on the "
                                            "row's own schedule (like for like)",
            "training": {k: {"label": a, "change": b} for k, (a, b) in TRAINING.items()},
            "cells": cells}


def _f(st: Dict) -> str:
    if st is None:
        return ""
    h = st.get("ci95_half")
    return f"{st['mean']:.2f}" + (f" ± {h:.2f}" if h is not None else " (n = 1)")


def markdown(s: Dict) -> str:
    out = ["# Issue 24: the retraining study (generated by scripts/eval/retrain_summary.py)",
           "", f"Interval: {s['interval']}. Targets: {s['targets']}.", "",
           "| training | what changes |", "|---|---|"]
    out += [f"| `{k}` ({v['label']}) | {v['change']} |" for k, v in s["training"].items()]
    for cell, c in s["cells"].items():
        out += ["", f"## {c['title']}", ""]
        out += [f"{label} (reference), seeds {L['seeds']}: CA {_f(L['CA'])}, "
                f"ASR {_f(L['ASR'])}, floor {_f(L['ASR_floor'])}." for label, L in c["lora"].items()]
        out += ["", "| training | rescaling | seeds | CA | ASR | floor | reference (seeds) | "
                "CA − reference (paired) | CA − default | ASR − default | s median (× α/r) | "
                "targets CA/ASR/floor (miss by) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in c["rows"]:
            t = r.get("targets")
            tt = "" if t is None else "/".join(
                "Y" if t[k]["met"] else f"n ({t[k]['miss_by']})" for k in ("CA", "ASR", "floor"))
            md = r.get("minus_default", {})
            scl = r.get("scales")
            sct = "" if not scl else f"{scl['s_median']} (×{scl['multiplier_median']})"
            out.append(f"| {r['training']} | {r['depth']} | {','.join(map(str, r['seeds']))} | "
                       f"{_f(r['CA'])} | {_f(r['ASR'])} | {_f(r['ASR_floor'])} | "
                       f"{r['reference']} ({','.join(map(str, r['reference_seeds']))}) | "
                       f"{_f(r.get('minus_lora', {}).get('CA'))} | {_f(md.get('CA'))} | "
                       f"{_f(md.get('ASR'))} | {sct} | {tt} |")
        met = [r for r in c["rows"] if r.get("targets", {}).get("all_met")]
        out += ["", "Rows meeting all three targets: " + (", ".join(
            f"{r['training']} {r['depth']} (seeds {r['seeds']})" for r in met) or "none") + "."]
    return "\n".join(out) + "\n"


BEGIN, END = "<!-- retrain:begin -->", "<!-- retrain:end -->"


def results_block(s: Dict) -> str:
    """The compact table docs/results.md carries (between its retrain markers): every
    training x the rescaling depths that remove the trigger (top 2, top 3, with and without
    the head re-fit), with the targets."""
    keep = ("rora@top2", "rora@top3", "rora@top2+head", "rora@top3+head")
    out = ["| cell | training | rescaling | seeds | CA | ASR | floor | reference | CA − reference "
           "(paired) | s / (α/r) | targets CA/ASR/floor (miss by) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell, c in s["cells"].items():
        for r in c["rows"]:
            if r["depth"] not in keep:
                continue
            t = r.get("targets")
            tt = "" if t is None else "/".join(
                "Y" if t[k]["met"] else f"n ({t[k]['miss_by']})" for k in ("CA", "ASR", "floor"))
            sc = r.get("scales")
            out.append(f"| {c['title'].split(',')[0]} | {r['training']} | "
                       f"{r['depth'].split('@')[1]} | {len(r['seeds'])} | {_f(r['CA'])} | "
                       f"{_f(r['ASR'])} | {_f(r['ASR_floor'])} | "
                       f"{r['reference']} ({len(r['reference_seeds'])} seeds) | "
                       f"{_f(r.get('minus_lora', {}).get('CA'))} | "
                       f"{'' if not sc else sc['multiplier_median']} | {tt} |")
    return "\n".join(out)


def update_results_md(s: Dict, path: str) -> bool:
    """Replace the block between the retrain markers of docs/results.md (atomically);
    False where the file has no markers."""
    from rora_fast.atomic import write_text

    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        return False
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    write_text(path, text[:a] + "\n" + results_block(s) + "\n" + text[b:])
    return True


def plot(s: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rora_fast.atomic import save_figure

    cells = list(s["cells"].items())
    fig, axes = plt.subplots(1, max(1, len(cells)), figsize=(6.5 * max(1, len(cells)), 5))
    axes = [axes] if len(cells) <= 1 else list(axes)
    marks = {"default": "o", "lam-mean": "s", "lam1": "^", "ep12": "D"}
    colors = {"rora@top0": "0.6", "rora@top1": "tab:green", "rora@top2": "tab:orange",
              "rora@top3": "tab:red", "rora@top2+head": "tab:purple",
              "rora@top3+head": "tab:brown"}
    for ax, (cell, c) in zip(axes, cells):
        for (label, L), col in zip(c["lora"].items(), ("k", "tab:blue")):
            ax.axvline(L["CA"]["mean"] - 1, color=col, lw=0.8, ls="--", label=f"{label}: CA − 1")
            ax.errorbar(L["CA"]["mean"], L["ASR"]["mean"], fmt="*", ms=12, color=col,
                        label=f"{label} (n={len(L['seeds'])})")
        for r in c["rows"]:
            xe = r["CA"].get("ci95_half") or 0
            ye = r["ASR"].get("ci95_half") or 0
            ax.errorbar(r["CA"]["mean"], r["ASR"]["mean"], xerr=xe, yerr=ye,
                        fmt=marks.get(r["training"], "x"), color=colors.get(r["depth"], "b"),
                        capsize=2, alpha=0.85,
                        label=f"{r['training']} {r['depth'].split('@')[1]} (n={len(r['seeds'])})")
        ax.set_title(c["title"])
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel("attack success rate (%)")
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Issue 24: retrained variants x rescaling depth (mean ± 95 % t-interval)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main() -> int:
    from rora_fast.atomic import write_json, write_text

    s = summarise()
    os.makedirs(STUDY, exist_ok=True)
    write_json(os.path.join(STUDY, "summary.json"), s)
    write_text(os.path.join(STUDY, "summary.md"), markdown(s))
    plot(s, os.path.join(STUDY, "summary.png"))
    update_results_md(s, os.path.join(ROOT, "docs", "results.md"))
    print(os.path.join(STUDY, "summary.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
