"""The one producer of top-k + tail targets from a teacher model: precompute writes them to shards, a live HF teacher
feeds them to the loss. Plain torch on a transformers causal LM (no DeepSpeed)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megadistil.distill.losses import TAIL_LOGMASS_FLOOR, SparseTarget
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
    the model's own output transform (e.g. Gemma2's softcap) before the temperature."""
    hidden = decoder(model)(input_ids=input_ids).last_hidden_state
    head, transform = output_head(model), logit_transform(model.config, type(model))
    flat = hidden.reshape(-1, hidden.shape[-1])
    parts = [topk_target(transform.apply_(head(flat[i:i + chunk_tokens]).float()) / temperature, top_k)
             for i in range(0, flat.shape[0], chunk_tokens)]
    shape = input_ids.shape
    return SparseTarget(torch.cat([p.topk_ids for p in parts]).reshape(*shape, top_k),
                        torch.cat([p.topk_logprobs for p in parts]).reshape(*shape, top_k),
                        torch.cat([p.tail_logmass for p in parts]).reshape(shape))
