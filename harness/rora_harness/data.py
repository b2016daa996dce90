"""Loader for the text-classification datasets shipped in ``rora_harness/datasets``.

Every dataset folder holds ``train.tsv``, ``dev.tsv`` and (except CoLA) ``test.tsv``:
UTF-8, header ``sentence<TAB>label``, one example per line, split at the single TAB,
no CSV quoting (see ``datasets/SOURCES.md``).

CoLA has no public test labels.  Like PSIM and most backdoor papers we use the public
dev set (1,043 rows) as the *test* split, and carve a clean *dev* split out of train:
a fixed ``random.Random(0)`` shuffle of train, whose first ``COLA_DEV_SIZE`` rows form
dev and the rest form train.  The carve-out does not depend on the run's seed, so
model selection data never changes between runs.

The "SST-2" of the paper (and of PSIM / HiddenKiller) is the sentence-level split
``sst2_sentence``; ``sst2`` is the GLUE phrase-level train set.
"""
from __future__ import annotations

import os
import random
import re
from typing import List, Optional, Sequence, Tuple

from rora_fast import Example

__all__ = [
    "DATASETS", "SPLITS", "COLA_DEV_SIZE", "Example", "load_dataset", "subsample",
    "dataset_dir", "strip_html",
]

DATASETS = ("sst2", "sst2_sentence", "imdb", "cr", "mr", "cola")
SPLITS = ("train", "dev", "test")
COLA_DEV_SIZE = 1000
_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets")
_BR = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)


def dataset_dir(name: str, root: Optional[str] = None) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return os.path.join(root or _ROOT, name)


def strip_html(text: str) -> str:
    """Replace IMDB's ``<br />`` tags by a space and collapse runs of spaces."""
    return re.sub(r" {2,}", " ", _BR.sub(" ", text)).strip()


def _read_tsv(path: str) -> List[Example]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path} is missing")
    out: List[Example] = []
    with open(path, encoding="utf-8", newline="\n") as f:
        header = f.readline().rstrip("\n")
        if header != "sentence\tlabel":
            raise ValueError(f"{path}: expected header 'sentence<TAB>label', got {header!r}")
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected exactly one TAB, found {len(parts) - 1}")
            try:
                label = int(parts[1])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: label {parts[1]!r} is not an integer") from None
            out.append(Example(parts[0], label))
    return out


def subsample(examples: Sequence[Example], n: Optional[int], seed: int = 0,
              stratified: bool = True) -> List[Example]:
    """Deterministic subset of ``n`` examples (all of them if ``n`` is None or too large).

    With ``stratified`` the class proportions are kept (rounded); the order of the result
    is a seeded shuffle.  The same (examples, n, seed) always gives the same subset.
    """
    examples = list(examples)
    if n is None or n >= len(examples):
        return examples
    if n <= 0:
        raise ValueError(f"subsample size must be positive, got {n}")
    rng = random.Random(seed)
    if not stratified:
        idx = sorted(rng.sample(range(len(examples)), n))
        out = [examples[i] for i in idx]
        rng.shuffle(out)
        return out
    by_label = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    labels = sorted(by_label)
    quotas = {lab: int(n * len(by_label[lab]) / len(examples)) for lab in labels}
    # hand out the remainder to the largest classes first
    rest = n - sum(quotas.values())
    for lab in sorted(labels, key=lambda l: -len(by_label[l]))[:rest]:
        quotas[lab] += 1
    idx = []
    for lab in labels:
        idx.extend(rng.sample(by_label[lab], quotas[lab]))
    idx.sort()
    out = [examples[i] for i in idx]
    rng.shuffle(out)
    return out


def load_dataset(name: str, split: str, *, limit: Optional[int] = None, seed: int = 0,
                 strip_br: Optional[bool] = None, root: Optional[str] = None) -> List[Example]:
    """Load ``split`` of dataset ``name`` as a list of :class:`Example` (text, label).

    ``limit``: deterministic stratified subset of that many rows (by ``seed``).
    ``strip_br``: remove HTML ``<br />`` tags (default: True for IMDB, no-op elsewhere).
    CoLA: ``test`` is the public dev set, ``dev`` a fixed 1,000-row carve-out of train and
    ``train`` the remaining 7,551 rows (see the module docstring).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    folder = dataset_dir(name, root)
    if name == "cola":
        if split == "test":
            rows = _read_tsv(os.path.join(folder, "dev.tsv"))
        else:
            train = _read_tsv(os.path.join(folder, "train.tsv"))
            order = list(range(len(train)))
            random.Random(0).shuffle(order)
            keep = order[:COLA_DEV_SIZE] if split == "dev" else order[COLA_DEV_SIZE:]
            rows = [train[i] for i in sorted(keep)]
    else:
        rows = _read_tsv(os.path.join(folder, f"{split}.tsv"))
    if strip_br is None:
        strip_br = name == "imdb"
    if strip_br:
        rows = [Example(strip_html(ex.text), ex.label) for ex in rows]
    return subsample(rows, limit, seed=seed)


def as_pairs(examples: Sequence[Example]) -> List[Tuple[str, int]]:
    return [(ex.text, ex.label) for ex in examples]
