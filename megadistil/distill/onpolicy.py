"""On-policy distillation: the student continues prompts cut from the training data, the teacher scores the student's
own tokens, and the loss covers only the generated tokens (GKD; Thinking Machines' on-policy distillation).

Plain torch (no DeepSpeed). Which micro-batches are on-policy, and every sequence's sampling generator, are pure
functions of (the micro-batch's position in the run, rank, train.seed): a resumed run samples what an uninterrupted
one did with no RNG state to save, and every rank takes the same micro-batches on-policy (under ZeRO-3 all ranks must
generate together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from megadistil.distill.losses import IGNORE_INDEX, KDKind
from megadistil.sampling import Generation, SamplingConfig, check_sampling_settings


@dataclass
class OnPolicyConfig:
    """Composed into the run config under the key `onpolicy`."""

    fraction: float = 0.0  # share of micro-batches whose sequences the student generates (0 = off); a stage may change it
    prompt_tokens: int = 32  # a sequence's first tokens are its prompt; the student continues it
    max_new_tokens: int = 64  # generated tokens per sequence (prompt + these must fit data.seq_len)
    temperatures: list[float] = field(default_factory=lambda: [1.0])  # per-position schedule (megadistil.sampling); 0 = greedy
    top_k: int = 0  # sampling top-k (0 = off)
    top_p: float = 1.0  # sampling top-p (nucleus)
    kind: KDKind = KDKind.reverse_kl  # the divergence on the generated tokens (loss.kind stays for the others)
    # DeepSpeed's unwrap_model_for_generation (TRL's ds3_gather_for_generation); the memory planner counts the whole
    # model on every rank. false: every layer gathered at every new token, the ranks in lockstep.
    gather_weights: bool = True  # ZeRO-3: gather the whole student once per generation, not each layer per new token

    def validate(self) -> None:
        """Raise ValueError naming the first bad key."""
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"config key 'onpolicy.fraction': must be in [0, 1], got {self.fraction}")
        if self.prompt_tokens < 1:
            raise ValueError(f"config key 'onpolicy.prompt_tokens': must be >= 1, got {self.prompt_tokens}")
        check_sampling_settings(self, "onpolicy.")

    def sampling(self, seed: int) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperatures=tuple(self.temperatures),
                              top_k=self.top_k, top_p=self.top_p, seed=seed)


def is_onpolicy(micro_index: int, fraction: float) -> bool:
    """Spreads `fraction` of the micro-batches evenly: micro-batch k is on-policy when floor((k + 1) f) > floor(k f)
    (0.5: every second one, 0.25: every fourth, 1: all)."""
    return math.floor((micro_index + 1) * fraction) > math.floor(micro_index * fraction)


def onpolicy_batch(prompts: Tensor, gen: Generation) -> dict[str, Tensor]:
    """The trainer's batch for prompts [B, P] and their continuations: input_ids = prompt + generated tokens (cut to
    the longest continuation), labels aligned to logit positions (labels[:, t] = input_ids[:, t + 1]) on generated
    tokens up to and including each sequence's stop, IGNORE_INDEX on the prompt and after a stop."""
    width = int(gen.lengths.max())
    ids = torch.cat([prompts, gen.tokens[:, :width]], dim=1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    generated = torch.arange(ids.shape[1], device=ids.device) - (prompts.shape[1] - 1)  # label t reads token t + 1
    labels[(generated < 0) | (generated >= gen.lengths[:, None])] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def sequence_indices(micro_index: int, rank: int, world_size: int, batch_size: int) -> list[int]:
    """Global indices of this rank's sequences in micro-batch `micro_index` (their sampling generators' seeds)."""
    first = (micro_index * world_size + rank) * batch_size
    return list(range(first, first + batch_size))
