"""``rora-fast train``: fine-tune your own (possibly backdoored) checkpoint with RoRA on your
own labelled file and write a model that serves. A thin shell over
:func:`rora_fast.finetune` and :func:`rora_fast.save_finetuned`; the options follow
transformers' ``run_classification.py`` where they overlap."""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

__all__ = ["add_parser", "cmd_train", "TRAIN_DESCRIPTION"]

TRAIN_DESCRIPTION = (
    "Fine-tune a sequence-classification checkpoint you did not train (it may carry a "
    "weight-poisoning backdoor) with RoRA on your own clean labelled data, then write a "
    "merged model folder that transformers loads without rora_fast, the adapter (rora_fast "
    "and PEFT formats) and a report. No poisoning stage. Example: rora-fast train --model "
    "./suspect-bert --train-file reviews.csv --text-column review --label-column sentiment "
    "--out ./cleaned")

CHECKPOINT = os.path.join("checkpoint", "train-state.safetensors")


def add_parser(sub) -> argparse.ArgumentParser:
    from .adaptive import parse_factors
    from .finetuning import FinetuneConfig, RESCALES
    d = FinetuneConfig()
    p = sub.add_parser("train", help="fine-tune your own checkpoint with RoRA on your own "
                                     "labelled file; writes a merged model, the adapter and a "
                                     "report", description=TRAIN_DESCRIPTION)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True,
                   help="a local model folder, or a hub name org/name already in the local "
                        "cache (nothing is downloaded)")
    g.add_argument("--train-file", required=True,
                   help="CSV, TSV, JSON Lines (.jsonl/.json), Parquet, or a datasets "
                        "save_to_disk folder (a DatasetDict folder: its 'train' split)")
    g.add_argument("--validation-file", default=None,
                   help="the same formats (a DatasetDict folder: 'validation'); default: a "
                        "seeded, stratified --validation-fraction of the training rows is "
                        "held out")
    g.add_argument("--text-column", action="append", default=None, metavar="NAME",
                   help="text column (default 'text'); give it twice for sentence pairs")
    g.add_argument("--label-column", default="label",
                   help="label column: strings or integers (default 'label')")
    g.add_argument("--validation-fraction", type=float, default=d.validation_fraction)
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--load-in-4bit", action="store_true",
                   help="load the base in 4-bit NF4 (bitsandbytes; QLoRA-style)")
    r = p.add_argument_group("RoRA and the schedule (defaults: the harness preset small's)")
    r.add_argument("--epochs", type=float, default=d.epochs)
    r.add_argument("--lr", type=float, default=d.lr)
    r.add_argument("--batch-size", type=int, default=d.batch_size)
    r.add_argument("--max-length", type=int, default=d.max_length)
    r.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                   default=d.group_by_length,
                   help="length-grouped batches (faster on a CPU; another draw of the "
                        "schedule); default: %(default)s")
    r.add_argument("--micro-batches", type=int, default=d.micro_batches, metavar="K",
                   help="compute each batch in K forwards of rows of similar length (the "
                        "same batch and loss, less padding); default: %(default)s")
    r.add_argument("--target-modules", default=d.target_modules,
                   help="'all-linear' (default), 'peft-default' (PEFT's per-model default), "
                        "or a comma list of module-name suffixes")
    r.add_argument("--r", type=int, default=d.r)
    r.add_argument("--alpha", type=float, default=d.alpha)
    r.add_argument("--weight-dropout", type=float, default=d.weight_dropout, help="RoRA p")
    r.add_argument("--ortho-lambda", type=float, default=d.ortho_lambda, help="RoRA λ")
    r.add_argument("--ortho-rank", type=int, default=d.ortho_rank, help="RoRA k")
    r.add_argument("--rescale-layers", type=int, default=d.rescale_layers,
                   help="rescale the adapters of the last N blocks")
    r.add_argument("--rescale", choices=RESCALES, default=d.rescale,
                   help="paper: scale = σmax(W_pre)/σmax(BA); adaptive: the strongest of "
                        "--rescale-factors x that within --rescale-tolerance of the "
                        "un-rescaled validation accuracy; none")
    r.add_argument("--rescale-factor", type=float, default=d.rescale_factor,
                   help="paper rescale: scale = factor x σmax(W_pre)/σmax(BA); default "
                        "%(default)s")
    r.add_argument("--rescale-tolerance", type=float, default=d.rescale_tolerance,
                   help="adaptive rescale: validation accuracy points a rung may cost (judged "
                        "after the repair when --repair); default %(default)s")
    r.add_argument("--rescale-factors", type=parse_factors, default=d.rescale_factors,
                   metavar="F,F,...", help="adaptive rescale: the ladder's factors of the "
                   "paper's scale, weakest first; default %(default)s")
    r.add_argument("--repair", action=argparse.BooleanOptionalAction, default=d.repair,
                   help="after the rescale, re-fit only the head's bias so that validation "
                        "prediction frequencies match the label frequencies (default on)")
    r.add_argument("--seed", type=int, default=d.seed)
    r.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision,
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    t = p.add_argument_group("candidate triggers (measured after the model is chosen)")
    t.add_argument("--check-trigger", action="append", default=[], metavar="TEXT",
                   help="a trigger you suspect (repeatable)")
    t.add_argument("--target-label", action="append", default=[], metavar="L",
                   help="its target label, as written in the label column (one for all "
                        "triggers, or one per --check-trigger)")
    o = p.add_argument_group("run")
    o.add_argument("--resume", action="store_true",
                   help="continue from the last finished epoch in --out")
    o.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def _model_path(name: str) -> str:
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"--model {name!r}: the folder has no config.json (not a "
                             "transformers model folder)")
        return path
    if name.count("/") != 1 or os.path.isabs(path) or name.startswith((".", "~")):
        raise FileNotFoundError(f"--model {name!r}: no such model folder (give a local "
                                "folder with config.json or a hub name org/name in the cache)")
    return name


