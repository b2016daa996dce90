"""The harness's training batches (issue 29, its speed-up): random batching feeds the model
exactly the tensors the original loop fed it (same rows, same order, same padding), and
length-grouped batching sees every row once per epoch with far less padding."""
import random

import pytest
import torch

from rora_fast import Example
from rora_harness.runner import RunSpec, run_id
from rora_fast.loop import (TrainConfig, epoch_batches, load_tokenizer,
                                           pad_rows, tokenize_rows, train)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _rows(n=203, seed=0):
    rng = random.Random(seed)
    words = "good bad movie plot actor scene boring great long short film story".split()
    return [Example(" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))), i % 2)
            for i in range(n)]


def _original_batches(n, batch_size, rng):
    """The loop every committed run used: a permutation per epoch, consecutive cuts."""
    order = list(range(n))
    rng.shuffle(order)
    return [order[a:a + batch_size] for a in range(0, n, batch_size)]


def test_random_batches_are_the_original_order():
    for seed in (0, 3):
        a, b = random.Random(seed), random.Random(seed)
        for _ in range(3):  # epochs: the rng advances the same way
            assert epoch_batches(203, 32, a) == _original_batches(203, 32, b)


def test_grouped_batches_cover_each_row_once_with_less_padding():
    rng = random.Random(1)
    lengths = [rng.randint(2, 64) for _ in range(1000)]
    batches = epoch_batches(1000, 32, random.Random(0), lengths, group_size=8)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert sum(len(b) != 32 for b in batches) <= -(-1000 // (8 * 32))  # one short per group
    assert epoch_batches(1000, 32, random.Random(0), lengths, 8) == batches  # seeded

    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)
    assert padded(batches) < 0.75 * padded(epoch_batches(1000, 32, random.Random(0)))
    with pytest.raises(ValueError, match="group_size"):
        epoch_batches(10, 4, random.Random(0), lengths[:10], group_size=0)


def test_pretokenised_batch_equals_tokenizer_call(tok):
    texts = [e.text for e in _rows(40)]
    rows = tokenize_rows(tok, texts, 16)
    for idx in ([0, 5, 7], list(range(40)), [39]):
        want = tok([texts[i] for i in idx], truncation=True, max_length=16, padding=True,
                   return_tensors="pt")
        got = pad_rows(tok, [rows[i] for i in idx], "cpu")
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_train_feeds_the_original_tensors(tok, make_tiny_bert):
    """Random batching: every step's input_ids are exactly what the original loop built
    (tokenizer on the permuted texts), so same seed -> same run as before the change."""
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(make_tiny_bert(1))
    data = _rows(70)
    seen = []
    model.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    cfg = TrainConfig(lr=1e-3, epochs=2, batch_size=16, max_length=24)
    train(model, tok, data, cfg, seed=5)
    rng = random.Random(5)
    want = []
    for _ in range(2):
        for idx in _original_batches(len(data), 16, rng):
            want.append(tok([data[i].text for i in idx], truncation=True, max_length=24,
                            padding=True, return_tensors="pt")["input_ids"])
    assert len(seen) == len(want)
    assert all(torch.equal(a, b) for a, b in zip(seen, want))


def test_grouped_train_runs_and_pads_less(tok, make_tiny_bert):
    from transformers import AutoModelForSequenceClassification
    data = _rows(128)
    widths = {}
    for grouped in (False, True):
        model = AutoModelForSequenceClassification.from_pretrained(make_tiny_bert(1))
        seen = []
        model.register_forward_pre_hook(
            lambda m, args, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True)
        log = train(model, tok, data, TrainConfig(lr=1e-3, epochs=1, batch_size=8,
                                                  max_length=48, group_by_length=grouped,
                                                  group_size=4), seed=0)
        assert log["steps"] == 16
        widths[grouped] = sum(seen)
    assert widths[True] < 0.8 * widths[False]


def test_group_by_length_keeps_existing_run_ids():
    """Off, the new field is not hashed: the committed runs keep their ids;
    on, the run is another run."""
    base = RunSpec(task="sst2_sentence", method="rora", preset="small", seed=0, epochs=4,
                   rescale="paper", repair=False,
                   group_by_length=False)  # as the committed run was made
    # the id of the committed run benchmarks/results/eval/seeds-sst2_sentence-badnet/runs/
    assert run_id(base) == "sst2_sentence-badnet-rora-small-s0-ae179c069b"
    on = RunSpec(task="sst2_sentence", method="rora", preset="small", seed=0, epochs=4,
                 rescale="paper", repair=False, group_by_length=True)
    assert run_id(on) != run_id(base)
    assert "group_by_length" not in base.resolved()


def test_poisoned_baseline_is_evaluated_once_per_poisoned_model(make_tiny_bert, tmp_path,
                                                                 monkeypatch):
    """The poisoned model's metrics before fine-tuning are kept beside the cached poisoned
    model: a second results folder copies them instead of evaluating again (same values)."""
    import json
    import os
    from rora_harness import runner
    calls = []
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    spec = RunSpec(task="cr", attack="badnet", method="lora", preset="small", seed=0,
                   model=make_tiny_bert(1), n_train=16, n_dev=16, n_test=24, epochs=1,
                   max_length=32, poison_n_train=16, poison_epochs=1,
                   poison_asr_threshold=-1.0, poison_min_clean_acc=0.0)
    cache = str(tmp_path / "cache")
    a = runner.run_defence(spec, str(tmp_path / "a"), cache, log=lambda *x: None)
    assert len(calls) == 2  # the baseline, then the defended model
    b = runner.run_defence(spec, str(tmp_path / "b"), cache, log=lambda *x: None)
    assert len(calls) == 3  # the defended model only
    assert a["poisoned_baseline"] == b["poisoned_baseline"]
    copies = [f for f in os.listdir(tmp_path / "b" / "runs") if f.startswith("poisoned-")]
    assert len(copies) == 1
    with open(tmp_path / "b" / "runs" / copies[0]) as f:
        assert json.load(f)["metrics"] == a["poisoned_baseline"]


def test_training_bar_is_not_redrawn_every_step_when_redirected(tok, make_tiny_bert,
                                                                monkeypatch):
    """stderr redirected (a log file): a training run writes a few states of its bar, not
    one per step (rora_fast.progress_bar; the loss postfix does not force a redraw)."""
    import io
    import sys
    import time
    from transformers import AutoModelForSequenceClassification
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    model = AutoModelForSequenceClassification.from_pretrained(make_tiny_bert(1))
    model.register_forward_hook(lambda *a: time.sleep(0.03))  # 20 steps >= 0.6 s
    log = train(model, tok, _rows(160), TrainConfig(lr=1e-3, epochs=1, batch_size=8,
                                                   max_length=24), seed=0)
    assert log["steps"] == 20
    assert err.getvalue().count("train:") <= 3, err.getvalue()[-500:]


def test_micro_batches_keep_the_step_and_pad_less(tok, make_tiny_bert):
    """micro_batches k: the same rows per step and the same gradient (dropout off), in k
    forwards of rows of similar length (fewer padded tokens)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from transformers import AutoModelForSequenceClassification
    data = _rows(64)
    grads, widths, losses = {}, {}, {}
    for k in (1, 4):
        model = AutoModelForSequenceClassification.from_pretrained(make_tiny_bert(1))
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        seen = []
        model.register_forward_pre_hook(
            lambda m, args, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True)
        got = []
        handle = register_optimizer_step_pre_hook(lambda opt, a, kw: got.append(
            [p.grad.clone() for g in opt.param_groups for p in g["params"]]))
        try:
            log = train(model, tok, data, TrainConfig(lr=1e-3, epochs=1, batch_size=16,
                                                      max_length=48, micro_batches=k,
                                                      max_steps=1, select_on_dev=False),
                        seed=0)
        finally:
            handle.remove()
        assert log["steps"] == 1 and len(seen) == k
        grads[k], widths[k], losses[k] = got[0], sum(seen), log["loss_first"]
    for a, b in zip(grads[1], grads[4]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert losses[4] == pytest.approx(losses[1], rel=1e-4)
    assert widths[4] < 0.8 * widths[1]
    for bad in (0, 17, 2.0, True):
        with pytest.raises(ValueError, match="micro_batches"):
            train(model, tok, data, TrainConfig(batch_size=16, micro_batches=bad), seed=0)


def test_micro_batches_split_by_length():
    from rora_fast.loop import micro_batches
    lengths = [5, 1, 9, 3, 7, 2, 8]
    assert micro_batches([0, 1, 2], 1, None) == [([0, 1, 2], 1.0)]
    parts = micro_batches(list(range(7)), 3, lengths)
    assert [p for p, _ in parts] == [[1, 5], [3, 0], [4, 6, 2]]
    assert sum(w for _, w in parts) == pytest.approx(1.0)
    assert [p for p, _ in micro_batches([0, 1], 4, lengths)] == [[1], [0]]


def test_micro_batches_through_every_door():
    """One option, one meaning: RunSpec (preset default 1, not hashed: run ids unchanged),
    FinetuneConfig and both command lines refuse a bad value up front."""
    from rora_fast.finetuning import FinetuneConfig
    base = RunSpec(task="sst2_sentence", method="rora", preset="small", seed=0)
    assert "micro_batches" not in base.resolved()
    four = RunSpec(task="sst2_sentence", method="rora", preset="small", seed=0, micro_batches=4)
    assert four.resolved()["micro_batches"] == 4 and run_id(four) != run_id(base)
    for bad in (0, 33, 1.5):
        with pytest.raises(ValueError, match="micro_batches"):
            RunSpec(method="rora", micro_batches=bad).resolved()
        with pytest.raises(ValueError, match="micro_batches"):
            FinetuneConfig(micro_batches=bad)
    assert FinetuneConfig().micro_batches == 1
