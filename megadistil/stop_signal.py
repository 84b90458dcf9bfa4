"""A scheduler's warning before a time limit (Slurm: `#SBATCH --signal=USR1@600`): the trainer finishes its step,
saves it and stops. Standard library only, so that launch/train.py installs the handler before its heavy imports:
Python's default for SIGUSR1 ends the process, and the warning can come at any time (a short job gets it at once)."""

from __future__ import annotations

import signal
import threading

STOP_SIGNAL = signal.SIGUSR1
_requested = threading.Event()


def watch() -> None:
    """Record STOP_SIGNAL from now on (Python delivers signals to the main thread only; elsewhere, nothing)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(STOP_SIGNAL, lambda signum, frame: _requested.set())


def requested() -> bool:
    return _requested.is_set()
