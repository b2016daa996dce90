"""Issue 31: ``rora-fast train`` / :func:`rora_fast.finetune` on the user's own model and
data: file formats and columns, clear errors before any training, the outputs (a merged
model that loads and predicts without rora_fast, the adapters, the report), resume, a
tiny LLaMA without a pad token, and the same result as the harness's defence."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from rora_fast import FinetuneConfig, finetune, save_finetuned
from rora_fast.cli import main
from rora_fast import Example
from rora_harness.data import load_dataset

ROWS = load_dataset("sst2_sentence", "train", limit=48, seed=3)
FAST = ["--epochs", "1", "--max-length", "24", "--ortho-rank", "4", "--batch-size", "16",
        "--threads", "1"]


def _write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _pairs_csv(path, n=48):
    """Two text columns (a sentence pair: the text, then its first three words) and
    string labels."""
    return _write_csv(path, ["premise", "hint", "verdict"],
                      [[e.text, " ".join(e.text.split()[:3]), "good" if e.label else "bad"]
                       for e in ROWS[:n]])


def _run(args, capsys):
    rc = main(["train"] + args)
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------ errors, before training
@pytest.mark.parametrize("case, match", [
    ("missing-file", "--train-file .*no such file"),
    ("missing-column", "no column 'sentence' \\(columns: premise, hint, verdict\\)"),
    ("missing-label-column", "no column 'stars'"),
    ("not-text", "column 'n' must hold text; row 0 is a int"),
    ("single-class", "single class"),
    ("too-many-classes", "3 classes .* the model's head has 2 outputs"),
    ("bad-validation-label", "row 0 has label 'meh', which the training rows do not have"),
    ("empty", "cannot be read|no rows"),
    ("bad-format", "unknown format '.txt'"),
    ("three-text-columns", "one column, or two"),
    ("target-label", "--target-label 'ok' is not a label"),
])
def test_bad_input_fails_before_training_and_names_it(case, match, tmp_path, capsys,
                                                      make_tiny_bert, monkeypatch):
    model = make_tiny_bert(1)
    import rora_fast.finetuning as ft
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: pytest.fail("training started"))
    good = _pairs_csv(tmp_path / "good.csv")
    args = {"train": good, "cols": ["--text-column", "premise", "--text-column", "hint"],
            "label": "verdict", "extra": []}
    if case == "missing-file":
        args["train"] = str(tmp_path / "nope.csv")
    elif case == "missing-column":
        args["cols"] = ["--text-column", "sentence"]
    elif case == "missing-label-column":
        args["label"] = "stars"
    elif case == "not-text":
        args["train"] = _write_csv(tmp_path / "n.csv", ["n", "verdict"], [[1, "good"], [2, "bad"]])
        args["cols"] = ["--text-column", "n"]
    elif case == "single-class":
        args["train"] = _write_csv(tmp_path / "s.csv", ["premise", "hint", "verdict"],
                                   [["a b", "a", "good"], ["c d", "c", "good"]])
    elif case == "too-many-classes":
        args["train"] = _write_csv(tmp_path / "t.csv", ["premise", "hint", "verdict"],
                                   [["a b", "a", "good"], ["c d", "c", "bad"], ["e", "e", "meh"]])
    elif case == "bad-validation-label":
        val = _write_csv(tmp_path / "v.csv", ["premise", "hint", "verdict"], [["x y", "x", "meh"]])
        args["extra"] = ["--validation-file", val]
    elif case == "empty":
        args["train"] = _write_csv(tmp_path / "e.csv", ["premise", "hint", "verdict"], [])
    elif case == "bad-format":
        (tmp_path / "d.txt").write_text("hello")
        args["train"] = str(tmp_path / "d.txt")
    elif case == "three-text-columns":
        args["cols"] += ["--text-column", "verdict"]
    elif case == "target-label":
        args["extra"] = ["--check-trigger", "cf", "--target-label", "ok"]
    out = tmp_path / "out"
    rc, _, err = _run(["--model", model, "--train-file", args["train"], *args["cols"],
                       "--label-column", args["label"], "--out", str(out), *args["extra"],
                       *FAST], capsys)
    assert rc == 2, err
    assert "rora-fast train: error:" in err
    import re
    assert re.search(match, err), err
    assert not (out / "model").exists()


def test_missing_model_and_pad_token_errors(tmp_path, capsys, make_tiny_bert):
    good = _pairs_csv(tmp_path / "good.csv")
    rc, _, err = _run(["--model", str(tmp_path / "no-model"), "--train-file", good,
                       "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "no such model folder" in err
    # a tokenizer with neither a pad nor an eos token cannot be fixed
    from transformers import AutoTokenizer
    path = make_tiny_bert(1)
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = None
    tok.save_pretrained(path)
    cfg = json.load(open(os.path.join(path, "tokenizer_config.json")))
    assert cfg.get("pad_token") is None
    rc, _, err = _run(["--model", path, "--train-file", good, "--text-column", "premise",
                       "--label-column", "verdict", "--out", str(tmp_path / "o")] + FAST, capsys)
    assert rc == 2 and "no pad token and no end-of-sequence token" in err


def test_finetune_refuses_bad_rows_and_leaves_the_model_as_it_was(make_tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = make_tiny_bert(1)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [([("a", 0), ("b", 0)], "single class"),
             ([("a", 0), ("b", 5)], "do not fit the model's head"),
             ([("a", "pos"), ("b", "neg")], "must be an int class index"),
             ([(3, 1), ("b", 0)], "must be a string or a pair"),
             ([], "no rows")]
    for rows, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            finetune(model, tok, rows, config=FinetuneConfig(epochs=1, ortho_rank=4))
    with pytest.raises(ValueError, match="rescale must be one of"):
        FinetuneConfig(rescale="magic")
    assert not hasattr(model, "rora_config")
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ formats
def _table_files(tmp_path):
    import datasets
    rows = [{"text": e.text, "label": "pos" if e.label else "neg"} for e in ROWS[:12]]
    ds = datasets.Dataset.from_list(rows)
    files = {"csv": _write_csv(tmp_path / "d.csv", ["text", "label"],
                               [[r["text"], r["label"]] for r in rows]),
             "tsv": _write_csv(tmp_path / "d.tsv", ["text", "label"],
                               [[r["text"], r["label"]] for r in rows], delimiter="\t")}
    with open(tmp_path / "d.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    files["jsonl"] = str(tmp_path / "d.jsonl")
    ds.to_parquet(str(tmp_path / "d.parquet"))
    files["parquet"] = str(tmp_path / "d.parquet")
    ds.save_to_disk(str(tmp_path / "disk"))
    files["disk"] = str(tmp_path / "disk")
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    files["dict"] = str(tmp_path / "dict")
    return files, rows


def test_every_format_reads_the_same_rows(tmp_path):
    from rora_fast.userdata import read_table, rows_from_table
    files, rows = _table_files(tmp_path)
    want = None
    for kind, path in files.items():
        got, labels = rows_from_table(read_table(path), ["text"], "label", None, kind)
        assert [e.text for e in got] == [r["text"] for r in rows], kind
        assert labels.to_id == {"neg": 0, "pos": 1}
        want = want or got
        assert got == want
    with pytest.raises(ValueError, match="without a 'validation' split \\(it has train\\)"):
        read_table(files["dict"], "validation", "--validation-file")


def test_string_labels_follow_the_models_own_label_names():
    from rora_fast.userdata import label_map_for
    m = label_map_for(["positive", "negative"], 2, {0: "positive", 1: "negative"})
    assert m.to_id == {"positive": 0, "negative": 1}       # the checkpoint's own order
    m = label_map_for(["b", "a"], 2, {0: "LABEL_0", 1: "LABEL_1"})
    assert m.to_id == {"a": 0, "b": 1} and m.id2label == {0: "a", 1: "b"}
    m = label_map_for([1, 0, 1], 3, None)
    assert m.to_id == {0: 0, 1: 1} and m.id2label == {0: "0", 1: "1", 2: "LABEL_2"}
    with pytest.raises(ValueError, match="negative label"):
        label_map_for([-1, 0], 2)


# ------------------------------------------------------------------ outputs
_FRESH = r"""
import sys, json
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "rora_fast" or name.startswith("rora_fast."):
            raise ImportError("rora_fast is not importable here")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path, texts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
