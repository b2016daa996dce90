"""Mask generators at 4096 x 4096 (p = 0.1), single process, medians of 3, every result
checked bit-identical to the torch definition: the torch definition
(reference.weight_keep_mask impl='torch'), the eager prototype
(benchmarks/prototypes/fast_mask.py), the same compiled with torch.compile, the C path
(impl='native') and the C path's fused masked copy (reference.masked_weight); plus the
SVD-cache fingerprint (BLAKE2b of the weight) that a warm cache hit pays.

    OMP_NUM_THREADS=1 python -m benchmarks.mask_impls
"""
import os
import statistics
import time

import torch

from benchmarks.prototypes import fast_mask as fm
from rora_fast import reference as ref
from rora_fast.linalg import weight_fingerprint


def med(f, n=3):
    ts, out = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        out = f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main(o=4096, i=4096, p=0.1, seed=2**40 + 17):
    W = torch.randn(o, i)
    t_c0 = time.perf_counter()
    fm.weight_keep_mask_compiled(seed, 64, 64, p)
    compile_s = time.perf_counter() - t_c0
    rows = []
    t, want = med(lambda: ref.weight_keep_mask(seed, o, i, p, impl="torch"))
    rows.append(("torch definition (impl='torch')", t))
    for name, f in [("eager prototype (fast_mask.py)", lambda: fm.weight_keep_mask_fast(seed, o, i, p)),
                    ("torch.compile prototype", lambda: fm.weight_keep_mask_compiled(seed, o, i, p)),
                    ("C path (impl='native')", lambda: ref.weight_keep_mask(seed, o, i, p, impl="native"))]:
        t, got = med(f)
        assert torch.equal(got, want), name
        rows.append((name, t))
    mw_want = torch.where(want, W * (1 / (1 - ref.effective_drop_prob(p))), 0.0)
    t, got = med(lambda: ref.masked_weight(W, seed, p))
    assert torch.equal(got, mw_want)
    rows.append(("C masked_weight (mask + scaled copy, one pass)", t))
    t, got = med(lambda: fm.masked_weight_fast(W, seed, p))
    assert torch.equal(got, mw_want)
    rows.append(("eager prototype masked_weight", t))
    t, _ = med(lambda: weight_fingerprint(W))
    rows.append(("weight_fingerprint (BLAKE2b, 64 MiB)", t))
    print(f"{o}x{i}, torch threads {torch.get_num_threads()}, loadavg {os.getloadavg()}, "
          f"torch.compile first call {compile_s:.1f} s; all masks bit-identical")
    print("| generator | ms |\n|---|---|")
    for n, t in rows:
        print(f"| {n} | {1e3 * t:,.1f} |")


if __name__ == "__main__":
    main()
