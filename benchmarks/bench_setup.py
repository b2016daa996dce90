"""Set-up cost: SVD bases (exact vs randomized, disk cache cold vs warm) and σ_max.

* ``setup_wrap``: ``apply_rora`` on a whole model (an SVD basis for every target
  layer; CPU: reduced layer count, see extra_info). The base model is built in the
  untimed ``setup`` of each round. ``exact``/``randomized`` is forced through
  ``rora_fast.linalg.EXACT_SVD_MAX_DIM`` (``RoraConfig`` has no svd_method field).
  ``cold``: an empty cache folder each round; ``warm``: a folder filled beforehand.
* ``setup_basis``: ``spectral_basis(W, 32, method)`` for one 4096 x 4096 weight.
* ``setup_sigma``: ``rora_fast.sigma_max`` vs ``torch.linalg.matrix_norm(ord=2)``.
"""

import contextlib
import math
import shutil
import tempfile

import pytest
import torch

from benchmarks import common

DEVICE = common.bench_device()


@contextlib.contextmanager
def forced_method(method):
    import rora_fast.linalg as L

    old = L.EXACT_SVD_MAX_DIM
    L.EXACT_SVD_MAX_DIM = 10**9 if method == "exact" else 0
    try:
        yield
    finally:
        L.EXACT_SVD_MAX_DIM = old


def _wrap_cases():
    cases = []
    for model in ("tiny", "bert-large", "llama-7b"):
        for method in ("exact", "randomized"):
            if model == "llama-7b" and method == "exact" and DEVICE == "cpu":
                continue  # ~1-2 min per 4096² exact SVD on the CPU; see setup_basis
            for cache in ("cold", "warm"):
                cases.append((model, method, cache))
    return cases


WRAP = _wrap_cases()


@pytest.mark.parametrize("model,method,cache", WRAP, ids=[f"{m}-{me}-{c}" for m, me, c in WRAP])
def bench_setup_wrap(benchmark, bench_sizes, model, method, cache, tmp_path):
    from rora_fast import apply_rora, rora_layers

    benchmark.group = "setup wrap"
    layers = bench_sizes["setup_model_layers"].get(model, 2)
    dtype = common.torch_dtype(bench_sizes["dtype"])
    r = common.MODELS[model][1]
    cfg = common.rora_config(r)
    cache_root = tmp_path / "cache"
    if cache == "warm":  # fill the cache once, untimed
        import os

        os.environ["RORA_FAST_CACHE_DIR"] = str(cache_root)
        with forced_method(method):
            apply_rora(common.base_model(model, layers, DEVICE, dtype), cfg)
    counter = iter(range(10**6))

    def setup():
        import os

        folder = cache_root if cache == "warm" else tmp_path / f"cold{next(counter)}"
        os.environ["RORA_FAST_CACHE_DIR"] = str(folder)
        return (common.base_model(model, layers, DEVICE, dtype),), {}

    def wrap(m):
        with forced_method(method):
            apply_rora(m, cfg)
        common.sync(DEVICE)
        return m

    rounds = 1 if (cache == "cold" and model != "tiny") else 3
    benchmark.extra_info.update({"kind": "setup", "case": "wrap", "model": model,
                                 "method": method, "cache": cache, "layers": layers,
                                 "device": DEVICE, "dtype": bench_sizes["dtype"],
                                 "loadavg_before": common.loadavg()})
    result = benchmark.pedantic(wrap, setup=setup, rounds=rounds, iterations=1)
    benchmark.extra_info["n_rora_layers"] = sum(1 for _ in rora_layers(result))
    benchmark.extra_info["loadavg_after"] = common.loadavg()
    import os

    os.environ["RORA_FAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="rora-bench-svd-")


BASIS = [("tiny", "exact", "cold"), ("tiny", "randomized", "cold"),
         ("4096x4096", "exact", "cold"), ("4096x4096", "randomized", "cold"),
         ("4096x4096", "randomized", "warm")]  # a warm load costs the same for both methods


@pytest.mark.parametrize("shape,method,cache", BASIS, ids=[f"{s}-{m}-{c}" for s, m, c in BASIS])
def bench_setup_basis(benchmark, bench_sizes, shape, method, cache, tmp_path):
    from rora_fast.linalg import spectral_basis

    benchmark.group = "setup basis"
    in_f, out_f = (64, 48) if shape == "tiny" else (4096, 4096)
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(DEVICE)
    k = 32
    counter = iter(range(10**6))
    if cache == "warm":
        spectral_basis(W, k, method=method, cache_dir=tmp_path / "warm")  # untimed fill

    def setup():
        folder = tmp_path / ("warm" if cache == "warm" else f"cold{next(counter)}")
        return (folder,), {}

    def run(folder):
        b = spectral_basis(W, k, method=method, cache_dir=folder)
        common.sync(DEVICE)
        return b

    rounds = 1 if (cache == "cold" and shape != "tiny") else 3
    benchmark.extra_info.update({"kind": "setup", "case": "basis", "shape": shape,
                                 "method": method, "cache": cache, "k": k, "device": DEVICE,
                                 "loadavg_before": common.loadavg()})
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
    benchmark.extra_info["loadavg_after"] = common.loadavg()
    shutil.rmtree(tmp_path, ignore_errors=True)


SIGMA = [("tiny", "sigma_max"), ("tiny", "matrix_norm"),
         ("4096x4096", "sigma_max"), ("4096x4096", "matrix_norm")]


@pytest.mark.parametrize("shape,method", SIGMA, ids=[f"{s}-{m}" for s, m in SIGMA])
def bench_setup_sigma(benchmark, shape, method):
    from rora_fast import sigma_max

    benchmark.group = "setup sigma_max"
    n = 96 if shape == "tiny" else 4096
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(n, n, generator=g) / math.sqrt(n)).to(DEVICE)
    exact = {}

    def run():
        if method == "sigma_max":
            v = sigma_max(W, generator=torch.Generator().manual_seed(1))
        else:
            v = float(torch.linalg.matrix_norm(W, ord=2))
        exact["v"] = v
        return v

    rounds = 1 if (method == "matrix_norm" and shape != "tiny") else 3
    benchmark.extra_info.update({"kind": "setup", "case": "sigma", "shape": shape,
                                 "method": method, "device": DEVICE,
                                 "loadavg_before": common.loadavg()})
    benchmark.pedantic(run, rounds=rounds, iterations=1)
    benchmark.extra_info["value"] = exact["v"]
    benchmark.extra_info["loadavg_after"] = common.loadavg()
