"""Teachers behind one interface: `targets(batch, loss) -> Targets`, exactly the targets that `loss` reads.

One class per `teacher.kind`; what each provides is config.TEACHER_PROVIDES, checked against every stage's loss before
any weight loads, so a teacher is never asked for a target it lacks.

- SharedTeacher (shared): teacher mode of the student's own weights (zero extra bytes; hidden states and q/k/v too),
  by default layer by layer inside the student's forward (LayerwiseTeacher): one ZeRO-3 gather serves both models.
- HFTeacher (hf): a separate frozen HF model as a ZeRO-3 inference engine; top-k + tail targets like the shards.
  With another tokenizer (CrossTokenizerTeacher) it reads the batch's teacher tokens of the same text, and each
  student position takes the target of the teacher position aligned with it (megadistil.data.crosstok).
- OfflineTeacher (shards): targets precomputed into shards, carried by the batch.
- NoTeacher (none): CE only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import deepspeed
import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache

from megadistil.bitnet import teacher_mode
from megadistil.config import layer_lists
from megadistil.distill.losses import KDKind, LossConfig, SparseTarget, Target
from megadistil.distill.targets import (
    aligned_targets,
    at_aligned,
    head_label_logprobs,
    hidden_topk,
    mapped_targets,
    model_label_logprobs,
)
from megadistil.engine.profile import phase
from megadistil.models import (
    ahead_of_each_layer,
    capture_qkv,
    decoder,
    decoder_layers,
    final_norm,
    logit_transform,
    output_head,
)


@dataclass
class Targets:
    sparse: SparseTarget | None = None  # top-k + tail per token
    hidden: Tensor | None = None  # final-norm hidden [B, S, H] for the student's own lm_head (shared teacher)
    layer_hidden: list[Tensor] = field(default_factory=list)  # per-layer outputs, for the hidden-state loss
    qkv: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)  # layer -> q/k/v projections
    kd_mask: Tensor | None = None  # [B, S] positions with a KD target (a teacher of another tokenizer); None: all
    label_logprobs: Tensor | None = None  # [B, S] the teacher's log p(label) at T=1 (preference weights)
    reference_logprobs: Tensor | None = None  # [B, S] the reference model's, set by the trainer (preference weights)
    foreign_hidden: Tensor | None = None  # [B, S, H_teacher] another tokenizer's teacher at aligned positions (DSKD)
    foreign_mask: Tensor | None = None  # [B, S] the positions foreign_hidden holds (aligned)
    layerwise: LayerwiseTeacher | None = None  # fills hidden / layer_hidden / qkv within the student's forward


class LayerwiseTeacher:
    """The shared teacher run inside the student's forward: each decoder layer runs in teacher mode on the teacher's
    stream of hidden states right before it runs as the student, on weights gathered once for both (the decoder
    layers are ZeRO-3 leaves, engine.model). The stream starts from the student's own input to the first layer (the
    embedding is the teacher's: frozen). The targets are bitwise those of a whole teacher_mode() forward."""

    def __init__(self, student: nn.Module, targets: Targets, hidden_layers: list[int], qkv_layers: list[int],
                 final: bool) -> None:
        self.student, self.targets = student, targets
        self.hidden_layers, self.qkv_layers, self.final = hidden_layers, qkv_layers, final
        self.last = len(decoder_layers(student)) - 1  # the layer whose output goes through the final norm
        self.stream: Tensor | None = None  # the teacher's hidden states between layers
        self.outputs: dict[int, Tensor] = {}

    @contextlib.contextmanager
    def alongside(self) -> Iterator[None]:
        """Within the block, the student's decoder forward also computes the teacher's targets, set on exit."""
        norm = final_norm(self.student)
        # HF's last hidden_states entry is after the final norm too. The teacher's goes through the norm inside the
        # student's call of it, on the same gathered weight.
        after_norm = norm.register_forward_pre_hook(self._teacher_final) \
            if self.final or self.last in self.hidden_layers else None
        try:
            with ahead_of_each_layer(self.student, self._teacher_layer):
                yield
        finally:
            if after_norm is not None:
                after_norm.remove()
        self.targets.hidden = self.outputs[self.last] if self.final else None
        self.targets.layer_hidden = [self.outputs[i] for i in self.hidden_layers]
        self.stream, self.outputs = None, {}

    @torch.no_grad()
    def _teacher_final(self, norm: nn.Module, _args: tuple) -> None:
        self.outputs[self.last] = norm.forward(self.stream)  # not norm(): no hooks

    @torch.no_grad()
    def _teacher_layer(self, index: int, forward: Callable, args: tuple, kwargs: dict) -> None:
        if self.stream is None:
            self.stream = (args[0] if args else kwargs["hidden_states"]).detach()
        if args:
            args = (self.stream, *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": self.stream}
        # The teacher's keys and values must not join the student's KV cache, if the model keeps one (whatever the
        # transformers version names the argument: past_key_value(s), cache).
        args = tuple(None if isinstance(a, Cache) else a for a in args)
        kwargs = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}
        qkv_layers = [index] if index in self.qkv_layers else []
        with phase("teacher"), teacher_mode(forward.__self__), capture_qkv(self.student, qkv_layers) as qkv:
            out = forward(*args, **kwargs)
        self.stream = out[0] if isinstance(out, tuple) else out
        self.targets.qkv.update(qkv)
        if index in self.hidden_layers:
            self.outputs[index] = self.stream


