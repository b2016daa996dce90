"""Peak GPU memory of RoRA fine-tuning of a LLaMA-class causal LM (a planning model).

    python -m rora_fast.memory --model llama-7b --gpu-mem 24GB [--seq 2048] [--batch 1]
    rora_fast.memory.plan_memory("llama-7b", batch=1, seq=2048, checkpointing=True)

Terms (bytes; ``T = batch·seq`` tokens; ``h`` hidden, ``f`` intermediate, ``kv`` the
key/value width ``n_kv_heads·head_dim``, ``a`` heads, ``V`` vocabulary, ``L`` blocks):

* base weights: every parameter of the model in the base dtype (bf16: 2 B); with a
  bitsandbytes base (:func:`quantized_linear_bytes`, exact), per block linear of
  ``n = out·in`` elements: 8-bit ``n`` int8 + ``4·out`` B of fp32 row scales (SCB);
  4-bit NF4 with double quantisation (QLoRA) ``n/2`` packed codes + ``n/64`` uint8 absmax
  blocks + ``4·⌈n/64/256⌉`` fp32 second-level absmax + the fp32 code books (16 and 256
  entries) and offset, 1 092 B per layer; embeddings, norms and ``lm_head`` stay bf16 as
  bitsandbytes does.
* adapters: ``r·(in+out)`` fp32 parameters per adapted linear, each with an fp32
  gradient and two fp32 AdamW moments: 16 B per adapter parameter.
* SVD bases: ``ortho_U`` (out x k) and ``ortho_V`` (in x k), fp32, per adapted linear.
* activations kept for backward, per token and block (bf16, SDPA/flash attention that
  saves q, k, v, output and the fp32 log-sum-exp; HF's RMSNorm saves its fp32 input;
  a frozen linear saves nothing, an adapted one its input)::

      act_block = 2 RMSNorms·4h + (q 2h + k,v 2·2kv + attn out 2h) + lse 4a
                  + (SiLU in, SiLU out, up out) 3·2f + inputs of adapted linears
      q_proj,v_proj adapted: act_block = 14h + 4kv + 6f + 4a   (q/k/v input: 2h)
      all-linear:            act_block = 16h + 4kv + 8f + 4a   (+ gate/up and down inputs;
                             o_proj's input is the attention output, already kept)

  without checkpointing ``L·act_block·T``; with per-block checkpointing (HF
  ``gradient_checkpointing_enable``) ``L·2h·T`` (block inputs) plus one block
  recomputed in backward (``act_block·T``).
* backward workspace: gradients in flight inside one block, ``(4f + 6h)·T``.
* logits: bf16 logits, fp32 log-softmax saved by the loss, and in backward its fp32
  gradient twice plus the bf16 one: ``16·V·T`` in backward (HF computes
  the loss in fp32 over the whole vocabulary).
* masked-weight transient: the fused kernels materialise
  ``M⊙W`` for one layer at a time: one weight matrix in bf16 (2 B per element of the
  largest adapted weight). The torch reference path needs about 9 B per element
  (int32 Philox lanes, the bool mask, two bf16 copies).
* not counted by ``torch.cuda.max_memory_allocated`` and added for the fit verdict:
  the CUDA context and allocator slack, ``overhead_gb`` (default 1.0 GB).

Validated on the CPU by ``tests/test_memory.py`` (parameter, buffer and optimizer bytes
exactly; the per-block activation formula against the tensors autograd really saves
for a bf16 LLaMA block) and, for the NF4 and int8 rows, by ``tests/test_quantized.py``
(the bytes of a tiny LLaMA quantized by bitsandbytes with RoRA on, to the byte); the
totals on a GPU by ``benchmarks/gpu/memory_check.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Union

__all__ = ["PRESETS", "ModelShape", "MemoryPlan", "model_shape", "plan_memory",
           "quantized_linear_bytes",
           "activation_bytes_per_token_block", "max_batch", "fits_table", "parse_size",
           "saved_tensor_bytes", "llama_block_saved_bytes_per_token", "main"]

GiB = 1024 ** 3

# name -> (hidden, intermediate, layers, heads, kv_heads, vocab, tied)
PRESETS: Dict[str, tuple] = {
    "llama-7b": (4096, 11008, 32, 32, 32, 32000, False),      # LLaMA-1/2 7B
    "llama-2-7b": (4096, 11008, 32, 32, 32, 32000, False),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256, False),    # LLaMA-3/3.1 8B
    "llama-8b": (4096, 14336, 32, 32, 8, 128256, False),
    "llama-13b": (5120, 13824, 40, 40, 40, 32000, False),     # LLaMA-1/2 13B
    "llama-2-13b": (5120, 13824, 40, 40, 40, 32000, False),
}

_BASE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.5 + 1 / 64}
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantized_linear_bytes(out_features: int, in_features: int, base_dtype: str,
                           blocksize: int = 64, nested_blocksize: int = 256) -> int:
    """Bytes bitsandbytes holds for one quantized ``(out, in)`` linear weight.

    ``int8`` (``Linear8bitLt``): the int8 weight and one fp32 scale per row (SCB).
    ``nf4`` (``Linear4bit``, NF4 with double quantisation, as QLoRA): two 4-bit codes per
    byte, one uint8 absmax per ``blocksize`` block, those absmax quantised again with one
    fp32 absmax per ``nested_blocksize`` blocks, an fp32 offset and the two fp32 code
    books (16 NF4 values, 256 of the dynamic map) -- each layer has its own copies.
    """
    n = out_features * in_features
    if base_dtype == "int8":
        return n + 4 * out_features
    if base_dtype == "nf4":
        blocks = -(-n // blocksize)
        return (-(-n // 2) + blocks + 4 * -(-blocks // nested_blocksize) + 4
                + 4 * 16 + 4 * 256)
    raise ValueError(f"not a bitsandbytes base dtype: {base_dtype!r} (int8 or nf4)")


@dataclass
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: Optional[int] = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden // self.heads

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> Dict[str, tuple]:
        """``name -> (out, in)`` of one block's linears."""
        h, f, q = self.hidden, self.intermediate, self.heads * self.head_dim
        return {"q_proj": (q, h), "k_proj": (self.kv, h), "v_proj": (self.kv, h),
                "o_proj": (h, q), "gate_proj": (f, h), "up_proj": (f, h),
                "down_proj": (h, f)}

    def block_linear_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes().values())

    def other_params(self) -> int:
        """Embeddings, lm_head, norms."""
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * 2 * self.hidden + self.hidden

    def n_params(self) -> int:
        return self.layers * self.block_linear_params() + self.other_params()


