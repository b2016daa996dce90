"""The strength of the post-training spectral rescaling, chosen per run on clean data.

The paper's rescaling sets every chosen layer's scale to ``σ_max(W_pre) / σ_max(update)``:
one strength for every model, task and schedule. On small models it often costs clean
accuracy, because it amplifies all of the trained update by one factor, noise directions
included (the amplification of the trained scale is about 10× after a short schedule).
:func:`adaptive_rescale_` (not in the paper) tries a ladder of rescalings, weakest first,
each ``factor · σ_max(W_pre) / σ_max(update)`` on the top ``layers`` blocks
(:func:`rora_fast.spectral_rescale_`), measures the accuracy on clean labelled dev
batches after each, and keeps the **strongest** whose accuracy stays within
``tolerance`` points of the model before any rescaling. It never sees a trigger or a
poisoned row: it knows only the clean task.

With ``after_repair=True`` every state is judged as it will be delivered when the clean
head-bias repair follows the rescale (:func:`rora_fast.repair.recalibrate_head_bias_` on the
same rows): by its dev accuracy after the frequency shift of the head bias that state would
get (:func:`rora_fast.repair.frequency_bias_shift` of its dev logits). The model's head is
not changed here; the caller repairs after the call.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .model import (ModelState, layer_attrs, peft_lora_layers, rora_layers,
                    spectral_rescale_)

__all__ = ["RescaleStep", "DEFAULT_FACTORS", "DEFAULT_LADDER", "factor_ladder", "parse_factors",
           "adaptive_rescale_", "dev_accuracy", "dev_logits"]


@dataclass(frozen=True)
class RescaleStep:
    """One rung: rescale the layers of the top ``layers`` blocks to ``factor`` times the
    paper's scale."""
    layers: int
    factor: float = 1.0

    def __post_init__(self):
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise ValueError(f"RescaleStep.layers must be an int >= 1, got {self.layers!r}")
        if (isinstance(self.factor, bool) or not isinstance(self.factor, (int, float))
                or not math.isfinite(self.factor) or self.factor <= 0):
            raise ValueError(f"RescaleStep.factor must be a finite number > 0, got "
                             f"{self.factor!r}")


#: the default rungs' factors, weakest first: a quarter, half and all of the paper's scale
DEFAULT_FACTORS = (0.25, 0.5, 1.0)


def factor_ladder(layers: int = 3, factors: Sequence[float] = DEFAULT_FACTORS
                  ) -> Tuple[RescaleStep, ...]:
    """The rungs ``RescaleStep(layers, f)`` for ``f`` in ``factors`` (ascending)."""
    factors = [float(f) for f in factors]
    if sorted(factors) != factors or len(set(factors)) != len(factors):
        raise ValueError(f"factors must be strictly ascending (weakest first), got {factors}")
    return tuple(RescaleStep(layers, f) for f in factors)


def parse_factors(text: str) -> Tuple[float, ...]:
    """``"0.5,0.75,1"`` -> ``(0.5, 0.75, 1.0)``: a command line's ladder factors, checked
    as :func:`factor_ladder` checks them (argparse ``type=``: a clear usage error)."""
    import argparse
    try:
        factors = tuple(float(x) for x in str(text).split(",") if x.strip())
        factor_ladder(1, factors)
        if not factors:
            raise ValueError("no factor given")
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated factors > 0, weakest first (e.g. 0.5,0.75,1), got "
            f"{text!r}: {e}")
    return factors


#: the top 3 blocks (the paper's count) at each of ``DEFAULT_FACTORS``
DEFAULT_LADDER = factor_ladder(3)


@torch.inference_mode()
def dev_logits(model: nn.Module, dev_batches: Iterable[Mapping]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of ``model`` (eval mode; its mode is restored) on
    ``dev_batches``, concatenated in batch order: mappings of model inputs with a ``labels``
    tensor (what a transformers data collator gives), moved to the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    try:
        for i, batch in enumerate(dev_batches):
            if not isinstance(batch, Mapping) or "labels" not in batch:
                raise ValueError(f"dev batch {i}: expected a mapping of model inputs with a "
                                 f"'labels' tensor, got {type(batch).__name__}"
                                 + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""))
            inputs = {k: (v.to(device) if torch.is_tensor(v) else v)
                      for k, v in batch.items() if k != "labels"}
            out = model(**inputs)
            logits.append((out.logits if hasattr(out, "logits") else out[0]).detach())
            labels.append(torch.as_tensor(batch["labels"]).to(device))
    finally:
        model.train(was_training)
    if not labels or sum(t.numel() for t in labels) == 0:
        raise ValueError("dev_batches holds no rows")
    return torch.cat(logits), torch.cat(labels)


