"""The run directory and checkpoint layout: every name megadistil gives a file under train.output_dir, and the
readers that the engine (resume) and the exporter (convert, --verify, evaluating a student) share.

    <run>/                                  train.output_dir
      config.yaml                           the resolved run config
      run.json                              git SHA, world size, placement, resolved ds_config
      metrics.jsonl                         one JSON record per logged step or evaluation
      checkpoints/
        latest                              the newest complete tag; replaced atomically, last
        step00000012/                       one tag per saved step
          *_model_states.pt, *_optim_states.pt
                                            DeepSpeed's, one per rank, saved with exclude_frozen_parameters: the
                                            trainable parameters (LoRA, SubLN) and their optimizer states only (the
                                            frozen W is already on disk in the base model and is never copied)
          delta.json                        ΔW index: the world size that saved it, each tensor's shape and dtype
          delta.rank<r>.safetensors         rank r's flat ZeRO-3 partition of every ΔW (frozen, but trained through
                                            ReLoRA merges); the full tensor is cat(parts)[:numel].view(shape)
          rank<r>.json                      rank r's data-stream and RNG state
          config.yaml                       the resolved run config
          meta.json                         step, counters, world size, base-model fingerprint; written once every
                                            rank has finished its files

A crash at any point leaves the previous `latest` intact. Files are read with safetensors or with
torch.load(weights_only=True) (`weights_only_torch_load`): nothing in a checkpoint can run code. Nothing here
imports the engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megadistil.utils import dtype_name, read_safetensors, torch_dtype, write_atomic

CONFIG = "config.yaml"
RUN_INFO = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
DELTA_INDEX = "delta.json"
ZERO_OPTIM_STATES = "*_optim_states.pt"  # DeepSpeed names one per rank; every ZeRO checkpoint has them


class CheckpointError(ValueError):
    """A path that is not a (complete) megadistil checkpoint, or a damaged one; the message names the file."""


# ---------------------------------------------------------------- names


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_state_file(rank: int) -> str:
    return f"rank{rank}.json"


def delta_file(rank: int) -> str:
    return f"delta.rank{rank}.safetensors"


def run_dir_of(ckpt_root: Path) -> Path | None:
    """The run dir holding a checkpoints root; None when the root was copied out of it."""
    return ckpt_root.parent if (ckpt_root.parent / CONFIG).is_file() else None


# ---------------------------------------------------------------- the `latest` pointer


def write_latest(ckpt_root: Path, tag: str) -> None:
    """Publish `tag`: called last, once every file of the checkpoint is on disk."""
    write_atomic(ckpt_root / LATEST, tag)


def withdraw_latest(ckpt_root: Path) -> str | None:
    """Remove the `latest` pointer (a run that starts over must not be resumed, or exported, as the earlier one it
    replaces); the tag it named, or None. The checkpoints themselves stay until a save of the same tag replaces them."""
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    pointer.unlink()
    return tag


def latest_tag(ckpt_root: Path) -> str | None:
    """The tag `latest` names; None before the first save. A pointer to a tag without meta.json is an error."""
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (ckpt_root / tag / META).is_file():
        raise RuntimeError(f"checkpoint pointer {pointer} names {tag!r}, which is incomplete (no meta.json)")
    return tag


def is_checkpoint(path: Path) -> bool:
    """Whether `path` looks like a run dir, a checkpoints root or one checkpoint (see `find_checkpoint`)."""
    return any((path / f).is_file() for f in (f"{CHECKPOINTS}/{LATEST}", LATEST, META))


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint dir named by a run dir (its `checkpoints/latest`), a checkpoints root (its `latest`) or one
    checkpoint dir, checked to be complete."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if (path / CHECKPOINTS / LATEST).is_file():
        ckpt = path / CHECKPOINTS / (path / CHECKPOINTS / LATEST).read_text().strip()
    elif (path / LATEST).is_file():
        ckpt = path / (path / LATEST).read_text().strip()
    elif (path / META).is_file():
        ckpt = path
    else:
        raise CheckpointError(f"{path} is not a megadistil checkpoint: no {CHECKPOINTS}/{LATEST}, {LATEST} or {META} "
                              f"in it (pass a run dir, its {CHECKPOINTS}/ dir or one {CHECKPOINTS}/<tag>/ dir)")
    for required in (META, CONFIG):
        if not (ckpt / required).is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete or not a megadistil checkpoint: no {required}")
    if not list(ckpt.glob(ZERO_OPTIM_STATES)):
        raise CheckpointError(f"checkpoint {ckpt} holds no DeepSpeed ZeRO files ({ZERO_OPTIM_STATES})")
    return ckpt


def read_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / META).read_text())


# ---------------------------------------------------------------- ΔW partitions


def write_delta_index(directory: Path, world_size: int,
                      tensors: dict[str, tuple[list[int], torch.dtype, int]]) -> None:
    """delta.json: for each ΔW name, (full shape, dtype, numel of one rank's partition)."""
    index = {name: {"shape": list(shape), "dtype": dtype_name(dtype), "partition_numel": numel}
             for name, (shape, dtype, numel) in tensors.items()}
    write_atomic(directory / DELTA_INDEX, json.dumps({"world_size": world_size, "tensors": index}))


def read_delta_index(directory: Path) -> dict[str, Any] | None:
    """delta.json of a checkpoint dir; None when the run had no ΔW."""
    path = directory / DELTA_INDEX
    return json.loads(path.read_text()) if path.is_file() else None


def delta_files(directory: Path, index: dict[str, Any]) -> list[Path]:
    """Every rank's partition file, in rank order; all must be there."""
    files = [directory / delta_file(r) for r in range(index["world_size"])]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"checkpoint {directory}: {DELTA_INDEX} names world size {index['world_size']} "
                                  f"but {f.name} is missing")
    return files


