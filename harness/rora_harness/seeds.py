"""One setting over several seeds: mean, standard deviation and a 95 % confidence interval.

``rora-fast seeds`` (:func:`run_seeds`) runs a setting (task, attack, preset, ...) once per
seed. The seed drives everything that is random: the poisoned model (its own proxy subset,
trigger positions and fine-tuning order, cached per seed), the defender's data subset and
order, the adapter initialisation and RoRA's weight-dropout masks.

Methods come in two kinds:

* **trained** (``lora``, ``rora``, any ``defend`` method): one :func:`run_defence` per seed,
  resumable (a finished run's JSON is skipped; JSONs are written atomically when the run
  has finished). The trained adapter (the trainable parameters *before* any rescaling,
  safetensors) is kept beside the run in ``<out>/adapters/<run id>.safetensors``.
* **post-hoc** (no retraining; computed from a trained run's saved adapter):

  - ``lora+rescale``: the PEFT LoRA adapter of the ``lora`` run with the spectral
    rescaling of the top ``rescale_layers`` blocks applied after training
    (:func:`rescale_peft_lora_`, ``scaling = σ_max(W_pre) / σ_max(BA)``, the same rule as
    :func:`rora_fast.spectral_rescale_`). Note: ``rora-fast defend --methods lora+rescale``
    *trains* a separate rora_fast LoRA (``rora:pt``); this is the same idea without a
    second training run, so its "before rescaling" is exactly the ``lora`` row.
  - ``rora+repair``: the ``rora`` run, rescaled, then the trigger-agnostic repair
    (:func:`rora_fast.repair.recalibrate_head_bias_`, clean dev data only).
  - ``lora+rescale+repair``: ``lora+rescale``, then the same repair.
  - ``...+repair-acc``: the repair with ``method="accuracy"`` (the head bias shifted to
    the clean dev accuracy's maximum) instead of matching the prediction frequencies.
  - ``rora+adaptive``: the ``rora`` run's trained adapter rescaled by
    :func:`rora_fast.adaptive_rescale_` on the clean dev rows (the strongest of the
    default ladder within ``rescale_tolerance`` dev-accuracy points), not the paper's
    fixed scale: what ``rora-fast defend --rescale adaptive`` does after training.

Runs already finished elsewhere (``reuse`` folders, e.g. the single-seed grid) are copied
when their run id (a hash of the full spec) is the same; they have no saved adapter, so
their post-hoc variants are missing and the table says how many seeds each row has.

Statistics (:func:`aggregate`): per method, the mean, the sample standard deviation
(n − 1) and the two-sided 95 % **t-interval** ``mean ± t(0.975, n−1)·sd/√n`` of CA, ASR,
Δ and the ASR floor; and per seed the **paired** difference RoRA − LoRA (same seed, so the
same poisoned model and data) with its own t-interval. n = 1 gives no interval.
Written to ``<out>/seeds.json``, ``seeds.md`` and ``seeds.png``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence

from rora_fast.atomic import save_figure, write_json, write_text

__all__ = ["POSTHOC", "t_quantile_975", "mean_ci", "run_seeds", "run_posthoc",
           "rescale_peft_lora_", "aggregate", "write_aggregate", "parse_seeds", "run_files"]

#: post-hoc variant -> (trained method it starts from, description)
POSTHOC = {
    "lora+rescale": ("lora", "the lora run's PEFT adapter, top-block spectral rescaling after "
                             "training (no retraining)"),
    "rora+repair": ("rora", "the rora run, rescaled, then the head-bias recalibration on clean "
                            "dev data (no retraining)"),
    "lora+rescale+repair": ("lora", "lora+rescale, then the head-bias recalibration on clean "
                                    "dev data (no retraining)"),
    "rora+repair-acc": ("rora", "the rora run, rescaled, then the head bias shifted to the "
                                "clean dev accuracy's maximum (no retraining)"),
    "lora+rescale+repair-acc": ("lora", "lora+rescale, then the head bias shifted to the clean "
                                        "dev accuracy's maximum (no retraining)"),
    "rora+adaptive": ("rora", "the rora run's adapter rescaled by rora_fast.adaptive_rescale_ "
                              "on the clean dev rows instead of the paper's fixed scale (no "
                              "retraining)"),
}
METRICS = ("CA", "ASR", "delta", "ASR_floor")

# two-sided 95 % Student t quantiles t(0.975, df), df = 1..30
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(xs: Sequence[float]) -> Dict:
    """``{n, mean, sd, ci95_half, ci95_low, ci95_high}``; sd and the interval are None for n < 2."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95_half": None, "ci95_low": None,
                "ci95_high": None}
    m = sum(xs) / n
    if n < 2:
        return {"n": 1, "mean": round(m, 3), "sd": None, "ci95_half": None, "ci95_low": None,
                "ci95_high": None}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": round(m, 3), "sd": round(sd, 3), "ci95_half": round(h, 3),
            "ci95_low": round(m - h, 3), "ci95_high": round(m + h, 3)}


