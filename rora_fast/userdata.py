"""A user's own labelled data for :func:`rora_fast.finetune` / ``rora-fast train``.

Files are read with 🤗 ``datasets`` (CSV, TSV, JSON Lines, Parquet, or a folder written by
``Dataset.save_to_disk``); every check that can fail runs here, before any model is
touched, with an error that names the file, the column or the row:

* the file exists and has a known format; a saved ``DatasetDict`` names its split;
* the text columns (one, or two: a sentence pair) and the label column exist;
* text columns hold text (strings, none missing); labels are strings or integers;
* the split is not empty; the training rows hold at least two classes;
* labels map to the model's head: string labels through the model's own ``label2id``
  when it names them all, else in sorted order; integer labels as they are, each
  ``< num_labels``.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .data import Example

__all__ = ["FORMATS", "read_table", "LabelMap", "label_map_for", "rows_from_table",
           "holdout_split"]

#: file suffix -> datasets builder (and its options)
FORMATS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}),
           ".jsonl": ("json", {}), ".json": ("json", {}), ".parquet": ("parquet", {})}


def _datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("reading data files needs 🤗 datasets: "
                          "pip install 'rora-fast[train]'") from e
    return datasets


def read_table(path: str, split: str = "train", option: str = "--train-file"):
    """The rows of ``path`` as a ``datasets.Dataset``: a CSV/TSV/JSON Lines/Parquet file, or a
    folder written by ``save_to_disk`` (a ``DatasetDict`` folder: its split ``split``)."""
    datasets = _datasets()
    if not os.path.exists(path):
        raise FileNotFoundError(f"{option} {path}: no such file or folder")
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"{option} {path}: a folder must be one written by "
                             f"datasets' save_to_disk ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{option} {path}: a DatasetDict without a {split!r} split "
                                 f"(it has {', '.join(ds)}); pass the split's own folder")
            ds = ds[split]
        return ds
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise ValueError(f"{option} {path}: unknown format {suffix or '(no suffix)'!r}; use "
                         f"{', '.join(FORMATS)} or a save_to_disk folder")
    builder, kwargs = FORMATS[suffix]
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        return datasets.load_dataset(builder, data_files=path, split="train", **kwargs)
    except Exception as e:  # a malformed file: say which
        raise ValueError(f"{option} {path}: cannot be read as {builder} ({e})") from e
    finally:
        datasets.logging.set_verbosity(verbosity)


def _column(ds, name: str, where: str):
    if name not in ds.column_names:
        raise ValueError(f"{where}: no column {name!r} (columns: {', '.join(ds.column_names)})")
    return ds[name]


def _texts(ds, text_columns: Sequence[str], where: str) -> List[Union[str, Tuple[str, str]]]:
    cols = []
    for c in text_columns:
        values = _column(ds, c, where)
        for i, v in enumerate(values):
            if not isinstance(v, str):
                kind = "missing" if v is None else f"a {type(v).__name__} ({v!r})"
                raise ValueError(f"{where}: column {c!r} must hold text; row {i} is {kind}")
        cols.append(list(values))
    return cols[0] if len(cols) == 1 else list(zip(*cols))


@dataclass(frozen=True)
class LabelMap:
    """Label value in the data -> class index of the model's head."""
    to_id: Dict[Union[str, int], int]
    id2label: Dict[int, str]

    def ids(self, values, where: str) -> List[int]:
        out = []
        for i, v in enumerate(values):
            if v not in self.to_id:
                raise ValueError(f"{where}: row {i} has label {v!r}, which the training rows "
                                 f"do not have ({', '.join(map(repr, self.to_id))})")
            out.append(self.to_id[v])
        return out


def _default_names(id2label: Dict) -> bool:
    return all(str(v) == f"LABEL_{k}" for k, v in id2label.items())


def _label_values(values, where: str, column: str):
    kinds = {type(v) for v in values}
    if kinds <= {str}:
        return values
    if kinds <= {int}:
        return values
    bad = next(v for v in values if not isinstance(v, (str, int)) or isinstance(v, bool))
    raise ValueError(f"{where}: column {column!r} must hold string or integer labels, got "
                     f"{bad!r} ({type(bad).__name__})")


