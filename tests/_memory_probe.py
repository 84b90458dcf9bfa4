"""launch/train.py with memory readings, for tests/test_memory.py: the real Trainer, plus the process's resident
memory at three moments, as JSON per rank (<out>.rank<r>.json).

  baseline_mb   VmRSS after every import (torch, deepspeed, transformers, megadistil, and the libraries setup
                imports lazily), before any model exists
  setup_peak_mb the highest VmRSS sampled (every 2 ms) while the trainer set up: init, load, shard, engine
  train_peak_mb the highest VmRSS sampled while it trained (steps 1..max_steps)
  maxrss_mb     ru_maxrss at the end (what the engine logs as peak_mem_mb)

Usage: python tests/_memory_probe.py --out OUT --ds_config FILE --config FILE [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import resource
import sys
import threading
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistil.config import load_config
from megadistil.engine.trainer import Trainer


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class Sampler:
    def __init__(self) -> None:
        self.peak, self.anon_peak, self._stop = 0.0, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mb())
            self.anon_peak = max(self.anon_peak, rss_mb("RssAnon"))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--ds_config", required=True)
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    # Libraries the run imports lazily while it sets up (datasets reading the text, and what it and transformers pull
    # in when installed, e.g. scipy with the eval extra): their module state is import cost, not model memory.
    for name in ("datasets", "pandas", "pyarrow", "scipy.sparse", "scipy.stats", "sympy", "networkx"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    baseline, baseline_anon = rss_mb(), rss_mb("RssAnon")
    trainer = Trainer(load_config(args.config, args.overrides), args.ds_config)
    try:
        with Sampler() as setup:
            trainer.setup()
        with Sampler() as train:
            trainer.train()
    finally:
        trainer.cleanup()
    report = {"baseline_mb": baseline, "setup_peak_mb": setup.peak, "train_peak_mb": train.peak,
              "baseline_anon_mb": baseline_anon, "train_anon_peak_mb": train.anon_peak,
              "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "world_size": trainer.dist.world_size}
    Path(f"{args.out}.rank{trainer.dist.rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
