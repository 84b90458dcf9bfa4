"""One metric logger: a line per step on stdout and in metrics.jsonl, and wandb when enabled; no-op off rank 0."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from megadistil.config import LogConfig
from megadistil.rundir import METRICS


def peak_memory_mb() -> float:
    """Peak device memory on CUDA, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LogConfig, *, rank: int, run_config: dict[str, Any]) -> None:
        self.enabled = rank == 0
        self.path = run_dir / METRICS
        self.wandb = None
        if self.enabled and cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(run_dir))
            self.wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode,
                                    config=run_config, dir=str(run_dir), resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(" | ".join(_fmt(k, v) for k, v in record.items()), file=sys.stdout, flush=True)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(key: str, value: Any) -> str:
    return f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
