"""The model card (README.md) of an exported checkpoint: what it is, how to load it, what the run measured."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from megadistil.rundir import METRICS, RUN_INFO
from megadistil.utils import provenance

# What weight_scale is for each linear class: transformers' BitLinear divides by it, AutoBitLinear multiplies by it.
SCALE_TEXT = {
    "bitlinear": "`weight_scale = 1/mean|W|` (y = x_q·W_qᵀ / (input_scale·weight_scale))",
    "autobitlinear": "`weight_scale = mean|W|` (y = (x_q / input_scale)·W_qᵀ·weight_scale)",
}


def run_metrics(run_dir: Path | None, step: int) -> dict[str, Any]:
    """Held-out perplexities (teacher: the first record; student: the last at or before `step`) and tokens trained
    up to `step`, from metrics.jsonl. Missing figures stay None."""
    found: dict[str, Any] = {"eval_ppl_teacher": None, "eval_ppl_student": None, "eval_step": None, "tokens": None,
                             "eval_tasks": {}, "eval_tasks_step": None}
    path = run_dir / METRICS if run_dir else None
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
        tasks = {k: v for k, v in record.items() if k.startswith("eval_task/")}
        if tasks:  # train.eval_tasks: the last evaluation's scores
            found["eval_tasks"], found["eval_tasks_step"] = tasks, record["step"]
    found["tokens"] = tokens
    return found


def data_fingerprint(run_config: DictConfig) -> dict[str, Any]:
    """What the student was trained on: the shards' manifest (it lists every shard's sha256) or the text files."""
    from megadistil.eval.models import files_sha256

    d = run_config.data
    if d.shards:
        manifest = Path(d.shards) / "manifest.json"
        found = manifest.is_file()
        return {"kind": "shards", "path": str(d.shards), "sha256": files_sha256([manifest]) if found else None,
                "over": "manifest.json (per-shard sha256)" if found else "manifest.json not on this machine"}
    files = [Path(f) for f in d.text]
    present = all(f.is_file() for f in files)
    return {"kind": "text", "path": [str(f) for f in files], "sha256": files_sha256(files) if present else None,
            "over": "the text files' contents" if present else "some text files are not on this machine"}


def eval_record(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """One model's record of a tools/evaluate.py results JSON (named, or the file's only one)."""
    try:
        results = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--eval-results {path}: not JSON ({e})") from None
    models = results.get("models") if isinstance(results, dict) else None
    if not isinstance(models, list):
        raise ValueError(f"--eval-results {path}: not a tools/evaluate.py results file (no 'models' list)")  # noqa: TRY004 - bad input: exit 2 like the others
    chosen = [m for m in models if name is None or m["name"] == name]
    if len(chosen) != 1:
        raise ValueError(f"--eval-results {path}: holds models {[m['name'] for m in models]}; "
                         + ("name one with --eval-model" if name is None else f"none is named {name!r}"))
    return chosen[0]


def model_index(name: str, run_config: DictConfig, metrics: dict[str, Any],
                evaluated: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Hugging Face `model-index` results: held-out perplexity and train.eval_tasks scores from the run, and the
    tasks and perplexity of a tools/evaluate.py record of the exported model when one is given."""
    results = []
    if metrics["eval_ppl_student"] is not None:
        results.append({"task": _task(), "dataset": {"type": "megadistil-heldout", "name": "held-out text: "
                                                 + ", ".join(Path(f).name for f in run_config.data.eval_text)},
                        "metrics": [{"type": "perplexity", "value": round(float(metrics["eval_ppl_student"]), 4),
                                     "name": f"held-out perplexity (training run, step {metrics['eval_step']})"}]})
    by_task: dict[str, list[dict[str, Any]]] = {}
    for key, value in metrics["eval_tasks"].items():
        _, task, metric = key.split("/", 2)
        by_task.setdefault(task, []).append({"type": metric, "value": round(float(value), 4),
                                             "name": f"{metric} (training run, step {metrics['eval_tasks_step']})"})
    for task, row in ((evaluated or {}).get("tasks") or {}).items():
        by_task.setdefault(task, []).extend({"type": k, "value": round(float(v), 4), "name": f"{k} (tools/evaluate.py)"}
                                            for k, v in row.items() if k != "samples")
    results += [{"task": _task(), "dataset": {"type": task, "name": task}, "metrics": rows} for task, rows in by_task.items()]
    ppl = (evaluated or {}).get("perplexity")
    if ppl:
        results.append({"task": _task(), "dataset": {"type": "text", "name": ", ".join(Path(f).name for f in ppl["files"])},
                        "metrics": [{"type": "perplexity", "value": round(ppl["perplexity"], 4),
                                     "name": "perplexity (tools/evaluate.py)"}]})
    return [{"name": name, "results": results}] if results else []


