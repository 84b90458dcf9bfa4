"""Cross-tokenizer windows and alignment (megadistil.data.crosstok) with two real byte-level BPE tokenizers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megadistil.data.crosstok import (
    align_positions,
    pack_text_windows,
    padded_vocab_map,
    token_bytes,
    token_offsets,
    tokenize_segments,
    vocab_map,
)
from megadistil.data.packed import PackedTextBatches
from megadistil.data.text import iter_documents, pack_text
from megadistil.distill.targets import mapped_targets

EOS = "<|end_of_text|>"
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog 12 times.",
    "for i in range(10):\n    print(i * 2)\n",
    "In 2024 the model read 300 pages of text and 45 files of code.",
    "class Counter:\n    def __init__(self):\n        self.count = 0\n",
    "A teacher and a student read the same text, token by token.",
    "import numpy as np\nx = np.zeros(16)\n",
    "The student learns to predict the next token from the teacher's distribution.",
    "if x > 0:\n    y = x - 1\nelse:\n    y = 0\n",
    "Numbers like 7, 42 and 1999 are split into digits by one tokenizer.",
    "return [t for t in tokens if t]\n",
    "Every window holds exactly the same number of student tokens.",
    "with open(path) as f:\n    lines = f.read().splitlines()\n",
    "The end of a document is marked by a special token.",
    "total = sum(values) / len(values)\n",
    "She paid 3.50 for coffee and 12.75 for lunch on day 9.",
    "while queue:\n    node = queue.pop()\n    seen.add(node)\n",
    "Text is cut into pieces, and pieces are merged into tokens.",
    "print('hello world', 2 + 3)\n",
    "Distillation compares the two models where they have read the same text.",
    "def mean(xs):\n    return sum(xs) / len(xs)\n",
    "Both tokenizers see every character between the student's tokens.",
    "assert len(batch) == 8, 'batch size'\n",
    "A boundary that falls inside a teacher token has no matching teacher position.",
    "result = {k: v for k, v in pairs.items() if v > 0}\n",
    "The logits at one position predict the token that comes next.",
    "for line in text.split('\\n'):\n    words += line.split()\n",
    "Windows of 128 tokens are cut from the packed stream in order.",
]


def _train(vocab_size: int, pre_tokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


@pytest.fixture(scope="module")
def student():
    from tokenizers import pre_tokenizers

    return _train(300, pre_tokenizers.ByteLevel(add_prefix_space=False))


@pytest.fixture(scope="module")
def teacher():
    from tokenizers import pre_tokenizers

    digits_then_bytes = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return _train(420, digits_then_bytes)


def _write_jsonl(path, docs: list[str]):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_hand_worked_alignment(student, teacher):
    text = "x = 12 + 345\nprint(x)"
    segments = [text, None]
    # Tokens as strings (byte-level symbols decoded), ends in window coordinates (ASCII: bytes = characters; the
    # EOS after a text of 21 characters ends at 21 + 1).
    s_tokens = ["x", " =", " 1", "2", " ", "+", " ", "3", "4", "5", "\n", "p", "r", "in", "t", "(", "x", ")", EOS]
    s_ends = [1, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 18, 19, 20, 21, 22]
    t_tokens = ["x", " =", " ", "1", "2", " +", " ", "3", "4", "5", "\n", "p", "rin", "t", "(", "x", ")", EOS]
    t_ends = [1, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 17, 18, 19, 20, 21, 22]
    # Walk-through, student position i -> teacher position j with the same end (same text read), else -1:
    #   i0 "x" (1) -> j0 "x";  i1 " =" (3) -> j1 " =".
    #   i2 " 1" (5) -> j3 "1": the teacher read " " and "1" separately (digits are split off), its "1" also ends at 5;
    #      teacher j2 " " (4) has no student counterpart, which is fine: only student positions need a target.
    #   i3 "2" (6) -> j4 "2".
    #   i4 " " (7) -> -1: the teacher's " +" spans 6..8, so no teacher position has read exactly "x = 12 ".
    #   i5 "+" (8) -> j5 " +";  i6 " " (9) -> j6;  i7..i9 "3" "4" "5" (10..12) -> j7..j9;  i10 "\n" (13) -> j10.
    #   i11 "p" (14) -> j11 "p".
    #   i12 "r" (15) -> -1: the boundary falls inside the teacher's "rin" (14..17).
    #   i13 "in" (17) -> j12 "rin";  i14..i17 "t" "(" "x" ")" (18..21) -> j13..j16;  i18 EOS (22) -> j17 EOS.
    expected = [0, 1, 3, 4, -1, 5, 6, 7, 8, 9, 10, 11, -1, 12, 13, 14, 15, 16, 17]

    s_ids, s_got = tokenize_segments(segments, student)
    t_ids, t_got = tokenize_segments(segments, teacher)
    assert [student.decode([int(i)]) for i in s_ids] == s_tokens
    assert [teacher.decode([int(i)]) for i in t_ids] == t_tokens
    assert s_got.tolist() == s_ends and t_got.tolist() == t_ends
    assert s_got.dtype == np.int64 and t_ids.dtype == np.int64
    assert align_positions(s_got, t_got).tolist() == expected
    assert align_positions(s_got, s_got).tolist() == list(range(len(s_ends)))


def test_non_ascii_ends_are_bytes_and_identical_tokenizers_align(student, teacher):
    text = "naïve café — 東京"  # 15 characters, 23 UTF-8 bytes
    _, offsets = token_offsets(student, text)
    # Byte-level tokens that split a character each carry the whole character's span: ï's two bytes are both (2, 3).
    assert offsets[2:4].tolist() == [[2, 3], [2, 3]]
    # In bytes every token has its own end: n a ï(2 bytes) v e " c" a f é(2) " " —(3) " " 東(3) 京(3).
    expected = [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]
    for tok in (student, teacher):
        _, ends = tokenize_segments([text], tok)
        assert ends.tolist() == expected
        assert ends[-1] == len(text.encode())
        assert align_positions(ends, ends).tolist() == list(range(len(ends)))


class _FakeTokenizer:
    """Returns fixed tokens and offsets, to test what real tokenizers rarely produce."""

    name_or_path = "fake-tok"
    eos_token_id = 0

    all_special_ids = (0,)

    def __init__(self, tokens: list[str], offsets: list[tuple[int, int]], eos: int | None = 0,
                 byte_level: bool = True):
        from tokenizers import decoders

        self.tokens, self.offsets, self.eos_token_id = tokens, offsets, eos
        self.backend_tokenizer = SimpleNamespace(decoder=decoders.ByteLevel() if byte_level else decoders.Fuse())

    def __call__(self, texts, add_special_tokens=False, split_special_tokens=False, return_offsets_mapping=False):
        ids = list(range(1, len(self.tokens) + 1))
        return {"input_ids": [ids for _ in texts], "offset_mapping": [self.offsets for _ in texts]}

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i - 1] for i in ids]


def test_partial_character_merges_align_by_bytes():
    # "東" is 3 bytes, in byte-level symbols "æĿ±". One tokenizer merged the first two bytes, the other the last two;
    # both report the character's span (0, 1) for each piece. After 2 bytes vs after 1 byte: different text, so the
    # first student position has no teacher match; after all 3 bytes both match.
    student = _FakeTokenizer(["æĿ", "±"], [(0, 1), (0, 1)])
    teacher = _FakeTokenizer(["æ", "Ŀ±"], [(0, 1), (0, 1)])
    _, s_ends = tokenize_segments(["東"], student)
    _, t_ends = tokenize_segments(["東"], teacher)
    assert s_ends.tolist() == [2, 3] and t_ends.tolist() == [1, 3]
    assert align_positions(s_ends, t_ends).tolist() == [-1, 1]
    # SentencePiece byte fallback: <0xNN> pieces are one byte each.
    sp_bytes = _FakeTokenizer(["<0xE6>", "<0x9D>", "<0xB1>"], [(0, 1)] * 3, byte_level=False)
    _, ends = tokenize_segments(["東", None], sp_bytes)
    assert ends.tolist() == [1, 2, 3, 4]


def _sentencepiece_style(kind: str, normalizer=None):
    """A byte-fallback BPE tokenizer built like the SentencePiece conversions in tokenizer.json files:
    'legacy' (Llama-2, Mistral v0.1: normalizer Prepend + Replace, decoder Strip), 'metaspace' (legacy=False Llama,
    Mistral v0.3: Metaspace prepend_scheme 'first') and 'gemma' (no prefix space)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True))
    space = [normalizers.Replace(" ", "▁")]
    to_text = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if kind == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), *space])
        tok.decoder = decoders.Sequence([*to_text, decoders.Strip(" ", 1, 0)])
    elif kind == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([*to_text, decoders.Strip(" ", 1, 0)])
    else:
        tok.normalizer, tok.decoder = normalizers.Sequence(space), decoders.Sequence(to_text)
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator([*CORPUS, "café naïve 東京 and 日本 text"] * 3, trainer=trainers.BpeTrainer(
        vocab_size=420, special_tokens=[EOS, *byte_pieces], show_progress=False))
    if normalizer is not None:
        tok.normalizer = normalizers.Sequence([normalizer, tok.normalizer] if tok.normalizer else [normalizer])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


