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
