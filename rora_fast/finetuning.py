"""Fine-tune a suspect checkpoint with RoRA on the user's own clean labelled rows, then
write a model that serves: :func:`finetune` and :func:`save_finetuned` (``rora-fast train``
is a thin shell over both).

What :func:`finetune` runs is the harness's defence, step for step, so the same rows,
settings and seed give the same adapter and the same numbers through either door
(tests/test_finetune.py): :func:`rora_fast.apply_rora` (p, λ, k of the paper), the loop of
:mod:`rora_fast.loop` (AdamW, linear warm-up schedule, the checkpoint with the best
validation accuracy kept), then the post-training rescale of the top ``rescale_layers``
blocks and the head-bias repair on the validation rows. The defaults are those of the
harness preset ``small``: of every configuration measured over 5 seeds × 2 tasks against
LoRA of the same schedule, 12 epochs in length-grouped batches with the adaptive rescale
(the strongest of 0.5 / 0.75 / 1 × the paper's scale whose validation accuracy after the
repair stays within 2 points of the un-rescaled model's, :func:`rora_fast.adaptive_rescale_`)
followed by the repair has the best worst margin, the only one meeting all three targets
(docs/results.md); ``rescale="paper"`` is the paper's fixed rule.

The validation rows choose everything chosen (checkpoint, adaptive rescale, repair);
candidate triggers (``check_triggers``) are measured after the model is final and never
inform it.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .data import Example

__all__ = ["FinetuneConfig", "finetune", "save_finetuned", "dense_merged_weights",
           "insert_trigger", "check_trigger", "RESCALES"]

RESCALES = ("paper", "adaptive", "none")
PRECISIONS = ("auto", "fp32", "bf16")
QUANTIZED = ("4bit", "8bit")  # rora_fast.bases.base_kind of a bitsandbytes base


@dataclass
class FinetuneConfig:
    """Settings of :func:`finetune` (defaults: the harness preset ``small``'s defender,
    ``max_length`` 128 instead of 64 for texts longer than SST-2's)."""
    # RoRA (the paper's values; lora_dropout as PEFT's LoRA in the harness)
    r: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.1
    weight_dropout: float = 0.1
    ortho_lambda: float = 10.0
    ortho_rank: int = 32
    target_modules: Optional[Union[str, List[str]]] = "all-linear"
    # after training: rescale of the top blocks ("paper", "adaptive" or "none"), repair
    rescale_layers: int = 3
    rescale: str = "adaptive"
    rescale_factor: float = 1.0        # "paper": factor x σ_max(W_pre)/σ_max(update)
    # "adaptive": dev accuracy points a rung may cost, the ladder's factors (weakest first);
    # judged after the repair when the repair follows (adaptive_rescale_'s after_repair)
    rescale_tolerance: float = 2.0
    rescale_factors: Tuple[float, ...] = (0.5, 0.75, 1.0)
    repair: bool = True
    # schedule (12 epochs: the harness's best measured schedule, docs/results.md, issue 29)
    epochs: float = 12.0
    lr: float = 2e-3
    batch_size: int = 32
    max_length: int = 128
    evals_per_epoch: int = 1
    group_by_length: bool = True
    micro_batches: int = 1
    seed: int = 0
    validation_fraction: float = 0.1   # held out of the training rows when no validation
    precision: str = "auto"            # auto: bf16 autocast on CUDA, fp32 elsewhere

    def __post_init__(self):
        from .loop import check_micro_batches
        from .validation import check_choice, check_number
        check_choice("rescale", self.rescale, RESCALES)
        check_choice("precision", self.precision, PRECISIONS)
        for name in ("epochs", "lr"):
            check_number(name, getattr(self, name), lo=0, lo_open=True)
        check_number("rescale_tolerance", self.rescale_tolerance, lo=0)
        check_number("rescale_factor", self.rescale_factor, lo=0, lo_open=True)
        from .adaptive import factor_ladder
        self.rescale_factors = tuple(self.rescale_factors)
        factor_ladder(1, self.rescale_factors)  # ascending, each finite and > 0
        if self.rescale != "paper" and self.rescale_factor != 1.0:
            raise ValueError(f"rescale_factor={self.rescale_factor} multiplies the paper rule's "
                             f"scale: it needs rescale='paper', got rescale={self.rescale!r}")
        for name in ("batch_size", "max_length", "evals_per_epoch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        check_micro_batches(self.micro_batches, self.batch_size)
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got "
                             f"{self.validation_fraction!r}")

    def rora_config(self):
        from .config import RoraConfig
        return RoraConfig(r=self.r, alpha=self.alpha, lora_dropout=self.lora_dropout,
                          weight_dropout=self.weight_dropout, ortho_lambda=self.ortho_lambda,
                          ortho_rank=self.ortho_rank, target_modules=self.target_modules,
                          rescale_layers=self.rescale_layers)


def _as_rows(rows, where: str) -> List[Example]:
    """``Example``s from ``Example``s or ``(text, label)`` pairs (integer labels)."""
    if hasattr(rows, "column_names"):
        raise TypeError(f"{where}: a datasets.Dataset needs its columns named: "
                        "finetune(..., text_columns=[...], label_column=...)")
    out = []
    for i, r in enumerate(rows):
        try:
            text, label = r
        except (TypeError, ValueError):
            raise TypeError(f"{where}: row {i} is not (text, label): {r!r}") from None
        ok = isinstance(text, str) or (isinstance(text, (tuple, list)) and len(text) == 2
                                        and all(isinstance(t, str) for t in text))
        if not ok:
            raise TypeError(f"{where}: row {i}'s text must be a string or a pair of strings, "
                            f"got {text!r}")
        if isinstance(label, bool) or not isinstance(label, int):
            raise TypeError(f"{where}: row {i}'s label must be an int class index, got "
                            f"{label!r} (string labels: use rora_fast.userdata.label_map_for "
                            "or pass a datasets.Dataset with label_column)")
        out.append(Example(tuple(text) if not isinstance(text, str) else text, int(label)))
    if not out:
        raise ValueError(f"{where}: no rows")
    return out


def fix_pad_token(tokenizer, model) -> Optional[str]:
    """Give a tokenizer without a pad token its end-of-sequence token as pad (LLaMA-style
    models), and the model's config the pad id; returns what was done, or raises when
    there is no token to pad with."""
    note = None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no pad token and no end-of-sequence token to "
                             "pad with; give it a pad token (tokenizer.pad_token = ...)")
        tokenizer.pad_token = tokenizer.eos_token
        note = f"the tokenizer had no pad token: padding with its eos token {tokenizer.eos_token!r}"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return note


