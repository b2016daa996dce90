"""A labelled row: the unit of data :func:`rora_fast.finetune` and the training loop
(:mod:`rora_fast.loop`) take. The datasets of the paper's experiment come with the
backdoor harness (``rora_harness.data``), not with the library."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

__all__ = ["Example"]


@dataclass(frozen=True)
class Example:
    """One labelled text (or sentence pair). Unpacks like a tuple: ``text, label = example``."""
    text: Union[str, Tuple[str, str]]
    label: int

    def __iter__(self):
        yield self.text
        yield self.label
