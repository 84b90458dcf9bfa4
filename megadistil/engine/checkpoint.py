"""Checkpoints: DeepSpeed's sharded model/optimizer states plus megadistil's own state as JSON.

Layout of <run>/checkpoints/<tag>/:
  DeepSpeed's files, saved with exclude_frozen_parameters: the trainable parameters (LoRA, SubLN) and their
    optimizer states only. The teacher's W is frozen and already on disk in the base model; it is never copied.
  delta.json + delta.rank<r>.safetensors: ΔW (frozen, but trained through ReLoRA merges), each rank writing its own
    ZeRO-3 partition, flat, so saving needs no gather; the full tensor is cat(parts)[:numel].view(shape).
  rank<r>.json: that rank's data-stream and RNG state.  config.yaml: the resolved run config.
  meta.json: step, counters, world size, base-model fingerprint; written after every rank finished.
<run>/checkpoints/latest names the newest complete tag and is replaced atomically, last: a crash at any point
leaves the previous `latest` intact.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from megadistil.engine.safe_load import weights_only_torch_load

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": base64.b64encode(json.dumps(random.getstate()).encode()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = json.loads(base64.b64decode(state["python"]))
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    for i, s in enumerate(state.get("cuda", [])):
        torch.cuda.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy()), i)


def model_dir_fingerprint(path: str | Path) -> str:
    """sha256 over config.json and the safetensors headers (names, dtypes, shapes, offsets): cheap, and it changes
    when the weights' layout does. Used to check that a checkpoint is converted against the base it trained on."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            h.update(f.read(size))
    return h.hexdigest()


def _deltas(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if n.endswith(".delta")]


def _local_partition(param: nn.Parameter) -> torch.Tensor:
    return (param.ds_tensor if hasattr(param, "ds_tensor") else param).detach().reshape(-1).contiguous()


def save_deltas(model: nn.Module, directory: Path, rank: int, world_size: int) -> None:
    deltas = _deltas(model)
    if not deltas:
        return
    zero3 = hasattr(deltas[0][1], "ds_tensor")
    if zero3 or rank == 0:
        save_file({n: _local_partition(p) for n, p in deltas}, str(directory / f"delta.rank{rank}.safetensors"))
    if rank == 0:
        tensors = {n: {"shape": list(getattr(p, "ds_shape", p.shape)), "dtype": str(p.dtype).removeprefix("torch."),
                       "partition_numel": _local_partition(p).numel()} for n, p in deltas}
        write_atomic(directory / "delta.json", json.dumps({"world_size": world_size if zero3 else 1,
                                                           "tensors": tensors}))


def read_delta(directory: Path, name: str) -> torch.Tensor:
    """One full ΔW from the per-rank partitions, whatever world size saved it."""
    index = json.loads((directory / "delta.json").read_text())
    info = index["tensors"][name]
    parts = []
    for r in range(index["world_size"]):
        with safe_open(str(directory / f"delta.rank{r}.safetensors"), "pt") as f:
            parts.append(f.get_tensor(name))
    numel = int(np.prod(info["shape"]))
    return torch.cat(parts)[:numel].view(info["shape"])


@torch.no_grad()
def load_deltas(model: nn.Module, directory: Path, rank: int, world_size: int) -> None:
    for name, param in _deltas(model):
        full = read_delta(directory, name).reshape(-1)
        local = _local_partition(param)
        if hasattr(param, "ds_tensor"):
            start = rank * local.numel()
            piece = full[start:start + local.numel()]
            param.ds_tensor.view(-1)[: piece.numel()].copy_(piece)
        else:
            param.copy_(full.view_as(param))


def save(engine, ckpt_root: Path, step: int, *, rank_state: dict[str, Any], meta: dict[str, Any],
         config_yaml: str) -> str:
    """Collective. Returns the tag."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_root), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    save_deltas(engine.module, ckpt_root / tag, rank, world)
    write_atomic(ckpt_root / tag / f"rank{rank}.json", json.dumps({**rank_state, "rng": rng_state()}))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        (ckpt_root / tag / "config.yaml").write_text(config_yaml)
        write_atomic(ckpt_root / tag / "meta.json",
                     json.dumps({**meta, "step": step, "tag": tag, "world_size": world}))
        write_atomic(ckpt_root / LATEST, tag)
    if dist.is_initialized():
        dist.barrier()
    return tag


def latest_tag(ckpt_root: Path) -> str | None:
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (ckpt_root / tag / "meta.json").is_file():
        raise RuntimeError(f"checkpoint pointer {pointer} names {tag!r}, which is incomplete (no meta.json)")
    return tag


def load(engine, ckpt_root: Path, tag: str, *, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective. Restores the engine (model + optimizer) and RNG; returns (meta, this rank's state)."""
    with weights_only_torch_load():
        path, _ = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=False, load_module_strict=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_root / tag}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if (ckpt_root / tag / "delta.json").is_file():
        load_deltas(engine.module, ckpt_root / tag, rank, world)
    rank_file = ckpt_root / tag / f"rank{rank}.json"
    if not rank_file.is_file():
        raise RuntimeError(f"checkpoint {ckpt_root / tag} has no {rank_file.name}: "
                           "it was saved by a different world size (exact resume needs the same one)")
    state = json.loads(rank_file.read_text())
    set_rng_state(state.pop("rng"))
    return json.loads((ckpt_root / tag / "meta.json").read_text()), state
