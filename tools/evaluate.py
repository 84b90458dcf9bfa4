#!/usr/bin/env python
"""Evaluate models offline: lm-evaluation-harness tasks, perplexity on text files, generations side by side.

  python tools/evaluate.py --model [NAME=]MODEL [--model ...] [--tasks T1,T2] [--include-path DIR]
      [--text FILE...] [--generate PROMPTS_FILE] [--limit N] [--batch-size 8] --out results.json

MODEL: an HF dir (teacher, converted 1.58-bit checkpoint), a megadistil run dir or checkpoint (the student rebuilt
through megadistil), or ternary:DIR (the HF dir naively ternarized). Nothing is downloaded: a task whose data is not
on this machine is an error naming it. Exit status: 0 evaluated, 2 bad input.
"""

import argparse
import sys

from megadistil.eval.harness import (
    EVAL_DTYPES,
    EvalSettings,
    check_outputs,
    evaluate_models,
    scores_markdown,
    write_outputs,
)
from megadistil.eval.models import EvalError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="[NAME=]MODEL; repeat for several models")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task names (or those of --include-path)")
    p.add_argument("--include-path", default=None, help="a directory of local task YAMLs")
    p.add_argument("--text", nargs="+", default=[], help="text files (.txt lines or .jsonl 'text') for perplexity")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--text-sequences", type=int, default=64, help="packed sequences spread over the text")
    p.add_argument("--no-split-special-tokens", action="store_true",
                   help="--text spelling a special token is the control token (chat-formatted text), as "
                        "data.split_special_tokens=false trains on it")
    p.add_argument("--generate", default=None, help="prompts file, one per line (\\n for a newline)")
    p.add_argument("--chat-template", action="store_true",
                   help="--generate's prompts as user turns in the tokenizer's chat template (an instruct model's)")
    p.add_argument("--generations-out", default=None, help="markdown table (default: OUT with .generations.md)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled continuations")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--limit", type=int, default=None, help="documents per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048, help="context length lm-eval truncates to")
    p.add_argument("--dtype", default="float32", choices=EVAL_DTYPES)
    p.add_argument("--device", default="auto", help="auto (the GPU where there is one, else the CPU), cpu or cuda[:N]")
    p.add_argument("--out", required=True, help="results JSON")
    a = p.parse_args(argv)
    for flag, value, needs, given in (("--generations-out", a.generations_out, "--generate", a.generate),
                                      ("--chat-template", a.chat_template or None, "--generate", a.generate),
                                      ("--limit", a.limit, "--tasks", a.tasks),
                                      ("--include-path", a.include_path, "--tasks", a.tasks),
                                      ("--no-split-special-tokens", a.no_split_special_tokens or None, "--text",
                                       a.text)):
        if value is not None and not given:  # it would be silently ignored
            p.error(f"{flag} is used only with {needs}")
    s = EvalSettings(tasks=[t for t in a.tasks.split(",") if t], include_path=a.include_path, limit=a.limit,
                     batch_size=a.batch_size, max_length=a.max_length, text=a.text, seq_len=a.seq_len,
                     text_sequences=a.text_sequences, generate=a.generate, max_new_tokens=a.max_new_tokens,
                     seed=a.seed, temperature=a.temperature, dtype=a.dtype, device=a.device,
                     split_special_tokens=not a.no_split_special_tokens, chat_template=a.chat_template)
    try:
        check_outputs(a.out, a.generations_out)
        results = evaluate_models(a.model, s)
    except EvalError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(scores_markdown(results))
    for path in write_outputs(results, a.out, a.generations_out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
