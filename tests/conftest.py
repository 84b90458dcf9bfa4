"""Shared fixtures: a tiny Llama teacher with a real (locally trained) byte-level BPE tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite's two workers share the cores with the ranks and tools their tests start. After each parallel region,
# libgomp's idle threads spin (GOMP_SPINCOUNT: milliseconds) before they sleep: spinning, they held a core that the
# other worker's processes needed, a quarter of the suite's CPU time (2-core Xeon slowed to the AVX2-only EPYC's GEMM
# speeds: pytest 10:59 -> 8:20, CPU 18.3 -> 13.4 min). Set before torch loads libgomp; a user's own setting wins;
# subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

CORPUS_SOURCES = ("json/decoder.py", "textwrap.py", "string.py")  # Python stdlib: text that every machine has


def _stdlib_text() -> list[str]:
    root = Path(os.__file__).parent
    return [(root / name).read_text() for name in CORPUS_SOURCES]


def _train_tokenizer(vocab_size: int, split_digits: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:  # other merges than the default tokenizer's, not only fewer
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_stdlib_text(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


def _tiny_model_dir(out: Path, tok, *, seed: int, head_scale: float) -> Path:
    """An HF dir: a random tiny Llama-3.1 (vocab = the tokenizer's) with its head scaled, and the tokenizer."""
    from tests._tiny import tiny_llama31

    model = tiny_llama31(seed=seed, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """HF dir with a random tiny Llama (vocab = tokenizer size) and its tokenizer.

    The LM head is scaled up so next-token distributions are peaked like a trained model's (entropy of a few
    nats) instead of near-uniform; otherwise top-k reconstruction error would be trivially small.
    """
    return _tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), _train_tokenizer(384), seed=0, head_scale=20.0)


@pytest.fixture(scope="session")
def crosstok_teacher_dir(tmp_path_factory) -> Path:
    """A teacher with another tokenizer trained on the same text: a larger vocabulary with digits split, so its
    boundaries are neither finer nor coarser than the student's (a BPE with a prefix of another's merges would only
    refine it, and align everywhere). Its head is
    scaled 3x more than the tiny teacher's: sharper distributions than the student's, a direction ULD (which
    compares sorted probabilities) can learn within a few steps of a test run."""
    tok = _train_tokenizer(512, split_digits=True)
    return _tiny_model_dir(tmp_path_factory.mktemp("crosstok_teacher"), tok, seed=2, head_scale=60.0)


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A preference-tuned teacher's reference: the tiny teacher with its weights moved a little (same tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("reference")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * param.std() * torch.randn_like(param))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def preference_file(tmp_path_factory) -> Path:
    """Preference JSON lines from stdlib text: a few lines of prompt, the next lines chosen, lines elsewhere rejected."""
    import json

    lines = [ln for text in _stdlib_text() for ln in text.splitlines() if ln.strip()]
    rows = [{"prompt": "\n".join(lines[i:i + 3]), "chosen": "\n".join(lines[i + 3:i + 6]),
             "rejected": "\n".join(lines[i + 40:i + 43])} for i in range(0, 600, 6)]
    path = tmp_path_factory.mktemp("preference") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def stdlib_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(_stdlib_text()))
    return path


# Longest files first (as measured on 2 cores, ~220 s down to ~60 s each), the order in which `make test`'s two workers
# take them (see the Makefile).
FIRST = ("test_demo.py", "test_train.py", "test_architectures.py", "test_gguf.py", "test_launch.py",
         "test_export.py", "test_memory.py", "test_precompute.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: file order kept otherwise