def delta_dtype(index: dict[str, Any]) -> torch.dtype | None:
    """The dtype every ΔW was saved in (an int8 ΔW's: its scales'), None if they differ (or there are none)."""
    dtypes = {t["dtype"] for t in index["tensors"].values()} - {"int8"}
    return torch_dtype(dtypes.pop()) if len(dtypes) == 1 else None


def read_delta(directory: Path, name: str, index: dict[str, Any] | None = None) -> torch.Tensor:
    """One full ΔW from the per-rank partitions, whatever world size saved it: cat(partition_r for r)[:numel],
    copied part by part into one buffer (no second full-size copy)."""
    index = index or read_delta_index(directory)
    if index is None or name not in index["tensors"]:
        raise CheckpointError(f"checkpoint {directory}: no ΔW {name!r} in {DELTA_INDEX}")
    info = index["tensors"][name]
    shape = tuple(info["shape"])
    numel = int(torch.Size(shape).numel())
    out = torch.empty(numel, dtype=torch_dtype(info["dtype"]))
    offset = 0
    for file in delta_files(directory, index):
        if offset >= numel:
            break
        part = _partition(file, name)
        take = min(part.numel(), numel - offset)
        out[offset:offset + take].copy_(part[:take])
        offset += take
    if offset != numel:
        raise CheckpointError(f"ΔW {name!r}: partitions hold {offset} values, its shape {list(shape)} needs {numel}")
    return out.view(shape)


def _partition(file: Path, name: str) -> torch.Tensor:
    with read_safetensors(file) as f:
        if name not in f.keys():  # noqa: SIM118 - safe_open is not a dict
            raise CheckpointError(f"{file}: no partition of {name!r}")
        return f.get_tensor(name).reshape(-1)


# ---------------------------------------------------------------- DeepSpeed's files


def _deepspeed_safe_globals() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """DeepSpeed reads its checkpoint files with torch.load(weights_only=False); inside this context every such load
    is weights_only=True, with the few plain DeepSpeed types that its optimizer files hold allow-listed (an enum and
    the loss-scaler records), so a crafted file cannot run code."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        torch.load = original


def read_trainable(ckpt: Path) -> dict[str, Any]:
    """The trainable parameters (fp32 masters) of a checkpoint saved by any world size, through DeepSpeed's own
    consolidation in lazy mode: the ZeRO files are mmapped and a parameter is gathered from every rank's flat
    partition only when asked for. Values are tensors or lazy handles with .contiguous() and .shape."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # its progress prints would interleave with ours
    with contextlib.redirect_stdout(io.StringIO()), weights_only_torch_load():
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name,
                                                        exclude_frozen_parameters=True, lazy_mode=True)


# ---------------------------------------------------------------- the base model a run trained from


FINGERPRINT_SAMPLES, FINGERPRINT_BLOCK = 64, 4096


def model_dir_fingerprint(path: str | Path) -> str:
    """"v2:" + sha256 over config.json, the safetensors headers (names, dtypes, shapes, offsets) and 64 blocks of
    4 KiB spread evenly over each file's tensor data: cheap (a few MB read for a 70B model), and it changes when the
    weights do, not only their layout. Recorded in meta.json as base_fingerprint, so that a checkpoint is resumed and
    converted against the base it trained on (fingerprint_matches)."""
    return "v2:" + _fingerprint(Path(path), samples=True)


def fingerprint_matches(path: str | Path, recorded: str) -> bool:
    """Whether the model at `path` has the recorded fingerprint; one without the v2 prefix (written before the
    samples were added) is compared over config.json and the headers alone."""
    if recorded.startswith("v2:"):
        return model_dir_fingerprint(path) == recorded
    return _fingerprint(Path(path), samples=False) == recorded


def _fingerprint(path: Path, *, samples: bool) -> str:
    h = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            h.update(f.read(size))
            data, end = 8 + size, file.stat().st_size
            for i in range(FINGERPRINT_SAMPLES if samples and end > data else 0):
                f.seek(data + (end - data) * i // FINGERPRINT_SAMPLES)
                h.update(f.read(FINGERPRINT_BLOCK))
    return h.hexdigest()
