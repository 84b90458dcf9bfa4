"""Greedy and sampled (seeded) continuations of a prompts file, and the models side by side in one markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from megadistil.data.text import text_lines
from megadistil.eval.models import EvalError
from megadistil.sampling import SamplingConfig, chat_prompt_ids, decode_text, eos_token_ids, sample


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; `\\n` inside a line stands for a newline (code prompts span lines)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--generate {path}: no such prompts file")
    prompts = [line.replace("\\n", "\n") for _, line in text_lines(path)]
    if not prompts:
        raise EvalError(f"--generate {path}: holds no prompts (one per line)")
    return prompts


def continuations(model: nn.Module, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 32, seed: int = 0,
                  temperature: float = 0.8, top_p: float = 0.95, chat_template: bool = False) -> list[dict[str, str]]:
    """Greedy and seeded sampled continuations through megadistil.sampling. Each prompt alone (no padding, so
    batching cannot change a result), with the generator of its index, so a model's sampled text does not depend on
    which prompts came before it. A prompt starts with the tokenizer's special tokens (Llama models expect their
    BOS first); generation runs to max_new_tokens or any of the model's EOS ids (its generation config's list,
    as Llama 3.1's <|eot_id|>, else the tokenizer's EOS). `chat_template`: each prompt a user turn in the tokenizer's
    chat template (an instruct model's), the continuation the assistant's answer."""
    eos = eos_token_ids(getattr(model, "generation_config", None), tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    greedy_cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperatures=(0.0,))
    sampled_cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperatures=(temperature,), top_p=top_p, seed=seed)
    rows = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor(chat_prompt_ids(tokenizer, prompt, getattr(tokenizer, "name_or_path", "the model"))
                           if chat_template else tokenizer(prompt, add_special_tokens=True)["input_ids"])
        texts = {}
        for kind, cfg in (("greedy", greedy_cfg), ("sampled", sampled_cfg)):
            out = sample(model, [ids], cfg, eos_token_id=eos, pad_token_id=pad, indices=[i])
            texts[kind] = decode_text(tokenizer, out.tokens[0, :out.lengths[0]])
        rows.append({"prompt": prompt, **texts})
    return rows


def _cell(text: str) -> str:
    return "`" + text.replace("`", "'").replace("|", "\\|").replace("\n", "⏎") + "`" if text else "(empty)"


def generations_markdown(by_model: dict[str, list[dict[str, str]]], *, seed: int, temperature: float) -> str:
    """One table: for each prompt, a row per model with its greedy and its sampled continuation (⏎ = newline)."""
    names = list(by_model)
    lines = [f"| prompt | model | greedy | sampled (T={temperature}, seed {seed}) |", "|---|---|---|---|"]
    for i, row in enumerate(by_model[names[0]]):
        for j, name in enumerate(names):
            g = by_model[name][i]
            lines.append(f"| {_cell(row['prompt']) if j == 0 else ''} | {name} | {_cell(g['greedy'])} | "
                         f"{_cell(g['sampled'])} |")
    return "\n".join(lines) + "\n"
