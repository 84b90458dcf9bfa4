"""`make demo-generate`'s prompts: the slice cut into seq_len-token pieces whose first tokens the teacher continues."""

from __future__ import annotations

from megadistil.demo import TEACHER_ASSET, write_docs
from megadistil.demo_generate import prompt_pieces
from megadistil.tiny import stdlib_files


def test_prompt_pieces_cut_each_document_into_whole_token_pieces(tmp_path):
    """Each document's pieces are consecutive runs of exactly seq_len of its tokens (the last one shorter): together
    they spell the documents, and each re-encodes to its own tokens, so a prompt (a piece's first tokens) is what
    the document holds at that place. Pieces under min_tokens are dropped."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TEACHER_ASSET)
    docs = [f.read_text() for f in stdlib_files()[:3]]
    slice_path = write_docs(tmp_path / "slice.jsonl", docs)
    pieces = prompt_pieces(slice_path, TEACHER_ASSET, seq_len=64, min_tokens=1)
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    expected = [doc[i:i + 64] for doc in ids for i in range(0, len(doc), 64)]
    assert len(pieces) == len(expected) > 3
    assert "".join(pieces) == "".join(docs)
    assert [tok(p, add_special_tokens=False)["input_ids"][:32] for p in pieces] == [e[:32] for e in expected]
    whole = prompt_pieces(slice_path, TEACHER_ASSET, seq_len=64, min_tokens=64)
    assert len(whole) == sum(len(doc) // 64 for doc in ids) < len(pieces)