class Teacher(Protocol):
    def targets(self, batch: dict[str, Tensor], loss: LossConfig, *, label_logprobs: bool = False) -> Targets:
        """The targets `loss` reads; with label_logprobs, also what the teacher's log p(label) is computed from."""


class SharedTeacher:
    """The student's own weights in teacher mode; the layers captured are the ones the step's loss reads. Layerwise,
    the targets come with the student's forward (Targets.layerwise); otherwise from a whole forward before it."""

    def __init__(self, student: nn.Module, layerwise: bool = True) -> None:
        self.student, self.layerwise = student, layerwise
        if layerwise:
            final_norm(student)  # an architecture whose final norm cannot be told apart is refused here

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor], loss: LossConfig, *, label_logprobs: bool = False) -> Targets:
        """label_logprobs: the final hidden states come along; the loss module turns them into log p(label) with
        the LM head it gathers anyway (DistillModule)."""
        needs = loss.needs()
        if not needs and not label_logprobs:
            return Targets()  # a CE-only stage: no teacher forward
        hidden_layers, qkv_layers = layer_lists(loss, len(decoder_layers(self.student)))
        final = Target.logits in needs or label_logprobs
        if self.layerwise:
            targets = Targets()
            targets.layerwise = LayerwiseTeacher(self.student, targets, hidden_layers, qkv_layers, final)
            return targets
        with teacher_mode(self.student), capture_qkv(self.student, qkv_layers) as qkv:
            out = decoder(self.student)(input_ids=batch["input_ids"], output_hidden_states=bool(hidden_layers))
        layer_hidden = [out.hidden_states[i + 1] for i in hidden_layers]
        return Targets(hidden=out.last_hidden_state if final else None, layer_hidden=layer_hidden, qkv=qkv)


class NoTeacher:
    """CE only: the targets are the labels alone."""

    def targets(self, batch: dict[str, Tensor], loss: LossConfig, *, label_logprobs: bool = False) -> Targets:
        return Targets()


def on_student_vocab(sparse: SparseTarget, mask: Tensor | None, vocab_map: Tensor | None,
                     loss: LossConfig) -> Targets:
    """Targets of a teacher with another tokenizer (vocab_map: its ids -> the student's, -1: none) as the loss reads
    them: ULD as they are (it reads sorted probabilities only); any other divergence on the student's vocabulary, the
    teacher's tokens without a student token moved into the tail (mapped_targets)."""
    if vocab_map is None or loss.kind == KDKind.uld:
        return Targets(sparse=sparse, kd_mask=mask)
    mapped, kept = mapped_targets(sparse, vocab_map)
    return Targets(sparse=mapped, kd_mask=kept if mask is None else mask & kept)


class OfflineTeacher:
    """The shards' top-k + tail, decoded by the reader into the batch; shards of a teacher with another tokenizer
    carry the mask of aligned positions, and vocab_map maps their ids (None: ULD only)."""

    def __init__(self, vocab_map: Tensor | None = None) -> None:
        self.vocab_map = vocab_map

    def targets(self, batch: dict[str, Tensor], loss: LossConfig, *, label_logprobs: bool = False) -> Targets:
        if Target.logits not in loss.needs():
            return Targets()
        sparse = SparseTarget(batch["topk_ids"], batch["topk_logprobs"], batch["tail_logmass"])
        return on_student_vocab(sparse, batch.get("kd_mask"), self.vocab_map, loss)


