#!/usr/bin/env python
"""Print a shard directory's manifest, counts, bytes per token, and one decoded sample.

    python tools/inspect_shards.py shards/ [--sample 0] [--positions 4] [--tokenizer DIR]
    python tools/inspect_shards.py shards/ --verify    # every shard's size and sha256 against the manifest; exit 1
                                                       # if one differs (after a copy to another file system)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistil.data.inspect import describe, verify


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--sample", type=int, default=0, help="index of the sample to decode (in the first shard)")
    p.add_argument("--positions", type=int, default=4, help="token positions to print")
    p.add_argument("--show-k", type=int, default=5, help="top-k entries to print per position")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir for readable tokens (default: manifest teacher)")
    p.add_argument("--verify", action="store_true", help="check every shard's size and sha256 (reads them all)")
    a = p.parse_args(argv)
    try:
        if a.verify:
            if (a.sample, a.positions, a.show_k, a.tokenizer) != (0, 4, 5, None):
                p.error("--verify checks the files only: --sample, --positions, --show-k and --tokenizer do not apply")
            report, ok = verify(a.dir)
            print(report)
            return 0 if ok else 1
        print(describe(a.dir, sample=a.sample, positions=a.positions, show_k=a.show_k, tokenizer=a.tokenizer))
    except (ValueError, FileNotFoundError) as exc:
        print(f"inspect_shards: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
