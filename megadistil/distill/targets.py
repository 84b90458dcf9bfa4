"""The one producer of top-k + tail targets from a teacher model: precompute writes them to shards, a live HF teacher
feeds them to the loss. Plain torch on a transformers causal LM (no DeepSpeed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megadistil.distill.losses import IGNORE_INDEX, TAIL_LOGMASS_FLOOR, LogitTransform, SparseTarget
from megadistil.models import decoder, logit_transform, output_head


def topk_target(logits: Tensor, top_k: int) -> SparseTarget:
    """Top-k ids and log-probs (descending) of tempered float32 logits [..., V], and the rest's log-mass computed as a
    logsumexp over the complement (log space end to end: no 1 - sum(exp) cancellation), floored once."""
    lse = torch.logsumexp(logits, -1, keepdim=True)
    top = logits.topk(top_k, dim=-1)
    if top_k < logits.shape[-1]:
        tail = torch.logsumexp(logits.scatter(-1, top.indices, float("-inf")), -1) - lse.squeeze(-1)
    else:
        tail = torch.full_like(lse.squeeze(-1), TAIL_LOGMASS_FLOOR)
    return SparseTarget(top.indices, top.values - lse, tail.clamp_min(TAIL_LOGMASS_FLOOR))


@torch.no_grad()
def teacher_topk(model: nn.Module, input_ids: Tensor, *, top_k: int, temperature: float,
                 chunk_tokens: int = 1024) -> SparseTarget:
    """A causal LM's targets at temperature T for input_ids [B, S]: fields [B, S, k] and [B, S]. The LM head runs
    `chunk_tokens` positions at a time, so no [tokens x vocab] logits exist beyond one chunk; its result goes through
    the model's own output transform (e.g. Gemma2's softcap) before the temperature. No KV cache is built (a
    model's config.use_cache defaults to True: every layer's keys and values, kept for nothing)."""
    hidden = decoder(model)(input_ids=input_ids, use_cache=False).last_hidden_state
    return hidden_topk(model, hidden, top_k=top_k, temperature=temperature, chunk_tokens=chunk_tokens)


@torch.no_grad()
def hidden_topk(model: nn.Module, hidden: Tensor, *, top_k: int, temperature: float,
                chunk_tokens: int = 1024) -> SparseTarget:
    """teacher_topk from the decoder's final-norm output [B, S, H] (a caller that needs it for more than targets).

    The head's weight is applied directly, not by calling the head module once per chunk: the number of chunks
    follows the token count, which may differ across ranks, and under ZeRO-3 each module call is a collective
    gather (the callers gather the weight once: an external parameter of their engine's module, or around the call)."""
    head, transform = output_head(model), logit_transform(model.config, type(model))
    flat = hidden.reshape(-1, hidden.shape[-1])
    parts = [topk_target(transform.apply_(F.linear(flat[i:i + chunk_tokens], head.weight).float())
                         / temperature, top_k) for i in range(0, flat.shape[0], chunk_tokens)]
    shape = hidden.shape[:-1]
    return SparseTarget(torch.cat([p.topk_ids for p in parts]).reshape(*shape, top_k),
                        torch.cat([p.topk_logprobs for p in parts]).reshape(*shape, top_k),
                        torch.cat([p.tail_logmass for p in parts]).reshape(shape))


@torch.no_grad()
def head_label_logprobs(hidden: Tensor, head_weight: Tensor, labels: Tensor, transform: LogitTransform, *,
                        chunk_tokens: int = 1024) -> Tensor:
    """log p(label) at temperature 1 from final-norm hidden states [..., H] and an LM head weight [V, H], float32
    [...], `chunk_tokens` positions at a time; 0 where the label is IGNORE_INDEX."""
    flat, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    out = torch.zeros(flat_labels.shape, dtype=torch.float32, device=hidden.device)
    valid = (flat_labels != IGNORE_INDEX).nonzero().squeeze(-1)
    for i in range(0, valid.numel(), chunk_tokens):
        idx = valid[i:i + chunk_tokens]
        logits = transform.apply_((flat[idx] @ head_weight.T).float())
        out[idx] = logits.gather(-1, flat_labels[idx, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return out.reshape(labels.shape)


@torch.no_grad()
def model_label_logprobs(model: nn.Module, input_ids: Tensor, labels: Tensor, *, chunk_tokens: int = 1024) -> Tensor:
    """A causal LM's log p(label) at temperature 1 (through its output transform) for input_ids [B, S]: [B, S]
    (no KV cache built, as teacher_topk)."""
    hidden = decoder(model)(input_ids=input_ids, use_cache=False).last_hidden_state
    return head_label_logprobs(hidden, output_head(model).weight, labels,
                               logit_transform(model.config, type(model)), chunk_tokens=chunk_tokens)


def at_aligned(values: Tensor, teacher_index: Tensor) -> Tensor:
    """values [B, T, ...] at the teacher position aligned with each student position (teacher_index [B, S], -1: none,
    which holds position 0's value as a placeholder): [B, S, ...]."""
    rows = torch.arange(teacher_index.shape[0], device=teacher_index.device)[:, None]
    return values[rows, teacher_index.clamp_min(0)]


def aligned_targets(target: SparseTarget, teacher_index: Tensor) -> tuple[SparseTarget, Tensor]:
    """A teacher's targets [B, T, k] at the teacher positions aligned with each student position (at_aligned) and the
    mask of positions that have one (the loss never reads a placeholder row)."""
    picked = SparseTarget(*(at_aligned(t, teacher_index) for t in (target.topk_ids, target.topk_logprobs,
                                                                   target.tail_logmass)))
    return picked, teacher_index >= 0


def mapped_targets(target: SparseTarget, vocab_map: Tensor) -> tuple[SparseTarget, Tensor]:
    """Another tokenizer's top-k + tail on the student's vocabulary: each teacher id that has a student token of the
    same bytes (vocab_map[id] >= 0) keeps its probability on that student id, the others' mass joins the tail
    (SparseTarget.present marks the kept entries; a dropped one repeats its row's first kept id). Returns the target
    and the mask of rows that kept any entry (a row that kept none has no target on the student's vocabulary)."""
    mapped = vocab_map[target.topk_ids]
    present = mapped >= 0
    first = mapped.gather(-1, present.to(torch.uint8).argmax(-1, keepdim=True)).clamp_min(0)
    dropped = torch.logsumexp(target.topk_logprobs.masked_fill(present, float("-inf")), -1)
    tail = torch.logaddexp(target.tail_logmass, dropped).clamp(TAIL_LOGMASS_FLOOR, 0.0)
    return SparseTarget(torch.where(present, mapped, first), target.topk_logprobs.masked_fill(~present, float("-inf")),
                        tail, present), present.any(-1)
