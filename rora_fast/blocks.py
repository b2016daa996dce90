"""Transformer-block selection by module name, shared by the model-level API
(:func:`rora_fast.spectral_rescale_`) and the PEFT one
(:func:`rora_fast.spectral_rescale_peft_`): which layers are "the last ``n`` blocks"."""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Union

from torch import nn

__all__ = ["block_index", "select_top_blocks"]

_BLOCK_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)(?:\.|$)")


def block_index(name: str) -> Optional[int]:
    """Transformer block index read from a module name (``...layer.7.attention...``)."""
    m = None
    for m in _BLOCK_RE.finditer(name):
        pass
    return int(m.group(1)) if m else None


def select_top_blocks(model: nn.Module, candidates: List[str],
                      layers: Union[int, Sequence[str]]) -> List[str]:
    """The names among ``candidates`` chosen by ``layers``: an int ``n`` picks those in
    the last ``n`` transformer blocks of ``model`` (block index read from module names);
    a list of names is checked against ``candidates`` and returned as is."""
    if isinstance(layers, int) and not isinstance(layers, bool):
        if layers < 0:
            raise ValueError(f"layers must be >= 0, got {layers}")
        indices = [i for i in (block_index(n) for n, _ in model.named_modules())
                   if i is not None]
        if not indices:
            raise ValueError("cannot find transformer block indices in the module names; "
                             "pass an explicit list of layer names")
        first = max(indices) - layers + 1
        return [n for n in candidates if block_index(n) is not None and block_index(n) >= first]
    if isinstance(layers, str):
        raise TypeError(f"layers must be an int or a list of names, got the string {layers!r}")
    names = list(layers)
    missing = [n for n in names if n not in candidates]
    if missing:
        raise ValueError(f"not RoRA layers of this model: {missing}")
    return names
