"""Issue 29: the strength of RoRA's post-training rescaling chosen on clean data, studied
from the committed RoRA adapters (no retraining).

For each schedule (``small``: the 4-epoch runs of ``seeds-<task>-badnet``; ``ep12``: the
12-epoch runs of ``retrain-study/ep12-<task>``; ``ep12g``: the same with length-grouped
batches, ``retrain-study/ep12g-<task>``; ``demo``: ``seeds-demo-sst2_sentence-
badnet``), cell (SST-2 <- IMDB BadNet, CR <- MR BadNet) and seed, the saved RoRA adapter
is loaded onto that seed's poisoned model (``defended_model``, the path of ``rora-fast
seeds``), and every rung of ``GRID`` (top ``layers`` blocks at ``factor`` x the paper's
scale) is applied by the library's :func:`rora_fast.adaptive_rescale_` (tolerance 100, so
that it measures every rung; its ``on_step`` hook measures the test split in each state).
Per rung: the clean dev accuracy (what the adaptive rule sees) and CA / ASR / ASR floor on
the test split (what it never sees). One JSON per (schedule, cell, seed), resumable.

``summarise`` then evaluates *configurations* over the seeds: each fixed rung, and the
adaptive rule (the strongest rung of a ladder whose dev accuracy is within δ of the
un-rescaled model's) for the ladders in ``LADDERS`` and δ in ``DELTAS``, with either dev
accuracy of ``RULES``: the model's own, or (for rescale + repair) the model's after the
clean head-bias repair. The rule's choice
depends on dev accuracies only, so ``choose`` replays it on the recorded ones
(tests/test_adaptive_rescale.py checks it picks what ``adaptive_rescale_`` picks for every
sub-ladder and δ). Each configuration is judged
against LoRA trained on the same schedule (same seed, poisoned model, rows and trigger):
CA ≥ LoRA − 1, ASR ≤ own floor + 5, floor ≤ LoRA's floor + 5, on the means over seeds.

    python scripts/eval/adaptive_study.py --schedules small,ep12 --seeds 0-4 --commit
    python scripts/eval/adaptive_study.py --summary-only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts", "eval"))
REL = "benchmarks/results/eval"
OUT = f"{REL}/adaptive-study"
SCHEDULES = {
    "small": {"sst2_sentence": f"{REL}/seeds-sst2_sentence-badnet", "cr": f"{REL}/seeds-cr-badnet"},
    "ep12": {"sst2_sentence": f"{REL}/retrain-study/ep12-sst2_sentence",
             "cr": f"{REL}/retrain-study/ep12-cr"},
    "ep12g": {"sst2_sentence": f"{REL}/retrain-study/ep12g-sst2_sentence",
              "cr": f"{REL}/retrain-study/ep12g-cr"},
    "demo": {"sst2_sentence": f"{REL}/seeds-demo-sst2_sentence-badnet"},
}
#: the rungs measured: (top blocks, factor x the paper's scale)
GRID = [(2, 1.0), (3, 0.25), (3, 0.5), (3, 0.75), (3, 1.0)]
#: adaptive ladders (weakest first) evaluated by the summary
LADDERS = {
    "top3 x{.25,.5,1}": [(3, 0.25), (3, 0.5), (3, 1.0)],
    "top3 x{.5,1}": [(3, 0.5), (3, 1.0)],
    "top3 x{.5,.75,1}": [(3, 0.5), (3, 0.75), (3, 1.0)],
    "top3 x{.75,1}": [(3, 0.75), (3, 1.0)],
}
#: the rules: which recorded dev accuracy the adaptive choice compares -- the model's own
#: ("dev_acc", what rora_fast.adaptive_rescale_ measures) or the model's after the clean
#: head-bias repair ("dev_acc_repaired": for "rescale + repair", the state it ends in)
RULES = {"adaptive": "dev_acc", "adaptive after repair": "dev_acc_repaired"}
DELTAS = (0.5, 1.0, 2.0)
KEYS = ("CA", "ASR", "ASR_floor")


def log(*a):
    print(time.strftime("%H:%M:%S", time.gmtime()), *a, flush=True)


def result_path(out: str, schedule: str, cell: str, seed: int) -> str:
    return os.path.join(out, "runs", f"{schedule}-{cell}-s{seed}.json")


class NotCached(Exception):
    """The seed's poisoned model is not in the cache yet (``--only-cached``)."""


