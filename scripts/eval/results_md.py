"""Regenerate the numbers of docs/results.md from the result files (issue 14).

Replaces the text between ``<!-- seeds:begin -->`` and ``<!-- seeds:end -->`` in
docs/results.md with tables built from ``benchmarks/results/eval/seeds-*/seeds.json`` (and
the bias analysis in ``seeds-*/bias/bias.json``): mean ± 95 % t-interval over the seeds
that finished, the paired differences, and the issue's targets with met / not met. Every
number is read from a result file; nothing is typed by hand.

    python scripts/eval/results_md.py            # from the repository root
"""
import json
import os
import sys

from rora_fast.atomic import save_figure, write_json, write_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EVAL = "benchmarks/results/eval"
SETTINGS = [("sst2_sentence", "SST-2 ← IMDB, BadNet"), ("cr", "CR ← MR, BadNet")]
DOC = os.path.join(ROOT, "docs", "results.md")
BEGIN, END = "<!-- seeds:begin -->", "<!-- seeds:end -->"


def ci(st):
    if not st or st.get("mean") is None:
        return "–"
    if st.get("ci95_half") is None:
        return f"{st['mean']:.2f} (one seed)"
    return f"{st['mean']:.2f} ± {st['ci95_half']:.2f}"


def link(rel, text=None):
    return f"[{text or rel}](../{rel})"


def targets(agg):
    """The issue's targets for rora and rora+repair: mean ASR <= 15, mean floor <= LoRA's
    mean floor + 5, mean CA >= LoRA's mean CA - 3."""
    ms = agg["methods"]
    lora = ms.get("lora")
    out = []
    for v in ("rora", "rora+repair"):
        m = ms.get(v)
        if not m or not lora:
            continue
        n = len(m["seeds"])
        rows = [("mean ASR ≤ 15", m["ASR"]["mean"], 15.0, m["ASR"]["mean"] <= 15.0, ci(m["ASR"])),
                ("mean ASR floor ≤ LoRA's + 5", m["ASR_floor"]["mean"],
                 lora["ASR_floor"]["mean"] + 5,
                 m["ASR_floor"]["mean"] <= lora["ASR_floor"]["mean"] + 5, ci(m["ASR_floor"])),
                ("mean CA ≥ LoRA's − 3", m["CA"]["mean"], lora["CA"]["mean"] - 3,
                 m["CA"]["mean"] >= lora["CA"]["mean"] - 3, ci(m["CA"]))]
        for name, val, bound, ok, txt in rows:
            out.append((v, n, name, txt, bound, ok))
    return out


