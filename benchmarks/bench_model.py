"""Model level: one full training iteration (forward, backward with the RoRA penalty
gradient, AdamW step, zero_grad), PEFT LoRA vs RoRA, sequence classification.

BERT-large, RoBERTa-large, a LLaMA-7B-shaped model and issue 11's launch-bound case
(24 BERT blocks of hidden size 64: host overhead only; the aten ops per adapted layer
are counted for it, see benchmarks/host_overhead.py), built from their configs with
random weights (real hidden sizes; layer count, sequence length and batch from
benchmarks.common sizes()["model"], reduced on the CPU). LoRA: r=8 (BERT, RoBERTa) or
16 (LLaMA), alpha 16, dropout 0.1, PEFT's default targets. RoRA: the same r, alpha and
lora_dropout, weight_dropout 0.1, λ=10, k=32. Model construction, wrapping (SVD bases)
and one warm-up iteration are outside the timed region. On CUDA a third variant,
``rora-ref``, forces the torch reference backend beside the fused one.
"""

import pytest

from benchmarks import common

DEVICE = common.bench_device()
MODELS = ["tiny", "bert-large", "roberta-large", "llama-7b", "launch-bound"]
# On CUDA also PEFT LoRA with adapters in the base dtype (autocast_adapter_dtype=False:
# bf16 adapters) and without LoRA dropout, beside PEFT's defaults (issue 11, item 5).
VARIANTS = ["lora", "rora"] + (["rora-ref", "lora-adapter-dtype", "lora-nodrop"]
                               if DEVICE == "cuda" else [])
CASES = common.interleaved(MODELS, VARIANTS)
_CACHE = common.CaseCache()


@pytest.mark.parametrize("model,variant,rep", CASES,
                         ids=[f"{m}-{v}-rep{i}" for m, v, i in CASES])
def bench_model(benchmark, bench_sizes, model, variant, rep):
    benchmark.group = f"model {model}"
    _, step, info = _CACHE.get(model, variant,
                               lambda: common.build_model_case(model, variant, DEVICE))
    common.run_benchmark(benchmark, step, dict(info, rep=rep, kind="model"),
                         bench_sizes["model"][model]["rounds"])
