"""tools/evaluate.py's work: every model through the same tasks, perplexity and generations, into one results JSON
whose schema is the same for every model kind."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from megadistil.data.text import expand_files
from megadistil.eval.generate import continuations, generations_markdown, read_prompts
from megadistil.eval.models import EvalError, LoadedModel, load_model, load_tokenizer, parse_model
from megadistil.eval.perplexity import text_perplexity
from megadistil.eval.tasks import check_tasks, go_offline, run_tasks, task_manager
from megadistil.utils import dtype_name, dtype_spellings, provenance, torch_dtype, write_atomic

SCHEMA = "megadistil.eval/1"
EVAL_DTYPES = dtype_spellings(torch.float32, torch.bfloat16)  # what --dtype offers


@dataclass
class EvalSettings:
    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    limit: int | None = None
    batch_size: int = 8
    max_length: int = 2048
    text: list[str] = field(default_factory=list)
    seq_len: int = 256
    text_sequences: int = 64
    split_special_tokens: bool = True  # False: text spelling a special token is the control token (chat text)
    generate: str | None = None
    chat_template: bool = False  # --generate's prompts as user turns in the tokenizer's chat template
    max_new_tokens: int = 32
    seed: int = 0
    temperature: float = 0.8
    dtype: str = "float32"
    device: str = "auto"  # auto: the GPU where there is one (cuda:0), else the CPU

    def validate(self) -> None:
        if not (self.tasks or self.text or self.generate):
            raise EvalError("nothing to evaluate: pass --tasks, --text and/or --generate")
        if self.dtype not in EVAL_DTYPES:
            raise EvalError(f"--dtype must be one of {EVAL_DTYPES}, got {self.dtype!r}")
        self.dtype = dtype_name(torch_dtype(self.dtype))  # recorded in the results as torch names it
        try:
            self.text = expand_files(self.text)
        except (FileNotFoundError, ValueError) as e:
            raise EvalError(f"--text: {e}") from None
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"--limit must be >= 1, got {self.limit}")
        for flag, value, least in (("--batch-size", self.batch_size, 1), ("--max-length", self.max_length, 2),
                                   ("--seq-len", self.seq_len, 2), ("--text-sequences", self.text_sequences, 1),
                                   ("--max-new-tokens", self.max_new_tokens, 1), ("--temperature", self.temperature, 0)):
            if value < least:
                raise EvalError(f"{flag} must be >= {least}, got {value}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise EvalError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EvalError(f"--device {self.device}: this machine has no CUDA device")


def evaluate_one(loaded: LoadedModel, s: EvalSettings, prompts: list[str] | None) -> dict[str, Any]:
    m = loaded.model
    record: dict[str, Any] = {"name": loaded.spec.name, "kind": loaded.spec.kind, "path": str(loaded.spec.path),
                              "model_class": type(m).__name__, "dtype": s.dtype, "fingerprint": loaded.fingerprint,
                              "tasks": {}, "perplexity": None, "generations": None}
    start = time.time()
    if s.tasks:
        record["tasks"] = run_tasks(m, loaded.tokenizer, s.tasks, include_path=s.include_path, limit=s.limit,
                                    batch_size=s.batch_size, max_length=s.max_length, checked=True)
    if s.text:
        record["perplexity"] = {"files": list(s.text), **text_perplexity(
            m, loaded.tokenizer, s.text, seq_len=s.seq_len, max_sequences=s.text_sequences, batch_size=s.batch_size,
            split_special_tokens=s.split_special_tokens)}
    if prompts:
        record["generations"] = continuations(m, loaded.tokenizer, prompts, max_new_tokens=s.max_new_tokens,
                                              seed=s.seed, temperature=s.temperature, chat_template=s.chat_template)
    record["seconds"] = round(time.time() - start, 2)
    return record


def evaluate_models(model_args: list[str], s: EvalSettings) -> dict[str, Any]:
    """Everything is checked (models exist, tasks' data on the machine, prompts) before the first model loads."""
    s.validate()
    go_offline()
    specs = [parse_model(a) for a in model_args]
    names = [sp.name for sp in specs]
    if len(set(names)) != len(names):
        raise EvalError(f"--model names must differ (got {names}); name them NAME=PATH")
    if s.tasks:
        check_tasks(s.tasks, task_manager(s.include_path, tuple(s.tasks)))
    prompts = read_prompts(s.generate) if s.generate else None
    if prompts and s.chat_template:
        for spec in specs:
            if not getattr(load_tokenizer(spec), "chat_template", None):
                raise EvalError(f"--chat-template: the tokenizer of --model {spec.name} ({spec.path}) has no chat "
                                "template (a base model's); leave --chat-template out, or evaluate an instruct model")
    records = []
    for spec in specs:
        loaded = load_model(spec, torch_dtype(s.dtype), torch.device(s.device))
        records.append(evaluate_one(loaded, s, prompts))
        del loaded
    return {"schema": SCHEMA, "megadistil": provenance(), "lm_eval_version": _lm_eval_version(),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": asdict(s),
            "models": records}


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def scores_markdown(results: dict[str, Any]) -> str:
    """One row per model: each task metric, and the perplexity."""
    models = results["models"]
    columns = sorted({(t, k) for m in models for t, row in m["tasks"].items() for k in row if k != "samples"})
    ppl = any(m["perplexity"] for m in models)
    head = ["model", *[f"{t} {k}" for t, k in columns], *(["perplexity"] if ppl else [])]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in models:
        cells = [m["name"], *[_num(m["tasks"].get(t, {}).get(k)) for t, k in columns]]
        if ppl:
            cells.append(_num(m["perplexity"]["perplexity"] if m["perplexity"] else None))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def check_outputs(out: str | Path, generations_out: str | Path | None = None) -> None:
    """Before anything runs: the result files can be written (a directory in their place lost every result at the
    end)."""
    for flag, path in (("--out", out), ("--generations-out", generations_out)):
        if path is not None and Path(path).is_dir():
            raise EvalError(f"{flag} {path} is a directory; give a file path")


def write_outputs(results: dict[str, Any], out: str | Path, generations_out: str | Path | None = None) -> list[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(results, indent=1) + "\n")
    written = [out]
    gens = {m["name"]: m["generations"] for m in results["models"] if m["generations"]}
    if gens:
        path = Path(generations_out) if generations_out else out.with_suffix(".generations.md")
        s = results["settings"]
        write_atomic(path, generations_markdown(gens, seed=s["seed"], temperature=s["temperature"]))
        written.append(path)
    return written
