"""The harness's model loading, prediction and training loop: rora_fast's own
(:mod:`rora_fast.loop`), which ``rora-fast train`` and :func:`rora_fast.finetune` use too,
so that a defence run and a user's fine-tuning go through one loop."""
from ..loop import *  # noqa: F401,F403
from ..loop import __all__, resolve_model  # noqa: F401