class TopKHead(nn.Module):
    """A separate teacher's top-k log-probs at temperature T + tail log-mass (the precompute's producer) and, given
    labels, its log p(label) at T=1, as one module so that its ZeRO-3 engine gathers every weight the forward uses."""

    def __init__(self, teacher: nn.Module, top_k: int) -> None:
        super().__init__()
        self.teacher, self.top_k = teacher, top_k

    def forward(self, input_ids: Tensor, temperature: float, chunk_tokens: int, labels: Tensor | None = None,
                with_hidden: bool = False) -> tuple[Tensor, ...]:
        """(top-k ids, log-probs, tail) + (its final hidden states, with_hidden) or + (log p(label), labels)."""
        hidden = decoder(self.teacher)(input_ids=input_ids, use_cache=False).last_hidden_state  # no KV cache to keep
        t = hidden_topk(self.teacher, hidden, top_k=self.top_k, temperature=temperature, chunk_tokens=chunk_tokens)
        if labels is None:
            return (t.topk_ids, t.topk_logprobs, t.tail_logmass) + ((hidden,) if with_hidden else ())
        transform = logit_transform(self.teacher.config, type(self.teacher))
        label_logprobs = head_label_logprobs(hidden, output_head(self.teacher).weight, labels, transform,
                                             chunk_tokens=chunk_tokens)
        return t.topk_ids, t.topk_logprobs, t.tail_logmass, label_logprobs


def inference_engine(module: nn.Module, ds_config: dict[str, Any], head_weight: Tensor) -> Any:
    """A frozen module as a DeepSpeed engine of the run's ZeRO stage, without the optimizer. The LM head's weight is
    applied in chunks without calling its module (megadistil.distill.targets): under ZeRO-3 it is an external
    parameter of the engine's module, gathered once per forward."""
    module.requires_grad_(False).eval()
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        deepspeed.zero.register_external_parameter(module, head_weight)
    inference_config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    engine, *_ = deepspeed.initialize(model=module, config=inference_config)
    return engine


class HFTeacher:
    """A separate teacher of the student's tokenizer; vocab_map (crosstok.padded_vocab_map) where its head has rows
    past the student's: their mass joins the tail."""

    def __init__(self, model: nn.Module, ds_config: dict[str, Any], *, top_k: int,
                 vocab_map: Tensor | None = None) -> None:
        self.engine = inference_engine(TopKHead(model, top_k), ds_config, output_head(model).weight)
        self.vocab_map = vocab_map

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor], loss: LossConfig, *, label_logprobs: bool = False) -> Targets:
        if Target.logits not in loss.needs() and not label_logprobs:
            return Targets()
        out = self.engine(batch["input_ids"], loss.temperature, loss.chunk_tokens,
                          batch["labels"] if label_logprobs else None)
        targets = on_student_vocab(SparseTarget(*out[:3]), None, self.vocab_map, loss)
        targets.label_logprobs = out[3] if label_logprobs else None
        return targets


class CrossTokenizerTeacher(HFTeacher):
    """A separate teacher with its own tokenizer. The batch carries the teacher's tokens of the same text
    (`teacher_input_ids` [B, T], right-padded: a causal model's earlier positions never see the padding) and, per
    student position, the aligned teacher position (`teacher_index` [B, S], -1 where the token boundaries differ).
    The targets hold the teacher's top-k + tail at those positions, as on_student_vocab gives them to the loss, and a
    mask of the positions that have one."""

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor], loss: LossConfig, *, label_logprobs: bool = False) -> Targets:
        if label_logprobs:
            raise ValueError("a teacher with another tokenizer has no log-probability of the student's labels")
        if Target.logits not in loss.needs() and not loss.dskd_weight:
            return Targets()
        out = self.engine(batch["teacher_input_ids"], loss.temperature, loss.chunk_tokens, None, bool(loss.dskd_weight))
        index = batch["teacher_index"]
        targets = on_student_vocab(*aligned_targets(SparseTarget(*out[:3]), index), self.vocab_map, loss)
        if loss.dskd_weight:  # the teacher's own final hidden states at the aligned positions (DistillModule projects)
            targets.foreign_hidden, targets.foreign_mask = at_aligned(out[3], index), index >= 0
        return targets


class LabelLogprobHead(nn.Module):
    """A model's log p(label) at T=1 as one module (its ZeRO-3 engine gathers every weight the forward uses)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, labels: Tensor, chunk_tokens: int) -> Tensor:
        return model_label_logprobs(self.model, input_ids, labels, chunk_tokens=chunk_tokens)


class ReferenceModel:
    """The preference-tuned teacher's reference (preference.reference): its log-probs of the labels."""

    def __init__(self, model: nn.Module, ds_config: dict[str, Any]) -> None:
        self.engine = inference_engine(LabelLogprobHead(model), ds_config, output_head(model).weight)

    @torch.no_grad()
    def label_logprobs(self, batch: dict[str, Tensor], chunk_tokens: int) -> Tensor:
        return self.engine(batch["input_ids"], batch["labels"], chunk_tokens)