def insert_trigger(text, trigger: str, rng: random.Random):
    """``text`` with ``trigger`` inserted between two words at a random position (the
    first text of a pair)."""
    if not isinstance(text, str):
        return (insert_trigger(text[0], trigger, rng),) + tuple(text[1:])
    words = text.split(" ")
    words.insert(rng.randint(0, len(words)), trigger)
    return " ".join(words)


def _accuracy(model, tokenizer, rows: Sequence[Example], max_length: int) -> float:
    from .loop import predict
    preds = predict(model, tokenizer, [e.text for e in rows], max_length)
    return round(100.0 * sum(p == e.label for p, e in zip(preds, rows)) / len(rows), 2)


def _spectra(model) -> Dict[str, Dict[str, float]]:
    """Per adapted layer: σ_max(W_pre), σ_max(s·BA) and their ratio, at the current scale."""
    from .linalg import sigma_max_lowrank
    from .model import rora_layers
    out = {}
    for name, layer in rora_layers(model):
        sd = float(layer.scaling) * sigma_max_lowrank(layer.lora_B.detach().float(),
                                                      layer.lora_A.detach().float())
        out[name] = {"sigma_pre": round(float(layer.sigma_pre), 5), "sigma_delta": round(sd, 5),
                     "ratio": round(sd / float(layer.sigma_pre), 6), "scaling": float(layer.scaling)}
    return out


