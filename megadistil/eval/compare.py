"""tools/compare_runs.py: any number of run dirs side by side — one PNG per figure and one markdown table of the
final figures, each run labelled by the config keys in which the runs differ."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megadistil import rundir
from megadistil.config import flat_settings
from megadistil.eval.models import EvalError

IGNORED_KEYS = ("train.output_dir",)  # differs between any two runs, says nothing about them
LOSS_PARTS = ("loss", "kd", "ce", "hidden", "attn")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: "optim.lr" -> 0.001
    steps: list[dict[str, Any]]  # training-step records
    evals: list[dict[str, Any]]  # evaluation records (held-out perplexity, eval_task/...)
    label: str = ""

    def tokens_at(self, step: int) -> float:
        """Tokens trained by `step`: step x the tokens of one step (fixed-size batches; a record holds its step's)."""
        per_step = statistics.median(r["tokens"] for r in self.steps) if self.steps else 0
        return step * per_step


def load_run(path: str | Path) -> Run:
    from omegaconf import OmegaConf

    path = Path(path)
    metrics, config = path / rundir.METRICS, path / rundir.CONFIG
    for f in (metrics, config):
        if not f.is_file():
            raise EvalError(f"run {path}: no {f.name} (pass megadistil run dirs, i.e. train.output_dir)")
    records = []
    for i, line in enumerate(metrics.read_text().splitlines()):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(metrics.read_text().splitlines()) - 1:  # only a crash's cut last line is forgiven
                raise EvalError(f"{metrics}: line {i + 1} is not JSON") from None
    flat = {k: json.dumps(v) if isinstance(v, list) else v  # lists hashable, as labels show them
            for k, v in flat_settings(OmegaConf.to_container(OmegaConf.load(config), resolve=False)).items()}
    return Run(path, flat, [r for r in records if "loss" in r], [r for r in records if _is_eval(r)])


def _is_eval(record: dict[str, Any]) -> bool:
    return any(k.startswith(("eval_ppl", "eval_task/")) for k in record)


def label_runs(runs: list[Run]) -> list[str]:
    """The keys whose values differ between the runs (or the dir names, when no key differs)."""
    keys = sorted({k for r in runs for k in r.config} - set(IGNORED_KEYS))
    differing = [k for k in keys if len({json.dumps(r.config.get(k), default=str) for r in runs}) > 1]
    for r in runs:
        r.label = ", ".join(f"{k}={r.config.get(k)}" for k in differing) or r.path.name
    labels = [r.label for r in runs]
    for r in runs:  # runs with the same config: their dir names tell them apart
        if labels.count(r.label) > 1 and r.label != r.path.name:
            r.label = f"{r.path.name}: {r.label}"
    return differing


def eval_keys(runs: list[Run]) -> list[str]:
    return sorted({k for r in runs for e in r.evals for k in e if k.startswith(("eval_ppl_student", "eval_task/"))})


def _plot(series: dict[str, list[tuple[list, list, str]]], xlabel: str, path: Path, *, log_y: tuple[str, ...] = ()):
    """One figure, one panel per series name; each panel holds (x, y, label) lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(series), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    for ax, (name, lines) in zip(axes[0], series.items()):
        for x, y, label in lines:
            ax.plot(x, y, marker="o" if len(x) < 20 else None, markersize=3, label=label)
        ax.set(title=name, xlabel=xlabel, yscale="log" if name in log_y else "linear")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def figures(runs: list[Run], out: Path) -> list[Path]:
    parts = [p for p in LOSS_PARTS if any(p in r for run in runs for r in run.steps)]
    loss = {p: [([run.tokens_at(r["step"]) for r in run.steps if p in r], [r[p] for r in run.steps if p in r],
                  run.label) for run in runs] for p in parts}
    evals = {k: [([run.tokens_at(e["step"]) for e in run.evals if k in e], [e[k] for e in run.evals if k in e],
                  run.label) for run in runs] for k in eval_keys(runs)}
    speed = {"tokens_per_s": [([r["step"] for r in run.steps], [r["tokens_per_s"] for r in run.steps], run.label)
                              for run in runs]}
    memory = {"peak memory (MB) per rank": [
        ([r["step"] for r in run.steps], [r[k] for r in run.steps], f"{run.label} rank {k.rsplit('rank', 1)[1]}")
        for run in runs for k in sorted({k for r in run.steps for k in r if k.startswith("peak_mem_mb_rank")})]}
    return [_plot(loss, "tokens", out / "loss.png", log_y=tuple(parts)),
            _plot(evals, "tokens", out / "eval.png", log_y=("eval_ppl_student",)),
            _plot(speed, "step", out / "tokens_per_s.png"),
            _plot(memory, "step", out / "peak_memory.png")]


def final_table(runs: list[Run], differing: list[str]) -> str:
    keys = eval_keys(runs)
    head = ["run", "steps", "tokens", "final loss", *keys, "median tokens/s", "peak MB (max rank)"]
    lines = ["Runs differ in: " + (", ".join(f"`{k}`" for k in differing) or "nothing (same config)"), "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for run in runs:
        last = run.steps[-1] if run.steps else {}
        finals = [next((e[k] for e in reversed(run.evals) if k in e), None) for k in keys]
        step = last.get("step", 0)
        cells = [f"{run.label} (`{run.path.name}`)", str(step), f"{run.tokens_at(step):,.0f}", _num(last.get("loss")), *[_num(v) for v in finals],
                 _num(statistics.median(r["tokens_per_s"] for r in run.steps) if run.steps else None),
                 _num(max((r.get("peak_mem_mb", 0) for r in run.steps), default=None))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def compare_runs(paths: list[str | Path], out: str | Path) -> list[Path]:
    if not paths:
        raise EvalError("pass at least one run dir")
    out = Path(out)
    if out.exists() and not out.is_dir():  # checked before the runs are read; mkdir would raise FileExistsError
        raise EvalError(f"--out {out}: exists and is not a directory")
    runs = [load_run(p) for p in paths]
    differing = label_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    written = figures(runs, out)
    table = out / "summary.md"
    table.write_text(final_table(runs, differing))
    return [*written, table]
