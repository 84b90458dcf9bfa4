"""Where an export reads the student from: a checkpoint saved by any world size (trainable tensors through
DeepSpeed's lazy consolidation, ΔW from the engine's per-rank partitions) and the base model's safetensors (W), tensor
by tensor, never the whole model."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from megadistil.config import RunConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
WRAPPER_PREFIX = "student."  # the engine trains a DistillModule whose `student` is the causal LM
ST_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


class ExportError(ValueError):
    """Bad input to the exporter, naming the file, key or layer at fault."""


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
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"checkpoint {path} does not exist or is not a directory")
    if (path / "checkpoints" / "latest").is_file():
        root, tag = path / "checkpoints", (path / "checkpoints" / "latest").read_text().strip()
    elif (path / "latest").is_file():
        root, tag = path, (path / "latest").read_text().strip()
    elif (path / "meta.json").is_file():
        root, tag = path.parent, path.name
    else:
        raise ExportError(f"{path} is not a megadistil checkpoint: no checkpoints/latest, latest or meta.json in it "
                          "(pass a run dir, its checkpoints/ dir or one checkpoints/<tag>/ dir)")
    ckpt = root / tag
    for required in ("meta.json", "config.yaml"):
        if not (ckpt / required).is_file():
            raise ExportError(f"checkpoint {ckpt} is incomplete or not a megadistil checkpoint: no {required}")
    if not list(ckpt.glob("*_optim_states.pt")):
        raise ExportError(f"checkpoint {ckpt} holds no DeepSpeed ZeRO files (*_optim_states.pt)")
    meta = json.loads((ckpt / "meta.json").read_text())
    run_dir = root.parent if (root.parent / "config.yaml").is_file() else None
    return CheckpointRef(root=root, tag=tag, config=read_run_config(ckpt / "config.yaml"), meta=meta, run_dir=run_dir)


def read_run_config(path: Path) -> DictConfig:
    """The run config as written, merged on the schema for defaults, without validating the files it names."""
    try:
        return OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
    except Exception as e:  # noqa: BLE001 - OmegaConf/yaml raise several unrelated types for a malformed file
        raise ExportError(f"{path}: not a megadistil run config ({str(e).splitlines()[0]})") from None


def training_dtype(ckpt: CheckpointRef) -> torch.dtype:
    """The dtype the student's parameters had in training: the fp32 masters are rounded to it, as the forward saw."""
    run_json = ckpt.root.parent / "run.json"
    if run_json.is_file():
        ds = json.loads(run_json.read_text()).get("ds_config", {})
        return torch.bfloat16 if ds.get("bf16", {}).get("enabled") is True else torch.float32
    if ckpt.config.model.dtype != "auto":
        return DTYPES[ckpt.config.model.dtype]
    delta_index = ckpt.dir / "delta.json"
    if delta_index.is_file():
        dtypes = {t["dtype"] for t in json.loads(delta_index.read_text())["tensors"].values()}
        if len(dtypes) == 1:
            return getattr(torch, dtypes.pop())
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
            with safe_open(str(self.path / file), "pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    s = f.get_slice(name)
                    self._meta[name] = (_torch_dtype(s.get_dtype()), tuple(s.get_shape()))
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
        with safe_open(str(single), "pt") as f:
            return {name: single.name for name in f.keys()}  # noqa: SIM118

    def names(self) -> list[str]:
        return list(self.files)

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.path / self.files[name]), "pt") as f:
            return f.get_tensor(name)

    def total_bytes(self) -> int:
        return sum(tensor_nbytes(d, s) for d, s in self._meta.values())