def check_trigger(model, tokenizer, rows: Sequence[Example], trigger: str, target: int,
                  max_length: int, seed: int = 0) -> Dict:
    """ASR of ``trigger`` toward class ``target`` on the rows of other classes (the trigger
    inserted at a seeded random position) and its floor (the same rows without it)."""
    from .loop import predict
    others = [e for e in rows if e.label != target]
    if not others:
        raise ValueError(f"trigger check: no validation row outside class {target}")
    rng = random.Random(seed)
    triggered = [insert_trigger(e.text, trigger, rng) for e in others]
    asr = predict(model, tokenizer, triggered, max_length)
    floor = predict(model, tokenizer, [e.text for e in others], max_length)
    n = len(others)
    return {"trigger": trigger, "target": int(target), "n_rows": n,
            "asr": round(100.0 * sum(p == target for p in asr) / n, 2),
            "floor": round(100.0 * sum(p == target for p in floor) / n, 2)}


def _fingerprint(model, config: FinetuneConfig, train: Sequence[Example],
                 validation: Sequence[Example]) -> str:
    import xxhash
    h = xxhash.xxh3_64()
    h.update(json.dumps(asdict(config), sort_keys=True, default=str).encode())
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    for part in (train, validation):
        h.update(json.dumps([[e.text, e.label] for e in part]).encode())
    return h.hexdigest()