firsts = [t[0] if isinstance(t, list) else t for t in texts]
seconds = [t[1] for t in texts] if isinstance(texts[0], list) else None
enc = tok(firsts, seconds, padding=True, truncation=True, max_length=24, return_tensors="pt")
with torch.no_grad():
    logits = model(**enc).logits
assert "rora_fast" not in sys.modules
print(json.dumps({"logits": logits.tolist(), "id2label": model.config.id2label}))
"""


def _fresh_logits(path, texts):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    out = subprocess.run([sys.executable, "-c", _FRESH, path, json.dumps(texts)], env=env,
                         capture_output=True, text=True, cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_sentence_pairs_string_labels_outputs_and_fresh_process(tmp_path, capsys,
                                                                    make_tiny_bert):
    path = make_tiny_bert(2)
    train = _pairs_csv(tmp_path / "train.csv")
    out = tmp_path / "out"
    rc, stdout, err = _run(["--model", path, "--train-file", train, "--text-column", "premise",
                            "--text-column", "hint", "--label-column", "verdict", "--out",
                            str(out), "--check-trigger", "cf", "--check-trigger", "mn",
                            "--target-label", "bad", "--rescale-layers", "1",
                            "--rescale", "paper", "--rescale-factor", "0.5"] + FAST, capsys)
    assert rc == 0, err
    assert "held out" in stdout  # no validation file: the command says what it held out
    for f in ("model/config.json", "model/model.safetensors", "adapter", "peft-adapter/"
              "adapter_config.json", "report.json", "report.md", "report.png"):
        assert (out / f).exists(), f
    assert not (out / "checkpoint").exists()
    rep = json.load(open(out / "report.json"))
    assert rep["rows"] == {"train": 43, "validation": 5}
    assert set(rep["validation_accuracy"]) == {"trained", "rescaled", "final"}
    assert len(rep["rescale"]) == 6 and all(v > 0 for v in rep["amplification"].values())
    assert rep["config"]["rescale_factor"] == 0.5
    assert [c["trigger"] for c in rep["trigger_checks"]] == ["cf", "mn"]
    assert all(c["target"] == 0 for c in rep["trigger_checks"])  # 'bad' is class 0 (sorted)
    assert rep["data"]["label2id"] == {"bad": 0, "good": 1}
    # the merged model, loaded and run where rora_fast cannot be imported
    texts = [[e.text, " ".join(e.text.split()[:3])] for e in ROWS[:6]]
    fresh = _fresh_logits(str(out / "model"), texts)
    assert fresh["id2label"] == {"0": "bad", "1": "good"}
    # ... predicts what the adapter does: the saved RoRA adapter on the original model
    import rora_fast
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    base = AutoModelForSequenceClassification.from_pretrained(path)
    rora_fast.load_rora(base, str(out / "adapter"))
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok([t[0] for t in texts], [t[1] for t in texts], padding=True, truncation=True,
              max_length=24, return_tensors="pt")
    with torch.no_grad():
        ref = base.eval()(**enc).logits
    assert torch.allclose(torch.tensor(fresh["logits"]), ref, atol=1e-4)
    # ... and the PEFT export on the original model with unmodified PEFT
    from peft import PeftModel
    peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(path),
                                     str(out / "peft-adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(peft(**enc).logits, ref, atol=1e-4)
    # a finished folder is not overwritten
    rc, _, err = _run(["--model", path, "--train-file", train, "--text-column", "premise",
                       "--label-column", "verdict", "--out", str(out)] + FAST, capsys)
    assert rc == 2 and "holds a finished run" in err


def test_python_api_with_datasets_and_jsonl(tmp_path, make_tiny_bert):
    """The notebook door: datasets.Dataset rows with string labels, an explicit
    validation table, the adaptive rescale; the label map lands in the model's config."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = make_tiny_bert(2)
    files, _ = _table_files(tmp_path)
    train = datasets.load_dataset("json", data_files=files["jsonl"], split="train")
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    rep = finetune(model, tok, train, train.select(range(6)),
                   FinetuneConfig(epochs=1, ortho_rank=4, max_length=24, rescale="adaptive",
                                  rescale_layers=1), progress=False, log=lambda *a: None)
    assert rep["rows"] == {"train": 12, "validation": 6} and rep["notes"] == []
    assert model.config.label2id == {"neg": 0, "pos": 1}
    assert rep["adaptive_rescale"]["steps"] and "final" in rep["validation_accuracy"]
    paths = save_finetuned(model, tok, str(tmp_path / "o"), rep)
    assert os.path.isdir(paths["model"]) and not hasattr(model, "rora_config")


