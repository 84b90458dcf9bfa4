#!/usr/bin/env python
"""Continue prompts with a teacher and write the continuations as JSON lines (see megadistil.data.generate).

    python tools/generate_teacher_data.py --teacher DIR --text 'data/*.jsonl' --prompt-tokens 64 --out gen/ \
        --max-new-tokens 256 --temperatures 1.5 0.7 --top-p 0.95 [--shards gen-shards/ --shard-top-k 64 --shard-seq-len 512]
    deepspeed --num_gpus 8 tools/generate_teacher_data.py ... [--zero3]     # prompt i on rank i % 8

gen/generations.jsonl has a `text` field (prompt + continuation): train on it with `data.text`, or with --shards get
teacher shards of it for `data.shards`. Started again with the same arguments, an interrupted run continues where it
stopped and writes what an uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistil.data.generate import GENERATIONS, Backend, GenerateConfig, ShardOptions, run_generation
from megadistil.data.precompute import PRECOMPUTE_DTYPES
from megadistil.sampling import SamplingConfig, check_sampling_settings
from megadistil.utils import exit_without_teardown


def parse(argv: list[str] | None = None) -> GenerateConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="HF model directory (no remote code)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", help="documents (.txt a line each / .jsonl / .parquet; globs): a prompt is "
                     "a document's first --prompt-tokens tokens")
    src.add_argument("--prompts", help=".txt (a prompt a line, \\n escapes) or .jsonl (a 'prompt' field)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0],
                   help="position i samples at the i-th (the last one after that); 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stop-at-eos", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="auto", choices=PRECOMPUTE_DTYPES)
    p.add_argument("--zero3", action="store_true", help="partition the teacher with ZeRO-3 inference")
    p.add_argument("--backend", default="torch", choices=[b.value for b in Backend],
                   help="torch: megadistil's sampler (every setting); vllm: vLLM's engine where installed (GPU, one "
                   "process, one temperature)")
    p.add_argument("--chat-template", action="store_true",
                   help="each --prompts prompt as a user turn in the teacher tokenizer's chat template; the lines' "
                        "text spells the template's control tokens: train on it with data.split_special_tokens=false")
    p.add_argument("--shards", default=None, help="also write teacher shards of the generated documents here")
    p.add_argument("--shard-top-k", type=int, default=None, help="--shards: teacher top-k kept (default 64)")
    p.add_argument("--shard-seq-len", type=int, default=None, help="--shards: tokens a sequence (default 512)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    a = p.parse_args(argv)
    # Checked here, naming the flags: SamplingConfig's own check names its fields as config keys (sampling.top_p).
    check_sampling_settings(a, "", name=lambda field: "--" + field.replace("_", "-"))
    sampling = SamplingConfig(max_new_tokens=a.max_new_tokens, temperatures=tuple(a.temperatures), top_k=a.top_k,
                              top_p=a.top_p, seed=a.seed, stop_at_eos=not a.no_stop_at_eos)
    return GenerateConfig(teacher=a.teacher, out=a.out, text=a.text or [], prompts=a.prompts,
                          prompt_tokens=a.prompt_tokens, sampling=sampling, batch_size=a.batch_size,
                          max_prompts=a.max_prompts, dtype=a.dtype, zero3=a.zero3, progress=not a.no_progress,
                          shards=shard_options(p, a), backend=Backend(a.backend), chat_template=a.chat_template)


def shard_options(p: argparse.ArgumentParser, a: argparse.Namespace) -> ShardOptions | None:
    """--shards' options (ShardOptions' defaults where not given); refused without --shards, which alone uses them."""
    given = {k: v for k, v in (("top_k", a.shard_top_k), ("seq_len", a.shard_seq_len)) if v is not None}
    if not a.shards:
        if given:
            p.error(f"{', '.join('--shard-' + k.replace('_', '-') for k in given)}: used only with --shards")
        return None
    return ShardOptions(out=a.shards, **given)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse(argv)
        summary = run_generation(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"generate_teacher_data: error: {exc}", file=sys.stderr)
        return 2
    if summary is not None:
        print(f"wrote {summary['prompts']} continuations ({summary['stops']['eos']} ended at EOS) to "
              f"{Path(cfg.out) / GENERATIONS}" + (f"; teacher shards in {cfg.shards.out}" if cfg.shards else ""))
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
