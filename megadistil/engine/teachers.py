"""Teachers behind one interface: `targets(batch, loss) -> Targets`, exactly the targets that `loss` reads.

One class per `teacher.kind`; what each provides is config.TEACHER_PROVIDES, checked against every stage's loss before
any weight loads, so a teacher is never asked for a target it lacks.

- SharedTeacher (shared): teacher mode of the student's own weights (zero extra bytes; hidden states and q/k/v too).
- HFTeacher (hf): a separate frozen HF model as a ZeRO-3 inference engine; top-k + tail targets like the shards.
- OfflineTeacher (shards): targets precomputed into shards, carried by the batch.
- NoTeacher (none): CE only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import deepspeed
import torch
from torch import Tensor, nn

from megadistil.bitnet import teacher_mode
from megadistil.config import layer_lists
from megadistil.distill.losses import LossConfig, SparseTarget, Target
from megadistil.distill.targets import teacher_topk
from megadistil.models import capture_qkv, decoder


@dataclass
class Targets:
    sparse: SparseTarget | None = None  # top-k + tail per token
    hidden: Tensor | None = None  # final-norm hidden [B, S, H] for the student's own lm_head (shared teacher)
    layer_hidden: list[Tensor] = field(default_factory=list)  # per-layer outputs, for the hidden-state loss
    qkv: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # layer -> q/k/v projections


class Teacher(Protocol):
    def targets(self, batch: dict[str, Tensor], loss: LossConfig) -> Targets: ...


class SharedTeacher:
    """The student's own weights in teacher mode; the layers captured are the ones the step's loss reads."""

    def __init__(self, student: nn.Module) -> None:
        self.student = student

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor], loss: LossConfig) -> Targets:
        needs = loss.needs()
        if not needs:
            return Targets()  # a CE-only stage: no teacher forward
        hidden_layers, qkv_layers = layer_lists(loss, self.student.config.num_hidden_layers)
        with teacher_mode(self.student), capture_qkv(self.student, qkv_layers) as qkv:
            out = decoder(self.student)(input_ids=batch["input_ids"], output_hidden_states=bool(hidden_layers))
        layer_hidden = [out.hidden_states[i + 1] for i in hidden_layers]
        return Targets(hidden=out.last_hidden_state if Target.logits in needs else None,
                       layer_hidden=layer_hidden, qkv=qkv)


class NoTeacher:
    """CE only: the targets are the labels alone."""

    def targets(self, batch: dict[str, Tensor], loss: LossConfig) -> Targets:
        return Targets()


class OfflineTeacher:
    """The shards' top-k + tail, decoded by the reader into the batch."""

    def targets(self, batch: dict[str, Tensor], loss: LossConfig) -> Targets:
        if Target.logits not in loss.needs():
            return Targets()
        return Targets(sparse=SparseTarget(batch["topk_ids"], batch["topk_logprobs"], batch["tail_logmass"]))


class TopKHead(nn.Module):
    """A separate teacher's top-k log-probs at temperature T + tail log-mass (the precompute's producer), as one
    module so that its ZeRO-3 engine gathers every weight the forward uses."""

    def __init__(self, teacher: nn.Module, top_k: int) -> None:
        super().__init__()
        self.teacher, self.top_k = teacher, top_k

    def forward(self, input_ids: Tensor, temperature: float, chunk_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        t = teacher_topk(self.teacher, input_ids, top_k=self.top_k, temperature=temperature, chunk_tokens=chunk_tokens)
        return t.topk_ids, t.topk_logprobs, t.tail_logmass


class HFTeacher:
    def __init__(self, model: nn.Module, ds_config: dict[str, Any], *, top_k: int) -> None:
        model.requires_grad_(False).eval()
        inference_config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
        self.engine, *_ = deepspeed.initialize(model=TopKHead(model, top_k), config=inference_config)

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor], loss: LossConfig) -> Targets:
        if Target.logits not in loss.needs():
            return Targets()
        return Targets(sparse=SparseTarget(*self.engine(batch["input_ids"], loss.temperature, loss.chunk_tokens)))
