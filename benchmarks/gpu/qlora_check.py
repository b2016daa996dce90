"""GPU check of RoRA on 4-bit bitsandbytes bases (issue 13).

    python benchmarks/gpu/qlora_check.py --out-dir benchmarks/results [--reps 20]
    python benchmarks/gpu/qlora_check.py --cpu-smoke      # tiny shapes on the CPU (script test)

Three measurements, written to ``<out-dir>/<date>-<device>-qlora-check.json`` and ``.md``:

1. one layer's forward + backward at LLaMA-7B shapes (NF4 with double quantization,
   bf16 compute, 4096 tokens, r = 16): PEFT's QLoRA layer (``lora_dropout`` 0.1) vs
   ``QuantRoraLinear`` (p = 0.1, λ = 10), by default and with the one-pass dequantize+mask
   kernel (``RORA_FAST_NF4_KERNEL=1``). Target: RoRA-NF4 ≤ 1.05 x PEFT QLoRA.
2. the dequantize + mask kernel (``rora_fast.kernels.nf4``, p = 0.1, bf16 out) vs
   bitsandbytes' ``dequantize_4bit`` alone (bf16 out), same weights; target ≤ 1.5 x.
   It also checks the kernel against bitsandbytes' dequantize + the reference mask.
3. memory: a LLaMA-7B-shaped model with ``--layers`` blocks, linears quantized to NF4,
   RoRA on q/v, two AdamW steps at batch x seq: ``torch.cuda.max_memory_allocated``
   against ``rora_fast.memory.plan_memory(..., base_dtype="nf4").peak``.

Only figures this script wrote may be quoted. Exits 0 with one line when there is no
CUDA device (unless --cpu-smoke).
"""

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time

import torch

from rora_fast.atomic import write_json


def _timer(fn, reps, warmup, cuda):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _nf4_layer(out_f, in_f, dev, dtype):
    import bitsandbytes as bnb

    w = torch.randn(out_f, in_f, dtype=dtype) * in_f ** -0.5
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4",
                            compress_statistics=True, quant_storage=torch.uint8)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, blocksize=64)
    return lin.to(dev)


