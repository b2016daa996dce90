"""Layer level: one adapted linear layer, forward + backward.

Variants (alternated within each shape, repeated ``RORA_BENCH_REPS`` times):
``base`` (the frozen GEMMs alone, x·Wᵀ and dY·W: the floor), ``lora`` (PEFT LoRA,
lora_dropout 0.1), ``rora`` (RoraLinear, torch reference backend), ``fused``
(RoraLinear through rora_fast.kernels; CUDA only, skipped on the CPU).
Token counts per shape: benchmarks.common sizes()["layer_tokens"] (reduced on CPU).
"""

import pytest

from benchmarks import common

DEVICE = common.bench_device()
SHAPES = ["tiny", "1024x1024", "4096x4096", "4096x11008"]
VARIANTS = ["base", "lora", "rora", "fused"]
CASES = common.interleaved(SHAPES, VARIANTS)
_CACHE = common.CaseCache()


@pytest.mark.parametrize("shape,variant,rep", CASES,
                         ids=[f"{s}-{v}-rep{i}" for s, v, i in CASES])
def bench_layer(benchmark, bench_sizes, shape, variant, rep):
    if variant == "fused":
        if DEVICE != "cuda":
            pytest.skip("fused RoRA needs CUDA (rora_fast.kernels)")
        from rora_fast.functional import _kernels_module

        if _kernels_module() is None:
            pytest.skip("rora_fast.kernels not importable (triton missing?)")
    benchmark.group = f"layer {shape}"
    fn, info = _CACHE.get(shape, variant,
                          lambda: common.build_layer_case(shape, variant, DEVICE))
    common.run_benchmark(benchmark, fn, dict(info, rep=rep, kind="layer"),
                         bench_sizes["layer_rounds"][shape])
