"""Shared pieces of the benchmark suite: device choice, case sizes, model/layer builders.

Everything a benchmark times is built here, outside the timed region; the timed
callables only run the work (and synchronise CUDA). Sizes depend on the device the
suite runs on: the CPU cases are reduced (token counts, layer counts, sequence
lengths) so that each case takes seconds, and every benchmark writes the sizes it
used into its ``extra_info`` (the report prints them).

Overrides (environment):

* ``RORA_BENCH_DEVICE``: ``cpu`` or ``cuda`` (default: ``cuda`` when available).
* ``RORA_BENCH_SIZES``: JSON merged over the size table of the device, e.g.
  ``'{"model": {"llama-7b": {"layers": 2}}, "layer_tokens": {"4096x4096": 1024}}'``.
* ``RORA_BENCH_REPS``: how many interleaved LoRA/RoRA repetitions (default 3).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

# ----------------------------------------------------------------------------- device
def bench_device() -> str:
    name = os.environ.get("RORA_BENCH_DEVICE", "").strip().lower()
    if name:
        if name == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("RORA_BENCH_DEVICE=cuda but torch sees no CUDA device")
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def loadavg() -> Optional[list]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return None


def reps() -> int:
    return max(1, int(os.environ.get("RORA_BENCH_REPS", "3")))


# ----------------------------------------------------------------------------- sizes
# Paper (RoRA, Table 3): ms per training iteration on their GPU, LoRA -> RoRA.
PAPER_MS = {"bert-large": (94.0, 100.0), "roberta-large": (90.0, 105.0),
            "llama-7b": (84.0, 90.0)}

# name: (family, r, target modules as PEFT's default for the family)
MODELS = {
    "bert-large": ("bert", 8),
    "roberta-large": ("roberta", 8),
    "llama-7b": ("llama", 16),
    "tiny": ("bert", 4),  # harness smoke case only
    # issue 11's host-overhead case: 24 BERT blocks of hidden size 64 (compute
    # negligible), q/v adapted; RoRA with k = 4 (ortho_rank)
    "launch-bound": ("bert", 8),
}
# ortho_rank k of the RoRA variant where it is not the paper's 32
ORTHO_RANK = {"launch-bound": 4}

# Layer shapes: name -> (in_features, out_features, r, bias)
LAYER_SHAPES = {
    "1024x1024": (1024, 1024, 8, True),     # BERT-large / RoBERTa-large query, value
    "4096x4096": (4096, 4096, 16, False),   # LLaMA-7B q/k/v/o_proj
    "4096x11008": (4096, 11008, 16, False),  # LLaMA-7B gate/up_proj
    "tiny": (48, 40, 4, True),              # harness smoke case only
    "launch-bound": (64, 64, 8, True),      # one query/value layer of the launch-bound BERT
}
LAYER_LABELS = {
    "1024x1024": "BERT-/RoBERTa-large query,value (1024→1024)",
    "4096x4096": "LLaMA-7B q/k/v/o_proj (4096→4096)",
    "4096x11008": "LLaMA-7B gate/up_proj (4096→11008)",
    "tiny": "tiny (48→40), harness smoke case",
    "launch-bound": "launch-bound BERT query/value (64→64), host overhead case",
}

_SIZES = {
    "cpu": {
        "dtype": "float32",
        "layer_tokens": {"1024x1024": 2048, "4096x4096": 512, "4096x11008": 512, "tiny": 32,
                         "launch-bound": 64},
        "layer_rounds": {"1024x1024": 3, "4096x4096": 1, "4096x11008": 1, "tiny": 2},
        "model": {
            "bert-large": {"layers": 2, "seq": 64, "batch": 32, "rounds": 2},
            "roberta-large": {"layers": 2, "seq": 64, "batch": 32, "rounds": 2},
            "llama-7b": {"layers": 1, "seq": 16, "batch": 32, "rounds": 1},
            "tiny": {"layers": 2, "seq": 16, "batch": 4, "rounds": 2},
            "launch-bound": {"layers": 24, "seq": 16, "batch": 4, "rounds": 20},
        },
        "setup_model_layers": {"bert-large": 2, "llama-7b": 1},
    },
    "cuda": {
        "dtype": "bfloat16",
        "layer_tokens": {"1024x1024": 8192, "4096x4096": 8192, "4096x11008": 8192, "tiny": 32,
                         "launch-bound": 64},
        "layer_rounds": {"1024x1024": 20, "4096x4096": 10, "4096x11008": 10, "tiny": 2},
        "model": {
            # 3 interleaved repetitions x these rounds (issue 11: RoBERTa 1.72x vs BERT
            # 1.33x on the same architecture was within one repetition's noise)
            "bert-large": {"layers": 24, "seq": 128, "batch": 32, "rounds": 5},
            "roberta-large": {"layers": 24, "seq": 128, "batch": 32, "rounds": 5},
            "llama-7b": {"layers": 8, "seq": 128, "batch": 32, "rounds": 3},
            "tiny": {"layers": 2, "seq": 16, "batch": 4, "rounds": 2},
            "launch-bound": {"layers": 24, "seq": 16, "batch": 4, "rounds": 20},
        },
        "setup_model_layers": {"bert-large": 24, "llama-7b": 8},
    },
}


def _merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def git_state() -> Optional[dict]:
    """Commit and dirtiness of rora_fast/, kernels/ and setup.py now (the code the
    benchmarks import), or None outside a git checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "rora_fast", "kernels",
                                "setup.py"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "library_dirty": bool(dirty), "dirty_files": dirty.splitlines()}


