"""Why does the rescaled model lean toward the target label? (issue 14, item 2)

For every trained run with a saved adapter in a ``rora-fast seeds`` folder, on the **clean**
test rows (no trigger anywhere in this analysis), under several post-training states of the
same adapter:

* ``none``: no rescaling (the trained model);
* ``block b``: only the adapted layers of transformer block ``b`` rescaled, for each of the
  top ``rescale_layers`` blocks, one at a time;
* ``top k``: the top ``k`` blocks rescaled, k = 1 .. ``rescale_layers`` (``top 3`` is RoRA);
* ``top 3 + repair``: then the head-bias refit on clean dev rows (:mod:`.repair`).

it measures the share of clean rows predicted as the target label (against the target's
true share), the share of *non-target* rows predicted as the target (the ASR floor), the
clean accuracy, and the logit margin ``z_target − z_other`` (mean and median over all clean
rows and over the non-target rows). LoRA adapters get ``none`` and ``top 3`` (LoRA +
rescaling). Writes ``<out>/bias.json``, ``bias.md`` and two figures (``bias_share.png``,
``bias_margin.png``); resumable per run (``<out>/per_run/<run id>.json``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
from typing import Dict, List, Optional

import torch

from rora_fast.atomic import save_figure

__all__ = ["analyse_run", "run_bias_analysis", "prediction_balance", "balance_from_runs"]


def prediction_balance(metrics: Dict) -> Dict:
    """The class balance of a model's predictions on the clean test rows, recovered exactly
    from its CA, ASR floor and row counts (binary task): with ``n_nt`` non-target rows
    (``n_triggered``) of ``n`` (``n_clean``), the floor is the share of non-target rows
    predicted as the target, so the target rows' accuracy is
    ``(CA·n − (1 − floor)·n_nt) / n_t`` and the share of all clean rows predicted as the
    target is ``(acc_t·n_t + floor·n_nt) / n``. No model needed: any run JSON has these."""
    n, n_nt = int(metrics["n_clean"]), int(metrics["n_triggered"])
    n_t = n - n_nt
    correct = round(metrics["CA"] / 100.0 * n)
    nt_as_target = round(metrics["ASR_floor"] / 100.0 * n_nt)
    t_correct = correct - (n_nt - nt_as_target)
    return {"pred_target_share": round(100.0 * (t_correct + nt_as_target) / n, 2),
            "true_target_share": round(100.0 * n_t / n, 2),
            "target_recall": round(100.0 * t_correct / n_t, 2) if n_t else None,
            "ASR_floor": metrics["ASR_floor"], "CA": metrics["CA"]}


def balance_from_runs(root: str) -> List[Dict]:
    """:func:`prediction_balance` before and after rescaling for every run JSON under
    ``root`` that has both (``before_rescale``: RoRA and its ablations with Pt)."""
    rows = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        if os.path.basename(dirpath) != "runs":
            continue
        for fn in sorted(files):
            if not fn.endswith(".json"):
                continue
            with open(os.path.join(dirpath, fn)) as f:
                r = json.load(f)
            if r.get("kind") != "defence" or not r.get("before_rescale") \
                    or "n_triggered" not in r["metrics"]:
                continue
            s = r["spec"]
            rows.append({"file": os.path.relpath(os.path.join(dirpath, fn), root),
                         "task": s["task"], "attack": s["attack"], "method": s["method"],
                         "seed": s["seed"], "preset": s.get("preset"), "target_modules": s.get("target_modules"),
                         "before": prediction_balance({**r["before_rescale"],
                                                       "n_clean": r["metrics"]["n_clean"],
                                                       "n_triggered": r["metrics"]["n_triggered"]}),
                         "after": prediction_balance(r["metrics"])})
    return rows


def _spec_from(stored: Dict):
    from .runner import UNHASHED_DEFAULTS, RunSpec
    names = {f.name for f in dataclasses.fields(RunSpec)}
    # a stored (resolved) spec omits these at their old defaults: explicit here, so that a
    # run file keeps its run id whatever the presets now choose
    stored = {**UNHASHED_DEFAULTS, **stored}
    if isinstance(stored.get("rescale_factors"), list):
        stored["rescale_factors"] = tuple(stored["rescale_factors"])
    return RunSpec(**{k: v for k, v in stored.items() if k in names})


def _stats(z: torch.Tensor, labels: List[int], target: int) -> Dict:
    other = 1 - target if z.shape[1] == 2 else None
    pred = z.argmax(1)
    y = torch.tensor(labels)
    nt = y != target
    if other is None:  # multi-class: target against the best other class
        zo = z.clone()
        zo[:, target] = -float("inf")
        margin = z[:, target] - zo.max(1).values
    else:
        margin = z[:, target] - z[:, other]
    m_all, m_nt = margin.tolist(), margin[nt].tolist()
    return {"CA": round(100.0 * float((pred == y).double().mean()), 2),
            "pred_target_share": round(100.0 * float((pred == target).double().mean()), 2),
            "true_target_share": round(100.0 * float((y == target).double().mean()), 2),
            "ASR_floor": round(100.0 * float((pred[nt] == target).double().mean()), 2),
            "margin_mean": round(statistics.fmean(m_all), 4),
            "margin_median": round(statistics.median(m_all), 4),
            "margin_nontarget_mean": round(statistics.fmean(m_nt), 4),
            "margin_nontarget_median": round(statistics.median(m_nt), 4)}


def analyse_run(run: Dict, seeds_dir: str, cache_dir: Optional[str], log=print) -> Dict:
    """The states above for one run JSON (``kind`` defence, with an ``adapter``)."""
    import rora_fast
    from .attacks import get_attack
    from .defences import parse_method
    from rora_fast.repair import classification_head, collect_logits, recalibrate_head_bias_
    from .runner import defended_model, prepare_sets
    from .seeds import rescale_peft_lora_
    spec = _spec_from(run["spec"])
    method = parse_method(spec.method)
    model, tok, res = defended_model(spec, method, os.path.join(seeds_dir, run["adapter"]),
                                     cache_dir, log=log)
    L = res["max_length"]
    attack = get_attack(spec.attack, spec.trigger)
    sets = prepare_sets(spec.task, attack, tok, L, res["n_train"], res["n_dev"], res["n_test"],
                        spec.seed)
    texts = [e.text for e in sets["test"]]
    labels = [e.label for e in sets["test"]]
    target = attack.target_label
    states: Dict[str, Dict] = {}

    def measure(name):
        states[name] = _stats(collect_logits(model, tok, texts, L), labels, target)
        log(f"{run['run_id']} {name}: {states[name]}")

    measure("none")
    top = spec.rescale_layers
    if method.kind == "peft":
        rescale_peft_lora_(model, top)
        measure(f"top {top}")
    else:
        layers = dict(rora_fast.rora_layers(model))
        trained = rora_fast.adapter_scales(model)
        idx = sorted({rora_fast.block_index(n) for n in layers} - {None})
        top_blocks = idx[-top:] if top else []

        def reset():
            rora_fast.set_scales_(model, trained)

        for b in top_blocks:
            reset()
            rora_fast.spectral_rescale_(model, layers=[n for n in layers
                                                       if rora_fast.block_index(n) == b])
            measure(f"block {b}")
        for k in range(1, top + 1):
            reset()
            rora_fast.spectral_rescale_(model, layers=k)
            measure(f"top {k}")
        head = classification_head(model)
        bias0 = head.bias.detach().clone()
        rep = recalibrate_head_bias_(model, tok, sets["dev"], L)
        measure(f"top {top} + repair")
        states[f"top {top} + repair"]["repair"] = rep
        with torch.no_grad():
            head.bias.copy_(bias0)
        reset()
    return {"run_id": run["run_id"], "method": spec.method, "seed": spec.seed,
            "task": spec.task, "attack": attack.name, "n_test": len(texts), "states": states}


def run_bias_analysis(seeds_dir: str, out_dir: str, cache_dir: Optional[str],
                      methods=("rora", "lora"), log=print) -> Dict:
    from .spectra import write_json
    from .seeds import run_files
    if not os.path.isdir(os.path.join(seeds_dir, "runs")):
        raise FileNotFoundError(f"{seeds_dir}: no runs/ folder (not a `rora-fast seeds` folder)")
    runs = [r for _, r in run_files(seeds_dir)
            if r.get("kind") == "defence" and r.get("adapter") and r["spec"]["method"] in methods
            and os.path.exists(os.path.join(seeds_dir, r["adapter"]))]
    results = []
    for r in sorted(runs, key=lambda r: (r["spec"]["seed"], r["spec"]["method"])):
        path = os.path.join(out_dir, "per_run", r["run_id"] + ".json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
            continue
        res = analyse_run(r, seeds_dir, cache_dir, log=log)
        res["from"] = os.path.relpath(os.path.join(seeds_dir, "runs", r["run_id"] + ".json"),
                                      out_dir)
        write_json(res, path)
        results.append(res)
    summary = {"seeds_dir": os.path.relpath(seeds_dir, out_dir), "runs": results}
    write_json(summary, os.path.join(out_dir, "bias.json"))
    _write_md(summary, out_dir)
    _plots(summary, out_dir)
    return summary


def _write_md(summary: Dict, out_dir: str) -> None:
    lines = ["# Clean-row prediction balance and logit margin under rescaling", "",
             "Clean test rows only. `pred target` = share of all clean rows predicted as the "
             "target label (true share in brackets); `floor` = share of non-target rows "
             "predicted as the target (the ASR floor); margin = z_target − z_other (mean; "
             "median in brackets), over all clean rows and over the non-target rows.", "",
             "| run | seed | state | CA | pred target (true) | floor | margin all | "
             "margin non-target |", "|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        for name, st in r["states"].items():
            lines.append(f"| {r['method']} | {r['seed']} | {name} | {st['CA']:.2f} | "
                         f"{st['pred_target_share']:.2f} ({st['true_target_share']:.2f}) | "
                         f"{st['ASR_floor']:.2f} | {st['margin_mean']:+.3f} "
                         f"({st['margin_median']:+.3f}) | {st['margin_nontarget_mean']:+.3f} "
                         f"({st['margin_nontarget_median']:+.3f}) |")
    lines += ["", "![target share](bias_share.png)", "", "![margin](bias_margin.png)", ""]
    with open(os.path.join(out_dir, "bias.md"), "w") as f:
        f.write("\n".join(lines))


def _plots(summary: Dict, out_dir: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rr = [r for r in summary["runs"] if r["method"] != "lora"]
    if not rr:
        return
    names = list(rr[0]["states"])
    for key, fname, ylabel in (("pred_target_share", "bias_share.png",
                                "% of clean test rows predicted as the target"),
                               ("margin_nontarget_mean", "bias_margin.png",
                                "mean z_target − z_other, non-target clean rows")):
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 3.8))
        w = 0.8 / max(1, len(rr))
        for j, r in enumerate(rr):
            ys = [r["states"].get(n, {}).get(key, float("nan")) for n in names]
            ax.bar([i + (j - (len(rr) - 1) / 2) * w for i in range(len(names))], ys, width=w,
                   label=f"{r['method']} seed {r['seed']}")
        if key == "pred_target_share":
            ax.axhline(rr[0]["states"]["none"]["true_target_share"], color="k", ls="--", lw=1,
                       label="true target share")
        else:
            ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(f"{rr[0]['task']} ← {rr[0]['attack']}: rescaling states (clean test rows)",
                     fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        save_figure(fig, os.path.join(out_dir, fname), dpi=110)
        plt.close(fig)
