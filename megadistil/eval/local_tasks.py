"""Small offline lm-eval tasks made from a held-out corpus (the demo's, or yours): documents as JSON lines plus a task
YAML (`dataset_path: json` + `data_files`) that `--include-path` / `train.eval_tasks_include_path` point at.

  next_line   multiple choice: a file's true next lines among lines drawn from other files (acc, acc_norm)
  last_word   loglikelihood: a line's last identifier after the lines before it (acc = greedy match, perplexity)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

MIN_LINE = 8  # characters: shorter lines ("else:", "}") say little about a model
CONTEXT_CHARS = 400
WORD = re.compile(r"[A-Za-z_]\w{2,}")


def _split(docs: list[str]) -> list[tuple[list[str], list[int]]]:
    """Each document's lines and the positions i (>= 1) whose line is long enough to be a target; documents without
    one are left out. Split once: the task builders draw from these many times."""
    split = [(lines, [i for i in range(1, len(lines)) if len(lines[i].strip()) >= MIN_LINE])
             for lines in (d.splitlines() for d in docs)]
    return [(lines, targets) for lines, targets in split if targets]


def _context(lines: list[str], i: int, chars: int = CONTEXT_CHARS) -> str:
    return "\n".join(lines[:i])[-chars:]


def next_line_docs(docs: list[str], n: int, *, choices: int = 4, span: int = 2, seed: int = 0,
                   context_chars: int = CONTEXT_CHARS) -> list[dict[str, Any]]:
    """n documents: the lines before a target (<= `context_chars`); the target, the next `span` lines, among
    `choices - 1` spans of as many lines from other files, of similar length, at seeded positions. Several lines
    carry enough of the file's names and structure for a small model to tell its own continuation."""
    rng = random.Random(seed)
    usable = _split(docs)
    if len(usable) < choices:
        raise ValueError(f"next_line: {len(usable)} usable documents, need at least {choices}")
    out = []
    for _ in range(n):
        k = rng.randrange(len(usable))
        lines, targets = usable[k]
        i = rng.choice(targets)
        true = "\n".join(lines[i:i + span])
        options = [true]
        for _attempt in range(10_000):
            if len(options) == choices:
                break
            j = rng.randrange(len(usable))
            other_lines, other_targets = usable[j]
            start = rng.choice(other_targets)
            other = "\n".join(other_lines[start:start + span])
            # of a similar length: otherwise the shortest option wins on total log-probability alone
            if j != k and abs(len(other) - len(true)) <= max(8, len(true) // 4) and other not in options:
                options.append(other)
        else:
            raise ValueError("next_line: too few lines of a similar length in the other documents")
        label = rng.randrange(choices)
        options[0], options[label] = options[label], options[0]
        out.append({"context": _context(lines, i, context_chars), "choices": options, "label": label})
    return out


def last_word_docs(docs: list[str], n: int, *, seed: int = 0, context_chars: int = CONTEXT_CHARS) -> list[dict[str, Any]]:
    """n documents: the text before a line's last identifier (>= 3 characters), and that identifier."""
    rng = random.Random(seed + 1)
    usable = [(lines, [i for i in targets if WORD.search(lines[i])]) for lines, targets in _split(docs)]
    usable = [(lines, c) for lines, c in usable if c]
    if not usable:
        raise ValueError("last_word: no document has a line with an identifier")
    out = []
    for _ in range(n):
        lines, candidates = usable[rng.randrange(len(usable))]
        i = rng.choice(candidates)
        word = list(WORD.finditer(lines[i]))[-1]
        context = (_context(lines, i, context_chars) + "\n" + lines[i][:word.start()])[-context_chars:]
        out.append({"context": context, "target": word.group()})
    return out


TEMPLATES = {
    "next_line": {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
                  "target_delimiter": "\n", "metrics": ["acc", "acc_norm", "acc_mutual_info"]},
    "last_word": {"output_type": "loglikelihood", "doc_to_target": "{{target}}", "target_delimiter": "",
                  "metrics": ["acc", "perplexity"]},
}


def write_task(directory: str | Path, name: str, kind: str, docs: list[dict[str, Any]]) -> Path:
    """<directory>/<name>.jsonl and <name>.yaml (YAML written as JSON values, so no document text needs escaping)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = (directory / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    t = dict(TEMPLATES[kind])
    metrics = t.pop("metrics")
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "doc_to_text": "{{context}}", **t,
              "metric_list": [{"metric": m, "higher_is_better": m != "perplexity"} for m in metrics]}
    path = directory / f"{name}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    return path
