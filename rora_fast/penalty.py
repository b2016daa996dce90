"""The orthogonality penalty ``λ Ω(A, B)`` and its gradient, once per optimizer step.

``Ω = ‖Uₖᵀ (B − B₀)‖²_F + ‖(A − A₀) Vₖ‖²_F`` (``A₀ = B₀ = 0`` for LoRA's start; PiSSA/OLoRA's
start factors otherwise), so ``∇_A λΩ = 2λ ((A − A₀) Vₖ) Vₖᵀ`` and
``∇_B λΩ = 2λ Uₖ (Uₖᵀ (B − B₀))``.

How the gradient reaches the optimizer (``penalty_mode="optimizer"``, the default): one
global torch optimizer step pre-hook
(:func:`torch.optim.optimizer.register_optimizer_step_pre_hook`, installed when the first
RoRA layer registers, :func:`register_penalty_layer`: importing rora_fast changes no
optimizer).
Before every ``step()`` of every ``torch.optim.Optimizer`` it adds ``λ∇Ω`` to the
adapter gradients of the RoRA layers whose adapters that optimizer holds, for all
layers at once: layers of equal shapes are stacked into two batched matmuls per
factor and the results added with one ``torch._foreach_add_``. Consequences:

* exactly once per step, whatever the loop does between steps (gradient
  accumulation, several backwards, ``zero_grad(set_to_none=False)``, a layer called
  twice): the hook runs once per ``step()`` by construction;
* AMP's ``GradScaler``: ``scaler.step(opt)`` unscales the gradients before it calls
  ``opt.step()`` and does not call it at all when it skips a step (inf/nan), so the
  penalty is added to unscaled gradients and a skipped step adds nothing. Fused
  optimizers that unscale inside their kernel (``fused=True`` Adam/AdamW/SGD, given
  ``optimizer.grad_scale``) get the penalty multiplied by that scale;
* gradient clipping done before ``step()`` (the Trainer's ``max_grad_norm``) does
  not include the penalty gradient;
* ``step(closure)`` (LBFGS; any optimizer given a closure): the closure is wrapped, so
  the penalty's gradient is added after each gradient evaluation inside ``step`` and
  ``λΩ`` to the loss it returns (line searches compare losses);
* a parameter whose ``.grad`` is ``None`` at the step (no backward reached it) gets
  nothing: torch optimizers skip such parameters, and giving it a gradient would make
  the optimizer move a parameter the loss never touched;
* DDP: the hook runs after the all-reduce on every rank, adding the same ``λ∇Ω``
  (the gradient of one process on the combined batch). FSDP2: the adapters are
  sharded DTensors at the step; their full values are gathered (a collective: every
  rank steps) and each rank adds its shard of ``λ∇Ω``.

Where no torch optimizer steps (a hand-written ``p.data.sub_(lr * p.grad)``), call
:func:`add_penalty_grads` before the update. A layer that has run
:data:`WARN_AFTER_FORWARDS` training forwards (with autograd on and a trainable
adapter) without any optimizer step holding it, or a call of
:func:`add_penalty_grads`, warns once (``RuntimeWarning``): its penalty is not being
applied.

``penalty_mode="loss"``: nothing automatic; :func:`rora_penalty` is then differentiable
and the user adds it to the loss. In the automatic modes :func:`rora_penalty` is
detached (for logging), so adding it to a loss by mistake changes nothing.
"""

from __future__ import annotations

import operator
import warnings
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["rora_penalty", "add_penalty_grads", "WARN_AFTER_FORWARDS",
           "register_penalty_layer"]

#: Training forwards of one RoRA layer without an optimizer step (or
#: :func:`add_penalty_grads`) after which a warning says its penalty is not applied.
#: Larger than any common gradient-accumulation count, small enough to be seen at once.
WARN_AFTER_FORWARDS = 64

# Layers whose penalty the step hook may add: RoraLinear and PEFT RoRA layers register
# themselves at construction. A layer provides ``_penalty_terms()``, a list of
# ``(param, kind, basis, start, lam)``: kind "A" (gradient (P − P₀) Q Qᵀ, Q = Vₖ) or
# "B" (gradient Q Qᵀ (P − P₀), Q = Uₖ), ``start`` the PiSSA/OLoRA start factor P₀
# (``lora_A0``/``lora_B0``) or None, and ``_penalty_forwards`` (an int counter).
# A WeakKeyDictionary (not a WeakSet): it iterates in registration order, the same on
# every rank, so that the FSDP2 all-gathers of the hook run in the same order everywhere.
_LAYERS: "weakref.WeakKeyDictionary[nn.Module, None]" = weakref.WeakKeyDictionary()
_WARNED = [False]


