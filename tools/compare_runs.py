#!/usr/bin/env python
"""Compare training runs: one PNG per figure (loss parts vs tokens, held-out perplexity and task scores vs tokens,
tokens/s, peak memory per rank) and a markdown table of the final figures, each run labelled by the config keys in
which the runs differ.

  python tools/compare_runs.py RUN_DIR [RUN_DIR ...] --out DIR

Exit status: 0 written, 2 bad input.
"""

import argparse
import sys

from megadistil.eval.compare import compare_runs
from megadistil.eval.models import EvalError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run dirs (train.output_dir: config.yaml + metrics.jsonl)")
    p.add_argument("--out", required=True, help="directory for the PNGs and summary.md")
    a = p.parse_args(argv)
    try:
        written = compare_runs(a.runs, a.out)
    except EvalError as e:
        print(f"compare_runs: error: {e}", file=sys.stderr)
        return 2
    print(written[-1].read_text())
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