def load_defended(spec, folder: str, run: Dict, cache_dir: Optional[str]):
    """The committed RoRA ``run``'s adapter (in ``folder``) on its seed's poisoned model, and
    the run's data sets: ``(model, tokenizer, resolved spec, attack, sets)``."""
    from rora_harness.attacks import get_attack
    from rora_harness.defences import parse_method
    from rora_harness.runner import defended_model, prepare_sets
    model, tok, res = defended_model(spec, parse_method(spec.method),
                                     os.path.join(folder, run["adapter"]), cache_dir, log=log)
    attack = get_attack(spec.attack, spec.trigger)
    sets = prepare_sets(spec.task, attack, tok, res["max_length"], res["n_train"], res["n_dev"],
                        res["n_test"], spec.seed)
    return model, tok, res, attack, sets


def study_one(schedule: str, cell: str, seed: int, cache_dir: Optional[str],
              only_cached: bool = False) -> Dict:
    import rora_fast
    from posthoc_study import committed_runs, forward_features, metrics_from_logits
    from rora_harness.bias import _spec_from
    from rora_fast.repair import classification_head, frequency_bias_shift
    from rora_harness.runner import run_id
    from rora_fast.loop import labelled_batches
    folder = os.path.join(ROOT, SCHEDULES[schedule][cell])
    runs = committed_runs(folder, seed)
    if "rora" not in runs:
        raise FileNotFoundError(f"{folder}: no rora run of seed {seed} with an adapter")
    run = runs["rora"]
    spec = _spec_from(run["spec"])
    if run_id(spec) != run["run_id"]:
        raise ValueError(f"run id mismatch: {run_id(spec)} vs {run['run_id']}")
    if only_cached:
        from rora_harness.poisoning import poison_key
        from rora_harness.runner import poison_config_for
        if not os.path.isdir(os.path.join(cache_dir, poison_key(poison_config_for(spec)))):
            raise NotCached(f"{schedule} {cell} seed {seed}")
    t0 = time.time()
    model, tok, res, attack, sets = load_defended(spec, folder, run, cache_dir)
    L = res["max_length"]
    head = classification_head(model)
    batches = labelled_batches(tok, sets["dev"], L)
    rows = []

    dev_labels = torch.cat([b["labels"] for b in batches]).tolist()

    def measure(step, m, zd):
        _, zt = forward_features(m, tok, [e.text for e in sets["test"]], L, head)
        _, zg = forward_features(m, tok, [e.text for e in sets["nt_trig"]], L, head)
        # + repair: the head bias shifted so that the clean dev prediction frequencies match
        # the dev label frequencies (rora_fast.repair; the dev logits the
        # adaptive rule measured, dev rows only)
        shift = frequency_bias_shift(zd.double().cpu(), dev_labels).float()
        # the dev accuracy after that shift (what a rule for "rescale + repair" would see)
        dev_rep = (zd.float().cpu() + shift).argmax(-1)
        rows.append({"layers": step.layers if step else 0, "factor": step.factor if step else 0.0,
                     "dev_acc_repaired": round(100.0 * float((dev_rep == torch.tensor(dev_labels))
                                                             .float().mean()), 4),
                     "test": metrics_from_logits(zt, zg, sets, attack.target_label),
                     "test_repaired": metrics_from_logits(zt + shift, zg + shift, sets,
                                                          attack.target_label),
                     "repair_shift": [round(float(x), 5) for x in shift]})

    ladder = [rora_fast.RescaleStep(Lb, c) for Lb, c in GRID]
    info = rora_fast.adaptive_rescale_(model, batches, ladder=ladder, tolerance=100.0,
                                       on_step=measure)
    rows[0]["dev_acc"] = info["base_accuracy"]
    for r, s in zip(rows[1:], info["steps"]):
        r["dev_acc"] = s["accuracy"]
    out = {"kind": "adaptive-study", "schedule": schedule, "cell": cell, "seed": seed,
           "from_run": os.path.relpath(os.path.join(folder, "runs", run["run_id"] + ".json"), ROOT),
           "sizes": {k: len(v) for k, v in sets.items()}, "rungs": rows,
           "committed_metrics": run["metrics"], "committed_before_rescale": run.get("before_rescale"),
           "seconds": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads()}
    # reproduction: the un-rescaled state and the paper's rung (top rescale_layers, x1)
    paper = next((r for r in rows if r["layers"] == spec.rescale_layers and r["factor"] == 1.0), None)
    out["reproduces_committed"] = {
        "before_rescale": (run.get("before_rescale") or {}).get("CA") == rows[0]["test"]["CA"]
        and (run.get("before_rescale") or {}).get("ASR") == rows[0]["test"]["ASR"],
        "rescaled": paper is not None and all(run["metrics"][k] == paper["test"][k] for k in KEYS)}
    return out


