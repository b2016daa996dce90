"""RoRA under the transformers Trainer (CPU, tiny random LLaMA): the full objective,
once-per-step penalty under gradient accumulation, logging, rescaling, saving."""

import copy
import json

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import rora_fast
from rora_fast.trainer import RoraTrainerCallback, add_rora_callback
from tiny import ByteLMDataset, tiny_llama_config  # examples/tiny.py

STEPS, GA, BS, LR = 3, 2, 2, 0.05


class _SeqTrainer(Trainer):
    """Deterministic batch order, to compare with a hand-written loop."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def _model(p=0.0, lam=10.0, mode="optimizer"):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    rora_fast.apply_rora(model, rora_fast.RoraConfig(
        r=4, alpha=8, weight_dropout=p, ortho_rank=8, ortho_lambda=lam, rescale_layers=1,
        target_modules=["q_proj", "v_proj"], penalty_mode=mode))
    with torch.no_grad():  # B = 0 makes Ω's B-term vanish; start from a generic point
        for _, layer in rora_fast.rora_layers(model):
            layer.lora_B.normal_(0, 0.05)
    return model


def _data():
    return ByteLMDataset(n=STEPS * GA * BS, max_length=24)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BS,
                gradient_accumulation_steps=GA, max_steps=STEPS, learning_rate=LR,
                lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def _train(model, tmp_path, cb_kwargs=None, **args_kw):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    trainer = _SeqTrainer(model=model, args=_args(tmp_path, **args_kw),
                          train_dataset=_data(), optimizers=(opt, None))
    trainer.model_accepts_loss_kwargs = False  # plain mean loss / GA, like the loop below
    cb = add_rora_callback(trainer, **(cb_kwargs or dict(rescale=False)))
    trainer.train()
    return trainer, cb


def _manual(model, penalty="once"):
    """Hand-written loop with penalty_mode='loss' layers: λΩ added explicitly."""
    data = _data()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for step in range(STEPS):
        for m in range(GA):
            idx = range((step * GA + m) * BS, (step * GA + m + 1) * BS)
            batch = {k: torch.stack([data[i][k] for i in idx]) for k in data[0]}
            loss = model(**batch).loss / GA
            if penalty == "every-micro-batch":
                loss = loss + rora_fast.rora_penalty(model)
            loss.backward()
        if penalty == "once":
            rora_fast.rora_penalty(model).backward()
        opt.step()
        opt.zero_grad()
    return model


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def test_trainer_trains_full_objective_once_per_step(tmp_path):
    trainer, _ = _train(_model(), tmp_path)
    got = _adapters(trainer.model)
    want = _adapters(_manual(_model(mode="loss"), "once"))
    _assert_same(got, want)
    # The test can tell: penalty on every micro-batch (or none) gives another result.
    twice = _adapters(_manual(_model(mode="loss"), "every-micro-batch"))
    none = _adapters(_manual(_model(lam=0.0, mode="loss"), "none"))
    for other in (twice, none):
        diff = max((got[k] - other[k]).abs().max().item() for k in got)
        assert diff > 1e-4


def test_callback_penalty_mode_sets_the_layers(tmp_path):
    """The callback's penalty_mode="optimizer" on a model built with it changes nothing;
    the removed name "backward" and unknown names are refused."""
    a, _ = _train(_model(mode="optimizer"), tmp_path / "a")
    b, cb = _train(_model(), tmp_path / "b",
                   cb_kwargs=dict(rescale=False, penalty_mode="optimizer"))
    assert all(layer.penalty_mode == "optimizer" for _, layer in rora_fast.rora_layers(b.model))
    _assert_same(_adapters(a.model), _adapters(b.model))
    for bad in ("sometimes", "backward"):
        with pytest.raises(ValueError, match="penalty_mode"):
            RoraTrainerCallback(penalty_mode=bad)


def test_callback_logs_rescales_saves_and_exports(tmp_path):
    model = _model(p=0.1)
    trainer, cb = _train(model, tmp_path, cb_kwargs=dict(
        save_dir=tmp_path / "rora", export_peft_dir=tmp_path / "peft"))
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == STEPS
    assert all("rora_penalty" in h and h["rora_penalty"] > 0 for h in logged)
    # the logged value is λΣΩ at log time (after the last step)
    assert logged[-1]["rora_penalty"] == pytest.approx(
        float(rora_fast.rora_penalty(model)), rel=1e-5)
    # rescaling of the last block (rescale_layers=1)
    assert set(cb.scales) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    layers = dict(rora_fast.rora_layers(model))
    assert layers["model.layers.1.self_attn.q_proj"].rescaled
    assert not layers["model.layers.0.self_attn.q_proj"].rescaled
    # saved adapters load back exactly, rescaled scaling included
    fresh = LlamaForCausalLM(tiny_llama_config())
    fresh.load_state_dict(model.state_dict(), strict=False)
    rora_fast.load_rora(fresh, tmp_path / "rora")
    for name, layer in rora_fast.rora_layers(fresh):
        assert layer.scaling == layers[name].scaling
        torch.testing.assert_close(layer.lora_A, layers[name].lora_A, atol=0, rtol=0)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"


def test_callback_requires_rora_layers(tmp_path):
    model = LlamaForCausalLM(tiny_llama_config())
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_data())
    add_rora_callback(trainer)
    with pytest.raises(ValueError, match="no RoRA layers"):
        trainer.train()


def test_trainer_bf16_autocast_with_checkpointing(tmp_path):
    """bf16 autocast on the CPU + gradient checkpointing: trains, loss finite."""
    model = _model(p=0.1)
    from common import enable_checkpointing  # examples/common.py: the name this transformers has
    enable_checkpointing(model)
    before = _adapters(model)
    trainer, _ = _train(model, tmp_path, bf16=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    after = _adapters(model)
    assert all(after[k].dtype == torch.float32 for k in after)
    assert any((after[k] - before[k]).abs().max() > 0 for k in after)
