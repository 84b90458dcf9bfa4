"""Preference-weighted distillation (PrefKD): per-token weights from a preference-tuned teacher and its reference.

Plain torch (no DeepSpeed). For each label token, with log-probabilities under the preference-tuned teacher and under
the reference model it was tuned from (its SFT starting point),

    r = log p_teacher(token) - log p_reference(token)

is how much the preference tuning raised (r > 0) or lowered (r < 0) that token. As in TIS-DPO (token-level importance
sampling for DPO), the tokens the preference tuning made more likely carry more of the preference; PrefKD distils what
the teacher prefers by weighting each token by a monotone transform of beta * r:

    exp      w = exp(beta r)
    sigmoid  w = 2 sigmoid(beta r)        (in (0, 2))
    linear   w = 1 + beta r

clamped to [min_weight, max_weight]. Every transform gives exactly 1 at r = 0 (and min_weight <= 1 <= max_weight), so
a token the tuning left alone, or a position whose label is IGNORE_INDEX (label_logprobs gives 0 under both models),
keeps weight 1. The weights multiply the per-token KD and CE terms of the loss (megadistil.distill.losses).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from megadistil.distill.losses import IGNORE_INDEX


class WeightTransform(enum.StrEnum):
    """preference.transform: the map from beta * r to a token's weight."""

    exp = "exp"
    sigmoid = "sigmoid"
    linear = "linear"


@dataclass
class PreferenceConfig:
    """Composed into the run config under the key `preference`."""

    reference: str = ""  # HF model dir of the reference model (the preference-tuned teacher's starting point); "" = off
    transform: WeightTransform = WeightTransform.exp  # w = exp(beta r) | 2 sigmoid(beta r) | 1 + beta r, r = log p_teacher - log p_reference of the label
    beta: float = 1.0  # scale of the log-ratio inside the transform
    min_weight: float = 0.0  # weights are clamped to [min_weight, max_weight]
    max_weight: float = 4.0  # upper clamp: no token outweighs this many ordinary ones

    def validate(self) -> None:
        """Raise ValueError naming the first bad key."""
        if not isinstance(self.reference, str):
            raise ValueError(  # noqa: TRY004 (a bad config value: ValueError like every other key)
                f"config key 'preference.reference': must be a path (string), got {self.reference!r}")
        try:
            WeightTransform(self.transform)
        except ValueError:
            raise ValueError(f"config key 'preference.transform': must be one of {[t.value for t in WeightTransform]}, "
                             f"got {self.transform!r}") from None
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"config key 'preference.beta': must be finite and > 0, got {self.beta}")
        if not (math.isfinite(self.min_weight) and 0 <= self.min_weight <= 1):
            raise ValueError(f"config key 'preference.min_weight': must be in [0, 1] (a weight of 1 at r = 0 must "
                             f"survive the clamp), got {self.min_weight}")
        if not (math.isfinite(self.max_weight) and self.max_weight >= 1):
            raise ValueError(f"config key 'preference.max_weight': must be finite and >= 1 (a weight of 1 at r = 0 "
                             f"must survive the clamp), got {self.max_weight}")


def token_weights(logp_teacher: Tensor, logp_reference: Tensor, cfg: PreferenceConfig) -> Tensor:
    """Per-token weights from the label tokens' log-probs under the preference-tuned teacher and its reference (same
    shape, any float dtype; bf16 is upcast): r = logp_teacher - logp_reference, w = transform(beta r) clamped to
    [cfg.min_weight, cfg.max_weight] (module docstring). float32, the inputs' shape; exactly 1 where r == 0."""
    if logp_teacher.shape != logp_reference.shape:
        raise ValueError(f"teacher log-probs have shape {tuple(logp_teacher.shape)}, reference "
                         f"{tuple(logp_reference.shape)}: they must match")
    x = cfg.beta * (logp_teacher.float() - logp_reference.float())
    transform = WeightTransform(cfg.transform)
    if transform is WeightTransform.exp:
        w = torch.exp(x)
    elif transform is WeightTransform.sigmoid:
        w = 2 * torch.sigmoid(x)
    else:
        w = 1 + x
    return w.clamp(cfg.min_weight, cfg.max_weight)


def label_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] at every position, float32, [...] for logits [..., V] and labels [...]; 0 where
    labels == IGNORE_INDEX. Materialises float32 logits: a reference for tests and for small models."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits have shape {tuple(logits.shape)}, labels {tuple(labels.shape)}: "
                         f"logits must be labels' shape + [vocab]")
    ignore = labels == IGNORE_INDEX
    logits = logits.float()
    picked = logits.gather(-1, labels.masked_fill(ignore, 0).unsqueeze(-1)).squeeze(-1)
    return (picked - logits.logsumexp(-1)).masked_fill(ignore, 0.0)