def parse_seeds(text: str) -> List[int]:
    """``"0-4"``, ``"0,2,5"`` or ``"1-3,7"`` -> a list of seeds (order kept, no repeats)."""
    out: List[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                a, b = int(a), int(b)
                if b < a:
                    raise ValueError
                rng = range(a, b + 1)
            else:
                rng = [int(part)]
            for s in rng:
                if s < 0:
                    raise ValueError
                if s not in out:
                    out.append(s)
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of seeds or ranges like 0-4, got {text!r}")
    if not out:
        raise ValueError(f"--seeds: no seed given ({text!r})")
    return out


# ----------------------------------------------------------------------------- post-hoc
def rescale_peft_lora_(model, layers: int) -> Dict[str, float]:
    """Spectral rescaling of a trained **PEFT** LoRA model, in place: for every LoRA layer of
    the last ``layers`` transformer blocks, ``scaling = σ_max(W_pre) / σ_max(BA)``, by
    :func:`rora_fast.spectral_rescale_` (σ_max(W_pre) exact from the base weight). Returns
    ``{name: s}``."""
    import rora_fast
    layers = int(layers)
    if layers < 0:
        raise ValueError(f"layers must be >= 0, got {layers}")
    return rora_fast.spectral_rescale_(model, layers, adapter_name="default")


def _adapter_path(out_dir: str, rid: str) -> str:
    return os.path.join(out_dir, "adapters", rid + ".safetensors")


def posthoc_run_id(base_rid: str, variant: str) -> str:
    post = variant.split("+", 1)[1]
    return f"{base_rid}+{post}"


def run_posthoc(spec, variant: str, out_dir: str, cache_dir: Optional[str], log=print,
                force: bool = False) -> Optional[Dict]:
    """Evaluate the post-hoc ``variant`` of the trained run ``spec`` (its method must be
    ``POSTHOC[variant][0]``) from its saved adapter. Returns None (and logs why) when the
    adapter is missing. Writes ``<out>/runs/<run id>+<post>.json`` (kind ``posthoc``)."""
    import time
    from .attacks import get_attack
    from .defences import parse_method
    from .runner import defended_model, evaluate, finish_result, prepare_sets, run_id
    base_method, _ = POSTHOC[variant]
    if spec.method != base_method:
        raise ValueError(f"{variant} starts from a {base_method} run, got {spec.method!r}")
    rid = run_id(spec)
    path = os.path.join(out_dir, "runs", posthoc_run_id(rid, variant) + ".json")
    if os.path.exists(path) and not force:
        log(f"skip {variant} seed {spec.seed}: result exists ({path})")
        with open(path) as f:
            return json.load(f)
    apath = _adapter_path(out_dir, rid)
    if not os.path.exists(apath):
        log(f"{variant} seed {spec.seed}: no saved adapter {apath} (run reused from a folder "
            f"without adapters?): skipped")
        return None
    t0 = time.time()
    model, tok, res = defended_model(spec, parse_method(spec.method), apath, cache_dir, log=log)
    L = res["max_length"]
    attack = get_attack(spec.attack, spec.trigger)
    sets = prepare_sets(spec.task, attack, tok, L, res["n_train"], res["n_dev"], res["n_test"],
                        spec.seed)
    out = {"kind": "posthoc", "variant": variant, "description": POSTHOC[variant][1],
           "from_run": rid, "adapter": os.path.relpath(apath, out_dir), "spec": res,
           "seed": spec.seed}
    repair_method = "accuracy" if variant.endswith("-acc") else "frequency"
    if variant.startswith("rora+repair") and res.get("repair"):
        raise ValueError(f"{variant}: the rora run of seed {spec.seed} is already repaired (its "
                         f"preset's choice); {variant} would repair it twice")
    if variant.startswith("rora+repair") and res.get("rescale", "paper") != "paper":
        raise ValueError(f"{variant}: the rora run of seed {spec.seed} was rescaled "
                         f"{res['rescale']}ly, {variant} repairs the paper rescale (train with "
                         f"--rescale paper)")
    if variant.startswith("lora+rescale"):
        out["rescale"] = rescale_peft_lora_(model, spec.rescale_layers)
        if "+repair" in variant:
            from rora_fast.repair import recalibrate_head_bias_
            before = os.path.join(out_dir, "runs", posthoc_run_id(rid, "lora+rescale") + ".json")
            if os.path.exists(before):
                with open(before) as f:
                    out["before_repair"] = json.load(f)["metrics"]
            out["repair"] = recalibrate_head_bias_(model, tok, sets["dev"], L,
                                                   method=repair_method)
    elif variant.startswith("rora+repair"):
        import rora_fast
        from rora_fast.repair import recalibrate_head_bias_
        out["rescale"] = {k: float(v) for k, v in rora_fast.spectral_rescale_(
            model, layers=spec.rescale_layers, factor=res.get("rescale_factor", 1.0)).items()}
        with open(os.path.join(out_dir, "runs", rid + ".json")) as f:
            out["before_repair"] = json.load(f)["metrics"]  # the same rescaled model
        out["repair"] = recalibrate_head_bias_(model, tok, sets["dev"], L, method=repair_method)
    elif variant == "rora+adaptive":
        from .runner import adaptive_rescale_on_dev_
        with open(os.path.join(out_dir, "runs", rid + ".json")) as f:
            out["before_rescale"] = json.load(f).get("before_rescale")
        # what `defend --rescale adaptive` of this run does: the preset's ladder, tolerance and
        # judge for an adaptive rescale (after the repair when the run repairs)
        ad = dataclasses.replace(spec, rescale="adaptive", rescale_factor=None).resolved()
        out["adaptive_rescale"] = adaptive_rescale_on_dev_(model, tok, sets["dev"], L, ad)
        out["rescale"] = out["adaptive_rescale"]["scales"]
        if ad.get("repair"):  # as the trained run (and `defend --rescale adaptive`) does
            from rora_fast.repair import recalibrate_head_bias_
            out["repair"] = recalibrate_head_bias_(model, tok, sets["dev"], L)
    else:  # pragma: no cover - POSTHOC is closed
        raise ValueError(variant)
    out["metrics"] = evaluate(model, tok, sets, L, attack.target_label)
    return finish_result(out, path, t0, f"{variant} seed {spec.seed}", log)


# ----------------------------------------------------------------------------- runner
def run_seeds(base, methods: Sequence[str], seeds: Sequence[int], out_dir: str,
              cache_dir: Optional[str], reuse: Sequence[str] = (), log=print,
              after_each: Optional[Callable[[], None]] = None) -> Dict:
    """Run ``base`` (a :class:`RunSpec`; its seed is replaced) for every seed and method,
    seed by seed, then write the aggregate. Trained methods first within a seed, post-hoc
    variants after the run they start from. Returns the aggregate."""
    from .defences import parse_method
    from .runner import reuse_run, run_defence
    methods = list(methods)
    for m in methods:
        if m in POSTHOC:
            if POSTHOC[m][0] not in methods:
                raise ValueError(f"{m} is computed from the {POSTHOC[m][0]} run: add "
                                 f"{POSTHOC[m][0]} to --methods")
        else:
            parse_method(m)
    trained = [m for m in methods if m not in POSTHOC]
    for seed in seeds:
        for m in trained:
            spec = dataclasses.replace(base, method=m, seed=int(seed))
            reuse_run(spec, out_dir, reuse, log, f"seed {seed} {m}")
            run_defence(spec, out_dir, cache_dir, log=log,
                        adapter_dir=os.path.join(out_dir, "adapters"))
            for v in methods:
                if v in POSTHOC and POSTHOC[v][0] == m:
                    run_posthoc(spec, v, out_dir, cache_dir, log=log)
            write_aggregate(out_dir)
            if after_each is not None:
                after_each()
    return write_aggregate(out_dir)


# ----------------------------------------------------------------------------- aggregate
def run_files(out_dir: str):
    """``(file name, record)`` of every run JSON in ``<out_dir>/runs`` (a ``rora-fast seeds``
    or ``defend`` folder), in name order; nothing when the folder does not exist."""
    folder = os.path.join(out_dir, "runs")
    if not os.path.isdir(folder):
        return
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".json"):
            with open(os.path.join(folder, fn)) as f:
                yield fn, json.load(f)