def register_penalty_layer(layer: nn.Module) -> None:
    """Let the optimizer step hook add this layer's penalty gradient (see module doc);
    the first call installs the hook."""
    global _HOOK
    layer.__dict__["_penalty_forwards"] = 0
    _LAYERS[layer] = None
    if _HOOK is None:
        _HOOK = register_optimizer_step_pre_hook(_step_pre_hook)


# ---------------------------------------------------------------------- the grouped math
def _scaled(Q: torch.Tensor, lam: float, dtype) -> torch.Tensor:
    """``sqrt(2λ)·Q`` in ``dtype``: then ``(P Q')Q'ᵀ = 2λ(P Q)Qᵀ``."""
    return Q.detach().to(dtype) * (2.0 * lam) ** 0.5


# Stacked sqrt(2λ)-scaled bases per group of layers, and stacked start factors. The
# cache holds its sources weakly (an entry whose layer is gone is dropped: no stacked
# bases of deleted models kept alive) and is the only extra copy of the bases.
_STACKS: Dict[tuple, Tuple[list, torch.Tensor]] = {}


def _stacked(tensors: List[torch.Tensor], lams=None, dtype=None) -> torch.Tensor:
    """``stack([sqrt(2λ_i)·t_i])`` (or ``stack(t_i)`` without ``lams``) in ``dtype``,
    cached while the same (constant) tensors, λ and dtype are asked for."""
    key = (tuple(map(id, tensors)), None if lams is None else tuple(lams), dtype)
    hit = _STACKS.get(key)
    if hit is not None and all(map(operator.is_, map(weakref.ref.__call__, hit[0]), tensors)):
        return hit[1]
    for k in [k for k, (refs, _) in _STACKS.items() if any(r() is None for r in refs)]:
        del _STACKS[k]
    if lams is None:
        out = torch.stack([t.detach() for t in tensors])
        out = out if dtype is None or out.dtype == dtype else out.to(dtype)
    else:
        out = torch.stack([_scaled(t, lam, dtype) for t, lam in zip(tensors, lams)])
    _STACKS[key] = ([weakref.ref(t) for t in tensors], out)
    return out


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's parameters); a
    plain tensor or parameter answers without touching ``torch.distributed`` (the step
    hook asks for every adapter)."""
    cls = type(t)
    if cls is nn.Parameter or cls is torch.Tensor:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def _penalty_grad_one(kind: str, P: torch.Tensor, q: torch.Tensor,
                      start: Optional[torch.Tensor]) -> torch.Tensor:
    X = P.to(q.dtype)
    if start is not None:
        X = X - start.to(q.dtype)
    return (X @ q) @ q.t() if kind == "A" else q @ (q.t() @ X)


def _add_dtensor(p, kind, q, start, scale) -> None:
    """FSDP2: gather the full factor (collective), add this rank's shard of the gradient."""
    from torch.distributed.tensor import DTensor, Replicate

    full = p.detach().full_tensor()
    g = _penalty_grad_one(kind, full, q, start).to(p.dtype)
    if scale is not None:
        g = g * scale.to(g.device)
    grad = p.grad
    mesh = grad.device_mesh
    g_d = DTensor.from_local(g, mesh, [Replicate()] * mesh.ndim, run_check=False)
    grad.add_(g_d.redistribute(mesh, grad.placements))


# The penalty is computed in float32 or wider (half-precision adapters are upcast).
_COMPUTE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _apply(terms, scale: Optional[torch.Tensor] = None) -> None:
    """Add the penalty gradient of every ``(param, kind, basis, start, lam)`` term to
    ``param.grad``, equal shapes batched."""
    # (the per-term loop is the hook's host cost: one key and four appends per term)
    groups: Dict[tuple, tuple] = {}
    for _, (p, kind, Q, start, lam) in terms:
        dtype = p.dtype
        if is_dtensor(p):
            _add_dtensor(p, kind, _scaled(Q, lam, _COMPUTE_DTYPE.get(dtype, dtype)), start,
                         scale)
            continue
        key = (kind, p.shape, Q.shape, dtype, p.device, start is not None)
        g = groups.get(key)
        if g is None:
            g = groups[key] = ([], [], [], [])
        g[0].append(p)
        g[1].append(Q)
        g[2].append(lam)
        g[3].append(start)
    for (kind, _, _, dtype, _, has_start), (ps, bases, lams, starts) in groups.items():
        cdtype = _COMPUTE_DTYPE.get(dtype, dtype)
        qs = _stacked(bases, lams, cdtype)
        X = torch.stack(ps)  # (under no_grad)
        if X.dtype != cdtype:
            X = X.to(cdtype)
        if has_start:
            X = X.sub_(_stacked(starts, None, cdtype))
        if kind == "A":   # (P − P₀) Q' Q'ᵀ
            G = torch.bmm(torch.bmm(X, qs), qs.transpose(1, 2))
        else:             # Q' Q'ᵀ (P − P₀)
            G = torch.bmm(qs, torch.bmm(qs.transpose(1, 2), X))
        if G.dtype != dtype:
            G = G.to(dtype)
        if scale is not None:
            G = G.mul_(scale.to(device=G.device, dtype=G.dtype))
        torch._foreach_add_([p.grad for p in ps], G.unbind(0))


