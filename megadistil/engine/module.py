"""The student plus its losses, as the one module DeepSpeed trains: the decoder forward (with the layerwise teacher
alongside it), the hidden-state and attention-relation terms, and the LM head's losses in a submodule of their own."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch import Tensor, nn

from megadistil.config import layer_lists
from megadistil.distill.losses import (
    IGNORE_INDEX,
    LossConfig,
    Target,
    attention_relation_loss,
    chunked_lm_head_loss,
    hidden_state_loss,
)
from megadistil.distill.preference import PreferenceConfig, token_weights
from megadistil.distill.targets import head_label_logprobs
from megadistil.engine.profile import phase
from megadistil.engine.teachers import Targets
from megadistil.models import capture_qkv, decoder, decoder_layers, logit_transform, output_head


class DistillModule(nn.Module):
    """The student plus its losses, as one module for DeepSpeed (the LM head's losses in a submodule of their own)."""

    def __init__(self, student: nn.Module, preference: PreferenceConfig | None = None,
                 projector: nn.Module | None = None) -> None:
        super().__init__()
        self.student = student
        self.projector = projector  # DSKD: a teacher of another tokenizer's hidden size -> the student's
        self.head_loss = HeadLoss(student, preference)

    def forward(self, input_ids: Tensor, labels: Tensor, targets: Targets, cfg: LossConfig) -> dict[str, Tensor]:
        hidden_layers, qkv_layers = layer_lists(cfg, len(decoder_layers(self.student)))
        teacher = targets.layerwise.alongside() if targets.layerwise else contextlib.nullcontext()
        with teacher, capture_qkv(self.student, qkv_layers) as qkv:
            out = decoder(self.student)(input_ids=input_ids, output_hidden_states=bool(hidden_layers))
        projected = self.projector(targets.foreign_hidden.to(out.last_hidden_state.dtype)) \
            if cfg.dskd_weight and targets.foreign_hidden is not None else None
        parts = self.head_loss(out.last_hidden_state, labels, targets, cfg, projected)
        mask = labels != IGNORE_INDEX
        if hidden_layers:
            student_hidden = [out.hidden_states[i + 1] for i in hidden_layers]
            parts["hidden"] = hidden_state_loss(student_hidden, targets.layer_hidden, mask,
                                                magnitude_weight=cfg.hidden_magnitude_weight)
            parts["loss"] = parts["loss"] + cfg.hidden_weight * parts["hidden"]
        if qkv_layers:
            # Batches are right-padded (a real row never sees padding): every earlier position is a key, the trained
            # rows count (a completion's relations to its prompt included).
            terms = [attention_relation_loss(qkv[i], targets.qkv[i], None, rows=mask,
                                             num_relation_heads=cfg.attn_relation_heads,
                                             temperature=cfg.attn_relation_temperature) for i in qkv_layers]
            parts["attn"] = torch.stack(terms).mean()
            parts["loss"] = parts["loss"] + cfg.attn_relation_weight * parts["attn"]
        return parts


class HeadLoss(nn.Module):
    """The losses read through the student's LM head (KD + CE in chunks, preference weights, DSKD), as a module of
    their own: under ZeRO-3 the head's weight is its external parameter (register_external_parameter), gathered
    for this module's forward alone instead of for the whole decoder forward and backward around it (at Llama-3.1-8B
    the head is 1 GB in bf16)."""

    def __init__(self, student: nn.Module, preference: PreferenceConfig | None = None) -> None:
        super().__init__()
        self.head = (output_head(student),)  # a tuple: the head stays the student's module, not a second child
        self.preference = preference
        self.logit_transform = logit_transform(student.config, type(student))  # softcapping etc.: the model's logits

    def forward(self, hidden: Tensor, labels: Tensor, targets: Targets, cfg: LossConfig,
                projected: Tensor | None = None) -> dict[str, Tensor]:
        weight = self.head[0].weight
        kd = Target.logits in cfg.needs()
        teacher_hidden = targets.hidden if kd else None
        weights = self._token_weights(targets, weight, labels, cfg) if targets.reference_logprobs is not None else None
        with phase("loss"):
            parts = chunked_lm_head_loss(hidden, weight, labels, cfg,
                                         sparse=targets.sparse if kd else None, teacher_hidden=teacher_hidden,
                                         teacher_lm_head_weight=weight if teacher_hidden is not None else None,
                                         logit_transform=self.logit_transform, kd_mask=targets.kd_mask,
                                         token_weights=weights)
        if weights is not None:
            mask = labels != IGNORE_INDEX
            parts["token_weight"] = (weights * mask).sum() / mask.sum().clamp_min(1)  # the mean over trained tokens
        if projected is not None:
            self._dual_space(parts, hidden, projected, weight, labels, targets, cfg)
        return parts

    def _dual_space(self, parts: dict[str, Tensor], hidden: Tensor, projected: Tensor, head_weight: Tensor,
                    labels: Tensor, targets: Targets, cfg: LossConfig) -> None:
        """DSKD's teacher-to-student half (Zhang et al. 2024): the teacher's final hidden states at the aligned
        positions, projected into the student's space (`projected`), are read by the student's own head as a
        next-token distribution over the student's vocabulary. The projector learns that reading by CE on the labels
        in the same step; the student is distilled (loss.kind, temperature) towards the projected distribution,
        detached."""
        aligned = labels.masked_fill(~targets.foreign_mask, IGNORE_INDEX)
        proj = chunked_lm_head_loss(projected, head_weight.detach(), aligned,  # the projector learns, not the head
                                    replace(cfg, kd_weight=0.0, ce_weight=1.0), logit_transform=self.logit_transform)
        kd = chunked_lm_head_loss(hidden, head_weight, aligned, replace(cfg, kd_weight=1.0, ce_weight=0.0),
                                  teacher_hidden=projected.detach(), teacher_lm_head_weight=head_weight,
                                  logit_transform=self.logit_transform)
        parts["dskd"], parts["dskd_proj_ce"] = kd["kd"], proj["ce"]
        parts["loss"] = parts["loss"] + cfg.dskd_weight * (kd["loss"] + proj["loss"])

    def _token_weights(self, targets: Targets, head_weight: Tensor, labels: Tensor, cfg: LossConfig) -> Tensor:
        """Preference weights from the teacher's and the reference's log p(label); the shared teacher's come from its
        final hidden states through the head this forward has gathered anyway."""
        teacher = targets.label_logprobs
        if teacher is None:
            teacher = head_label_logprobs(targets.hidden, head_weight, labels, self.logit_transform,
                                          chunk_tokens=cfg.chunk_tokens)
        return token_weights(teacher, targets.reference_logprobs, self.preference)