def verify_one(schedule: str, cell: str, seed: int, cache_dir: Optional[str], factors,
               tolerance: float) -> Dict:
    """The harness's own path for ``--rescale adaptive --repair`` with ``factors`` and
    ``tolerance`` (judged after the repair) on the committed RoRA adapter of
    (schedule, cell, seed): ``adaptive_rescale_on_dev_``, the repair, ``evaluate`` -- to
    check that the summary's replay of that rule on the recorded dev accuracies picks the
    same rung and gives the same metrics."""
    import dataclasses
    from rora_fast.repair import recalibrate_head_bias_
    from posthoc_study import committed_runs
    from rora_harness.bias import _spec_from
    from rora_harness.runner import adaptive_rescale_on_dev_, evaluate
    folder = os.path.join(ROOT, SCHEDULES[schedule][cell])
    run = committed_runs(folder, seed)["rora"]
    spec = _spec_from(run["spec"])
    t0 = time.time()
    model, tok, res, attack, sets = load_defended(spec, folder, run, cache_dir)
    L = res["max_length"]
    trained = dataclasses.replace(spec, rescale="adaptive", repair=True,
                                  rescale_factors=tuple(factors), rescale_tolerance=tolerance,
                                  rescale_judge=None).resolved()
    info = adaptive_rescale_on_dev_(model, tok, sets["dev"], L, trained)
    repair = recalibrate_head_bias_(model, tok, sets["dev"], L)
    metrics = evaluate(model, tok, sets, L, attack.target_label)
    with open(result_path(os.path.join(ROOT, OUT), schedule, cell, seed)) as f:
        rec = json.load(f)
    pick = choose(rec["rungs"], [(spec.rescale_layers, float(c)) for c in factors], tolerance,
                  acc="dev_acc_repaired")
    return {"kind": "adaptive-study-verify", "schedule": schedule, "cell": cell, "seed": seed,
            "spec": trained, "adaptive_rescale": {k: v for k, v in info.items() if k != "scales"},
            "repair": repair, "metrics": metrics,
            "replay": {"rung": [pick["layers"], pick["factor"]],
                       "metrics": {k: pick["test_repaired"][k] for k in KEYS}},
            "same": {"rung": (info["chosen"] or {"layers": 0, "factor": 0.0}) ==
                     {"layers": pick["layers"], "factor": pick["factor"]},
                     "metrics": all(metrics[k] == pick["test_repaired"][k] for k in KEYS)},
            "seconds": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------- summary
def lora_reference(schedule: str, cell: str) -> Dict[int, Dict]:
    from rora_harness.seeds import run_files
    folder = os.path.join(ROOT, SCHEDULES[schedule][cell])
    return {r["spec"]["seed"]: r["metrics"] for _, r in run_files(folder)
            if r.get("kind") == "defence" and r["spec"]["method"] == "lora"}


def target_margins(mine: Dict, lora: Dict) -> Dict:
    """Margins (points, rounded to 0.01; >= 0: met) of the mean metrics ``mine`` to the
    three targets against LoRA's means ``lora``: CA >= LoRA CA - 1, ASR <= own floor + 5,
    floor <= LoRA floor + 5."""
    return {"CA": round(mine["CA"] - (lora["CA"] - 1), 2),
            "ASR": round(mine["ASR_floor"] + 5 - mine["ASR"], 2),
            "floor": round(lora["ASR_floor"] + 5 - mine["ASR_floor"], 2)}


def choose(rungs: List[Dict], ladder, delta: float, acc: str = "dev_acc") -> Optional[Dict]:
    """The adaptive rule on recorded dev accuracies ``acc`` (with ``dev_acc``: what
    adaptive_rescale_ does); None when the run lacks a rung of ``ladder`` or ``acc``
    (measured before they were recorded)."""
    by = {(r["layers"], r["factor"]): r for r in rungs[1:]}
    if any(key not in by or acc not in by[key] for key in ladder) or acc not in rungs[0]:
        return None
    base = rungs[0][acc]
    pick = rungs[0]
    for key in ladder:
        if by[key][acc] >= base - delta:
            pick = by[key]
    return pick


def configurations() -> Dict[str, object]:
    """name -> (kind, argument, which test metrics: "test" or "test_repaired")."""
    conf = {}
    for key, suffix in (("test", ""), ("test_repaired", " + repair")):
        conf["no rescale" + suffix] = ("fixed", (0, 0.0), key)
        for L, c in GRID:
            label = " (paper rule, library default)" if (L, c) == (3, 1.0) and not suffix else ""
            conf[f"top{L} x{c:g}{suffix}{label}"] = ("fixed", (L, c), key)
        for rule, acc in RULES.items():
            if acc == "dev_acc_repaired" and not suffix:
                continue  # the repaired accuracy judges the repaired model only
            for name, ladder in LADDERS.items():
                for d in DELTAS:
                    conf[f"{rule} {name} δ={d:g}{suffix}"] = ("adaptive", (ladder, d, acc), key)
    return conf


def summarise(out: str) -> Dict:
    from rora_harness.seeds import mean_ci
    results = []
    folder = os.path.join(out, "runs")
    for fn in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, fn)) as f:
            results.append(json.load(f))
    summary = {"targets": "CA >= LoRA - 1; ASR <= own floor + 5; floor <= LoRA floor + 5 "
                          "(means over seeds, LoRA of the same schedule and seeds)",
               "schedules": {}}
    for schedule in SCHEDULES:
        rows_s = [r for r in results if r.get("schedule") == schedule]
        if not rows_s:
            continue
        table = {}
        for cname, (kind, arg, key) in configurations().items():
            cells = {}
            for cell in SCHEDULES[schedule]:
                lora = lora_reference(schedule, cell)
                per = {}
                for r in (x for x in rows_s if x["cell"] == cell):
                    if kind == "fixed":
                        pick = next((x for x in r["rungs"] if (x["layers"], x["factor"]) == arg),
                                    None)
                        if pick is None:  # measured before this rung was on the grid
                            continue
                    else:
                        pick = choose(r["rungs"], *arg)
                        if pick is None:
                            continue
                    per[r["seed"]] = {**pick[key], "rung": [pick["layers"], pick["factor"]],
                                      "dev_acc": pick["dev_acc"]}
                if not per:
                    continue
                seeds = sorted(per)
                st = {"seeds": seeds, "per_seed": {str(s): per[s] for s in seeds},
                      **{k: mean_ci([per[s][k] for s in seeds]) for k in KEYS}}
                common = [s for s in seeds if s in lora]
                if common:
                    lm = {k: sum(lora[s][k] for s in common) / len(common) for k in KEYS}
                    mine = {k: sum(per[s][k] for s in common) / len(common) for k in KEYS}
                    st["lora_seeds"] = common
                    st["lora_mean"] = {k: round(v, 2) for k, v in lm.items()}
                    st["paired_minus_lora"] = {k: mean_ci([per[s][k] - lora[s][k] for s in common])
                                               for k in KEYS}
                    st["margins"] = target_margins(mine, lm)
                cells[cell] = st
            margins = [m for st in cells.values() if "margins" in st for m in st["margins"].values()]
            table[cname] = {"cells": cells, "worst_margin": min(margins) if margins else None,
                            "complete": all("margins" in st and len(st["lora_seeds"]) == len(st["seeds"])
                                            for st in cells.values()) and len(cells) == len(SCHEDULES[schedule])}
        summary["schedules"][schedule] = table
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_markdown(summary, out)
    plot(summary, out)
    return summary


