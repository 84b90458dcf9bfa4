"""Where a rank computes, decided once at setup: the engine's device, its intra-op threads, BitLinear's kernel and
the model dtype. Printed as the run's first log line and recorded in run.json."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megadistil.bitnet import Hardware, Kernel, hardware, resolve_dtype, resolve_kernel
from megadistil.distributed import cpu_threads
from megadistil.utils import dtype_name


@dataclass(frozen=True)
class Placement:
    device: torch.device
    hardware: Hardware
    kernel: Kernel
    dtype: torch.dtype
    threads: int  # intra-op threads of this rank (CPU)

    def describe(self) -> str:
        return (f"device {self.device}: {self.hardware.describe()}; BitLinear kernel {self.kernel.value}, "
                f"dtype {dtype_name(self.dtype)}, {self.threads} intra-op threads")

    def as_dict(self) -> dict:
        return {"device": str(self.device), "hardware": self.hardware.as_dict(), "kernel": self.kernel.value,
                "dtype": dtype_name(self.dtype), "threads": self.threads}


def engine_device() -> torch.device:
    """DeepSpeed's accelerator device for this rank (cuda:<local rank> on GPUs, cpu otherwise)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def place(kernel: str, dtype: str, *, local_world_size: int, device: torch.device | None = None) -> Placement:
    """Set this rank's threads (CPU), then measure the device and resolve `bitnet.kernel` and `model.dtype`.

    The threads are set first because the measurement must see the thread count the run will have. An explicit
    kernel the device lacks raises ValueError naming bitnet.kernel and the device.
    """
    device = device or engine_device()
    if device.type == "cpu":
        threads = cpu_threads(local_world_size)
        if threads is not None:
            torch.set_num_threads(threads)
    hw = hardware(device)
    return Placement(device, hw, resolve_kernel(kernel, hw), resolve_dtype(dtype, hw), torch.get_num_threads())
