#!/usr/bin/env python
"""Post-hoc study of RoRA's post-training spectral rescaling on the embedded MiniLM-L6
(issue 24): how deep to rescale, which modules of a block, and a clean re-fit of the
classification head -- all from the adapters saved by ``rora-fast seeds`` (no retraining).

For each cell (SST-2 <- IMDB BadNet, CR <- MR BadNet; preset small) and seed, the saved
``lora`` and ``rora`` adapters of ``benchmarks/results/eval/seeds-<task>-badnet/`` are
loaded onto that seed's poisoned model (re-poisoned deterministically by the harness and
cached), exactly as ``rora-fast seeds`` / ``rora-fast bias`` do
(:func:`rora_harness.runner.defended_model`), and evaluated on the full clean test
split and its triggered non-target rows (CA, ASR, ASR floor as
:mod:`rora_harness.metrics` defines them).

Variants (see ``VARIANTS``):

* ``lora``: the PEFT LoRA adapter, no rescaling (the reference of every paired difference).
* ``rora@top<k>``: RoRA, ``rora_fast.spectral_rescale_`` of the adapted layers of the top
  ``k`` of the 6 blocks (k = 0: no rescaling). ``top1`` is the paper's share of depth
  (3 of BERT-large's 24 blocks = 1/8; 1/8 of 6 blocks = 0.75, i.e. the top block):
  *paper-faithful*. ``top3`` is the library default (3 of 6 = half the depth).
* ``rora@top<k>-attn`` / ``-ffn``: only the attention linears (query, key, value,
  attention output) or only the FFN linears (intermediate, output) of those blocks.
* ``...+head`` (opt-in): after the rescaling, the classification head alone (weight and
  bias; encoder and adapters frozen) re-fitted by logistic regression on the frozen
  features of the **clean training rows of the target task** (the 2,000 rows the defender
  trained on), with a fixed schedule (``HEAD_REFIT``). No dev, test, triggered or
  poisoned row is used; ``tests/test_posthoc_study.py`` spies on what the re-fit receives.
* ``lora+head``: the same re-fit on plain LoRA (a control).

Nothing in a variant is chosen per run: depth, modules and the head schedule are fixed.

Every result is one JSON (atomic) under ``<out>/runs/``; a finished result is skipped
(resumable). After each result ``<out>/aggregate.{json,md,png}`` are rewritten and, with
``--commit``, the out folder is committed. See the README.md of the out folder for the
commands that produced the committed results.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REL = "benchmarks/results/eval"
CELLS = {"sst2_sentence": f"{REL}/seeds-sst2_sentence-badnet", "cr": f"{REL}/seeds-cr-badnet"}
CELL_TITLE = {"sst2_sentence": "SST-2 <- IMDB, BadNet", "cr": "CR <- MR, BadNet"}
DEFAULT_OUT = f"{REL}/posthoc-study"

#: the head re-fit's fixed schedule (chosen before any result; not tuned on any split)
HEAD_REFIT = {"epochs": 5, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0,
              "optimizer": "Adam", "init": "the current (post-rescaling) head",
              "rows": "the clean training rows of the target task (the defender's subset)"}

ATTN_SUFFIXES = ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense")
_FFN_RE = re.compile(r"layer\.\d+\.(intermediate\.dense|output\.dense)$")


def module_kind(name: str) -> Optional[str]:
    """``attn`` / ``ffn`` / None (pooler etc.) for an adapted linear's module name."""
    if name.endswith(ATTN_SUFFIXES):
        return "attn"
    if _FFN_RE.search(name):
        return "ffn"
    return None


def _v(base, depth, modules="all", head=False, label="variant", question=""):
    return {"base": base, "depth": depth, "modules": modules, "head": head, "label": label,
            "question": question}