def _fmt(st, k):
    m = st[k]
    if m.get("mean") is None:
        return ""
    return f"{m['mean']:.2f}" + (f" ± {m['ci95_half']:.2f}" if m.get("ci95_half") is not None else "")


def write_markdown(summary: Dict, out: str) -> None:
    lines = ["# Adaptive rescale study (issue 29)", "",
             "Generated by `scripts/eval/adaptive_study.py --summary-only` from `runs/`. Each "
             "row a configuration of the post-training rescaling applied to the committed RoRA "
             "adapters; `adaptive` rows choose per run on the clean dev split only. Mean ± 95 % "
             "t-interval over seeds; margins against LoRA trained on the same schedule (positive: "
             "target met by that much). Targets: " + summary["targets"] + ".", ""]
    for schedule, table in summary["schedules"].items():
        lines += [f"## Schedule `{schedule}`", "",
                  "| configuration | cell | seeds | CA | ASR | floor | CA − LoRA (paired) | margins CA / ASR / floor | worst |",
                  "|---|---|---|---|---|---|---|---|---|"]
        order = sorted(table, key=lambda c: -(table[c]["worst_margin"] if table[c]["worst_margin"] is not None else -1e9))
        for cname in order:
            t = table[cname]
            for cell, st in t["cells"].items():
                pm = st.get("paired_minus_lora", {}).get("CA", {})
                mg = st.get("margins")
                worst = "" if t["worst_margin"] is None else f"{t['worst_margin']:+.2f}"
                lines.append(
                    f"| {cname} | {cell} | {len(st['seeds'])} | {_fmt(st, 'CA')} | {_fmt(st, 'ASR')} | "
                    f"{_fmt(st, 'ASR_floor')} | {_fmt({'x': pm}, 'x') if pm else ''} | "
                    f"{'' if not mg else ' / '.join(f'{mg[k]:+.2f}' for k in ('CA', 'ASR', 'floor'))} | "
                    f"{worst}{'' if t['complete'] else ' (incomplete)'} |")
        lines.append("")
    lines += ["![worst margin per configuration](summary.png)", ""]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines))


