"""One table and one figure across every result folder: the Table-2 view of a reproduction.

``rora-fast report ROOT`` reads every ``runs/*.json`` written by ``rora-fast defend`` under
ROOT (any depth), groups the defence runs by setting (task, attack, adapter targets, preset,
seed) and writes ``ROOT/overview.md`` and ``ROOT/overview.png``: per setting and method the
clean accuracy, attack success rate and Δ = CA − ASR, next to the paper's BERT-large numbers.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

from rora_fast.atomic import save_figure
from .presets import nondefault_hparams, paper_row

__all__ = ["collect_runs", "overview_markdown", "plot_overview", "write_overview"]

#: column order: baselines, RoRA, the variants with and without RoRA, then the rest
METHOD_ORDER = ["fft", "lora", "rora", "pissa", "rora-pissa", "dora", "rora-dora", "olora",
                "rora-olora", "lora+rescale"]
TASK_ORDER = ["sst2_sentence", "cr", "cola"]
PROXY = {"sst2_sentence": "IMDB", "cr": "MR", "cola": "SST-2"}


def collect_runs(root: str) -> List[Dict]:
    """Every defence run JSON under ``root`` (any ``runs/`` folder, any depth), except the
    multi-seed folders ``seeds-*`` (``rora-fast seeds``: their ``seeds.md`` reports them
    with intervals; several of their runs are copies of single-seed runs)."""
    runs = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()  # a deterministic order: ties between identical runs resolve the same way
        dirnames[:] = [d for d in dirnames if not d.startswith("seeds-")]
        if os.path.basename(dirpath) != "runs":
            continue
        for fn in sorted(files):
            if not fn.endswith(".json"):
                continue
            path = os.path.join(dirpath, fn)
            with open(path) as f:
                try:
                    r = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: not valid JSON ({e})") from None
            if isinstance(r, dict) and r.get("kind") == "defence":
                r["_path"] = os.path.relpath(path, root)
                runs.append(r)
    return runs


def _targets(spec: Dict) -> str:
    tm = spec.get("target_modules")
    if tm is None:
        return "query,value (PEFT default)"
    return tm if isinstance(tm, str) else ",".join(tm)


def _setting(r: Dict) -> Tuple:
    s = r["spec"]
    return (s["task"], s["attack"], _targets(s), s["preset"], s["seed"], s["model"])


def _setting_sort(key: Tuple):
    task, attack, targets, preset, seed, model = key
    t = TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER)
    return (attack != "badnet", t, task, "PEFT default" in targets, preset, seed, model)


def _method_sort(m: str):
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m)


def _at_defaults(runs: List[Dict]) -> List[Dict]:
    """The runs at the default hyperparameters: sensitivity runs (another p, λ, ...) are
    reported by their own sweep, not as the method's result."""
    return [r for r in runs if not nondefault_hparams(r["spec"])]


def _group(runs: List[Dict]) -> Dict[Tuple, Dict[str, Dict]]:
    groups: Dict[Tuple, Dict[str, Dict]] = {}
    for r in _at_defaults(runs):
        g = groups.setdefault(_setting(r), {})
        m = r["spec"]["method"]
        # a rerun of the same method and setting: keep the latest (the first seen on a tie)
        if m not in g or r.get("finished_at", 0) > g[m].get("finished_at", 0):
            g[m] = r
    return dict(sorted(groups.items(), key=lambda kv: _setting_sort(kv[0])))


def _f(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}"


