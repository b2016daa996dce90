"""Shared set-up of the LLaMA examples: the model (tiny random or a real checkpoint)
and a causal-LM dataset of real sentences from the shipped SST-2 train split."""

import torch

import rora_fast
from rora_harness.data import load_dataset
from tiny import ByteLMDataset, tiny_llama_config  # examples/tiny.py


def add_common_args(ap, name: str):
    """The options every example shares; ``name`` picks its default output folder,
    ``runs/examples/<name>`` (``runs/`` is git-ignored)."""
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random LLaMA with a byte vocabulary: runs on a CPU in seconds")
    ap.add_argument("--model", default=None,
                    help="path (or hub name, if cached) of a LLaMA causal-LM checkpoint")
    ap.add_argument("--n-train", type=int, default=None, help="training sentences")
    ap.add_argument("--seq", type=int, default=None, help="max sequence length")
    ap.add_argument("--batch-size", type=int, default=None, help="per-device batch")
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--weight-dropout", type=float, default=0.1)
    ap.add_argument("--ortho-rank", type=int, default=32)
    ap.add_argument("--ortho-lambda", type=float, default=10.0)
    ap.add_argument("--rescale-layers", type=int, default=3)
    ap.add_argument("--target-modules", default="q_proj,v_proj")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--output-dir", default=f"runs/examples/{name}",
                    help="where the adapter is saved (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)


def defaults(args):
    tiny = args.tiny
    for k, v in dict(n_train=32 if tiny else 2000, seq=32 if tiny else 256,
                     batch_size=4 if tiny else 4, max_steps=6 if tiny else 200,
                     lr=5e-3 if tiny else 2e-4).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not tiny and args.model is None:
        raise SystemExit("pass --tiny or --model PATH")
    if tiny:
        args.ortho_rank = min(args.ortho_rank, 16)
    return args


def rora_config(args):
    tm = args.target_modules
    return rora_fast.RoraConfig(
        r=args.r, alpha=args.alpha, weight_dropout=args.weight_dropout,
        ortho_rank=args.ortho_rank, ortho_lambda=args.ortho_lambda,
        rescale_layers=min(args.rescale_layers, 2) if args.tiny else args.rescale_layers,
        target_modules=tm if tm == "all-linear" else tm.split(","))


def build_model(args, dtype=None):
    """The model with RoRA applied."""
    if args.tiny:
        from transformers import LlamaForCausalLM

        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(tiny_llama_config())
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype or torch.bfloat16)
    rora_fast.apply_rora(model, rora_config(args), progress=not args.tiny)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model, **kwargs):
    """Activation (gradient) checkpointing of a transformers model: the masks replay in the
    recomputation. transformers 5 renamed ``gradient_checkpointing_enable`` (a
    FutureWarning on every call) to ``activation_checkpointing_enable``; older versions
    have only the first."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


class TokenizedLM(torch.utils.data.Dataset):
    def __init__(self, tokenizer, sentences, seq):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(sentences, max_length=seq, truncation=True, padding="max_length",
                        return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def build_dataset(args):
    sentences = [e.text for e in load_dataset("sst2_sentence", "train", limit=args.n_train,
                                              seed=args.seed)]
    if args.tiny:
        return ByteLMDataset(sentences, n=args.n_train, max_length=args.seq)
    from transformers import AutoTokenizer

    return TokenizedLM(AutoTokenizer.from_pretrained(args.model), sentences, args.seq)
