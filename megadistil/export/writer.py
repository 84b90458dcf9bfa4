"""Writing the output: safetensors shards streamed tensor by tensor (a shard never sits in memory whole), and the
output directory staged next to its destination and renamed into place in one step."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megadistil.export.sources import ExportError, tensor_nbytes
from megadistil.utils import safetensors_code


@dataclass
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]
    ternary_values: int = 0  # how many ternary weights it packs (for the size report)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


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
            header[t.name] = {"dtype": safetensors_code(t.dtype), "shape": list(t.shape),
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


def check_output(output: Path, overwrite: bool, inputs: list[tuple[str, Path | None, bool]]) -> None:
    """Refuse an output that would destroy what it is made from or what is not an export, before any heavy work:
    one that is or holds an input, or sits inside one (`inputs`: (what names it, its path, whether an output may
    sit inside it)); an existing file where a directory goes (or the reverse); a non-empty output without
    --overwrite, or, with it, one that is not an export of this kind (an HF dir with a bitnet quantization_config;
    a GGUF file)."""
    output = output.resolve()
    for what, path, inside_ok in inputs:
        if path is None:
            continue
        path = path.resolve()
        if output == path or output in path.parents or (not inside_ok and path in output.parents):
            raise ExportError(f"--output {output} overlaps {what} {path}: the export would replace what it is made "
                              "from")
    gguf = output.suffix == ".gguf"
    if gguf and output.is_dir() or not gguf and output.exists() and not output.is_dir():
        raise ExportError(f"output {output} exists and is a {'directory' if output.is_dir() else 'file'}")
    if not output.exists() or (output.is_dir() and not any(output.iterdir())) or (gguf and not output.stat().st_size):
        return
    if not overwrite:
        raise ExportError(f"output {output} exists and is not empty; pass --overwrite to replace it")
    if not (_is_gguf(output) if gguf else _is_hf_export(output)):
        missing = "no GGUF header" if gguf else "no config.json with a bitnet quantization_config"
        raise ExportError(f"output {output} is not a megadistil export ({missing}): --overwrite replaces exports only")


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def _is_hf_export(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("quantization_config") or {}).get("quant_method") == "bitnet"


def published_path(output: Path, verify: dict[str, Any] | None) -> Path:
    """Where a finished export takes its place: `output`, or beside it as <output>.verify-failed where its
    verification failed (the output then keeps what it held)."""
    return output if verify is None or verify["passed"] else output.with_name(output.name + ".verify-failed")


def publish(staging: Path, target: Path) -> None:
    """Rename the staged file or directory to `target` in one step, replacing what was there."""
    trash = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, trash)
    os.replace(staging, target)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """Yields a temp dir next to `output` (checked first by check_output); the caller publishes it. An interruption
    leaves only a dot-named `.partial` dir, never something that looks like a finished checkpoint."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