def sizes(device: Optional[str] = None) -> dict:
    device = device or bench_device()
    s = copy.deepcopy(_SIZES[device])
    extra = os.environ.get("RORA_BENCH_SIZES")
    if extra:
        _merge(s, json.loads(extra))
    return s


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


# ----------------------------------------------------------------------------- models
def model_config(name: str, layers: int):
    """HF config with the real hidden sizes of ``name`` and ``layers`` blocks."""
    from transformers import BertConfig, LlamaConfig, RobertaConfig

    if name == "bert-large":
        return BertConfig(hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                          intermediate_size=4096, num_labels=2)
    if name == "roberta-large":
        return RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=layers,
                             num_attention_heads=16, intermediate_size=4096,
                             max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                             bos_token_id=0, eos_token_id=2, num_labels=2)
    if name == "llama-7b":
        return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=layers, num_attention_heads=32,
                           num_key_value_heads=32, max_position_embeddings=4096,
                           pad_token_id=0, num_labels=2)
    if name in ("tiny", "launch-bound"):
        return BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, intermediate_size=128, num_labels=2)
    raise KeyError(name)


def base_model(name: str, layers: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Randomly initialised sequence-classification model (deterministic in ``seed``)."""
    from transformers import (BertForSequenceClassification, LlamaForSequenceClassification,
                              RobertaForSequenceClassification)

    cls = {"bert": BertForSequenceClassification, "roberta": RobertaForSequenceClassification,
           "llama": LlamaForSequenceClassification}[MODELS[name][0]]
    cfg = model_config(name, layers)
    torch.manual_seed(seed)
    model = cls(cfg)
    return model.to(device=device, dtype=dtype)


def rora_config(r: int, ortho_rank: int = 32):
    from rora_fast import RoraConfig

    return RoraConfig(r=r, alpha=16, lora_dropout=0.1, weight_dropout=0.1, ortho_lambda=10,
                      ortho_rank=ortho_rank)


def lora_config(r: int, lora_dropout: float = 0.1):
    from peft import LoraConfig

    return LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=16, lora_dropout=lora_dropout)


def wrap_model(model: nn.Module, name: str, variant: str) -> Tuple[nn.Module, str]:
    """Apply PEFT LoRA or RoRA to ``model``; returns (model, backend description)."""
    r = MODELS[name][1]
    if variant in ("lora", "lora-adapter-dtype", "lora-nodrop"):
        from peft import get_peft_model

        cfg = lora_config(r, 0.0 if variant == "lora-nodrop" else 0.1)
        return get_peft_model(model, cfg,
                              autocast_adapter_dtype=variant != "lora-adapter-dtype"), "peft"
    if variant in ("rora", "rora-ref", "rora-adapter-dtype"):
        from rora_fast import apply_rora, rora_layers

        model = apply_rora(model, rora_config(r, ORTHO_RANK.get(name, 32)),
                           autocast_adapter_dtype=variant != "rora-adapter-dtype")
        if variant == "rora-ref":
            for _, layer in rora_layers(model):
                layer.backend = "reference"
        return model, rora_backend_used(model)
    raise KeyError(variant)


def rora_backend_used(model: nn.Module) -> str:
    """Which backend the RoRA layers of ``model`` will really take."""
    from rora_fast import rora_layers
    from rora_fast.functional import _kernels_module, resolve_backend

    names = set()
    for _, layer in rora_layers(model):
        b = resolve_backend(layer.backend)
        if b == "reference" or layer.weight.device.type != "cuda":
            names.add("reference")
        else:
            k = _kernels_module()
            names.add("triton" if k is not None else "reference")
    return ",".join(sorted(names))


def make_batch(name: str, batch: int, seq: int, device: str, seed: int = 1) -> dict:
    cfg = model_config(name, 1)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device)}


def make_train_step(model: nn.Module, batch: dict, device: str) -> Callable[[], float]:
    """One full training iteration: forward, backward (RoRA penalty gradient included),
    AdamW step, zero_grad. Returns a closure (the loss as a float is NOT read inside,
    so that nothing forces an extra sync beyond the final one)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)

    def backward_only():
        """Forward and backward, no step (the gradients stay for a caller to inspect)."""
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        sync(device)

    step.optimizer = opt
    step.backward_only = backward_only
    step.n_trainable = sum(p.numel() for p in params)
    return step