def finetune(model, tokenizer, train, validation=None, config: Optional[FinetuneConfig] = None,
             *, text_columns: Sequence[str] = ("text",), label_column: str = "label",
             check_triggers: Sequence[Tuple[str, int]] = (), checkpoint: Optional[str] = None,
             resume: bool = False, progress: bool = True, log=print) -> Dict:
    """Fine-tune ``model`` (a transformers sequence classifier) with RoRA on ``train``, in
    place, and return the report (a JSON-able dict).

    ``train`` / ``validation``: sequences of ``(text, label)`` (``Example``s, tuples; text
    a string or a pair of strings, label an int class index), or ``datasets.Dataset``s
    read through ``text_columns`` and ``label_column`` (string labels are mapped as
    ``rora-fast train`` maps them; the map is written into ``model.config``).
    ``validation`` None: ``config.validation_fraction`` of the training rows is held out
    (seeded, stratified) and the report says so. ``check_triggers``: ``(trigger text,
    target class)`` pairs measured on the validation rows once the model is final.
    ``checkpoint``/``resume``: a training-state file written every epoch, and whether to
    continue from it (:func:`rora_fast.loop.train`).

    Everything is checked before the model changes: rows, labels against the head, the
    tokenizer's pad token, the settings.
    """
    from . import adaptive, model as model_mod
    from .loop import TrainConfig, labelled_batches, set_seed, train as train_loop
    from .repair import recalibrate_head_bias_
    from .userdata import holdout_split, rows_from_table

    config = config or FinetuneConfig()
    t_start = time.time()
    num_labels = int(getattr(model.config, "num_labels", 2))
    id2label = None
    if hasattr(train, "column_names"):
        train_rows, labels = rows_from_table(train, text_columns, label_column, None,
                                             "training rows", num_labels,
                                             getattr(model.config, "id2label", None))
        id2label = labels.id2label
        val_rows = None if validation is None else rows_from_table(
            validation, text_columns, label_column, labels, "validation rows")[0]
    else:
        train_rows = _as_rows(train, "training rows")
        val_rows = None if validation is None else (
            rows_from_table(validation, text_columns, label_column, None, "validation rows",
                            num_labels)[0] if hasattr(validation, "column_names")
            else _as_rows(validation, "validation rows"))
    notes = []
    for where, rows in (("training rows", train_rows), ("validation rows", val_rows or [])):
        bad = sorted({e.label for e in rows if not 0 <= e.label < num_labels})
        if bad:
            raise ValueError(f"{where}: labels {bad} do not fit the model's head "
                             f"({num_labels} outputs)")
    if len({e.label for e in train_rows}) < 2:
        raise ValueError("training rows: a single class; fine-tuning a classifier needs at "
                         "least two")
    if val_rows is None:
        train_rows, val_rows = holdout_split(train_rows, config.validation_fraction,
                                             config.seed)
        notes.append(f"no validation rows given: held out {len(val_rows)} of the "
                     f"{len(train_rows) + len(val_rows)} training rows ({config.validation_fraction:.0%}, "
                     f"seed {config.seed}, stratified) to choose the checkpoint"
                     + (", the rescale" if config.rescale == "adaptive" else "")
                     + (" and the head-bias repair" if config.repair else ""))
        log(notes[-1])
    for trig, target in check_triggers:
        if not isinstance(trig, str) or not trig.strip():
            raise ValueError(f"a trigger to check must be non-empty text, got {trig!r}")
        if not 0 <= int(target) < num_labels:
            raise ValueError(f"trigger {trig!r}: target label {target} does not fit the "
                             f"model's head ({num_labels} outputs)")
    if config.repair:
        from .repair import classification_head
        try:
            head = classification_head(model)
        except ValueError as e:
            raise ValueError(f"the head-bias repair (repair=True, the default) needs the "
                             f"model's classification head: {e}; pass repair=False "
                             "(--no-repair)") from None
        if head.bias is None:
            raise ValueError("the model's classification head has no bias, which the "
                             "head-bias repair (repair=True, the default) shifts; pass "
                             "repair=False (--no-repair) for this model")
    rcfg = config.rora_config()
    pad_note = fix_pad_token(tokenizer, model)
    if pad_note:
        notes.append(pad_note)
        log(pad_note)
    device = next(model.parameters()).device
    amp = None
    if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"):
        amp = torch.bfloat16
    if id2label is not None:
        model.config.id2label = {int(k): v for k, v in id2label.items()}
        model.config.label2id = {v: int(k) for k, v in id2label.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    set_seed(config.seed)
    model_mod.apply_rora(model, rcfg, progress=progress)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tcfg = TrainConfig(lr=config.lr, epochs=config.epochs, batch_size=config.batch_size,
                       max_length=config.max_length, evals_per_epoch=config.evals_per_epoch,
                       group_by_length=config.group_by_length,
                       micro_batches=config.micro_batches, autocast=amp)
    t0 = time.time()
    tlog = train_loop(model, tokenizer, train_rows, tcfg, config.seed, dev_set=val_rows,
                      desc="rora", checkpoint=checkpoint, resume=resume,
                      fingerprint=_fingerprint(model, config, train_rows, val_rows))
    train_s = time.time() - t0
    L = config.max_length
    report: Dict = {"config": asdict(config), "notes": notes, "n_trainable": n_trainable,
                    "rows": {"train": len(train_rows), "validation": len(val_rows)},
                    "train_log": tlog, "train_seconds": round(train_s, 1),
                    "validation_accuracy": {"trained": _accuracy(model, tokenizer, val_rows, L)},
                    "spectra_before_rescale": _spectra(model)}
    if config.rescale == "paper":
        report["rescale"] = {k: float(v) for k, v in model_mod.spectral_rescale_(
            model, layers=config.rescale_layers, factor=config.rescale_factor).items()}
    elif config.rescale == "adaptive":
        info = adaptive.adaptive_rescale_(
            model, labelled_batches(tokenizer, val_rows, L, device=device),
            ladder=adaptive.factor_ladder(config.rescale_layers, config.rescale_factors),
            tolerance=config.rescale_tolerance, after_repair=config.repair)
        report["adaptive_rescale"] = {k: v for k, v in info.items() if k != "scales"}
        report["rescale"] = {k: float(v) for k, v in info["scales"].items()}
    else:
        report["rescale"] = {}
    before = report["spectra_before_rescale"]
    # how much the rescale amplifies each layer's trained update: new scale / trained scale
    report["amplification"] = {k: round(s / before[k]["scaling"], 6)
                                for k, s in report["rescale"].items()}
    report["validation_accuracy"]["rescaled"] = _accuracy(model, tokenizer, val_rows, L)
    if config.repair:
        report["repair"] = recalibrate_head_bias_(model, tokenizer, val_rows, L)
    report["validation_accuracy"]["final"] = _accuracy(model, tokenizer, val_rows, L)
    report["trigger_checks"] = [check_trigger(model, tokenizer, val_rows, t, int(y), L,
                                              config.seed) for t, y in check_triggers]
    if device.type == "cuda":
        report["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        report["peak_memory_kind"] = "CUDA allocated"
    else:
        import resource
        report["peak_memory_mb"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        report["peak_memory_kind"] = "process peak RSS"
    report["id2label"] = {str(k): v for k, v in (getattr(model.config, "id2label", None)
                                                 or {}).items()}
    report["seconds"] = round(time.time() - t_start, 1)
    return report


def report_markdown(report: Dict) -> str:
    va = report["validation_accuracy"]
    lines = ["# rora-fast train", "",
             f"Rows: {report['rows']['train']} training, {report['rows']['validation']} "
             "validation.", ""]
    lines += [f"- {n}" for n in report.get("notes", [])]
    lines += ["", "| validation accuracy | % |", "|---|---|",
              f"| after training (best checkpoint) | {va['trained']:.2f} |",
              f"| after the rescale ({report['config']['rescale']}) | {va['rescaled']:.2f} |",
              f"| final{' (after the head-bias repair)' if 'repair' in report else ''} | "
              f"{va['final']:.2f} |", ""]
    if report["rescale"]:
        lines += ["| layer | σmax(s·BA)/σmax(W_pre) before | amplification | scale |",
                  "|---|---|---|---|"]
        for name, s in report["rescale"].items():
            lines.append(f"| {name} | {report['spectra_before_rescale'][name]['ratio']:.4f} | "
                         f"{report['amplification'][name]:.3f} | {s:.4f} |")
        lines.append("")
    if report["trigger_checks"]:
        lines += ["| candidate trigger | target | ASR % | floor % | rows |", "|---|---|---|---|---|"]
        for c in report["trigger_checks"]:
            name = report.get("id2label", {}).get(str(c["target"]))
            target = f"{name} ({c['target']})" if name else str(c["target"])
            lines.append(f"| {c['trigger']} | {target} | {c['asr']:.2f} | "
                         f"{c['floor']:.2f} | {c['n_rows']} |")
        lines += ["", "ASR: share of validation rows of other classes predicted as the target "
                  "with the trigger inserted; floor: the same rows without it. Measured "
                  "after the model was chosen.", ""]
    lines += [f"Training {report['train_seconds']} s, total {report['seconds']} s, peak memory "
              f"{report['peak_memory_mb']} MB ({report['peak_memory_kind']}), "
              f"{report['n_trainable']:,} trainable parameters.", ""]
    return "\n".join(lines)


def _plot(report: Dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from .atomic import save_figure
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    hist = report["train_log"].get("dev_history", [])
    axes[0].plot([h["step"] for h in hist], [h["dev_acc"] for h in hist], marker="o")
    axes[0].set(title="validation accuracy during training", xlabel="step", ylabel="%")
    va = report["validation_accuracy"]
    keys = [k for k in ("trained", "rescaled", "final") if k in va]
    axes[1].bar(keys, [va[k] for k in keys], color=["#888", "#4c72b0", "#55a868"][:len(keys)])
    lo = min(va[k] for k in keys)
    axes[1].set(title="validation accuracy", ylabel="%", ylim=(max(0, lo - 10), 100))
    names = list(report["spectra_before_rescale"])
    axes[2].plot(range(len(names)), [report["spectra_before_rescale"][n]["ratio"] for n in names],
                 ".", label="before rescale")
    resc = [i for i, n in enumerate(names) if n in report["rescale"]]
    if resc:
        axes[2].plot(resc, [report["rescale"][names[i]] * report["spectra_before_rescale"][
            names[i]]["sigma_delta"] / report["spectra_before_rescale"][names[i]]["scaling"]
            / report["spectra_before_rescale"][names[i]]["sigma_pre"] for i in resc],
            "x", label="after")
    axes[2].set(title="σmax(s·BA) / σmax(W_pre) per layer", xlabel="adapted layer",
                yscale="log")
    axes[2].legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True


def _quantized(model) -> bool:
    from .bases import base_kind
    return any(base_kind(m) in QUANTIZED for m in model.modules())


def dense_merged_weights(model) -> Dict[str, torch.Tensor]:
    """``{parameter name: float32 weight}`` that make a dense copy of the checkpoint compute
    what ``model`` computes in eval: ``W + s·BA`` of every adapted layer, its base ``W``
    dequantized where quantized, and the dequantized weight of every other quantized
    linear."""
    from .bases import base_kind, dense_weight
    from .model import rora_layers
    out = {}
    layers = dict(rora_layers(model))
    for name, layer in layers.items():
        W = layer._base.dense_weight(layer.base_module, torch.float32)
        out[name + ".weight"] = layer.variant.merged_weight(layer, W).float()
    for name, mod in model.named_modules():
        if name in layers or any(name.startswith(n + ".") for n in layers):
            continue
        if base_kind(mod) in QUANTIZED:
            out[name + ".weight"] = dense_weight(mod, torch.float32)
    return out


def save_finetuned(model, tokenizer, out_dir: str, report: Optional[Dict] = None,
                   dense_model=None) -> Dict[str, str]:
    """Write what :func:`finetune` made into ``out_dir``:

    * ``adapter/``: the RoRA adapter (:func:`rora_fast.save_rora`);
    * ``peft-adapter/``: the same as a plain PEFT LoRA adapter
      (:func:`rora_fast.export_peft_adapter`);
    * ``model/``: the merged model and the tokenizer, loadable with
      ``AutoModelForSequenceClassification.from_pretrained`` without rora_fast;
    * ``report.json``, ``report.md``, ``report.png`` (with ``report``).

    The merge is the last step and happens in place (:func:`rora_fast.merge_rora`): the
    model comes back with plain ``nn.Linear`` layers. A model on a quantized (bitsandbytes)
    base is not merged into its 4-bit weights, which would round the update away: pass
    ``dense_model``, the same checkpoint loaded unquantized, and ``model/`` is that model
    with the dequantized base plus the update (:func:`dense_merged_weights`) and the
    trained head, in float. Each folder and file is written atomically. Returns
    ``{what: path}``.
    """
    from .atomic import atomic_write_dir, write_json, write_text
    from .model import merge_rora
    from .persistence import export_peft_adapter, save_rora
    os.makedirs(out_dir, exist_ok=True)
    paths = {"adapter": os.path.join(out_dir, "adapter"),
             "peft_adapter": os.path.join(out_dir, "peft-adapter"),
             "model": os.path.join(out_dir, "model")}
    quantized = _quantized(model)
    if quantized and dense_model is None:
        raise ValueError("the model has a quantized base: pass dense_model (the same "
                         "checkpoint loaded without quantization) to write the merged model "
                         "in float; nothing was written")
    save_rora(model, paths["adapter"])
    export_peft_adapter(model, paths["peft_adapter"])
    if quantized:
        from .persistence import _extra_trainable
        target = dense_model
        with torch.no_grad():
            weights = dense_merged_weights(model)
            weights.update({n: p.detach() for n, p in _extra_trainable(model).items()})
            for n, w in weights.items():
                dst = target.get_parameter(n)
                dst.copy_(w.to(dst.device, dst.dtype))
        for key in ("id2label", "label2id", "pad_token_id"):
            setattr(target.config, key, getattr(model.config, key))
    else:
        target = merge_rora(model)

    def write(d):
        target.save_pretrained(str(d), safe_serialization=True)
        tokenizer.save_pretrained(str(d))
    atomic_write_dir(paths["model"], write)
    if report is not None:
        paths["report_json"] = str(write_json(os.path.join(out_dir, "report.json"), report))
        paths["report_md"] = str(write_text(os.path.join(out_dir, "report.md"),
                                            report_markdown(report)))
        png = os.path.join(out_dir, "report.png")
        if _plot(report, png):
            paths["report_png"] = png
    return paths
