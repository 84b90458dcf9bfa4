"""Where a training step's time goes (log.profile_step): torch.profiler around one optimizer step on every rank.

The trainer marks its phases with `phase(name)` (a record_function: free when no profiler runs). Each rank writes
profile.rank<r>.json in the run dir: the step's wall time, each phase's (its scope's wall time, children included:
`loss`, and the layerwise shared teacher's layers, are part of `student_forward`), and the time inside collectives
(ZeRO-3's gathers and reduce-scatters, the loss reductions), summed over the ops whose names say so, and the ops with
the most time of their own. On CUDA the phases are host time: kernels run asynchronously,
so a phase that launches them can end before they do (the collectives' and the step's totals still bound it).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PHASES = ("generate", "teacher", "student_forward", "loss", "backward", "optimizer")
COLLECTIVE_WORDS = ("all_gather", "allgather", "reduce_scatter", "reducescatter", "all_reduce", "allreduce",
                    "broadcast")
TOP_OPS = 12  # the ops with the most time of their own (children excluded), all threads: what a phase spends it on


def phase(name: str) -> contextlib.AbstractContextManager:
    return record_function(f"megadistil.{name}")


@contextlib.contextmanager
def profiled_step(out: Path, rank: int) -> Iterator[None]:
    """Profile what runs inside; write its summary to profile.rank<rank>.json in `out`."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_initialized() else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        yield
        wall_s = time.perf_counter() - start  # the step, not the profiler's own collection afterwards
    summary = summarize(prof.events(), wall_s)
    (out / f"profile.rank{rank}.json").write_text(json.dumps(summary, indent=1))


def summarize(events, wall_s: float) -> dict:
    """Phase and collective seconds from the profiler's events (times in microseconds). A collective's host time is
    all of it on gloo; NCCL's runs as kernels, asynchronously: their device time is collectives_device_s."""
    phases = {name: 0.0 for name in PHASES}
    collective_us, device_us, ops, self_us = 0.0, 0.0, {}, {}
    for e in events:
        if e.name.startswith("megadistil.") and e.name[11:] in phases:
            phases[e.name[11:]] += e.cpu_time_total / 1e6
        elif any(w in e.name.lower() for w in COLLECTIVE_WORDS):
            collective_us += e.self_cpu_time_total
            device_us += e.self_device_time_total
            ops[e.name] = ops.get(e.name, 0) + 1
        self_us[e.name] = self_us.get(e.name, 0.0) + e.self_cpu_time_total
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:TOP_OPS]
    return {"step_s": wall_s, "phases_s": phases, "collectives_s": collective_us / 1e6,
            "collectives_device_s": device_us / 1e6, "collective_ops": ops,
            "top_ops_self_s": {name: us / 1e6 for name, us in top}}
