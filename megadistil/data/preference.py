"""A training set from a preference dataset's chosen responses (PrefKD: preference-weighted distillation).

Input: local JSON-lines files (``.jsonl``, globs allowed), one object per line with string fields ``prompt``,
``chosen`` and ``rejected``. PrefKD trains on the chosen response only: ``rejected`` is read and checked to be a
string (so that a malformed file is caught whole) but never used.

Each row becomes one sequence of exactly ``seq_len`` tokens:

    ids = tokenizer(prompt + chosen) + [eos]     (no special tokens added; special-token text tokenized as text)

cut to ``seq_len`` (keeping the prompt's start) or right-padded with the pad id (``tokenizer.pad_token_id``, else
EOS). Prompt and completion are tokenized as one text, as the model reads them: tokenized apart, a SentencePiece
tokenizer would give the completion a spurious leading "▁" and no BPE merge could cross the boundary. The completion's
tokens are those whose character span (the tokenizer's offsets: a fast tokenizer is needed) ends after the prompt; a
token straddling the boundary is one of them. The loss is on the completion only (the prompt tokens masked): labels
are aligned to logit positions as in `megadistil.data.packed.shifted_batch` (``labels[t] = ids[t + 1]``), but only
where token ``t + 1`` belongs to the completion (its tokens and the final EOS); IGNORE_INDEX on the prompt's
positions, on padding and on the last position. Right padding needs no attention mask: a causal model's real
positions never see the padding after them.

Rows are not packed several to a sequence: one row per sequence keeps the masking (and which prompt each completion
is conditioned on) obviously right, at the cost of some padding.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megadistil.data.packed import IGNORE_INDEX
from megadistil.data.text import expand_files

log = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")
_TOKENIZE_BATCH = 256


@dataclass(frozen=True)
class PreferenceStats:
    """What `preference_sequences` did with the rows it read."""

    rows: int  # rows read, over all files
    truncated: int  # rows longer than seq_len, cut to it (kept)
    dropped: int  # rows with no completion token left to learn (the prompt alone fills seq_len), left out


def iter_preference_rows(path: str) -> Iterator[tuple[str, str]]:
    """(prompt, chosen) of every row of one ``.jsonl`` file, in order. Blank lines are skipped; a row is named by its
    1-based line number in errors. An error names the file, the row and the missing or mistyped field."""
    n = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"preference data {path} row {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: not a JSON object (got {type(row).__name__})")  # noqa: TRY004 (bad input)
            for name in FIELDS:
                if name not in row:
                    raise ValueError(f"{where}: field '{name}' missing (fields: {sorted(row)})")
                if not isinstance(row[name], str):
                    got = type(row[name]).__name__
                    raise ValueError(f"{where}: field '{name}' must be a string, got {got}")  # noqa: TRY004 (bad input)
            n += 1
            yield row["prompt"], row["chosen"]
    if n == 0:
        raise ValueError(f"preference data {path}: holds no rows")


def preference_sequences(files: Sequence[str | os.PathLike], tokenizer: Any, seq_len: int, *,
                         split_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray, PreferenceStats]:
    """Every row of `files` as one sequence: ``(input_ids, labels, stats)``, input_ids and labels int64 [N, seq_len]
    (labels on the completion only, see the module docstring), N = stats.rows - stats.dropped.

    A row longer than seq_len is cut to seq_len keeping the prompt's start (``stats.truncated``); a row with no
    completion token left to learn (its prompt fills seq_len) is left out (``stats.dropped``). The counts are also
    logged. Errors: a tokenizer with no EOS, seq_len < 2, a malformed row (file, row, field), a file with no rows,
    every row dropped.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id: preference data ends every completion with EOS")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    paths = expand_files(files, suffixes=(".jsonl",), what="preference data")
    if not paths:
        raise ValueError("preference data: no files given")

    seqs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    rows = truncated = dropped = 0

    def add(prompts: list[str], chosens: list[str]) -> None:
        nonlocal truncated, dropped
        # split_special_tokens: a row quoting "</s>" is text, not a control token (False: chat-formatted rows)
        enc = tokenizer([p + c for p, c in zip(prompts, chosens)], add_special_tokens=False,
                        split_special_tokens=split_special_tokens, return_offsets_mapping=True)
        if "offset_mapping" not in enc:  # slow (Python) tokenizers return none
            raise ValueError(f"tokenizer {type(tokenizer).__name__}: preference data needs a fast tokenizer (one that "
                             "returns offset mappings) to find where each completion starts")
        for prompt, joint, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"]):
            # the completion starts at the first token reaching past the prompt: one straddling the boundary (a
            # merge across it) is counted as completion, so that every completion character is learned
            n_prompt = next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(joint))
            ids = list(joint) + [eos]
            if len(ids) > seq_len:
                truncated += 1
                ids = ids[:seq_len]
            # label position t reads token t + 1; completion tokens sit at indices n_prompt .. len(ids) - 1
            first = max(n_prompt - 1, 0)
            last = len(ids) - 1  # exclusive end of the labelled positions
            if first >= last:
                dropped += 1
                continue
            row_ids = np.full(seq_len, pad, dtype=np.int64)
            row_ids[:len(ids)] = ids
            row_labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
            row_labels[first:last] = row_ids[first + 1:last + 1]
            seqs.append(row_ids)
            labels.append(row_labels)

    for path in paths:
        prompts: list[str] = []
        chosens: list[str] = []
        for prompt, chosen in iter_preference_rows(path):
            rows += 1
            prompts.append(prompt)
            chosens.append(chosen)
            if len(prompts) == _TOKENIZE_BATCH:
                add(prompts, chosens)
                prompts, chosens = [], []
        if prompts:
            add(prompts, chosens)

    stats = PreferenceStats(rows=rows, truncated=truncated, dropped=dropped)
    log.info("preference data: %d rows, %d truncated to %d tokens, %d dropped (no completion token left)",
             rows, truncated, seq_len, dropped)
    if not seqs:
        raise ValueError(f"preference data {paths}: every one of {rows} rows dropped (each prompt fills "
                         f"seq_len={seq_len}, leaving no completion token)")
    return np.stack(seqs), np.stack(labels), stats
