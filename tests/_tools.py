"""The tools' main(), loaded as each script is run (the tools are thin shells over the package; each interpreter
start costs seconds here), and the deepspeed launcher on a free port."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from megadistil.distributed import free_local_port

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def tool_main(script: str) -> Callable[..., int]:
    """tools/<script>.py's main."""
    spec = importlib.util.spec_from_file_location(f"{script}_tool", TOOLS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def deepspeed_cmd(nproc: int) -> list[str]:
    """The deepspeed launcher on nproc local ranks with a rendezvous port free now: fixed ports collide when two
    suites share a host."""
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc), "--master_port",
            str(free_local_port())]
