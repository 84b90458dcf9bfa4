"""ReLoRA resets under ZeRO-3: merge s·B·A into ΔW, re-initialise the adapters in the working copy and in the
optimizer's fp32 master copy, and reset or prune their Adam moments."""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from torch import Tensor, nn

from megadistil.bitnet import bitlinear_modules
from megadistil.config import ReLoRAConfig

MOMENTS = ("exp_avg", "exp_avg_sq")


def relora_reset(model: nn.Module, cfg: ReLoRAConfig, *, seed: int, reset_index: int) -> None:
    """Collective: every rank calls it. The new A comes from a generator seeded by (seed, reset, layer) on every
    rank, so ranks agree without a broadcast; rank 0's copy is the one ZeRO-3 re-partitions."""
    for layer_index, (_, layer) in enumerate(bitlinear_modules(model)):
        params = [p for p in (layer.delta, layer.delta_scale, layer.lora_A, layer.lora_B) if p is not None]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            layer.merge_lora_()
            generator = torch.Generator().manual_seed(seed * 1_000_003 + reset_index * 10_007 + layer_index)
            layer.reset_lora(generator)
            new_a, new_b = layer.lora_A.detach().float().clone(), torch.zeros_like(layer.lora_B, dtype=torch.float32)
        set_master(layer.lora_A, new_a)
        set_master(layer.lora_B, new_b)
        for param in (layer.lora_A, layer.lora_B):
            _reset_moments(param, cfg)


def _reset_moments(param: nn.Parameter, cfg: ReLoRAConfig) -> None:
    states = {key: safe_get_full_optimizer_state(param, key) for key in MOMENTS}
    if any(v is None for v in states.values()):
        return  # no optimizer step taken yet, or a plain (non-DeepSpeed) optimizer
    if cfg.optimizer_reset == "zero" or cfg.prune_ratio >= 1.0:
        keep = torch.zeros_like(states["exp_avg_sq"], dtype=torch.bool)
    else:
        # ReLoRA's magnitude pruning, with one mask for both moments: pruning them separately can keep a first
        # moment whose second moment was zeroed, and Adam's m / (sqrt(v) + eps) then explodes.
        v = states["exp_avg_sq"]
        k = int(v.numel() * cfg.prune_ratio)
        keep = v > v.flatten().kthvalue(k).values if k > 0 else torch.ones_like(v, dtype=torch.bool)
    for key, state in states.items():
        set_master(param, torch.where(keep, state, torch.zeros_like(state)), key)


def set_master(param: nn.Parameter, value: Tensor, optim_state_key: str | None = None) -> None:
    """The optimizer's fp32 copy of a parameter (or its `optim_state_key` moment) set to `value`, the whole tensor,
    the same on every rank. Under ZeRO-3 each rank writes its own partition: DeepSpeed's full setter (stage3
    set_full_hp_param) cuts the value into padded partitions without padding it, so where the world size does not
    divide the tensor the last rank's slice runs past its end (LoRA A 128x4096 on 12 ranks)."""
    if not hasattr(param, "ds_id"):
        if optim_state_key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, optim_state_key)
        return
    mine = partition_of(value, param.ds_tensor.numel(), dist.get_rank(group=param.ds_process_group))
    if optim_state_key is None:
        safe_set_local_fp32_param(param, mine)
    else:
        safe_set_local_optimizer_state(param, mine, optim_state_key)


def partition_of(value: Tensor, size: int, rank: int) -> Tensor:
    """Rank `rank`'s ZeRO-3 partition of `value`: `size` elements of it flattened, the last one zero-padded."""
    flat = value.flatten()
    part = flat[rank * size:(rank + 1) * size]
    return torch.cat([part, part.new_zeros(size - part.numel())]) if part.numel() < size else part
