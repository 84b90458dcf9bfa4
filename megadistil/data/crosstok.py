"""Packed text windows that a teacher with a different tokenizer can score: the data half of cross-tokenizer KD.

The student trains on ``pack_text``'s windows. ``pack_text_windows`` yields the same windows together with the text
they cover (``segments``: contiguous document substrings, ``None`` for each EOS), so that a teacher can tokenize that
text its own way (``tokenize_segments``) and ``align_positions`` can pair the two sequences position by position.

Window coordinates: the window's segments laid end to end, a text segment contributing its UTF-8 bytes and a
``None`` (EOS) exactly one unit. A token's *end* is where it stops reading in these coordinates; an EOS token ends at
its ``None``'s base + 1. Bytes rather than characters, because byte-level vocabularies split a multi-byte character
over several tokens whose character offsets are all the whole character: in bytes each of them has its own end.

Alignment rule: logit position i predicts the token after the text that ends at ``ends[i]``. Student position i is
compared with teacher position j when both have read exactly the same text, i.e. ``student_ends[i] ==
teacher_ends[j]``; if several teacher positions share that end (zero-width tokens), the last one. Where the student's
boundary falls inside a teacher token there is no teacher distribution conditioned on the same prefix, so the
position gets -1 (no KD target; the trainer still trains CE there). Identical tokenizers align every position i to i
wherever they tokenized the text identically.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megadistil.data.packed import PackedTextBatches
from megadistil.data.text import batched, iter_documents

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece-style byte tokens


@dataclass
class TextWindow:
    """One packed student sequence and the text it covers."""

    input_ids: np.ndarray  # int64 [S]: exactly what pack_text yields for this window
    ends: np.ndarray  # int64 [S]: each student token's end, in window coordinates
    segments: list[str | None]  # the window's text in order; None = a document boundary (the EOS token)


@dataclass
class _Run:
    """Consecutive student tokens of one document (text set) or one EOS (text None); starts/ends in doc bytes."""

    text: str | None
    char_bytes: np.ndarray | None  # byte offset of every character boundary of text, [len(text)+1]
    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    def split(self, k: int) -> tuple[_Run, _Run]:
        head = _Run(self.text, self.char_bytes, self.ids[:k], self.starts[:k], self.ends[:k])
        return head, _Run(self.text, self.char_bytes, self.ids[k:], self.starts[k:], self.ends[k:])


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"tokenizer {_name(tokenizer)}: has no eos_token_id (needed at every document boundary)")
    return int(eos)


def token_offsets(tokenizer: Any, text: str) -> tuple[list[int], np.ndarray]:
    """(ids, character offsets int64 [n, 2]) of `text` tokenized alone without special tokens, validated."""
    return _batch_offsets(tokenizer, [text])[0]


def _batch_offsets(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
    """token_offsets for many texts in one tokenizer call (pack_text tokenizes in batches too)."""
    need_fast = f"tokenizer {_name(tokenizer)}: cross-tokenizer alignment needs a fast tokenizer (one that returns "
    try:
        # split_special_tokens: text spelling a special token is text, as pack_text tokenizes it
        enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    except NotImplementedError as e:  # transformers 4 slow tokenizers refuse offsets
        raise ValueError(need_fast + f"offset mappings): {e}") from e
    if "offset_mapping" not in enc:  # transformers 5 Python tokenizers silently drop the request
        raise ValueError(need_fast + "offset mappings); it returned none")
    return [_checked(tokenizer, text, ids, offs)
            for text, ids, offs in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True)]


def _checked(tokenizer: Any, text: str, ids: list[int], offsets: Any) -> tuple[list[int], np.ndarray]:
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    where = f"tokenizer {_name(tokenizer)} on text {text[:40]!r}"
    if len(offs) != len(ids):
        raise ValueError(f"{where}: {len(offs)} offsets for {len(ids)} token ids")
    if len(offs) == 0:
        return list(ids), offs
    starts, ends = offs[:, 0], offs[:, 1]
    if starts.min() < 0 or ends.max() > len(text) or (starts > ends).any():
        raise ValueError(f"{where}: offsets outside [0, {len(text)}] or with start > end")
    # Overlap is expected (byte tokens of one character all carry that character's span); a token that lies wholly
    # before its predecessor is not, and would make ends decrease.
    if (ends[1:] < starts[:-1]).any():
        raise ValueError(f"{where}: token ends decrease (offsets are not in text order)")
    return list(ids), offs


def _char_bytes(text: str) -> np.ndarray:
    """int64 [len(text)+1]: the UTF-8 byte offset of every character boundary."""
    raw = np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8)
    starts = np.flatnonzero((raw & 0xC0) != 0x80)  # continuation bytes are 10xxxxxx
    return np.append(starts, len(raw)).astype(np.int64)


def _byte_ends(tokenizer: Any, text: str, ids: list[int], offsets: np.ndarray, char_bytes: np.ndarray) -> np.ndarray:
    """int64 [n]: byte offset where each token stops reading `text`.

    Where the tokens spell the text's bytes exactly, or a space and then them (SentencePiece's and byte-level's
    prefix space, which reads no text), the ends are the running byte count: exact for byte pieces and for tokens
    that merge part of a character with what follows. Otherwise (a normalizer changed the text, a special token
    inside it) they come from the character offsets, below.
    """
    spelled = _spellings(tokenizer, ids)
    if None not in spelled:
        joined, raw = b"".join(spelled), text.encode("utf-8", errors="surrogatepass")
        if joined in (raw, b" " + raw):
            return np.maximum(np.cumsum([len(b) for b in spelled]) - (len(joined) - len(raw)), 0).astype(np.int64)
    return _offset_byte_ends(tokenizer, spelled, offsets, char_bytes)


def _offset_byte_ends(tokenizer: Any, spelled: list[bytes | None], offsets: np.ndarray,
                      char_bytes: np.ndarray) -> np.ndarray:
    """Byte ends from character offsets: character ends made non-decreasing (running max), then turned into bytes.
    Tokens sharing a character end with the tokens after them stopped inside that character (or, zero-width, read
    nothing more): their end is moved back by the bytes those later tokens spell."""
    if len(offsets) and (offsets[:, 0] == offsets[:, 1]).all():
        # tokenizers < 0.20.1 with ignore_merges (Llama-3) return only empty spans
        raise ValueError(f"tokenizer {_name(tokenizer)}: every offset is empty; upgrade tokenizers (>= 0.20.1 fixes "
                         "Llama-3 offsets)")
    char_ends = np.maximum.accumulate(offsets[:, 1])
    ends = char_bytes[char_ends]
    unread = 0
    for k in np.flatnonzero(char_ends[:-1] == char_ends[1:])[::-1]:  # backwards: sum the group's later tokens
        if k + 1 == len(spelled) - 1 or char_ends[k + 2] != char_ends[k + 1]:
            unread = 0  # k + 1 is the last token of its group
        token = b"" if offsets[k + 1, 0] == offsets[k + 1, 1] else spelled[k + 1]  # zero-width: reads nothing
        if token is None:
            raise ValueError(f"tokenizer {_name(tokenizer)}: a special token shares its character span with the "
                             "token before it; how many bytes it covers is unknown")
        unread += len(token)
        ends[k] -= unread
    if ends.min() < 0 or (np.diff(ends) < 0).any():
        raise ValueError(f"tokenizer {_name(tokenizer)}: byte-level tokens do not add up to the characters their "
                         "offsets span")
    return ends


def pack_text_windows(files: Sequence[str | os.PathLike], tokenizer: Any, seq_len: int) -> Iterator[TextWindow]:
    """pack_text(files, tokenizer, seq_len)'s windows (add_eos, drop_last), same ids and order, with their text."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = _eos_id(tokenizer)
    eos_run = _Run(None, None, np.array([eos], dtype=np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64))
    runs: deque[_Run] = deque()
    held = 0
    for docs in batched(iter_documents(files), 256):
        for text, (ids, offsets) in zip(docs, _batch_offsets(tokenizer, docs), strict=True):
            if ids:  # a document with no tokens still gets its EOS, as in pack_text
                runs.append(_doc_run(tokenizer, text, ids, offsets))
            runs.append(eos_run)
            held += len(ids) + 1
        while held >= seq_len:
            yield _window(_take(runs, seq_len))
            held -= seq_len


