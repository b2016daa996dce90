"""Fine-tune a LLaMA causal LM with RoRA under torchrun: DDP (default) or FSDP2.

    torchrun --nproc_per_node 2 examples/llama_ddp.py --tiny              # CPU, gloo
    torchrun --nproc_per_node 2 examples/llama_ddp.py --tiny --fsdp       # FSDP2 on CPU
    torchrun --nproc_per_node 8 examples/llama_ddp.py --model /path/to/llama-2-7b \
        --gradient-checkpointing --batch-size 4 --grad-accum 4 --seq 512 [--fsdp]

A plain training loop, unchanged by RoRA: the layers add the penalty gradient once per
optimizer step (also across the micro-batches of no_sync / set_requires_gradient_sync
accumulation) and DDP's / FSDP's gradient averaging keeps it exactly λ∇Ω. Every rank
is seeded the same, so the weight masks agree across ranks (checked at start-up).
"""

import argparse
import contextlib
import inspect
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import rora_fast  # noqa: E402
from rora_fast.distributed import (penalty_value, rng_in_sync, save_rora_distributed,  # noqa: E402
                                   spectral_rescale_distributed_)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap, "llama_ddp")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    args = common.defaults(ap.parse_args(argv))
    cuda = torch.cuda.is_available() and not args.tiny
    if "RANK" not in os.environ:  # plain `python`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT="29512")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(args.seed)  # the same on every rank: same init, same mask seeds
    model = common.build_model(args).to(device)
    data = common.build_dataset(args)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The SVD-basis buffers are equal on every rank: no buffer sync in forward.
        # (torch 2.13 renamed broadcast_buffers, with a FutureWarning per rank.)
        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                   else {"broadcast_buffers": False})
        wrapped = DDP(model, device_ids=[device.index] if cuda else None, **no_sync)
    sampler = torch.utils.data.distributed.DistributedSampler(data, world, rank,
                                                              shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, sampler=sampler,
                                         drop_last=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    if not rng_in_sync():
        raise RuntimeError("ranks' CPU generators differ: weight masks would differ")

    model.train()
    step, micro, losses, epoch = 0, 0, [], 0
    while step < args.max_steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            last = (micro + 1) % args.grad_accum == 0
            if args.fsdp:
                model.set_requires_gradient_sync(last)
                ctx = contextlib.nullcontext()
            else:
                ctx = contextlib.nullcontext() if last else wrapped.no_sync()
            with ctx:  # forward and backward inside no_sync
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    loss = wrapped(**batch).loss / args.grad_accum
                loss.backward()
            micro += 1
            if last:
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                total = loss.detach() * args.grad_accum
                dist.all_reduce(total)
                pen = penalty_value(model)
                losses.append(total.item() / world)
                if rank == 0:
                    print(f"step {step}: loss {losses[-1]:.4f} rora_penalty {pen:.4f}",
                          flush=True)
                if step >= args.max_steps:
                    break
        epoch += 1
    scales = spectral_rescale_distributed_(model)
    save_rora_distributed(model, os.path.join(args.output_dir, "rora_adapter"))
    if rank == 0:
        print(json.dumps({"world": world, "engine": "fsdp2" if args.fsdp else "ddp",
                          "first_loss": losses[0], "last_loss": losses[-1],
                          "rescaled": len(scales),
                          "saved": os.path.join(args.output_dir, "rora_adapter")}))
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