def dev_accuracy(model: nn.Module, dev_batches: Iterable[Mapping]) -> float:
    """Accuracy in % of ``model`` on ``dev_batches`` (see :func:`dev_logits`)."""
    return _accuracy(*dev_logits(model, dev_batches))


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * int((logits.argmax(-1) == labels).sum()) / labels.numel()


def _repaired_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The accuracy of ``logits`` after the frequency head-bias repair fitted on them."""
    from .repair import frequency_bias_shift
    z = logits.detach().double().cpu()
    y = labels.detach().cpu()
    return _accuracy(z + frequency_bias_shift(z, y.tolist()), y)


def _snapshot(model: nn.Module, adapter_name: str):
    """What a rescale changes: every RoRA layer's scale (and the base a PiSSA/OLoRA
    re-fold rewrites), every PEFT LoRA layer's scale of ``adapter_name``."""
    rl = [lay for _, lay in rora_layers(model)]
    state = ModelState(model, [lay.weight for lay in rl if lay.variant.rewrites_base],
                       [a for lay in rl for a in layer_attrs(lay)])
    peft = [(lay, lay.scaling[adapter_name]) for _, lay in peft_lora_layers(model, adapter_name)]

    def restore():
        state.restore()
        for lay, s in peft:
            lay.scaling[adapter_name] = s
    return restore


def adaptive_rescale_(model: nn.Module, dev_batches: Iterable[Mapping],
                      ladder: Sequence[RescaleStep] = DEFAULT_LADDER, tolerance: float = 1.0,
                      adapter_name: str = "default",
                      on_step: Optional[Callable[[Optional[RescaleStep], nn.Module,
                                                  torch.Tensor], None]] = None,
                      after_repair: bool = False) -> Dict:
    """Rescale ``model`` with the strongest rung of ``ladder`` (ordered weakest first)
    whose accuracy on the clean ``dev_batches`` is at least the un-rescaled model's minus
    ``tolerance`` (percentage points); no rung qualifies: the model stays un-rescaled.

    ``dev_batches``: a re-iterable collection (list, ``DataLoader``) of mappings of model
    inputs with ``labels``: clean labelled rows of the task, held out from training (the
    dev split used for model selection). ``on_step(step, model, dev_logits)``, if given,
    is called with the model in each measured state (``step`` None: un-rescaled) and its
    logits on the dev batches (:func:`dev_logits` order), e.g. to log more.

    ``after_repair``: judge every state (the un-rescaled one included) by its dev accuracy
    after the frequency head-bias repair it would get (module docstring), for a model whose
    head bias is re-fitted on the same rows after the rescale.

    Returns ``{"base_accuracy", "tolerance", "after_repair", "steps": [{"layers", "factor",
    "accuracy", "within"}], "chosen": {"layers", "factor"} or None, "scales": {name: s}}``
    (accuracies as judged).
    All or nothing: on any error the model is restored to its state before the call.
    """
    if (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
            or not math.isfinite(tolerance) or tolerance < 0):
        raise ValueError(f"tolerance must be a finite number >= 0 (accuracy points), got "
                         f"{tolerance!r}")
    ladder = list(ladder)
    if not ladder or not all(isinstance(s, RescaleStep) for s in ladder):
        raise ValueError("ladder must be a non-empty sequence of RescaleStep")
    if isinstance(dev_batches, Iterable) and iter(dev_batches) is dev_batches:
        raise TypeError("dev_batches is an iterator (it would be used up after one pass); "
                        "pass a list or a DataLoader")
    if not isinstance(after_repair, bool):
        raise TypeError(f"after_repair must be a bool, got {after_repair!r}")
    judge = _repaired_accuracy if after_repair else _accuracy
    restore = _snapshot(model, adapter_name)
    try:
        z, y = dev_logits(model, dev_batches)
        base = judge(z, y)
        if on_step is not None:
            on_step(None, model, z)
        steps: List[Dict] = []
        for step in ladder:
            spectral_rescale_(model, layers=step.layers, adapter_name=adapter_name,
                              factor=float(step.factor))
            z, _ = dev_logits(model, dev_batches)
            acc = judge(z, y)
            if on_step is not None:
                on_step(step, model, z)
            restore()
            steps.append({**asdict(step), "accuracy": round(acc, 4),
                          "within": bool(acc >= base - tolerance)})
        chosen = next((s for s, row in zip(reversed(ladder), reversed(steps))
                       if row["within"]), None)
        scales = {}
        if chosen is not None:
            scales = spectral_rescale_(model, layers=chosen.layers, adapter_name=adapter_name,
                                       factor=float(chosen.factor))
    except BaseException:
        restore()
        raise
    return {"base_accuracy": round(base, 4), "tolerance": float(tolerance),
            "after_repair": after_repair, "steps": steps,
            "chosen": asdict(chosen) if chosen is not None else None, "scales": scales}
