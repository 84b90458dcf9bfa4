"""The learning rate: linear warmup, cosine decay to min_lr_ratio, and ReLoRA's jagged restarts."""

from __future__ import annotations

import math

from megadistil.config import OptimConfig, ReLoRAConfig


def lr_at(step: int, optim: OptimConfig, relora: ReLoRAConfig, max_steps: int) -> float:
    """LR of optimizer step `step` (1-based). After every ReLoRA reset the LR re-warms over restart_warmup_steps,
    so the fresh adapters (and their reset moments) are not hit with the full rate (ReLoRA's jagged schedule)."""
    if step <= optim.warmup_steps:
        return optim.lr * step / max(optim.warmup_steps, 1)
    progress = (step - optim.warmup_steps) / max(max_steps - optim.warmup_steps, 1)
    floor = optim.min_lr_ratio
    lr = optim.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    if relora.reset_every and step > relora.reset_every:
        since_reset = (step - 1) % relora.reset_every + 1
        lr *= min(1.0, since_reset / max(relora.restart_warmup_steps, 1))
    return lr


def is_reset_step(step: int, relora: ReLoRAConfig) -> bool:
    """A reset happens right before optimizer step `step`, every reset_every steps."""
    return bool(relora.reset_every) and step > 1 and (step - 1) % relora.reset_every == 0
