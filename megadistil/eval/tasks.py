"""lm-evaluation-harness tasks through its Python API, with no network: every task's data must already be on the
machine (the datasets cache, or local files named by a task YAML: `dataset_path: json` + `data_files`)."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from megadistil.eval.models import EvalError

OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def go_offline() -> None:
    """No download, ever: the environment for whatever imports later, and the flags of what is already imported
    (datasets and huggingface_hub read their environment once, at import)."""
    os.environ.update(OFFLINE_ENV)
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


@functools.lru_cache(maxsize=4)
def _manager(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(include_path: str | None = None, tasks: tuple[str, ...] = ()):
    """lm-eval's index of tasks, made once per process. Indexing lm-eval's own thousands of task YAMLs takes ~15 s
    on a small CPU, so when every requested task is a local one only --include-path is indexed."""
    if include_path and not os.path.isdir(include_path):
        raise EvalError(f"--include-path {include_path}: not a directory of task YAMLs")
    if include_path:
        local = _manager(str(include_path), False)
        if tasks and all(t in local.all_tasks for t in tasks):
            return local
    return _manager(str(include_path) if include_path else None, True)


def check_tasks(tasks: list[str], manager) -> None:
    """Load each task's data before any model runs, so that a missing dataset is one clear error naming the task,
    not a stack trace (or a download attempt) in the middle of an evaluation."""
    from lm_eval.tasks import get_task_dict

    for name in tasks:
        if name not in manager.all_tasks:
            raise EvalError(f"task {name!r} is not an lm-eval task or group, nor in the --include-path YAMLs")
        try:
            get_task_dict([name], manager)
        except OSError as e:  # ConnectionError (offline hub), FileNotFoundError (data_files), DatasetNotFoundError
            raise EvalError(f"task {name!r}: its data is not on this machine ({_first_line(e)}). Evaluation runs "
                            "offline (HF_DATASETS_OFFLINE=1): put the dataset in the datasets cache on a machine with "
                            "network first, or write a local task YAML (dataset_path: json, data_files: ...) and "
                            "pass its directory with --include-path") from None
        except Exception as e:  # noqa: BLE001 - datasets and lm-eval raise many types for a malformed task or file
            raise EvalError(f"task {name!r}: its data could not be loaded ({type(e).__name__}: "
                            f"{_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


def preflight(tasks: list[str], include_path: str | None = None) -> None:
    """Before a run loads any weight: lm-eval is installed, the tasks exist and their data is on the machine."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError("evaluating tasks needs lm-evaluation-harness: pip install 'megadistil[eval]'") from None
    go_offline()
    check_tasks(tasks, task_manager(include_path, tuple(tasks)))


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """lm-eval seeds the global RNGs (CUDA's too); a run that evaluates mid-training must go on exactly as it would
    have."""
    state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_initialized() else []):
            yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


def run_tasks(model: nn.Module, tokenizer: Any, tasks: list[str], *, include_path: str | None = None,
              limit: int | None = None, batch_size: int = 8, max_length: int = 2048,
              checked: bool = False) -> dict[str, dict[str, float]]:
    """{task: {metric: value, ..., "samples": n}} for an in-memory causal LM (zero-shot, lm-eval's own seeds).
    Returns {} on a process that lm-eval does not aggregate on (a non-zero LOCAL_RANK)."""
    go_offline()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(include_path, tuple(tasks))
    if not checked:
        check_tasks(tasks, manager)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    with preserved_rng(), torch.no_grad():
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    return {} if out is None else scores(out)


def scores(out: dict[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's `results` without its filter suffixes (`acc,none` -> `acc`) and stderr placeholders."""
    table = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and "_stderr" not in metric and key not in ("sample_len",):
                row[metric if filt in ("", "none") else key] = float(value)
        row["samples"] = int(out.get("n-samples", {}).get(task, {}).get("effective", metrics.get("sample_len", 0)))
        table[task] = row
    return table


def flat_scores(table: dict[str, dict[str, float]], prefix: str = "eval_task") -> dict[str, float]:
    """One metrics.jsonl / wandb key per task metric: eval_task/<task>/<metric>."""
    return {f"{prefix}/{task}/{metric}": value for task, row in table.items() for metric, value in row.items()
            if metric != "samples"}
