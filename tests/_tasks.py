"""Local lm-eval task YAMLs for the tests: lines of a stdlib file, the true next line among distractors."""

from __future__ import annotations

import json
import os
from pathlib import Path


def task_docs(n: int = 12) -> list[dict]:
    """Lines of a stdlib file as contexts; the true next line and three lines from elsewhere as choices."""
    lines = [ln.strip() for ln in (Path(os.__file__).parent / "textwrap.py").read_text().splitlines()]
    lines = [ln for ln in lines if len(ln) > 12]
    docs = []
    for i in range(n):
        k = 7 * i + 3
        choices = [lines[k + 1], lines[(k + 97) % len(lines)], lines[(k + 211) % len(lines)], lines[(k + 331) % len(lines)]]
        label = i % 4  # the true line moves around, so "always choice 0" cannot score by accident
        choices[0], choices[label] = choices[label], choices[0]
        docs.append({"context": lines[k], "choices": choices, "label": label, "target": " " + lines[k + 1]})
    return docs


YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{context}}}}"
{extra}
metric_list:
{metrics}
"""


def write_task(directory: Path, name: str, docs: list[dict], output_type: str, data: Path | None = None) -> None:
    data = data or directory / f"{name}.jsonl"
    if docs:
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    if output_type == "multiple_choice":
        extra = 'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"'
        metrics = ["acc", "acc_norm"]
    else:
        extra = 'doc_to_target: "{{target}}"\ntarget_delimiter: ""'
        metrics = ["perplexity", "acc"]
    metric_yaml = "\n".join(f"  - metric: {m}\n    higher_is_better: {str(m != 'perplexity').lower()}" for m in metrics)
    (directory / f"{name}.yaml").write_text(YAML.format(name=name, data=data, output_type=output_type, extra=extra,
                                                        metrics=metric_yaml))