def _torch_dtype(st: str) -> torch.dtype:
    for dt, code in ST_DTYPES.items():
        if code == st:
            return dt
    return {"F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}[st]


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class StudentParts:
    """The trainable (LoRA, SubLN) and ΔW tensors of the student, by name without the engine's `student.` prefix.

    `tensors` maps a name to a zero-argument loader so that a checkpoint is read one tensor at a time.
    """

    def __init__(self, tensors: dict[str, Callable[[], torch.Tensor]], shapes: dict[str, tuple[int, ...]]) -> None:
        self.tensors, self.shapes = tensors, shapes

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]()

    def has(self, name: str) -> bool:
        return name in self.tensors

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> StudentParts:
        """In-memory parts (e.g. a live student's state_dict): only lora_A / lora_B / delta / sub_norm are kept."""
        keep = {n: t for n, t in state.items() if _is_student_part(n)}
        return cls({n: (lambda t=t: t) for n, t in keep.items()}, {n: tuple(t.shape) for n, t in keep.items()})

    @classmethod
    def from_checkpoint(cls, ckpt: CheckpointRef) -> StudentParts:
        tensors, shapes = _trainable_loaders(ckpt)
        delta_tensors, delta_shapes = _delta_loaders(ckpt.dir)
        tensors.update(delta_tensors)
        shapes.update(delta_shapes)
        return cls(tensors, shapes)


def _is_student_part(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B", ".delta", ".sub_norm.weight"))


def _strip(name: str) -> str:
    return name.removeprefix(WRAPPER_PREFIX)


def _trainable_loaders(ckpt: CheckpointRef) -> tuple[dict[str, Callable], dict[str, tuple[int, ...]]]:
    """DeepSpeed's own consolidation, in lazy mode: the ZeRO files are mmapped and each parameter is gathered from
    every rank's flat partition only when asked for (any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megadistil.engine.safe_load import weights_only_torch_load

    try:
        # its progress prints would interleave with ours; its torch.load calls become weights_only=True
        with contextlib.redirect_stdout(io.StringIO()), weights_only_torch_load():
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.root), tag=ckpt.tag,
                                                            exclude_frozen_parameters=True, lazy_mode=True)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        raise ExportError(f"checkpoint {ckpt.dir}: DeepSpeed could not read its ZeRO files ({e})") from None
    tensors, shapes = {}, {}
    for name, t in lazy.items():
        if not _is_student_part(name):
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
    index_path = directory / "delta.json"
    if not index_path.is_file():
        return {}, {}
    index = json.loads(index_path.read_text())
    files = [directory / f"delta.rank{r}.safetensors" for r in range(index["world_size"])]
    for f in files:
        if not f.is_file():
            raise ExportError(f"checkpoint {directory}: delta.json names world size {index['world_size']} "
                              f"but {f.name} is missing")
    tensors, shapes = {}, {}
    for name, info in index["tensors"].items():
        tensors[_strip(name)] = (lambda name=name, info=info: _read_delta(files, name, info))
        shapes[_strip(name)] = tuple(info["shape"])
    return tensors, shapes


def _read_delta(files: list[Path], name: str, info: dict[str, Any]) -> torch.Tensor:
    """cat(partition_r for r)[:numel], copied part by part into one buffer (no second full-size copy)."""
    shape = tuple(info["shape"])
    numel = tensor_nbytes(torch.uint8, shape)
    out = torch.empty(numel, dtype=getattr(torch, info["dtype"]))
    offset = 0
    for file in files:
        if offset >= numel:
            break
        with safe_open(str(file), "pt") as f:
            if name not in f.keys():  # noqa: SIM118
                raise ExportError(f"{file}: no partition of {name!r}")
            part = f.get_tensor(name).reshape(-1)
        take = min(part.numel(), numel - offset)
        out[offset:offset + take].copy_(part[:take])
        offset += take
    if offset != numel:
        raise ExportError(f"ΔW {name!r}: partitions hold {offset} values, its shape {list(shape)} needs {numel}")
    return out.view(shape)


def check_fingerprint(ckpt: CheckpointRef, base: BaseModel) -> None:
    recorded = ckpt.meta.get("base_fingerprint")
    if recorded is None:
        return  # older checkpoints: the shape checks are all we have
    from megadistil.engine.checkpoint import model_dir_fingerprint

    if model_dir_fingerprint(base.path) != recorded:
        raise ExportError(f"base model {base.path} does not match the checkpoint {ckpt.dir}: its fingerprint "
                          "(config.json + safetensors headers) differs from the one recorded in meta.json at "
                          "training time; pass --base with the model the run trained from")
