"""Issue 29: which configuration the harness runs by default, decided from committed run files.

Every configuration measured on both cells (SST-2 <- IMDB BadNet, CR <- MR BadNet; preset
small: 2,000 rows x 4 epochs) over 5 seeds is judged against LoRA trained on the same
schedule, seeds, rows and triggers, by its margins to the three targets (on the 5-seed means;
positive: met by that much):

    CA   ≥ LoRA's CA − 1          margin  CA − (LoRA CA − 1)
    ASR  ≤ its own ASR floor + 5   margin  floor + 5 − ASR
    floor ≤ LoRA's floor + 5       margin  LoRA floor + 5 − floor

The default is the configuration the harness can run (``HARNESS``: a preset's ``rescale`` and
``repair``) with the best worst margin over the three targets and the two cells, whether or
not it meets all three. Every per-seed number is read from the run files it came from:

* ``posthoc-study/aggregate.json``: RoRA at rescaling depth 0-3, the head re-fit variants;
* ``seeds-<task>-badnet/seeds.json``: ``rora`` (the paper's rule), ``rora+repair``;
* ``adaptive-study/runs/``: the adaptive rescale (and + repair), rung by rung;
* ``retrain-study/ep12-<task>/seeds.json`` and ``retrain-study/posthoc-ep12/``: the same
  schedule at 12 epochs (``--epochs 12``), judged against LoRA trained 12 epochs on the same
  rows and seeds (``REFERENCE``);
* ``retrain-study/ep12g-<task>/seeds.json``: 12 epochs with length-grouped batches
  (``--group-by-length``), judged against LoRA trained the same way;
* ``adaptive-study/runs/ep12*-``: the 12-epoch adapters (random and grouped batches) with the
  rescale at a factor of the paper's scale (``--rescale-factor``) and the adaptive rescale
  (``--rescale adaptive``; followed by the repair it is judged after the repair, as the
  harness does; ``adaptive_study.py --verify`` checks the replay against the harness's path).

Writes ``benchmarks/results/eval/default-choice.{json,md,png}`` and the block of
docs/results.md between its markers. ``tests/test_default_choice.py`` checks that the
presets choose what this script picks from the committed files.

    python scripts/eval/default_choice.py
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adaptive_study import choose as replay_rule, target_margins  # noqa: E402
REL = os.path.join(ROOT, "benchmarks", "results", "eval")
CELLS = ("sst2_sentence", "cr")
KEYS = ("CA", "ASR", "ASR_floor")
SEEDS = (0, 1, 2, 3, 4)


def _fields(rescale, repair, epochs, grouped=False, factor=1.0, tolerance=1.0,
            factors=(0.25, 0.5, 1.0)):
    """The preset fields of a configuration (an adaptive rescale followed by the repair is
    judged after the repair: the harness's rule)."""
    return {"rescale": rescale, "repair": repair, "epochs": epochs, "group_by_length": grouped,
            "rescale_factor": factor, "rescale_tolerance": tolerance,
            "rescale_factors": tuple(factors)}


#: the 12-epoch schedules of the adaptive study (its runs re-apply every rung to the
#: committed adapters): schedule -> (name suffix, grouped batches)
STUDY_12 = {"ep12": (", 12 epochs", False), "ep12g": (", 12 epochs, grouped", True)}
#: the fixed factors of the paper's scale the harness can run (``--rescale-factor``)
FACTORS = (0.5, 0.75)
#: the adaptive rescale over x0.5/0.75/1 within 2 dev points, judged after the repair
AFTER_REPAIR = ((0.5, 0.75, 1.0), 2.0)


def study_names(suffix: str) -> Dict[str, str]:
    """The adaptive study's configurations of one schedule: key -> name."""
    names = {("fixed", f, rep): f"rora{' + repair' if rep else ''}, rescale x{f:g}{suffix}"
             for f in FACTORS for rep in (False, True)}
    names.update({("adaptive", rep): f"rora, adaptive rescale{' + repair' if rep else ''}{suffix}"
                  for rep in (False, True)})
    names[("after repair",)] = f"rora, adaptive rescale x0.5/0.75/1 within 2 + repair{suffix}"
    return names


#: configuration -> the preset fields that run it (None: not a harness option)
HARNESS = {"rora (paper rule)": _fields("paper", False, 4),
           "rora + repair": _fields("paper", True, 4),
           "rora, adaptive rescale": _fields("adaptive", False, 4),
           # (the 4-epoch records have no repaired dev accuracy: this row's rule judged the
           # model before the repair, which the harness no longer does)
           "rora, adaptive rescale (judged before the repair) + repair": None,
           "rora (paper rule), 12 epochs": _fields("paper", False, 12),
           "rora + repair, 12 epochs": _fields("paper", True, 12),
           "rora (paper rule), 12 epochs, grouped": _fields("paper", False, 12, True),
           "rora + repair, 12 epochs, grouped": _fields("paper", True, 12, True)}
for _sched, (_suffix, _grouped) in STUDY_12.items():
    for _key, _name in study_names(_suffix).items():
        if _key[0] == "fixed":
            HARNESS[_name] = _fields("paper", _key[2], 12, _grouped, _key[1])
        elif _key[0] == "adaptive":
            HARNESS[_name] = _fields("adaptive", _key[1], 12, _grouped)
        else:
            HARNESS[_name] = _fields("adaptive", True, 12, _grouped, tolerance=AFTER_REPAIR[1],
                                     factors=AFTER_REPAIR[0])

#: LoRA of the same schedule: every configuration is judged against the row named here
#: (default "lora", 4 epochs); "grouped": length-grouped training batches (``--group-by-length``),
#: for LoRA as for RoRA
LORA12 = "lora, 12 epochs"
LORA12G = "lora, 12 epochs, grouped"
REFERENCE = {**{n: LORA12 for n in ("rora (paper rule), 12 epochs", "rora + repair, 12 epochs",
                                    "rora + head re-fit, 12 epochs (script only)",
                                    "rora, top 2 + head re-fit, 12 epochs (script only)")},
             **{n: LORA12G for n in ("rora (paper rule), 12 epochs, grouped",
                                     "rora + repair, 12 epochs, grouped")}}
for _sched, (_suffix, _grouped) in STUDY_12.items():
    REFERENCE.update({n: LORA12G if _grouped else LORA12 for n in study_names(_suffix).values()})
REFERENCES = ("lora", LORA12, LORA12G)


def _load(path: str) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def per_seed_tables(rel: str = REL) -> Dict[str, Dict[str, Dict[int, Dict]]]:
    """``{configuration: {cell: {seed: {CA, ASR, ASR_floor}}}}`` from the run files, with
    ``"lora"`` the reference (4-epoch PEFT LoRA of the same seeds)."""
    out: Dict[str, Dict[str, Dict[int, Dict]]] = {}

    def put(name, cell, seed, m):
        out.setdefault(name, {}).setdefault(cell, {})[int(seed)] = {k: m[k] for k in KEYS}
    def put_seeds(path, cell, names):  # a `rora-fast seeds` folder's per-seed rows
        seeds = _load(path) or {}
        for method, name in names:
            for s, row in seeds.get("methods", {}).get(method, {}).get("per_seed", {}).items():
                put(name, cell, s, row)

    def put_posthoc(path, cell, labels):  # a posthoc_study.py aggregate's per-seed rows
        agg = _load(path) or {}
        variants = agg.get("cells", {}).get(cell, {}).get("variants", {})
        for v, label in labels:
            for s, m in variants.get(v, {}).get("per_seed", {}).items():
                put(label, cell, s, m)

    study = os.path.join(rel, "retrain-study")
    for cell in CELLS:
        put_seeds(os.path.join(rel, f"seeds-{cell}-badnet", "seeds.json"), cell,
                  (("lora", "lora"), ("rora", "rora (paper rule)"),
                   ("rora+repair", "rora + repair")))
        put_posthoc(os.path.join(rel, "posthoc-study", "aggregate.json"), cell,
                    (("rora@top2", "rora, top 2 blocks rescaled"),
                     ("rora@top1", "rora, top 1 block rescaled"),
                     ("rora@top3+head", "rora + head re-fit (script only)"),
                     ("rora@top2+head", "rora, top 2 + head re-fit (script only)")))
        runs = os.path.join(rel, "adaptive-study", "runs")
        for fn in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
            r = _load(os.path.join(runs, fn))
            if r.get("cell") != cell:
                continue
            if r.get("schedule") == "small":
                pick = adaptive_pick(r["rungs"])
                put("rora, adaptive rescale", cell, r["seed"], pick["test"])
                put("rora, adaptive rescale (judged before the repair) + repair", cell,
                    r["seed"], pick["test_repaired"])
            elif r.get("schedule") in STUDY_12:
                names = study_names(STUDY_12[r["schedule"]][0])
                rung = {(x["layers"], x["factor"]): x for x in r["rungs"]}
                for f in FACTORS:
                    put(names[("fixed", f, False)], cell, r["seed"], rung[(3, f)]["test"])
                    put(names[("fixed", f, True)], cell, r["seed"], rung[(3, f)]["test_repaired"])
                pick = adaptive_pick(r["rungs"])
                put(names[("adaptive", False)], cell, r["seed"], pick["test"])
                pick = adaptive_pick(r["rungs"], acc="dev_acc_repaired")
                put(names[("adaptive", True)], cell, r["seed"], pick["test_repaired"])
                pick = replay_rule(r["rungs"], [(3, f) for f in AFTER_REPAIR[0]], AFTER_REPAIR[1],
                                   acc="dev_acc_repaired")
                put(names[("after repair",)], cell, r["seed"], pick["test_repaired"])
        put_seeds(os.path.join(study, f"ep12-{cell}", "seeds.json"), cell,
                  (("lora", LORA12), ("rora", "rora (paper rule), 12 epochs"),
                   ("rora+repair", "rora + repair, 12 epochs")))
        put_seeds(os.path.join(study, f"ep12g-{cell}", "seeds.json"), cell,
                  (("lora", LORA12G), ("rora", "rora (paper rule), 12 epochs, grouped"),
                   ("rora+repair", "rora + repair, 12 epochs, grouped")))
        put_posthoc(os.path.join(study, "posthoc-ep12", "aggregate.json"), cell,
                    (("rora@top3+head", "rora + head re-fit, 12 epochs (script only)"),
                     ("rora@top2+head", "rora, top 2 + head re-fit, 12 epochs (script only)")))
    return out


def adaptive_pick(rungs: List[Dict], tolerance: float = 1.0, acc: str = "dev_acc") -> Dict:
    """What ``rora_fast.adaptive_rescale_`` picks with its default ladder (the top 3 blocks
    at rora_fast.adaptive.DEFAULT_FACTORS x the paper's scale) and ``tolerance``, from a
    study record's dev accuracies: the study's replay of the rule (tested against the API)."""
    from rora_fast.adaptive import DEFAULT_LADDER
    return replay_rule(rungs, [(s.layers, s.factor) for s in DEFAULT_LADDER], tolerance, acc=acc)


def margins(tables) -> Dict[str, Dict]:
    from rora_harness.seeds import mean_ci
    out = {}
    for name, cells in tables.items():
        if name in REFERENCES:
            continue
        reference = REFERENCE.get(name, "lora")
        lora = tables.get(reference, {})
        row = {"harness": HARNESS.get(name), "reference": reference, "cells": {}}
        for cell in CELLS:
            per = cells.get(cell, {})
            ref = lora.get(cell, {})
            common = [s for s in SEEDS if s in per and s in ref]
            st = {"seeds": common, **{k: mean_ci([per[s][k] for s in common]) for k in KEYS}}
            if common:
                m = {k: sum(per[s][k] for s in common) / len(common) for k in KEYS}
                lm = {k: sum(ref[s][k] for s in common) / len(common) for k in KEYS}
                st["lora"] = {k: round(v, 2) for k, v in lm.items()}
                st["CA_minus_lora"] = mean_ci([per[s]["CA"] - ref[s]["CA"] for s in common])
                st["margins"] = target_margins(m, lm)
            row["cells"][cell] = st
        complete = all(len(row["cells"][c]["seeds"]) == len(SEEDS) for c in CELLS)
        row["complete"] = complete
        row["worst_margin"] = (min(v for c in CELLS for v in row["cells"][c]["margins"].values())
                               if all("margins" in row["cells"][c] for c in CELLS) else None)
        out[name] = row
    return out


def choose(rows: Dict[str, Dict]) -> str:
    """The complete harness configuration with the best worst margin."""
    ok = {n: r for n, r in rows.items() if r["complete"] and r["harness"] is not None}
    if not ok:
        raise ValueError("no harness configuration is measured on every seed of both cells")
    return max(ok, key=lambda n: ok[n]["worst_margin"])


def _f(st) -> str:
    if not st or st.get("mean") is None:
        return ""
    h = st.get("ci95_half")
    return f"{st['mean']:.2f}" + (f" ± {h:.2f}" if h is not None else "")


def markdown(rows: Dict[str, Dict], pick: str) -> str:
    title = {"sst2_sentence": "SST-2", "cr": "CR"}
    lines = ["| configuration | harness option | seeds | cell | CA | ASR | floor | reference | "
             "CA − reference (paired) | margins CA / ASR / floor | worst |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(rows, key=lambda n: -(rows[n]["worst_margin"] if rows[n]["worst_margin"]
                                         is not None else -1e9))
    for n in order:
        r = rows[n]
        opt = ("" if r["harness"] is None else
               f"`rescale={r['harness']['rescale']}, repair={r['harness']['repair']}, "
               f"epochs={r['harness']['epochs']}"
               + (", group_by_length=True" if r["harness"]["group_by_length"] else "")
               + (f", rescale_factor={r['harness']['rescale_factor']:g}"
                  if r["harness"].get("rescale_factor", 1.0) != 1.0 else "")
               + (f", rescale_factors={','.join(f'{x:g}' for x in r['harness']['rescale_factors'])}"
                  f", rescale_tolerance={r['harness']['rescale_tolerance']:g}"
                  if r["harness"]["rescale"] == "adaptive" else "") + "`")
        for cell in CELLS:
            st = r["cells"][cell]
            mg = st.get("margins")
            mark = "**" if n == pick else ""
            worst = "" if r["worst_margin"] is None else f"{r['worst_margin']:+.2f}"
            lines.append(f"| {mark}{n}{mark} | {opt} | {len(st['seeds'])} | {title[cell]} | "
                         f"{_f(st['CA'])} | {_f(st['ASR'])} | {_f(st['ASR_floor'])} | "
                         f"{r['reference']} | "
                         f"{_f(st.get('CA_minus_lora'))} | "
                         f"{'' if not mg else ' / '.join(f'{mg[k]:+.2f}' for k in ('CA', 'ASR', 'floor'))} | "
                         f"{worst}{'' if r['complete'] else ' (incomplete)'} |")
    return "\n".join(lines)


