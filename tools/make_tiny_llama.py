"""Make a tiny random Llama-3.1-shaped model + BPE tokenizer trained on local text (default: Python stdlib source).

  python tools/make_tiny_llama.py --out runs/tiny-llama [--files 40] [--vocab 512] [--hidden 64] [--layers 2] [--pretrain-steps 0]

Exit status: 0 written, 2 bad input.
"""

import argparse
import os
import sys

from megadistil.tiny import make_tiny_llama, stdlib_files


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--files", type=int, default=40, help="how many stdlib files make the corpus")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=0, help="pretrain on the corpus (0: random weights)")
    a = p.parse_args(argv)
    # Refused here, before the tokenizer trains: else a traceback (mkdir, the LR schedule, rope's division), a model
    # with no layers, or (--files 0) the whole standard library.
    for flag, value, least in (("--files", a.files, 1), ("--hidden", a.hidden, 1), ("--layers", a.layers, 1),
                               ("--pretrain-steps", a.pretrain_steps, 0)):
        if value < least:
            p.error(f"{flag} must be >= {least}, got {value}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out}: exists and is not a directory")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    texts = [f.read_text(errors="replace") for f in stdlib_files(a.files)]
    out = make_tiny_llama(a.out, texts=texts, vocab_size=a.vocab, seed=a.seed, hidden_size=a.hidden, layers=a.layers,
                          pretrain_steps=a.pretrain_steps)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
