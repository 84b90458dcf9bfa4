"""Distillation: losses (and, later, teachers)."""

from megadistil.distill.losses import (
    IGNORE_INDEX,
    LogitTransform,
    LossConfig,
    SparseTarget,
    attention_relation_loss,
    chunked_lm_head_loss,
    hidden_state_loss,
    resolve_layers,
)

__all__ = [
    "IGNORE_INDEX",
    "LogitTransform",
    "LossConfig",
    "SparseTarget",
    "attention_relation_loss",
    "chunked_lm_head_loss",
    "hidden_state_loss",
    "resolve_layers",
]
