"""What `--model` names, loaded as a causal LM that lm-eval, perplexity and generation all see the same way.

  DIR                an HF dir: a teacher, or a converted 1.58-bit checkpoint (transformers' BitNet quantizer)
  RUN_OR_CKPT_DIR    a megadistil run dir, checkpoints/ dir or one checkpoint: the student rebuilt through megadistil
                     (base W + ΔW + LoRA + SubLN, exactly as the exporter rebuilds it for --verify)
  ternary:DIR        the HF dir naively ternarized (BitLinear with ΔW = 0, B = 0): post-training quantization
  NAME=...           any of the above, with the name the results and tables use
                     (an argument that is itself an existing path, as a dir named lr=3e-4, is that path)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megadistil.rundir import is_checkpoint


class EvalError(ValueError):
    """Bad input to an evaluation, naming the model, task or file at fault."""


@dataclass
class ModelSpec:
    name: str
    kind: str  # hf | student | ternary
    path: Path


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: nn.Module
    tokenizer: Any
    fingerprint: dict[str, str]


def parse_model(arg: str) -> ModelSpec:
    """`[NAME=][ternary:]PATH` -> what it is; a GGUF file is refused (lm-eval has no llama.cpp model here)."""
    if Path(arg).exists():  # a path as given is that path, though it reads as NAME=... (a run dir named lr=3e-4)
        name, kind, path = "", "", arg
    else:
        named = re.fullmatch(r"([\w.-]+)=(.+)", arg)
        name, rest = named.groups() if named else ("", arg)
        kind, path = ("ternary", rest.removeprefix("ternary:")) if rest.startswith("ternary:") else ("", rest)
    p = Path(path)
    gguf_dir = p.is_dir() and list(p.glob("*.gguf")) and not (p / "config.json").is_file() and not is_checkpoint(p)
    if p.suffix == ".gguf" or gguf_dir:  # a run dir may hold a GGUF export of itself: it is still the run
        raise EvalError(f"--model {arg}: GGUF models are not evaluated here; `tools/convert_to_ternary.py --format gguf "
                        "--verify` measures one in llama.cpp against the student, or evaluate the HF dir (teacher or "
                        "converted checkpoint) instead")
    if not p.exists():
        raise EvalError(f"--model {arg}: {p} does not exist")
    if not kind:
        kind = "student" if is_checkpoint(p) else "hf"
    if kind in ("hf", "ternary") and not (p / "config.json").is_file():
        raise EvalError(f"--model {arg}: {p} is neither an HF model dir (no config.json) nor a megadistil run dir "
                        "or checkpoint (no checkpoints/latest, latest or meta.json)")
    return ModelSpec(name=name or p.name, kind=kind, path=p)


def load_model(spec: ModelSpec, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LoadedModel:
    loader = {"hf": _load_hf, "ternary": _load_ternary, "student": _load_student}[spec.kind]
    model, tokenizer, fingerprint = loader(spec.path, dtype)
    return LoadedModel(spec, model.to(device).eval(), tokenizer, fingerprint)


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load_tokenizer(spec: ModelSpec):
    """The model's tokenizer alone (a student's: its run's model.tokenizer, else its base's), without its weights."""
    if spec.kind != "student":
        return _tokenizer(spec.path)
    from megadistil.export.sources import ExportError, locate_checkpoint

    try:
        config = locate_checkpoint(spec.path).config
    except ExportError as e:
        raise EvalError(f"--model {spec.path}: {e}") from None
    return _tokenizer(_run_tokenizer_dir(config))


def _run_tokenizer_dir(run_config) -> Path:
    """A run's tokenizer: model.tokenizer, else the base's (model.student)."""
    return Path(run_config.model.tokenizer or run_config.model.student)


def _load_hf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    return model, _tokenizer(path), dir_fingerprint(path)


def _load_ternary(path: Path, dtype: torch.dtype):
    """Every linear of the decoder becomes a BitLinear with zero adapters: Q8(x)·Q3(W)ᵀ, the naive ternary model
    that distillation starts from (each run's step-0 evaluation)."""
    from megadistil.bitnet import to_bitnet

    model, tokenizer, fingerprint = _load_hf(path, dtype)
    to_bitnet(model, lora_rank=1, delta=False)
    return model, tokenizer, {**fingerprint, "transform": "ternary: to_bitnet, zero adapters"}


def _load_student(path: Path, dtype: torch.dtype):
    """The student as the exporter rebuilds it (parameters rounded through the training dtype, LoRA factors kept in
    it: the codes it trained with), in `dtype`."""
    from megadistil.export.sources import (
        BaseModel,
        ExportError,
        StudentParts,
        check_fingerprint,
        locate_checkpoint,
        training_dtype,
    )
    from megadistil.export.ternary import student_spec
    from megadistil.export.verify import build_student, to_dtype

    try:
        ckpt = locate_checkpoint(path)
        base = BaseModel(ckpt.config.model.student)
        check_fingerprint(ckpt, base)
        parts = StudentParts.from_checkpoint(ckpt)
        spec = student_spec(parts, ckpt.config, training_dtype(ckpt))
        model = build_student(base, parts, spec, ckpt.config)
    except ExportError as e:
        raise EvalError(f"--model {path}: {e}") from None
    fingerprint = {"sha256": files_sha256([base.path / "config.json", *sorted(base.path.glob("*.safetensors")),
                                           *sorted(f for f in ckpt.dir.iterdir() if f.is_file())]),
                   "over": f"base {base.path} config.json + safetensors, and every file of checkpoint {ckpt.dir}",
                   "checkpoint_step": str(ckpt.meta.get("step"))}
    return to_dtype(model, dtype, spec.train_dtype), _tokenizer(_run_tokenizer_dir(ckpt.config)), fingerprint


def dir_fingerprint(path: Path) -> dict[str, str]:
    files = [path / "config.json", *sorted(path.glob("*.safetensors"))]
    return {"sha256": files_sha256(files), "over": f"{path} config.json + *.safetensors contents"}


def files_sha256(files: list[Path]) -> str:
    """sha256 over the files' names and contents (all of it: two students with the same shapes must differ)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()
