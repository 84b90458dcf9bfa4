"""Build the student (sharded from the start under ZeRO-3) and its optimizer parameter groups."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn
from torch.optim import Optimizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

from megadistil.bitnet import bitlinear_modules, compile_quantizers, to_bitnet
from megadistil.config import ConfigError, OptimConfig, RunConfig, TeacherKind
from megadistil.data import tokenizer_fingerprint
from megadistil.engine.device import Placement
from megadistil.models import attn_implementation, decoder_layers
from megadistil.utils import full_shape

# Trainable unless a param group says otherwise: the adapter and SubLN. Everything else is the teacher's.
DEFAULT_TRAINABLE = re.compile(r"(lora_A|lora_B|sub_norm\.weight)$")


def check_model_dir(path: str, key: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"config key {key!r}: {path} is not a model directory (no config.json)")


def check_same_tokenizer(path: str, tokenizer: Any, key: str, cfg: RunConfig) -> None:
    """A model that must score the student's own token ids: the same vocabulary size and, where its dir holds a
    tokenizer, the same tokenizer."""
    check_model_dir(path, key)
    trust = cfg.model.trust_remote_code
    vocab = AutoConfig.from_pretrained(path, trust_remote_code=trust).vocab_size
    if vocab < len(tokenizer):
        raise ConfigError(f"config key {key!r}: {path} has a vocabulary of {vocab}, the student's tokenizer "
                          f"{len(tokenizer)}: it must score the student's token ids")
    if any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        other = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        if tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer):
            raise ConfigError(f"config key {key!r}: {path} has another tokenizer than the student: it must score the "
                              "student's token ids")


def load_causal_lm(path: str, cfg: RunConfig, ds_config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """Load an HF causal LM; under ZeRO-3 transformers loads it straight into shards (zero.Init)."""
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    hf_ds = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841 - must stay alive during from_pretrained
    trust = cfg.model.trust_remote_code
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust,
        attn_implementation=attn_implementation(config, cfg.model.attn_implementation,
                                                deepspeed.get_accelerator().device_name(), trust, dtype),
    )


def build_student(cfg: RunConfig, ds_config: dict[str, Any], placement: Placement) -> nn.Module:
    check_model_dir(cfg.model.student, "model.student")
    model = load_causal_lm(cfg.model.student, cfg, ds_config, placement.dtype)
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    b = cfg.bitnet
    # New parameters (ΔW, LoRA, SubLN) are born partitioned too; zero.Init broadcasts rank 0's init.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3):
        to_bitnet(model, lora_rank=b.lora_rank, lora_alpha=b.lora_alpha, exclude=tuple(b.exclude), subln=b.subln,
                  delta=cfg.relora.reset_every > 0, delta_format=cfg.relora.delta_format, backward=b.backward,
                  kernel=placement.kernel)
    compile_quantizers(placement.quantizers_compiled)
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model)
        # Non-reentrant checkpointing saves nothing in the first forward, so keeping a layer's int8 weight codes
        # from its recompute to its backward costs one layer at a time.
        for _, layer in bitlinear_modules(model):
            layer.keep_weight_codes = True
    model.config.use_cache = False
    if zero3 and cfg.model.activation_checkpointing:
        # ZeRO-3 gathers a decoder layer whole: once per forward for both the teacher's and the student's pass
        # (engine.teachers.LayerwiseTeacher), once for its recompute and backward together. Without checkpointing,
        # DeepSpeed 0.19 does not gather leaf layers back for their backward (a size-0 partition reaches it from the
        # second step on), so there each projection is gathered on its own.
        deepspeed.utils.set_z3_leaf_modules(model, list({type(layer) for layer in decoder_layers(model)}))
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing of every decoder layer, through transformers' own switch (renamed in 5.x; the old
    name warns until it goes in v6)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def assign_param_groups(model: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """Set requires_grad from the groups (first matching pattern wins; lr_mult 0 freezes) and return the
    optimizer's param groups, each with its `lr_mult` and `wd_mult`: weight decay acts on matrices only, never on a
    norm's gains (SubLN) or a bias, which it would pull towards 0."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    patterns = [(re.compile(g.pattern), g.lr_mult) for g in cfg.optim.param_groups]
    shared_teacher = cfg.teacher.kind == TeacherKind.shared
    won = [False] * len(patterns)
    # A BitLinear's W is the teacher's own weight (one weight, two models) and its ΔW / row scale change only by
    # ReLoRA merges: BitLinearFunction gives them no gradient, so a group that trains them would train them only in
    # the λ warmup's fake-quant forward, then silently not. Refused with every teacher kind.
    frozen = {f"{m}.{p}" for m, _ in bitlinear_modules(model) for p in ("weight", "delta", "delta_scale")}
    for name, param in model.named_parameters():
        first = next((i for i, (p, _) in enumerate(patterns) if p.search(name)), None)
        if first is not None:
            won[first] = True
        mult = patterns[first][1] if first is not None else 1.0 if DEFAULT_TRAINABLE.search(name) else 0.0
        if mult > 0 and name in frozen:
            raise ConfigError(
                f"config key 'optim.param_groups.{first}.pattern': {cfg.optim.param_groups[first].pattern!r} would "
                f"train {name}, a BitLinear's frozen {name.rpartition('.')[2]} (W is the teacher's weight; ΔW changes "
                "only by ReLoRA merges): BitLinear trains lora_A / lora_B / sub_norm / bias only; give it lr_mult 0 "
                "or narrow the pattern"
            )
        if mult > 0 and shared_teacher and not DEFAULT_TRAINABLE.search(name):
            raise ConfigError(
                f"config key 'optim.param_groups': {name} would train, but the shared teacher uses it; "
                "train only lora_A / lora_B / sub_norm with teacher.kind=shared"
            )
        param.requires_grad_(mult > 0)
        if mult > 0:
            groups.setdefault((mult, len(full_shape(param)) >= 2), []).append(param)
    for i, group in enumerate(cfg.optim.param_groups):
        if not won[i]:
            raise ConfigError(f"config key 'optim.param_groups.{i}.pattern': {group.pattern!r} matches no parameter "
                              "(or only ones an earlier group takes: the first matching pattern wins)")
    if not groups:
        raise ConfigError("config key 'optim.param_groups': no parameter is trainable")
    return [{"params": ps, "lr_mult": mult, "wd_mult": float(matrix), "weight_decay": cfg.optim.weight_decay * matrix}
            for (mult, matrix), ps in groups.items()]


def build_optimizer(groups: list[dict[str, Any]], optim: OptimConfig, ds_config: dict[str, Any]) -> Optimizer:
    """AdamW over `groups`; DeepSpeed's CPU Adam (the same AdamW, a vectorised host kernel JIT-built at the first
    start) where ZeRO offloads the optimizer to the CPU or NVMe: DeepSpeed refuses any other optimizer there."""
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps}
    if device in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
