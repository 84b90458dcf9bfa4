#!/usr/bin/env python
"""Turn a megadistil run into a 1.58-bit checkpoint: transformers' packed format (default) or a GGUF for llama.cpp.

  python tools/convert_to_ternary.py --checkpoint RUN_DIR_OR_CHECKPOINT_DIR --output DIR [--base TEACHER_DIR]
      [--dtype bf16] [--verify] [--max-shard-size 5GB] [--overwrite]
  python tools/convert_to_ternary.py --format gguf --gguf-type tq2_0 --checkpoint RUN --output FILE.gguf [--verify]

Exit status: 0 converted (and verified); 1 verification outside tolerance, or the export did not load in transformers /
llama.cpp (the export is then kept as OUTPUT.verify-failed and OUTPUT keeps what it held); 2 bad input. --overwrite replaces an earlier export only, and no
output may be, hold or sit inside the checkpoints or the base model.
DeepSpeed's ZeRO files are read with torch.load(weights_only=True): nothing in them can run code.
--verify loads an HF export with vanilla transformers, a GGUF with llama.cpp (`make llama-cpp` installs it).
"""

import argparse
import sys

from megadistil.export import ExportConfig, ExportError, VerifyConfig, convert_checkpoint, format_figures
from megadistil.export.card import eval_record
from megadistil.export.gguf import GGUFConfig, LinearType, OtherType, convert_checkpoint_gguf, format_gguf_sizes
from megadistil.export.llamacpp import LlamaCppVerifyConfig, format_llama_cpp_figures
from megadistil.export.ternary import EXPORT_DTYPES, format_size_report

HF_ONLY = ("dtype", "max_shard_size", "linear_class", "eval_results", "eval_model")
GGUF_ONLY = ("gguf_type", "gguf_other_type")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir (uses checkpoints/latest) or one checkpoint dir")
    p.add_argument("--output", required=True, help="HF dir, or FILE.gguf (must be empty or absent unless --overwrite)")
    p.add_argument("--base", default=None, help="base (teacher) HF dir; default: the run's model.student")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"])
    p.add_argument("--dtype", default=None, choices=EXPORT_DTYPES, help="HF: non-ternary tensors (default bf16)")
    p.add_argument("--max-shard-size", default=None, help="HF: default 5GB")
    p.add_argument("--linear-class", default=None, choices=["bitlinear", "autobitlinear"], help="HF")
    p.add_argument("--gguf-type", default=None, choices=[t.value for t in LinearType],
                   help="GGUF: the BitLinear weights (default tq2_0; f16/q8_0 hold the same ternary values unpacked)")
    p.add_argument("--gguf-other-type", default=None, choices=[t.value for t in OtherType],
                   help="GGUF: embeddings, output head, excluded linears (default f16)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--verify", action="store_true", help="run the output (transformers or llama.cpp) and compare")
    p.add_argument("--verify-sequences", type=int, default=None, help="--verify: held-out sequences (default 8)")
    p.add_argument("--verify-seq-len", type=int, default=None, help="--verify: tokens each (default 64)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--eval-results", default=None, help="HF: a tools/evaluate.py results JSON: its scores go into the "
                   "model card's model-index")
    p.add_argument("--eval-model", default=None, help="HF: the model of --eval-results to use (default: its only one)")
    a = p.parse_args(argv)
    ignored = [k for k in (HF_ONLY if a.format == "gguf" else GGUF_ONLY) if getattr(a, k) is not None]
    if ignored:
        p.error(f"--format {a.format} does not use {', '.join('--' + k.replace('_', '-') for k in ignored)}")
    for key, needs in (("verify_sequences", "verify"), ("verify_seq_len", "verify"), ("eval_model", "eval_results")):
        if getattr(a, key) is not None and not getattr(a, needs):
            p.error(f"--{key.replace('_', '-')} is used only with --{needs.replace('_', '-')}")
    for key, low in (("verify_sequences", 1), ("verify_seq_len", 2)):  # checked after the whole export before
        if getattr(a, key) is not None and getattr(a, key) < low:
            p.error(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(a, key)}")
    return a


def verify_settings(a: argparse.Namespace) -> dict[str, int]:
    """--verify's sizes that were given (the verifiers' own defaults otherwise)."""
    return {k: v for k, v in (("sequences", a.verify_sequences), ("seq_len", a.verify_seq_len)) if v is not None}


def gguf_main(a: argparse.Namespace) -> int:
    cfg = GGUFConfig(linear_type=a.gguf_type or "tq2_0", other_type=a.gguf_other_type or "f16",
                     overwrite=a.overwrite, progress=not a.no_progress)
    result = convert_checkpoint_gguf(a.checkpoint, a.output, cfg, base=a.base, verify=a.verify,
                                     verify_config=LlamaCppVerifyConfig(**verify_settings(a)))
    print(f"wrote {result.output}")
    print(format_gguf_sizes(result))
    if result.verify is not None and "error" not in result.verify:
        print(format_llama_cpp_figures(result.verify))
    return verdict(result.verify, a.output)


def hf_main(a: argparse.Namespace) -> int:
    cfg = ExportConfig(dtype=a.dtype or "bf16", max_shard_size=a.max_shard_size or "5GB",
                       linear_class=a.linear_class or "bitlinear", overwrite=a.overwrite, progress=not a.no_progress)
    evaluated = eval_record(a.eval_results, a.eval_model) if a.eval_results else None
    result = convert_checkpoint(a.checkpoint, a.output, cfg, base=a.base, verify=a.verify,
                                verify_config=VerifyConfig(**verify_settings(a)),
                                evaluated=evaluated)
    print(f"wrote {result.output} ({result.sizes['shards']} shard(s))")
    print(format_size_report(result.sizes))
    if result.verify is not None and "error" not in result.verify:
        print(format_figures(result.verify))
    return verdict(result.verify, a.output)


def verdict(verify: dict | None, output: str) -> int:
    """1 where verification failed: the export then went to <output>.verify-failed, and --output kept what it held."""
    if verify is None or verify["passed"]:
        return 0
    cause = f" ({verify['error']})" if "error" in verify else ""  # it did not load: say why, in the same line
    print(f"verification FAILED{cause}: the export is kept beside --output as {output}.verify-failed; {output} was "
          "left as it was", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    try:
        return gguf_main(a) if a.format == "gguf" else hf_main(a)
    except (ExportError, ValueError, OSError) as e:
        print(f"convert_to_ternary: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