def model_shape(model: Union[str, ModelShape, object]) -> ModelShape:
    """A :class:`ModelShape` from a preset name (``llama-7b``, ``llama-3-8b``,
    ``llama-13b``...), a transformers config object, or a local config path/name that
    ``AutoConfig.from_pretrained`` can read."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        key = model.lower().replace("_", "-").split("/")[-1]
        key = re.sub(r"^meta-", "", key)
        key = key.replace("-hf", "")
        if key in PRESETS:
            return ModelShape(*PRESETS[key])
        from transformers import AutoConfig

        model = AutoConfig.from_pretrained(model)
    c = model
    return ModelShape(hidden=c.hidden_size, intermediate=c.intermediate_size,
                      layers=c.num_hidden_layers, heads=c.num_attention_heads,
                      kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                      vocab=c.vocab_size, tied=bool(getattr(c, "tie_word_embeddings", False)),
                      head_dim=getattr(c, "head_dim", None))


def activation_bytes_per_token_block(shape: ModelShape, act_bytes: int = 2,
                                     target_modules: Sequence[str] = ("q_proj", "v_proj")
                                     ) -> float:
    """Bytes autograd keeps per token for one LLaMA block (see the module docstring).

    ``act_bytes``: bytes of the activation dtype (2 for bf16/fp16). A frozen linear
    keeps nothing (its weight gradient is not needed); an adapted one keeps its input
    (shared by q/k/v and by gate/up)."""
    h, f, kv, a = shape.hidden, shape.intermediate, shape.kv, shape.heads
    q = shape.heads * shape.head_dim
    t = set(target_modules)
    inputs = 0
    if t & {"q_proj", "k_proj", "v_proj"}:
        inputs += h
    # o_proj's input is the attention output SDPA already keeps (same storage)
    if t & {"gate_proj", "up_proj"}:
        inputs += h
    if "down_proj" in t:
        inputs += f
    # fp32 inputs of the 2 RMSNorms; roped q, k, v and the attention output; SiLU input,
    # SiLU output, up output; the fp32 log-sum-exp of the attention.
    return 2 * 4 * h + act_bytes * (2 * q + 2 * kv + 3 * f + inputs) + 4 * a


@dataclass
class MemoryPlan:
    model: str
    base_dtype: str
    batch: int
    seq: int
    checkpointing: bool
    backend: str
    n_params: int
    adapter_params: int
    base_weights: float
    adapters_and_optimizer: float
    svd_bases: float
    activations: float
    backward_workspace: float
    logits: float
    masked_weight: float
    peak: float           # what torch.cuda.max_memory_allocated should report
    overhead: float       # CUDA context + allocator slack (not in max_memory_allocated)

    @property
    def total(self) -> float:
        return self.peak + self.overhead

    def fits(self, gpu_bytes: float) -> bool:
        return self.total <= gpu_bytes

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d

    def breakdown(self) -> str:
        rows = [("base weights", self.base_weights),
                ("adapters + grads + AdamW", self.adapters_and_optimizer),
                ("SVD bases", self.svd_bases), ("activations", self.activations),
                ("backward workspace", self.backward_workspace), ("logits", self.logits),
                ("masked-weight transient", self.masked_weight),
                ("peak (max_memory_allocated)", self.peak),
                ("+ CUDA context / slack", self.overhead), ("total", self.total)]
        out = ["| term | GiB |", "| --- | ---: |"]
        out += [f"| {k} | {v / GiB:.2f} |" for k, v in rows]
        return "\n".join(out)


def plan_memory(model: Union[str, ModelShape, object] = "llama-7b", *, batch: int = 1,
                seq: int = 2048, checkpointing: bool = True, base_dtype: str = "bf16",
                r: int = 8, ortho_rank: int = 32,
                target_modules: Sequence[str] = ("q_proj", "v_proj"),
                backend: str = "triton", optimizer_bytes_per_param: float = 8.0,
                adapter_bytes: float = 4.0, act_bytes: int = 2,
                overhead_gb: float = 1.0) -> MemoryPlan:
    """Predicted peak memory (bytes) of one RoRA fine-tuning step (see module docstring).

    ``target_modules``: LLaMA linear names, or ``"all-linear"``. ``base_dtype``: ``bf16``,
    ``fp16``, ``fp32``, ``int8`` or ``nf4``. ``backend``: ``triton`` (fused kernels, one
    bf16 masked weight) or ``reference`` (torch path, ~9 B per weight element).
    """
    shape = model_shape(model)
    name = model if isinstance(model, str) else type(model).__name__
    if base_dtype not in _BASE_BYTES:
        raise ValueError(f"base_dtype must be one of {sorted(_BASE_BYTES)}, got {base_dtype!r}")
    if backend not in ("triton", "reference"):
        raise ValueError(f"backend must be triton or reference, got {backend!r}")
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise ValueError("target_modules must be a list of names or 'all-linear'")
        target_modules = _LINEARS
    unknown = set(target_modules) - set(_LINEARS)
    if unknown:
        raise ValueError(f"unknown LLaMA linear names {sorted(unknown)}; use {_LINEARS}")
    lin = shape.linear_shapes()
    T = batch * seq

    wb = _BASE_BYTES[base_dtype]
    other_b = 4.0 if base_dtype == "fp32" else 2.0  # embeddings/norms/lm_head
    if base_dtype in ("int8", "nf4"):
        block = sum(quantized_linear_bytes(o, i, base_dtype) for o, i in lin.values())
    else:
        block = shape.block_linear_params() * wb
    base = shape.layers * block + shape.other_params() * other_b

    adapter_params = shape.layers * sum(r * (lin[t][0] + lin[t][1]) for t in target_modules)
    adapters = adapter_params * (2 * adapter_bytes + optimizer_bytes_per_param)
    bases = shape.layers * sum(ortho_rank * (lin[t][0] + lin[t][1])
                               for t in target_modules) * adapter_bytes

    act_block = activation_bytes_per_token_block(shape, act_bytes, target_modules)
    final = (4 + act_bytes) * shape.hidden  # final norm: fp32 input + lm_head input
    if checkpointing:
        acts = (shape.layers * act_bytes * shape.hidden + act_block + final) * T
    else:
        acts = (shape.layers * act_block + final) * T
    workspace = (2 * act_bytes * shape.intermediate + 3 * act_bytes * shape.hidden) * T
    logits = (act_bytes + 4 + 4 + 4 + act_bytes) * shape.vocab * T
    biggest = max(lin[t][0] * lin[t][1] for t in target_modules)
    masked = biggest * (act_bytes if backend == "triton" else 4 + 1 + 2 * act_bytes)
    if base_dtype in ("int8", "nf4"):
        masked += biggest * act_bytes  # the dequantised weight of the layer in flight
    peak = base + adapters + bases + acts + workspace + logits + masked
    return MemoryPlan(model=str(name), base_dtype=base_dtype, batch=batch, seq=seq,
                      checkpointing=checkpointing, backend=backend,
                      n_params=shape.n_params(), adapter_params=adapter_params,
                      base_weights=base, adapters_and_optimizer=adapters, svd_bases=bases,
                      activations=acts, backward_workspace=workspace, logits=logits,
                      masked_weight=masked, peak=peak, overhead=overhead_gb * GiB)


def saved_tensor_bytes(fn, exclude: Iterable = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs: the
    activation memory a forward leaves for its backward, on any device. Each storage is
    counted once (a tensor saved by two ops, or two views of one storage, once);
    storages of the ``exclude`` tensors (parameters, buffers, the input) are not
    counted. What validates :func:`activation_bytes_per_token_block` on the CPU."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def llama_block_saved_bytes_per_token(model, batch: int = 4, seq: int = 128) -> float:
    """:func:`saved_tensor_bytes` of the first block of a transformers LLaMA model (its
    ``.model.layers``; a PEFT-wrapped one through ``get_base_model()``) in training mode,
    per token, for a random input in the model's dtype; parameters, buffers and the
    block's input not counted. The measurement :func:`activation_bytes_per_token_block`
    is checked against."""
    import torch

    model.train()
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    dtype = inner.embed_tokens.weight.dtype
    x = torch.randn(batch, seq, model.config.hidden_size, dtype=dtype, requires_grad=True)
    pos = torch.arange(seq).unsqueeze(0)
    pe = inner.rotary_emb(x, pos)
    exclude = [*model.parameters(), *model.buffers(), x]
    n = saved_tensor_bytes(lambda: inner.layers[0](x, position_embeddings=pe,
                                                   attention_mask=None, position_ids=pos),
                           exclude)
    return n / (batch * seq)


def max_batch(model, seq: int, gpu_bytes: float, limit: int = 256, **kw) -> int:
    """Largest batch (0 if none) whose predicted total fits ``gpu_bytes``."""
    best = 0
    for b in range(1, limit + 1):
        if plan_memory(model, batch=b, seq=seq, **kw).fits(gpu_bytes):
            best = b
        else:
            break
    return best


def parse_size(text: Union[str, float, int]) -> float:
    """``"24GB"``, ``"16GiB"``, ``"24"`` (GB) -> bytes (GB read as GiB, as GPUs are sold)."""
    if isinstance(text, (int, float)):
        return float(text) * GiB
    m = re.fullmatch(r"\s*([0-9.]+)\s*(gi?b?|mi?b?)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 24GB)")
    value, unit = float(m.group(1)), (m.group(2) or "g")
    return value * (GiB if unit.startswith("g") else 1024 ** 2)


def fits_table(models: Iterable[str] = ("llama-7b", "llama-3-8b", "llama-13b"),
               gpus: Sequence[str] = ("16GB", "24GB"), seqs: Sequence[int] = (512, 2048),
               base_dtypes: Sequence[str] = ("bf16", "int8", "nf4"), **kw) -> str:
    """Markdown table: largest batch that fits, per model, base dtype, checkpointing,
    sequence length and GPU size (``-`` = not even batch 1)."""
    head = ["model", "base", "ckpt", "static GiB", "MiB/token"]
    head += [f"{g} @ {s}" for g in gpus for s in seqs]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        for dt in base_dtypes:
            for ck in (True, False):
                p1 = plan_memory(m, batch=1, seq=1, checkpointing=ck, base_dtype=dt, **kw)
                p2 = plan_memory(m, batch=2, seq=1, checkpointing=ck, base_dtype=dt, **kw)
                per_tok = p2.peak - p1.peak
                static = p1.peak - per_tok
                cells = [m, dt, "yes" if ck else "no", f"{static / GiB:.1f}",
                         f"{per_tok / 1024 ** 2:.2f}"]
                for g in gpus:
                    for s in seqs:
                        b = max_batch(m, s, parse_size(g), checkpointing=ck, base_dtype=dt,
                                      **kw)
                        cells.append(str(b) if b else "-")
                out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------- command line
def _memory_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Predict the peak GPU memory of RoRA "
                                                        "fine-tuning (LLaMA 7B/8B/13B).")
    ap.add_argument("--model", default="llama-7b",
                    help=f"a preset ({', '.join(PRESETS)}), a local folder with "
                         f"config.json, or a hub name org/name (downloads its config)")
    ap.add_argument("--gpu-mem", default="24GB",
                    help="GPU memory with its unit, e.g. 16GB, 24GiB or 80GB")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--base-dtype", default="bf16", choices=sorted(_BASE_BYTES))
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--ortho-rank", type=int, default=32)
    ap.add_argument("--target-modules", default="q_proj,v_proj",
                    help="comma list of LLaMA linear names or all-linear")
    ap.add_argument("--backend", default="triton", choices=["triton", "reference"])
    ap.add_argument("--overhead-gb", type=float, default=1.0)
    ap.add_argument("--table", action="store_true",
                    help="print the fits table for LLaMA 7B/8B/13B at 16 and 24 GB")
    return ap


def _memory_model(name: str) -> str:
    """The --model of plan-memory, checked without the network: a preset, a local folder
    with config.json, or a hub name org/name; anything else is a one-line error."""
    import re
    key = re.sub(r"^meta-", "", name.lower().replace("_", "-").split("/")[-1]).replace("-hf", "")
    if key in PRESETS:
        return name
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.exists(os.path.join(expanded, "config.json")):
            raise ValueError(f"--model {name!r}: the folder has no config.json")
        return expanded
    if (name.count("/") == 1 and not os.path.isabs(expanded)
            and not name.startswith((".", "~"))):
        return name  # a hub name: the user asked for it
    raise ValueError(f"--model {name!r}: unknown model; known presets: "
                     f"{', '.join(PRESETS)} (or a local folder with config.json, or a "
                     f"hub name org/name)")


def _memory_size(text: str) -> None:
    import re
    if not re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*([gGmM]i?[bB]?)\s*", str(text)):
        raise ValueError(f"--gpu-mem {text!r}: give the size with its unit, e.g. 24GB, 24GiB "
                         f"or 512MB")


def main(argv: Optional[List[str]] = None, prog: str = "python -m rora_fast.memory") -> int:
    """``rora-fast plan-memory`` and ``python -m rora_fast.memory``: the prediction for one
    model and GPU size, what fits, and optionally the 7B/8B/13B table."""
    a = _memory_parser(prog).parse_args(argv)
    try:
        _memory_size(a.gpu_mem)
        model = _memory_model(a.model)
        tm = a.target_modules if a.target_modules == "all-linear" else tuple(
            t.strip() for t in a.target_modules.split(",") if t.strip())
        kw = dict(r=a.r, ortho_rank=a.ortho_rank, target_modules=tm, backend=a.backend,
                  overhead_gb=a.overhead_gb)
        gpu = parse_size(a.gpu_mem)
        plan = plan_memory(model, batch=a.batch, seq=a.seq, base_dtype=a.base_dtype,
                                  checkpointing=not a.no_checkpointing, **kw)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2
    print(f"## {a.model}: batch {a.batch} x seq {a.seq}, base {a.base_dtype}, "
          f"checkpointing {'on' if not a.no_checkpointing else 'off'}, "
          f"{plan.n_params / 1e9:.2f}B params, {plan.adapter_params / 1e6:.2f}M adapter params\n")
    print(plan.breakdown())
    verdict = "fits" if plan.fits(gpu) else "does NOT fit"
    print(f"\n{verdict} in {a.gpu_mem} ({plan.total / GiB:.2f} of "
          f"{gpu / GiB:.0f} GiB)\n")
    rows = ["| base | ckpt | max batch @ 512 | max batch @ 2048 | max batch @ 4096 |",
            "|---|---|---|---|---|"]
    for dt in ("bf16", "int8", "nf4"):
        for ck in (True, False):
            cells = [str(max_batch(model, s, gpu, checkpointing=ck, base_dtype=dt, **kw)
                         or "-") for s in (512, 2048, 4096)]
            rows.append(f"| {dt} | {'yes' if ck else 'no'} | " + " | ".join(cells) + " |")
    print(f"### What fits in {a.gpu_mem} ({a.model})\n")
    print("\n".join(rows))
    if a.table:
        print("\n### LLaMA 7B / 8B / 13B: largest batch that fits\n")
        print(fits_table(**kw))
    return 0



if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
