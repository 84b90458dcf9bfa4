"""Where a rank computes, decided once at setup: the engine's device, its intra-op threads, BitLinear's kernel and
the model dtype. Printed as the run's first log line and recorded in run.json."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from megadistil.bitnet import Hardware, Kernel, compile_by_default, hardware, resolve_dtype, resolve_kernel
from megadistil.distributed import set_rank_threads, set_up_cpu_rank
from megadistil.utils import dtype_name, torch_dtype


@dataclass(frozen=True)
class Placement:
    device: torch.device
    hardware: Hardware
    kernel: Kernel
    dtype: torch.dtype
    threads: int  # intra-op threads of this rank: its share of the node's cores, or OMP_NUM_THREADS
    freed_blocks_kept: bool = False  # glibc keeps freed blocks for reuse (CPU only: distributed.set_up_cpu_rank)
    quantizers_compiled: bool = False  # BitLinear's quantizers torch.compile'd (bitnet.compile_quantizers)

    def describe(self) -> str:
        return (f"device {self.device}: {self.hardware.describe()}; BitLinear kernel {self.kernel.value}, "
                f"quantizers {'compiled' if self.quantizers_compiled else 'eager'}, dtype {dtype_name(self.dtype)}, "
                f"{self.threads} intra-op threads"
                + (", malloc keeps freed blocks" if self.freed_blocks_kept else ""))

    def as_dict(self) -> dict:
        return {"device": str(self.device), "hardware": self.hardware.as_dict(), "kernel": self.kernel.value,
                "dtype": dtype_name(self.dtype), "threads": self.threads, "freed_blocks_kept": self.freed_blocks_kept,
                "quantizers_compiled": self.quantizers_compiled}


def engine_device() -> torch.device:
    """DeepSpeed's accelerator device for this rank (cuda:<local rank> on GPUs, cpu otherwise)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def place(kernel: str, dtype: str, *, local_world_size: int, compile_quantizers: bool | None = None,
          device: torch.device | None = None) -> Placement:
    """Set this rank's threads (and, on CPU, its allocator), then measure the device and resolve `bitnet.kernel`,
    `model.dtype` and `bitnet.compile_quantizers`.

    The threads are set first because the measurement must see the thread count the run will have. An explicit
    kernel the device lacks raises ValueError naming bitnet.kernel and the device.
    """
    device = device or engine_device()
    if device.type == "cpu":
        kept = set_up_cpu_rank(local_world_size)
    else:  # GPU ranks that no launcher bound (deepspeed --num_gpus) would each run DeepSpeedCPUAdam's offloaded step on
        # every core; malloc's tuning is for ZeRO-3 gathering layers into CPU memory, which a GPU rank does not do
        set_rank_threads(local_world_size)
        kept = False
    hw = hardware(device)
    return Placement(device, hw, resolve_kernel(kernel, hw), resolve_dtype(dtype, hw), torch.get_num_threads(), kept,
                     compile_by_default(compile_quantizers, device))


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def agreed(placement: Placement) -> Placement:
    """Rank 0's kernel and dtype on every rank. Each rank measures its own device, and a near tie under load can
    resolve differently on two ranks: a different dtype breaks ZeRO-3's collectives, a different kernel the bitwise
    agreement of the ranks. A rank that lacks rank 0's kernel raises ValueError naming it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return placement
    kernels = list(Kernel)
    choice = torch.tensor([kernels.index(placement.kernel), DTYPES.index(placement.dtype)], device=placement.device)
    dist.broadcast(choice, src=0)
    kernel, dtype = kernels[int(choice[0])], DTYPES[int(choice[1])]
    hw = placement.hardware
    if kernel is not Kernel.fp32 and kernel.value not in hw.units:
        raise ValueError(f"rank 0 chose the {kernel.value} kernel, which rank {dist.get_rank()}'s {hw.device} "
                         f"({hw.name}, {hw.capability}) lacks; set bitnet.kernel=fp32 on a mixed cluster")
    return replace(placement, kernel=kernel, dtype=dtype)


def as_resumed(placement: Placement, recorded: dict | None, *, kernel: str, dtype: str) -> Placement:
    """The placement of a run that resumes a checkpoint trained with `recorded` (its meta.json's kernel and dtype):
    what the config leaves `auto` is what the checkpoint had, so the resumed run computes as before. A new
    measurement under other load can pick otherwise, and DeepSpeed names its optimizer files by the dtype. An explicit
    model.dtype that differs raises ValueError; an explicit kernel is honoured, and so is `auto`'s choice where this
    device lacks the recorded kernel (results then differ in the last bits, nothing breaks)."""
    if not recorded:
        return placement
    was = torch_dtype(recorded["dtype"])
    if dtype == "auto":
        placement = replace(placement, dtype=was)
    elif placement.dtype != was:
        raise ValueError(f"{dtype} (model.dtype), but the checkpoint to resume was trained in {recorded['dtype']}; a "
                         f"resumed run keeps its dtype: set model.dtype=auto or {recorded['dtype']}")
    had = Kernel(recorded["kernel"])
    if kernel == "auto" and (had is Kernel.fp32 or had.value in placement.hardware.units):
        placement = replace(placement, kernel=had)
    return placement