def _doc_run(tokenizer: Any, text: str, ids: list[int], offsets: np.ndarray) -> _Run:
    char_bytes = _char_bytes(text)
    ends = _byte_ends(tokenizer, text, ids, offsets, char_bytes)
    # A token starts at its character start, or later where the token before it stopped inside that character.
    starts = np.maximum(char_bytes[offsets[:, 0]], np.concatenate(([0], ends[:-1])))
    return _Run(text, char_bytes, np.asarray(ids, dtype=np.int64), starts, ends)


def _take(runs: deque[_Run], n: int) -> list[_Run]:
    """Pop the runs holding the next n tokens, splitting the last one if needed."""
    out: list[_Run] = []
    while n:
        run = runs.popleft()
        if len(run.ids) > n:
            run, rest = run.split(n)
            runs.appendleft(rest)
        out.append(run)
        n -= len(run.ids)
    return out


def _window(runs: list[_Run]) -> TextWindow:
    segments: list[str | None] = []
    ends: list[np.ndarray] = []
    base = 0
    for run in runs:
        if run.text is None:
            segments.append(None)
            ends.append(np.array([base + 1], dtype=np.int64))
            base += 1
            continue
        # Whole characters from the first token's start to the last token's end. A window that starts inside a
        # character begins after it: those leading byte tokens then end at 0 (they read none of the segment).
        first = int(np.searchsorted(run.char_bytes, run.starts[0]))
        last = int(np.searchsorted(run.char_bytes, run.ends[-1]))
        lo = run.char_bytes[first]
        if last > first:
            segments.append(run.text[first:last])
        ends.append(base + np.maximum(run.ends - lo, 0))
        base += int(run.char_bytes[last] - lo)
    return TextWindow(np.concatenate([r.ids for r in runs]), np.concatenate(ends), segments)