def _label_of(value: str, labels) -> int:
    """A --target-label as the data writes it (string, or an integer label)."""
    if value in labels.to_id:
        return labels.to_id[value]
    try:
        if int(value) in labels.to_id:
            return labels.to_id[int(value)]
    except ValueError:
        pass
    raise ValueError(f"--target-label {value!r} is not a label of the training rows "
                     f"({', '.join(map(repr, labels.to_id))})")


def cmd_train(args) -> int:
    from .loop import get_device, setup_process
    setup_process(args.threads, args.device)
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from .finetuning import FinetuneConfig, finetune, save_finetuned
    from .userdata import read_table, rows_from_table

    target_modules = args.target_modules
    if target_modules == "peft-default":
        target_modules = None
    elif target_modules not in (None, "all-linear") and "," in target_modules:
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    cfg = FinetuneConfig(
        r=args.r, alpha=args.alpha, weight_dropout=args.weight_dropout,
        ortho_lambda=args.ortho_lambda, ortho_rank=args.ortho_rank,
        target_modules=target_modules, rescale_layers=args.rescale_layers,
        rescale=args.rescale, rescale_factor=args.rescale_factor,
        rescale_tolerance=args.rescale_tolerance, rescale_factors=args.rescale_factors,
        repair=args.repair,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        max_length=args.max_length, group_by_length=args.group_by_length,
        micro_batches=args.micro_batches, seed=args.seed,
        validation_fraction=args.validation_fraction, precision=args.precision)
    out = args.out
    if os.path.exists(os.path.join(out, "report.json")) and not args.resume:
        raise ValueError(f"--out {out}: holds a finished run (report.json); choose another "
                         "folder")
    if os.path.exists(os.path.join(out, CHECKPOINT)) and not args.resume:
        raise ValueError(f"--out {out}: holds a checkpoint of an unfinished run; pass "
                         "--resume to continue it, or choose another folder")
    # everything that can be checked without the weights, first
    path = _model_path(args.model)
    try:
        mconf = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise FileNotFoundError(f"--model {args.model!r}: cannot load its config ({e})") from None
    text_columns = args.text_column or ["text"]
    if len(text_columns) > 2:
        raise ValueError(f"--text-column: one column, or two for sentence pairs; got "
                         f"{len(text_columns)}")
    train_tab = read_table(args.train_file, "train", "--train-file")
    rows, labels = rows_from_table(train_tab, text_columns, args.label_column, None,
                                   f"--train-file {args.train_file}", mconf.num_labels,
                                   getattr(mconf, "id2label", None))
    val = None
    if args.validation_file:
        val_tab = read_table(args.validation_file, "validation", "--validation-file")
        val, _ = rows_from_table(val_tab, text_columns, args.label_column, labels,
                                 f"--validation-file {args.validation_file}")
    if args.target_label and not args.check_trigger:
        raise ValueError("--target-label needs --check-trigger")
    if args.check_trigger and len(args.target_label) not in (1, len(args.check_trigger)):
        raise ValueError(f"--target-label: give one for all triggers or one per "
                         f"--check-trigger ({len(args.check_trigger)}), got "
                         f"{len(args.target_label)}")
    targets = [_label_of(t, labels) for t in args.target_label]
    triggers = [(t, targets[i] if len(targets) > 1 else targets[0])
                for i, t in enumerate(args.check_trigger)]
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None and tok.eos_token is None:
        raise ValueError(f"--model {args.model!r}: the tokenizer has no pad token and no "
                         "end-of-sequence token to pad with")
    kwargs = {}
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig
        compute = torch.bfloat16 if get_device() == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            # the classification head is trained fully (modules_to_save): kept in float
            llm_int8_skip_modules=["classifier", "score"])
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not args.load_in_4bit:
        model = model.to(get_device())
    model.config.id2label = dict(labels.id2label)
    model.config.label2id = {v: k for k, v in labels.id2label.items()}
    report = finetune(model, tok, rows, val, cfg, check_triggers=triggers,
                      checkpoint=os.path.join(out, CHECKPOINT), resume=args.resume)
    report["data"] = {"train_file": args.train_file, "validation_file": args.validation_file,
                      "text_columns": text_columns, "label_column": args.label_column,
                      "label2id": {str(k): v for k, v in labels.to_id.items()},
                      "model": args.model}
    dense = None
    if args.load_in_4bit:  # the merged model is written in float (save_finetuned)
        hf_logging.set_verbosity_error()
        try:
            dense = AutoModelForSequenceClassification.from_pretrained(path)
        finally:
            hf_logging.set_verbosity(verbosity)
    paths = save_finetuned(model, tok, out, report, dense_model=dense)
    import shutil
    shutil.rmtree(os.path.join(out, os.path.dirname(CHECKPOINT)), ignore_errors=True)
    from .finetuning import report_markdown
    print(report_markdown(report))
    for what, p in paths.items():
        print(f"{what}: {p}")
    return 0
