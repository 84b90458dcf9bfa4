"""Teachers behind one interface: `targets(batch) -> Targets`.

- SharedTeacher: teacher mode of the student's own weights (zero extra bytes; hidden states and attention too).
- HFTeacher: a separate frozen HF model as a ZeRO-3 inference engine; gives top-k + tail targets like the shards.
- OfflineTeacher: targets precomputed into shards, carried by the batch.
- NoTeacher: CE only (the shared teacher still gives the held-out comparison in eval).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import deepspeed
import torch
from torch import Tensor, nn

from megadistil.bitnet import teacher_mode
from megadistil.distill.losses import SparseTarget
from megadistil.models import capture_qkv, decoder, logit_transform, output_head


@dataclass
class Targets:
    sparse: SparseTarget | None = None  # top-k + tail per token
    hidden: Tensor | None = None  # final-norm hidden [B, S, H] for the student's own lm_head (shared teacher)
    layer_hidden: list[Tensor] = field(default_factory=list)  # per-layer outputs, for the hidden-state loss
    qkv: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # layer -> q/k/v projections


class Teacher(Protocol):
    live: bool

    def targets(self, batch: dict[str, Tensor]) -> Targets: ...


class SharedTeacher:
    live = True

    def __init__(self, student: nn.Module, *, hidden_layers: list[int], qkv_layers: list[int]) -> None:
        self.student, self.hidden_layers, self.qkv_layers = student, hidden_layers, qkv_layers

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor]) -> Targets:
        with teacher_mode(self.student), capture_qkv(self.student, self.qkv_layers) as qkv:
            out = decoder(self.student)(input_ids=batch["input_ids"], output_hidden_states=bool(self.hidden_layers))
        layer_hidden = [out.hidden_states[i + 1] for i in self.hidden_layers] if self.hidden_layers else []
        return Targets(hidden=out.last_hidden_state, layer_hidden=layer_hidden, qkv=qkv)


class NoTeacher:
    """A loss with no teacher term (CE only): the targets are the labels alone."""

    live = False

    def targets(self, batch: dict[str, Tensor]) -> Targets:
        return Targets()


class OfflineTeacher:
    live = False

    def targets(self, batch: dict[str, Tensor]) -> Targets:
        return Targets(sparse=SparseTarget(batch["topk_ids"], batch["topk_logprobs"], batch["tail_logmass"].exp()))


class TopKHead(nn.Module):
    """A separate teacher that emits top-k log-probs at temperature T + tail mass, chunk by chunk over tokens."""

    def __init__(self, model: nn.Module, top_k: int, temperature: float, chunk_tokens: int) -> None:
        super().__init__()
        self.model, self.top_k, self.temperature, self.chunk_tokens = model, top_k, temperature, chunk_tokens
        self.logit_transform = logit_transform(model.config, type(model))

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden = decoder(self.model)(input_ids=input_ids).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        ids, logps = [], []
        for start in range(0, flat.shape[0], self.chunk_tokens):
            logits = self.logit_transform.apply_(output_head(self.model)(flat[start:start + self.chunk_tokens]).float())
            logits = logits / self.temperature
            top = torch.log_softmax(logits, -1).topk(self.top_k, dim=-1)
            ids.append(top.indices)
            logps.append(top.values)
        ids, logps = torch.cat(ids), torch.cat(logps)
        tail = (1 - logps.exp().sum(-1)).clamp_(min=0)
        shape = input_ids.shape
        return ids.reshape(*shape, -1), logps.reshape(*shape, -1), tail.reshape(shape)


class HFTeacher:
    live = True

    def __init__(self, model: nn.Module, ds_config: dict[str, Any], *, top_k: int, temperature: float,
                 chunk_tokens: int) -> None:
        model.requires_grad_(False).eval()
        inference_config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
        self.engine, *_ = deepspeed.initialize(model=TopKHead(model, top_k, temperature, chunk_tokens),
                                               config=inference_config)

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor]) -> Targets:
        ids, logps, tail = self.engine(batch["input_ids"])
        return Targets(sparse=SparseTarget(ids, logps, tail))
