"""The run's metrics: one logger (a line per step on stdout and in metrics.jsonl, wandb when enabled; no-op off rank
0), peak memory, and a step's on-policy figures."""

from __future__ import annotations

import json
import os
import resource
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megadistil.config import LogConfig
from megadistil.distributed import return_freed_heap
from megadistil.rundir import METRICS


class PeakMemory:
    """This process's peak memory over its lifetime and over the training steps alone (`start_steps()` marks the
    end of loading: model, optimizer, data, the step-0 evaluation). CUDA: the allocator's peak, reset with
    reset_peak_memory_stats. CPU: the kernel's RSS high-water mark (VmHWM), reset by writing 5 to
    /proc/self/clear_refs, which resets ru_maxrss as well: the load peak is read first and kept. Where the mark
    cannot be reset (not Linux), the steps' peak is the lifetime one."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"  # not torch.cuda.is_available(): a GPU node may train on its CPUs
        self._load_peak = 0.0

    def start_steps(self) -> None:
        self._load_peak = max(self._load_peak, self._high_water())  # a second call (a resumed loop) keeps the first
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        return_freed_heap()  # what loading freed but malloc kept would otherwise count as the steps' memory
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def lifetime_mb(self) -> float:
        return max(self._load_peak, self._high_water())

    def steps_mb(self) -> float:
        return self._high_water()

    def _high_water(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB; = VmHWM


WANDB_RUN_ID = "wandb_run_id"  # in the run dir: the wandb run a resumed run continues


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LogConfig, *, rank: int, run_config: dict[str, Any],
                 resumed: bool = False) -> None:
        """`resumed`: the run continues from a checkpoint, and its wandb run continues the one that wrote it (with
        resume="allow" and no id, every resume started a new wandb run); otherwise a new wandb run is made."""
        self.enabled = rank == 0
        self.path = run_dir / METRICS
        self.wandb = None
        if self.enabled and cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(run_dir))
            id_file = run_dir / WANDB_RUN_ID
            run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:16]
            id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode,
                                    config=run_config, dir=str(run_dir), id=run_id, resume="allow")

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


class OnPolicyStats:
    """A step's on-policy figures: generation time and tokens, and the KD and loss tokens of its on-policy
    micro-batches (rank-local; the KD stays on the device until the step is logged)."""

    def __init__(self) -> None:
        self.seconds, self.new_tokens, self.micro_batches = 0.0, 0, 0
        self.kd_sum: Tensor | float = 0.0
        self.loss_tokens: Tensor | int = 0

    def generated(self, new_tokens: int, seconds: float) -> None:
        self.new_tokens, self.seconds = self.new_tokens + new_tokens, self.seconds + seconds

    def trained(self, loss_tokens: Tensor, kd: Tensor) -> None:
        self.micro_batches += 1
        self.loss_tokens, self.kd_sum = self.loss_tokens + loss_tokens, self.kd_sum + kd * loss_tokens

    def as_tensor(self, device: torch.device) -> Tensor:
        """[loss tokens, new tokens], float64: the counts a sum over the ranks adds up."""
        return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                            for v in (self.loss_tokens, self.new_tokens)])

    def record(self, tokens: float, summed: Tensor | None = None) -> dict[str, float]:
        """onpolicy_share: the step's loss tokens that were on-policy; onpolicy_kd: their mean KD (the divergence
        onpolicy.kind; this rank's mean over its on-policy tokens, like the logged loss parts); gen_time_s and
        gen_tokens_per_s of the step's generation. `tokens` and `summed` (as_tensor's, summed over the ranks): every
        rank's; None: this rank's."""
        if not self.seconds:
            return {"onpolicy_share": 0.0}
        loss_tokens, new_tokens = (summed if summed is not None else self.as_tensor(torch.device("cpu"))).tolist()
        return {"onpolicy_share": loss_tokens / max(tokens, 1),
                **({"onpolicy_kd": float(self.kd_sum) / max(float(self.loss_tokens), 1)} if self.micro_batches else {}),
                "gen_time_s": self.seconds, "gen_tokens_per_s": new_tokens / self.seconds}
