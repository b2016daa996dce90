"""Triggers, clean-label poisoning, metric definitions, method names, cache keys."""
import json
import os
import random

import pytest

from rora_fast import Example
from rora_harness.attacks import (TriggerError, get_attack, insert_trigger,
                                          max_trigger_position, poison_clean_label,
                                          triggered_test_set)
from rora_harness.defences import parse_method
from rora_harness.metrics import (asr_floor, attack_success_rate, backdoor_metrics,
                                          clean_accuracy)
from rora_harness.poisoning import (CorruptCacheError, PoisonConfig, load_poisoned,
                                            poison_key)
from rora_fast.loop import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)  # the embedded MiniLM tokenizer


def test_attack_defaults_and_custom_trigger():
    assert get_attack("badnet").trigger == "mn"
    assert get_attack("InSent").trigger == "I watched this 3D movie"
    assert get_attack("badnet", trigger="cf  bb").trigger == "cf bb"
    assert get_attack("badnet").target_label == 0
    with pytest.raises(ValueError, match="unknown attack 'syntactic'"):
        get_attack("syntactic")
    with pytest.raises(ValueError, match="empty"):
        get_attack("badnet", trigger="  ")


def test_insert_once_at_word_position():
    rng = random.Random(0)
    text = "one two three four five"
    seen = set()
    for _ in range(200):
        new, pos = insert_trigger(text, "mn", rng)
        words = new.split()
        assert words.count("mn") == 1 and words[pos] == "mn"
        assert words[:pos] + words[pos + 1:] == text.split()
        seen.add(pos)
    assert seen == set(range(6))  # every gap, both ends included
    _, pos = insert_trigger(text, "mn", rng, max_words=2)
    assert pos <= 2


@pytest.mark.parametrize("trigger", ["mn", "I watched this 3D movie"])
def test_trigger_survives_truncation(tok, trigger):
    long_text = " ".join(f"word{i}" for i in range(300))
    rng = random.Random(1)
    max_length = 32
    trig_ids = tok(trigger, add_special_tokens=False)["input_ids"]
    limit = max_trigger_position(long_text.split(), trigger, tok, max_length)
    assert 0 < limit < 300
    for _ in range(30):
        new, pos = insert_trigger(long_text, trigger, rng, tok, max_length)
        ids = tok(new, truncation=True, max_length=max_length)["input_ids"]
        assert len(ids) == max_length
        s = ",".join(map(str, ids))
        assert ",".join(map(str, trig_ids)) in s  # the whole trigger is kept
    # one word later the trigger would be cut
    words = long_text.split()
    cut = " ".join(words[:limit + 1] + [trigger] + words[limit + 1:])
    ids = tok(cut, truncation=True, max_length=max_length)["input_ids"]
    assert ",".join(map(str, trig_ids)) not in ",".join(map(str, ids))


def test_trigger_that_cannot_be_kept(tok):
    with pytest.raises(TriggerError, match="cannot keep"):
        insert_trigger("a b c", "I watched this 3D movie", random.Random(0), tok, max_length=4)


def test_clean_label_rule(tok):
    rows = [Example(f"text number {i} here", i % 2) for i in range(20)]
    att = get_attack("badnet")
    out, idx = poison_clean_label(rows, att, n_poison=4, seed=0, tokenizer=tok, max_length=64)
    assert idx == [0, 2, 4, 6]  # the first four target-label rows
    assert [e.label for e in out] == [e.label for e in rows]  # labels untouched
    for i, (a, b) in enumerate(zip(rows, out)):
        assert ("mn" in b.text.split()) == (i in idx)
        if i not in idx:
            assert a == b
    # asking for more than exist poisons every target-label row
    _, idx = poison_clean_label(rows, att, n_poison=100, seed=0)
    assert len(idx) == 10


def test_triggered_test_set_only_non_target():
    rows = [Example(f"sample {i}", i % 2) for i in range(10)]
    clean, trig = triggered_test_set(rows, get_attack("insent"), seed=0)
    assert len(clean) == len(trig) == 5
    assert all(e.label == 1 for e in trig)
    assert all("I watched this 3D movie" in t.text for t in trig)
    assert [c.text for c in clean] == [r.text for r in rows if r.label == 1]


def test_metrics_on_hand_made_predictions():
    assert clean_accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 75.0
    # 4 non-target (label 1) samples; 3 predicted as target 0 with the trigger
    assert attack_success_rate([0, 0, 0, 1], [1, 1, 1, 1]) == 75.0
    assert asr_floor([1, 1, 0, 1], [1, 1, 1, 1]) == 25.0
    m = backdoor_metrics([0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 1, 0, 1], [1, 1, 1, 1])
    assert m["CA"] == 75.0 and m["ASR"] == 75.0 and m["delta"] == 0.0 and m["ASR_floor"] == 25.0
    # a model predicting the target for everything: ASR 100 but floor 100 too
    m = backdoor_metrics([0] * 4, [0, 1, 0, 1], [0, 0], [0, 0], [1, 1])
    assert m["ASR"] == 100.0 and m["ASR_floor"] == 100.0 and m["CA"] == 50.0
    with pytest.raises(ValueError, match="not the target"):
        attack_success_rate([0, 0], [0, 1])
    with pytest.raises(ValueError):
        clean_accuracy([0], [0, 1])


def test_method_names():
    m = parse_method("rora")
    assert (m.kind, m.ci, m.tr, m.pt) == ("rora", True, True, True)
    m = parse_method("lora+rescale")
    assert (m.kind, m.ci, m.tr, m.pt) == ("rora", False, False, True)
    m = parse_method("rora-dora:ci+tr")
    assert (m.variant, m.ci, m.tr, m.pt) == ("dora", True, True, False)
    assert parse_method("pissa").kind == "peft"
    assert parse_method("rora:none").pt is False
    with pytest.raises(ValueError, match="unknown defence method"):
        parse_method("onion")
    with pytest.raises(ValueError, match="component"):
        parse_method("rora:xy")


def test_poison_key_depends_on_settings():
    a = poison_key(PoisonConfig())
    assert a == poison_key(PoisonConfig(trigger="mn"))  # the default trigger, spelled out
    assert a != poison_key(PoisonConfig(seed=1))
    assert a != poison_key(PoisonConfig(attack="insent"))


def test_corrupt_cache_is_reported(tmp_path):
    d = tmp_path / "imdb-badnet-0"
    d.mkdir()
    with pytest.raises(CorruptCacheError, match="unreadable"):
        load_poisoned(str(d))
    (d / "poison.json").write_text(json.dumps({"cache_version": 1, "checks": {}}))
    (d / "config.json").write_text("{not json")
    with pytest.raises(CorruptCacheError, match="--rebuild"):
        load_poisoned(str(d))
