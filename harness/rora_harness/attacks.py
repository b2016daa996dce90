"""Backdoor triggers (BadNet, InSent), clean-label poisoning and triggered test sets.

Definitions used everywhere in the harness:

* A trigger is inserted **once**, between two words (whitespace-split) at a position drawn
  uniformly from the positions where it survives tokenizer truncation: the last token of
  the trigger must lie before ``max_length - 1`` (the final ``[SEP]``/``</s>``).  The
  allowed positions are computed with the tokenizer itself (binary search on the token
  count of ``words[:i] + trigger``), so no trigger is silently cut (W2SDefense loses ~9 %
  of its IMDB triggers that way).  ``max_words`` optionally caps the position further
  (the probe recipe keeps IMDB triggers within the first 40 words).
* Clean-label poisoning: only training rows whose *true* label is the target label get
  the trigger; their labels are left unchanged.
* The triggered test set contains only samples whose true label is **not** the target,
  each with the trigger inserted; ASR is the share of them predicted as the target.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from rora_fast import Example

__all__ = [
    "ATTACKS", "Attack", "TriggerError", "get_attack", "max_trigger_position", "insert_trigger",
    "poison_clean_label", "triggered_test_set",
]

ATTACKS = {"badnet": "mn", "insent": "I watched this 3D movie"}


class TriggerError(ValueError):
    """The trigger cannot be placed in a text without being truncated away."""


@dataclass(frozen=True)
class Attack:
    name: str
    trigger: str
    target_label: int = 0


def get_attack(name: str, trigger: Optional[str] = None, target_label: int = 0) -> Attack:
    """``name`` is ``badnet`` (rare token, default "mn") or ``insent`` (sentence, default
    "I watched this 3D movie"); ``trigger`` overrides the text."""
    key = name.lower()
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    trig = ATTACKS[key] if trigger is None else trigger
    if not trig or not trig.strip():
        raise ValueError("the trigger text is empty")
    return Attack(key, " ".join(trig.split()), int(target_label))


def _n_tokens(tokenizer, text: str) -> int:
    """Token count of ``text`` with special tokens, without truncation."""
    return len(tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])


def _trailing_special(tokenizer) -> int:
    """Number of special tokens that follow the text (1 for BERT/RoBERTa, 0 for LLaMA)."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    # position of the plain tokens inside the special-token version
    for start in range(len(with_sp) - len(without) + 1):
        if with_sp[start:start + len(without)] == without:
            return len(with_sp) - start - len(without)
    return tokenizer.num_special_tokens_to_add(pair=False)


def max_trigger_position(words: Sequence[str], trigger: str, tokenizer=None,
                         max_length: Optional[int] = None, max_words: Optional[int] = None) -> int:
    """Largest word index ``i`` such that ``words[:i] + [trigger] + words[i:]`` keeps the
    whole trigger inside the first ``max_length`` tokens.  Raises :class:`TriggerError` when
    not even position 0 works (trigger longer than the model's input)."""
    hi = len(words)
    if max_words is not None:
        hi = min(hi, max(0, int(max_words)))
    if tokenizer is None or max_length is None:
        return hi
    trailing = _trailing_special(tokenizer)
    budget = int(max_length) - trailing

    def fits(i: int) -> bool:
        # the trigger ends where the prefix "words[:i] trigger" ends; trailing specials excluded
        prefix = " ".join(list(words[:i]) + [trigger])
        return _n_tokens(tokenizer, prefix) - trailing <= budget

    if not fits(0):
        raise TriggerError(
            f"trigger {trigger!r} needs {_n_tokens(tokenizer, trigger)} tokens with special tokens, "
            f"more than max_length={max_length}: the tokenizer cannot keep it; use a shorter "
            f"trigger or a larger --max-length")
    if fits(hi):
        return hi
    lo = 0  # fits(lo) is True, fits(hi) is False
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def insert_trigger(text: str, trigger: str, rng: random.Random, tokenizer=None,
                   max_length: Optional[int] = None, max_words: Optional[int] = None
                   ) -> Tuple[str, int]:
    """Insert ``trigger`` once at a random word position that survives truncation.
    Returns ``(new_text, word_position)``."""
    words = text.split()
    limit = max_trigger_position(words, trigger, tokenizer, max_length, max_words)
    pos = rng.randint(0, limit)
    return " ".join(words[:pos] + [trigger] + words[pos:]), pos


def poison_clean_label(examples: Sequence[Example], attack: Attack, n_poison: int,
                       seed: int, tokenizer=None, max_length: Optional[int] = None,
                       max_words: Optional[int] = None) -> Tuple[List[Example], List[int]]:
    """Clean-label poisoning: the first ``n_poison`` rows whose true label is the target
    get the trigger (labels unchanged).  Returns the new list and the poisoned indices."""
    rng = random.Random(seed)
    out, poisoned = [], []
    for i, ex in enumerate(examples):
        if ex.label == attack.target_label and len(poisoned) < n_poison:
            text, _ = insert_trigger(ex.text, attack.trigger, rng, tokenizer, max_length, max_words)
            out.append(Example(text, ex.label))
            poisoned.append(i)
        else:
            out.append(ex)
    return out, poisoned


def triggered_test_set(examples: Sequence[Example], attack: Attack, seed: int, tokenizer=None,
                       max_length: Optional[int] = None, max_words: Optional[int] = None
                       ) -> Tuple[List[Example], List[Example]]:
    """The samples whose true label is not the target, (clean, triggered), same order."""
    rng = random.Random(seed)
    clean = [ex for ex in examples if ex.label != attack.target_label]
    trig = [Example(insert_trigger(ex.text, attack.trigger, rng, tokenizer, max_length, max_words)[0],
                    ex.label) for ex in clean]
    return clean, trig