# ------------------------------------------------------------------ one method, two doors
@pytest.mark.parametrize("rescale", [{}, {"rescale": "paper", "rescale_factor": 0.5}],
                         ids=["defaults", "paper-x0.5"])
def test_finetune_equals_the_harness_defence(make_tiny_bert, tmp_path, monkeypatch, rescale):
    """The same rows, settings and seed through ``rora-fast defend`` (run_defence) and
    through :func:`finetune`: the same trained adapter, the same rescale (the defaults'
    adaptive rescale judged after the repair; the paper's rule at a factor) and the same
    repair."""
    from safetensors.torch import load_file
    from rora_harness import runner
    from rora_harness.poisoning import load_poisoned
    from rora_harness.runner import RunSpec, run_defence, run_id
    sets_seen = {}
    real_prepare = runner.prepare_sets

    def spy(*a, **k):
        sets = real_prepare(*a, **k)
        sets_seen.update(sets)
        return sets
    monkeypatch.setattr(runner, "prepare_sets", spy)
    spec = RunSpec(task="cr", attack="badnet", method="rora", preset="small", seed=2,
                   model=make_tiny_bert(2), n_train=24, n_dev=16, n_test=16, epochs=2,
                   max_length=32, poison_n_train=16, poison_epochs=1,
                   poison_asr_threshold=-1.0, poison_min_clean_acc=0.0, repair=True,
                   ortho_rank=4, **rescale)
    res = run_defence(spec, str(tmp_path / "out"), str(tmp_path / "cache"),
                      adapter_dir=str(tmp_path / "adapters"), log=lambda *a: None)
    harness_adapter = load_file(str(tmp_path / "adapters" / (run_id(spec) + ".safetensors")))
    poisoned_dir = os.path.join(str(tmp_path / "cache"), res["poison"]["key"])
    model, tok, _ = load_poisoned(poisoned_dir)
    adapters = {}
    import rora_fast.finetuning as ft
    real_spectra = ft._spectra

    def grab(m):  # the trained state, before any rescale (what the harness saves)
        adapters.update({n: p.detach().clone() for n, p in m.named_parameters()
                         if p.requires_grad})
        return real_spectra(m)
    monkeypatch.setattr(ft, "_spectra", grab)
    rep = finetune(model, tok, sets_seen["train"], sets_seen["dev"],
                   FinetuneConfig(epochs=2, max_length=32, ortho_rank=4, seed=2, **rescale),
                   progress=False, log=lambda *a: None)
    assert set(adapters) == set(harness_adapter)
    for n, t in harness_adapter.items():
        assert torch.equal(adapters[n], t), n
    assert rep["rescale"] == pytest.approx(res["rescale"], rel=1e-12)
    if not rescale:  # the defaults: the same adaptive choice, judged after the repair
        assert rep["adaptive_rescale"]["after_repair"] and rep["adaptive_rescale"]["steps"] == \
            res["adaptive_rescale"]["steps"]
    assert rep["repair"]["bias_shift"] == res["repair"]["bias_shift"]
    assert rep["train_log"]["dev_history"] == res["train_log"]["dev_history"]