@pytest.mark.parametrize("kind", ["legacy", "metaspace", "gemma"])
def test_sentencepiece_prefix_space_and_pieces_end_where_they_stop_reading(kind):
    # Reference: the bytes of the text decoded from the first k+1 tokens, wherever that prefix decodes to whole
    # characters. The prepended "▁" reads no text (the decoder strips it), a piece like "é" reads 2 bytes. Before,
    # the legacy "▁" + "東" crashed ("shares its character span"), and "▁" + "é" or "▁" + "naïve▁"
    # gave the prefix space an end of 1 byte of the text.
    tok = _sentencepiece_style(kind)
    for text in ["東京 is big", "é", "naïve café", "ok 😀 x", "3 dogs and 日本"]:
        ids, ends = tokenize_segments([text], tok)
        assert ends[-1] == len(text.encode()) and (np.diff(ends) >= 0).all()
        for k in range(len(ids)):
            prefix = tok.decode(ids[: k + 1].tolist())
            if "\ufffd" not in prefix:
                assert ends[k] == len(prefix.encode()), (kind, text, k, tok.convert_ids_to_tokens(ids.tolist()))


def test_a_normalized_text_aligns_through_its_character_offsets():
    # A lowercasing normalizer makes the tokens spell other bytes than the text, so the ends come from the offsets;
    # they must equal the ends of the same tokenizer without the normalizer on the lowercased text.
    from tokenizers import normalizers

    lowering, plain = _sentencepiece_style("gemma", normalizers.Lowercase()), _sentencepiece_style("gemma")
    text = "CAFÉ NAÏVE 東京 AND 日本 TEXT"
    ids, ends = tokenize_segments([text], lowering)
    ref_ids, ref_ends = tokenize_segments([text.lower()], plain)
    assert ids.tolist() == ref_ids.tolist() and ends.tolist() == ref_ends.tolist()


