"""Shared fixtures: a tiny Llama teacher with a real (locally trained) byte-level BPE tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CORPUS_SOURCES = ("json/decoder.py", "textwrap.py", "string.py")  # Python stdlib: text that every machine has


def _stdlib_text() -> list[str]:
    root = Path(os.__file__).parent
    return [(root / name).read_text() for name in CORPUS_SOURCES]


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_stdlib_text(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """HF dir with a random tiny Llama (vocab = tokenizer size) and its tokenizer.

    The LM head is scaled up so next-token distributions are peaked like a trained model's (entropy of a few
    nats) instead of near-uniform; otherwise top-k reconstruction error would be trivially small.
    """
    from tests._tiny import tiny_llama31

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = _train_tokenizer(384)
    model = tiny_llama31(seed=0, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def stdlib_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(_stdlib_text()))
    return path


# Longest files first (as measured on 2 cores): `make test`'s two workers take files in collection order, so the
# quick demo (~4 min) and the architectures run (~2.5 min) overlap the rest instead of running last, alone.
FIRST = ("test_demo.py", "test_architectures.py", "test_train.py", "test_launch.py", "test_memory.py",
         "test_export.py", "test_precompute.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: file order kept otherwise
