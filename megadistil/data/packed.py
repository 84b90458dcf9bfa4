"""Packed text in memory for a live teacher: deterministic epochs, rank slices, exact resume by position."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from megadistil.data.text import pack_text

IGNORE_INDEX = -100


def eval_sequences(files: list[str], tokenizer: Any, seq_len: int, count: int, *,
                   split_special_tokens: bool = True) -> np.ndarray:
    """`count` packed sequences spread evenly over all of `files` (not the first ones), so that held-out perplexity
    measures the whole held-out distribution."""
    seqs = _packed(files, tokenizer, seq_len, "held-out text", split_special_tokens)
    picks = np.linspace(0, len(seqs) - 1, num=min(count, len(seqs))).round().astype(int)
    return np.stack([seqs[i] for i in picks])


def _packed(files: list[str], tokenizer: Any, seq_len: int, what: str,
            split_special_tokens: bool) -> list[np.ndarray]:
    """pack_text's windows, or an error naming `what`, the files and the token count where there is not one whole
    window (np.stack of none fails with numpy's bare "need at least one array to stack")."""
    # the partial tail only to count it
    seqs = list(pack_text(files, tokenizer, seq_len, drop_last=False, split_special_tokens=split_special_tokens))
    if not seqs or len(seqs[0]) < seq_len:
        raise ValueError(f"{what} ({', '.join(map(str, files))}) holds {len(seqs[0]) if seqs else 0} tokens (with an "
                         f"EOS after each document): fewer than one sequence of seq_len={seq_len}")
    return seqs if len(seqs[-1]) == seq_len else seqs[:-1]


def shifted_batch(seqs: np.ndarray) -> dict[str, torch.Tensor]:
    """input_ids and labels aligned to logit positions: labels[:, t] = input_ids[:, t+1], last = ignore."""
    ids = torch.from_numpy(np.ascontiguousarray(seqs, dtype=np.int64))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    return {"input_ids": ids, "labels": labels}


class PackedTextBatches:
    """Every epoch a seeded permutation of all sequences; each global batch is split across ranks.

    Labels are shifted_batch's unless `labels` (int64 [N, S], parallel to `sequences`) is given: then a batch carries
    those rows' labels (e.g. completion-only labels from preference data, see `from_preference`)."""

    def __init__(self, sequences: np.ndarray, *, batch_size: int, rank: int, world_size: int, seed: int,
                 pin_memory: bool = False, labels: np.ndarray | None = None) -> None:
        if labels is not None and labels.shape != sequences.shape:
            raise ValueError(f"labels have shape {labels.shape}, sequences {sequences.shape}: they must match")
        self.seqs, self.batch_size, self.rank, self.world = sequences, batch_size, rank, world_size
        self.labels = labels
        self.seed, self.pin_memory = seed, pin_memory  # pinned: non-blocking copies to CUDA
        self.per_epoch = len(sequences) // (batch_size * world_size)
        if self.per_epoch == 0:
            raise ValueError(f"data.text holds {len(sequences)} sequences: fewer than one global batch "
                             f"({batch_size} x {world_size} ranks)")
        self.epoch, self.index = 0, 0
        digest = hashlib.sha256(np.ascontiguousarray(sequences).data)  # the text, its packing and the labels
        if labels is not None:
            digest.update(np.ascontiguousarray(labels).data)
        self._sequences_sha = digest.hexdigest()[:16]

    @classmethod
    def from_files(cls, files: list[str], tokenizer: Any, seq_len: int, *, split_special_tokens: bool = True,
                   **kwargs) -> PackedTextBatches:
        return cls(np.stack(_packed(files, tokenizer, seq_len, "data.text", split_special_tokens)), **kwargs)

    @classmethod
    def from_preference(cls, files: list[str], tokenizer: Any, seq_len: int, *, split_special_tokens: bool = True,
                        **kwargs) -> PackedTextBatches:
        """One sequence per preference row (prompt + chosen + EOS), labels on the completion only
        (megadistil.data.preference; its counts are logged there)."""
        from megadistil.data.preference import preference_sequences

        seqs, labels, _ = preference_sequences(files, tokenizer, seq_len, split_special_tokens=split_special_tokens)
        return cls(seqs, labels=labels, **kwargs)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.seqs))
            while self.index < self.per_epoch:
                start = (self.index * self.world + self.rank) * self.batch_size
                self.index += 1
                batch = self._batch(order[start:start + self.batch_size])
                yield {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch
            self.epoch, self.index = self.epoch + 1, 0

    def _batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        if self.labels is None:
            return shifted_batch(self.seqs[rows])
        return {"input_ids": torch.from_numpy(np.ascontiguousarray(self.seqs[rows], dtype=np.int64)),
                "labels": torch.from_numpy(np.ascontiguousarray(self.labels[rows], dtype=np.int64))}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The position of a reader of the same sequences, order and split; anything else is refused by name (a
        state saved before the identity was recorded carries none of it)."""
        for name, mine in self._identity().items():
            if name in state and state[name] != mine:
                raise ValueError(f"data state has {name}={state[name]!r} but this reader has {mine!r}; exact resume "
                                 "needs the same value")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def _identity(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world, "batch_size": self.batch_size, "seed": self.seed,
                "sequences": self._sequences_sha}