BEGIN, END = "<!-- default:begin -->", "<!-- default:end -->"


def main() -> int:
    from rora_fast.atomic import save_figure, write_json, write_text
    rows = margins(per_seed_tables())
    pick = choose(rows)
    write_json(os.path.join(REL, "default-choice.json"), {
        "targets": "CA >= LoRA - 1; ASR <= own floor + 5; floor <= LoRA floor + 5 (5-seed "
                   "means, LoRA of the same schedule and seeds)",
        "default": pick, "preset_fields": rows[pick]["harness"], "rows": rows})
    table = markdown(rows, pick)
    md = (f"# The default configuration (generated by scripts/eval/default_choice.py)\n\n"
          f"Default: **{pick}** (worst margin {rows[pick]['worst_margin']:+.2f}).\n\n"
          + table + "\n\n![worst margin per configuration](default-choice.png)\n")
    write_text(os.path.join(REL, "default-choice.md"), md)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted((n for n in rows if rows[n]["worst_margin"] is not None),
                   key=lambda n: rows[n]["worst_margin"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    ax.barh(range(len(names)), [rows[n]["worst_margin"] for n in names],
            color=["C2" if n == pick else ("C0" if rows[n]["harness"] else "0.6") for n in names])
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([n + ("" if rows[n]["complete"] else " (incomplete)") for n in names],
                       fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("worst margin over CA / ASR / floor targets and SST-2, CR (points; ≥ 0: all met)")
    ax.set_title("Issue 29: default = best worst margin among harness options (green)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, os.path.join(REL, "default-choice.png"))
    plt.close(fig)
    path = os.path.join(ROOT, "docs", "results.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
        write_text(path, text[:a] + "\n" + table + "\n" + text[b:])
    print(f"default: {pick} (worst margin {rows[pick]['worst_margin']:+.2f}); "
          f"{os.path.join(REL, 'default-choice.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
