"""Nothing unpickles: DeepSpeed reads its checkpoint files with torch's loader and weights_only=False; inside
`weights_only_torch_load()` every such load is weights_only=True, with the few plain DeepSpeed types that its
optimizer files hold allow-listed (an enum and the loss-scaler records), so a crafted file cannot run code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _deepspeed_safe_globals() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
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
