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
    _reconcile_precision(cfg, ds, bf16)
    _refuse_activation_checkpointing(ds)
    _refuse_deferred_checkpoint_writes(ds)
    _refuse_swapped_deltas(cfg, ds)
    _require_zero3(ds)
    return ds


def _refuse_swapped_deltas(cfg: RunConfig, ds: dict[str, Any]) -> None:
    """ReLoRA merges into ΔW's partitions, and checkpoints save and load them, in place (param.ds_tensor): with
    parameters offloaded to NVMe, a partition not in use is swapped out and ds_tensor is a placeholder."""
    zero = ds.get("zero_optimization") or {}
    device = (zero.get("offload_param") or {}).get("device", "none") if isinstance(zero, dict) else "none"
    if device == "nvme" and cfg.relora.reset_every > 0:
        raise ConfigError("ds_config zero_optimization.offload_param.device=nvme with relora.reset_every > 0: ReLoRA "
                          "merges into ΔW's partitions and checkpoints them in memory, where NVMe offload swaps them "
                          'out; use "cpu" offload, or relora.reset_every=0')


def _refuse_deferred_checkpoint_writes(ds: dict[str, Any]) -> None:
    """engine.checkpoint renames a tag into place and writes `latest` once DeepSpeed's save_checkpoint returns: a
    writer that commits the files later (decoupled, DataStates) or never (MOCK) would leave `latest` naming a tag
    without its ZeRO files (measured: the decoupled writer's tag held none when `latest` named it)."""
    checkpoint = ds.get("checkpoint") or {}
    writer = checkpoint.get("writer") or {} if isinstance(checkpoint, dict) else {}
    if not isinstance(writer, dict):
        return  # DeepSpeed's own validation names it
    if writer.get("decoupled"):
        raise ConfigError("ds_config checkpoint.writer.decoupled=true: its files are committed after save returns, "
                          "after megadistil has written `latest` (a kill then leaves a tag without them); remove it")
    if str(writer.get("type", "")).upper() == "MOCK":
        raise ConfigError('ds_config checkpoint.writer.type="MOCK" writes no files: remove it')
    if ds.get("datastates_ckpt") not in (None, False):
        raise ConfigError("ds_config datastates_ckpt: DataStates writes checkpoints asynchronously, after megadistil "
                          "has written `latest`; remove it")


def _reconcile_precision(cfg: RunConfig, ds: dict[str, Any], bf16: bool) -> None:
    """bf16.enabled from model.dtype, fp16 off. DeepSpeed reads "bf16" before its old alias "bfloat16", so a
    "bfloat16" section would be silently overridden by the "bf16" written here: refused."""
    if "bfloat16" in ds:
        raise ConfigError('ds_config "bfloat16": DeepSpeed\'s old alias of "bf16", which megadistil fills from '
                          'model.dtype and DeepSpeed reads first (so this section would be ignored); rename it to "bf16"')
    for key in ("amp", "torch_autocast"):  # mixed precision is model.dtype's: bf16 weights, float32 quantizer math
        if isinstance(ds.get(key), dict) and ds[key].get("enabled"):
            raise ConfigError(f'ds_config "{key}": megadistil sets the precision from model.dtype (the "bf16" '
                              f"section); remove {key}")
    for key, want in (("bf16", bf16), ("fp16", False)):
        section = ds.setdefault(key, {})
        if not isinstance(section, dict):
            raise ConfigError(f'ds_config {key}={json.dumps(section)}: must be a section, e.g. "{key}": '
                              '{"enabled": "auto"}')
        have = section.get("enabled", "auto")
        if have != "auto" and bool(have) != want:
            raise ConfigError(f"ds_config {key}.enabled={have} contradicts model.dtype={cfg.model.dtype} "
                              f"(resolved to {'bf16' if bf16 else 'fp32'})")
        section["enabled"] = want


# DeepSpeed's activation_checkpointing switches: its engine parses them, but only deepspeed.checkpointing.configure
# applies them, which megadistil never calls (model.activation_checkpointing uses torch's non-reentrant checkpoint)
ACTIVATION_CHECKPOINTING_FLAGS = ("partition_activations", "contiguous_memory_optimization", "cpu_checkpointing",
                                  "synchronize_checkpoint_boundary", "profile")


def _refuse_activation_checkpointing(ds: dict[str, Any]) -> None:
    """A switched-on DeepSpeed activation_checkpointing flag would do nothing, silently: refused. A section whose
    flags are all off or absent is accepted, as DeepSpeed's own default is."""
    section = ds.get("activation_checkpointing")
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f"ds_config activation_checkpointing={json.dumps(section)}: must be a section; "
                          "megadistil checkpoints activations from model.activation_checkpointing, so remove it")
    on = [flag for flag in ACTIVATION_CHECKPOINTING_FLAGS if section.get(flag)]
    if on:
        raise ConfigError(f"ds_config activation_checkpointing.{on[0]}={json.dumps(section[on[0]])}: DeepSpeed's "
                          "engine does not apply this section here; megadistil checkpoints activations from "
                          "model.activation_checkpointing (the run config; true by default): remove the section")


def _require_zero3(ds: dict[str, Any]) -> None:
    """The trainer, the teachers and the memory estimator assume ZeRO-3 (partitioned parameters gathered per
    module); another stage would run on paths nothing tests, or be estimated wrong."""
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f'ds_config zero_optimization={json.dumps(zero)}: must be a section, e.g. '
                          '"zero_optimization": {"stage": 3}')
    stage = zero.setdefault("stage", 3)
    if stage != 3 or isinstance(stage, bool):
        raise ConfigError(f"ds_config zero_optimization.stage={json.dumps(stage)}: megadistil runs on ZeRO-3 only; "
                          "set it to 3 (or leave it out)")


def load_ds_config(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"ds_config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config {path} is not valid JSON: {e}") from None