def _due_terms(layers, held: Optional[set]):
    """The terms of these layers whose parameter is held (``held`` None: any), needs a
    gradient and has one. Resets the layers' forward counters."""
    out = []
    for layer in layers:
        terms = layer._penalty_terms()
        if held is not None:
            for t in terms:
                if id(t[0]) in held:
                    break
            else:  # (no term held, or no terms)
                continue
        layer.__dict__["_penalty_forwards"] = 0
        for t in terms:
            p = t[0]
            if (held is None or id(p) in held) and p.requires_grad and p.grad is not None:
                out.append((layer, t))
    return out


# ---------------------------------------------------------------------- the step hook
def _step_pre_hook(optimizer, args, kwargs):
    if not _LAYERS:
        return None
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    # (args[0] is the optimizer itself: the hook sees step's full argument list)
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is not None:
        return _wrap_closure(optimizer, held, closure, args, kwargs)
    terms = _due_terms(list(_LAYERS), held)
    if terms:
        with torch.no_grad():
            _apply(terms, getattr(optimizer, "grad_scale", None))
    return None


def _penalty_of(layers) -> Optional[torch.Tensor]:
    """``λ Σ Ω`` of registered layers (their ``rora_penalty()``, the one name every RoRA
    layer answers to); None for no layers."""
    total = None
    for layer in layers:
        v = layer.rora_penalty()
        total = v if total is None else total + v.to(total.device)
    return total


def _wrap_closure(optimizer, held, closure, args, kwargs):
    """``step(closure)`` (LBFGS, or any optimizer given a closure) re-evaluates the
    gradients inside ``step``: the penalty's gradient is added after each evaluation,
    and ``λΩ`` to the loss it returns (line searches compare losses)."""
    def closure_with_penalty():
        loss = closure()
        terms = _due_terms(list(_LAYERS), held)
        if terms:
            with torch.no_grad():
                _apply(terms, getattr(optimizer, "grad_scale", None))
            if loss is not None:
                layers = list(dict.fromkeys(layer for layer, _ in terms))
                with torch.no_grad():
                    value = _penalty_of(layers)
                loss = loss + value.to(loss.device, loss.dtype)
        return loss

    if "closure" in kwargs:
        kwargs = dict(kwargs, closure=closure_with_penalty)
    else:
        args = (args[0], closure_with_penalty) + tuple(args[2:])
    return args, kwargs


#: the handle of the global step pre-hook, None until a RoRA layer registers
_HOOK = None


def _model_layers(model: nn.Module):
    return [m for m in model.modules() if m in _LAYERS]


def add_penalty_grads(model: nn.Module) -> int:
    """Add ``λ∇Ω`` to the adapter gradients of every RoRA layer of ``model`` now.

    For updates written by hand (no ``torch.optim`` optimizer, whose step would add it):
    call it once per update, after the backward passes and before changing the
    weights. Only parameters that require grad and have a ``.grad`` get it; layers
    with ``penalty_mode="loss"`` or ``λ = 0`` are skipped. Returns the number of
    gradients changed. Under FSDP2 it is a collective (call it on every rank).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_penalty_grads expects an nn.Module, got {type(model).__name__}")
    terms = _due_terms(_model_layers(model), None)
    if terms:
        with torch.no_grad():
            _apply(terms)
    return len(terms)


def _warn_no_step(layer) -> None:
    """Called by a layer at its WARN_AFTER_FORWARDS-th training forward without a step."""
    if _WARNED[0] or not torch.is_grad_enabled():
        return
    if not any(t[0].requires_grad for t in layer._penalty_terms()):
        return
    _WARNED[0] = True
    warnings.warn(
        f"a RoRA layer ran {WARN_AFTER_FORWARDS} training forwards without an optimizer "
        "step holding its adapters: the orthogonality penalty's gradient is added by "
        "torch.optim optimizers' step(). For a hand-written update call "
        "rora_fast.add_penalty_grads(model) before it, or use penalty_mode='loss' and add "
        "rora_fast.rora_penalty(model) to the loss (this warning is shown once).",
        RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------- values
def rora_penalty(model: nn.Module) -> torch.Tensor:
    """The current ``λ Σ_layers Ω(A, B)`` of the model.

    With ``penalty_mode="loss"`` it is differentiable: add it to the loss. In the
    automatic mode the optimizer step adds the penalty's gradient and this value is
    detached (for logging only), so adding it to a loss cannot count it twice.
    """
    total = _penalty_of(_model_layers(model))  # RoraLinear and PEFT RoRA layers
    if total is None:
        raise ValueError("the model has no RoRA layers")
    return total



