"""A cost model of one adapted layer's training step (forward + backward), RoRA's fused CUDA
path against PEFT LoRA's unfused ops: bytes moved, FLOPs, kernel launches, and the roofline
time on H100 and H200 from their published bandwidth and dense bf16 throughput. It says
where RoRA's cost over PEFT comes from before anything is measured; `benchmarks/gpu/run.sh`
measures what it predicts (issue 32).

Each op is one kernel launch, its time ``max(FLOPs / peak, bytes / bandwidth)`` (no launch
latency, no overlap, every tensor read from and written to memory once per op). The ops are
those the code issues:

* RoRA (``kernels/src/rora_linear.py``): with LoRA input dropout (``lora_p`` > 0, the
  Table-3 setting) the mask kernel makes ``x̃`` (forward, and again in backward), the masked
  weight ``W' = c·M⊙W`` is made by the mask kernel (forward, and again in backward), then
  cuBLAS: ``y = x W'ᵀ + b``, ``y += s·(x̃Aᵀ)Bᵀ``; backward ``dyb = G B``, ``dX = G W'``,
  ``dX̃ = s·dyb A`` masked and added to dX, ``dA = s·dybᵀ x̃``, ``dB = s·Gᵀ S``. Without LoRA
  input dropout one pass over W writes ``W_eff = c·M⊙W + s·BA`` (forward and backward) and
  ``y = x W_effᵀ + b``, ``dX = G W_eff`` are single GEMMs.
* PEFT LoRA (``peft.tuners.lora.Linear``): ``y = x Wᵀ + b``, ``x̃ = dropout(x)``, ``S = x̃Aᵀ``,
  ``U = S Bᵀ``, ``U·s``, ``y + U``; backward the same in reverse through autograd (the
  dropout's saved mask, one byte per element).

Frozen base weight and bias (no dW, no db); A, B and activations in the compute dtype.

    python -m benchmarks.cost_model [--md FILE] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Tuple

#: published figures: HBM bandwidth (bytes/s), dense bf16 tensor-core throughput (FLOP/s)
GPUS = {"H100 SXM": (3.35e12, 989.4e12), "H200": (4.8e12, 989.4e12)}

#: a kernel launch's host + launch latency (a typical figure for eager PyTorch on CUDA, not
#: measured here): launches x this is the time a layer cannot go below when launch-bound
LAUNCH_US = 4.0

#: (name, in, out, tokens, rank): the benchmarks' layer shapes
CASES = [("LLaMA-7B q/v, 8,192 tokens", 4096, 4096, 8192, 16),
         ("BERT-large q/v, Table-3 batch (32 x 128)", 1024, 1024, 4096, 8),
         ("RoBERTa-large q/v, Table-3 batch (32 x 128)", 1024, 1024, 4096, 8)]

Op = Tuple[str, float, float]  # name, FLOPs, bytes


def rora_ops(K: int, N: int, T: int, r: int, b: int = 2, lora_p: bool = True) -> List[Op]:
    g = lambda m, k, n: 2.0 * m * k * n  # noqa: E731
    if lora_p:
        return [
            ("fwd mask x -> x̃", 0, 2 * T * K * b),
            ("fwd S = x̃ Aᵀ", g(T, K, r), (T * K + r * K + T * r) * b),
            ("fwd mask W -> W'", 0, 2 * N * K * b),
            ("fwd y = x W'ᵀ + b", g(T, K, N), (T * K + N * K + T * N + N) * b),
            ("fwd y += s S Bᵀ", g(T, r, N), (T * r + N * r + 2 * T * N) * b),
            ("bwd mask x -> x̃ (again)", 0, 2 * T * K * b),
            ("bwd dyb = G B", g(T, N, r), (T * N + N * r + T * r) * b),
            ("bwd mask W -> W' (again)", 0, 2 * N * K * b),
            ("bwd dX = G W'", g(T, N, K), (T * N + N * K + T * K) * b),
            ("bwd dX̃ = dyb A", g(T, r, K), (T * r + r * K + T * K) * b),
            ("bwd dX̃ *= s", 0, 2 * T * K * b),
            ("bwd mask dX̃", 0, 2 * T * K * b),
            ("bwd dX += dX̃", 0, 3 * T * K * b),
            ("bwd dA = dybᵀ x̃", g(r, T, K), (T * r + T * K + r * K) * b),
            ("bwd dA *= s", 0, 2 * r * K * b),
            ("bwd dB = Gᵀ S", g(N, T, r), (T * N + T * r + N * r) * b),
            ("bwd dB *= s", 0, 2 * N * r * b)]
    return [
        ("fwd W_eff = c M⊙W + s BA", g(N, r, K), (2 * N * K + N * r + r * K) * b),
        ("fwd y = x W_effᵀ + b", g(T, K, N), (T * K + N * K + T * N + N) * b),
        ("fwd S = x Aᵀ (for dB)", g(T, K, r), (T * K + r * K + T * r) * b),
        ("bwd dyb = G B", g(T, N, r), (T * N + N * r + T * r) * b),
        ("bwd W_eff (again)", g(N, r, K), (2 * N * K + N * r + r * K) * b),
        ("bwd dX = G W_eff", g(T, N, K), (T * N + N * K + T * K) * b),
        ("bwd dA = dybᵀ x", g(r, T, K), (T * r + T * K + r * K) * b),
        ("bwd dA *= s", 0, 2 * r * K * b),
        ("bwd dB = Gᵀ S", g(N, T, r), (T * N + T * r + N * r) * b),
        ("bwd dB *= s", 0, 2 * N * r * b)]


def peft_ops(K: int, N: int, T: int, r: int, b: int = 2, lora_p: bool = True) -> List[Op]:
    g = lambda m, k, n: 2.0 * m * k * n  # noqa: E731
    ops = [("fwd y = x Wᵀ + b", g(T, K, N), (T * K + N * K + T * N + N) * b)]
    if lora_p:
        ops.append(("fwd x̃ = dropout(x) (+ mask)", 0, 2 * T * K * b + T * K))
    ops += [("fwd S = x̃ Aᵀ", g(T, K, r), (T * K + r * K + T * r) * b),
            ("fwd U = S Bᵀ", g(T, r, N), (T * r + N * r + T * N) * b),
            ("fwd U *= s", 0, 2 * T * N * b),
            ("fwd y + U", 0, 3 * T * N * b),
            ("bwd dU = s G", 0, 2 * T * N * b),
            ("bwd dB = dUᵀ S", g(N, T, r), (T * N + T * r + N * r) * b),
            ("bwd dS = dU B", g(T, N, r), (T * N + N * r + T * r) * b),
            ("bwd dA = dSᵀ x̃", g(r, T, K), (T * r + T * K + r * K) * b),
            ("bwd dX̃ = dS A", g(T, r, K), (T * r + r * K + T * K) * b)]
    if lora_p:
        ops.append(("bwd dropout backward (mask)", 0, 2 * T * K * b + T * K))
    ops += [("bwd dX = G W", g(T, N, K), (T * N + N * K + T * K) * b),
            ("bwd dX += dX̃", 0, 3 * T * K * b)]
    return ops


def roofline(ops: List[Op], bw: float, peak: float) -> float:
    return sum(max(f / peak, by / bw) for _, f, by in ops)


def summarise(lora_p: bool = True) -> List[Dict]:
    rows = []
    for name, K, N, T, r in CASES:
        base = [o for o in peft_ops(K, N, T, r, lora_p=False) if o[0] in
                ("fwd y = x Wᵀ + b", "bwd dX = G W")]
        variants = {"RoRA fused": rora_ops(K, N, T, r, lora_p=lora_p),
                    "PEFT LoRA": peft_ops(K, N, T, r, lora_p=lora_p),
                    "base GEMMs only": base}
        row = {"case": name, "in": K, "out": N, "tokens": T, "rank": r, "lora_dropout": lora_p,
               "variants": {}}
        for v, ops in variants.items():
            row["variants"][v] = {
                "launches": len(ops), "GFLOP": round(sum(o[1] for o in ops) / 1e9, 2),
                "MB": round(sum(o[2] for o in ops) / 1e6, 1),
                **{f"us_{gpu}": round(roofline(ops, bw, pk) * 1e6, 1)
                   for gpu, (bw, pk) in GPUS.items()}}
        ro, pe = row["variants"]["RoRA fused"], row["variants"]["PEFT LoRA"]
        row["rora_over_peft"] = {gpu: round(ro[f"us_{gpu}"] / pe[f"us_{gpu}"], 3) for gpu in GPUS}
        extra = [o for o in rora_ops(K, N, T, r, lora_p=lora_p) if "mask W" in o[0] or "W_eff" in o[0]]
        row["rora_weight_passes_MB"] = round(sum(o[2] for o in extra) / 1e6, 1)
        rows.append(row)
    return rows


def markdown(rows: List[Dict]) -> str:
    gpus = list(GPUS)
    lines = ["| layer | LoRA dropout | variant | launches | launches x 4 µs | GFLOP | MB moved | "
             + " | ".join(f"roofline µs {g}" for g in gpus) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(gpus)]
    for row in rows:
        for v, st in row["variants"].items():
            lines.append(f"| {row['case']} | {0.1 if row['lora_dropout'] else 0} | {v} | "
                         f"{st['launches']} | {st['launches'] * LAUNCH_US:g} | {st['GFLOP']} | {st['MB']} | "
                         + " | ".join(str(st[f'us_{g}']) for g in gpus) + " |")
        lines.append(f"| | | RoRA / PEFT | | | | | "
                     + " | ".join(f"{row['rora_over_peft'][g]}x" for g in gpus) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--md", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = summarise(True) + summarise(False)
    md = markdown(rows)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpus": {g: {"bytes_per_s": bw, "flops": pk} for g, (bw, pk) in GPUS.items()},
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