def plot(summary: Dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scheds = list(summary["schedules"])
    if not scheds:
        return
    fig, axes = plt.subplots(1, len(scheds), figsize=(6 * len(scheds), 6), squeeze=False)
    for ax, s in zip(axes[0], scheds):
        table = summary["schedules"][s]
        names = [c for c in table if table[c]["worst_margin"] is not None]
        names.sort(key=lambda c: table[c]["worst_margin"])
        ax.barh(range(len(names)), [table[c]["worst_margin"] for c in names],
                color=["C2" if table[c]["worst_margin"] >= 0 else "C3" for c in names])
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=6)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("worst margin over the three targets and the cells (points)")
        ax.set_title(f"schedule {s}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "summary.png"), dpi=110)
    plt.close(fig)


def commit(folder: str, msg) -> None:
    """Commit ``folder`` alone in the repository that holds it (with ``--out`` in another
    checkout than this script's, e.g. the study run from a fixed worktree: that checkout)."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder,
                         capture_output=True, text=True).stdout.strip()
    rel = os.path.relpath(os.path.abspath(folder), top)
    for _ in range(20):
        if not os.path.exists(os.path.join(top, ".git", "index.lock")):
            subprocess.run(["git", "add", "--", rel], cwd=top)
            r = subprocess.run(["git", "commit", "-q", "-m", msg, "--", rel], cwd=top)
            if r.returncode == 0:
                return
        time.sleep(3)


def main(argv=None) -> int:
    from rora_harness.seeds import parse_seeds
    from rora_harness.spectra import write_json
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schedules", default="small,ep12")
    ap.add_argument("--cells", default="sst2_sentence,cr")
    ap.add_argument("--seeds", default="0-4")
    ap.add_argument("--out", default=os.path.join(ROOT, OUT))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--commit", action="store_true")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--verify", default=None, metavar="F,F,...:TOL",
                    help="instead of the study: run the harness's --rescale adaptive --repair "
                         "with these factors and tolerance on the committed adapters and "
                         "compare with the summary's replay (verify/*.json)")
    ap.add_argument("--only-cached", action="store_true",
                    help="skip (for a later call) seeds whose poisoned model is not cached yet")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.verify:
        from rora_harness.poisoning import default_cache_dir
        from rora_harness.spectra import write_json as write_json_
        facs, tol = args.verify.split(":")
        factors, tolerance = [float(x) for x in facs.split(",")], float(tol)
        for seed in parse_seeds(args.seeds):
            for schedule in args.schedules.split(","):
                for cell in args.cells.split(","):
                    path = os.path.join(args.out, "verify",
                                        f"{schedule}-{cell}-s{seed}-{facs}-{tol}.json")
                    if os.path.exists(path):
                        continue
                    res = verify_one(schedule, cell, seed, args.cache_dir or default_cache_dir(),
                                     factors, tolerance)
                    write_json_(res, path)
                    log(f"verify {schedule} {cell} seed {seed}: same {res['same']} "
                        f"{res['metrics']} vs replay {res['replay']}")
                    if args.commit:
                        commit(os.path.join(args.out, "verify"),
                               f"adaptive-study verify: {schedule} {cell} seed {seed}, the "
                               f"harness's adaptive rescale judged after the repair ({facs}, "
                               f"δ {tol}) against the replay")
        return 0
    if not args.summary_only:
        from rora_harness.poisoning import default_cache_dir
        cache = args.cache_dir or default_cache_dir()
        for seed in parse_seeds(args.seeds):
            for schedule in args.schedules.split(","):
                for cell in args.cells.split(","):
                    if cell not in SCHEDULES[schedule]:
                        continue
                    path = result_path(args.out, schedule, cell, seed)
                    if os.path.exists(path):
                        continue
                    try:
                        res = study_one(schedule, cell, seed, cache, args.only_cached)
                    except FileNotFoundError as e:
                        log(f"skip {schedule} {cell} seed {seed}: {e}")
                        continue
                    except NotCached:
                        log(f"later {schedule} {cell} seed {seed}: poisoned model not cached yet")
                        continue
                    write_json(res, path)
                    paper = [r for r in res["rungs"] if (r["layers"], r["factor"]) == (3, 1.0)][0]
                    log(f"{schedule} {cell} seed {seed}: {res['seconds']} s, reproduces "
                        f"{res['reproduces_committed']}; paper rung CA {paper['test']['CA']} "
                        f"ASR {paper['test']['ASR']}")
                    summarise(args.out)
                    if args.commit:
                        commit(args.out,
                               f"adaptive-study: {schedule} {cell} seed {seed} (every rung's dev "
                               f"accuracy and test metrics)")
    summarise(args.out)
    if args.commit:
        commit(args.out, "adaptive-study: summary regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