def test_special_token_text_is_text_as_pack_text_reads_it(student, tmp_path):
    """A document quoting the EOS token's text: both sides tokenize it as text, so the only EOS ids are the
    separators and the windows are still pack_text's."""
    docs = [f"a page quoting {student.eos_token} mid-text", *CORPUS[:3]]
    path = _write_jsonl(tmp_path / "docs.jsonl", docs)
    windows, reference = list(pack_text_windows([path], student, 8)), list(pack_text([path], student, 8))
    assert len(windows) == len(reference) > 1
    for w, ref in zip(windows, reference, strict=True):
        np.testing.assert_array_equal(w.input_ids, ref)
        assert w.segments.count(None) == int((w.input_ids == student.eos_token_id).sum())


def test_windows_match_pack_text(student, tmp_path):
    docs = CORPUS[:10]
    path = _write_jsonl(tmp_path / "docs.jsonl", docs)
    windows = list(pack_text_windows([path], student, 24))
    reference = list(pack_text([path], student, 24))
    assert len(windows) == len(reference) == 15
    eos = student.eos_token_id
    for w, ref in zip(windows, reference, strict=True):
        assert w.input_ids.dtype == np.int64 and w.ends.dtype == np.int64
        np.testing.assert_array_equal(w.input_ids, ref)
        assert w.segments.count(None) == int((w.input_ids == eos).sum())
        assert all(seg is None or any(seg in d for d in docs) for seg in w.segments)
        # With the student's own tokenizer the teacher side reproduces the window: same ids, same ends, i -> i.
        # (True here for every window; in general a window cut inside a word can retokenize differently at its
        # edges, which the alignment then covers with -1.)
        ids, ends = tokenize_segments(w.segments, student)
        np.testing.assert_array_equal(ids, w.input_ids)
        np.testing.assert_array_equal(ends, w.ends)
        np.testing.assert_array_equal(align_positions(w.ends, ends), np.arange(24))
    # The windows' text, read in order, is the documents' text with nothing skipped (the last window's tail dropped).
    full = "".join(d + "\0" for d in iter_documents([path]))
    read = "".join("\0" if seg is None else seg for w in windows for seg in w.segments)
    assert full.startswith(read) and len(full) - len(read) < 40