def render():
    lines = []
    for task, title in SETTINGS:
        rel = f"{EVAL}/seeds-{task}-badnet"
        path = os.path.join(ROOT, rel, "seeds.json")
        lines += [f"### {title}", ""]
        if not os.path.exists(path):
            lines += ["No seed runs finished yet.", ""]
            continue
        agg = json.load(open(path))
        ms = agg["methods"]
        ns = sorted({len(m["seeds"]) for m in ms.values()})
        lines += [f"Mean ± half-width of the 95 % t-interval over the seeds each row lists "
                  f"({link(rel + '/seeds.md', 'seeds.md')}, {link(rel + '/seeds.json', 'seeds.json')}; "
                  f"per-seed files in {link(rel + '/runs', 'runs/')}). "
                  f"Rows with one seed are labelled *one seed*.", "",
                  "| method | seeds | CA | ASR | Δ | ASR floor | CA / ASR before rescaling |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in ms.items():
            br = m.get("before_rescale")
            brs = f"{ci(br['CA'])} / {ci(br['ASR'])}" if br else ""
            lines.append(f"| {name} | {len(m['seeds'])} ({', '.join(map(str, m['seeds']))}) | "
                         f"{ci(m['CA'])} | {ci(m['ASR'])} | {ci(m['delta'])} | "
                         f"{ci(m['ASR_floor'])} | {brs} |")
        if agg.get("paired"):
            lines += ["", "Paired differences (same seed, so the same poisoned model and data):",
                      "", "| difference | seeds | CA | ASR | ASR floor |", "|---|---|---|---|---|"]
            for name, d in agg["paired"].items():
                lines.append(f"| {name} | {len(d['seeds'])} ({', '.join(map(str, d['seeds']))}) | "
                             f"{ci(d['CA'])} | {ci(d['ASR'])} | {ci(d['ASR_floor'])} |")
        t = targets(agg)
        if t:
            lines += ["", "Issue 14's targets (on the means; *met* says nothing about the "
                          "interval):", "", "| variant | seeds | target | value | bound | met? |",
                      "|---|---|---|---|---|---|"]
            for v, n, name, txt, bound, ok in t:
                verdict = "**met**" if ok else "not met"
                if n < 5:
                    verdict += f" on {n} seed{'s' if n > 1 else ''} (the target asks for ≥ 5)"
                lines.append(f"| {v} | {n} | {name} | {txt} | {bound:.2f} | {verdict} |")
        bias = os.path.join(ROOT, rel, "bias", "bias.json")
        if os.path.exists(bias):
            b = json.load(open(bias))
            rr = [r for r in b["runs"] if r["method"] == "rora"]
            if rr:
                lines += ["", f"Clean-row prediction balance of RoRA before and after "
                              f"rescaling ({link(rel + '/bias/bias.md', 'bias.md')}): share of "
                              f"clean test rows predicted as the target (true share "
                              f"{rr[0]['states']['none']['true_target_share']:.2f} %), mean logit "
                              f"margin z_target − z_other on the non-target rows:", "",
                          "| seed | none | block " + " | block ".join(
                              s.split()[1] for s in rr[0]["states"] if s.startswith("block"))
                          + " | top 3 (RoRA) | top 3 + repair |",
                          "|---|" + "---|" * (3 + sum(s.startswith("block")
                                                       for s in rr[0]["states"]))]
                for r in rr:
                    st = r["states"]
                    keys = ["none"] + [s for s in st if s.startswith("block")] + \
                        ["top 3", "top 3 + repair"]
                    lines.append(f"| {r['seed']} | " + " | ".join(
                        f"{st[k]['pred_target_share']:.1f} % / {st[k]['margin_nontarget_mean']:+.2f}"
                        if k in st else "" for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


BIAS_DOC = os.path.join(ROOT, "docs", "backdoor-bias.md")
BAL = f"{EVAL}/bias-balance"


def balance():
    """Prediction balance before/after rescaling of every run with both, from the run
    JSONs alone (rora_harness.bias.balance_from_runs): balance.json, .md, .png."""
    sys.path.append(ROOT)  # after PYTHONPATH: a fixed library (worktree) can be chosen
    from rora_harness.bias import balance_from_runs
    rows, seen = [], set()
    for r in balance_from_runs(os.path.join(ROOT, EVAL)):
        if r["file"].startswith("bias-balance"):
            continue
        key = (r["task"], r["attack"], r["method"], r["seed"], str(r["target_modules"]),
               r["preset"])
        if key in seen:  # the seeds folders hold copies of single-seed runs
            continue
        seen.add(key)
        rows.append(r)
    rows.sort(key=lambda r: (r["preset"] != "small", r["task"], r["attack"],
                             str(r["target_modules"]), r["method"], r["seed"]))
    out = os.path.join(ROOT, BAL)
    write_json(os.path.join(out, "balance.json"), rows)
    md = ["| setting | method | targets | preset | seed | CA before → after | predicted target, % of "
          "clean rows (true) before → after | ASR floor before → after | target-class recall "
          "before → after | file |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r["before"], r["after"]
        tm = r["target_modules"] if isinstance(r["target_modules"], str) else "query,value"
        md.append(f"| {r['task']} ← {r['attack']} | {r['method']} | {tm} | {r['preset']} | "
                  f"{r['seed']} | "
                  f"{b['CA']:.2f} → {a['CA']:.2f} | {b['pred_target_share']:.1f} → "
                  f"**{a['pred_target_share']:.1f}** ({a['true_target_share']:.1f}) | "
                  f"{b['ASR_floor']:.2f} → {a['ASR_floor']:.2f} | {b['target_recall']:.1f} → "
                  f"{a['target_recall']:.1f} | [{os.path.basename(r['file'])}](../{EVAL}/{r['file']}) |")
    with open(os.path.join(out, "balance.md"), "w") as f:
        f.write("# Prediction balance before and after rescaling (from the run files)\n\n"
                "Recovered exactly from CA, ASR floor and row counts of each run JSON "
                "(`rora_harness.bias.prediction_balance`). Made by "
                "`python scripts/eval/results_md.py`.\n\n" + "\n".join(md).replace("](../", "](../../../../") + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sel = [r for r in rows if r["task"] != "cola" and r["preset"] == "small"]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(sel)), 4))
    for i, r in enumerate(sel):
        b, a = r["before"]["pred_target_share"], r["after"]["pred_target_share"]
        ax.annotate("", xy=(i, a), xytext=(i, b),
                    arrowprops=dict(arrowstyle="->", color="C3" if a > b else "C0", lw=1.6))
        ax.scatter([i], [r["after"]["true_target_share"]], marker="_", s=200, color="k")
    vals = [r[k]["pred_target_share"] for r in sel for k in ("before", "after")] + \
        [r["after"]["true_target_share"] for r in sel]
    ax.set_ylim(max(0, min(vals) - 5), min(100, max(vals) + 5))
    ax.set_xlim(-0.7, len(sel) - 0.3)
    ax.set_xticks(range(len(sel)))
    ax.set_xticklabels([f"{r['task'].replace('_sentence', '')} {r['attack']}\n{r['method']}"
                        f"{'' if isinstance(r['target_modules'], str) else ' (q,v)'} s{r['seed']}"
                        for r in sel], rotation=70, fontsize=7)
    ax.set_ylabel("% of clean test rows predicted as the target")
    ax.set_title("Preset small: rescaling moves the prediction balance (arrow: before → after; "
                 "black bar: true target share)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "balance.png"), dpi=110)
    plt.close(fig)
    return "\n".join(md).replace("](../", "](../")


def _replace(path, text):
    doc = open(path).read()
    if BEGIN not in doc or END not in doc:
        sys.exit(f"{path}: markers {BEGIN} / {END} missing")
    a, b = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    write_text(path, doc[:a] + "\n" + text + "\n" + doc[b:])
    print(f"rewrote the generated part of {os.path.relpath(path, ROOT)}")


def main():
    _replace(DOC, render())
    if os.path.exists(BIAS_DOC):
        bal = balance()
        per_block = []
        for task, title in SETTINGS:
            rel = f"{EVAL}/seeds-{task}-badnet/bias"
            if os.path.exists(os.path.join(ROOT, rel, "bias.md")):
                body = open(os.path.join(ROOT, rel, "bias.md")).read().split("\n", 2)[2]
                body = body.replace("](bias_", f"](../{rel}/bias_")
                per_block += [f"#### {title} ([bias.md](../{rel}/bias.md), "
                              f"[bias.json](../{rel}/bias.json))", "", body]
        if not per_block:
            per_block = ["No saved adapter analysed yet (`rora-fast bias` runs as the seed runs "
                         "finish: `scripts/eval/seeds_post.py`)."]
        _replace(BIAS_DOC, "### From the run files (every run with rescaling)\n\n"
                           f"![balance](../{BAL}/balance.png)\n\n" + bal +
                 "\n\n### Per rescaled block, from the saved adapters\n\n" +
                 "\n".join(per_block))


if __name__ == "__main__":
    main()
