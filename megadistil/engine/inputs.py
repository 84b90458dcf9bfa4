"""Everything a run reads besides weights, checked before any weight loads: the model directories, the student's
architecture and layer lists, the tokenizers (a live teacher's or shards' of another vocabulary included), the
shards' manifest and the eval tasks. Each refusal names the config key at fault."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from megadistil.config import (
    ConfigError,
    RunConfig,
    TeacherKind,
    layer_lists,
    loss_configs,
    setter_of,
    shard_seq_len,
    shards_manifest,
    uses_onpolicy,
)
from megadistil.data import Manifest, expand_files, tokenizer_fingerprint
from megadistil.data.stream import batches_per_epoch
from megadistil.distill.losses import KDKind
from megadistil.engine.architecture import check_architecture, check_companion
from megadistil.engine.model import check_model_dir, check_same_tokenizer
from megadistil.utils import require


@dataclass(frozen=True)
class Inputs:
    """What the checks settled, for the trainer to build its data, teacher and losses from."""

    tokenizer: Any  # the student's
    teacher_tokenizer: Any | None = None  # a live teacher's (teacher.kind=hf) where it differs from the student's
    shards_teacher_tokenizer: Any | None = None  # the teacher's behind shards of its own ids, where the loss maps them
    cross_tokenizer_targets: bool = False  # targets on aligned positions only: another tokenizer, live or in shards
    manifest: Manifest | None = None  # data.shards'


def check_inputs(cfg: RunConfig, world_size: int) -> Inputs:
    """Raise ConfigError naming the key at fault, else what the run reads with (on `world_size` ranks)."""
    out = Path(cfg.train.output_dir)
    _refuse(out.exists() and not out.is_dir(), "train.output_dir", f"{out} exists and is not a directory")
    check_model_dir(cfg.model.student, "model.student")
    _refuse(bool(cfg.model.tokenizer) and not Path(cfg.model.tokenizer).is_dir(), "model.tokenizer",
            f"{cfg.model.tokenizer} is not a directory (a tokenizer is read from disk, never fetched from a hub)")
    trust = cfg.model.trust_remote_code
    if cfg.teacher.kind == TeacherKind.hf:
        check_model_dir(cfg.teacher.path, "teacher.path")
        vocab = AutoConfig.from_pretrained(cfg.teacher.path, trust_remote_code=trust).get_text_config().vocab_size
        _refuse(cfg.teacher.top_k > vocab, "teacher.top_k", f"{cfg.teacher.top_k} exceeds the teacher's vocabulary "
                f"({vocab} tokens)")
        check_companion(cfg.teacher.path, "teacher.path", cfg)
    student_config = AutoConfig.from_pretrained(cfg.model.student, trust_remote_code=trust)
    check_architecture(student_config, cfg)
    for where, loss in loss_configs(cfg):
        try:
            layer_lists(loss, student_config.num_hidden_layers)
        except ValueError as e:
            raise ConfigError(f"config key '{setter_of(cfg, where, str(e).split(':')[0])}': {e}") from None
        _check_relation_heads(setter_of(cfg, where, "loss.attn_relation_heads"), loss, student_config)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.student, trust_remote_code=trust)
    teacher_tokenizer = _live_teacher_tokenizer(cfg, tokenizer)
    for where, loss in loss_configs(cfg):
        _refuse(loss.dskd_weight and teacher_tokenizer is None, setter_of(cfg, where, "loss.dskd_weight"),
                "the dual-space term needs a live teacher with another tokenizer than the student's "
                "(teacher.kind=hf, teacher.path); with the same tokenizer the KD term is the exact one")
    _refuse(not cfg.data.split_special_tokens and teacher_tokenizer is not None, "data.split_special_tokens",
            "control tokens in the text need one tokenizer: the teacher's (another than the student's) would read the "
            "student's as text, and the two are aligned by text")
    if cfg.preference.reference:
        check_same_tokenizer(cfg.preference.reference, tokenizer, "preference.reference", cfg)
        check_companion(cfg.preference.reference, "preference.reference", cfg)
    inputs = Inputs(tokenizer, teacher_tokenizer, cross_tokenizer_targets=teacher_tokenizer is not None)
    _check_data_files(cfg)
    if cfg.data.shards:
        inputs = _check_shards(cfg, inputs, shards_manifest(cfg), student_config.vocab_size)
        _check_passes(cfg, inputs.manifest, world_size)
    if cfg.train.eval_tasks:
        from megadistil.eval.tasks import EvalError, preflight

        try:
            preflight(list(cfg.train.eval_tasks), cfg.train.eval_tasks_include_path or None)
        except EvalError as e:
            raise ConfigError(f"config key 'train.eval_tasks': {e}") from None
    return inputs


def _live_teacher_tokenizer(cfg: RunConfig, tokenizer: Any) -> Any:
    """A separate teacher's tokenizer where it differs from the student's (None: the same, the exact path), checked
    against what the cross-tokenizer path supports."""
    if cfg.teacher.kind != TeacherKind.hf:
        return None
    teacher_tok = AutoTokenizer.from_pretrained(cfg.teacher.path, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer_fingerprint(teacher_tok) == tokenizer_fingerprint(tokenizer):
        return None
    why = f"teacher.path {cfg.teacher.path} has another tokenizer than the student"
    _refuse(not cfg.data.text, "data.text", f"is required: {why}, which must tokenize the training text itself")
    _refuse(uses_onpolicy(cfg), "onpolicy.fraction", f"on-policy distillation needs the teacher to score the "
            f"student's tokens; {why}")
    _refuse(bool(cfg.preference.reference), "preference.reference",
            f"token weights need the teacher's log-probs of the student's labels; {why}")
    return teacher_tok


def _check_data_files(cfg: RunConfig) -> None:
    """Each text pattern matches readable files of a known kind: a typo is one line naming the key, not a
    traceback from every rank after the model loaded."""
    d = cfg.data
    for key, patterns, kwargs in (("data.text", d.text, {}), ("data.eval_text", d.eval_text, {"what": "held-out text"}),
                                  ("data.preference", d.preference, {"suffixes": (".jsonl",), "what": "preference data"})):
        try:
            expand_files(list(patterns), **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(f"config key {key!r}: {e}") from None


def _check_shards(cfg: RunConfig, inputs: Inputs, manifest: Manifest, vocab_size: int) -> Inputs:
    try:
        manifest.check_compatible(vocab_size=vocab_size, tokenizer_fingerprint=tokenizer_fingerprint(inputs.tokenizer))
    except ValueError as e:
        raise ConfigError(f"config key 'data.shards': {e}") from None
    shard_seq_len(cfg, manifest.seq_len)
    op = cfg.onpolicy
    if uses_onpolicy(cfg) and op.prompt_tokens + op.max_new_tokens > manifest.seq_len:
        raise ConfigError(f"config key 'onpolicy.prompt_tokens': {op.prompt_tokens} prompt + {op.max_new_tokens} "
                          f"new tokens exceed the shards' seq_len {manifest.seq_len}")
    if cfg.teacher.kind != TeacherKind.shards:
        return replace(inputs, manifest=manifest)  # the shards are the token source only; targets never decoded
    shards_teacher = _shards_teacher_tokenizer(cfg, manifest) if manifest.cross_tokenizer else None
    for where, loss in loss_configs(cfg):
        if loss.needs() and not math.isclose(manifest.temperature, loss.temperature):
            raise ConfigError(f"config key '{setter_of(cfg, where, 'loss.temperature')}': {loss.temperature} but "
                              f"the shards in {cfg.data.shards} hold targets at T={manifest.temperature}")
    return replace(inputs, shards_teacher_tokenizer=shards_teacher, cross_tokenizer_targets=manifest.cross_tokenizer,
                   manifest=manifest)


def _check_passes(cfg: RunConfig, manifest: Manifest, world_size: int) -> None:
    """data.epochs passes over the shards hold train.max_steps optimizer steps: the stream must not run dry."""
    t, epochs = cfg.train, cfg.data.epochs
    if epochs is None:
        return
    per_epoch = batches_per_epoch(manifest, world_size, t.micro_batch_size, max(1, cfg.data.num_workers))
    steps = epochs * per_epoch // t.grad_accum
    _refuse(steps < t.max_steps, "data.epochs",
            f"{epochs} pass(es) over the {manifest.total_samples} samples of {cfg.data.shards} give {per_epoch} "
            f"micro-batches a rank each, {steps} optimizer steps of train.micro_batch_size {t.micro_batch_size} x "
            f"train.grad_accum {t.grad_accum} x {world_size} ranks, fewer than train.max_steps {t.max_steps}: raise "
            "data.epochs, set it to null (endless), or lower train.max_steps")


def _shards_teacher_tokenizer(cfg: RunConfig, manifest: Manifest) -> Any:
    """Shards of a teacher with another tokenizer hold its ids: a divergence other than ULD maps them onto the
    student's vocabulary, which takes the teacher's tokenizer (manifest.teacher, checked by fingerprint)."""
    kinds = {loss.kind for _, loss in loss_configs(cfg) if loss.needs()}
    if kinds <= {KDKind.uld}:
        return None
    why = (f"the shards in {cfg.data.shards} hold the ids of a teacher with another tokenizer, and "
           f"loss.kind {'/'.join(sorted(k.value for k in kinds - {KDKind.uld}))} maps them onto the student's "
           f"vocabulary with the teacher's tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(manifest.teacher, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        raise ConfigError(f"config key 'loss.kind': {why}, which is not at manifest.teacher={manifest.teacher!r}; "
                          "use loss.kind=uld, or run where the teacher's directory is") from None
    _refuse(tokenizer_fingerprint(tok) != manifest.teacher_tokenizer_fingerprint, "loss.kind",
            f"{why}, and the tokenizer at {manifest.teacher} is not the one the shards were made with")
    return tok


def _refuse(bad: object, key: str, message: str) -> None:
    require(not bad, key, message, ConfigError)


def _check_relation_heads(key: str, loss: Any, config: Any) -> None:
    """The attention-relation term splits the q and the (GQA: narrower) k/v projections into loss.attn_relation_heads
    heads: both widths must divide (it failed at the first forward)."""
    if not loss.attn_relation_weight:
        return
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    for name, width in (("q", heads * head_dim), ("k/v", kv_heads * head_dim)):
        _refuse(width % loss.attn_relation_heads != 0, key,
                f"{loss.attn_relation_heads} does not divide the student's {name} width {width}")
