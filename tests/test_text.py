"""pack_text's tokenization of the corpus and the errors of the readers built on it (too little text)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megadistil.data.packed import PackedTextBatches, eval_sequences
from megadistil.data.text import pack_text
from megadistil.tiny import EOS, train_bpe_tokenizer

DOCS = [f"the quick {EOS} brown fox", "jumps over", f"{EOS}the lazy dog{EOS}"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(["the quick brown fox jumps over the lazy dog"] * 8, 300)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_special_token_text_in_the_corpus_is_text(tok, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(DOCS) + "\n")
    assert tok.eos_token_id in tok(DOCS[0], add_special_tokens=False)["input_ids"]  # what the default would give
    ids = np.concatenate(list(pack_text([path], tok, 4, drop_last=False))).tolist()
    want = [t for doc in DOCS for t in [*_ids(tok, doc), tok.eos_token_id]]
    assert ids == want
    ends = np.cumsum([len(_ids(tok, doc)) + 1 for doc in DOCS]) - 1
    assert np.flatnonzero(np.asarray(ids) == tok.eos_token_id).tolist() == ends.tolist()  # only the separators


def test_chat_text_spells_control_tokens_when_told(tok, tmp_path):
    """split_special_tokens=False (data.split_special_tokens=false): text that spells a special token, as a chat
    template's does, is that control token, in training text, held-out text and preference rows alike."""
    from megadistil.data.preference import preference_sequences

    path = tmp_path / "chat.txt"
    path.write_text("\n".join(DOCS) + "\n")
    control = [t for doc in DOCS for t in [*tok(doc, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    assert control.count(tok.eos_token_id) == 3 + 3  # the spelled ones and the separators
    ids = np.concatenate(list(pack_text([path], tok, 4, drop_last=False, split_special_tokens=False))).tolist()
    assert ids == control
    held_out = eval_sequences([str(path)], tok, 4, 100, split_special_tokens=False)
    assert held_out.ravel().tolist() == control[:len(control) // 4 * 4]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": f"the quick {EOS}", "chosen": "brown fox", "rejected": "x"}) + "\n")
    seqs, _, _ = preference_sequences([rows], tok, 16, split_special_tokens=False)
    want = [*tok(f"the quick {EOS}brown fox", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert want.count(tok.eos_token_id) == 2 and seqs[0, :len(want)].tolist() == want  # the spelled one, the row's end


def test_too_little_text_names_the_files_and_counts_the_tokens(tok, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the quick brown fox\n")
    b.write_text("jumps over the lazy dog\n")
    n = len(_ids(tok, "the quick brown fox")) + len(_ids(tok, "jumps over the lazy dog")) + 2
    kw = {"batch_size": 1, "rank": 0, "world_size": 1, "seed": 0}
    assert len(PackedTextBatches.from_files([str(a), str(b)], tok, n, **kw).seqs) == 1  # exactly one window fits
    assert len(eval_sequences([str(a), str(b)], tok, n, 4)) == 1
    for what, make in (("data.text", lambda: PackedTextBatches.from_files([str(a), str(b)], tok, n + 1, **kw)),
                       ("held-out text", lambda: eval_sequences([str(a), str(b)], tok, n + 1, 4))):
        with pytest.raises(ValueError) as e:
            make()
        assert str(e.value) == (f"{what} ({a}, {b}) holds {n} tokens (with an EOS after each document): fewer than "
                                f"one sequence of seq_len={n + 1}")
