"""A trigger-agnostic repair of the bias that the spectral rescaling can introduce.

After rescaling, the classifier may lean toward one label (at some seeds RoRA's rescaled
model predicts the target for a third of the non-target rows *without* any trigger, the
ASR floor). The repair uses clean labelled data only, the same clean dev split the
defender already uses for checkpoint selection, and never sees a trigger:

:func:`recalibrate_head_bias_` re-fits **only the bias of the classification head**, the
encoder and the head's weights frozen, on the logits of the clean dev rows (computed once,
one forward pass), so that the head's **prediction frequencies on the clean dev rows match
the label frequencies there** (``method="frequency"``, the default): for two classes the
shift of the logit margin that puts exactly ``round(share_k · n)`` dev rows on each side
(the midpoint between the two neighbouring margins), for more classes an iterative
adjustment of the per-class biases on the argmax counts. ``method="accuracy"`` (two
classes) shifts the margin to where the clean dev accuracy is highest. ``method="likelihood"`` instead
maximises the dev likelihood over the bias alone (convex; at the optimum the *mean
predicted probability* of each class equals its frequency), which is not the same: a model
whose confidence differs between the classes can then still over-predict one of them (met
on SST-2 seed 2, LoRA + rescaling: the likelihood fit moved the dev share of the target
from 52 % to 55 % against 49 % of labels).

A shift of the bias moves every row's logit margin by the same amount, so the repair can
only undo a *global* lean; it cannot remove a trigger-specific effect.

Where it is used: after the rescaling in ``rora-fast train`` / :func:`rora_fast.finetune`
and the harness presets ``small`` and ``demo`` (the best configuration measured, issue 29),
``rora-fast defend --repair``, ``rora-fast seeds --methods ...,rora+repair`` (post hoc,
from saved adapters). :class:`rora_fast.RoraConfig` stays the paper's method.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .loop import encode, text_length

__all__ = ["classification_head", "collect_logits", "fit_bias_shift", "frequency_bias_shift",
           "recalibrate_head_bias_", "REPAIR_METHODS"]

REPAIR_METHODS = ("frequency", "accuracy", "likelihood")


def classification_head(model) -> torch.nn.Linear:
    """The ``nn.Linear`` that produces the logits of a sequence classifier (plain
    transformers, rora_fast or PEFT-wrapped; BERT ``classifier``, LLaMA/GPT ``score``,
    RoBERTa ``classifier.out_proj``)."""
    base = model
    if hasattr(base, "get_base_model"):  # PEFT
        base = base.get_base_model()
    for attr in ("classifier", "score"):
        head = getattr(base, attr, None)
        if head is None:
            continue
        if hasattr(head, "modules_to_save"):  # PEFT ModulesToSaveWrapper: the trained copy
            head = head.modules_to_save[head.active_adapter if isinstance(
                getattr(head, "active_adapter", None), str) else "default"]
        if hasattr(head, "out_proj"):
            head = head.out_proj
        if isinstance(head, torch.nn.Linear):
            return head
    raise ValueError("cannot find the classification head (a Linear named classifier, score "
                     "or classifier.out_proj)")


@torch.no_grad()
def collect_logits(model, tokenizer, texts: Sequence[str], max_length: int,
                   batch_size: int = 64) -> torch.Tensor:
    """Float64 logits (N x K) in the order of ``texts`` (batched by length)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: text_length(texts[i]))
    out: List[Optional[torch.Tensor]] = [None] * len(texts)
    for a in range(0, len(order), batch_size):
        idx = order[a:a + batch_size]
        enc = encode(tokenizer, [texts[i] for i in idx], max_length, padding=True,
                     return_tensors="pt")
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits.double().cpu()
        for i, z in zip(idx, logits):
            out[i] = z
    model.train(was_training)
    return torch.stack(out)


def fit_bias_shift(logits: torch.Tensor, labels: Sequence[int], iters: int = 100) -> torch.Tensor:
    """The bias shift ``δ`` (K, mean zero) minimising the cross-entropy of ``logits + δ``
    against ``labels`` (Newton steps; the problem is convex). Every class must occur."""
    z = logits.detach().double()
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if z.dim() != 2 or z.shape[0] != y.shape[0] or z.shape[0] == 0:
        raise ValueError(f"need N x K logits and N labels, got {tuple(z.shape)} and {len(y)}")
    K = z.shape[1]
    counts = torch.bincount(y, minlength=K)
    if (counts == 0).any() or y.max() >= K or y.min() < 0:
        raise ValueError(f"every one of the {K} classes must occur in the labels "
                         f"(counts {counts.tolist()})")
    freq = counts.double() / len(y)

    def loss(d):
        return float(torch.nn.functional.cross_entropy(z + d, y))

    d = torch.zeros(K, dtype=torch.float64)
    eye = torch.eye(K, dtype=torch.float64)
    for _ in range(iters):
        p = torch.softmax(z + d, dim=1)
        g = p.mean(0) - freq                                    # gradient of the mean CE
        if float(g.abs().max()) < 1e-12:
            break
        H = torch.diag(p.mean(0)) - (p.T @ p) / len(y)          # Hessian (PSD, null space 1)
        H = H + torch.ones(K, K, dtype=torch.float64) / K + 1e-9 * eye  # fix the free mean
        step = torch.linalg.solve(H, g)
        if float(step.abs().max()) > 5.0:                       # saturated softmax: bounded
            step = step * (5.0 / float(step.abs().max()))
        t, f0 = 1.0, loss(d)
        while loss(d - t * step) > f0 and t > 1e-6:            # backtracking: never worse
            t /= 2
        d = d - t * step
        if float((t * step).abs().max()) < 1e-10:
            break
    return d - d.mean()


