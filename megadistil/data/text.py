"""Read a text corpus with `datasets`, tokenise, and pack into fixed-length sequences.

Used by tools/precompute_teacher.py and by the trainer's live-teacher path (``data.text``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from megadistil.data.shards import sha256_file

T = TypeVar("T")
_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def expand_files(patterns: Sequence[str | os.PathLike], *, suffixes: Sequence[str] = tuple(_BUILDERS),
                 what: str = "text input") -> list[str]:
    """Expand globs; keep order; error naming (as `what`) any pattern that matches nothing, a suffix outside
    `suffixes`, or an empty file."""
    files: list[str] = []
    for pat in patterns:
        matches = sorted(glob.glob(str(pat))) if glob.has_magic(str(pat)) else [str(pat)]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise FileNotFoundError(f"{what} {pat}: no such file")
        for m in matches:
            if Path(m).suffix.lower() not in suffixes:
                raise ValueError(f"{what} {m}: unsupported suffix (use {sorted(suffixes)})")
            if os.path.getsize(m) == 0:
                raise ValueError(f"{what} {m}: file is empty")
        files.extend(matches)
    return files


def files_identity(files: Sequence[str | os.PathLike]) -> list[list[Any]]:
    """[absolute path, size, sha256] of each file: what a resumed run must have read before (a size alone misses an
    edit that keeps it; one pass at disk speed, a fraction of what tokenizing the files costs)."""
    return [[os.path.abspath(f), os.path.getsize(f), sha256_file(f)] for f in files]


def iter_documents(files: Sequence[str | os.PathLike]) -> Iterator[str]:
    """Yield documents: one per line for .txt, the `text` field for .jsonl/.parquet. Streams, in file order."""
    import datasets

    for path in expand_files(files):
        builder = _BUILDERS[Path(path).suffix.lower()]
        ds = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True)
        n = 0
        for row in ds:
            if "text" not in row:
                raise ValueError(f"text input {path}: rows have no 'text' field (fields: {sorted(row)})")
            text = row["text"]
            if text:
                n += 1
                yield text
        if n == 0:
            raise ValueError(f"text input {path}: holds no non-empty text")


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) of a UTF-8 file's non-blank lines. Lines end at \n alone, a CRLF's \r dropped:
    str.splitlines also breaks at U+2028, form feeds and other separators a prompt may hold, cutting it in two."""
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            yield n, line.removesuffix("\r")


def pack_text(
    files: Sequence[str | os.PathLike],
    tokenizer: Any,
    seq_len: int,
    *,
    add_eos: bool = True,
    batch_docs: int = 256,
    drop_last: bool = True,
    split_special_tokens: bool = True,
) -> Iterator[np.ndarray]:
    """Yield int64 arrays of exactly ``seq_len`` tokens (no shift: callers derive labels from it).

    Documents are concatenated with the tokenizer's EOS between them (EOS after every document) and cut into
    consecutive windows; a trailing partial window is dropped (``drop_last``) or returned shorter. Special-token text
    inside a document (a literal "</s>") is tokenized as text: only the EOS inserted here is a control token; with
    ``split_special_tokens=False`` it is the control token (chat-formatted text, whose template spells them).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("tokenizer has no eos_token_id; pass add_eos=False or set one")
    buf: list[int] = []
    for docs in batched(iter_documents(files), batch_docs):
        # split_special_tokens: corpus text that spells a special token must not become the control token (a web page
        # quoting "<|end_of_text|>" would otherwise end a document mid-text)
        for ids in tokenizer(docs, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]:
            buf.extend(ids)
            if add_eos:
                buf.append(eos)
        while len(buf) >= seq_len:
            yield np.asarray(buf[:seq_len], dtype=np.int64)
            del buf[:seq_len]
    if buf and not drop_last:
        yield np.asarray(buf, dtype=np.int64)


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Lists of n items (the last may be shorter); itertools.batched from Python 3.12 on."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