VARIANTS: Dict[str, Dict] = {
    "lora": _v("lora", 0, label="reference (PEFT LoRA, no rescaling)"),
    "lora+head": _v("lora", 0, head=True, label="variant, opt-in (control)", question="c"),
    "rora@top0": _v("rora", 0, question="a"),
    "rora@top1": _v("rora", 1, label="paper-faithful (1/8 of depth)", question="a"),
    "rora@top2": _v("rora", 2, question="a"),
    "rora@top3": _v("rora", 3, label="variant (library default, 1/2 of depth)", question="a"),
    "rora@top1-attn": _v("rora", 1, "attn", question="b"),
    "rora@top1-ffn": _v("rora", 1, "ffn", question="b"),
    "rora@top3-attn": _v("rora", 3, "attn", question="b"),
    "rora@top3-ffn": _v("rora", 3, "ffn", question="b"),
}
for _name in [n for n in VARIANTS if n.startswith("rora@")]:
    VARIANTS[_name + "+head"] = dict(VARIANTS[_name], head=True, label="variant, opt-in",
                                     question="c")
ORDER = list(VARIANTS)


def log(*a):
    tqdm.write(time.strftime("%H:%M:%S", time.gmtime()) + " " + " ".join(str(x) for x in a))
    sys.stdout.flush()


# ----------------------------------------------------------------------------- forward
@torch.no_grad()
def forward_features(model, tok, texts: Sequence[str], max_length: int, head,
                     batch_size: int = 64, desc: Optional[str] = None):
    """``(features, logits)`` in the order of ``texts``: the classification head's input
    (captured by a forward hook) and the model's logits, batched exactly like
    :func:`rora_fast.loop.predict` (sorted by length, 64 a batch), so that
    ``logits.argmax(1)`` are the harness's predictions."""
    was = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    feats: List[Optional[torch.Tensor]] = [None] * len(texts)
    logits: List[Optional[torch.Tensor]] = [None] * len(texts)
    cap = []
    h = head.register_forward_hook(lambda m, inp, out: cap.append(inp[0].detach()))
    device = next(model.parameters()).device
    try:
        for a in tqdm(range(0, len(order), batch_size), desc=desc, leave=False,
                      disable=desc is None):
            idx = order[a:a + batch_size]
            enc = tok([texts[i] for i in idx], truncation=True, max_length=max_length,
                      padding=True, return_tensors="pt")
            cap.clear()
            z = model(**{k: v.to(device) for k, v in enc.items()}).logits.detach().cpu()
            if len(cap) != 1:
                raise RuntimeError(f"the head ran {len(cap)} times in one forward")
            f = cap[0].cpu()
            for j, i in enumerate(idx):
                feats[i], logits[i] = f[j], z[j]
    finally:
        h.remove()
        model.train(was)
    return torch.stack(feats), torch.stack(logits)


def metrics_from_logits(z_test, z_trig, sets, target: int) -> Dict:
    from rora_harness.metrics import backdoor_metrics
    clean = z_test.argmax(1).tolist()
    trig = z_trig.argmax(1).tolist()
    nt = [p for p, e in zip(clean, sets["test"]) if e.label != target]
    return backdoor_metrics(clean, [e.label for e in sets["test"]], trig, nt,
                            [e.label for e in sets["nt_trig"]], target)


