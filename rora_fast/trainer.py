"""RoRA with the transformers ``Trainer``: a recipe and a callback.

Recipe::

    from transformers import Trainer, TrainingArguments
    import rora_fast
    from rora_fast.trainer import RoraTrainerCallback, add_rora_callback

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    rora_fast.apply_rora(model, rora_fast.RoraConfig(target_modules=["q_proj", "v_proj"]))
    model.activation_checkpointing_enable()          # optional; the masks replay
                                                     # (transformers < 5: gradient_checkpointing_enable)
    trainer = Trainer(model=model, args=TrainingArguments(..., bf16=True,
                      gradient_accumulation_steps=4), train_dataset=ds)
    add_rora_callback(trainer, save_dir="out/rora", export_peft_dir="out/peft")
    trainer.train()      # trains L_sup + λΩ, logs rora_penalty, rescales at the end

What the pieces do:

* The full objective trains with no change to the Trainer: ``λ∇Ω`` is added to the
  adapter gradients by the optimizer's ``step()`` (a global torch optimizer step
  pre-hook, :mod:`rora_fast.penalty`), once per optimizer step whatever the number of
  micro-batches. The Trainer scales the supervised loss by
  ``1 / gradient_accumulation_steps``; the penalty is not scaled, so the step's
  gradient is that of ``mean(L_sup) + λΩ``. It is added after the Trainer's gradient
  clipping (``max_grad_norm`` clips the supervised gradient only).
* ``fp16=True`` (AMP GradScaler): the scaler unscales before it calls ``step()`` and
  skips the call on overflow, so the penalty is exact there too.
* ``on_log`` adds ``rora_penalty`` (``λΣΩ``) to the logs (and to ``state.log_history``).
  :func:`add_rora_callback` puts the callback first so that the printer and the
  reporting integrations see the value.
* ``on_train_end``: spectral rescaling of the last ``rescale_layers`` blocks, then
  :func:`rora_fast.save_rora` and/or :func:`rora_fast.export_peft_adapter` if
  directories were given (rank 0 writes; under FSDP2 the adapters are gathered first).

Distributed: DDP and FSDP2 launched by ``torchrun`` or ``accelerate launch`` need
nothing more (see :mod:`rora_fast.distributed`); every rank must be seeded the same
(the Trainer's ``set_seed(args.seed)`` does) so that the weight masks agree.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import TrainerCallback

from . import validation as V
from .distributed import (full_adapters, is_main_process, penalty_value, rng_in_sync,
                          save_rora_distributed, spectral_rescale_distributed_)
from .model import rora_layers
from .persistence import export_peft_adapter

__all__ = ["RoraTrainerCallback", "add_rora_callback"]

logger = logging.getLogger(__name__)


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class RoraTrainerCallback(TrainerCallback):
    """Makes ``Trainer.train()`` a complete RoRA run (see the module docstring).

    Args:
        penalty_mode: ``"auto"`` or ``"keep"`` (leave the layers' mode as it is),
            ``"optimizer"`` or ``"loss"``: set it on every layer.
        rescale: apply spectral rescaling at the end of training.
        rescale_layers: blocks to rescale (default: the model's ``rora_config``).
        rescale_factor: the rescale's multiple of the paper's scale
            (:func:`rora_fast.spectral_rescale_`'s ``factor``; 1: the paper's rule).
        save_dir: if set, ``save_rora`` there at the end.
        export_peft_dir: if set, ``export_peft_adapter`` there at the end.
        log_penalty: add ``rora_penalty`` to every log.
        check_rng_sync: under ``torch.distributed``, check at the start of training that
            every rank's CPU generator agrees (else the weight masks would differ) and
            raise if not.
    """

    def __init__(self, penalty_mode: str = "auto", rescale: bool = True,
                 rescale_layers: Optional[int] = None, rescale_factor: float = 1.0,
                 save_dir: Optional[Union[str, Path]] = None,
                 export_peft_dir: Optional[Union[str, Path]] = None,
                 log_penalty: bool = True, check_rng_sync: bool = True):
        if penalty_mode not in ("auto", "keep"):
            penalty_mode = V.check_penalty_mode(penalty_mode)
        self.penalty_mode = penalty_mode
        self.rescale = rescale
        self.rescale_layers = rescale_layers
        self.rescale_factor = V.check_number("rescale_factor", rescale_factor, lo=0,
                                             lo_open=True)
        self.save_dir = save_dir
        self.export_peft_dir = export_peft_dir
        self.log_penalty = log_penalty
        self.check_rng_sync = check_rng_sync
        self.scales = None

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = _unwrap(model)
        layers = [layer for _, layer in rora_layers(inner)]
        if not layers:
            raise ValueError("RoraTrainerCallback: the model has no RoRA layers "
                             "(call rora_fast.apply_rora before building the Trainer)")
        if self.penalty_mode not in ("auto", "keep"):
            for layer in layers:
                layer.penalty_mode = self.penalty_mode
        if any(layer.penalty_mode == "loss" for layer in layers):
            logger.warning("RoRA layers use penalty_mode='loss': the Trainer's loss does not "
                           "include the penalty; override compute_loss to add "
                           "rora_fast.rora_penalty(model)")
        if self.check_rng_sync and not rng_in_sync():
            raise RuntimeError("the ranks' CPU random generators differ, so RoRA's weight "
                               "masks would differ between ranks: seed every rank the same "
                               "(transformers.set_seed(args.seed)) before training")

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self.log_penalty or logs is None or model is None:
            return
        value = penalty_value(_unwrap(model))
        logs["rora_penalty"] = value
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["rora_penalty"] = value

    def on_train_end(self, args, state, control, model=None, **kwargs):
        inner = _unwrap(model)
        if self.rescale:
            layers = self.rescale_layers
            if layers is None:
                layers = getattr(getattr(inner, "rora_config", None), "rescale_layers", 3)
            self.scales = spectral_rescale_distributed_(inner, layers,
                                                        factor=self.rescale_factor)
        if self.save_dir is not None:
            save_rora_distributed(inner, self.save_dir)
        if self.export_peft_dir is not None:
            with full_adapters(inner):
                if is_main_process():
                    export_peft_adapter(inner, self.export_peft_dir)


def add_rora_callback(trainer, **kwargs) -> RoraTrainerCallback:
    """Create a :class:`RoraTrainerCallback` and put it first in ``trainer``'s callbacks
    (so the printer and reporters see ``rora_penalty``). Returns it."""
    cb = RoraTrainerCallback(**kwargs)
    trainer.callback_handler.callbacks.insert(0, cb)
    return cb
