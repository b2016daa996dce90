"""Fine-tune a LLaMA causal LM with RoRA on a 4-bit (NF4) or 8-bit bitsandbytes base:
QLoRA-style RoRA (needs ``pip install 'rora-fast[quant]'``).

    python examples/llama_qlora.py --tiny                       # CPU, well under a minute
    python examples/llama_qlora.py --tiny --quant int8 --target-modules all-linear
    python examples/llama_qlora.py --model /path/to/llama-2-13b --gradient-checkpointing \
        --batch-size 8 --grad-accum 2 --seq 512                 # one 24 GB GPU (docs/quantized.md)

The base is loaded quantized (``BitsAndBytesConfig``) and stays quantized: each RoRA layer
dequantizes its weight per call, applies the weight mask, and re-dequantizes in backward.
A plain training loop (the penalty gradient is added at each optimizer step), then the
spectral rescaling, ``save_rora`` and ``export_peft_adapter``. With ``--verify`` (on by
default with ``--tiny``) both saved adapters are reloaded onto a freshly quantized base and
their logits compared with the trained model's.

Everything is written under ``--output-dir`` (default ``runs/examples/llama_qlora``;
``runs/`` is git-ignored): ``tiny_base/`` (the random tiny checkpoint, ``--tiny`` only),
``rora_adapter/``, ``peft_adapter/`` and ``summary.json`` (also printed).
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import rora_fast  # noqa: E402
from tiny import tiny_llama_config  # noqa: E402

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quant_config(args):
    from transformers import BitsAndBytesConfig

    if args.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.quant,
                              bnb_4bit_use_double_quant=args.double_quant,
                              bnb_4bit_compute_dtype=_DTYPES[args.compute_dtype])


def load_quantized(args, path):
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available() and not args.tiny
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant_config(args), dtype=_DTYPES[args.compute_dtype],
        device_map={"": 0} if cuda else "cpu")


def state_bytes(model) -> int:
    """Parameters + buffers + bitsandbytes quant-state tensors, each counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        qs = getattr(t, "quant_state", None)
        extra = [qs.absmax, qs.code, qs.offset, getattr(qs.state2, "absmax", None),
                 getattr(qs.state2, "code", None)] if qs is not None else []
        scb = getattr(t, "SCB", None)
        for x in [t, *extra, scb if isinstance(scb, torch.Tensor) else None]:
            if x is not None and id(x) not in seen:
                seen.add(id(x))
                total += x.numel() * x.element_size()
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap, "llama_qlora")
    ap.add_argument("--out", dest="output_dir", help="alias of --output-dir")
    ap.add_argument("--quant", choices=("nf4", "fp4", "int8"), default="nf4")
    ap.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                    help="4-bit without double quantization of the absmax blocks")
    ap.add_argument("--compute-dtype", choices=sorted(_DTYPES), default=None,
                    help="default: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                    help="reload both saved adapters and compare logits (default: --tiny)")
    args = common.defaults(ap.parse_args(argv))
    cuda = torch.cuda.is_available() and not args.tiny
    if args.compute_dtype is None:
        args.compute_dtype = "bf16" if cuda else "fp32"
    if args.verify is None:
        args.verify = args.tiny
    if not cuda:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.time()

    if args.tiny:  # a random tiny LLaMA, saved so that bitsandbytes quantizes it on load
        path = os.path.join(args.output_dir, "tiny_base")
        if not os.path.isdir(path):
            from transformers import LlamaForCausalLM

            torch.manual_seed(args.seed)
            LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4)).save_pretrained(path)
    else:
        path = args.model
    model = load_quantized(args, path)
    rora_fast.apply_rora(model, common.rora_config(args), progress=not args.tiny)
    if args.gradient_checkpointing:
        common.enable_checkpointing(model, use_reentrant=False)
    n_layers = sum(1 for _ in rora_fast.rora_layers(model))
    bytes_ = state_bytes(model)

    data = common.build_dataset(args)
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True,
                                         generator=g, drop_last=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    dev = next(p.device for p in params)
    model.train()
    torch.manual_seed(args.seed)
    log, step, micro = [], 0, 0
    while step < args.max_steps:
        for batch in loader:
            batch = {k: v.to(dev) for k, v in batch.items()}
            loss = model(**batch).loss / args.grad_accum
            loss.backward()
            micro += 1
            if micro % args.grad_accum:
                continue
            opt.step()  # adds λ∇Ω to the adapter gradients, then updates
            opt.zero_grad(set_to_none=True)
            step += 1
            log.append({"step": step, "loss": round(loss.item() * args.grad_accum, 4),
                        "rora_penalty": round(float(rora_fast.rora_penalty(model)), 4)})
            print(json.dumps(log[-1]), flush=True)
            if step >= args.max_steps:
                break

    model.eval()
    scales = rora_fast.spectral_rescale_(model)
    rora_dir = os.path.join(args.output_dir, "rora_adapter")
    peft_dir = os.path.join(args.output_dir, "peft_adapter")
    rora_fast.save_rora(model, rora_dir)
    rora_fast.export_peft_adapter(model, peft_dir)
    summary = {"quant": args.quant, "double_quant": args.double_quant,
               "compute_dtype": args.compute_dtype, "rora_layers": n_layers,
               "state_bytes": bytes_, "steps": step, "first_loss": log[0]["loss"],
               "last_loss": log[-1]["loss"], "rora_penalty": log[-1]["rora_penalty"],
               "rescaled": {k: round(v, 4) for k, v in scales.items()},
               "saved": rora_dir, "peft_export": peft_dir}
    if args.verify:
        import peft

        ids = next(iter(loader))["input_ids"][:2].to(dev)
        with torch.no_grad():
            ref = model(input_ids=ids).logits.float()
            again = rora_fast.load_rora(load_quantized(args, path), rora_dir).eval()
            d_rora = (again(input_ids=ids).logits.float() - ref).abs().max().item()
            del again
            pm = peft.PeftModel.from_pretrained(load_quantized(args, path), peft_dir).eval()
            d_peft = (pm(input_ids=ids).logits.float() - ref).abs().max().item()
            # PEFT's layer runs bitsandbytes' own forward (on the CPU: bf16 activations),
            # RoRA's multiplies by the dequantized weight: what that alone changes, on the
            # base model (a fresh RoRA model has B = 0)
            fresh = rora_fast.apply_rora(load_quantized(args, path),
                                         common.rora_config(args)).eval()
            with pm.disable_adapter():
                d_base = (pm(input_ids=ids).logits.float()
                          - fresh(input_ids=ids).logits.float()).abs().max().item()
        summary["reload_max_abs_diff"] = {"load_rora": d_rora, "peft_from_pretrained": d_peft,
                                          "bnb_forward_on_base": d_base}
    if cuda:
        summary["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    summary["seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
