"""launch/train.py with faults injected from outside the training loop (the tests' harness, not production code).

    MEGADISTIL_FAULT_KILL_AFTER_STEP=n[,m]  every rank SIGKILLs itself once step n is done (saved, evaluated)
    MEGADISTIL_FAULT_NAN_BATCHES=i[,j]      the i-th micro-batch drawn (1-based, counting skipped ones) has a NaN loss
    MEGADISTIL_FAULT_SIGNAL_AT_STEP=n       rank 0 alone gets a stop signal in step n: MEGADISTIL_FAULT_SIGNAL (USR1, a
                                            scheduler's time-limit warning, by default; TERM: preemption)
"""

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.train import main
from megadistil.engine.trainer import Trainer


@contextlib.contextmanager
def faults(kill_after: set[int] = frozenset(), nan_batches: set[int] = frozenset(),
           signal_at: set[int] = frozenset()) -> Iterator[None]:
    """Every Trainer run inside the block gets the faults (the micro-batch count starts at the block)."""
    forward, before_step = Trainer._forward, Trainer._before_step
    drawn = 0

    def faulty_forward(self, batch, loss_cfg):
        nonlocal drawn
        drawn += 1
        parts = forward(self, batch, loss_cfg)
        if drawn in nan_batches:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    def killing_before_step(self, step, active):
        if step - 1 in kill_after:  # step - 1 finished entirely: its checkpoint and evaluation are written
            os.kill(os.getpid(), signal.SIGKILL)
        if step in signal_at and self.dist.rank == 0:
            os.kill(os.getpid(), signal.Signals["SIG" + os.environ.get("MEGADISTIL_FAULT_SIGNAL", "USR1")])
        before_step(self, step, active)

    Trainer._forward, Trainer._before_step = faulty_forward, killing_before_step
    try:
        yield
    finally:
        Trainer._forward, Trainer._before_step = forward, before_step


def _numbers(name: str) -> set[int]:
    return {int(v) for v in os.environ.get(f"MEGADISTIL_FAULT_{name}", "").split(",") if v.strip()}


if __name__ == "__main__":
    with faults(_numbers("KILL_AFTER_STEP"), _numbers("NAN_BATCHES"), _numbers("SIGNAL_AT_STEP")):
        code = main()
    sys.exit(code)