def _load(out_dir: str) -> List[Dict]:
    rows = []
    for fn, r in run_files(out_dir):
        if r.get("kind") == "defence":
            rows.append({"method": r["spec"]["method"], "seed": r["spec"]["seed"],
                         "metrics": r["metrics"], "file": f"runs/{fn}",
                         "before_rescale": r.get("before_rescale"),
                         "reused": not os.path.exists(os.path.join(
                             out_dir, "adapters", r["run_id"] + ".safetensors")),
                         "spec": r["spec"]})
        elif r.get("kind") == "posthoc":
            rows.append({"method": r["variant"], "seed": r["seed"], "metrics": r["metrics"],
                         "file": f"runs/{fn}", "before_rescale": None, "reused": False,
                         "before_repair": r.get("before_repair"), "spec": r["spec"]})
    return rows


def aggregate(out_dir: str, paired=(("rora", "lora"), ("rora+repair", "lora"),
                                    ("rora+repair", "rora"), ("rora+repair-acc", "lora"),
                                    ("rora+repair-acc", "rora"), ("lora+rescale", "lora"),
                                    ("lora+rescale+repair", "lora+rescale"),
                                    ("lora+rescale+repair-acc", "lora+rescale"),
                                    ("rora+adaptive", "lora"), ("rora+adaptive", "rora"))) -> Dict:
    rows = _load(out_dir)
    by: Dict[str, Dict[int, Dict]] = {}
    for r in rows:
        if r["seed"] in by.setdefault(r["method"], {}):
            raise ValueError(f"{out_dir}: two results for {r['method']} seed {r['seed']}")
        by[r["method"]][r["seed"]] = r
    known = ("fft", "lora", "lora+rescale", "lora+rescale+repair", "lora+rescale+repair-acc",
             "rora", "rora+repair", "rora+repair-acc")
    order = [m for m in known if m in by] + sorted(m for m in by if m not in known)
    methods = {}
    for m in order:
        seeds = sorted(by[m])
        methods[m] = {"seeds": seeds,
                      "per_seed": {str(s): {**{k: by[m][s]["metrics"][k] for k in METRICS},
                                            "file": by[m][s]["file"]} for s in seeds},
                      **{k: mean_ci([by[m][s]["metrics"][k] for s in seeds]) for k in METRICS}}
        br = [by[m][s]["before_rescale"] for s in seeds if by[m][s].get("before_rescale")]
        if br:
            methods[m]["before_rescale"] = {k: mean_ci([b[k] for b in br]) for k in METRICS}
    diffs = {}
    for a, b in paired:
        if a in by and b in by:
            common = sorted(set(by[a]) & set(by[b]))
            if not common:
                continue
            per = {str(s): {k: round(by[a][s]["metrics"][k] - by[b][s]["metrics"][k], 2)
                            for k in METRICS} for s in common}
            diffs[f"{a} - {b}"] = {"seeds": common, "per_seed": per,
                                   **{k: mean_ci([per[str(s)][k] for s in common])
                                      for k in METRICS}}
    spec = rows[0]["spec"] if rows else {}
    return {"setting": {k: spec.get(k) for k in ("task", "attack", "trigger", "preset", "model",
                                                 "max_length", "n_train", "epochs",
                                                 "target_modules", "rescale_layers")},
            "interval": "two-sided 95 % Student t-interval: mean ± t(0.975, n-1)·sd/√n; "
                        "sd with n-1; none for n = 1",
            "methods": methods, "paired": diffs}


