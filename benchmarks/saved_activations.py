"""Activation memory of the LoRA path: bytes per token that autograd keeps for backward
in one bf16 LLaMA block, RoRA vs PEFT LoRA, with and without LoRA input dropout.

Counted with :func:`rora_fast.memory.llama_block_saved_bytes_per_token` (every tensor saved for
backward, each storage once; parameters, buffers and the block's input excluded), on
any device; random weights (the bytes do not depend on them). Variants:

* ``rora``: ``apply_rora`` (the LoRA dropout drawn inside the op from the call's seed,
  ``x̃`` regenerated in backward);
* ``rora-given-x_lora``: the same layers with their dropout replaced by a module the op
  does not draw itself (a subclass of ``nn.Dropout``), so ``x̃`` is passed in and kept:
  what RoRA layers kept before the dropout moved into the op;
* ``lora``: PEFT LoRA (fp32 adapters, its default: the adapter input is cast to fp32).

Usage::

    python -m benchmarks.saved_activations [--hidden 128 512] [--out PREFIX]

writes ``PREFIX.json``, ``PREFIX.md`` and ``PREFIX.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from benchmarks import common


class _GivenDropout(nn.Dropout):
    """``nn.Dropout`` under another type: RoRA's training forward calls it like any
    module and passes its output to the op as ``x_lora``."""


def _config(hidden: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_attention_heads=max(1, hidden // 32),
                      num_key_value_heads=max(1, hidden // 64), num_hidden_layers=1,
                      vocab_size=300)
    cfg._attn_implementation = "sdpa"
    return cfg


def _model(cfg, variant: str, lora_dropout: float):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    targets = ["q_proj", "v_proj"]
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout,
                                                target_modules=targets)).get_base_model()
    import rora_fast

    rora_fast.apply_rora(model, rora_fast.RoraConfig(r=8, ortho_rank=8,
                                                     lora_dropout=lora_dropout,
                                                     target_modules=targets))
    if variant == "rora-given-x_lora" and lora_dropout:
        for _, layer in rora_fast.rora_layers(model):
            layer.lora_dropout = _GivenDropout(lora_dropout)
    return model


def bytes_per_token(cfg, variant: str, lora_dropout: float, batch=4, seq=128) -> float:
    from rora_fast.memory import llama_block_saved_bytes_per_token

    return llama_block_saved_bytes_per_token(_model(cfg, variant, lora_dropout), batch, seq)


VARIANTS = ("rora", "rora-given-x_lora", "lora")
DROPOUTS = (0.0, 0.1)


def run(hiddens) -> dict:
    rows = []
    for h in hiddens:
        cfg = _config(h)
        for v in VARIANTS:
            for d in DROPOUTS:
                b = bytes_per_token(cfg, v, d)
                rows.append(dict(hidden=h, variant=v, lora_dropout=d, bytes_per_token=b,
                                 bytes_per_hidden_unit=b / h))
    return dict(case="one bf16 LLaMA block, q_proj and v_proj adapted, r 8, batch 4 x 128 "
                     "tokens; bytes autograd saves for backward per token",
                torch=torch.__version__, git=common.git_state(), rows=rows)


def to_markdown(res: dict) -> str:
    lines = [f"Saved for backward per token: {res['case']}.", "",
             "| hidden | variant | LoRA dropout 0 | LoRA dropout 0.1 | dropout adds |",
             "|---|---|---|---|---|"]
    by = {(r["hidden"], r["variant"], r["lora_dropout"]): r["bytes_per_token"]
          for r in res["rows"]}
    for h in sorted({r["hidden"] for r in res["rows"]}):
        for v in VARIANTS:
            a, b = by[(h, v, 0.0)], by[(h, v, 0.1)]
            lines.append(f"| {h} | {v} | {a:,.0f} B | {b:,.0f} B | {(b - a) / h:.1f} B × hidden |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hiddens = sorted({r["hidden"] for r in res["rows"]})
    fig, axes = plt.subplots(1, len(hiddens), figsize=(5 * len(hiddens), 3.6), squeeze=False)
    by = {(r["hidden"], r["variant"], r["lora_dropout"]): r["bytes_per_hidden_unit"]
          for r in res["rows"]}
    for ax, h in zip(axes[0], hiddens):
        for i, d in enumerate(DROPOUTS):
            ax.bar([j + 0.38 * i for j in range(len(VARIANTS))],
                   [by[(h, v, d)] for v in VARIANTS], width=0.38, label=f"LoRA dropout {d}")
        ax.set_xticks([j + 0.19 for j in range(len(VARIANTS))], VARIANTS, fontsize=8)
        ax.set_ylabel("bytes saved per token / hidden")
        ax.set_title(f"bf16 LLaMA block, hidden {h}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--out", default=None, help="write PREFIX.json, .md and .png")
    args = ap.parse_args(argv)
    res = run(args.hidden)
    md = to_markdown(res)
    print(md)
    if args.out:
        from rora_fast.atomic import atomic_write_file, write_text

        prefix = Path(args.out)
        write_text(prefix.with_suffix(".json"), json.dumps(res, indent=1) + "\n")
        write_text(prefix.with_suffix(".md"), md)
        atomic_write_file(prefix.with_suffix(".png"), lambda tmp: plot(res, tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
