"""Perplexity of a causal LM on text files: the held-out measure of the trainer, for any model kind."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megadistil.data.packed import eval_sequences
from megadistil.eval.models import EvalError


@torch.no_grad()
def text_perplexity(model: nn.Module, tokenizer: Any, files: list[str], *, seq_len: int = 256,
                    max_sequences: int = 64, batch_size: int = 8,
                    split_special_tokens: bool = True) -> dict[str, float]:
    """exp(mean next-token CE) over `max_sequences` packed sequences spread over all of `files` (the trainer's
    eval_sequences: documents joined with EOS, so the same text gives the trainer's figure)."""
    try:
        seqs = eval_sequences(list(files), tokenizer, seq_len, max_sequences, split_special_tokens=split_special_tokens)
    except (ValueError, FileNotFoundError) as e:
        raise EvalError(f"--text {' '.join(files)}: {e}") from None
    nll, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        ids = torch.from_numpy(seqs[start:start + batch_size]).long().to(next(model.parameters()).device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "tokens": count, "sequences": len(seqs), "seq_len": seq_len}