def tokenize_segments(segments: list[str | None], tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """The teacher side: (ids int64 [T], ends int64 [T]) in window coordinates; each text segment tokenized alone
    without special tokens, each None as the tokenizer's EOS."""
    eos = _eos_id(tokenizer)
    ids: list[int] = []
    ends: list[np.ndarray] = []
    base = 0
    for seg in segments:
        if seg is None:
            ids.append(eos)
            ends.append(np.array([base + 1], dtype=np.int64))
            base += 1
            continue
        seg_ids, offsets = token_offsets(tokenizer, seg)
        char_bytes = _char_bytes(seg)
        ids.extend(seg_ids)
        ends.append(base + _byte_ends(tokenizer, seg, seg_ids, offsets, char_bytes))
        base += int(char_bytes[-1])
    return np.asarray(ids, dtype=np.int64), np.concatenate(ends) if ends else np.zeros(0, np.int64)


def align_positions(student_ends: np.ndarray, teacher_ends: np.ndarray) -> np.ndarray:
    """int64 [S]: for each student position the teacher position that has read exactly the same text, else -1."""
    s, t = _ends(student_ends, "student_ends"), _ends(teacher_ends, "teacher_ends")
    j = np.searchsorted(t, s, side="right") - 1  # the last teacher position ending at or before each student end
    hit = j >= 0
    hit[hit] = t[j[hit]] == s[hit]
    return np.where(hit, j, -1).astype(np.int64)


def _ends(ends: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(ends)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    if (np.diff(arr) < 0).any():
        i = int(np.flatnonzero(np.diff(arr) < 0)[0])
        raise ValueError(f"{name}: must be non-decreasing, but position {i + 1} ends at {arr[i + 1]} < {arr[i]}")
    return arr.astype(np.int64, copy=False)


def vocab_map(teacher_tokenizer: Any, student_tokenizer: Any, teacher_vocab: int = 0) -> np.ndarray:
    """int64 [teacher vocab]: for each teacher id, the student id whose token spells the same bytes (-1: none). The
    EOS tokens map to each other; other special tokens to nothing. One-to-one: a student id is claimed once.
    `teacher_vocab`: the model's vocab_size, which a padded embedding makes larger than the tokenizer (its padding
    ids can still reach a top-k)."""
    student: dict[bytes, int] = {}
    for sid, spelled in token_bytes(student_tokenizer).items():
        student.setdefault(spelled, sid)
    teacher = token_bytes(teacher_tokenizer)
    out = np.full(max(len(teacher_tokenizer), max(teacher, default=0) + 1, teacher_vocab), -1, dtype=np.int64)
    claimed = {_eos_id(student_tokenizer)}
    for tid, spelled in teacher.items():
        sid = student.get(spelled, -1)
        if sid >= 0 and sid not in claimed:
            out[tid] = sid
            claimed.add(sid)
    out[_eos_id(teacher_tokenizer)] = _eos_id(student_tokenizer)
    return out


def padded_vocab_map(teacher_vocab: int, student_vocab: int) -> np.ndarray | None:
    """The same tokenizer, heads of other sizes (e.g. Qwen2.5-7B's 152064 rows, 0.5B's 151936 rows): the teacher's
    ids as they are, its rows past the student's (padding, never a token, but within reach of a top-k) to none
    (-1); None where every teacher id fits the student."""
    if teacher_vocab <= student_vocab:
        return None
    out = np.arange(teacher_vocab, dtype=np.int64)
    out[student_vocab:] = -1
    return out


def token_bytes(tokenizer: Any) -> dict[int, bytes]:
    """The bytes each ordinary token spells: byte-level BPE symbols (GPT-2's byte alphabet) or SentencePiece pieces
    ('\u2581' is a space, <0xNN> a byte); special tokens are left out."""
    spelled = _spellings(tokenizer, list(range(len(tokenizer))))
    return {tid: b for tid, b in enumerate(spelled) if b is not None}


def _spellings(tokenizer: Any, ids: list[int]) -> list[bytes | None]:
    """token_bytes of each id; None for a special token."""
    byte_level = _is_byte_level(tokenizer)
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    return [None if tid in special or token is None else _spell(token, byte_level)
            for tid, token in zip(ids, tokens, strict=True)]


def _spell(token: str, byte_level: bool) -> bytes:
    if byte_level and set(token) <= _BYTE_DECODER.keys():
        return bytes(_BYTE_DECODER[c] for c in token)
    if _BYTE_FALLBACK.fullmatch(token):
        return bytes([int(token[3:5], 16)])
    return token.encode() if byte_level else token.replace("\u2581", " ").encode()


def _is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer decodes GPT-2's byte alphabet (its decoder is, or contains, ByteLevel)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and b'"ByteLevel"' in decoder.__getstate__()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


_BYTE_DECODER = _byte_decoder()


def teacher_batch(windows: Sequence[TextWindow], teacher_tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's tokens of the windows' text, right-padded with its EOS ([B, T]: a causal teacher's earlier positions
    never see the padding), and the aligned teacher position of every student position ([B, S], -1: none)."""
    ids, index = [], []
    for window in windows:
        teacher_ids, ends = tokenize_segments(window.segments, teacher_tokenizer)
        ids.append(teacher_ids)
        index.append(align_positions(window.ends, ends))
    padded = np.full((len(ids), max(map(len, ids))), _eos_id(teacher_tokenizer), dtype=np.int64)
    for i, row in enumerate(ids):
        padded[i, :len(row)] = row
    return torch.from_numpy(padded), torch.from_numpy(np.stack(index))


class CrossTokenizerBatches(PackedTextBatches):
    """PackedTextBatches of pack_text_windows' windows (the same sequences, order and resume), each batch also
    carrying teacher_batch's `teacher_input_ids` and `teacher_index` for the windows' text."""

    def __init__(self, windows: list[TextWindow], teacher_tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(np.stack([w.input_ids for w in windows]), **kwargs)
        self.windows, self.teacher_tokenizer = windows, teacher_tokenizer

    @classmethod
    def from_files(cls, files: list[str], tokenizer: Any, teacher_tokenizer: Any, seq_len: int,
                   **kwargs: Any) -> CrossTokenizerBatches:
        return cls(list(pack_text_windows(files, tokenizer, seq_len)), teacher_tokenizer, **kwargs)

    def _batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        teacher_ids, index = teacher_batch([self.windows[r] for r in rows], self.teacher_tokenizer)
        return {**super()._batch(rows), "teacher_input_ids": teacher_ids, "teacher_index": index}
