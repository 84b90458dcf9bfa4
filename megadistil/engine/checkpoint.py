"""Checkpoints: DeepSpeed's sharded model/optimizer states plus megadistil's own state as JSON.

Layout: <run>/checkpoints/<tag>/ holds DeepSpeed's files, `rank<r>.json` (that rank's data-stream and RNG state)
and `meta.json` (step, ReLoRA and NaN counters) written after every rank finished; `<run>/checkpoints/latest` names
the newest complete tag and is replaced atomically, last. A crash at any point leaves the previous `latest` intact.
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

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


def save(engine, ckpt_root: Path, step: int, *, rank_state: dict[str, Any], meta: dict[str, Any]) -> str:
    """Collective. Returns the tag."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_root), tag=tag, save_latest=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    write_atomic(ckpt_root / tag / f"rank{rank}.json", json.dumps({**rank_state, "rng": rng_state()}))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        write_atomic(ckpt_root / tag / "meta.json", json.dumps({**meta, "step": step, "tag": tag}))
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
    path, _ = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_root / tag}")
    rank_file = ckpt_root / tag / f"rank{rank}.json"
    if not rank_file.is_file():
        raise RuntimeError(f"checkpoint {ckpt_root / tag} has no {rank_file.name}: "
                           "it was saved by a different world size (exact resume needs the same one)")
    state = json.loads(rank_file.read_text())
    set_rng_state(state.pop("rng"))
    return json.loads((ckpt_root / tag / "meta.json").read_text()), state