def label_map_for(values: Sequence, num_labels: int, model_id2label: Optional[Dict] = None,
                  where: str = "training rows", column: str = "label") -> LabelMap:
    """The label map of the training labels ``values`` for a head of ``num_labels``
    outputs (see the module docstring). Raises if fewer than two classes occur or a label
    does not fit the head."""
    values = _label_values(list(values), where, column)
    classes = sorted(set(values))
    if len(classes) < 2:
        raise ValueError(f"{where}: column {column!r} holds a single class "
                         f"({classes[0]!r} in all {len(values)} rows); fine-tuning a classifier "
                         "needs at least two")
    model_id2label = {int(k): str(v) for k, v in (model_id2label or {}).items()}
    if isinstance(classes[0], str):
        named = {v: k for k, v in model_id2label.items()}
        if model_id2label and not _default_names(model_id2label) and set(classes) <= set(named):
            to_id = {c: named[c] for c in classes}
            id2label = dict(model_id2label)
        else:
            to_id = {c: i for i, c in enumerate(classes)}
            id2label = {i: c for c, i in to_id.items()}
    else:
        to_id = {c: c for c in classes}
        if min(classes) < 0:
            raise ValueError(f"{where}: column {column!r} has the negative label {min(classes)}")
        id2label = {i: model_id2label.get(i, str(i)) for i in range(max(classes) + 1)}
    top = max(to_id.values())
    if top >= num_labels:
        raise ValueError(f"{where}: column {column!r} has {len(classes)} classes "
                         f"({', '.join(map(repr, classes))}) but the model's head has "
                         f"{num_labels} outputs; use a checkpoint whose head fits the labels")
    for i in range(num_labels):
        id2label.setdefault(i, model_id2label.get(i, f"LABEL_{i}"))
    return LabelMap(to_id, dict(sorted(id2label.items())))


def rows_from_table(ds, text_columns: Sequence[str], label_column: str,
                    labels: Optional[LabelMap], where: str,
                    num_labels: int = 2, model_id2label: Optional[Dict] = None
                    ) -> Tuple[List[Example], LabelMap]:
    """``(rows, label map)`` of a ``datasets.Dataset`` (or anything with ``column_names``
    and column access): the training table builds the label map (``labels`` None), other
    tables use the training one."""
    if not 1 <= len(text_columns) <= 2:
        raise ValueError(f"give one text column or two (a sentence pair), got "
                         f"{len(text_columns)}: {list(text_columns)}")
    if len(ds) == 0:
        raise ValueError(f"{where}: no rows")
    texts = _texts(ds, text_columns, where)
    values = list(_column(ds, label_column, where))
    for i, v in enumerate(values):
        if v is None:
            raise ValueError(f"{where}: column {label_column!r} is missing in row {i}")
    if labels is None:
        labels = label_map_for(values, num_labels, model_id2label, where, label_column)
    else:
        _label_values(values, where, label_column)
    ids = labels.ids(values, where)
    return [Example(t, y) for t, y in zip(texts, ids)], labels


def holdout_split(rows: Sequence[Example], fraction: float, seed: int
                  ) -> Tuple[List[Example], List[Example]]:
    """``(train, held out)``: a seeded, stratified split; each class keeps at least one
    row on each side (the order within each side is the original order)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    by_class: Dict[int, List[int]] = {}
    for i, e in enumerate(rows):
        by_class.setdefault(e.label, []).append(i)
    rng = random.Random(seed)
    held = set()
    for label in sorted(by_class):
        idx = list(by_class[label])
        if len(idx) < 2:
            raise ValueError(f"class {label} has {len(idx)} training row; holding out a "
                             "validation split needs at least 2 per class (or pass a "
                             "validation file)")
        rng.shuffle(idx)
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.update(idx[:k])
    return ([e for i, e in enumerate(rows) if i not in held],
            [e for i, e in enumerate(rows) if i in held])