def test_document_boundary_eos_positions_align(student, teacher, tmp_path):
    path = _write_jsonl(tmp_path / "docs.jsonl", CORPUS[:4])
    windows = [w for w in pack_text_windows([path], student, 32) if None in w.segments[1:-1]]
    assert windows, "expected a window with an EOS in its middle"
    for w in windows:
        t_ids, t_ends = tokenize_segments(w.segments, teacher)
        aligned = align_positions(w.ends, t_ends)
        s_eos = np.flatnonzero(w.input_ids == student.eos_token_id)
        assert len(s_eos) >= 1
        assert (t_ids[aligned[s_eos]] == teacher.eos_token_id).all()
        # The last token of the document before each EOS has read the whole document: it aligns too.
        assert (aligned[s_eos - 1] >= 0).all() and (aligned[s_eos - 1] == aligned[s_eos] - 1).all()


def test_window_starting_inside_a_character(student, tmp_path):
    path = _write_jsonl(tmp_path / "cjk.jsonl", ["東京東京"])  # each character is 3 single-byte student tokens
    first, second = list(pack_text_windows([path], student, 4))[:2]
    # Window 1 ends after the first byte of 京: its text runs to the end of that character.
    assert first.segments == ["東京"] and first.ends.tolist() == [1, 2, 3, 4]
    # Window 2 starts with 京's last two bytes: the teacher cannot read part of a character, so its text starts at
    # the next one, and those two tokens have read none of it (end 0) and get no target.
    assert second.segments == ["東"] and second.ends.tolist() == [0, 0, 1, 2]
    _, t_ends = tokenize_segments(second.segments, student)
    assert align_positions(second.ends, t_ends).tolist() == [-1, -1, 0, 1]
    # A window holding only a character's tail bytes and an EOS has no text segment at all, just the boundary.
    _, tail = pack_text_windows([_write_jsonl(tmp_path / "one.jsonl", ["東"])], student, 2)
    assert tail.segments == [None] and tail.ends.tolist() == [0, 1]


