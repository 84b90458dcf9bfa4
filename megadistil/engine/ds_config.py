"""The DeepSpeed config (ds_configs/*.json) a run starts its engine with: its "auto" values filled from the run
config, and any value that contradicts the run config refused, naming both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megadistil.config import ConfigError, RunConfig


def reconcile_ds_config(cfg: RunConfig, ds_config: dict[str, Any], *, world_size: int, bf16: bool) -> dict[str, Any]:
    """Fill the ds_config's "auto" values from the run config; a value that contradicts it is an error."""
    ds = json.loads(json.dumps(ds_config))
    t = cfg.train
    expected = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    fixed = ds.get("train_batch_size", "auto")
    if fixed != "auto" and fixed != expected["train_batch_size"]:
        per_step = t.micro_batch_size * world_size
        hint = (f"set train.grad_accum={fixed // per_step}" if fixed % per_step == 0 else
                f"it is not divisible by train.micro_batch_size {t.micro_batch_size} x {world_size} ranks "
                f"(nodes x GPUs) = {per_step}")
        raise ConfigError(f"ds_config train_batch_size={fixed} != train.micro_batch_size {t.micro_batch_size} x "
                          f"train.grad_accum {t.grad_accum} x {world_size} ranks = {expected['train_batch_size']}: "
                          f"{hint}, or set it to \"auto\"")
    for key, want in expected.items():
        have = ds.get(key, "auto")
        if have != "auto" and have != want:
            raise ConfigError(f"ds_config {key}={have} contradicts the run config ({want}); set it to \"auto\"")
        ds[key] = want
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"ds_config has an {section!r} section: megadistil builds it from optim.*; remove it")
    for key, want in (("bf16", bf16), ("fp16", False)):
        have = ds.get(key, {}).get("enabled", "auto")
        if have != "auto" and bool(have) != want:
            raise ConfigError(f"ds_config {key}.enabled={have} contradicts model.dtype={cfg.model.dtype} "
                              f"(resolved to {'bf16' if bf16 else 'fp32'})")
        ds.setdefault(key, {})["enabled"] = want
    ds.setdefault("zero_optimization", {}).setdefault("stage", 3)
    return ds


def load_ds_config(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"ds_config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config {path} is not valid JSON: {e}") from None