def layer_case(out_f, in_f, tokens, r, reps, dev, dtype):
    import copy

    from peft import LoraConfig
    from peft.tuners.lora import bnb as peft_bnb

    from rora_fast.quantized import QuantRoraLinear

    base = _nf4_layer(out_f, in_f, dev, dtype)
    x = torch.randn(tokens, in_f, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, out_f, device=dev, dtype=dtype)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1)
    peft_layer = peft_bnb.Linear4bit(copy.deepcopy(base), "default", config=cfg, r=r,
                                     lora_alpha=2 * r, lora_dropout=0.1).to(dev).train()
    rora = QuantRoraLinear.from_quantized(base, r=r, alpha=2 * r, weight_dropout=0.1,
                                          ortho_rank=32, ortho_lambda=10.0,
                                          svd_cache=None).train()
    out = {}
    for name, layer in (("peft_qlora", peft_layer), ("rora_nf4", rora),
                        ("rora_nf4_kernel", rora)):
        # rora_nf4_kernel: the masked weight from kernels/src/nf4.py (RORA_FAST_NF4_KERNEL=1)
        os.environ["RORA_FAST_NF4_KERNEL"] = "1" if name.endswith("_kernel") else "0"

        def step(layer=layer):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(g)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        out[f"{name}_ms"] = _timer(step, reps, 3, dev == "cuda")
        if dev == "cuda":
            out[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated()
    os.environ.pop("RORA_FAST_NF4_KERNEL", None)
    out["ratio"] = out["rora_nf4_ms"] / out["peft_qlora_ms"]
    out["ratio_kernel"] = out["rora_nf4_kernel_ms"] / out["peft_qlora_ms"]
    return out


def kernel_case(out_f, in_f, reps, dev, dtype):
    import bitsandbytes.functional as bF

    from rora_fast import reference as ref
    from rora_fast.kernels.nf4 import dequantize_4bit_masked

    lin = _nf4_layer(out_f, in_f, dev, dtype)
    p4 = lin.weight
    qs = p4.quant_state
    kw = dict(packed=p4.data, code=qs.code, absmax=qs.absmax, blocksize=qs.blocksize,
              shape=tuple(qs.shape), nested_code=qs.state2.code,
              nested_absmax=qs.state2.absmax, nested_blocksize=qs.state2.blocksize,
              offset=qs.offset)
    W = bF.dequantize_4bit(p4.data, qs).to(dtype)
    seed = 1234
    fused = dequantize_4bit_masked(**kw, seed=seed, p=0.1, out_dtype=dtype)
    exact = bool(torch.equal(fused, ref.masked_weight(W, seed, 0.1)))
    plain = dequantize_4bit_masked(**kw, p=0.0, out_dtype=dtype)
    exact_plain = bool(torch.equal(plain, W))
    t_bnb = _timer(lambda: bF.dequantize_4bit(p4.data, qs), reps, 3, dev == "cuda")
    t_fused = _timer(lambda: dequantize_4bit_masked(**kw, seed=seed, p=0.1, out_dtype=dtype),
                     reps, 3, dev == "cuda")
    t_plain = _timer(lambda: dequantize_4bit_masked(**kw, p=0.0, out_dtype=dtype),
                     reps, 3, dev == "cuda")
    return {"bnb_dequantize_ms": t_bnb, "dequant_mask_kernel_ms": t_fused,
            "dequant_kernel_p0_ms": t_plain, "ratio": t_fused / t_bnb,
            "kernel_equals_bnb_dequant_plus_reference_mask": exact,
            "kernel_p0_equals_bnb_dequant": exact_plain}


def memory_case(layers, batch, seq):
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    import rora_fast
    from memory_check import cleanup, measure  # (benchmarks/gpu, the script's folder)
    from rora_fast.memory import PRESETS, ModelShape, plan_memory

    h, f, L, a, kv, V, tied = PRESETS["llama-7b"]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=layers,
                      num_attention_heads=a, num_key_value_heads=kv, vocab_size=V,
                      tie_word_embeddings=tied, attn_implementation="sdpa")
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for blk in model.model.layers:  # quantize the block linears to NF4 (double quant)
        for parent in (blk.self_attn, blk.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4",
                                          compress_statistics=True)
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False,
                                                 quant_type="nf4", compress_statistics=True,
                                                 blocksize=64)
                    setattr(parent, name, q)
    model = model.to("cuda")
    rora_fast.apply_rora(model, rora_fast.RoraConfig(target_modules=["q_proj", "v_proj"],
                                                     svd_method="randomized"))
    cleanup()
    peak = measure(model, batch, seq, True, V, ckpt_kwargs={"use_reentrant": False})
    shape = ModelShape(h, f, layers, a, kv, V, tied)
    plan = plan_memory(shape, batch=batch, seq=seq, checkpointing=True, base_dtype="nf4")
    return {"layers": layers, "batch": batch, "seq": seq, "measured_peak_bytes": peak,
            "predicted_peak_bytes": plan.peak, "measured_over_predicted": peak / plan.peak}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4, help="blocks of the memory case")
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.cpu_smoke
    if not cuda and not a.cpu_smoke:
        print("qlora_check: no CUDA device; skipped (the CPU checks are tests/test_quantized.py)")
        return 0
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("qlora_check: bitsandbytes is not installed (pip install 'rora-fast[quant]'); "
              "skipped")
        return 0
    dev = "cuda" if cuda else "cpu"
    if a.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        shapes = {"smoke": (64, 128)}
        tokens, reps, dtype = 64, 2, torch.float32
    else:
        shapes = {"q_proj 4096x4096": (4096, 4096), "up_proj 11008x4096": (11008, 4096),
                  "down_proj 4096x11008": (4096, 11008)}
        tokens, reps, dtype = a.tokens, a.reps, torch.bfloat16
    name = "cpu-smoke" if a.cpu_smoke else re.sub(
        r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    stamp = f"{datetime.date.today().isoformat()}-{name}-qlora-check"
    res = {"device": name, "torch": torch.__version__, "dtype": str(dtype), "tokens": tokens,
           "r": a.r, "reps": reps, "layer": {}, "kernel": {}}
    import bitsandbytes as bnb

    res["bitsandbytes"] = bnb.__version__
    for label, (o, i) in shapes.items():
        torch.manual_seed(0)
        res["layer"][label] = layer_case(o, i, tokens, a.r, reps, dev, dtype)
        res["kernel"][label] = kernel_case(o, i, reps, dev, dtype)
        print(label, json.dumps({"layer": res["layer"][label], "kernel": res["kernel"][label]}),
              flush=True)
    if cuda:
        try:
            res["memory"] = memory_case(a.layers, 4, 512)
        except Exception as e:  # noqa: BLE001 - report, keep the other results
            res["memory"] = {"error": f"{type(e).__name__}: {e}"}
        print("memory", json.dumps(res["memory"]), flush=True)
    write_json(os.path.join(a.out_dir, stamp + ".json"), res)
    md = [f"# RoRA on NF4 bases: {name} ({res['dtype']}, {tokens} tokens, r={a.r}, "
          f"median of {reps})", "",
          "| shape | PEFT QLoRA ms | RoRA-NF4 ms | ratio (target ≤ 1.05) | RoRA-NF4 + kernel ms "
          "| ratio | bnb dequant ms | dequant+mask kernel ms | ratio (target ≤ 1.5) | "
          "kernel exact |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label in shapes:
        L, K = res["layer"][label], res["kernel"][label]
        md.append(f"| {label} | {L['peft_qlora_ms']:.3f} | {L['rora_nf4_ms']:.3f} | "
                  f"{L['ratio']:.3f} | {L['rora_nf4_kernel_ms']:.3f} | {L['ratio_kernel']:.3f} | "
                  f"{K['bnb_dequantize_ms']:.3f} | "
                  f"{K['dequant_mask_kernel_ms']:.3f} | {K['ratio']:.3f} | "
                  f"{K['kernel_equals_bnb_dequant_plus_reference_mask']} |")
    if "memory" in res:
        m = res["memory"]
        md += ["", "memory (LLaMA-7B shapes, NF4, q/v, checkpointing): " + (
            m["error"] if "error" in m else
            f"{m['layers']} blocks, batch {m['batch']} x {m['seq']}: measured "
            f"{m['measured_peak_bytes'] / 2**30:.2f} GiB, predicted "
            f"{m['predicted_peak_bytes'] / 2**30:.2f} GiB, "
            f"ratio {m['measured_over_predicted']:.3f}")]
    with open(os.path.join(a.out_dir, stamp + ".md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
