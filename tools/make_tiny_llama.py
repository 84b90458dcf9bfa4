"""Make a tiny random Llama-3.1-shaped model + BPE tokenizer trained on local text (default: Python stdlib source).

  python tools/make_tiny_llama.py --out runs/tiny-llama [--files 40] [--vocab 512] [--hidden 64] [--layers 2] [--pretrain-steps 0]
"""

import argparse

from megadistil.tiny import make_tiny_llama, stdlib_files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--files", type=int, default=40, help="how many stdlib files make the corpus")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=0, help="pretrain on the corpus (0: random weights)")
    a = p.parse_args()
    texts = [f.read_text(errors="replace") for f in stdlib_files(a.files)]
    out = make_tiny_llama(a.out, texts=texts, vocab_size=a.vocab, seed=a.seed, hidden_size=a.hidden, layers=a.layers,
                           pretrain_steps=a.pretrain_steps)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
