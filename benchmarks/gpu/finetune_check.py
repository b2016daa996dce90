"""GPU check of the user's door (issue 31): ``rora_fast.finetune`` on CUDA, as ``rora-fast
train`` runs it there (bf16 autocast, the fused Triton kernels), against the same run with
the torch reference backend, and the merged model written by ``save_finetuned`` against
the adapter model. A tiny random LLaMA for sequence classification (no pad token: the
eos pads) with a word-level tokenizer over the shipped SST-2 rows; no download, no
``datasets`` needed (rows passed in memory; the SST-2 rows from the harness,
``harness/`` on PYTHONPATH: run.sh puts it there).

    python benchmarks/gpu/finetune_check.py --out DIR            # CUDA
    python benchmarks/gpu/finetune_check.py --device cpu --out DIR  # the same steps on a CPU

Writes ``DIR/finetune-check.json``; exit status 1 if a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def build(path: str, rows) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast
    words = sorted({w for t, _ in rows for w in t.lower().split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(vocab), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=2, bos_token_id=1, pad_token_id=None, num_labels=2)).save_pretrained(path)
    tok.save_pretrained(path)


def run(path: str, rows, device: str, backend: str, out: str):
    """One finetune in a fresh process (the backend is chosen at import)."""
    env = dict(os.environ, RORA_FAST_BACKEND=backend)
    code = r"""
import json, sys, torch
import rora_fast
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path, device, out, rows = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).to(device)
cfg = rora_fast.FinetuneConfig(epochs=2, max_length=48, batch_size=16, ortho_rank=16,
                               repair=False, rescale_layers=2)
rep = rora_fast.finetune(model, tok, [tuple(r) for r in rows], None, cfg, progress=False)
state = {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
texts = [r[0] for r in rows[:16]]
enc = tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt").to(device)
model.eval()
with torch.no_grad():
    ref = model(**enc).logits.float().cpu()
rora_fast.save_finetuned(model, tok, out, rep)
merged = AutoModelForSequenceClassification.from_pretrained(out + "/model").to(device).eval()
with torch.no_grad():
    got = merged(**enc).logits.float().cpu()
from safetensors.torch import save_file
save_file({**{"state." + n: t.contiguous() for n, t in state.items()}, "ref": ref},
          out + "/state.safetensors")
print(json.dumps({"loss_first": rep["train_log"]["loss_first"],
                  "loss_last": rep["train_log"]["loss_last"],
                  "val": rep["validation_accuracy"], "train_s": rep["train_seconds"],
                  "peak_memory_mb": rep["peak_memory_mb"],
                  "merged_max_abs_diff": float((got - ref).abs().max()),
                  "amp": str(device == "cuda")}))
"""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code, path, device, out, json.dumps(rows)],
                       env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"finetune ({backend}) failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(time.time() - t0, 1)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=256)
    args = ap.parse_args(argv)
    import torch
    from rora_harness.data import load_dataset
    rows = [(e.text.lower(), e.label) for e in load_dataset("sst2_sentence", "train",
                                                            limit=args.rows, seed=0)]
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="rora_finetune_check_")
    build(os.path.join(work, "model"), rows)
    runs = {}
    for backend in ("auto", "reference"):
        runs[backend] = run(os.path.join(work, "model"), rows, args.device, backend,
                            os.path.join(work, backend))
    from safetensors.torch import load_file
    a = load_file(os.path.join(work, "auto", "state.safetensors"))
    b = load_file(os.path.join(work, "reference", "state.safetensors"))
    adapter_diff = max(float((a[n] - b[n]).abs().max()) for n in a if n.startswith("state."))
    logits_diff = float((a["ref"] - b["ref"]).abs().max())
    checks = {
        "trained (loss fell)": runs["auto"]["loss_last"] < runs["auto"]["loss_first"],
        "merged model = adapter model": runs["auto"]["merged_max_abs_diff"] < 2e-2,
        "fused = reference backend (logits)": logits_diff < 5e-2,
    }
    doc = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
           "torch": torch.__version__, "runs": runs, "adapter_max_abs_diff": adapter_diff,
           "logits_max_abs_diff_fused_vs_reference": logits_diff, "checks": checks}
    with open(os.path.join(args.out, "finetune-check.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
