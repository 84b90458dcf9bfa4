"""Where an export reads the student from: a checkpoint saved by any world size (trainable tensors through
DeepSpeed's lazy consolidation, ΔW from its per-rank partitions, both read through megadistil.rundir, which the
engine saves with) and the base model's safetensors (W), tensor by tensor, never the whole model."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from megadistil import rundir
from megadistil.config import RunConfig
from megadistil.rundir import CheckpointError
from megadistil.utils import from_safetensors_code, read_safetensors, torch_dtype

WRAPPER_PREFIX = "student."  # the engine trains a DistillModule whose `student` is the causal LM


class ExportError(ValueError):
    """Bad input to the exporter, naming the file, key or layer at fault."""


class ExportLoadError(RuntimeError):
    """The runtime (transformers, llama.cpp) could not load or run the export under verification."""


@contextlib.contextmanager
def _as_export_error() -> Iterator[None]:
    """The run-dir layout's errors, raised as the exporter's own (callers catch ExportError), message unchanged."""
    try:
        yield
    except CheckpointError as e:
        raise ExportError(str(e)) from None


# ---------------------------------------------------------------- locating a checkpoint

@dataclass
class CheckpointRef:
    root: Path  # <run>/checkpoints
    tag: str
    config: DictConfig  # the resolved run config (read only: the files it names may be gone)
    meta: dict[str, Any]
    run_dir: Path | None

    @property
    def dir(self) -> Path:
        return self.root / self.tag


def locate_checkpoint(path: str | Path) -> CheckpointRef:
    """A run dir (its `checkpoints/latest`), a checkpoints root (its `latest`) or one checkpoint dir."""
    with _as_export_error():
        ckpt = rundir.find_checkpoint(path)
    return CheckpointRef(root=ckpt.parent, tag=ckpt.name, config=read_run_config(ckpt / rundir.CONFIG),
                         meta=rundir.read_meta(ckpt), run_dir=rundir.run_dir_of(ckpt.parent))


def read_run_config(path: Path) -> DictConfig:
    """The run config as written, merged on the schema for defaults, without validating the files it names."""
    try:
        return OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
    except Exception as e:  # noqa: BLE001 - OmegaConf/yaml raise several unrelated types for a malformed file
        raise ExportError(f"{path}: not a megadistil run config ({str(e).splitlines()[0]})") from None


def training_dtype(ckpt: CheckpointRef) -> torch.dtype:
    """The dtype the student's parameters had in training: the fp32 masters are rounded to it, as the forward saw."""
    run_json = ckpt.root.parent / rundir.RUN_INFO
    if run_json.is_file():
        ds = json.loads(run_json.read_text()).get("ds_config", {})
        return torch.bfloat16 if ds.get("bf16", {}).get("enabled") is True else torch.float32
    if ckpt.config.model.dtype != "auto":
        return torch_dtype(ckpt.config.model.dtype)
    delta_index = rundir.read_delta_index(ckpt.dir)
    saved = rundir.delta_dtype(delta_index) if delta_index is not None else None
    if saved is not None:
        return saved
    raise ExportError(f"cannot tell the training dtype of {ckpt.dir}: model.dtype is 'auto' and there is no "
                      f"{run_json} recording the resolved ds_config; restore run.json or pass a run dir")


# ---------------------------------------------------------------- reading tensors

