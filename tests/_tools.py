"""The tools' main(), loaded as each script is run (the tools are thin shells over the package; each interpreter
start costs seconds here)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def tool_main(script: str) -> Callable[..., int]:
    """tools/<script>.py's main."""
    spec = importlib.util.spec_from_file_location(f"{script}_tool", TOOLS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