def _ci(st: Dict) -> str:
    if st["mean"] is None:
        return ""
    if st["ci95_half"] is None:
        return f"{st['mean']:.2f} (n = 1)"
    return f"{st['mean']:.2f} ± {st['ci95_half']:.2f}"


def aggregate_markdown(agg: Dict, title: str) -> str:
    s = agg["setting"]
    lines = [f"# {title}", "",
             f"{s.get('task')} ← {s.get('attack')} ({s.get('trigger')!r}), preset {s.get('preset')}, "
             f"{s.get('model')}, max length {s.get('max_length')}, {s.get('n_train')} training rows "
             f"× {s.get('epochs')} epochs, adapters on {s.get('target_modules')}, rescaling of the "
             f"top {s.get('rescale_layers')} blocks. Each seed: its own poisoned model, data "
             f"subset and order, initialisation and masks.", "",
             f"Mean ± half-width of the 95 % CI ({agg['interval']}), in %.", "",
             "| method | seeds | CA | ASR | Δ | ASR floor | sd CA / ASR / floor |",
             "|---|---|---|---|---|---|---|"]
    for m, st in agg["methods"].items():
        sd = " / ".join("" if st[k]["sd"] is None else f"{st[k]['sd']:.2f}"
                        for k in ("CA", "ASR", "ASR_floor"))
        lines.append(f"| {m} | {len(st['seeds'])} ({','.join(map(str, st['seeds']))}) | "
                     f"{_ci(st['CA'])} | {_ci(st['ASR'])} | {_ci(st['delta'])} | "
                     f"{_ci(st['ASR_floor'])} | {sd} |")
    if any("before_rescale" in st for st in agg["methods"].values()):
        lines += ["", "Before rescaling (same runs): " + "; ".join(
            f"{m}: CA {_ci(st['before_rescale']['CA'])}, ASR {_ci(st['before_rescale']['ASR'])}, "
            f"floor {_ci(st['before_rescale']['ASR_floor'])}"
            for m, st in agg["methods"].items() if "before_rescale" in st) + "."]
    if agg["paired"]:
        lines += ["", "**Paired differences** (same seed: same poisoned model and data):", "",
                  "| difference | seeds | CA | ASR | Δ | ASR floor |", "|---|---|---|---|---|---|"]
        for name, st in agg["paired"].items():
            lines.append(f"| {name} | {len(st['seeds'])} | {_ci(st['CA'])} | {_ci(st['ASR'])} | "
                         f"{_ci(st['delta'])} | {_ci(st['ASR_floor'])} |")
    lines += ["", "**Per seed** (CA / ASR / ASR floor; result file):", "",
              "| method | seed | CA | ASR | ASR floor | file |", "|---|---|---|---|---|---|"]
    for m, st in agg["methods"].items():
        for sd, r in st["per_seed"].items():
            lines.append(f"| {m} | {sd} | {r['CA']:.2f} | {r['ASR']:.2f} | {r['ASR_floor']:.2f} | "
                         f"`{r['file']}` |")
    lines += ["", "Post-hoc rows (`lora+rescale`, `lora+rescale+repair`, `rora+repair`) are "
                  "computed from the trained run's saved adapter (`adapters/`), without "
                  "retraining: `lora+rescale` = the `lora` adapter with the top-block spectral "
                  "rescaling; `+repair` = then the classification head's bias re-fitted on the "
                  "clean dev rows (`+repair`: so that the dev prediction frequencies match the label "
                  "frequencies; `+repair-acc`: to the dev accuracy's maximum). Runs reused from the single-seed folders have no saved "
                  "adapter, so those seeds lack post-hoc rows.",
              "", "![mean and 95 % CI per method](seeds.png)", ""]
    return "\n".join(lines)


