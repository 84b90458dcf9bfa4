"""What the student's architecture allows, checked from its config before any weight loads (engine.inputs.check_inputs):
an attention implementation it can run, an output transform megadistil models, layers to_bitnet can convert as
configured and optim.param_groups that fit the converted student's parameters (on a meta-device skeleton: no
memory, ~0.1 s for a 70B), and SubLN only where the export can write it."""

from __future__ import annotations

import copy

import deepspeed
import torch
from transformers import AutoConfig, PretrainedConfig

from megadistil.bitnet.surgery import ConversionError, to_bitnet
from megadistil.config import ConfigError, Dtype, RunConfig
from megadistil.engine.model import assign_param_groups
from megadistil.export.ternary import subln_unsupported
from megadistil.models import attn_implementation, causal_lm_class, logit_transform
from megadistil.utils import torch_dtype


def check_architecture(config: PretrainedConfig, cfg: RunConfig) -> None:
    """Raise ConfigError naming the key the student's architecture cannot honour (attention: on this process's
    accelerator, as load_causal_lm resolves it)."""
    trust = cfg.model.trust_remote_code
    try:
        model_class = causal_lm_class(config, trust)
        logit_transform(config, model_class)
    except ValueError as e:
        raise ConfigError(f"config key 'model.student': {e}") from None
    if config.get_text_config() is not config:  # e.g. Gemma 3 4B+: AutoModelForCausalLM builds the whole VLM
        raise ConfigError(f"config key 'model.student': {type(config).__name__} holds a {type(config.get_text_config()).__name__} "
                          f"inside a multimodal model ({model_class.__name__}), whose vision tower would be quantized "
                          "and trained too; megadistil distils text-only causal LMs")
    _check_attention(config, cfg, "")
    with torch.device("meta"):  # eager: a skeleton runs nothing, and a config naming flash-attn must not need it here
        skeleton = model_class._from_config(copy.deepcopy(config), attn_implementation="eager")
    b = cfg.bitnet
    try:
        to_bitnet(skeleton, lora_rank=b.lora_rank, lora_alpha=b.lora_alpha, exclude=tuple(b.exclude), subln=b.subln,
                  delta=cfg.relora.reset_every > 0, delta_format=cfg.relora.delta_format, backward=b.backward)
    except ConversionError as e:
        raise ConfigError(f"config key 'bitnet.{e.key}': {e}") from None
    assign_param_groups(skeleton, cfg)  # optim.param_groups' refusals, on the parameter names the run will have
    if cfg.bitnet.subln and (reason := subln_unsupported(config.to_dict(), tuple(cfg.bitnet.exclude))):
        raise ConfigError(f"config key 'bitnet.subln': {reason}")


def check_companion(path: str, key: str, cfg: RunConfig) -> None:
    """A model the run loads beside the student (`key`: teacher.path, preference.reference) with the student's
    load settings: a class transformers loads as a causal LM, and model.attn_implementation as it resolves there."""
    trust = cfg.model.trust_remote_code
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    try:
        causal_lm_class(config, trust)
    except ValueError as e:
        raise ConfigError(f"config key {key!r}: {e}") from None
    _check_attention(config, cfg, f"for {key} {path}: ")


def _check_attention(config: PretrainedConfig, cfg: RunConfig, whose: str) -> None:
    """model.attn_implementation on this process's accelerator, as load_causal_lm resolves it for `config`."""
    try:
        dtype = None if cfg.model.dtype == Dtype.auto else torch_dtype(cfg.model.dtype)  # auto: bf16 on CUDA (Ampere+)
        attn_implementation(config, cfg.model.attn_implementation, deepspeed.get_accelerator().device_name(),
                            cfg.model.trust_remote_code, dtype)
    except ValueError as e:
        raise ConfigError(f"config key 'model.attn_implementation': {whose}{e}") from None
