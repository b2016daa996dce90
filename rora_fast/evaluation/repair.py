"""A trigger-agnostic repair of the bias that the spectral rescaling can introduce.

After rescaling, the classifier may lean toward one label (at some seeds RoRA's rescaled
model predicts the target for a third of the non-target rows *without* any trigger, the
ASR floor). The repair uses clean labelled data only, the same clean dev split the
defender already uses for checkpoint selection, and never sees a trigger:

:func:`recalibrate_head_bias_` re-fits **only the bias of the classification head**, the
encoder and the head's weights frozen, by maximum likelihood (cross-entropy) on the clean
dev rows. The fit is convex in the bias and runs on the dev logits computed once (one
forward pass over the dev rows). At the optimum the gradient ``mean(softmax − onehot)``
is zero, i.e. the model's mean predicted probability of each class equals that class's
frequency in the dev labels: the prediction frequencies are recalibrated to the label
frequencies. A shift of the bias moves every row's logit margin by the same amount, so
the repair can only undo a *global* lean; it cannot remove a trigger-specific effect.

Opt-in: ``rora-fast defend --repair`` (applied after the rescaling),
``rora-fast seeds --methods ...,rora+repair`` (post-hoc, from saved adapters). The
defaults stay the paper's method.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["classification_head", "collect_logits", "fit_bias_shift", "recalibrate_head_bias_"]


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
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: List[Optional[torch.Tensor]] = [None] * len(texts)
    for a in range(0, len(order), batch_size):
        idx = order[a:a + batch_size]
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
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


def recalibrate_head_bias_(model, tokenizer, dev_rows, max_length: int) -> Dict:
    """Re-fit only the classification head's bias on clean dev rows (``Example``s with
    ``.text`` and ``.label``), in place. Returns what was done (the shift, dev accuracy and
    the share of dev rows predicted as each class before and after, the label shares)."""
    head = classification_head(model)
    if head.bias is None:
        raise ValueError("the classification head has no bias to recalibrate")
    texts = [e.text for e in dev_rows]
    labels = [int(e.label) for e in dev_rows]
    z = collect_logits(model, tokenizer, texts, max_length)
    d = fit_bias_shift(z, labels)
    with torch.no_grad():
        head.bias.add_(d.to(head.bias.dtype).to(head.bias.device))
    K = z.shape[1]
    y = torch.tensor(labels)

    def shares(pred):
        return [round(100.0 * float((pred == k).double().mean()), 2) for k in range(K)]

    before, after = z.argmax(1), (z + d).argmax(1)
    return {"method": "head-bias refit (max. likelihood on clean dev rows; encoder and head "
                      "weights frozen)",
            "n_dev": len(labels), "bias_shift": [round(float(x), 5) for x in d],
            "dev_acc_before": round(100.0 * float((before == y).double().mean()), 2),
            "dev_acc_after": round(100.0 * float((after == y).double().mean()), 2),
            "dev_pred_share_before": shares(before), "dev_pred_share_after": shares(after),
            "dev_label_share": shares(y)}
