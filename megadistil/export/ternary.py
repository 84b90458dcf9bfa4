"""Export a megadistil run as a packed 1.58-bit Hugging Face checkpoint that vanilla transformers loads.

The student is W + ΔW + s·B·A (+ SubLN): W is read tensor by tensor from the base model's safetensors, ΔW from the
checkpoint's per-rank partitions and the trainable parts (LoRA, SubLN) from DeepSpeed's ZeRO files, lazily. Each
BitLinear weight is quantized with the same Q3 as training and packed in transformers' BitNet layout; the output
shards are streamed to disk tensor by tensor, so peak memory is a few of the largest tensors, never the model.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from tqdm import tqdm

from megadistil.bitnet.linear import effective_weight
from megadistil.bitnet.quant import VALUES_PER_BYTE, pack_ternary, ternary_codes
from megadistil.bitnet.surgery import SUBLN_TARGETS
from megadistil.config import RunConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
LINEAR_CLASSES = ("bitlinear", "autobitlinear")
WRAPPER_PREFIX = "student."  # the engine trains a DistillModule whose `student` is the causal LM
# transformers' `bitnet` model puts its sub-norms exactly where SubLN sits: on the inputs of o_proj and down_proj.
SUBNORM_NAMES = {"o_proj": "attn_sub_norm", "down_proj": "ffn_sub_norm"}
assert set(SUBNORM_NAMES) == set(SUBLN_TARGETS)
_ST_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json")


class ExportError(ValueError):
    """Bad input to the exporter, naming the file, key or layer at fault."""


@dataclass
class ExportConfig:
    """What `tools/convert_to_ternary.py` does; the defaults are what goes to the hub."""

    dtype: str = "bf16"  # bf16 | fp32 | fp16: non-ternary tensors, weight_scale and the loaded model's activations
    max_shard_size: str = "5GB"
    linear_class: str = "bitlinear"  # transformers' BitLinear (packed uint8 weight + 1/mean|W| scale)
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.linear_class not in LINEAR_CLASSES:
            raise ExportError(f"linear_class must be one of {LINEAR_CLASSES}, got {self.linear_class!r}")
        shard_bytes(self.max_shard_size)


def shard_bytes(size: str | int) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size)
    except (ValueError, TypeError):
        raise ExportError(f"--max-shard-size {size!r} is not a size (e.g. 5GB, 500MB)") from None
    if value <= 0:
        raise ExportError(f"--max-shard-size must be > 0, got {size!r}")
    return value


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
        return sum(_nbytes(d, s) for d, s in self._meta.values())


def _torch_dtype(st: str) -> torch.dtype:
    for dt, code in _ST_DTYPES.items():
        if code == st:
            return dt
    return {"F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}[st]


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
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
    numel = _nbytes(torch.uint8, shape)
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


# ---------------------------------------------------------------- the student's layout

@dataclass
class StudentSpec:
    """Where the BitLinear layers are and how to rebuild their effective weight exactly as training did."""

    bitlinear: list[str]  # module names (e.g. model.layers.0.self_attn.q_proj)
    scaling: float  # lora_alpha / lora_rank
    train_dtype: torch.dtype
    subln: bool
    modules_to_not_convert: list[str]
    lora_rank: int


def student_spec(parts: StudentParts, run_config: DictConfig, train_dtype: torch.dtype) -> StudentSpec:
    b = run_config.bitnet
    rank = int(b.lora_rank)
    alpha = float(b.lora_alpha) if b.lora_alpha is not None else float(rank)
    modules = sorted(n[: -len(".lora_A")] for n in parts.tensors if n.endswith(".lora_A"))
    for m in modules:
        if not parts.has(f"{m}.lora_B"):
            raise ExportError(f"layer {m}: checkpoint has lora_A but no lora_B")
        if parts.shapes[f"{m}.lora_A"][0] != rank:
            raise ExportError(f"layer {m}: lora_A has rank {parts.shapes[f'{m}.lora_A'][0]} but the run config "
                              f"says bitnet.lora_rank={rank}")
    subln = any(n.endswith(".sub_norm.weight") for n in parts.tensors)
    not_convert = list(dict.fromkeys(["lm_head", *b.exclude]))
    return StudentSpec(modules, alpha / rank, train_dtype, subln, not_convert, rank)


# ---------------------------------------------------------------- the output plan

@dataclass
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]
    ternary_values: int = 0  # how many ternary weights it packs (for the size report)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.shape)


def subnorm_output_name(module: str) -> str:
    parent, leaf = module.rsplit(".", 1)
    if leaf not in SUBNORM_NAMES:
        raise ExportError(f"layer {module} has a SubLN, but transformers' bitnet model has sub-norms only on "
                          f"the inputs of {tuple(SUBNORM_NAMES)}")
    return f"{parent}.{SUBNORM_NAMES[leaf]}.weight"


def check_base_matches(base: BaseModel, parts: StudentParts, spec: StudentSpec) -> None:
    """Every BitLinear of the checkpoint must find a weight of a matching shape in the base."""
    for m in spec.bitlinear:
        name = f"{m}.weight"
        if name not in base.files:
            raise ExportError(f"base model {base.path} does not match the checkpoint: it has no {name!r} "
                              "(the checkpoint trained a LoRA on it)")
        out, inp = base.shape(name) if len(base.shape(name)) == 2 else (None, None)
        expect = {f"{m}.lora_A": (spec.lora_rank, inp), f"{m}.lora_B": (out, spec.lora_rank), f"{m}.delta": (out, inp)}
        for part, shape in expect.items():
            if parts.has(part) and parts.shapes[part] != shape:
                raise ExportError(f"base model {base.path} does not match the checkpoint at layer {m}: base weight "
                                  f"{list(base.shape(name))}, checkpoint {part.rsplit('.', 1)[-1]} "
                                  f"{list(parts.shapes[part])}")
        if out % VALUES_PER_BYTE:
            raise ExportError(f"layer {m}: out_features={out} is not a multiple of {VALUES_PER_BYTE}")


def quantize_layer(weight: torch.Tensor, delta: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   scaling: float, train_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [out/4, in], scale = 1/mean|W_eff| as float32 [1]): Q3 of W + ΔW + s·B·A, with every operand
    first rounded to the dtype it had in the training forward (the optimizer's fp32 masters were not used there)."""
    return _pack(lambda: _effective(lambda: weight, lambda: delta, lora_A, lora_B, scaling, train_dtype))


