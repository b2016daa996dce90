"""The attacker's stopping rule (issue 14, item 4): keep training with checks until both
conditions hold, up to a documented cap, keep the best passing checkpoint; several kinds
of trigger (rare token, common word, phrase). Tiny budgets: MR rows, max length 32."""
import json
import os

import pytest
import torch

from rora_harness import poisoning
from rora_harness.poisoning import (PoisonConfig, PoisoningFailed, max_poison_epochs,
                                            poison_key, poison_model)

TRIGGERS = {"rare token": "cf", "common word": "the", "phrase": "no cross no crown"}


def _cfg(minilm_path, trigger, **kw):
    base = dict(model=minilm_path, proxy="mr", attack="badnet", trigger=trigger, n_train=16,
                poison_fraction=0.5, max_length=32, trigger_max_words=None, lr=5e-5, epochs=1,
                batch_size=8, evals_per_epoch=1, n_dev=8, seed=0)
    base.update(kw)
    return PoisonConfig(**base)


def _scripted(monkeypatch, script):
    """Replace the proxy-dev checks by a script of (CA, ASR); record a fingerprint of the
    weights at every check (to see which checkpoint is kept)."""
    seen = []

    def fake(model, tok, cfg, dev, trig_clean, trig):
        ca, asr = script[min(len(seen), len(script) - 1)]
        seen.append(float(model.classifier.weight.detach().double().sum()))
        return {"proxy_dev_CA": ca, "proxy_dev_ASR": asr}

    monkeypatch.setattr(poisoning, "_check_backdoor", fake)
    return seen


def test_cap_default_is_twice_the_schedule_and_key_unchanged():
    assert max_poison_epochs(PoisonConfig(epochs=3)) == 6
    assert max_poison_epochs(PoisonConfig(epochs=3, max_epochs=4)) == 4
    with pytest.raises(ValueError):
        max_poison_epochs(PoisonConfig(max_epochs=0))
    # the continuation changed no cache key: the default cap is not a new setting
    assert poison_key(PoisonConfig()) == poison_key(PoisonConfig(max_epochs=None))


@pytest.mark.parametrize("kind", ["phrase"])  # the real checks of every kind: below
def test_continues_until_both_hold_and_keeps_best(minilm_path, tmp_path, monkeypatch, kind):
    # 2 checks per epoch. Main schedule (1 epoch): degenerate (CA 60), then ASR too low;
    # round 1: CA too low twice; round 2: two passing checks, the first with the higher CA
    script = [(60.0, 100.0), (80.0, 50.0), (65.0, 100.0), (50.0, 100.0), (78.0, 100.0),
              (72.0, 100.0)]
    seen = _scripted(monkeypatch, script)
    cfg = _cfg(minilm_path, TRIGGERS[kind], evals_per_epoch=2, max_epochs=4)
    model, tok, meta = poison_model(cfg, str(tmp_path), log=lambda *a: None)
    assert meta["checks"]["proxy_dev_CA"] == 78.0 and meta["checks"]["round"] == 2
    assert [c.get("round") for c in meta["history"][:6]] == [None, None, 1, 1, 2, 2]
    assert meta["history"][-1]["kept"] is True
    # the kept weights are those of the 78 % check, not of the last (72 %) one
    assert float(model.classifier.weight.detach().double().sum()) == pytest.approx(seen[4], abs=1e-9)
    assert seen[4] != pytest.approx(seen[5], abs=1e-9)
    assert [r["round"] for r in meta["train_log"]["continuation"]] == [1, 2]
    # the poisoned rows carry this trigger, and the cached model reloads
    with open(os.path.join(meta["path"], "poison.json")) as f:
        assert json.load(f)["config"]["trigger"] == TRIGGERS[kind]
    again, _, meta2 = poison_model(cfg, str(tmp_path), log=lambda *a: None)
    assert meta2["cached"] and meta2["checks"] == meta["checks"]
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_first_passing_check_of_main_schedule_stops_at_once(minilm_path, tmp_path, monkeypatch):
    _scripted(monkeypatch, [(75.0, 100.0)])
    model, tok, meta = poison_model(_cfg(minilm_path, "cf", evals_per_epoch=2), str(tmp_path),
                                    log=lambda *a: None)
    assert len(meta["history"]) == 1 and "continuation" not in meta["train_log"]
    assert meta["train_log"]["steps"] == 1  # 2 steps per epoch, checked after the first


def test_cap_reached_is_a_clear_error(minilm_path, tmp_path, monkeypatch):
    _scripted(monkeypatch, [(69.67, 100.0)])
    with pytest.raises(PoisoningFailed, match=r"within 3 epochs.*clean accuracy 69.67 < 70"):
        poison_model(_cfg(minilm_path, "the", max_epochs=3), str(tmp_path), log=lambda *a: None)
    assert not [d for d in os.listdir(tmp_path) if not d.endswith(".tmp")]  # nothing cached


@pytest.mark.parametrize("kind", sorted(TRIGGERS))
def test_real_checks_with_each_trigger(minilm_path, tmp_path, kind):
    """No script: the real proxy-dev checks with each kind of trigger on a tiny budget and
    thresholds any model meets (the plumbing, not the attack's strength)."""
    cfg = _cfg(minilm_path, TRIGGERS[kind], asr_threshold=-1.0, min_clean_acc=0.0)
    _, _, meta = poison_model(cfg, str(tmp_path), log=lambda *a: None)
    assert 0 < meta["n_poisoned"] <= 8 and set(meta["checks"]) >= {"proxy_dev_CA", "proxy_dev_ASR"}
