"""Helpers every package of megadistil shares: the atomic file writer, the one dtype table, and provenance.

It imports none of megadistil's packages, so that any of them (bitnet's math included) can use it without depending
on the engine, the data pipeline or the exporter.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megadistil import __version__

# ---------------------------------------------------------------- files


def require(ok: object, key: str, why: str, error: type[ValueError] = ValueError) -> None:
    """Unless `ok`, error("config key '<key>': <why>"): the one form a bad setting is named in, by every config
    section (ValueError, which config.load_config passes on as a ConfigError) and by the run's own checks."""
    if not ok:
        raise error(f"config key {key!r}: {why}")


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's shape, ZeRO-3's partitioned ones included (those are 1-D and empty; DeepSpeed keeps the shape in
    ds_shape)."""
    return getattr(param, "ds_shape", param.shape)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part: a dot-named
    temp file in the same directory (same filesystem, so the rename is atomic), fsynced, then renamed over `path`.
    The pid in the temp name keeps concurrent writers (one per rank) from sharing a temp file. The directory is
    fsynced last, so the rename survives a power loss too."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


@contextlib.contextmanager
def read_safetensors(path: str | os.PathLike) -> Iterator[Any]:
    """safetensors' safe_open, where a corrupt or truncated file (at open or at a read) is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's (its entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under `root`, then each directory (deepest first): what another library wrote there is on
    the disk before a pointer to it is published."""
    for here, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(here, name))
        fsync_path(here)


# ---------------------------------------------------------------- dtypes


@dataclass(frozen=True)
class DType:
    """One dtype under each of its names: the short one of megadistil's configs and CLIs (None where none is
    offered), torch's, the long one that torch attributes, HF's config.json and checkpoint indexes use, and the
    safetensors header code."""

    short: str | None
    torch: torch.dtype
    name: str
    safetensors: str


DTYPES = (
    DType("bf16", torch.bfloat16, "bfloat16", "BF16"),
    DType("fp16", torch.float16, "float16", "F16"),
    DType("fp32", torch.float32, "float32", "F32"),
    DType(None, torch.float64, "float64", "F64"),
    DType(None, torch.uint8, "uint8", "U8"),
    DType(None, torch.int8, "int8", "I8"),
    DType(None, torch.int32, "int32", "I32"),
    DType(None, torch.int64, "int64", "I64"),
    DType(None, torch.bool, "bool", "BOOL"),
)


def _by_torch(dtype: torch.dtype) -> DType:
    for d in DTYPES:
        if d.torch == dtype:
            return d
    raise ValueError(f"unknown torch dtype {dtype!r}")


def dtype_spellings(*dtypes: torch.dtype) -> tuple[str, ...]:
    """Both names megadistil takes for each of `dtypes` (bf16 and bfloat16, ...): a --dtype's choices, the same in
    every tool."""
    return tuple(n for d in DTYPES if d.torch in dtypes for n in (d.short, d.name) if n)


def torch_dtype(name: str) -> torch.dtype:
    """'bf16' or 'bfloat16' (either name megadistil takes) -> torch.bfloat16. Callers check the names they offer."""
    for d in DTYPES:
        if name in (d.short, d.name):
            return d.torch
    raise ValueError(f"unknown dtype {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16': the name in HF config.json, run.json and checkpoint indexes."""
    return _by_torch(dtype).name


def short_dtype_name(name: str) -> str | None:
    """'float32' or 'fp32' -> 'fp32': the name megadistil's configs and CLIs use (None where they offer none)."""
    return _by_torch(torch_dtype(name)).short


def safetensors_code(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'BF16', as a safetensors header writes it."""
    return _by_torch(dtype).safetensors


def from_safetensors_code(code: str) -> torch.dtype:
    """'BF16' -> torch.bfloat16."""
    for d in DTYPES:
        if d.safetensors == code:
            return d.torch
    raise ValueError(f"unknown safetensors dtype {code!r}")


# ---------------------------------------------------------------- provenance


def git_sha() -> str | None:
    """The git commit of megadistil's source; None outside a checkout or without git."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    """megadistil's version and the git commit of its source (None outside a checkout)."""
    return {"version": __version__, "git_commit": git_sha()}


def exit_without_teardown(code: int) -> None:
    """End the process now with `code`, after flushing the log handlers and stdio, skipping the interpreter's
    teardown. Two reasons: the teardown's GC walks the whole torch/transformers/DeepSpeed object graph (3-4 s per
    rank on a 2-core CPU) for nothing (files are closed, the process group destroyed); and destroying gloo's or
    DeepSpeed's C++ objects at exit now and then finds a worker thread still joinable and aborts ("terminate called
    without an active exception", exit -6: seen once in a `make test` here, a finished demo student's rank 1)."""
    import logging
    import os
    import sys

    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")  # mpirun counts a rank that skips MPI_Finalize as failed
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
