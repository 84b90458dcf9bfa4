"""BitLinear forward+backward speed and saved-activation bytes, measured side by side in one run.

Prints one table and writes bench/results/bitlinear.json. Rows, at Llama-like shapes (bf16 activations):
  linear+lora   plain bf16 nn.Linear (frozen W) + LoRA: what a LoRA fine-tune costs, no quantization
  fake-quant    naive BitNet QAT: STE fake-quant of x and W_eff in bf16, F.linear, plain autograd
  bitlinear/bf16  megadistil BitLinear, int8 forward, bf16 input gradient
  bitlinear/int8  megadistil BitLinear, int8 forward, int8 input gradient
  int8+kept     as int8, with the layer's ternary codes kept for its backward (what activation checkpointing allows)
The target is int8 >= 1.8x faster than fake-quant where the CPU has int8 matrix units; the int8/bf16 GEMM ratio of
this machine, printed first, is the ceiling.

  python bench/bitlinear.py [--tokens 2048] [--shapes 4096x4096,4096x14336] [--rank 64] [--repeat 3] [--compile]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import torch
import torch.nn.functional as F

from megadistil.bitnet import BitLinear, q3, q8
from megadistil.bitnet import quant


def timed(fn, repeat: int) -> float:
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def saved_bytes(fn, params) -> int:
    ptrs = {p.data_ptr() for p in params}
    seen = {}

    def pack(t):
        if t.data_ptr() not in ptrs:
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def gemm_ceiling(tokens: int, d_in: int, d_out: int, repeat: int) -> dict:
    a8 = torch.randint(-127, 128, (tokens, d_in), dtype=torch.int8)
    b8 = torch.randint(-1, 2, (d_in, d_out), dtype=torch.int8)
    a16, b16 = a8.bfloat16(), b8.bfloat16()
    int8_ms = timed(lambda: torch._int_mm(a8, b8), repeat)
    bf16_ms = timed(lambda: a16 @ b16, repeat)
    return {"int8_gemm_ms": int8_ms, "bf16_gemm_ms": bf16_ms, "ceiling": bf16_ms / int8_ms}


def make_cases(d_in: int, d_out: int, rank: int):
    torch.manual_seed(0)
    W = torch.randn(d_out, d_in, dtype=torch.bfloat16) * 0.02
    A = (torch.randn(rank, d_in, dtype=torch.bfloat16) * 0.01).requires_grad_()
    B = (torch.randn(d_out, rank, dtype=torch.bfloat16) * 0.01).requires_grad_()

    def linear_lora(x):
        return F.linear(x, W) + F.linear(F.linear(x, A), B)

    def fake_quant(x):
        w_eff = W + B @ A
        return F.linear(q8(x), q3(w_eff))

    def bitlinear(mode, keep=False):
        layer = BitLinear(d_in, d_out, lora_rank=rank, backward=mode, dtype=torch.bfloat16)
        with torch.no_grad():
            layer.weight.copy_(W), layer.lora_A.copy_(A), layer.lora_B.copy_(B)
        layer.keep_weight_codes = keep
        return layer

    return {
        "linear+lora": (linear_lora, [W, A, B]),
        "fake-quant": (fake_quant, [W, A, B]),
        "bitlinear/bf16": (layer := bitlinear("bf16"), list(layer.parameters())),
        "bitlinear/int8": (layer := bitlinear("int8"), list(layer.parameters())),
        "int8+kept": (layer := bitlinear("int8", keep=True), list(layer.parameters())),
    }


def measure(tokens: int, d_in: int, d_out: int, rank: int, repeat: int) -> list[dict]:
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, d_out, dtype=torch.bfloat16)
    rows = []
    for name, (fn, params) in make_cases(d_in, d_out, rank).items():
        ms = timed(lambda: fn(x).backward(grad), repeat)
        rows.append({"shape": f"{d_in}x{d_out}", "path": name, "fwd_bwd_ms": ms,
                     "saved_bytes_per_token": saved_bytes(lambda: fn(x), params) / tokens})
    fake = next(r["fwd_bwd_ms"] for r in rows if r["path"] == "fake-quant")
    for r in rows:
        r["speedup_vs_fake_quant"] = fake / r["fwd_bwd_ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--shapes", default="4096x4096,4096x14336")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the quantizers (fused single pass)")
    parser.add_argument("--out", default="bench/results/bitlinear.json")
    args = parser.parse_args()
    if args.compile:
        quant.compile_quantizers()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ceiling = gemm_ceiling(args.tokens, *shapes[0], args.repeat)
    rows = [row for d_in, d_out in shapes for row in measure(args.tokens, d_in, d_out, args.rank, args.repeat)]
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"machine: {machine}; tokens {args.tokens}, LoRA rank {args.rank}, compiled quantizers: {args.compile}")
    print(f"GEMM ceiling {shapes[0][0]}x{shapes[0][1]}: int8 {ceiling['int8_gemm_ms']:.1f} ms, "
          f"bf16 {ceiling['bf16_gemm_ms']:.1f} ms -> {ceiling['ceiling']:.2f}x")
    print(f"{'shape':<11} {'path':<15} {'fwd+bwd ms':>10} {'vs fake-quant':>13} {'saved B/token':>13}")
    for r in rows:
        print(f"{r['shape']:<11} {r['path']:<15} {r['fwd_bwd_ms']:>10.1f} {r['speedup_vs_fake_quant']:>12.2f}x "
              f"{r['saved_bytes_per_token']:>13.0f}")
    print("target: bitlinear/int8 >= 1.80x vs fake-quant (ceiling above)")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "args": vars(args), "gemm": ceiling, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
