"""The tiny LLaMA set-up of the examples' ``--tiny`` runs and of the tests: a 2-block
``LlamaConfig`` with a byte vocabulary, and causal-LM examples of real sentences
tokenised as UTF-8 bytes (no tokenizer, no download). Runs on a CPU in seconds.

The examples import it as ``tiny`` (their folder is on ``sys.path``); the tests do too
(``tests/conftest.py`` puts ``examples/`` on ``sys.path``)."""

import torch

from rora_harness.data import load_dataset


def tiny_llama_config(**overrides):
    """A tiny ``LlamaConfig`` (2 blocks, hidden 64, byte vocabulary) for CPU runs."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=ByteLMDataset.VOCAB, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, pad_token_id=ByteLMDataset.PAD,
              bos_token_id=ByteLMDataset.BOS, eos_token_id=ByteLMDataset.EOS,
              tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


class ByteLMDataset(torch.utils.data.Dataset):
    """Causal-LM examples from real sentences, tokenised as UTF-8 bytes (no tokenizer
    download): ``[BOS] bytes [EOS]``, cut or padded to ``max_length``; padding is
    ignored by the loss (label -100). Sentences come from the shipped SST-2 train
    split by default."""

    VOCAB, PAD, BOS, EOS = 259, 256, 257, 258

    def __init__(self, sentences=None, n: int = 32, max_length: int = 32):
        if sentences is None:
            sentences = [e.text for e in load_dataset("sst2_sentence", "train", limit=n)]
        self.items = []
        for s in list(sentences)[:n]:
            ids = [self.BOS] + list(s.encode("utf-8"))[: max_length - 2] + [self.EOS]
            pad = max_length - len(ids)
            input_ids = torch.tensor(ids + [self.PAD] * pad)
            labels = torch.tensor(ids + [-100] * pad)
            mask = torch.tensor([1] * len(ids) + [0] * pad)
            self.items.append({"input_ids": input_ids, "attention_mask": mask,
                               "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]
