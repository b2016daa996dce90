"""``rora-fast`` end to end on a minute-scale setting: a tiny random BERT (from a small
BertConfig) with the real MiniLM tokenizer, a few dozen samples, 1-2 steps."""
import glob
import json
import os

import pytest
import torch

from rora_fast.cli import build_parser, main

POISON_TINY = ["--poison-n-train", "40", "--poison-epochs", "1", "--poison-asr-threshold", "-1",
               "--poison-min-clean-acc", "0", "--threads", "1", "--device", "cpu"]
TINY = ["--n-train", "40", "--n-dev", "16", "--n-test", "24", "--epochs", "1",
        "--poison-n-train", "40", "--poison-epochs", "1", "--poison-asr-threshold", "-1",
        "--poison-min-clean-acc", "0", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification
    from rora_fast.loop import load_tokenizer
    path = str(tmp_path_factory.mktemp("tiny_bert"))
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                     num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _args(tiny_model, tmp_path, *extra):
    return ["--model", tiny_model, "--cache-dir", str(tmp_path / "cache"), *TINY, *extra]


def _poison_args(tiny_model, tmp_path, *extra):  # poison takes no defence options
    return ["--model", tiny_model, "--cache-dir", str(tmp_path / "cache"), *POISON_TINY, *extra]


@pytest.mark.parametrize("cmd", ["demo", "poison", "defend", "evaluate", "spectra",
                                 "rescale-sweep", "sweep", "seeds"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    assert "--seed" in capsys.readouterr().out


def test_defend_end_to_end_resume_and_cache(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["defend", *_args(tiny_model, tmp_path, "--methods", "lora,rora,fft",
                                "--out", str(out))])
    assert rc == 0
    runs = sorted(glob.glob(str(out / "runs" / "*.json")))
    defence = [json.load(open(p)) for p in runs]
    defence = [r for r in defence if r["kind"] == "defence"]
    assert sorted(r["spec"]["method"] for r in defence) == ["fft", "lora", "rora"]
    for r in defence:
        m = r["metrics"]
        assert set(m) >= {"CA", "ASR", "delta", "ASR_floor"}
        assert 0 <= m["CA"] <= 100 and 0 <= m["ASR"] <= 100
        assert m["delta"] == pytest.approx(m["CA"] - m["ASR"], abs=0.02)
        assert m["n_clean"] == 24 and m["n_triggered"] == r["sizes"]["nt_trig"] > 0
        assert r["train_log"]["steps"] == 2  # 40 rows, batch 32, one epoch
        assert r["sizes"]["train"] == 40 and r["sizes"]["dev"] == 16
        assert r["poison"]["n_poisoned"] == 15  # 0.375 * 40, target-label rows only
    rora = next(r for r in defence if r["spec"]["method"] == "rora")
    assert "before_rescale" in rora and len(rora["rescale"]) > 0
    # only layers inside transformer blocks are rescaled (the model has 2 blocks, top 3 asked)
    assert all(".layer." in k for k in rora["rescale"]) and len(rora["rescale"]) == 12
    assert len(rora["layer_spectra"]) > 0
    lora = next(r for r in defence if r["spec"]["method"] == "lora")
    assert lora["paper_bert"] == [92.0, 99.7, -7.7]
    md = (out / "results.md").read_text()
    # the preset (small) repairs after the rescaling: the row says so
    for method in ("| lora |", "| rora + repair |", "| fft |", "poisoned, no fine-tuning"):
        assert method in md
    png = out / "results.png"
    assert "(results.png)" in md and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    caches = os.listdir(tmp_path / "cache")
    assert len([c for c in caches if c.startswith("imdb-badnet-")]) == 1
    cache = tmp_path / "cache" / [c for c in caches if c.startswith("imdb-badnet-")][0]
    assert (cache / "model.safetensors").exists() and (cache / "poison.json").exists()
    capsys.readouterr()
    # second call: every run is skipped, the poisoned model is not rebuilt
    mtime = os.path.getmtime(cache / "model.safetensors")
    assert main(["defend", *_args(tiny_model, tmp_path, "--methods", "lora",
                                  "--out", str(out))]) == 0
    assert "skip" in capsys.readouterr().out
    assert os.path.getmtime(cache / "model.safetensors") == mtime


def test_spectra_writes_figures(tiny_model, tmp_path):
    out = tmp_path / "spec"
    rc = main(["spectra", *_args(tiny_model, tmp_path, "--methods", "rora:none,rora",
                                 "--scales", "1,8", "--n-eval", "20", "--out", str(out))])
    assert rc == 0
    for f in ("spectra.json", "fig1_spectral_ratio.png", "fig2_alignment.png",
              "fig3_scale_sweep.png"):
        assert (out / f).stat().st_size > 0
    data = json.load(open(out / "spectra.json"))
    assert [r["s"] for r in data["scale_sweep"]["rora"]] == [1.0, 8.0]
    layer = data["layer_spectra"]["rora"][0]
    assert layer["ratio"] > 0 and 0 <= layer["max_cos_left"] <= 1 + 1e-9


def test_rescale_sweep_on_dev(tiny_model, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["rescale-sweep", *_args(tiny_model, tmp_path, "--methods", "rora",
                                       "--layers", "0,1,2", "--out", str(out))])
    assert rc == 0
    data = json.load(open(out / "rescale_layers_dev.json"))
    rows = data["rescale_layer_sweep"]["rora"]
    assert [r["layers"] for r in rows] == [0, 1, 2]
    assert data["split"] == "dev" and data["sizes"]["test"] == 16  # measured on the dev rows
    assert rows[0]["median_scale"] is None and rows[1]["median_scale"] > 0
    assert (out / "rescale_layers_dev.png").stat().st_size > 0
    # the tiny BERT has 2 blocks: rescaling 2 and "all" (6) give the same model
    again = tmp_path / "again"
    assert main(["rescale-sweep", *_args(tiny_model, tmp_path, "--methods", "rora",
                                         "--layers", "2,6,2", "--out", str(again))]) == 0
    r2 = json.load(open(again / "rescale_layers_dev.json"))["rescale_layer_sweep"]["rora"]
    assert r2[0]["CA"] == r2[1]["CA"] == r2[2]["CA"] == rows[2]["CA"]
    capsys.readouterr()
    assert main(["rescale-sweep", *_args(tiny_model, tmp_path, "--methods", "lora")]) == 2
    assert "needs a rora_fast method" in capsys.readouterr().err
    assert main(["rescale-sweep", *_args(tiny_model, tmp_path, "--layers", "1,x")]) == 2
    assert "--layers must be" in capsys.readouterr().err


def test_param_sweep_reuses_runs_and_labels_them(tiny_model, tmp_path, capsys):
    base = tmp_path / "base"  # the default run, trained once by `defend`
    assert main(["defend", *_args(tiny_model, tmp_path, "--methods", "rora",
                                  "--out", str(base))]) == 0
    default = [json.load(open(p)) for p in glob.glob(str(base / "runs" / "*.json"))]
    default = next(r for r in default if r["kind"] == "defence")
    out = tmp_path / "sweep"
    capsys.readouterr()
    rc = main(["sweep", *_args(tiny_model, tmp_path, "--param", "weight_dropout",
                               "--values", "0.1,0.3", "--reuse", str(base), "--out", str(out))])
    assert rc == 0
    assert "reusing" in capsys.readouterr().out  # p = 0.1 was copied, not retrained
    data = json.load(open(out / "sweep_weight_dropout.json"))
    rows = data["rows"]
    assert [r["weight_dropout"] for r in rows] == [0.1, 0.3] and data["default"] == 0.1
    assert rows[0]["CA"] == default["metrics"]["CA"] and rows[0]["ASR"] == default["metrics"]["ASR"]
    trained = [json.load(open(out / r["run"])) for r in rows]
    assert [t["spec"]["weight_dropout"] for t in trained] == [0.1, 0.3]
    assert trained[1]["run_id"] != trained[0]["run_id"]
    md = open(out / "sweep_weight_dropout.md").read()
    assert "| 0.1 (default) |" in md and "| 0.3 |" in md
    assert "rora + repair (p=0.3)" in open(out / "results.md").read()  # labelled in the table
    assert (out / "sweep_weight_dropout.png").stat().st_size > 0
    # bad input
    assert main(["sweep", *_args(tiny_model, tmp_path, "--param", "lr")]) == 2
    assert "cannot sweep 'lr'" in capsys.readouterr().err
    assert main(["sweep", *_args(tiny_model, tmp_path, "--param", "ortho_rank")]) == 2
    assert "--values is required" in capsys.readouterr().err
    assert main(["sweep", *_args(tiny_model, tmp_path, "--param", "ortho_lambda",
                                 "--values", "1,x")]) == 2
    assert "--values must be" in capsys.readouterr().err
    assert main(["sweep", *_args(tiny_model, tmp_path, "--param", "weight_dropout",
                                 "--values", "0.1,1.5", "--out", str(tmp_path / "bad"))]) == 2
    assert "weight_dropout must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before any run started
    assert main(["sweep", *_args(tiny_model, tmp_path, "--param", "ortho_lambda",
                                 "--methods", "lora")]) == 2
    assert "needs a rora_fast method" in capsys.readouterr().err


def test_bad_input_clear_errors(tiny_model, tmp_path, capsys):
    assert main(["defend", *_args(tiny_model, tmp_path, "--task", "sst3")]) == 2
    assert "unknown dataset 'sst3'" in capsys.readouterr().err
    assert main(["defend", *_args(tiny_model, tmp_path, "--attack", "ripples")]) == 2
    assert "unknown attack 'ripples'" in capsys.readouterr().err
    assert main(["defend", *_args(tiny_model, tmp_path, "--methods", "lora,onion")]) == 2
    assert "unknown defence method 'onion'" in capsys.readouterr().err
    # a trigger the tokenizer cannot keep within max length
    long_trigger = " ".join(["word"] * 40)
    assert main(["poison", *_poison_args(tiny_model, tmp_path, "--trigger", long_trigger,
                                  "--poison-max-length", "16")]) == 2
    assert "cannot keep it" in capsys.readouterr().err
    # a corrupt cache: clear error, then --rebuild repairs it
    assert main(["poison", *_poison_args(tiny_model, tmp_path)]) == 0
    cache = glob.glob(str(tmp_path / "cache" / "imdb-badnet-*"))[0]
    with open(os.path.join(cache, "model.safetensors"), "wb") as f:
        f.write(b"garbage")
    capsys.readouterr()
    assert main(["poison", *_poison_args(tiny_model, tmp_path)]) == 2
    assert "unreadable" in capsys.readouterr().err
    assert main(["poison", *_poison_args(tiny_model, tmp_path, "--rebuild")]) == 0


def test_poisoning_failure_is_reported(tiny_model, tmp_path, capsys):
    rc = main(["poison", "--model", tiny_model, "--cache-dir", str(tmp_path / "c"),
               "--poison-n-train", "40", "--poison-epochs", "1", "--threads", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "did not produce a usable backdoor" in err
    assert not glob.glob(str(tmp_path / "c" / "*"))  # nothing cached


def test_plan_memory_subcommand_prints_prediction(capsys):
    from rora_fast.cli import main

    assert main(["plan-memory", "--model", "llama-7b", "--gpu-mem", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "llama-7b" in out and "fits in 24GB" in out


# ------------------------------------------------------------------ a new user's first hour
def test_top_level_help_lists_every_subcommand_plainly(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    import re
    for cmd in ("demo", "poison", "defend", "evaluate", "spectra", "rescale-sweep", "sweep",
                "seeds", "bias", "report", "train", "plan-memory"):
        assert len(re.findall(rf"\n    {cmd}[ \n]", out)) == 1, cmd  # listed once, with its help
    assert "``" not in out
    assert "runs/" in out  # where results go by default


def _help(cmd, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([cmd, "--help"])
    return capsys.readouterr().out


def test_each_subcommand_lists_only_its_options(capsys):
    poison = _help("poison", capsys)
    assert "--poison-epochs" in poison and "--seed" in poison
    for opt in ("--weight-dropout", "--ortho-lambda", "--n-train", "--lr", "--methods"):
        assert opt not in poison, opt
    ev = _help("evaluate", capsys)
    assert "--n-test" in ev and "--max-length" in ev
    assert "--weight-dropout" not in ev and "--epochs" not in ev and "--n-train" not in ev
    defend = _help("defend", capsys)
    assert "--weight-dropout" in defend and "--repair" in defend
    assert "cr (proxy mr)" in " ".join(defend.split())
    assert "imdb, mr, sst2_sentence, imdb" not in " ".join(defend.split())


def test_missing_model_is_one_clear_line(tmp_path, capsys):
    for model in ("/nonexistent/model", "./no/such/folder", "not-a-model"):
        assert main(["demo", "--model", model, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rora-fast demo: error: --model") and "\n" not in err, err
        assert "no such model folder" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["defend", "--model", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # every subcommand that takes a model checks it the same way (evaluate's PATH is a
    # saved folder: a hub-looking name is not accepted there either)
    for argv in (["evaluate", "/nonexistent/model"], ["evaluate", "org/name"],
                 ["poison", "--model", "/nonexistent/model"],
                 ["evaluate", "--model", "/nonexistent/model"]):
        assert main(argv + ["--out", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "no such model folder" in err and "\n" not in err and "Traceback" not in err
    assert main(["evaluate", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_default_output_folder_is_git_ignored():
    from rora_harness import cli
    assert cli.OUT_ROOT == "runs"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, ".gitignore")) as f:
        assert "/runs/" in f.read().split()


def test_plan_memory_unknown_model_lists_presets_without_network(capsys, monkeypatch):
    import transformers

    def no_network(*a, **k):  # pragma: no cover - the test fails if reached
        raise AssertionError("plan-memory tried to load a config")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_network)
    assert main(["plan-memory", "--model", "gpt-9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rora-fast plan-memory: error: --model 'gpt-9': unknown model")
    assert "llama-7b" in err and "llama-3-8b" in err and "\n" not in err


def test_plan_memory_needs_a_unit(capsys):
    assert main(["plan-memory", "--gpu-mem", "24"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-mem '24': give the size with its unit" in err
    assert main(["plan-memory", "--gpu-mem", "24GiB"]) == 0
    assert "fits in 24GiB" in capsys.readouterr().out


def test_plan_memory_help_names_the_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan-memory", "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: rora-fast plan-memory")
    from rora_fast import memory
    with pytest.raises(SystemExit):
        memory.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m rora_fast.memory")


def test_rora_training_shows_progress_while_computing_bases(tiny_model, capsys):
    """A bar (or a line) while the SVD bases are computed before RoRA training."""
    from rora_harness.defences import DefenceConfig, build_defence, parse_method
    from rora_fast.loop import load_model
    build_defence(load_model(tiny_model), parse_method("rora"),
                  DefenceConfig(target_modules="all-linear"))
    err = capsys.readouterr()
    assert "SVD bases" in err.err + err.out


def test_repair_with_a_method_without_rescaling_fails_before_any_run(tiny_model, tmp_path,
                                                                     capsys):
    assert main(["defend", *_args(tiny_model, tmp_path, "--methods", "rora,lora", "--repair",
                                  "--out", str(tmp_path / "o"))]) == 2
    assert "--repair undoes a bias of the rescaling" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_library_without_the_harness_names_it(monkeypatch, capsys):
    """The core alone (no harness installed: no entry point in rora_fast.commands) keeps its
    own subcommands, and a harness subcommand says where it comes from, in one line."""
    from rora_fast import cli
    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    assert main(["demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rora-fast: error: no subcommand 'demo' (have: train, plan-memory)")
    assert "pip install ./harness" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "--train-file" in capsys.readouterr().out


def test_harness_registers_its_subcommands_through_the_entry_point():
    from importlib.metadata import entry_points
    from rora_fast.cli import COMMAND_GROUP
    eps = [e for e in entry_points(group=COMMAND_GROUP) if e.value == "rora_harness.cli:register"]
    assert len(eps) == 1
    sub = build_parser()._subparsers._group_actions[0]
    assert {"demo", "poison", "defend", "evaluate", "spectra", "rescale-sweep", "sweep",
            "seeds", "bias", "report", "train", "plan-memory"} == set(sub.choices)


def test_version_and_subcommand_usage_lines(capsys):
    from rora_fast import __version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"rora-fast {__version__}"
    for cmd in ("defend", "seeds", "demo"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith(f"usage: rora-fast {cmd} [-h]"), first


def test_target_modules_checked_before_any_work(tiny_model, tmp_path, capsys, monkeypatch):
    """A target that matches nothing fails before poisoning or loading anything, with the
    library's error; one unmatched entry among matching ones is a warning naming it."""
    from rora_harness import poisoning
    def no_poisoning(*a, **kw):
        raise AssertionError("poisoning started before the options were checked")
    monkeypatch.setattr(poisoning, "poison_model", no_poisoning)
    import rora_harness.runner as runner
    monkeypatch.setattr(runner, "poison_model", no_poisoning)
    cache = str(tmp_path / "cache")
    for methods in ("rora", "lora"):
        rc = main(["defend", "--model", tiny_model, "--methods", methods, "--target-modules",
                   "nonexistent", "--cache-dir", cache, "--out", str(tmp_path / "o"), *TINY])
        err = capsys.readouterr().err
        assert rc == 2 and "--target-modules: target_modules ['nonexistent'] match no" in err
    assert not os.path.exists(cache) and not os.path.exists(tmp_path / "o")
    with pytest.warns(UserWarning, match=r"entries \['nonexistent'\] match no module"):
        with pytest.raises(AssertionError, match="poisoning started"):
            main(["defend", "--model", tiny_model, "--methods", "rora", "--target-modules",
                  "query,nonexistent", "--cache-dir", cache, *TINY])


def test_progress_is_quiet_when_redirected():
    """rora_fast.progress_bar: redrawn at most once a minute when its stream is not a
    terminal (a log file gets a few lines, not one per update); on a terminal, tqdm's own."""
    import io
    import time
    from rora_fast.progress import REDIRECTED_MININTERVAL, progress_bar

    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert progress_bar(range(3), file=Tty()).mininterval == 0.1
    out = io.StringIO()
    bar = progress_bar(range(40), file=out)
    assert bar.mininterval == REDIRECTED_MININTERVAL
    for _ in bar:
        time.sleep(0.01)  # 0.4 s: tqdm's default (0.1 s) would redraw about four times
        bar.set_postfix(loss="0.5", refresh=False)
    assert out.getvalue().count("\r") <= 2, out.getvalue()