def overview_markdown(runs: List[Dict], title: str = "Backdoor removal: overview") -> str:
    groups = _group(runs)
    lines = [f"# {title}", ""]
    if not groups:
        return "\n".join(lines + ["No defence runs found.", ""])
    lines += ["Each row: one defence fine-tuned on the clean target task from the weight-poisoned "
              "model. CA = clean test accuracy, ASR = attack success rate on triggered "
              "non-target test rows, Δ = CA − ASR (higher is better), ASR floor = the same "
              "model's target rate on those rows without the trigger. Paper = Table 2, "
              "BERT-large (a larger model on the full data: compare the pattern, not the "
              "digits).", ""]
    n_other = len(runs) - len(_at_defaults(runs))
    if n_other:
        lines += [f"{n_other} run(s) with non-default hyperparameters (sensitivity sweeps: "
                  f"`sweep_*.md` in their folders) are not in these tables.", ""]
    for key, by_method in groups.items():
        task, attack, targets, preset, seed, model = key
        r0 = next(iter(by_method.values()))
        b = r0["poisoned_baseline"]
        lines.append(f"## {task} ← {PROXY.get(task, '?')} · {attack} · targets {targets} · "
                     f"preset {preset} · seed {seed}")
        lines.append("")
        lines.append(f"Model `{model}`; {r0['sizes']['train']} train rows, "
                     f"{r0['sizes']['test']} clean test rows, {r0['sizes']['nt_trig']} "
                     f"triggered non-target rows. Poisoned model before fine-tuning: "
                     f"CA {_f(b['CA'])}, ASR {_f(b['ASR'])}, ASR floor {_f(b['ASR_floor'])}.")
        lines.append("")
        lines.append("| method | CA | ASR | Δ | ASR floor | paper CA / ASR / Δ | result file |")
        lines.append("|---|---|---|---|---|---|---|")
        for m in sorted(by_method, key=_method_sort):
            r = by_method[m]
            mt = r["metrics"]
            pp = paper_row(attack, task, m)
            pps = " / ".join(_f(float(x)) for x in pp) if pp else ""
            lines.append(f"| {m} | {_f(mt['CA'])} | {_f(mt['ASR'])} | {_f(mt['delta'])} | "
                         f"{_f(mt['ASR_floor'])} | {pps} | `{r['_path']}` |")
        lines.append("")
    lines += ["## Δ at a glance", ""]
    methods = sorted({m for g in groups.values() for m in g}, key=_method_sort)
    lines.append("| setting | " + " | ".join(methods) + " |")
    lines.append("|---|" + "---|" * len(methods))
    for key, by_method in groups.items():
        task, attack, targets, preset, seed, _ = key
        tshort = "qv" if "PEFT default" in targets else targets
        cells = [_f(by_method[m]["metrics"]["delta"]) if m in by_method else "" for m in methods]
        lines.append(f"| {task} {attack} ({tshort}, {preset}, s{seed}) | " + " | ".join(cells)
                     + " |")
    lines.append("")
    return "\n".join(lines)


def plot_overview(runs: List[Dict], path: str, title: str = "Backdoor removal") -> bool:
    """Two panels (CA, ASR), one bar group per setting, one bar per method. Returns False
    when there is nothing to plot."""
    groups = _group(runs)
    if not groups:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # ablations (rora:ci, rora:tr+pt, ...) stay in the table; the figure shows the methods
    methods = sorted({m for g in groups.values() for m in g if ":" not in m}, key=_method_sort)
    if not methods:
        return False
    labels = []
    for task, attack, targets, preset, seed, _ in groups:
        tshort = " q,v" if "PEFT default" in targets else ""
        labels.append(f"{task.replace('_sentence', '')}\n{attack}{tshort}\n{preset}, seed {seed}")
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colour = {m: cmap(j % cmap.N) for j, m in enumerate(methods)}
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.4 * len(labels) + 2), 6.5), sharex=True)
    for ax, key, name in ((axes[0], "CA", "clean accuracy (%)"),
                          (axes[1], "ASR", "attack success rate (%)")):
        seen = set()
        for i, g in enumerate(groups.values()):
            present = [m for m in methods if m in g]  # packed and centred per setting
            width = 0.8 / max(len(present), 1)
            for j, m in enumerate(present):
                ax.bar(i - 0.4 + (j + 0.5) * width, g[m]["metrics"][key], width=width,
                       color=colour[m], label=None if m in seen else m)
                seen.add(m)
        if key == "ASR":  # LoRA's ASR floor: the target rate without the trigger
            for i, g in enumerate(groups.values()):
                fl = (g.get("lora") or next(iter(g.values())))["metrics"].get("ASR_floor")
                if fl is not None:
                    ax.hlines(fl, i - 0.45, i + 0.45, colors="k", linestyles=":", linewidth=1)
        ax.set_ylabel(name)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(labels)))
    axes[1].set_xticklabels(labels, fontsize=8)
    handles, names = axes[0].get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda k: _method_sort(names[k]))
    axes[0].legend([handles[k] for k in order], [names[k] for k in order], fontsize=7,
                   ncol=min(len(methods), 6), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(f"{title} (dotted: LoRA's ASR floor, the target rate without the trigger)",
                 fontsize=9, y=0.995)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return True


def write_overview(root: str, title: str = "Backdoor removal: overview") -> str:
    """Write ``overview.md`` (and ``overview.png`` when there are runs) under ``root``."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"results folder {root!r} does not exist")
    runs = collect_runs(root)
    md = overview_markdown(runs, title)
    if plot_overview(runs, os.path.join(root, "overview.png")):
        md += "\n![CA and ASR per setting and method](overview.png)\n"
    with open(os.path.join(root, "overview.md"), "w") as f:
        f.write(md)
    return md
