"""Stop requests: the trainer finishes its step, saves it and stops; the next job resumes from it.

SIGUSR1 is a scheduler's warning before a time limit (Slurm: `#SBATCH --signal=USR1@600`), watched from the start:
Python's default for it ends the process, and it can come at any time (a short job gets it at once). SIGTERM
(Slurm's preemption and scancel, `kill`, `docker stop`) is a request only while steps run (`stoppable`), and only for
ranks that the scheduler started itself (srun, mpirun, one process): before the steps there is nothing to save, and
the deepspeed launcher and torchrun end their ranks with SIGTERM when one fails, one rank after another (30 s each),
where a rank blocked in a collective runs no Python handler: those die at once as by default. A second SIGTERM ends
the process at once (the scheduler's SIGKILL follows anyway; checkpoints are written atomically). Standard library
only, so that launch/train.py installs the watch before its heavy imports."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_REASONS = {signal.SIGUSR1: "a time limit ahead", signal.SIGTERM: "preemption, scancel or kill"}
_received: list[signal.Signals] = []


def _record(signum: int, frame: object) -> None:
    _received.append(signal.Signals(signum))
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # Python runs handlers there only


def watch() -> None:
    """Record SIGUSR1 from now on (called from another thread: nothing)."""
    if _main_thread():
        signal.signal(signal.SIGUSR1, _record)


@contextlib.contextmanager
def stoppable(sigterm: bool = True) -> Iterator[None]:
    """Inside the block, SIGTERM (the first one) is a stop request too, if `sigterm`."""
    if not sigterm or not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _record)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is _record:
            signal.signal(signal.SIGTERM, previous)


def requested() -> bool:
    return bool(_received)


def reason() -> str:
    """The first stop signal received, and what it means (e.g. "SIGUSR1 (a time limit ahead)")."""
    first = _received[0]
    return f"{first.name} ({_REASONS[first]})"