def build_model_case(name: str, variant: str, device: Optional[str] = None,
                     size: Optional[dict] = None):
    """(step closure, info dict) for one model-level case, built and warmed up once."""
    device = device or bench_device()
    s = sizes(device)
    size = size or s["model"][name]
    dtype = torch_dtype(s["dtype"])
    t0 = time.perf_counter()
    model = base_model(name, size["layers"], device, dtype)
    t1 = time.perf_counter()
    model, backend = wrap_model(model, name, variant)
    t2 = time.perf_counter()
    batch = make_batch(name, size["batch"], size["seq"], device)
    step = make_train_step(model, batch, device)
    info = {"model": name, "variant": variant, "backend": backend, "device": device,
            "dtype": s["dtype"], "layers": size["layers"], "seq": size["seq"],
            "batch": size["batch"], "r": MODELS[name][1],
            "n_trainable": step.n_trainable, "build_s": round(t1 - t0, 3),
            "wrap_s": round(t2 - t1, 3)}
    if name in COUNT_OPS:
        step()  # warm-up (optimizer state), untimed
        info["aten_ops_per_layer"] = aten_ops_per_adapted_layer(model, step, variant)
    return model, step, info


# Model cases whose aten ops per iteration are counted (cheap for small models).
COUNT_OPS = ("tiny", "launch-bound")


