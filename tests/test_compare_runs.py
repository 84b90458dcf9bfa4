"""tools/compare_runs.py on run dirs written the way the trainer writes them (config.yaml + metrics.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

from megadistil.config import load_config, to_yaml
from megadistil.eval.compare import label_runs, load_run
from tests._tools import tool_main


def _run_dir(path: Path, overrides: list[str], final_loss: float, acc: float) -> Path:
    path.mkdir(parents=True)
    cfg = load_config("configs/tiny.yaml", ["model.student=/m", "data.text=[/t.txt]", f"train.output_dir={path}",
                                            *overrides])
    (path / "config.yaml").write_text(to_yaml(cfg))
    records = [{"step": 0, "eval_ppl_student": 90.0, "eval_task/next/acc": 0.25}]
    for step in range(1, 11):
        loss = 5.0 - (5.0 - final_loss) * step / 10
        records.append({"step": step, "loss": loss, "kd": loss, "ce": loss + 1, "tokens": 2048,
                        "tokens_per_s": 1000.0 + step, "peak_mem_mb": 900.0 + step, "peak_mem_mb_rank0": 900.0 + step,
                        "peak_mem_mb_rank1": 850.0})
    records.append({"step": 10, "eval_ppl_student": 70.0, "eval_task/next/acc": acc})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 11, "lo')
    return path


def _tool_main():
    return tool_main("compare_runs")


def test_runs_are_labelled_by_their_differing_keys_and_figures_are_written(tmp_path, capsys):
    a = _run_dir(tmp_path / "a", ["optim.lr=0.001"], 2.0, 0.5)
    b = _run_dir(tmp_path / "b", ["optim.lr=0.003", "loss.kind=jsd"], 3.0, 0.75)
    c = _run_dir(tmp_path / "c", ["optim.lr=0.003", "loss.kind=jsd"], 4.0, 0.625)  # same config as b
    runs = [load_run(p) for p in (a, b, c)]
    assert label_runs(runs) == ["loss.kind", "optim.lr"]  # output_dir differs too, and is no label
    assert [r.label for r in runs] == ["loss.kind=forward_kl, optim.lr=0.001", "b: loss.kind=jsd, optim.lr=0.003",
                                       "c: loss.kind=jsd, optim.lr=0.003"]
    assert runs[0].tokens_at(10) == 20480 and len(runs[0].steps) == 10 and len(runs[0].evals) == 2

    out = tmp_path / "cmp"
    assert _tool_main()([str(a), str(b), str(c), "--out", str(out)]) == 0
    for name in ("loss.png", "eval.png", "tokens_per_s.png", "peak_memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (out / "summary.md").read_text()
    assert "Runs differ in: `loss.kind`, `optim.lr`" in table
    assert "| eval_ppl_student | eval_task/next/acc |" in table
    row_b = next(line for line in table.splitlines() if line.startswith("| b: "))
    assert "| 10 | 20,480 | 3 | 70 | 0.75 | 1006 | 910 |" in row_b


def test_a_dir_that_is_not_a_run_is_named(tmp_path, capsys):
    assert _tool_main()([str(tmp_path), "--out", str(tmp_path / "cmp")]) == 2
    assert f"run {tmp_path}: no metrics.jsonl" in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    """mkdir on it was a FileExistsError traceback (exit 1); the docstring promises exit 2 for bad input."""
    run = _run_dir(tmp_path / "a", [], 2.0, 0.5)
    out = tmp_path / "out.txt"
    out.write_text("")
    assert _tool_main()([str(run), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"compare_runs: error: --out {out}: exists and is not a directory\n"