def test_slow_tokenizer_is_refused():
    from transformers import PreTrainedTokenizer

    class CharTokenizer(PreTrainedTokenizer):  # a Python ("slow") tokenizer: no offset mappings
        def __init__(self, **kwargs):
            self.vocab = {chr(i): i for i in range(256)}
            super().__init__(**kwargs)

        @property
        def vocab_size(self) -> int:
            return 256

        def get_vocab(self):
            return dict(self.vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self.vocab.get(token, 0)

        def _convert_id_to_token(self, index):
            return chr(index)

    slow = CharTokenizer(eos_token="\x00", name_or_path="char-slow")
    with pytest.raises(ValueError, match="char-slow.*needs a fast tokenizer"):
        token_offsets(slow, "hello")
    with pytest.raises(ValueError, match="needs a fast tokenizer"):
        tokenize_segments(["hi", None], slow)


@pytest.mark.parametrize("offsets, problem", [
    ([(0, 1)], "1 offsets for 2 token ids"),
    ([(0, 1), (1, 9)], r"outside \[0, 3\]"),
    ([(2, 1), (1, 3)], "start > end"),
    ([(2, 3), (0, 1)], "ends decrease"),
])
def test_bad_offsets_are_refused(offsets, problem):
    with pytest.raises(ValueError, match=f"fake-tok.*{problem}"):
        token_offsets(_FakeTokenizer(["ab", "c"], offsets), "abc")


def test_empty_offsets_are_refused_only_where_they_are_needed():
    # Tokens that spell the text are placed by their bytes; whitespace-only text under trim_offsets has only empty
    # spans and is fine. Where the spelling differs from the text (a normalizer), the offsets must say where.
    _, ends = tokenize_segments(["   "], _FakeTokenizer(["ĠĠ", "Ġ"], [(2, 2), (3, 3)]))
    assert ends.tolist() == [2, 3]
    with pytest.raises(ValueError, match="fake-tok.*every offset is empty"):
        tokenize_segments(["abc"], _FakeTokenizer(["AB", "C"], [(0, 0), (3, 3)]))


def test_missing_eos_is_refused(tmp_path):
    fake = _FakeTokenizer(["ab", "c"], [(0, 2), (2, 3)], eos=None)
    with pytest.raises(ValueError, match="fake-tok.*no eos_token_id"):
        tokenize_segments(["abc", None], fake)
    with pytest.raises(ValueError, match="fake-tok.*no eos_token_id"):
        next(pack_text_windows([_write_jsonl(tmp_path / "d.jsonl", ["abc"])], fake, 4))


def test_align_positions_validates_ends():
    with pytest.raises(ValueError, match="student_ends.*non-decreasing.*position 2 ends at 3 < 5"):
        align_positions(np.array([1, 5, 3]), np.array([1, 3, 5]))
    with pytest.raises(ValueError, match="teacher_ends.*non-decreasing"):
        align_positions(np.array([1, 3]), np.array([3, 1]))
    with pytest.raises(ValueError, match="teacher_ends.*1-D integer"):
        align_positions(np.array([1, 3]), np.array([[1, 3]]))
    # Zero-width teacher tokens share an end: the last of them is the one that has read everything up to it.
    assert align_positions(np.array([2, 4]), np.array([2, 2, 3, 4])).tolist() == [1, 3]


# --------------------------------------------------------------------------- batches and the KD they feed


def _batches(tmp_path, student, teacher_tok, seq_len=24, batch_size=5):
    from megadistil.data.crosstok import CrossTokenizerBatches

    path = _write_jsonl(tmp_path / "docs.jsonl", CORPUS[:10])
    return CrossTokenizerBatches.from_files([str(path)], student, teacher_tok, seq_len, batch_size=batch_size,
                                            rank=0, world_size=1, seed=0)


def test_batches_carry_the_teachers_tokens_and_the_alignment(student, teacher, tmp_path):
    data = _batches(tmp_path, student, teacher)
    batch = next(iter(data))
    plain = next(iter(PackedTextBatches.from_files([str(tmp_path / "docs.jsonl")], student, 24, batch_size=5, rank=0,
                                                   world_size=1, seed=0)))
    assert all(torch.equal(batch[k], plain[k]) for k in ("input_ids", "labels"))  # the student's batch unchanged
    index, teacher_ids = batch["teacher_index"], batch["teacher_input_ids"]
    assert index.shape == batch["input_ids"].shape and index.max() < teacher_ids.shape[1]
    assert 0.3 < (index >= 0).float().mean() < 1.0  # most boundaries shared, some inside a teacher token
    for row, ids in zip(index, teacher_ids):
        aligned = row[row >= 0]
        assert torch.all(aligned[1:] > aligned[:-1])  # the alignment keeps the order of the text
        # right padding with the teacher's EOS after its own tokens
        n = int((ids != teacher.eos_token_id).nonzero().max()) + 1
        assert torch.all(ids[n:] == teacher.eos_token_id)


def test_identical_tokenizers_give_the_exact_paths_loss(student, tmp_path):
    """Same tokenizer on both sides: every position aligns to itself, and ULD through the cross-tokenizer path (the
    teacher's own tokens, aligned targets, KD mask) equals ULD on the teacher's targets at the student's tokens."""
    from megadistil.distill import LossConfig, chunked_lm_head_loss
    from megadistil.distill.targets import aligned_targets, hidden_topk, teacher_topk
    from megadistil.models import decoder
    from tests._tiny import tiny_llama31

    batch = next(iter(_batches(tmp_path, student, student)))
    assert torch.equal(batch["teacher_input_ids"], batch["input_ids"])
    model = tiny_llama31(seed=0, vocab_size=len(student), eos_token_id=student.eos_token_id)
    exact = teacher_topk(model, batch["input_ids"], top_k=16, temperature=1.0)
    with torch.no_grad():
        hidden = decoder(model)(input_ids=batch["teacher_input_ids"]).last_hidden_state
    cross, mask = aligned_targets(hidden_topk(model, hidden, top_k=16, temperature=1.0), batch["teacher_index"])
    assert bool(mask.all())
    g = torch.Generator().manual_seed(0)
    h = torch.randn(*batch["input_ids"].shape, 32, generator=g)
    W = torch.randn(len(student), 32, generator=g)
    cfg = LossConfig(kind="uld", ce_weight=0.5, chunk_tokens=16)
    want = chunked_lm_head_loss(h, W, batch["labels"], cfg, sparse=exact)
    got = chunked_lm_head_loss(h, W, batch["labels"], cfg, sparse=cross, kd_mask=mask)
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=1e-7)
    assert got["kd_tokens"] == want["tokens"]
    # Any other divergence maps the teacher's ids onto the student's vocabulary: here the identity, no holes.
    vmap = torch.from_numpy(vocab_map(student, student))
    mapped, kept = mapped_targets(cross, vmap)
    assert bool(kept.all()) and bool(mapped.present.all())
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        cfg = LossConfig(kind=kind, ce_weight=0.5, chunk_tokens=16)
        want = chunked_lm_head_loss(h, W, batch["labels"], cfg, sparse=exact)
        got = chunked_lm_head_loss(h, W, batch["labels"], cfg, sparse=mapped, kd_mask=mask & kept)
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=1e-7)