def adapted_layers(model: nn.Module, variant: str) -> int:
    """Number of adapted linear layers (PEFT LoRA layers or RoRA layers)."""
    if variant.startswith("lora"):
        return sum(1 for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    from rora_fast import rora_layers

    return len(list(rora_layers(model)))


def count_aten_ops(step) -> Dict[str, int]:
    """The ops dispatched by one call of ``step`` (TorchDispatchMode: what reaches
    kernels, after composite ops are decomposed; views included), by op name."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    with Count() as c:
        step()
    return c.ops


def aten_ops_per_adapted_layer(model: nn.Module, step, variant: str) -> float:
    """Ops dispatched in one iteration (:func:`count_aten_ops`) divided by the adapted
    layers."""
    n = sum(count_aten_ops(step).values())
    return round(n / max(1, adapted_layers(model, variant)), 2)


# ----------------------------------------------------------------------------- layers
class _Holder(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def build_layer_case(shape: str, variant: str, device: Optional[str] = None,
                     tokens: Optional[int] = None):
    """(fn, info) timing one adapted linear layer's forward + backward.

    ``base``: the frozen GEMMs alone (``y = x·Wᵀ``, ``dX = dY·W``), the floor.
    ``lora``: PEFT's LoRA ``Linear`` (lora_dropout 0.1). ``rora``: ``RoraLinear``
    through the torch reference. ``fused``: ``RoraLinear`` through the Triton kernels.
    ``x`` requires grad (as inside a network), ``W`` is frozen; the adapter grads are
    reset before each call so the RoRA penalty gradient is added every call.
    """
    device = device or bench_device()
    s = sizes(device)
    dtype = torch_dtype(s["dtype"])
    in_f, out_f, r, bias = LAYER_SHAPES[shape]
    tokens = tokens or s["layer_tokens"][shape]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 1 / math.sqrt(in_f), generator=g)
    lin = lin.to(device=device, dtype=dtype)
    lin.requires_grad_(False)
    x = torch.randn(tokens, in_f, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(tokens, out_f, generator=g).to(device=device, dtype=dtype)
    info = {"shape": shape, "in": in_f, "out": out_f, "r": r, "tokens": tokens,
            "bias": bias, "variant": variant, "device": device, "dtype": s["dtype"]}

    if variant == "base":
        W = lin.weight

        def fn():
            y = x @ W.t()
            dx = dy @ W
            sync(device)
            return y, dx

        info["backend"] = "torch GEMMs"
        return fn, info

    x = x.requires_grad_(True)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        holder = get_peft_model(_Holder(lin), LoraConfig(r=r, lora_alpha=16, lora_dropout=0.1,
                                                         target_modules=["lin"]))
        layer = holder.base_model.model.lin
        params = [p for p in layer.parameters() if p.requires_grad]
        info["backend"] = "peft"
    elif variant in ("rora", "fused"):
        from rora_fast import RoraLinear

        backend = "reference" if variant == "rora" else "triton"
        layer = RoraLinear.from_linear(lin, r=r, alpha=16, lora_dropout=0.1,
                                       weight_dropout=0.1,
                                       ortho_rank=ORTHO_RANK.get(shape, 32), ortho_lambda=10,
                                       svd_cache=None, backend=backend)
        params = [layer.lora_A, layer.lora_B]
        info["backend"] = backend
    else:
        raise KeyError(variant)
    layer.train()

    def fn():
        for p in params:
            p.grad = None
        x.grad = None
        y = layer(x)
        y.backward(dy)
        sync(device)

    return fn, info


# ----------------------------------------------------------------------------- running
class CaseCache:
    """Keeps the built cases of one group (one shape, one model) alive across the
    interleaved repetitions and frees them when the next group starts."""

    def __init__(self):
        self.group = None
        self.cases: Dict[str, tuple] = {}

    def get(self, group: str, key: str, build: Callable[[], tuple]) -> tuple:
        if group != self.group:
            self.cases.clear()
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.group = group
        if key not in self.cases:
            case = build()
            fn = case[-2]
            t0 = time.perf_counter()
            fn()  # warm-up (allocations, optimizer state, lazy inits), untimed
            case[-1]["warmup_s"] = round(time.perf_counter() - t0, 3)
            self.cases[key] = case
        return self.cases[key]


def interleaved(groups, variants, n_reps=None):
    """``(group, variant, rep)`` in the order group-major, then rep, then variant:
    the variants of one group alternate (A B A B ...) so that load from other users
    of the machine hits them alike."""
    n_reps = n_reps or reps()
    return [(g, v, i) for g in groups for i in range(n_reps) for v in variants]


def run_benchmark(benchmark, fn, info: dict, rounds: int) -> None:
    """Time ``fn`` with pytest-benchmark (``rounds`` rounds of one call each) and record
    the case's info and the load averages around it in ``extra_info``."""
    benchmark.extra_info.update(info)
    benchmark.extra_info["loadavg_before"] = loadavg()
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["loadavg_after"] = loadavg()
