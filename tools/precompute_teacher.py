#!/usr/bin/env python
"""Run a teacher once over a corpus and store its top-k outputs as WebDataset shards (see megadistil.data).

    python tools/precompute_teacher.py --teacher DIR --text 'data/*.jsonl' --out shards/ [--top-k 64 ...]
    deepspeed --num_gpus 8 tools/precompute_teacher.py ... [--zero3]     # one set of shards per rank
    python tools/precompute_teacher.py ... --student-tokenizer STUDENT_DIR  # a teacher with another tokenizer

Started again with the same arguments, an interrupted run keeps its complete shards and redoes the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistil.data.precompute import PRECOMPUTE_DTYPES, PrecomputeConfig, run_precompute
from megadistil.utils import exit_without_teardown


def parse(argv: list[str] | None = None) -> PrecomputeConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="HF model directory (no remote code)")
    p.add_argument("--text", required=True, nargs="+", help=".txt / .jsonl (text field) / .parquet files or globs")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--shard-bytes", type=float, default=1e9)
    p.add_argument("--max-sequences", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=PRECOMPUTE_DTYPES)
    p.add_argument("--zero3", action="store_true", help="partition the teacher with ZeRO-3 inference")
    p.add_argument("--student-tokenizer", default=None, metavar="DIR",
                   help="the student's tokenizer when it differs from the teacher's (a dir AutoTokenizer loads): "
                        "the shards hold the student's tokens, the teacher's top-k at the positions where both have "
                        "read the same text, and that mask (use loss.kind=uld)")
    p.add_argument("--no-split-special-tokens", action="store_true",
                   help="text spelling a special token is the control token, not text (chat-formatted text, e.g. "
                        "generate_teacher_data --chat-template's); train such shards' eval text with "
                        "data.split_special_tokens=false")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    a = p.parse_args(argv)
    return PrecomputeConfig(teacher=a.teacher, text=a.text, out=a.out, seq_len=a.seq_len, top_k=a.top_k,
                            temperature=a.temperature, batch_size=a.batch_size, shard_bytes=a.shard_bytes,
                            max_sequences=a.max_sequences, dtype=a.dtype, zero3=a.zero3, progress=not a.no_progress,
                            student_tokenizer=a.student_tokenizer, split_special_tokens=not a.no_split_special_tokens)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    try:
        manifest = run_precompute(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"precompute_teacher: error: {exc}", file=sys.stderr)
        return 2
    if manifest is not None:
        print(f"wrote {manifest.total_samples} sequences in {len(manifest.shards)} shards to {cfg.out}")
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
