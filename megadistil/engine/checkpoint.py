"""Saving and restoring a training run on its DeepSpeed engine: DeepSpeed's sharded model/optimizer states, each
rank's ZeRO-3 partition of ΔW (no gather), each rank's data-stream and RNG state, then meta.json and, last, the
`latest` pointer. Where each file goes, and the readers the exporter shares, are megadistil.rundir's.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from megadistil import rundir
from megadistil.rundir import latest_tag, model_dir_fingerprint
from megadistil.utils import dtype_name, fsync_path, fsync_tree, full_shape, torch_dtype, write_atomic

# latest_tag and model_dir_fingerprint are re-exported: with save and load they are the trainer's checkpoint API.
__all__ = ["latest_tag", "load", "load_deltas", "model_dir_fingerprint", "prune_tags", "rank_state", "rng_state",
           "save", "save_deltas", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": base64.b64encode(json.dumps(random.getstate()).encode()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        # this rank's GPU only: a resume may see fewer GPUs per process (srun --gpus-per-task=1); none where the rank
        # computes on the CPU (DS_ACCELERATOR=cpu on a GPU node: get_rng_state would start CUDA there)
        "cuda": [base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()]
        if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = json.loads(base64.b64decode(state["python"]))
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    for s in state.get("cuda", [])[:1] if torch.cuda.is_initialized() else []:
        torch.cuda.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy()))


def _deltas(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if n.endswith((".delta", ".delta_scale"))]


def _local_partition(param: nn.Parameter) -> torch.Tensor:
    return (param.ds_tensor if hasattr(param, "ds_tensor") else param).detach().reshape(-1).contiguous()


def save_deltas(model: nn.Module, directory: Path, rank: int, world_size: int) -> None:
    deltas = _deltas(model)
    if not deltas:
        return
    zero3 = hasattr(deltas[0][1], "ds_tensor")
    if zero3 or rank == 0:
        save_file({n: _local_partition(p) for n, p in deltas}, str(directory / rundir.delta_file(rank)))
    if rank == 0:
        rundir.write_delta_index(directory, world_size if zero3 else 1, {
            n: (list(full_shape(p)), p.dtype, _local_partition(p).numel()) for n, p in deltas})


@torch.no_grad()
def load_deltas(model: nn.Module, directory: Path, rank: int, world_size: int) -> None:
    index = rundir.read_delta_index(directory)
    for name, param in _deltas(model):
        saved = (index or {}).get("tensors", {}).get(name, {}).get("dtype")
        if saved is not None and torch_dtype(saved) != param.dtype:
            raise rundir.CheckpointError(
                f"checkpoint {directory}: ΔW {name!r} was saved as {saved}, this run stores it as "
                f"{dtype_name(param.dtype)} (config key 'relora.delta_format': resume with the run's own value)")
        full = rundir.read_delta(directory, name, index).reshape(-1)
        local = _local_partition(param)
        if hasattr(param, "ds_tensor"):
            start = rank * local.numel()
            piece = full[start:start + local.numel()]
            param.ds_tensor.view(-1)[: piece.numel()].copy_(piece)
        if param.data.numel() == full.numel():  # unpartitioned, or a ZeRO-3 persistent (small) tensor kept whole:
            param.data.copy_(full.view_as(param.data))  # its whole copy is what a forward outside the engine reads


STAGING = ".partial"  # a checkpoint being written: `<tag>.partial`, renamed to `<tag>` once complete
REPLACED = ".replaced"  # an earlier checkpoint of the same tag (another run in this output dir), deleted after
PRUNED = ".pruned"  # a checkpoint beyond train.keep_last: renamed away from its tag first, then deleted
_TAG = re.compile(r"step(\d{8,})")  # rundir.tag_for's names
_STALE = re.compile(r"step\d{8,}(" + "|".join(re.escape(s) for s in (STAGING, REPLACED, PRUNED)) + ")")


def save(engine, ckpt_root: Path, step: int, *, rank_state: dict[str, Any], meta: dict[str, Any],
         config_yaml: str, sync_files: bool, keep_last: int = 0) -> str:
    """Collective. Returns the tag. Every rank writes into a fresh staging dir; the ranks given `sync_files` (one a
    node) fsync it; rank 0 then renames it to the tag and publishes it as `latest`. A power loss cannot leave
    `latest` naming files still in a page cache, and a checkpoint of the same tag that another run left in this
    output dir (train.resume=never) is replaced whole, never mixed with this one's files. Once `latest` is published,
    rank 0 prunes older tags beyond `keep_last` (train.keep_last) and sweeps crashed saves' staging dirs
    (prune_tags)."""
    tag = rundir.tag_for(step)
    staging, final = ckpt_root / (tag + STAGING), ckpt_root / tag
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # a save that crashed halfway
    _barrier()
    engine.save_checkpoint(str(ckpt_root), tag=staging.name, save_latest=False, exclude_frozen_parameters=True)
    save_deltas(engine.module, staging, rank, world)
    write_atomic(staging / rundir.rank_state_file(rank), json.dumps({**rank_state, "rng": rng_state()}))
    _barrier()
    if rank == 0:
        write_atomic(staging / rundir.CONFIG, config_yaml)
        write_atomic(staging / rundir.META, json.dumps({**meta, "step": step, "tag": tag, "world_size": world}))
    if sync_files:
        fsync_tree(staging)
    _barrier()
    if rank == 0:
        replaced = ckpt_root / (tag + REPLACED)
        if final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)
        staging.rename(final)
        fsync_path(ckpt_root)
        rundir.write_latest(ckpt_root, tag)
        shutil.rmtree(replaced, ignore_errors=True)
        try:
            prune_tags(ckpt_root, keep_last)
        except OSError as e:  # the checkpoint is published: a deletion that fails must not stop the run
            warnings.warn(f"checkpoints in {ckpt_root} not pruned (train.keep_last={keep_last}): {e}", stacklevel=2)
    _barrier()
    return tag


def prune_tags(ckpt_root: Path, keep_last: int) -> list[str]:
    """Keeps the newest `keep_last` tags (0: all) up to the one `latest` names, which is always kept; returns the
    tags deleted. Tags of later steps than `latest`'s (left by an earlier run in this output dir, train.resume=never)
    are not this run's: they stay until a save of their step replaces them. Only names this module writes are
    touched (step<8+ digits>, and <tag>.partial / .replaced / .pruned, which are swept whatever keep_last: no resume
    or export reads them, and a save in progress has renamed its own before this runs). A pruned tag is renamed to
    <tag>.pruned before it is deleted: a deletion cut short never leaves a tag-named, half-deleted checkpoint, and the
    next save sweeps what is left of it."""
    latest = latest_tag(ckpt_root)
    deleted: list[str] = []
    if keep_last > 0 and latest is not None and _step_of(latest) is not None:
        ours = sorted((step, path) for path in ckpt_root.iterdir() if path.is_dir() and not path.is_symlink()
                      and (step := _step_of(path.name)) is not None and step <= _step_of(latest))
        for _, path in ours[:-keep_last]:
            if path.name != latest:
                gone = path.with_name(path.name + PRUNED)
                shutil.rmtree(gone, ignore_errors=True)  # an earlier deletion of this name cut short
                path.rename(gone)
                deleted.append(path.name)
        if deleted:
            fsync_path(ckpt_root)  # the renames reach the disk before the files go
    for path in sorted(ckpt_root.iterdir()):
        if _STALE.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    return deleted


def _step_of(name: str) -> int | None:
    """The step of a tag this module names (rundir.tag_for), else None."""
    m = _TAG.fullmatch(name)
    return int(m.group(1)) if m and rundir.tag_for(int(m.group(1))) == name else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def load(engine, ckpt_root: Path, tag: str, *, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective. Restores the engine (model + optimizer) and RNG; returns (meta, this rank's state)."""
    with rundir.weights_only_torch_load():
        path, _ = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=False, load_module_strict=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_root / tag}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if (ckpt_root / tag / rundir.DELTA_INDEX).is_file():
        load_deltas(engine.module, ckpt_root / tag, rank, world)
    state = rank_state(ckpt_root, tag, rank)
    set_rng_state(state.pop("rng"))
    return rundir.read_meta(ckpt_root / tag), state


def rank_state(ckpt_root: Path, tag: str, rank: int) -> dict[str, Any]:
    """This rank's state in a checkpoint (its data position, RNG), read without loading any weights."""
    rank_file = ckpt_root / tag / rundir.rank_state_file(rank)
    if not rank_file.is_file():
        raise ValueError(f"it has no {rank_file.name}: it was saved by a different world size (exact resume needs "
                         "the same one)")
    return json.loads(rank_file.read_text())
