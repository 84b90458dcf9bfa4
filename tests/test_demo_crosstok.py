"""The cross-tokenizer demo's measure: bits per byte places models with different tokenizers on one scale."""

from __future__ import annotations

import math

import pytest

from megadistil.demo import TEACHER_ASSET, split_corpus
from megadistil.demo_crosstok import bits_per_byte, heldout_nll, student_bytes


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    return split_corpus(tmp_path_factory.mktemp("corpus"))["heldout"]


def test_bits_per_byte_from_a_perplexity_equals_the_direct_measure(heldout):
    """A student's per-token perplexity turned into bits per byte (how the report places the students) equals what
    the direct held-out pass measures on the same sequences and model."""
    direct = heldout_nll(TEACHER_ASSET, heldout, seq_len=128, sequences=6)
    assert 1.0 < direct["ppl"] < 1000
    converted = bits_per_byte(direct["ppl"], heldout, TEACHER_ASSET, seq_len=128, sequences=6)
    assert converted == pytest.approx(direct["bits_per_byte"], rel=1e-9)
    assert 0.5 < converted < 8  # a trained model on code: a few bits per byte, not per token


def test_student_bytes_counts_the_predicted_text():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TEACHER_ASSET)
    text = "def f(x):\n    return x + 1  # naïve\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seq = [tok.eos_token_id, *ids, tok.eos_token_id]
    assert student_bytes(tok, seq) == len(text.encode()) + 1  # the first token is context; the EOS counts one
    assert math.isclose(student_bytes(tok, seq[1:]), len(text.encode()) - len(tok.decode(ids[:1]).encode()) + 1)
