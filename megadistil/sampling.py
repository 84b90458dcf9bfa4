"""Batched sampling with a KV cache from any causal LM megadistil loads: the shared teacher (in teacher_mode), a
separate HF teacher, the student; plain torch + transformers, no DeepSpeed.

Reproducible by construction: every sequence draws from its own generator, seeded from (seed, the sequence's global
index), so its tokens do not depend on the batch it shares, on padding, or on how many ranks split the prompts. Under
ZeRO-3 every rank must run the same number of forwards (each one gathers the weights together): `lockstep` all-reduces
"any sequence still running" after every token, and a rank whose sequences have all stopped keeps stepping on padding.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megadistil.bitnet import frozen_weight_codes


class SamplingError(ValueError):
    """A sampling setting is out of range; the message names the key."""


@dataclass(frozen=True)
class SamplingConfig:
    """temperatures: position i of the continuation samples at temperatures[min(i, len - 1)] ([1.5, 0.7]: a hot first
    token, then 0.7); 0 is greedy. top_k = 0 and top_p = 1 leave the distribution whole."""

    max_new_tokens: int = 128
    temperatures: Sequence[float] = field(default=(1.0,))
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        check_sampling_settings(self, "sampling.")

    def temperature_at(self, position: int) -> float:
        return float(self.temperatures[min(position, len(self.temperatures) - 1)])


def check_sampling_settings(s: object, prefix: str, name: Callable[[str], str] | None = None) -> None:
    """Every bound of the settings `s` has (max_new_tokens, temperatures, top_k, top_p), naming the key under
    `prefix` ('sampling.' here; a config section that embeds them passes its own), or as `name(field)` says where
    the values came from elsewhere (a tool's command-line flags)."""
    key = name or (lambda f: f"config key '{prefix}{f}'")
    if s.max_new_tokens < 1:
        raise SamplingError(f"{key('max_new_tokens')}: must be >= 1, got {s.max_new_tokens}")
    if not s.temperatures or any(t < 0 for t in s.temperatures):
        raise SamplingError(f"{key('temperatures')}: one or more temperatures >= 0 (0 = greedy), "
                            f"got {list(s.temperatures)}")
    if s.top_k < 0:
        raise SamplingError(f"{key('top_k')}: must be >= 0 (0 = off), got {s.top_k}")
    if not 0 < s.top_p <= 1:
        raise SamplingError(f"{key('top_p')}: must be in (0, 1], got {s.top_p}")


def eos_token_ids(generation_config: Any, tokenizer: Any) -> int | list[int] | None:
    """The ids that end a continuation: the model's generation config's (Llama 3.1 lists several, e.g. <|eot_id|> as
    well as <|end_of_text|>), else the tokenizer's EOS."""
    eos = getattr(generation_config, "eos_token_id", None)
    return eos if eos is not None else tokenizer.eos_token_id


def chat_prompt_ids(tokenizer: Any, text: str, owner: str) -> list[int]:
    """`text` as a user turn and the assistant's header in the tokenizer's chat template, tokenized as the template
    spells it (its control tokens, BOS included, as such). `owner` names the model in the error of a tokenizer with no
    template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--chat-template: the tokenizer of {owner} has no chat template (a base model's; use an "
                         "instruct model's tokenizer, or leave --chat-template out)")
    turn = [{"role": "user", "content": text}]
    chat = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return tokenizer(chat, add_special_tokens=False, split_special_tokens=False)["input_ids"]


def decode_text(tokenizer: Any, ids: Sequence[int] | Tensor, *, special_tokens: bool = False) -> str:
    """The text of generated ids, special tokens left out (`special_tokens`: spelled out, as a chat template's are).
    No clean-up of tokenization spaces: a tokenizer saved with clean_up_tokenization_spaces=True (the default of many)
    would turn " ," into "," and " 's" into "'s", so the text would no longer be what the ids spell."""
    return tokenizer.decode(ids, skip_special_tokens=not special_tokens, clean_up_tokenization_spaces=False)


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """-inf outside the top_k tokens and outside the smallest set whose probability reaches top_p (the token that
    crosses top_p is kept), as transformers' TopK/TopP warpers."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass of the tokens above
        drop_sorted = before >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return logits


@dataclass
class Generation:
    """tokens [batch, max_new_tokens] (pad after a stop), lengths [batch] (tokens up to and including EOS)."""

    tokens: Tensor
    lengths: Tensor


@torch.no_grad()
def sample(model: nn.Module, prompts: list[Tensor], cfg: SamplingConfig, *, eos_token_id: int | Sequence[int] | None,
           pad_token_id: int, indices: Sequence[int] | None = None,
           lockstep: Callable[[bool], bool] | None = None, freeze_weight_codes: bool = True) -> Generation:
    """Continue each prompt (1-D token ids; lengths may differ: left-padded here). `indices` are the prompts' global
    indices (their generators' seeds; default 0, 1, ...); any id in `eos_token_id` stops a sequence;
    `lockstep(any_running) -> any rank running` joins the ranks' loops. A BitNet student quantizes its weights once
    for the whole generation (frozen_weight_codes) unless `freeze_weight_codes` is off: where ZeRO-3 gathers it layer
    by layer, every layer's codes would stay."""
    with frozen_weight_codes(model) if freeze_weight_codes else contextlib.nullcontext():
        return _sample(model, prompts, cfg, eos_token_id, pad_token_id, indices, lockstep)


def _sample(model: nn.Module, prompts: list[Tensor], cfg: SamplingConfig, eos_token_id: int | Sequence[int] | None,
            pad_token_id: int, indices: Sequence[int] | None, lockstep: Callable[[bool], bool] | None) -> Generation:
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_token_id, device)
    batch = len(prompts)
    indices = range(batch) if indices is None else indices
    if len(indices) != batch:
        raise SamplingError(f"sample(): {len(indices)} indices for {batch} prompts")
    generators = [torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + i) for i in indices]
    stop_ids = None if eos_token_id is None or not cfg.stop_at_eos else \
        torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    tokens = torch.full((batch, cfg.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    running = torch.ones(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), cfg.max_new_tokens, dtype=torch.long, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = _cache_name(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    for step in range(cfg.max_new_tokens):
        logits = out.logits[:, -1].float()
        next_ids = _draw(logits, cfg.temperature_at(step), cfg, generators)
        next_ids = torch.where(running, next_ids, torch.full_like(next_ids, pad_token_id))
        tokens[:, step] = next_ids
        if stop_ids is not None:
            stopped = running & torch.isin(next_ids, stop_ids)
            lengths = torch.where(stopped, torch.full_like(lengths, step + 1), lengths)
            running &= ~stopped
        mine = bool(running.any()) and step < cfg.max_new_tokens - 1
        if not (lockstep(mine) if lockstep is not None else mine):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=-1)  # a stopped row steps on padding, unread
        positions = positions[:, -1:] + 1
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache: out[cache]})
    return Generation(tokens=tokens, lengths=lengths)


def _cache_name(model: nn.Module) -> str:
    """The KV cache's name in forward's arguments and outputs: transformers 5.2x renamed past_key_values to cache."""
    forward = getattr(model, "module", model).forward  # a DeepSpeed engine's forward takes **kwargs
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _draw(logits: Tensor, temperature: float, cfg: SamplingConfig, generators: list[torch.Generator]) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(filter_logits(logits / temperature, cfg.top_k, cfg.top_p), dim=-1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)])


def _left_pad(prompts: list[Tensor], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    if not prompts or any(p.ndim != 1 or p.numel() == 0 for p in prompts):
        raise SamplingError("sample() takes a non-empty list of non-empty 1-D token-id tensors")
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.numel():] = p.to(device)
        mask[row, width - p.numel():] = 1
    return ids, mask


def lockstep_any(device: torch.device, group=None) -> Callable[[bool], bool]:
    """`lockstep` for torch.distributed: True while any rank still has a running sequence. `device` is where the
    process group reduces (the engine's device: CUDA under NCCL)."""
    import torch.distributed as dist

    def any_running(mine: bool) -> bool:
        flag = torch.tensor([float(mine)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    return any_running
