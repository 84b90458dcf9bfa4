"""What a BitNet student gains at inference, measured in llama.cpp on this CPU, side by side in one run.

For each model, the same ternary weights are written as TQ2_0, TQ1_0, F16 and Q8_0 GGUFs (tools/convert_to_ternary.py
--format gguf), and llama.cpp (llama-cpp-python, `make llama-cpp`) measures prompt processing (one batch of --prompt
tokens) and generation (--gen single-token steps) tokens/s, median of --repeats. Models:
  demo      the demo's teacher shape (hidden 256, 4 layers, MLP 680: its down_proj rows are not whole 256-blocks)
  llama-1b  a random Llama-3.2-1B shape (hidden 2048, 16 layers, MLP 8192, GQA 32/8, vocab 128,256, tied embedding;
            Llama-3.1's rope scaling); speed does not depend on the values
The ternary files keep embeddings and output head in f16 (llama.cpp's converter does the same), plus one TQ2_0 file
with them in q8_0; the F16 and Q8_0 files store every tensor in that type. Writes bench/results/inference.json.
Targets (issue 13): TQ2_0 generation >= 2.5x F16 at ~1B; decoder linears <= 0.2x their F16 bytes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from megadistil.bitnet.kernels import cpu_model_name
from megadistil.export.gguf import GGUFConfig, export_gguf
from megadistil.export.llamacpp import measure_speed
from megadistil.export.sources import BaseModel, StudentParts
from megadistil.export.ternary import student_spec
from megadistil.tiny import write_random_llama

REPO = Path(__file__).resolve().parents[1]
DEMO_TEACHER = REPO / "megadistil" / "assets" / "demo-teacher"
# (name, linear type, other tensors' type)
FILES = [("TQ2_0", "tq2_0", "f16"), ("TQ2_0 + q8_0 embeddings", "tq2_0", "q8_0"), ("TQ1_0", "tq1_0", "f16"),
         ("F16", "f16", "f16"), ("Q8_0", "q8_0", "q8_0")]


def llama_1b(path: Path) -> Path:
    """A random Llama-3.2-1B-shaped base in bf16, written a layer at a time, the demo's tokenizer."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      max_position_embeddings=131072, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    return write_random_llama(path, cfg, DEMO_TEACHER, dtype=torch.bfloat16)


def ternary_of(base: BaseModel) -> tuple[StudentParts, object]:
    """The base's own weights as the student (LoRA B = 0): the ternary model of the same shapes."""
    names = [n.removesuffix(".weight") for n in base.names()
             if n.endswith("_proj.weight") and len(base.shape(n)) == 2]
    shapes = {}
    for m in names:
        out, inp = base.shape(f"{m}.weight")
        shapes |= {f"{m}.lora_A": (1, inp), f"{m}.lora_B": (out, 1)}
    parts = StudentParts({n: (lambda s=s: torch.zeros(s)) for n, s in shapes.items()}, shapes)
    run_config = OmegaConf.create({"bitnet": {"lora_rank": 1, "lora_alpha": None, "exclude": []}})
    return parts, student_spec(parts, run_config, torch.bfloat16)


def bench_model(name: str, base_dir: Path, work: Path, args) -> list[dict]:
    base = BaseModel(base_dir)
    parts, spec = ternary_of(base)
    rows = []
    for label, linear, other in FILES:
        out = work / f"{name}-{linear}-{other}.gguf"
        r = export_gguf(base, parts, spec, out, GGUFConfig(linear, other, overwrite=True, progress=False))
        speed = measure_speed(out, args.prompt, args.gen, args.repeats)
        rows.append({"model": name, "file": label, "file_bytes": r.sizes["file_bytes"],
                     "linear_bytes": r.sizes["linear_bytes"], "linear_vs_f16": r.sizes["linear_vs_f16"], **speed})
        print(f"  {label:<24} {r.sizes['file_bytes'] / 2**20:9.1f} MiB  linears {r.sizes['linear_vs_f16']:.3f}x f16  "
              f"pp {speed['pp_tokens_per_s']:8.1f} tok/s  tg {speed['tg_tokens_per_s']:7.2f} tok/s", flush=True)
        out.unlink()
    f16 = next(r for r in rows if r["file"] == "F16")
    for r in rows:
        r |= {"pp_vs_f16": r["pp_tokens_per_s"] / f16["pp_tokens_per_s"],
              "tg_vs_f16": r["tg_tokens_per_s"] / f16["tg_tokens_per_s"], "file_vs_f16": r["file_bytes"] / f16["file_bytes"]}
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | file | size MiB | x F16 | decoder linears x F16 | pp tok/s | x F16 | tg tok/s | x F16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['file']} | {r['file_bytes'] / 2**20:.1f} | {r['file_vs_f16']:.3f} | "
              f"{r['linear_vs_f16']:.3f} | {r['pp_tokens_per_s']:.1f} | {r['pp_vs_f16']:.2f} | "
              f"{r['tg_tokens_per_s']:.2f} | {r['tg_vs_f16']:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,llama-1b")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "inference.json"))
    args = p.parse_args()
    print(f"machine: {cpu_model_name()}; llama.cpp via llama-cpp-python; pp{args.prompt} / tg{args.gen}, "
          f"median of {args.repeats}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="megadistil-inference-") as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            print(f"{name}:", flush=True)
            base = DEMO_TEACHER if name == "demo" else llama_1b(work / "llama-1b")
            rows += bench_model(name, base, work, args)
    print(table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": cpu_model_name(), "prompt": args.prompt, "gen": args.gen,
                                          "repeats": args.repeats, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