def test_vocab_map_pairs_the_tokens_that_spell_the_same_bytes(student, teacher):
    vmap = vocab_map(teacher, student)
    s_bytes, t_bytes = token_bytes(student), token_bytes(teacher)
    assert vmap[teacher.eos_token_id] == student.eos_token_id and EOS.encode() not in t_bytes.values()
    from tokenizers import pre_tokenizers

    from megadistil.data.crosstok import _BYTE_DECODER

    assert set(_BYTE_DECODER) == set(pre_tokenizers.ByteLevel.alphabet())  # the tokenizers library's 256 symbols
    assert t_bytes[teacher.convert_tokens_to_ids("Ġ")] == b" "  # GPT-2's byte alphabet: Ġ is the space byte
    assert t_bytes[teacher.convert_tokens_to_ids("Ã")] == bytes([0xC3])  # half of a two-byte character
    kept = vmap >= 0
    assert len(set(vmap[kept].tolist())) == int(kept.sum())  # one-to-one
    student_spellings = set(s_bytes.values())
    for tid, spelled in t_bytes.items():
        if vmap[tid] >= 0:
            assert s_bytes[int(vmap[tid])] == spelled
        else:
            assert spelled not in student_spellings
    # Both vocabularies hold all 256 bytes and many shared merges, but not every merge: a real partial map.
    assert 256 < int(kept.sum()) < len(t_bytes)
    np.testing.assert_array_equal(vocab_map(student, student), np.arange(len(student)))
    # a padded embedding: ids past the tokenizer (reachable by a top-k) map to nothing instead of out of bounds
    padded = vocab_map(teacher, student, teacher_vocab=len(teacher) + 8)
    assert len(padded) == len(teacher) + 8 and (padded[len(teacher):] == -1).all()
    np.testing.assert_array_equal(padded[:len(vmap)], vmap)