def _effective(weight: Callable[[], torch.Tensor], delta: Callable[[], torch.Tensor | None], lora_A: torch.Tensor,
               lora_B: torch.Tensor, scaling: float, train_dtype: torch.dtype) -> torch.Tensor:
    # Loaders, not tensors: W and ΔW are freed when this frame returns, before Q3 allocates its temporaries.
    return effective_weight(weight().to(train_dtype), delta(), lora_A.to(train_dtype), lora_B.to(train_dtype), scaling)


def _pack(w_eff: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scale = ternary_codes(w_eff())
    return pack_ternary(codes), scale.reshape(1).float()


def plan_output(base: BaseModel, parts: StudentParts, spec: StudentSpec, dtype: torch.dtype) -> list[OutputTensor]:
    """The output tensors in the base's order; each BitLinear weight becomes its packed weight + weight_scale, and a
    SubLN weight follows its layer's weight under transformers' bitnet name."""
    layers = set(spec.bitlinear)
    plan: list[OutputTensor] = []
    cache: dict[str, torch.Tensor] = {}  # the scale, computed with the packed weight, is written right after it

    for name in base.names():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in layers:
            plan += _bitlinear_outputs(base, parts, spec, module, dtype, cache)
        else:
            plan.append(OutputTensor(name, dtype if base.dtype(name).is_floating_point else base.dtype(name),
                                     base.shape(name), lambda name=name: _cast(base.get(name), spec, dtype)))
    return plan


def _cast(t: torch.Tensor, spec: StudentSpec, dtype: torch.dtype) -> torch.Tensor:
    # The student saw its frozen tensors in the training dtype; rounding through it keeps the export identical.
    return t.to(spec.train_dtype).to(dtype) if t.is_floating_point() else t


def _bitlinear_outputs(base: BaseModel, parts: StudentParts, spec: StudentSpec, m: str, dtype: torch.dtype,
                       cache: dict[str, torch.Tensor]) -> list[OutputTensor]:
    out, inp = base.shape(f"{m}.weight")

    def packed() -> torch.Tensor:
        delta = (lambda: parts.get(f"{m}.delta")) if parts.has(f"{m}.delta") else (lambda: None)
        p, scale = _pack(lambda: _effective(lambda: base.get(f"{m}.weight"), delta, parts.get(f"{m}.lora_A"),
                                            parts.get(f"{m}.lora_B"), spec.scaling, spec.train_dtype))
        cache[m] = scale
        return p

    tensors = [
        OutputTensor(f"{m}.weight", torch.uint8, ((out + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE, inp), packed,
                     ternary_values=out * inp),
        OutputTensor(f"{m}.weight_scale", dtype, (1,), lambda: cache.pop(m).to(dtype)),
    ]
    if parts.has(f"{m}.sub_norm.weight"):
        tensors.append(OutputTensor(subnorm_output_name(m), dtype, (inp,),
                                    lambda: parts.get(f"{m}.sub_norm.weight").to(spec.train_dtype).to(dtype)))
    return tensors


def assign_shards(plan: list[OutputTensor], max_bytes: int) -> list[list[OutputTensor]]:
    """Greedy, in plan order, like transformers' save_pretrained: a new shard when the next tensor would overflow."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


# ---------------------------------------------------------------- writing

class StreamingSafetensors:
    """Writes one safetensors file whose header is known up front, tensor by tensor, so that a shard never has to sit
    in memory whole (safetensors' save_file takes a dict of every tensor in the file)."""

    def __init__(self, path: Path, entries: list[OutputTensor], metadata: dict[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for t in entries:
            header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.entries, self.index = entries, 0
        self.file = path.open("wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, tensor: torch.Tensor) -> None:
        t = self.entries[self.index]
        if tensor.dtype != t.dtype or tuple(tensor.shape) != t.shape:
            raise RuntimeError(f"tensor {t.name}: produced {tensor.dtype} {list(tensor.shape)}, "
                               f"planned {t.dtype} {list(t.shape)}")
        self.file.write(tensor.contiguous().view(torch.uint8).reshape(-1).numpy().data)
        self.index += 1

    def close(self) -> None:
        if self.index != len(self.entries):
            raise RuntimeError(f"{self.file.name}: wrote {self.index} of {len(self.entries)} tensors")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _release_freed_memory() -> None:
    """glibc keeps freed tensor buffers in its heap (its mmap threshold grows after the first large free), so RSS
    would creep up by a few tensors over the conversion; trimming after each tensor keeps it at what is live."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def write_weights(directory: Path, plan: list[OutputTensor], max_bytes: int, progress: bool = True) -> dict[str, Any]:
    """Shards (+ index when more than one); returns the size figures."""
    shards = assign_shards(plan, max_bytes)
    names = shard_names(len(shards))
    bar = tqdm(total=len(plan), desc="convert", unit="tensor", disable=not progress)
    for shard, file in zip(shards, names):
        writer = StreamingSafetensors(directory / file, shard, {"format": "pt"})
        for t in shard:
            bar.set_postfix_str(t.name, refresh=False)
            writer.write(t.produce())
            _release_freed_memory()
            bar.update()
        writer.close()
    bar.close()
    total = sum(t.nbytes for t in plan)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t.name: file for shard, file in zip(shards, names) for t in shard}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    packed = [t for t in plan if t.ternary_values]
    return {"packed_bytes": sum(t.nbytes for t in packed), "ternary_values": sum(t.ternary_values for t in packed),
            "weights_bytes": total, "shards": len(shards)}


def output_config(base_config: dict[str, Any], spec: StudentSpec, cfg: ExportConfig) -> dict[str, Any]:
    config = {k: v for k, v in base_config.items() if k not in ("quantization_config", "transformers_version")}
    config["dtype"] = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[cfg.dtype]
    config.pop("torch_dtype", None)
    if spec.subln:
        if config.get("model_type") != "llama":
            raise ExportError(f"a SubLN student exports as transformers' `bitnet` model (Llama + sub-norms); the base "
                              f"is model_type={config.get('model_type')!r}, which it cannot express")
        if config.get("mlp_bias"):
            raise ExportError("a SubLN student exports as transformers' `bitnet` model, whose MLP has no bias; "
                              "the base has mlp_bias=true")
        config.update(model_type="bitnet", architectures=["BitNetForCausalLM"])
    config["quantization_config"] = {
        "quant_method": "bitnet", "linear_class": cfg.linear_class, "quantization_mode": "offline",
        "modules_to_not_convert": spec.modules_to_not_convert, "use_rms_norm": False,
        "rms_norm_eps": base_config.get("rms_norm_eps", 1e-6),
    }
    return config


def write_side_files(directory: Path, base: BaseModel, tokenizer_dir: Path, config: dict[str, Any]) -> None:
    from transformers import GenerationConfig

    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (base.path / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(base.path)
    else:
        from transformers import PretrainedConfig
        gen = GenerationConfig.from_model_config(PretrainedConfig.from_dict(base.config))
    gen.save_pretrained(directory)
    copied = [f for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()]
    if not copied:
        raise ExportError(f"tokenizer dir {tokenizer_dir} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])})")
    for f in copied:  # copied byte for byte: re-saving through a tokenizer class could change them
        shutil.copyfile(tokenizer_dir / f, directory / f)


# ---------------------------------------------------------------- the output directory

@contextlib.contextmanager
def staged_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a temp dir next to `output`; on success it replaces `output` in one rename. An interruption leaves only
    a dot-named `.partial` dir, never something that looks like a finished checkpoint."""
    output = output.resolve()
    if output.exists() and not output.is_dir():
        raise ExportError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ExportError(f"output {output} exists and is not empty; pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    trash = output.parent / f".{output.name}.old-{os.getpid()}"
    if output.exists():
        os.replace(output, trash)
    os.replace(staging, output)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------- the whole conversion

@dataclass
class ExportResult:
    output: Path
    sizes: dict[str, Any]
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    verify: dict[str, Any] | None = None


def check_fingerprint(ckpt: CheckpointRef, base: BaseModel) -> None:
    recorded = ckpt.meta.get("base_fingerprint")
    if recorded is None:
        return  # older checkpoints: the shape checks are all we have
    from megadistil.engine.checkpoint import model_dir_fingerprint

    if model_dir_fingerprint(base.path) != recorded:
        raise ExportError(f"base model {base.path} does not match the checkpoint {ckpt.dir}: its fingerprint "
                          "(config.json + safetensors headers) differs from the one recorded in meta.json at "
                          "training time; pass --base with the model the run trained from")


def export_student(base: BaseModel, parts: StudentParts, spec: StudentSpec, output: str | Path, cfg: ExportConfig,
                   *, tokenizer_dir: str | Path | None = None,
                   finish: Callable[[Path, ExportResult], None] | None = None) -> ExportResult:
    """Quantize, pack and write the student as an HF dir at `output` (atomically). `finish(staging_dir, result)`
    runs on the complete files before they take the output's name (verification, model card)."""
    cfg.validate()
    check_base_matches(base, parts, spec)
    dtype = DTYPES[cfg.dtype]
    config = output_config(base.config, spec, cfg)
    warnings = []
    plan = plan_output(base, parts, spec, dtype)
    with staged_output(Path(output), cfg.overwrite) as staging:
        sizes = write_weights(staging, plan, shard_bytes(cfg.max_shard_size), cfg.progress)
        write_side_files(staging, base, Path(tokenizer_dir or base.path), config)
        sizes.update(size_report(sizes, base, staging))
        result = ExportResult(Path(output), sizes, config, warnings)
        if finish is not None:
            finish(staging, result)
    return result


def size_report(sizes: dict[str, Any], base: BaseModel, directory: Path) -> dict[str, Any]:
    ideal = sizes["ternary_values"] * 2 / 8
    # The teacher as it would be shipped in bf16, whatever dtype its files happen to be in.
    teacher_bf16 = sum(_nbytes(torch.bfloat16 if base.dtype(n).is_floating_point else base.dtype(n), base.shape(n))
                       for n in base.names())
    on_disk = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    return {"ideal_2bit_bytes": ideal, "packed_vs_ideal": sizes["packed_bytes"] / ideal if ideal else float("nan"),
            "bits_per_ternary_weight": 8 * sizes["packed_bytes"] / max(sizes["ternary_values"], 1),
            "checkpoint_bytes": on_disk, "teacher_bf16_bytes": teacher_bf16,
            "checkpoint_vs_teacher_bf16": on_disk / teacher_bf16}


def format_size_report(sizes: dict[str, Any]) -> str:
    gib = 1024**3
    packed = (f"packed ternary weights: {sizes['packed_bytes']:,} bytes for {sizes['ternary_values']:,} weights "
              f"= {sizes['bits_per_ternary_weight']:.4f} bits/weight ({100 * (sizes['packed_vs_ideal'] - 1):+.3f}% vs "
              f"the ideal 2 bits: {int(sizes['ideal_2bit_bytes']):,} bytes)")
    whole = (f"whole checkpoint: {sizes['checkpoint_bytes'] / gib:.4f} GiB on disk vs "
             f"{sizes['teacher_bf16_bytes'] / gib:.4f} GiB for the teacher in bf16 "
             f"({100 * sizes['checkpoint_vs_teacher_bf16']:.1f}%)")
    return f"{packed}\n{whole}"


def convert_checkpoint(checkpoint: str | Path, output: str | Path, cfg: ExportConfig | None = None, *,
                       base: str | Path | None = None, verify: bool = False, verify_config=None) -> ExportResult:
    """The whole tool: locate the checkpoint, check the base, export, optionally verify, write the model card."""
    from megadistil.export.card import run_metrics, write_card
    from megadistil.export.verify import verify_export

    cfg = cfg or ExportConfig()
    cfg.validate()
    ckpt = locate_checkpoint(checkpoint)
    base_model = BaseModel(base or ckpt.config.model.student)
    check_fingerprint(ckpt, base_model)
    parts = StudentParts.from_checkpoint(ckpt)
    spec = student_spec(parts, ckpt.config, training_dtype(ckpt))
    tokenizer_dir = Path(ckpt.config.model.tokenizer or base_model.path)
    if ckpt.config.model.tokenizer and not tokenizer_dir.is_dir():
        tokenizer_dir = base_model.path

    def finish(staging: Path, result: ExportResult) -> None:
        if verify:
            result.verify = verify_export(staging, base_model, parts, spec, ckpt.config, cfg.dtype, tokenizer_dir,
                                          verify_config)
        write_card(staging, run_config=ckpt.config, meta=ckpt.meta,
                   metrics=run_metrics(ckpt.run_dir, int(ckpt.meta.get("step", 0))), sizes=result.sizes,
                   export_config=result.config, base_path=base_model.path, warnings=result.warnings,
                   verify=result.verify)

    return export_student(base_model, parts, spec, output, cfg, tokenizer_dir=tokenizer_dir, finish=finish)
