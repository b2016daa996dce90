"""Compile every fused-kernel variant for a CUDA target without a GPU.

The Triton interpreter (what CI runs) shares Triton's front end but not its GPU
lowering: layouts, ``tl.reshape`` of the mask lanes, ``tl.dot`` shape limits and
shared-memory use are only checked when a kernel is compiled for a real target. This
script compiles the mask kernels (the masked copy in fp32/fp16/bf16 and with the seed
read from device memory, the effective weight c·M⊙W + s·BA, the keep-mask in both
layouts) to cubin for ``--arch`` (default 90, Hopper) with the ``ptxas`` bundled in
Triton's wheel: no GPU, no CUDA driver needed. It does not run them. Under a minute on
two cores (2-9 s per variant).

    python benchmarks/gpu/compile_check.py [--arch 90]
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rora_fast.kernels import mask

    target = GPUTarget("cuda", args.arch, 32)
    failures = []

    def compile_one(label, fn, types, consts, num_warps=8, num_stages=3):
        sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
        t0 = time.time()
        try:
            k = triton.compile(ASTSource(fn, sig, dict(consts)), target=target,
                               options=dict(num_warps=num_warps, num_stages=num_stages))
            print(f"ok   {label} ({time.time() - t0:.1f}s, shared {k.metadata.shared} B)",
                  flush=True)
        except Exception as exc:  # report every failing variant, not just the first
            failures.append(label)
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)

    # the masked copy's constants; each variant below changes what it names
    copy = dict(WRITE_MASK=False, BLOCK_N=32, BLOCK_K=128, SEED_PTR=False, LOWRANK=False)
    for dt in ("bf16", "fp16", "fp32"):
        ptr = "*" + dt
        compile_one(f"masked_copy {dt}", mask._mask_apply_kernel,
                    {"W": ptr, "OUT": ptr, "scale": "fp32", "seed": "i64"}, copy, num_warps=4)
    compile_one("masked_copy bf16, seed read from the device (graph capture)",
                mask._mask_apply_kernel,
                {"W": "*bf16", "OUT": "*bf16", "scale": "fp32", "seed": "*i64"},
                dict(copy, SEED_PTR=True), num_warps=4)
    compile_one("effective_weight bf16 (c·M⊙W + s·BA)", mask._mask_apply_kernel,
                {"W": "*bf16", "OUT": "*bf16", "LB": "*bf16", "LA": "*bf16", "scale": "fp32",
                 "lr_scale": "fp32", "seed": "i64"},
                dict(copy, LOWRANK=True), num_warps=4)
    compile_one("keep_mask", mask._mask_apply_kernel,
                {"W": "*i8", "OUT": "*i8", "scale": "fp32"},
                dict(copy, WRITE_MASK=True), num_warps=4)
    if failures:
        print(f"compile_check: {len(failures)} variant(s) failed for sm_{args.arch}: {failures}")
        return 1
    print(f"compile_check: all variants compiled for sm_{args.arch} (triton {triton.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