# ----------------------------------------------------------------------------- head re-fit
def refit_head_on_clean_(model, tok, rows, max_length: int, head, seed: int,
                         schedule: Dict = HEAD_REFIT) -> Dict:
    """Re-fit the classification head ``head`` (weight and bias) in place by logistic
    regression on the frozen features of ``rows`` (clean target-task training
    ``Example``s), everything else frozen; fixed schedule, shuffled by ``seed``. Starts
    from the current head. Returns what was done (clean train loss / accuracy / share of
    each predicted class before and after, per-epoch loss)."""
    texts = [e.text for e in rows]
    y = torch.tensor([int(e.label) for e in rows])
    X, _ = forward_features(model, tok, texts, max_length, head, desc="train features")
    X = X.float()
    W0 = head.weight.detach().clone().float()
    b0 = head.bias.detach().clone().float()
    W = W0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    K = W.shape[0]

    def stats(W_, b_):
        with torch.no_grad():
            z = F.linear(X, W_, b_)
            p = z.argmax(1)
            return {"loss": round(float(F.cross_entropy(z, y)), 5),
                    "acc": round(100.0 * float((p == y).double().mean()), 2),
                    "pred_share": [round(100.0 * float((p == k).double().mean()), 2)
                                   for k in range(K)]}

    before = stats(W, b)
    opt = torch.optim.Adam([W, b], lr=schedule["lr"], weight_decay=schedule["weight_decay"])
    g = torch.Generator().manual_seed(int(seed))
    curve = []
    bs = int(schedule["batch_size"])
    for _ in range(int(schedule["epochs"])):
        perm = torch.randperm(len(y), generator=g)
        tot = 0.0
        for a in range(0, len(y), bs):
            idx = perm[a:a + bs]
            loss = F.cross_entropy(F.linear(X[idx], W, b), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        curve.append(round(tot / len(y), 5))
    with torch.no_grad():
        head.weight.copy_(W.detach().to(head.weight.dtype))
        head.bias.copy_(b.detach().to(head.bias.dtype))
    return {"schedule": dict(schedule), "n_rows": len(rows),
            "label_share": [round(100.0 * float((y == k).double().mean()), 2) for k in range(K)],
            "train_before": before, "train_after": stats(W, b), "epoch_loss": curve,
            "weight_change_fro": round(float((W.detach() - W0).norm()), 5),
            "weight_fro_before": round(float(W0.norm()), 5),
            "bias_before": [round(float(x), 5) for x in b0],
            "bias_after": [round(float(x), 5) for x in b.detach()]}


# ----------------------------------------------------------------------------- runs
def committed_runs(seeds_dir: str, seed: int) -> Dict[str, Dict]:
    """The committed ``lora`` / ``rora`` defence runs of ``seed`` with a saved adapter."""
    from rora_harness.seeds import run_files

    out = {}
    for _, r in run_files(seeds_dir):
        if r.get("kind") == "defence" and r["spec"]["seed"] == seed and \
                r["spec"]["method"] in ("lora", "rora") and r.get("adapter"):
            if r["spec"]["method"] in out:
                raise ValueError(f"{seeds_dir}: two {r['spec']['method']} runs of seed {seed}")
            out[r["spec"]["method"]] = r
    return out


def result_path(out_dir: str, cell: str, seed: int, variant: str) -> str:
    safe = variant.replace("@", "-").replace("+", "_")
    return os.path.join(out_dir, "runs", f"{cell}-s{seed}-{safe}.json")


def _state_key(v: Dict):
    return (v["depth"], v["modules"])


def rescale_state_(model, depth: int, modules: str) -> Dict[str, float]:
    """``rora_fast.spectral_rescale_`` of the top ``depth`` blocks' adapted linears of kind
    ``modules`` (all / attn / ffn). ``all`` passes the int (the library's own path)."""
    import rora_fast
    if depth == 0:
        return {}
    if modules == "all":
        return {k: float(v) for k, v in rora_fast.spectral_rescale_(model, layers=depth).items()}
    from rora_fast.blocks import select_top_blocks
    names = [n for n, _ in rora_fast.rora_layers(model)]
    top = set(select_top_blocks(model, names, depth))
    chosen = [n for n in names if n in top and module_kind(n) == modules]
    if not chosen:
        raise ValueError(f"no {modules} layers in the top {depth} blocks")
    return {k: float(v) for k, v in rora_fast.spectral_rescale_(model, layers=chosen).items()}


def run_cell_seed(cell: str, seed: int, variants: Sequence[str], out_dir: str,
                  cache_dir: Optional[str], seeds_dir: str, harness_check: bool = True,
                  on_result=None, task: Optional[str] = None,
                  rora_dir: Optional[str] = None) -> List[Dict]:
    """Every not yet finished ``variant`` of (cell, seed): loads each base adapter once,
    then one encoder state (depth, modules) at a time; writes one JSON per variant.
    ``rora_dir``: take the ``rora`` run from this seeds folder instead (a retrained
    variant, e.g. ``retrain-study/ep12-sst2_sentence``); ``lora`` stays ``seeds_dir``'s."""
    import rora_fast
    from rora_harness.attacks import get_attack
    from rora_harness.bias import _spec_from
    from rora_harness.defences import parse_method
    from rora_fast.repair import classification_head
    from rora_harness.runner import defended_model, evaluate, prepare_sets, run_id
    from rora_harness.spectra import write_json
    todo = [v for v in variants if not os.path.exists(result_path(out_dir, cell, seed, v))]
    done = []
    if not todo:
        log(f"{cell} seed {seed}: all {len(variants)} variants finished, skipped")
        return done
    dirs = {"lora": seeds_dir, "rora": rora_dir or seeds_dir}
    for base in ("lora", "rora"):
        vs = [v for v in todo if VARIANTS[v]["base"] == base]
        if not vs:
            continue
        seeds_dir = dirs[base]
        runs = committed_runs(seeds_dir, seed)
        if base not in runs:
            raise ValueError(f"{seeds_dir}: no committed {base} run of seed {seed} with an adapter")
        run = runs[base]
        spec = _spec_from(run["spec"])
        if run_id(spec) != run["run_id"]:
            raise ValueError(f"run id mismatch: {run_id(spec)} vs {run['run_id']}")
        apath = os.path.join(seeds_dir, run["adapter"])
        t0 = time.time()
        model, tok, res = defended_model(spec, parse_method(spec.method), apath, cache_dir,
                                         log=log)
        load_s = round(time.time() - t0, 1)
        log(f"{cell} seed {seed} {base}: model + adapter ready in {load_s} s")
        L = res["max_length"]
        attack = get_attack(spec.attack, spec.trigger)
        sets = prepare_sets(spec.task, attack, tok, L, res["n_train"], res["n_dev"],
                            res["n_test"], spec.seed)
        target = attack.target_label
        head = classification_head(model)
        head0 = (head.weight.detach().clone(), head.bias.detach().clone())
        layers = dict(rora_fast.rora_layers(model)) if base == "rora" else {}
        trained = rora_fast.adapter_scales(model) if base == "rora" else {}
        states: Dict = {}
        for v in vs:
            states.setdefault(_state_key(VARIANTS[v]), []).append(v)
        for (depth, modules), names in states.items():
            if trained:  # back to the trained state
                rora_fast.set_scales_(model, trained)
            with torch.no_grad():
                head.weight.copy_(head0[0])
                head.bias.copy_(head0[1])
            ts = time.time()
            scales = rescale_state_(model, depth, modules) if base == "rora" else {}
            mult = {n: s / trained[n] for n, s in scales.items()}
            Xt, zt = forward_features(model, tok, [e.text for e in sets["test"]], L, head,
                                      desc=f"{cell} s{seed} {base} top{depth}-{modules} test")
            Xg, zg = forward_features(model, tok, [e.text for e in sets["nt_trig"]], L, head,
                                      desc=f"{cell} s{seed} {base} top{depth}-{modules} trig")
            m_plain = metrics_from_logits(zt, zg, sets, target)
            fwd_s = round(time.time() - ts, 1)
            check = None
            if harness_check and (depth, modules) in ((0, "all"), (3, "all")):
                # the harness's own evaluate on the same model: my forward path = its path
                check = evaluate(model, tok, sets, L, target)
            for v in names:
                cfg = VARIANTS[v]
                tv = time.time()
                out = {"kind": "posthoc-study", "cell": cell, "task": spec.task,
                       "attack": attack.name, "seed": seed, "variant": v,
                       "label": cfg["label"], "question": cfg["question"],
                       "base_method": base, "rescale_depth": depth,
                       "rescale_modules": modules, "head_refit": cfg["head"],
                       "from_run": os.path.relpath(os.path.join(seeds_dir, "runs",
                                                                run["run_id"] + ".json"), ROOT),
                       "adapter": os.path.relpath(apath, ROOT),
                       "n_rescaled": len(scales), "rescale": scales,
                       "scale_multiplier_median": (statistics.median(mult.values())
                                                   if mult else None),
                       "torch_threads": torch.get_num_threads(),
                       "load_seconds": load_s, "forward_seconds": fwd_s}
                if cfg["head"]:
                    with torch.no_grad():
                        head.weight.copy_(head0[0])
                        head.bias.copy_(head0[1])
                    out["refit"] = refit_head_on_clean_(model, tok, sets["train"], L, head, seed)
                    zt2 = F.linear(Xt.float(), head.weight.float(), head.bias.float())
                    zg2 = F.linear(Xg.float(), head.weight.float(), head.bias.float())
                    out["before_refit"] = m_plain
                    out["metrics"] = metrics_from_logits(zt2, zg2, sets, target)
                    with torch.no_grad():
                        head.weight.copy_(head0[0])
                        head.bias.copy_(head0[1])
                else:
                    out["metrics"] = m_plain
                if check is not None and not cfg["head"]:
                    out["harness_evaluate"] = check
                    out["harness_evaluate_equal"] = check == m_plain
                # reproduction of the committed run (same adapter, re-poisoned model)
                ref = None
                if base == "lora" and not cfg["head"]:
                    ref = run["metrics"]
                elif base == "rora" and not cfg["head"] and modules == "all" and depth == 0:
                    ref = run.get("before_rescale")
                elif base == "rora" and not cfg["head"] and modules == "all" and \
                        depth == spec.rescale_layers:
                    ref = run["metrics"]
                    cs = run.get("rescale") or {}
                    out["rescale_max_abs_diff_vs_committed"] = max(
                        (abs(cs[k] - scales[k]) for k in cs if k in scales), default=None)
                if ref is not None:
                    out["committed_metrics"] = ref
                    out["reproduces_committed"] = all(
                        ref[k] == out["metrics"][k] for k in ("CA", "ASR", "ASR_floor",
                                                              "n_clean", "n_triggered"))
                out["seconds"] = round(fwd_s + time.time() - tv, 1)
                out["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                path = result_path(out_dir, cell, seed, v)
                write_json(out, path)
                m = out["metrics"]
                rep = ("" if "reproduces_committed" not in out else
                       f" reproduces committed: {out['reproduces_committed']}")
                log(f"{cell} seed {seed} {v}: CA {m['CA']} ASR {m['ASR']} floor "
                    f"{m['ASR_floor']}{rep}")
                done.append(out)
                if on_result is not None:
                    on_result(out, path)
        del model
    return done


# ----------------------------------------------------------------------------- aggregate
def load_results(out_dir: str) -> List[Dict]:
    folder = os.path.join(out_dir, "runs")
    rows = []
    if os.path.isdir(folder):
        for fn in sorted(os.listdir(folder)):
            if fn.endswith(".json"):
                with open(os.path.join(folder, fn)) as f:
                    r = json.load(f)
                if r.get("kind") == "posthoc-study":
                    rows.append(r)
    return rows


KEYS = ("CA", "ASR", "ASR_floor", "delta")


def aggregate(out_dir: str) -> Dict:
    from rora_harness.seeds import mean_ci
    rows = load_results(out_dir)
    cells = {}
    for cell in CELLS:
        by: Dict[str, Dict[int, Dict]] = {}
        for r in rows:
            if r["cell"] == cell:
                by.setdefault(r["variant"], {})[r["seed"]] = r
        if not by:
            continue
        variants = {}
        lora = by.get("lora", {})
        top3 = by.get("rora@top3", {})
        for v in [v for v in ORDER if v in by] + sorted(set(by) - set(ORDER)):
            seeds = sorted(by[v])
            st = {"label": VARIANTS.get(v, {}).get("label"), "seeds": seeds,
                  "per_seed": {str(s): {k: by[v][s]["metrics"][k] for k in KEYS} for s in seeds},
                  **{k: mean_ci([by[v][s]["metrics"][k] for s in seeds]) for k in KEYS}}
            for refname, ref in (("lora", lora), ("rora@top3", top3)):
                common = sorted(set(seeds) & set(ref))
                if v == refname or not common:
                    continue
                per = {str(s): {k: round(by[v][s]["metrics"][k] - ref[s]["metrics"][k], 2)
                                for k in KEYS} for s in common}
                st[f"minus_{refname}"] = {"seeds": common, "per_seed": per,
                                          **{k: mean_ci([per[str(s)][k] for s in common])
                                             for k in KEYS}}
            # the targets, on the means over the seeds both have
            common = sorted(set(seeds) & set(lora))
            if common and v != "lora":
                mean = lambda d, k: statistics.fmean(d[s]["metrics"][k] for s in common)
                ca, asr, fl = mean(by[v], "CA"), mean(by[v], "ASR"), mean(by[v], "ASR_floor")
                lca, lfl = mean(lora, "CA"), mean(lora, "ASR_floor")
                st["targets"] = {
                    "seeds": common,
                    "CA >= LoRA CA - 1": {"value": round(ca, 3), "bound": round(lca - 1, 3),
                                          "met": ca >= lca - 1},
                    "ASR <= floor + 5": {"value": round(asr, 3), "bound": round(fl + 5, 3),
                                         "met": asr <= fl + 5},
                    "floor <= LoRA floor + 5": {"value": round(fl, 3),
                                                "bound": round(lfl + 5, 3),
                                                "met": fl <= lfl + 5}}
                st["targets"]["all_met"] = all(t["met"] for k, t in st["targets"].items()
                                               if isinstance(t, dict))
            variants[v] = st
        repro = [{"seed": r["seed"], "variant": r["variant"], "equal": r["reproduces_committed"],
                  "harness_evaluate_equal": r.get("harness_evaluate_equal")}
                 for v in by for r in by[v].values() if "reproduces_committed" in r]
        cells[cell] = {"title": CELL_TITLE[cell], "variants": variants,
                       "reproduction": sorted(repro, key=lambda x: (x["seed"], x["variant"]))}
    return {"interval": "two-sided 95 % Student t-interval: mean ± t(0.975, n-1)·sd/√n "
                        "(rora_harness.seeds.mean_ci); none for n = 1",
            "head_refit": HEAD_REFIT,
            "targets": "on the means over the seeds the variant and LoRA share: CA >= LoRA's "
                       "CA - 1; ASR <= the variant's ASR floor + 5; floor <= LoRA's floor + 5",
            "cells": cells}


def _ci(st) -> str:
    if st["mean"] is None:
        return ""
    if st["ci95_half"] is None:
        return f"{st['mean']:.2f} (n=1)"
    return f"{st['mean']:.2f} ± {st['ci95_half']:.2f}"


def aggregate_markdown(agg: Dict) -> str:
    L = ["# Post-hoc study of the rescaling (issue 24): aggregate", "",
         "Generated by `scripts/eval/posthoc_study.py` from `runs/*.json`; see README.md for "
         "the commands. In % on the full clean test split and its triggered non-target rows. "
         f"Interval: {agg['interval']}. Targets: {agg['targets']}.", ""]
    for cell, c in agg["cells"].items():
        L += [f"## {c['title']}", "",
              "| variant | label | seeds | CA | ASR | ASR floor | CA − LoRA | ASR − LoRA | "
              "floor − LoRA | targets (CA / ASR / floor) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for v, st in c["variants"].items():
            d = st.get("minus_lora")
            t = st.get("targets")
            tt = "" if not t else " / ".join(
                "**met**" if t[k]["met"] else "no" for k in
                ("CA >= LoRA CA - 1", "ASR <= floor + 5", "floor <= LoRA floor + 5"))
            L.append(f"| {v} | {st['label']} | {len(st['seeds'])} "
                     f"({','.join(map(str, st['seeds']))}) | {_ci(st['CA'])} | "
                     f"{_ci(st['ASR'])} | {_ci(st['ASR_floor'])} | "
                     f"{_ci(d['CA']) if d else ''} | {_ci(d['ASR']) if d else ''} | "
                     f"{_ci(d['ASR_floor']) if d else ''} | {tt} |")
        L += ["", "Paired differences against the library default `rora@top3` (same seed):", "",
              "| variant | seeds | CA | ASR | ASR floor |", "|---|---|---|---|---|"]
        for v, st in c["variants"].items():
            d = st.get("minus_rora@top3")
            if d:
                L.append(f"| {v} − rora@top3 | {len(d['seeds'])} | {_ci(d['CA'])} | "
                         f"{_ci(d['ASR'])} | {_ci(d['ASR_floor'])} |")
        L += ["", "Per seed (CA / ASR / floor):", "", "| variant | " + " | ".join(
            f"seed {s}" for s in sorted({s for st in c["variants"].values() for s in st["seeds"]}))
            + " |"]
        allseeds = sorted({s for st in c["variants"].values() for s in st["seeds"]})
        L.append("|---|" + "---|" * len(allseeds))
        for v, st in c["variants"].items():
            cells_ = []
            for s in allseeds:
                r = st["per_seed"].get(str(s))
                cells_.append("" if r is None else
                              f"{r['CA']:.2f} / {r['ASR']:.2f} / {r['ASR_floor']:.2f}")
            L.append(f"| {v} | " + " | ".join(cells_) + " |")
        rep = c["reproduction"]
        if rep:
            ok = sum(r["equal"] for r in rep)
            L += ["", f"Reproduction of the committed runs (re-poisoned model + saved adapter; "
                      f"`lora`, `rora@top0` = committed `before_rescale`, `rora@top3`): "
                      f"{ok} of {len(rep)} equal to the digit."
                      + ("" if ok == len(rep) else " Differing: " + ", ".join(
                          f"seed {r['seed']} {r['variant']}" for r in rep if not r["equal"]))]
        L += ["", ""]
    L += ["![mean ± 95 % CI per variant](aggregate.png)", ""]
    return "\n".join(L)


def plot_aggregate(agg: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rora_fast.atomic import save_figure
    cells = list(agg["cells"])
    if not cells:
        return
    nv = max(len(c["variants"]) for c in agg["cells"].values())
    fig, axes = plt.subplots(len(cells), 3, figsize=(max(12, 0.45 * nv * 3), 4.6 * len(cells)),
                             squeeze=False)
    for row, cell in enumerate(cells):
        c = agg["cells"][cell]
        names = list(c["variants"])
        for ax, (k, label) in zip(axes[row], (("CA", "CA"), ("ASR", "ASR"),
                                              ("ASR_floor", "ASR floor"))):
            for i, v in enumerate(names):
                st = c["variants"][v]
                ys = [st["per_seed"][str(s)][k] for s in st["seeds"]]
                ax.scatter([i] * len(ys), ys, s=10, color="0.6", zorder=2)
                err = st[k]["ci95_half"] or 0
                col = "C2" if "paper" in (st["label"] or "") else (
                    "C1" if v == "lora" else "C0")
                ax.errorbar([i], [st[k]["mean"]], yerr=[err], fmt="o", color=col, capsize=4,
                            zorder=3)
            if "lora" in c["variants"]:
                ax.axhline(c["variants"]["lora"][k]["mean"], color="C1", lw=0.8, ls="--")
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([f"{v} (n={len(c['variants'][v]['seeds'])})" for v in names],
                               rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{c['title']}: {label} (mean ± 95 % t-CI; seeds grey; "
                         f"dashed = LoRA)", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            ax.set_ylim(-3, 103)  # n = 2 intervals (t = 12.7) are cut at the axis
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def write_aggregate(out_dir: str) -> Dict:
    from rora_fast.atomic import write_json, write_text
    agg = aggregate(out_dir)
    write_json(os.path.join(out_dir, "aggregate.json"), agg, indent=1)
    write_text(os.path.join(out_dir, "aggregate.md"), aggregate_markdown(agg))
    plot_aggregate(agg, os.path.join(out_dir, "aggregate.png"))
    return agg


# ----------------------------------------------------------------------------- main
def git_commit(out_dir: str, message: str) -> None:
    rel = os.path.relpath(out_dir, ROOT)
    subprocess.run(["git", "add", "--", rel], cwd=ROOT, check=True)
    st = subprocess.run(["git", "diff", "--cached", "--quiet", "--", rel], cwd=ROOT)
    if st.returncode == 0:
        return
    subprocess.run(["git", "commit", "-q", "-m", message, "--", rel], cwd=ROOT, check=True)


def parse_variants(text: str) -> List[str]:
    if text == "all":
        return list(ORDER)
    out = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in out if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; choose from {', '.join(ORDER)}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="sst2_sentence,cr")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default="all")
    ap.add_argument("--out", default=os.path.join(ROOT, DEFAULT_OUT))
    ap.add_argument("--cache-dir", default=None, help="poisoned-model cache (harness default)")
    ap.add_argument("--rora-dir", action="append", default=[], metavar="CELL=DIR",
                    help="take the cell's rora runs from this seeds folder (a retrained "
                         "variant; repeatable, one per cell); lora stays the committed one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--commit", action="store_true", help="git commit the out folder after "
                                                          "each result")
    ap.add_argument("--no-harness-check", action="store_true",
                    help="skip the second evaluation by the harness's own evaluate() of the "
                         "no-rescaling and top-3 states (the reproduction check against the "
                         "committed run JSON stays)")
    ap.add_argument("--aggregate-only", action="store_true")
    ap.add_argument("--no-stop-on-mismatch", action="store_true",
                    help="go on when a reproduction check of a committed run fails")
    ap.add_argument("--stop-at", default=None, help="UTC HH:MM: start no new (cell, seed) "
                                                    "after this time")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rora_harness.seeds import parse_seeds
    from rora_harness.seeds import run_files as _run_files
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    if args.aggregate_only:
        write_aggregate(out)
        return 0
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    for c in cells:
        if c not in CELLS:
            raise SystemExit(f"unknown cell {c!r}; choose from {', '.join(CELLS)}")
    variants = parse_variants(args.variants)
    rora_dirs = {}
    for item in args.rora_dir:
        cell, sep, d = item.partition("=")
        if not sep or cell not in CELLS or not os.path.isdir(d):
            raise SystemExit(f"--rora-dir wants CELL=DIR with an existing DIR, got {item!r}")
        rora_dirs[cell] = os.path.abspath(d)
    cache = args.cache_dir
    mismatch = []

    def on_result(r, path):
        write_aggregate(out)
        if r.get("reproduces_committed") is False or r.get("harness_evaluate_equal") is False:
            mismatch.append((r["cell"], r["seed"], r["variant"]))
        if args.commit:
            m = r["metrics"]
            git_commit(out, f"posthoc-study: {r['cell']} seed {r['seed']} {r['variant']}: "
                            f"CA {m['CA']} ASR {m['ASR']} floor {m['ASR_floor']}")

    for seed in parse_seeds(args.seeds):  # seed-major: complete seeds come early
        for cell in cells:
            if args.stop_at and time.strftime("%H:%M", time.gmtime()) >= args.stop_at:
                log(f"stop-at {args.stop_at} reached: not starting {cell} seed {seed}")
                return 0
            t0 = time.time()
            if cell in rora_dirs and not any(
                    r.get("kind") == "defence" and r["spec"]["seed"] == seed and r.get("adapter")
                    for _, r in _run_files(rora_dirs[cell])):
                log(f"{cell} seed {seed}: no run with a saved adapter in {rora_dirs[cell]} "
                    "(not yet, or reused without one), skipped")
                continue
            run_cell_seed(cell, seed, variants, out, cache, os.path.join(ROOT, CELLS[cell]),
                          on_result=on_result, harness_check=not args.no_harness_check,
                          rora_dir=rora_dirs.get(cell))
            log(f"{cell} seed {seed}: {time.time() - t0:.0f} s")
            if mismatch and not args.no_stop_on_mismatch:
                log(f"reproduction mismatch {mismatch}: stopping")
                return 2
    write_aggregate(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