def _task() -> dict[str, str]:
    return {"type": "text-generation", "name": "Text Generation"}  # a fresh dict each: no YAML anchors in the card


def front_matter(name: str, run_config: DictConfig, metrics: dict[str, Any], evaluated: dict[str, Any] | None) -> str:
    import yaml

    meta: dict[str, Any] = {"library_name": "transformers",
                            "tags": ["bitnet", "ternary", "1.58-bit", "distillation", "megadistil"]}
    index = model_index(name, run_config, metrics, evaluated)
    if index:
        meta["model-index"] = index
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def provenance_section(run_dir: Path | None, run_config: DictConfig, metrics: dict[str, Any]) -> str:
    now = provenance()
    run_json = run_dir / RUN_INFO if run_dir else None
    trained = json.loads(run_json.read_text()).get("git_sha") if run_json and run_json.is_file() else None
    data = data_fingerprint(run_config)
    return f"""
## Provenance

| | value |
|---|---|
| megadistil version (export) | {now['version']} |
| megadistil commit (training run / export) | {trained or 'n/a'} / {now['git_commit'] or 'n/a'} |
| training data ({data['kind']}) | {', '.join(f'`{p}`' for p in ([data['path']] if isinstance(data['path'], str) else data['path']))} |
| training data sha256 | {data['sha256'] or 'n/a'} ({data['over']}) |
| tokens trained | {metrics['tokens'] if metrics['tokens'] is not None else 'n/a'} |
"""


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def write_card(directory: Path, *, run_config: DictConfig, meta: dict[str, Any], metrics: dict[str, Any],
               sizes: dict[str, Any], export_config: dict[str, Any], base_path: Path,
               verify: dict[str, Any] | None = None, evaluated: dict[str, Any] | None = None,
               name: str | None = None, run_dir: Path | None = None) -> None:
    q = export_config["quantization_config"]
    arch = (export_config.get("architectures") or [f"AutoModelForCausalLM ({export_config.get('model_type')})"])[0]
    subln = export_config["model_type"] == "bitnet"
    loss = OmegaConf.to_yaml(run_config.loss).strip()
    text = front_matter(name or f"{base_path.name}-bitnet", run_config, metrics, evaluated) + f"""
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
  weights packed 4 per uint8 along the output dim (value + 1, shape `(out/4, in)`), {SCALE_TEXT[q['linear_class']]}.
  Not converted (kept in `{export_config['dtype']}`): {', '.join(f'`{m}`' for m in q['modules_to_not_convert'])}.
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
    text += provenance_section(run_dir, run_config, metrics)
    if verify and "error" in verify:
        text += f"\n## Verification\n\nFAILED: {verify['error']}\n"
    elif verify:
        text += f"""
## Verification

Loaded by vanilla transformers ({verify['loaded_as']['dtype']}) and compared with the megadistil student (float32)
on {verify['sequences']} x {verify['seq_len']} tokens from {verify['source']}: max |logit diff| {verify['max_abs_diff']:.3g},
argmax agreement {100 * verify['argmax_agreement']:.2f}%, greedy 32-token generations identical:
{verify['generations_identical']}.
"""
    (directory / "README.md").write_text(text)