def test_token_bytes_of_a_sentencepiece_style_vocabulary():
    """Metaspace pieces spell a space as U+2581; the vocabulary maps onto a byte-level one by the bytes spelled."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=[EOS],
                                                                show_progress=False))
    sp = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    spelled = token_bytes(sp)
    assert spelled[sp.convert_tokens_to_ids("\u2581the")] == b" the"
    assert sp.eos_token_id not in spelled


def test_teacher_targets_apply_the_head_weight_without_calling_the_head_module():
    """Ranks hold teacher sequences of different lengths (another tokenizer), so different numbers of LM-head chunks:
    under ZeRO-3 each call of the head module would be a collective, and ranks calling it a different number of times
    hang or fail (seen: gloo's 'collective mismatch' in the cross-tokenizer demo). The targets use the weight directly
    (gathered once per forward by the caller) and equal the model's own logits' top-k."""
    from megadistil.distill.targets import teacher_topk, topk_target
    from megadistil.models import output_head
    from tests._tiny import tiny_llama31

    model = tiny_llama31(seed=0, vocab_size=300)
    calls = []
    output_head(model).register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    target = teacher_topk(model, ids, top_k=5, temperature=1.0, chunk_tokens=4)
    assert calls == []
    with torch.no_grad():
        want = topk_target(model(input_ids=ids).logits.float(), 5)
    assert torch.equal(target.topk_ids, want.topk_ids)
    torch.testing.assert_close(target.topk_logprobs, want.topk_logprobs)


def test_a_teacher_head_padded_past_the_students_maps_its_padding_ids_to_none():
    assert padded_vocab_map(8, 8) is None and padded_vocab_map(8, 10) is None
    assert padded_vocab_map(10, 8).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, -1, -1]


def test_shard_targets_of_a_padded_teacher_head_fold_its_padding_ids_into_the_tail():
    """Shards of the student's tokenizer from a teacher whose head has rows past the student's: the trainer's
    OfflineTeacher keeps the real ids where they are and adds the padding ids' mass to the tail."""
    from megadistil.distill.losses import LossConfig
    from megadistil.engine.teachers import OfflineTeacher

    logprobs = torch.log(torch.tensor([[[0.5, 0.2, 0.1]]]))
    batch = {"topk_ids": torch.tensor([[[3, 9, 1]]]), "topk_logprobs": logprobs,
             "tail_logmass": torch.log(torch.tensor([[0.2]]))}
    targets = OfflineTeacher(torch.from_numpy(padded_vocab_map(10, 8))).targets(batch, LossConfig())
    present = targets.sparse.present[0, 0].tolist()
    assert present == [True, False, True] and targets.kd_mask.all()
    assert targets.sparse.topk_ids[0, 0].tolist()[::2] == [3, 1] and targets.sparse.topk_ids.max() < 8
    torch.testing.assert_close(targets.sparse.tail_logmass.exp(), torch.tensor([[0.4]]))