# ------------------------------------------------------------------ resume
def test_resume_continues_exactly(make_tiny_bert, tmp_path, monkeypatch):
    """Killed after epoch 1 of 3 and resumed: the same final state as the uninterrupted
    run (batches, masks, optimizer and schedule carried by the checkpoint)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    import rora_fast.loop as loop
    path = make_tiny_bert(1)
    cfg = FinetuneConfig(epochs=3, ortho_rank=4, max_length=24, batch_size=16)
    rows = [(e.text, e.label) for e in ROWS]

    def run(ckpt, resume=False):
        model = AutoModelForSequenceClassification.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        rep = finetune(model, tok, rows, None, cfg, checkpoint=ckpt, resume=resume,
                       progress=False, log=lambda *a: None)
        return rep, {n: p.detach().clone() for n, p in model.named_parameters()}

    full_rep, full = run(None)
    ckpt = str(tmp_path / "ck.safetensors")
    real_save, calls = loop.save_checkpoint, []

    def killed_after_first(*a, **k):
        real_save(*a, **k)
        calls.append(1)
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(loop, "save_checkpoint", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    rep, state = run(ckpt, resume=True)
    assert calls == [1]
    assert rep["train_log"]["dev_history"] == full_rep["train_log"]["dev_history"]
    for n in full:
        assert torch.equal(full[n], state[n]), n
    # a checkpoint of another run is refused
    with pytest.raises(ValueError, match="belongs to another run"):
        model = AutoModelForSequenceClassification.from_pretrained(path)
        finetune(model, AutoTokenizer.from_pretrained(path), rows[:40], None, cfg,
                 checkpoint=ckpt, resume=True, progress=False, log=lambda *a: None)


# ------------------------------------------------------------------ a LLaMA without pad
def _tiny_llama_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast
    words = sorted({w for e in ROWS for w in e.text.lower().split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    assert tok.pad_token is None
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=2, bos_token_id=1, pad_token_id=None, num_labels=2))
    path = str(tmp_path / "tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_tiny_llama_without_pad_token(tmp_path, capsys):
    path = _tiny_llama_folder(tmp_path)
    train = _write_csv(tmp_path / "t.csv", ["text", "label"],
                       [[e.text.lower(), e.label] for e in ROWS])
    out = tmp_path / "out"
    # LLaMA's score head has no bias: the default repair is refused before any training
    rc, _, err = _run(["--model", path, "--train-file", train, "--out", str(out),
                       "--rescale-layers", "1"] + FAST, capsys)
    assert rc == 2 and "has no bias" in err and "--no-repair" in err
    assert not out.exists() or not any(out.iterdir())
    rc, stdout, err = _run(["--model", path, "--train-file", train, "--out", str(out),
                            "--rescale-layers", "1", "--no-repair"] + FAST, capsys)
    assert rc == 0, err
    assert "padding with its eos token '</s>'" in stdout
    texts = [e.text.lower() for e in ROWS[:5]]
    fresh = _fresh_logits(str(out / "model"), texts)
    assert len(fresh["logits"]) == 5
    cfg = json.load(open(out / "model" / "config.json"))
    assert cfg["pad_token_id"] == 2


def test_bf16_autocast_trains_on_the_cpu(make_tiny_bert):
    """precision="bf16" (the CUDA default) forced on the CPU: the training forward runs under
    autocast, on every machine."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = make_tiny_bert(1)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    rep = finetune(model, AutoTokenizer.from_pretrained(path), [(e.text, e.label) for e in ROWS],
                   None, FinetuneConfig(epochs=1, ortho_rank=4, max_length=24,
                                        precision="bf16", rescale_layers=1),
                   progress=False, log=lambda *a: None)
    assert rep["train_log"]["loss_first"] is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_load_in_4bit_writes_a_float_model_equal_to_the_adapter(tmp_path, capsys,
                                                               make_tiny_bert):
    """--load-in-4bit (bitsandbytes NF4 on the CPU): the merged model is written in float
    (dequantized base + update), loads without rora_fast or bitsandbytes' quantization, and
    computes what the trained adapter computes on the 4-bit base."""
    pytest.importorskip("bitsandbytes")
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              BitsAndBytesConfig)
    import rora_fast
    path = make_tiny_bert(2)
    train = _write_csv(tmp_path / "t.csv", ["text", "label"], [[e.text, e.label] for e in ROWS])
    out = tmp_path / "out"
    rc, _, err = _run(["--model", path, "--train-file", train, "--out", str(out),
                       "--load-in-4bit", "--rescale-layers", "1"] + FAST, capsys)
    assert rc == 0, err
    cfg = json.load(open(out / "model" / "config.json"))
    assert "quantization_config" not in cfg
    texts = [e.text for e in ROWS[:8]]
    fresh = _fresh_logits(str(out / "model"), texts)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype=torch.float32,
                           llm_int8_skip_modules=["classifier", "score"])
    base = AutoModelForSequenceClassification.from_pretrained(path, quantization_config=q)
    rora_fast.load_rora(base, str(out / "adapter"))
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        ref = base.eval()(**enc).logits
    assert torch.allclose(torch.tensor(fresh["logits"]), ref, atol=1e-4)
