"""Why the committed CPU results run single-threaded: on a 2-core box shared with other
jobs, multi-threaded MKL/OpenMP loses to one thread. Times a few set-up and mask
operations at the thread count of this process; run it twice and compare:

    OMP_NUM_THREADS=1 python -m benchmarks.thread_contention
    OMP_NUM_THREADS=2 python -m benchmarks.thread_contention
"""

import os
import statistics
import time

import torch


def med(f, n=3):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    from rora_fast.reference import weight_keep_mask

    g = torch.Generator().manual_seed(0)
    A = torch.randn(4096, 64, generator=g)
    B = torch.randn(576, 4096, generator=g)
    W = torch.randn(4096, 4096, generator=g)
    x = torch.randn(512, 4096, generator=g)
    res = {
        "qr 4096x64": med(lambda: torch.linalg.qr(A)),
        "svd 576x4096": med(lambda: torch.linalg.svd(B, full_matrices=False)),
        "gemm 512x4096x4096": med(lambda: x @ W.t()),
        "mask 1024x4096 (torch Philox)": med(lambda: weight_keep_mask(1, 1024, 4096, 0.1,
                                                                      impl="torch")),
    }
    print(f"threads={torch.get_num_threads()} loadavg={os.getloadavg()}")
    for k, v in res.items():
        print(f"  {k:32s} {1e3 * v:9.1f} ms")


if __name__ == "__main__":
    main()
