"""RoRA under DDP and FSDP2 with 2 CPU processes on gloo (torch.multiprocessing).

DDP: the same update as one process on the combined batch (gradient accumulation
with no_sync; λ > 0 so the penalty's once-per-step rule is exercised; the average of
the ranks' ``g_r + λ∇Ω`` is ``mean(g) + λ∇Ω``), for p = 0 and, because every rank
draws the same mask seeds from identically seeded CPU generators, for p > 0 too.
FSDP2 (fully_shard): trains a tiny LLaMA (frozen sharded base, adapters, bases as
plain buffers) to the single-process result and saves with save_rora.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import rora_fast

WORLD, GA, ROWS, STEPS, LR = 2, 2, 3, 2, 0.1


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, port):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    return dist


def _shutdown(dist):
    """Leave a worker cleanly once its results are on disk.

    Both ranks meet at a barrier, the group is destroyed, and the process exits
    without interpreter finalisation: gloo's worker threads, torn down during
    finalisation, can abort the process ("terminate called without an active
    exception", SIGABRT) after the test's work is done (seen once in CI).
    """
    import gc
    import sys

    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------- DDP
def _mlp(p):
    torch.manual_seed(0)
    layers = [rora_fast.RoraLinear.from_linear(nn.Linear(24, 40), r=4, ortho_rank=8,
                                               weight_dropout=p, ortho_lambda=3.0),
              nn.Tanh(),
              rora_fast.RoraLinear.from_linear(nn.Linear(40, 8), r=4, ortho_rank=8,
                                               weight_dropout=p, ortho_lambda=3.0)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_B.normal_(0, 0.3)
    return model


def _mlp_data():
    g = torch.Generator().manual_seed(1)
    # [step, micro-batch, rank*rows, features]
    x = torch.randn(STEPS, GA, WORLD * ROWS, 24, generator=g)
    y = torch.randn(STEPS, GA, WORLD * ROWS, 8, generator=g)
    return x, y


def _mlp_train(model, rank=None):
    """rank None: one process on the combined batch; else this rank's rows (DDP)."""
    x, y = _mlp_data()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    torch.manual_seed(42)  # the mask seeds: the same stream on every rank
    for s in range(STEPS):
        for m in range(GA):
            rows = slice(None) if rank is None else slice(rank * ROWS, (rank + 1) * ROWS)
            ctx = model.no_sync() if (rank is not None and m < GA - 1) else _null()
            with ctx:
                loss = (model(x[s, m, rows]) - y[s, m, rows]).pow(2).mean() / GA
                loss.backward()
        opt.step()
        opt.zero_grad()
    return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _ddp_worker(rank, port, p, out):
    dist = _init(rank, port)
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_mlp(p), broadcast_buffers=False)
    state = _mlp_train(model, rank)
    from rora_fast.distributed import rng_in_sync

    state["_rng_in_sync"] = torch.tensor(rng_in_sync())
    torch.save(state, os.path.join(out, f"ddp{rank}.pt"))
    del model
    _shutdown(dist)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_ddp_equals_one_process_on_combined_batch(tmp_path, p):
    mp.spawn(_ddp_worker, args=(_port(), p, str(tmp_path)), nprocs=WORLD, join=True)
    want = _mlp_train(_mlp(p))
    init = dict(_mlp(p).named_parameters())
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"ddp{rank}.pt")
        assert bool(got.pop("_rng_in_sync"))
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
            if "lora" not in k:  # frozen base untouched
                assert torch.equal(got[k], init[k].detach())
    # sanity: the adapters did move, and λ matters at this tolerance
    assert (want["0.lora_A"] - init["0.lora_A"]).abs().max() > 1e-3


# ---------------------------------------------------------------------- FSDP2
def _llama():
    from transformers import LlamaForCausalLM

    from tiny import tiny_llama_config  # examples/tiny.py

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64))
    rora_fast.apply_rora(model, rora_fast.RoraConfig(
        r=4, ortho_rank=8, weight_dropout=0.0, ortho_lambda=5.0, rescale_layers=1,
        target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in rora_fast.rora_layers(model):
            layer.lora_B.normal_(0, 0.05)
    return model


def _lm_batches():
    """[step][micro-batch][rank * 2 + j] -> one example (real SST-2 sentences)."""
    from tiny import ByteLMDataset  # examples/tiny.py

    per = WORLD * 2
    data = ByteLMDataset(n=STEPS * GA * per, max_length=16)
    items = [{k: v.unsqueeze(0) for k, v in data[i].items()} for i in range(len(data))]
    return [[items[(s * GA + m) * per:(s * GA + m + 1) * per] for m in range(GA)]
            for s in range(STEPS)]


def _rows(batches, s, m, ranks):
    rows = [batches[s][m][r * 2 + j] for r in ranks for j in range(2)]
    return {k: torch.cat([b[k] for b in rows]) for k in rows[0]}


def _lm_train(model, rank=None):
    batches = _lm_batches()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    ranks = range(WORLD) if rank is None else [rank]
    for s in range(STEPS):
        for m in range(GA):
            if rank is not None:
                model.set_requires_gradient_sync(m == GA - 1)
            (model(**_rows(batches, s, m, ranks)).loss / GA).backward()
        opt.step()
        opt.zero_grad()


def _fsdp_worker(rank, port, out):
    dist = _init(rank, port)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from rora_fast.distributed import penalty_value, save_rora_distributed

    model = _llama()
    U0 = model.model.layers[0].self_attn.q_proj.ortho_U.clone()
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q.lora_A, DTensor) and isinstance(q.weight, DTensor)
    assert not q.weight.requires_grad and not isinstance(q.ortho_U, DTensor)
    _lm_train(model, rank)
    assert torch.equal(q.ortho_U, U0)  # non-persistent bases: plain, unchanged
    pen = penalty_value(model)
    save_rora_distributed(model, os.path.join(out, "rora"))
    full_w = q.weight.full_tensor()
    if rank == 0:
        torch.save({"penalty": pen, "q0_weight": full_w}, os.path.join(out, "fsdp.pt"))
    del model, q
    _shutdown(dist)


@pytest.mark.timeout(180)
def test_fsdp2_trains_and_saves(tmp_path):
    mp.spawn(_fsdp_worker, args=(_port(), str(tmp_path)), nprocs=WORLD, join=True)
    want = _llama()
    base_w = want.model.layers[0].self_attn.q_proj.weight.detach().clone()
    _lm_train(want)
    got = _llama()
    rora_fast.load_rora(got, tmp_path / "rora")
    wl, gl = dict(rora_fast.rora_layers(want)), dict(rora_fast.rora_layers(got))
    for name in wl:
        for k in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(gl[name], k), getattr(wl[name], k),
                                       atol=1e-6, rtol=1e-5, msg=f"{name}.{k}")
    info = torch.load(tmp_path / "fsdp.pt")
    assert info["penalty"] == pytest.approx(float(rora_fast.rora_penalty(want)), rel=1e-5)
    assert torch.equal(info["q0_weight"], base_w)  # frozen base unchanged
    moved = (wl["model.layers.0.self_attn.q_proj"].lora_A
             - _llama().model.layers[0].self_attn.q_proj.lora_A).abs().max()
    assert moved > 1e-4