def frequency_bias_shift(logits: torch.Tensor, labels: Sequence[int],
                         iters: int = 500) -> torch.Tensor:
    """The bias shift ``δ`` (K, mean zero) after which the argmax of ``logits + δ`` predicts
    each class as often as it occurs in ``labels`` (two classes: exactly, up to ties)."""
    z = logits.detach().double()
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if z.dim() != 2 or z.shape[0] != y.shape[0] or z.shape[0] == 0:
        raise ValueError(f"need N x K logits and N labels, got {tuple(z.shape)} and {len(y)}")
    N, K = z.shape
    counts = torch.bincount(y, minlength=K)
    if (counts == 0).any() or y.max() >= K or y.min() < 0:
        raise ValueError(f"every one of the {K} classes must occur in the labels "
                         f"(counts {counts.tolist()})")
    d = torch.zeros(K, dtype=torch.float64)
    if K == 2:
        m = torch.sort(z[:, 1] - z[:, 0], descending=True).values  # class-1 margins
        k = int(counts[1])  # rows that should be predicted as class 1
        hi = m[k - 1] if k > 0 else m[0] + 1.0
        lo = m[k] if k < N else m[-1] - 1.0
        t = float((hi + lo) / 2)  # predict 1 where margin - t > 0
        d[1], d[0] = -t / 2, t / 2
        return d
    target = counts.double()
    step = 1.0
    for _ in range(iters):
        pred = torch.bincount((z + d).argmax(1), minlength=K).double()
        if torch.equal(pred, target):
            break
        d = d + step * torch.log((target + 0.5) / (pred + 0.5))
        d = d - d.mean()
        step *= 0.98
    return d - d.mean()


def accuracy_bias_shift(logits: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """Two classes: the bias shift ``δ`` (mean zero) that maximises the accuracy of the
    argmax of ``logits + δ`` on ``labels`` (a search over the midpoints between
    neighbouring margins; among equally accurate shifts, the smallest)."""
    z = logits.detach().double()
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if z.dim() != 2 or z.shape[1] != 2 or z.shape[0] != y.shape[0] or z.shape[0] == 0:
        raise ValueError(f"the accuracy repair needs N x 2 logits and N labels, got "
                         f"{tuple(z.shape)} and {len(y)}")
    m = z[:, 1] - z[:, 0]
    order = torch.argsort(m, descending=True)
    ms, ys = m[order], y[order]
    # predicting class 1 for the top k margins: correct = ones among top k + zeros after
    ones = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(ys.double(), 0)])
    zeros_after = (ys == 0).double().sum() - (torch.arange(len(ys) + 1, dtype=torch.float64)
                                              - ones)
    correct = ones + zeros_after
    ext = torch.cat([ms[:1] + 1.0, ms, ms[-1:] - 1.0])
    thresholds = (ext[:-1] + ext[1:]) / 2  # threshold t_k puts exactly the top k above it
    best = correct.max()
    cand = thresholds[correct == best]
    t = float(cand[torch.argmin(cand.abs())])
    return torch.tensor([t / 2, -t / 2], dtype=torch.float64)


def recalibrate_head_bias_(model, tokenizer, dev_rows, max_length: int,
                           method: str = "frequency") -> Dict:
    """Re-fit only the classification head's bias on clean dev rows (``Example``s with
    ``.text`` and ``.label``), in place: ``method="frequency"`` (default) matches the dev
    prediction frequencies to the dev label frequencies, ``"likelihood"`` maximises the dev
    likelihood over the bias. Returns what was done (the shift, dev accuracy and the share
    of dev rows predicted as each class before and after, the label shares)."""
    if method not in REPAIR_METHODS:
        raise ValueError(f"unknown repair method {method!r}; choose one of "
                         f"{', '.join(REPAIR_METHODS)}")
    head = classification_head(model)
    if head.bias is None:
        raise ValueError("the classification head has no bias to recalibrate")
    texts = [e.text for e in dev_rows]
    labels = [int(e.label) for e in dev_rows]
    z = collect_logits(model, tokenizer, texts, max_length)
    d = {"frequency": frequency_bias_shift, "accuracy": accuracy_bias_shift,
         "likelihood": fit_bias_shift}[method](z, labels)
    with torch.no_grad():
        head.bias.add_(d.to(head.bias.dtype).to(head.bias.device))
    K = z.shape[1]
    y = torch.tensor(labels)

    def shares(pred):
        return [round(100.0 * float((pred == k).double().mean()), 2) for k in range(K)]

    before, after = z.argmax(1), (z + d).argmax(1)
    return {"method": method,
            "description": {"frequency": "head bias shifted so that the clean dev prediction "
                                          "frequencies match the dev label frequencies",
                            "accuracy": "head bias shifted to the clean dev accuracy's maximum",
                            "likelihood": "head bias re-fitted by maximum likelihood on the "
                                          "clean dev rows"}[method]
            + "; encoder and head weights frozen",
            "n_dev": len(labels), "bias_shift": [round(float(x), 5) for x in d],
            "dev_acc_before": round(100.0 * float((before == y).double().mean()), 2),
            "dev_acc_after": round(100.0 * float((after == y).double().mean()), 2),
            "dev_pred_share_before": shares(before), "dev_pred_share_after": shares(after),
            "dev_label_share": shares(y)}
