"""The learning rate: linear warmup, cosine decay to min_lr_ratio, ReLoRA's jagged restarts, and a stage's re-warm."""

from __future__ import annotations

import math
from dataclasses import replace

from megadistil.config import OptimConfig, ReLoRAConfig, RunConfig


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


def run_lr_at(step: int, cfg: RunConfig, active: RunConfig) -> float:
    """LR of step `step` under the config in force (`active`: stage_config(cfg, step)). The cosine runs on the run's
    own warmup_steps (a stage in force from step 1, start_step 0 or 1, sets it); a later stage that sets
    optim.warmup_steps re-warms from its start_step over that many steps (a multiplier, as ReLoRA's restarts), so a
    stage's new lr or loss is not hit at full rate."""
    sets_warmup = [s for s in cfg.stages if "optim.warmup_steps" in s.overrides]
    run_warmup = next((s.overrides["optim.warmup_steps"] for s in reversed(sets_warmup) if s.start_step <= 1),
                      cfg.optim.warmup_steps)
    lr = lr_at(step, replace(active.optim, warmup_steps=run_warmup), cfg.relora, cfg.train.max_steps)
    rewarms = [s for s in sets_warmup if 1 < s.start_step <= step]
    if rewarms:
        since = step - rewarms[-1].start_step + 1
        lr *= min(1.0, since / max(active.optim.warmup_steps, 1))
    return lr


def is_reset_step(step: int, relora: ReLoRAConfig) -> bool:
    """A reset happens right before optimizer step `step`, every reset_every steps."""
    return bool(relora.reset_every) and step > 1 and (step - 1) % relora.reset_every == 0
