"""Greedy and sampled (seeded) continuations of a prompts file, and the models side by side in one markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from megadistil.eval.models import EvalError


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; `\\n` inside a line stands for a newline (code prompts span lines)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--generate {path}: no such prompts file")
    prompts = [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise EvalError(f"--generate {path}: holds no prompts (one per line)")
    return prompts


@torch.no_grad()
def continuations(model: nn.Module, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 32, seed: int = 0,
                  temperature: float = 0.8, top_p: float = 0.95) -> list[dict[str, str]]:
    """Each prompt alone (no padding, so batching cannot change a result); sampling is seeded per prompt, so a
    model's sampled text does not depend on which prompts came before it."""
    rows = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        common = {"attention_mask": torch.ones_like(ids), "max_new_tokens": max_new_tokens, "pad_token_id": pad}
        greedy = model.generate(ids, do_sample=False, **common)
        torch.manual_seed(seed + i)
        sampled = model.generate(ids, do_sample=True, temperature=temperature, top_p=top_p, top_k=0, **common)
        rows.append({"prompt": prompt, "greedy": _new_text(tokenizer, ids, greedy),
                     "sampled": _new_text(tokenizer, ids, sampled)})
    return rows


def _new_text(tokenizer: Any, prompt_ids: torch.Tensor, out: torch.Tensor) -> str:
    return tokenizer.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True)


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
