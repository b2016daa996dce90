"""Metric definitions (all in percent).

* **CA** (clean accuracy): accuracy on the clean test set.
* **ASR** (attack success rate): over the test samples whose true label is *not* the
  target, with the trigger inserted, the share predicted as the target label.
* **ASR floor**: the same share on those same samples *without* the trigger, i.e. the
  model's error on them (for a binary task).  An ASR close to its floor means a weak
  classifier, not a backdoor; ASR far above it means the trigger is doing the work.
* **Δ** = CA − ASR (the paper's robustness margin).
"""
from __future__ import annotations

from typing import Dict, Sequence

__all__ = ["clean_accuracy", "attack_success_rate", "asr_floor", "backdoor_metrics"]


def _check(preds: Sequence[int], labels: Sequence[int]) -> None:
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if not len(preds):
        raise ValueError("no samples to score")


def clean_accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    _check(preds, labels)
    return 100.0 * sum(int(p) == int(y) for p, y in zip(preds, labels)) / len(labels)


def attack_success_rate(triggered_preds: Sequence[int], true_labels: Sequence[int],
                        target_label: int = 0) -> float:
    """Share of triggered non-target samples predicted as the target.  ``true_labels`` are
    checked: passing a target-label sample is an error (it would inflate ASR)."""
    _check(triggered_preds, true_labels)
    if any(int(y) == target_label for y in true_labels):
        raise ValueError("ASR is defined on samples whose true label is not the target; "
                         "a target-label sample was passed")
    return 100.0 * sum(int(p) == target_label for p in triggered_preds) / len(triggered_preds)


def asr_floor(clean_preds: Sequence[int], true_labels: Sequence[int], target_label: int = 0) -> float:
    """ASR computed on the same non-target samples without the trigger."""
    return attack_success_rate(clean_preds, true_labels, target_label)


def backdoor_metrics(clean_preds: Sequence[int], clean_labels: Sequence[int],
                     triggered_preds: Sequence[int], nontarget_clean_preds: Sequence[int],
                     nontarget_labels: Sequence[int], target_label: int = 0) -> Dict[str, float]:
    ca = clean_accuracy(clean_preds, clean_labels)
    asr = attack_success_rate(triggered_preds, nontarget_labels, target_label)
    floor = asr_floor(nontarget_clean_preds, nontarget_labels, target_label)
    return {"CA": round(ca, 2), "ASR": round(asr, 2), "delta": round(ca - asr, 2),
            "ASR_floor": round(floor, 2), "n_clean": len(clean_labels),
            "n_triggered": len(nontarget_labels)}
