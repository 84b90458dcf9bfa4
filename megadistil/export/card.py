"""The model card (README.md) of an exported checkpoint: what it is, how to load it, what the run measured."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def run_metrics(run_dir: Path | None, step: int) -> dict[str, Any]:
    """Held-out perplexities (teacher: the first record; student: the last at or before `step`) and tokens trained
    up to `step`, from metrics.jsonl. Missing figures stay None."""
    found: dict[str, Any] = {"eval_ppl_teacher": None, "eval_ppl_student": None, "eval_step": None, "tokens": None}
    path = run_dir / "metrics.jsonl" if run_dir else None
    if path is None or not path.is_file():
        return found
    tokens = 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("step", 0) > step:
            continue
        tokens += int(record.get("tokens", 0))
        if found["eval_ppl_teacher"] is None and record.get("eval_ppl_teacher") is not None:
            found["eval_ppl_teacher"] = record["eval_ppl_teacher"]
        if record.get("eval_ppl_student") is not None:
            found["eval_ppl_student"], found["eval_step"] = record["eval_ppl_student"], record["step"]
    found["tokens"] = tokens
    return found


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def write_card(directory: Path, *, run_config: DictConfig, meta: dict[str, Any], metrics: dict[str, Any],
               sizes: dict[str, Any], export_config: dict[str, Any], base_path: Path, warnings: list[str],
               verify: dict[str, Any] | None = None) -> None:
    q = export_config["quantization_config"]
    arch = (export_config.get("architectures") or [f"AutoModelForCausalLM ({export_config.get('model_type')})"])[0]
    subln = export_config["model_type"] == "bitnet"
    loss = OmegaConf.to_yaml(run_config.loss).strip()
    text = f"""---
library_name: transformers
tags: [bitnet, ternary, 1.58-bit, distillation, megadistil]
---

# BitNet b1.58 student of `{base_path.name}`

Ternary weights {{-1, 0, +1}} with one absmean scale per tensor and int8 per-token activations, distilled by
megadistil from `{base_path}` (step {meta.get('step')}, {meta.get('resets', 0)} ReLoRA merges, trained on
{meta.get('world_size', '?')} rank(s)).

## Load it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this dir>")
tokenizer = AutoTokenizer.from_pretrained("<this dir>")
```

Needs `transformers` with BitNet support, `torch` and **`accelerate`** (transformers' BitNet quantizer refuses to
load without it). No megadistil code is needed.

- Architecture: `{arch}` (model_type `{export_config['model_type']}`).{
    " The student was trained with SubLN (an RMSNorm on the inputs of o_proj and down_proj); transformers' `bitnet`"
    " model carries exactly those norms as `attn_sub_norm` / `ffn_sub_norm`." if subln else
    " The student has no SubLN, so it is the base architecture with BitNet linear layers."}
- Quantization: `quant_method: bitnet`, `linear_class: {q['linear_class']}`, `quantization_mode: offline`; linear
  weights packed 4 per uint8 along the output dim (value + 1, shape `(out/4, in)`), `weight_scale = 1/mean|W|`
  (y = x_q·W_qᵀ / (input_scale·weight_scale)). Not converted (kept in `{export_config['dtype']}`):
  {', '.join(f'`{m}`' for m in q['modules_to_not_convert'])}.
- The ternary weights are exactly the ones the student used in training: Q3(W + ΔW + s·B·A).

## Run metrics

| | value |
|---|---|
| held-out perplexity, teacher | {_fmt(metrics['eval_ppl_teacher'])} |
| held-out perplexity, student (step {metrics['eval_step']}) | {_fmt(metrics['eval_ppl_student'])} |
| tokens trained | {metrics['tokens'] if metrics['tokens'] is not None else 'n/a'} |
| LoRA rank / alpha | {run_config.bitnet.lora_rank} / {run_config.bitnet.lora_alpha} |

Loss config:

```yaml
{loss}
```

## Size

| | bytes |
|---|---|
| packed ternary weights | {sizes['packed_bytes']:,} ({sizes['bits_per_ternary_weight']:.4f} bits/weight; ideal 2 bits = {int(sizes['ideal_2bit_bytes']):,}) |
| whole checkpoint (safetensors) | {sizes['checkpoint_bytes']:,} |
| teacher in bf16 | {sizes['teacher_bf16_bytes']:,} ({100 * sizes['checkpoint_vs_teacher_bf16']:.1f}%) |
"""
    if verify:
        text += f"""
## Verification

Loaded by vanilla transformers ({verify['loaded_as']['dtype']}) and compared with the megadistil student (float32)
on {verify['sequences']} x {verify['seq_len']} tokens from {verify['source']}: max |logit diff| {verify['max_abs_diff']:.3g},
argmax agreement {100 * verify['argmax_agreement']:.2f}%, greedy 32-token generations identical:
{verify['generations_identical']}.
"""
    if warnings:
        text += "\n## Notes\n\n" + "\n".join(f"- {w}" for w in warnings) + "\n"
    (directory / "README.md").write_text(text)
