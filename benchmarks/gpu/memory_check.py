"""GPU check of rora_fast.memory's predictions against torch.cuda.max_memory_allocated.

    python benchmarks/gpu/memory_check.py [--model llama-7b] [--layers 32] [--out DIR]

Builds a randomly initialised LLaMA from its config directly on the GPU in bf16 (no
download), applies RoRA (q_proj, v_proj; r 8, k 32, p 0.1, λ 10), and for each
(batch, seq, checkpointing) runs two AdamW steps, measuring the peak allocated memory
against ``plan_memory(...).peak``. Then it caps the process with
``torch.cuda.set_per_process_memory_fraction`` to emulate 16 and 24 GB GPUs and checks
that what the model says fits runs and what it says does not fit runs out of memory.
Prints a Markdown table; with --out also writes memory_check.json there.
Exits 0 with one line when there is no CUDA device.
"""

import argparse
import gc
import os
import sys
import time

import torch


def _one_line_exit(msg):
    print(msg)
    raise SystemExit(0)


def build(model_name, layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    import rora_fast
    from rora_fast.memory import PRESETS

    h, f, L, a, kv, V, tied = PRESETS[model_name]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=layers or L,
                      num_attention_heads=a, num_key_value_heads=kv, vocab_size=V,
                      tie_word_embeddings=tied, attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    rora_fast.apply_rora(model, rora_fast.RoraConfig(target_modules=["q_proj", "v_proj"]))
    return model, cfg


def measure(model, batch, seq, ckpt, vocab, steps=2, ckpt_kwargs=None):
    """Peak ``torch.cuda.max_memory_allocated`` over ``steps`` AdamW steps of a causal LM
    on random ids (``ckpt``: activation checkpointing, with ``ckpt_kwargs`` for
    transformers' ``gradient_checkpointing_enable``). Also used by qlora_check.py."""
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    else:
        model.gradient_checkpointing_disable()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del opt, loss, ids
    return peak


def cleanup():
    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--layers", type=int, default=None,
                    help="fewer blocks than the preset (faster; the plan uses the same)")
    ap.add_argument("--configs", default="1x512:1,1x2048:1,4x512:1,1x512:0,2x512:0",
                    help="batch x seq : checkpointing(1/0), comma separated")
    ap.add_argument("--caps", default="16,24", help="GB caps to emulate")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        _one_line_exit("memory_check: no CUDA device; skipped (the CPU checks are in "
                       "tests/test_memory.py)")

    os.environ.setdefault("RORA_FAST_CACHE", "0")
    from rora_fast.memory import GiB, ModelShape, PRESETS, plan_memory

    try:
        from rora_fast import kernels  # noqa: F401
        backend = "triton"
    except Exception:
        backend = "reference"
    t0 = time.time()
    model, cfg = build(a.model, a.layers)
    shape = ModelShape(*PRESETS[a.model])
    shape.layers = cfg.num_hidden_layers
    total = torch.cuda.get_device_properties(0).total_memory
    print(f"# memory_check: {a.model} ({shape.layers} blocks), {torch.cuda.get_device_name(0)}, "
          f"backend {backend}, built in {time.time() - t0:.0f}s\n")
    results = []
    print("| batch x seq | ckpt | predicted GiB | measured GiB | measured/predicted |")
    print("|---|---|---|---|---|")
    for item in a.configs.split(","):
        bs, ck = item.split(":")
        b, s = (int(v) for v in bs.split("x"))
        ck = ck == "1"
        plan = plan_memory(shape, batch=b, seq=s, checkpointing=ck, backend=backend)
        try:
            peak = measure(model, b, s, ck, cfg.vocab_size)
        except torch.OutOfMemoryError:
            peak = float("nan")
        cleanup()
        r = {"batch": b, "seq": s, "ckpt": ck, "predicted": plan.peak, "measured": peak,
             "ratio": peak / plan.peak}
        results.append(r)
        print(f"| {b}x{s} | {'yes' if ck else 'no'} | {plan.peak / GiB:.2f} | "
              f"{peak / GiB:.2f} | {r['ratio']:.3f} |", flush=True)

    # Emulated 16/24 GB GPUs: the predicted verdict against a capped run.
    caps = []
    if a.layers is None:
        print("\n| cap | batch x seq | ckpt | predicted total GiB | predicted | observed |")
        print("|---|---|---|---|---|---|")
        for cap in (float(c) for c in a.caps.split(",")):
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GiB / total))
            for b, s, ck in ((1, 512, True), (1, 2048, True), (4, 2048, True),
                             (1, 2048, False)):
                plan = plan_memory(shape, batch=b, seq=s, checkpointing=ck, backend=backend,
                                   overhead_gb=0.0)
                want = plan.peak <= cap * GiB
                try:
                    measure(model, b, s, ck, cfg.vocab_size, steps=1)
                    ok = True
                except torch.OutOfMemoryError:
                    ok = False
                cleanup()
                caps.append({"cap_gb": cap, "batch": b, "seq": s, "ckpt": ck,
                             "predicted_fits": want, "ran": ok})
                print(f"| {cap:.0f} GB | {b}x{s} | {'yes' if ck else 'no'} | "
                      f"{plan.peak / GiB:.2f} | {'fits' if want else 'OOM'} | "
                      f"{'ran' if ok else 'OOM'} |", flush=True)
        torch.cuda.set_per_process_memory_fraction(1.0)
    if a.out:
        from rora_fast.atomic import write_json

        write_json(os.path.join(a.out, "memory_check.json"),
                   {"model": a.model, "layers": shape.layers, "backend": backend,
                    "runs": results, "caps": caps})
    bad = [r for r in results if not (0.85 <= r["ratio"] <= 1.15)]
    print(f"\nmemory_check: {len(results) - len(bad)}/{len(results)} predictions within 15 %; "
          f"{sum(c['predicted_fits'] == c['ran'] for c in caps)}/{len(caps)} cap verdicts right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
