#!/usr/bin/env python
"""Turn a megadistil run into a packed 1.58-bit checkpoint that vanilla transformers loads.

  python tools/convert_to_ternary.py --checkpoint RUN_DIR_OR_CHECKPOINT_DIR --output DIR [--base TEACHER_DIR]
      [--dtype bf16] [--verify] [--max-shard-size 5GB] [--overwrite]

Exit status: 0 converted (and verified), 1 verification outside tolerance, 2 bad input.
DeepSpeed's ZeRO files are read with torch.load(weights_only=True): nothing in them can run code.
"""

import argparse
import sys

from megadistil.export import ExportConfig, ExportError, VerifyConfig, convert_checkpoint, format_figures
from megadistil.export.card import eval_record
from megadistil.export.ternary import EXPORT_DTYPES, format_size_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir (uses checkpoints/latest) or one checkpoint dir")
    p.add_argument("--output", required=True, help="HF dir to write (must be empty or absent unless --overwrite)")
    p.add_argument("--base", default=None, help="base (teacher) HF dir; default: the run's model.student")
    p.add_argument("--dtype", default="bf16", choices=EXPORT_DTYPES)
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--linear-class", default="bitlinear", choices=["bitlinear", "autobitlinear"])
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--verify", action="store_true", help="load the output with vanilla transformers and compare")
    p.add_argument("--verify-sequences", type=int, default=8)
    p.add_argument("--verify-seq-len", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--eval-results", default=None, help="a tools/evaluate.py results JSON: its scores go into the "
                   "model card's model-index")
    p.add_argument("--eval-model", default=None, help="the model of --eval-results to use (default: its only one)")
    a = p.parse_args(argv)
    cfg = ExportConfig(dtype=a.dtype, max_shard_size=a.max_shard_size, linear_class=a.linear_class,
                       overwrite=a.overwrite, progress=not a.no_progress)
    try:
        evaluated = eval_record(a.eval_results, a.eval_model) if a.eval_results else None
        result = convert_checkpoint(a.checkpoint, a.output, cfg, base=a.base, verify=a.verify,
                                    verify_config=VerifyConfig(sequences=a.verify_sequences, seq_len=a.verify_seq_len),
                                    evaluated=evaluated)
    except (ExportError, ValueError, OSError) as e:
        print(f"convert_to_ternary: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result.output} ({result.sizes['shards']} shard(s))")
    print(format_size_report(result.sizes))
    if result.verify is not None:
        print(format_figures(result.verify))
        return 0 if result.verify["passed"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
