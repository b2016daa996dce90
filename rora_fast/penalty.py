"""When to add the penalty gradient: exactly once per optimizer step."""

from __future__ import annotations

import torch

__all__ = ["OncePerStep"]


class OncePerStep:
    """Decides, in backward, whether the penalty gradient for ``param`` is due.

    Yes exactly once per optimizer step. A new step is recognised by ``param.grad``
    having been reset to ``None`` (``zero_grad()``, the default ``set_to_none=True``)
    or by ``param`` having been changed in place (``optimizer.step()`` bumps its version
    counter) since the penalty was last added. Further backward calls before the next
    step (gradient accumulation, a layer called twice in one forward) add nothing.

    Known limit: with ``zero_grad(set_to_none=False)`` *and* a skipped step (AMP's
    GradScaler skips steps on overflow) the next step misses the penalty once; use
    ``penalty_mode="optimizer"`` with AMP grad scaling.
    """

    def __init__(self, param: torch.nn.Parameter):
        self.param = param
        self.version = None
        self.task = None

    def claim(self) -> bool:
        p = self.param
        # Identifies the running backward pass (the same id for every node of one pass).
        task = torch._C._current_graph_task_id()
        if p.grad is None:
            if task != -1 and task == self.task:  # already added earlier in this pass
                return False
        elif p._version == self.version:
            return False
        self.version = p._version
        self.task = task
        return True
