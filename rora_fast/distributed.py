"""RoRA under DDP and FSDP2: what needs care, and helpers for it.

DDP (``torch.nn.parallel.DistributedDataParallel``)
    Nothing special. The optimizer step hook (:mod:`rora_fast.penalty`) adds ``λ∇Ω``
    to the all-reduced adapter gradients on every rank, once per step:
    ``mean_r(g_r) + λ∇Ω``, the gradient of one process on the combined batch. The
    SVD bases are non-persistent buffers, identical on every
    rank (deterministic SVD of identical weights); pass ``forward_sync_buffers=False``
    (torch < 2.13: ``broadcast_buffers=False``; Trainer: ``ddp_broadcast_buffers=False``)
    to skip re-broadcasting them each step.

FSDP2 (``torch.distributed.fsdp.fully_shard``)
    Frozen base weights and trainable adapters may share one FSDP unit (FSDP2 shards
    each parameter separately). At the optimizer step the adapters are sharded
    DTensors (the parameters the optimizer holds); the step hook gathers each full
    factor (an all-gather: every rank steps), computes ``λ∇Ω`` and adds this rank's
    shard of it to the sharded, reduce-scattered gradient.
    Adapters at rest are sharded DTensors: use :func:`penalty_value` for logging and
    :func:`full_adapters` / :func:`save_rora_distributed` to rescale or save
    (collectives: call them on every rank).

FSDP1 (``FullyShardedDataParallel``) needs an accelerator in this torch (it refuses
CPU-only processes) and flattens parameters; it is not tested here. Use FSDP2
(accelerate: ``fsdp_version: 2``).

The weight mask
    Each call draws its seed from torch's default CPU generator, so the mask is the
    same on every rank for the same step exactly when the ranks' CPU generators are
    in the same state: seed every rank identically (transformers' ``set_seed`` and
    the Trainer do) and let every rank make the same draws. That is the intended
    behaviour: one mask per call shared by the whole global batch is what one
    process on the combined batch does, so DDP reproduces the single-process update
    and results do not depend on the world size; it also needs no communication.
    :func:`rng_in_sync` checks it.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from .model import spectral_rescale_
from .penalty import is_dtensor, rora_penalty  # noqa: F401 (is_dtensor: public here too)
from .persistence import save_rora

__all__ = ["is_dtensor", "full_adapters", "penalty_value", "save_rora_distributed",
           "spectral_rescale_distributed_", "rng_in_sync", "is_main_process"]


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _unsafe_setattr(module: nn.Module, name: str, value) -> None:
    module._parameters[name] = value


def _sharded_trainables(model: nn.Module) -> List[Tuple[nn.Module, str, nn.Parameter]]:
    out = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and is_dtensor(p):
                out.append((module, name, p))
    return out


@contextlib.contextmanager
def full_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the trainable parameters of an FSDP2 model (adapters, head)
    are full, unsharded tensors (all-gathered; the frozen base stays sharded), so
    ``save_rora``, ``spectral_rescale_``, ``rora_penalty`` work unchanged. Changes
    made to them inside the block (rescaling changes ``scaling`` only) are not
    written back. A no-op for models without DTensor parameters. Collective."""
    swapped = []
    try:
        for module, name, p in _sharded_trainables(model):
            full = nn.Parameter(p.full_tensor().detach(), requires_grad=True)
            _unsafe_setattr(module, name, full)
            swapped.append((module, name, p))
        yield model
    finally:
        for module, name, p in swapped:
            _unsafe_setattr(module, name, p)


def penalty_value(model: nn.Module) -> float:
    """``λ Σ Ω`` as a float, for logging; works on plain, DDP and FSDP2 models
    (collective under FSDP2: call on every rank)."""
    inner = getattr(model, "module", model)
    if _sharded_trainables(inner):
        with full_adapters(inner):
            return float(rora_penalty(inner))
    return float(rora_penalty(inner))


def spectral_rescale_distributed_(model: nn.Module, layers=None, factor: float = 1.0):
    """:func:`rora_fast.spectral_rescale_` for plain, DDP and FSDP2 models (every rank
    computes the same scales from the gathered adapters)."""
    inner = getattr(model, "module", model)
    with full_adapters(inner):
        return spectral_rescale_(inner, layers, factor=factor)


def save_rora_distributed(model: nn.Module, path: Union[str, Path]) -> Optional[Path]:
    """:func:`rora_fast.save_rora` for plain, DDP and FSDP2 models: gathers the full
    adapters on every rank (collective), rank 0 writes. Returns the path on rank 0."""
    inner = getattr(model, "module", model)
    with full_adapters(inner):
        if is_main_process():
            return save_rora(inner, path)
    return None


def rng_in_sync(group=None) -> bool:
    """True when the default CPU generator is in the same state on every rank (so
    RoRA's weight masks are identical across ranks). Collective; True without
    ``torch.distributed``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    digest = hashlib.blake2b(torch.get_rng_state().numpy().tobytes(), digest_size=8).digest()
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return bool(lo.item() == hi.item())