class BaseModel:
    """The base (teacher) HF dir, read tensor by tensor through safetensors' mmap."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ExportError(f"base model {self.path} is not a model directory (no config.json)")
        self.config = json.loads((self.path / "config.json").read_text())
        self.files = self._weight_map()
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for file in sorted(set(self.files.values())):
            with read_safetensors(self.path / file) as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    s = f.get_slice(name)
                    self._meta[name] = (from_safetensors_code(s.get_dtype()), tuple(s.get_shape()))
        missing = [n for n in self.files if n not in self._meta]
        if missing:
            raise ExportError(f"base model {self.path}: index names {missing[0]!r} but its shard does not hold it")

    def _weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.path / "model.safetensors"
        if not single.is_file():
            raise ExportError(f"base model {self.path} has no model.safetensors or model.safetensors.index.json")
        with read_safetensors(single) as f:
            return {name: single.name for name in f.keys()}  # noqa: SIM118

    def names(self) -> list[str]:
        """The model's tensors, less rotary inv_freq buffers: older checkpoints saved them, every loader recomputes
        them, and llama.cpp refuses a GGUF that holds them (its converter skips them too)."""
        return [n for n in self.files if not n.endswith(".rotary_emb.inv_freq")]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        with read_safetensors(self.path / self.files[name]) as f:
            return f.get_tensor(name)


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class StudentParts:
    """The trainable and ΔW tensors of the student, by name without the engine's `student.` prefix: the parts
    megadistil adds (STUDENT_PART_SUFFIXES) and any tensor of the base that optim.param_groups trained, which then
    replaces the base's.

    `tensors` maps a name to a zero-argument loader so that a checkpoint is read one tensor at a time.
    """

    def __init__(self, tensors: dict[str, Callable[[], torch.Tensor]], shapes: dict[str, tuple[int, ...]]) -> None:
        self.tensors, self.shapes = tensors, shapes

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]()

    def has(self, name: str) -> bool:
        return name in self.tensors

    @classmethod
    def from_checkpoint(cls, ckpt: CheckpointRef) -> StudentParts:
        tensors, shapes = _trainable_loaders(ckpt)
        delta_tensors, delta_shapes = _delta_loaders(ckpt.dir)
        tensors.update(delta_tensors)
        shapes.update(delta_shapes)
        return cls(tensors, shapes)


# The tensors megadistil adds to the base model; every other tensor of a checkpoint is one of the base's, trained.
STUDENT_PART_SUFFIXES = (".lora_A", ".lora_B", ".delta", ".delta_scale", ".sub_norm.weight")


def is_student_part(name: str) -> bool:
    return name.endswith(STUDENT_PART_SUFFIXES)


def _is_student_tensor(name: str) -> bool:
    # Under the engine's wrapper, every trainable tensor is the student's; beside it sit the losses' own (DSKD's
    # projector), which are not. A name without the wrapper (an older layout) counts by its suffix alone.
    return name.startswith(WRAPPER_PREFIX) or is_student_part(name)


def _strip(name: str) -> str:
    return name.removeprefix(WRAPPER_PREFIX)


def _trainable_loaders(ckpt: CheckpointRef) -> tuple[dict[str, Callable], dict[str, tuple[int, ...]]]:
    """DeepSpeed's own consolidation, in lazy mode (rundir.read_trainable): one parameter at a time, any world size."""
    try:
        lazy = rundir.read_trainable(ckpt.dir)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        raise ExportError(f"checkpoint {ckpt.dir}: DeepSpeed could not read its ZeRO files ({e})") from None
    tensors, shapes = {}, {}
    for name, t in lazy.items():
        if not _is_student_tensor(name):
            continue
        if not isinstance(t, torch.Tensor):
            tensors[_strip(name)] = (lambda t=t: t.contiguous())
        else:
            tensors[_strip(name)] = (lambda t=t: t)
        shapes[_strip(name)] = tuple(t.shape)
    if not any(n.endswith(".lora_A") for n in tensors):
        raise ExportError(f"checkpoint {ckpt.dir} has no LoRA parameters (lora_A): not a megadistil student")
    return tensors, shapes


def _delta_loaders(directory: Path) -> tuple[dict[str, Callable], dict[str, tuple[int, ...]]]:
    index = rundir.read_delta_index(directory)
    if index is None:
        return {}, {}
    with _as_export_error():
        rundir.delta_files(directory, index)  # a missing partition is an error now, not when its layer is written
    tensors, shapes = {}, {}
    for name, info in index["tensors"].items():
        tensors[_strip(name)] = (lambda name=name: _read_delta(directory, name, index))
        shapes[_strip(name)] = tuple(info["shape"])
    return tensors, shapes


def _read_delta(directory: Path, name: str, index: dict[str, Any]) -> torch.Tensor:
    with _as_export_error():
        return rundir.read_delta(directory, name, index)


def check_fingerprint(ckpt: CheckpointRef, base: BaseModel) -> None:
    recorded = ckpt.meta.get("base_fingerprint")
    if recorded is None:
        return  # older checkpoints: the shape checks are all we have
    if not rundir.fingerprint_matches(base.path, recorded):
        raise ExportError(f"base model {base.path} does not match the checkpoint {ckpt.dir}: its fingerprint "
                          "(config.json, safetensors headers, samples of the weights) differs from the one recorded in "
                          "meta.json at training time; pass --base with the model the run trained from")
