"""Fine-tune a LLaMA causal LM with RoRA under the transformers Trainer.

    python examples/llama_trainer.py --tiny                       # CPU, seconds
    python examples/llama_trainer.py --model /path/to/llama-2-7b --bf16 \
        --gradient-checkpointing --batch-size 4 --grad-accum 4 --seq 512
    torchrun --nproc_per_node 2 examples/llama_trainer.py --tiny  # DDP through the Trainer

The recipe: apply_rora, a normal Trainer, and RoraTrainerCallback (rora_penalty in the
logs, spectral rescaling + save at the end). The penalty gradient is added once per optimizer
step by rora_fast's optimizer step hook, exact under --fp16's GradScaler too.
"""

import argparse
import json
import os
import sys

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import rora_fast  # noqa: E402
from rora_fast.trainer import add_rora_callback  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap, "llama_trainer")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--fp16", action="store_true")
    args = common.defaults(ap.parse_args(argv))
    model = common.build_model(args, dtype=torch.float16 if args.fp16 else None)
    data = common.build_dataset(args)
    targs = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.max_steps,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to=[], bf16=args.bf16, fp16=args.fp16,
        use_cpu=args.tiny or not torch.cuda.is_available(), seed=args.seed,
        ddp_broadcast_buffers=False, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=data)
    cb = add_rora_callback(trainer, save_dir=os.path.join(args.output_dir, "rora_adapter"),
                           export_peft_dir=os.path.join(args.output_dir, "peft_adapter"))
    result = trainer.train()
    if trainer.is_world_process_zero():
        logs = [h for h in trainer.state.log_history if "loss" in h]
        summary = {"first_loss": logs[0]["loss"], "last_loss": logs[-1]["loss"],
                   "rora_penalty": logs[-1]["rora_penalty"], "steps": result.global_step,
                   "rescaled": {k: round(v, 4) for k, v in (cb.scales or {}).items()},
                   "saved": os.path.join(args.output_dir, "rora_adapter")}
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
