"""When to add the penalty gradient: exactly once per optimizer step."""

from __future__ import annotations

import sys
import weakref
from typing import Optional

import torch

__all__ = ["OncePerStep", "optimizer_steps"]

# Every torch optimizer's step() (fused ones included, which update parameters without
# bumping their version counters) increments this counter.
_OPTIMIZER_STEPS = [0]


def _count_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


def optimizer_steps() -> int:
    """Number of ``torch.optim.Optimizer.step()`` calls seen in this process."""
    return _OPTIMIZER_STEPS[0]


try:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(_count_step)
except ImportError:  # pragma: no cover - very old torch: version counters only
    pass


def _fsdp2_param(module: torch.nn.Module, name: str):
    """The FSDP2 (``fully_shard``) ``FSDPParam`` managing ``module.<name>``, or None.

    FSDP2 replaces a module's parameter by a sharded DTensor parameter (the one the
    optimizer holds and ``zero_grad`` resets) and, around forward and backward, swaps
    in a separate unsharded parameter whose gradient is handed to the sharded one
    after each reduce-scatter. Neither is the Parameter the layer was built with.
    """
    if "torch.distributed.fsdp._fully_shard" not in sys.modules:
        return None  # FSDP2 never imported: it cannot be in use
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    for state_ref in list(_module_state_mapping.values()):
        state = state_ref()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch < 2.8: a single optional group
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for group in groups:
            for fp in getattr(group, "fsdp_params", ()):
                info = getattr(fp, "_module_info", None)
                if info is not None and info.module is module and info.param_name == name:
                    return fp
    return None


class OncePerStep:
    """Decides, in backward, whether the penalty gradient for a parameter is due.

    Yes exactly once per optimizer step. A new step is recognised by the parameter's
    gradient having been reset to ``None`` (``zero_grad()``, the default
    ``set_to_none=True``) or by the parameter having been changed in place
    (``optimizer.step()`` bumps its version counter) or by any torch optimizer having
    stepped (a global step hook: fused optimizers do not bump version counters) since
    the penalty was last added. Further backward calls before the next step (gradient accumulation, a
    layer called twice in one forward) add nothing.

    Build it with ``OncePerStep(module=layer, name=("lora_A", "lora_B"))`` so that the
    parameter is looked up through the module at backward time (the first named one
    that requires grad, so a frozen ``lora_A`` does not blind the clock): wrappers that replace
    parameters (FSDP2 ``fully_shard``, ``load_state_dict(assign=True)``) would
    otherwise leave the clock watching a stale object whose gradient is always
    ``None`` (the penalty would then be added on every micro-batch). Under FSDP2
    the clock watches the sharded parameter the optimizer holds, and counts the
    unsharded gradient kept between micro-batches under
    ``set_requires_gradient_sync(False)`` as accumulated gradient, so every rank
    takes the same decision. ``OncePerStep(param)`` watches a fixed Parameter.

    Known limit: with ``zero_grad(set_to_none=False)`` *and* a skipped step (AMP's
    GradScaler skips steps on overflow) the next step misses the penalty once; use
    ``penalty_mode="optimizer"`` with AMP grad scaling.
    """

    def __init__(self, param: Optional[torch.nn.Parameter] = None, *,
                 module: Optional[torch.nn.Module] = None, name: Optional[str] = None):
        if (param is None) == (module is None):
            raise ValueError("pass either a parameter or module= and name=")
        self._param = param
        self._module = weakref.ref(module) if module is not None else None
        self._name = name
        self._fsdp = None  # weakref to the FSDP2 FSDPParam, once found
        self.version = None
        self.task = None
        self.steps = None

    # The module is held weakly (no reference cycle through the layer); copies and
    # pickles must follow the module to its copy.
    def __deepcopy__(self, memo):
        import copy

        new = copy.copy(self)
        module = self._module() if self._module is not None else None
        if module is not None:
            new._module = weakref.ref(memo.get(id(module), module))
        else:
            new._param = copy.deepcopy(self._param, memo)
        new._fsdp = None
        return new

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_module"] = self._module() if self._module is not None else None
        state["_fsdp"] = None
        return state

    def __setstate__(self, state):
        module = state.pop("_module")
        self.__dict__.update(state)
        self._module = weakref.ref(module) if module is not None else None

    @property
    def param(self):
        """The parameter as the module holds it now (or the fixed one)."""
        if self._module is None:
            return self._param
        module = self._module()
        if module is None:
            return None
        names = (self._name,) if isinstance(self._name, str) else tuple(self._name)
        found = None
        for n in names:
            p = getattr(module, n, None)
            if isinstance(p, torch.Tensor):
                if p.requires_grad:
                    return p
                found = p if found is None else found
        return found

    @property
    def _param_name(self):
        if isinstance(self._name, str):
            return self._name
        p = self.param
        module = self._module()
        for n in self._name:
            if getattr(module, n, None) is p:
                return n
        return self._name[0]

    def _state(self):
        """``(tensor whose version marks optimizer steps, has accumulated gradient)``."""
        p = self.param
        if self._module is not None:
            fp = self._fsdp() if self._fsdp is not None else None
            if fp is None:
                fp = _fsdp2_param(self._module(), self._param_name)
                self._fsdp = weakref.ref(fp) if fp is not None else None
            if fp is not None:
                sharded = fp.sharded_param
                grads = (sharded.grad, getattr(fp, "unsharded_accumulated_grad", None),
                         p.grad if p is not sharded and isinstance(p, torch.Tensor)
                         and p.is_leaf else None)
                return sharded, any(g is not None for g in grads)
        has_grad = isinstance(p, torch.Tensor) and p.is_leaf and p.grad is not None
        return p, has_grad

    def claim(self) -> bool:
        p, has_grad = self._state()
        # Identifies the running backward pass (the same id for every node of one pass).
        task = torch._C._current_graph_task_id()
        if not has_grad:
            if task != -1 and task == self.task:  # already added earlier in this pass
                return False
        elif p._version == self.version and optimizer_steps() == self.steps:
            return False
        self.version = p._version
        self.task = task
        self.steps = optimizer_steps()
        return True