def plot_aggregate(agg: Dict, path: str, title: str) -> bool:
    if not agg["methods"]:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = (("CA", "CA"), ("ASR", "ASR"), ("ASR_floor", "ASR floor"))
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 2.1 * len(agg["methods"])), 4.4),
                             sharey=True)
    names = list(agg["methods"])
    for ax, (k, label) in zip(axes, keys):
        for i, m in enumerate(names):
            st = agg["methods"][m]
            ys = [st["per_seed"][str(s)][k] for s in st["seeds"]]
            ax.scatter([i + 0.12 * ((j % 5) - 2) / 2 for j in range(len(ys))], ys, s=14,
                       color="0.55", zorder=2)
            c = st[k]
            err = c["ci95_half"] if c["ci95_half"] is not None else 0
            ax.errorbar([i], [c["mean"]], yerr=[err], fmt="o", color="C0" if k == "CA" else "C3",
                        capsize=5, zorder=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"{n}\n(n={len(agg['methods'][n]['seeds'])})" for n in names],
                           rotation=40, ha="right", fontsize=7)
        ax.set_title(f"{label}: mean ± 95 % CI (t), seeds in grey", fontsize=9)
        ax.set_ylim(-3, 103)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("%")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True


def write_aggregate(out_dir: str, title: Optional[str] = None) -> Dict:
    agg = aggregate(out_dir)
    s = agg["setting"]
    title = title or f"{s.get('task')} ← {s.get('attack')}: seeds"
    # atomic writes: two writers (seeds.sh, seeds_post.py) never share a temporary file
    write_json(os.path.join(out_dir, "seeds.json"), agg)
    plot_aggregate(agg, os.path.join(out_dir, "seeds.png"), title)
    write_text(os.path.join(out_dir, "seeds.md"), aggregate_markdown(agg, title))
    return agg
