"""BitLinear forward+backward speed on this machine, measured side by side in one run.

Prints the machine's GEMM table (int8 / bf16 / fp32 GFLOP/s, the CPU's model name, the kernel `auto` chose) and
the cost of a BitLinear MLP block against float32 nn.Linear + LoRA of the same shapes, then writes
bench/results/bitlinear.json. Rows (--tokens tokens through d -> ffn -> d, LoRA rank --rank, W frozen):

  linear+lora     float32 nn.Linear (frozen W) + LoRA: what a LoRA fine-tune costs, no quantization
  bitlinear       megadistil BitLinear with the defaults: kernel auto, the dtype model.dtype=auto gives here,
                  quantizers compiled where bitnet.compile_quantizers=null compiles them (CUDA; --compile: here too)
  bitlinear+kept  the same, with each layer's ternary codes kept for its backward (activation checkpointing)
  fake-quant/bf16 naive BitNet QAT (STE fake-quant in bf16, F.linear, plain autograd)  } measured where the device
  bitlinear/int8  BitLinear, int8 kernel, bf16 activations                             } has int8 units (--all:
  ... compiled    the same two with torch.compile'd quantizers (compile_quantizers)    } always)

Targets: bitlinear at most 2.5x linear+lora on any CPU; bitlinear/int8 at least 1.8x faster than fake-quant/bf16
wherever int8 units exist (both eager, and both compiled).

  python bench/bitlinear.py [--tokens 1024] [--dims 1024x4096] [--rank 64] [--repeat 7] [--compile] [--all]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megadistil.bitnet import BitLinear, Kernel, compile_by_default, hardware, kernels, q3, q8, quant, resolve_dtype
from megadistil.distributed import set_up_cpu_rank

DEVICE = torch.device("cpu")


def timed_rows(rows: dict[str, Callable[[], None]], repeat: int) -> dict[str, float]:
    """Median ms of each row over `repeat` rounds, the rows interleaved within a round: a shared VM's speed drifts
    by ±15 % from second to second, and interleaving puts that drift on every row alike."""
    for fn in rows.values():
        fn()  # warm-up (and compilation)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeat):
        for name, fn in rows.items():
            kernels.synchronize(DEVICE)
            start = time.perf_counter()
            fn()
            kernels.synchronize(DEVICE)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def gemm_table(repeat: int, size: int) -> dict[str, float]:
    """GFLOP/s of a size^3 product on int8 codes with each kernel: the ceiling of every row below."""
    return kernels.measure_gflops([Kernel.int8, Kernel.bf16, Kernel.fp32], DEVICE, (size, size, size), repeat)


def _param(*shape, dtype, scale, grad=False):
    return (torch.randn(*shape, dtype=dtype, device=DEVICE) * scale).requires_grad_(grad)


def linear_lora_block(dims: list[tuple[int, int]], rank: int, dtype: torch.dtype):
    weights = [(_param(o, i, dtype=dtype, scale=0.02), _param(rank, i, dtype=dtype, scale=0.01, grad=True),
                _param(o, rank, dtype=dtype, scale=0.01, grad=True)) for i, o in dims]

    def fn(x):
        for W, A, B in weights:
            x = F.linear(x, W) + F.linear(F.linear(x, A), B)
        return x
    return fn


def fake_quant_block(dims: list[tuple[int, int]], rank: int, dtype: torch.dtype):
    weights = [(_param(o, i, dtype=dtype, scale=0.02), _param(rank, i, dtype=dtype, scale=0.01, grad=True),
                _param(o, rank, dtype=dtype, scale=0.01, grad=True)) for i, o in dims]

    def fn(x):
        for W, A, B in weights:
            x = F.linear(q8(x), q3(W + B @ A))
        return x
    return fn


def bitlinear_block(dims: list[tuple[int, int]], rank: int, dtype: torch.dtype, kernel: Kernel, keep: bool = False):
    layers = []
    for d_in, d_out in dims:
        layer = BitLinear(d_in, d_out, lora_rank=rank, kernel=kernel, dtype=dtype, device=DEVICE)
        with torch.no_grad():
            layer.weight.normal_(0, 0.02)
            layer.lora_B.normal_(0, 0.01)
        layer.keep_weight_codes = keep
        layers.append(layer)

    def fn(x):
        for layer in layers:
            x = layer(x)
        return x
    return fn


def fwd_bwd(fn, tokens: int, d: int, dtype: torch.dtype, compiled: bool) -> Callable[[], None]:
    """One forward+backward through `fn`, with the quantizers compiled or eager (a process-wide switch, set per row)."""
    x = torch.randn(tokens, d, dtype=dtype, device=DEVICE, requires_grad=True)

    def run():
        quant.compile_quantizers(compiled)
        fn(x).float().square().mean().backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--dims", default="1024x4096", help="d x ffn: the block is d -> ffn -> d")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7, help="interleaved rounds; each row's median is reported")
    parser.add_argument("--compile", action="store_true", help="the bitlinear rows with compiled quantizers on a CPU too")
    parser.add_argument("--all", action="store_true", help="measure the int8 rows even without int8 units")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu_check.sh: Llama-3.1-8B shapes)")
    parser.add_argument("--gemm-size", type=int, default=1024)
    parser.add_argument("--out", default="bench/results/bitlinear.json")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    d, ffn = (int(v) for v in args.dims.split("x"))
    dims = [(d, ffn), (ffn, d)]
    # as a training rank runs: its share of the cores, malloc keeping freed blocks (on a VM a fresh page costs a fault)
    malloc_kept = DEVICE.type == "cpu" and set_up_cpu_rank(local_world_size=1)
    hw = hardware(DEVICE)
    dtype = resolve_dtype("auto", hw)
    compiled = compile_by_default(True if args.compile else None, DEVICE)
    gemm = gemm_table(args.repeat, args.gemm_size)
    print(f"machine: {hw.name} ({hw.capability}; int8/bf16 units: {', '.join(hw.units) or 'none'}), "
          f"{torch.get_num_threads()} threads{', malloc keeps freed blocks' if malloc_kept else ''}, "
          f"torch {torch.__version__}")
    # A kernel without units (ONEDNN_MAX_CPU_ISA capped below VNNI) can still read fast: oneDNN's int8 GEMM without
    # VNNI saturates its int16 pair sums. BitLinear never runs it there; the table says so.
    print(f"GEMM {args.gemm_size}^3 on int8 codes, GFLOP/s: " + ", ".join(
        f"{k} {v:.1f}{'' if k == 'fp32' or k in hw.units else ' (no units: unused)'}" for k, v in gemm.items()))
    print(f"auto: kernel {hw.kernel.value}, model dtype {str(dtype).removeprefix('torch.')}; "
          f"{args.tokens} tokens through {d} -> {ffn} -> {d}, LoRA rank {args.rank}, compiled quantizers {compiled}")
    paths = {"linear+lora": fwd_bwd(linear_lora_block(dims, args.rank, torch.float32), args.tokens, d, torch.float32,
                                    compiled),
             "bitlinear": fwd_bwd(bitlinear_block(dims, args.rank, dtype, hw.kernel), args.tokens, d, dtype, compiled),
             "bitlinear+kept": fwd_bwd(bitlinear_block(dims, args.rank, dtype, hw.kernel, keep=True), args.tokens, d,
                                       dtype, compiled)}
    if "int8" in hw.units or args.all:
        bf16 = torch.bfloat16
        for suffix, fused in (("", False), (" compiled", True)):
            paths["fake-quant/bf16" + suffix] = fwd_bwd(fake_quant_block(dims, args.rank, bf16), args.tokens, d, bf16,
                                                        fused)
            paths["bitlinear/int8" + suffix] = fwd_bwd(bitlinear_block(dims, args.rank, bf16, Kernel.int8),
                                                       args.tokens, d, bf16, fused)
    rows = timed_rows(paths, args.repeat)
    base = rows["linear+lora"]
    print(f"{'path':<25} {'fwd+bwd ms':>10} {'vs linear+lora':>15}")
    for name, ms in rows.items():
        print(f"{name:<25} {ms:>10.1f} {ms / base:>14.2f}x")
    result = {"machine": hw.as_dict(), "threads": torch.get_num_threads(), "malloc_kept": malloc_kept,
              "torch": torch.__version__, "args": vars(args), "gemm_gflops": gemm, "quantizers_compiled": compiled,
              "dtype": str(dtype).removeprefix("torch."), "rows_ms": rows,
              "bitlinear_vs_linear_lora": rows["bitlinear"] / base}
    print(f"target: bitlinear <= 2.50x linear+lora: {result['bitlinear_vs_linear_lora']:.2f}x")
    if "bitlinear/int8" in rows:
        for suffix, key in (("", "int8_speedup_vs_fake_quant"), (" compiled", "int8_speedup_vs_fake_quant_compiled")):
            result[key] = rows["fake-quant/bf16" + suffix] / rows["bitlinear/int8" + suffix]
            print(f"target: bitlinear/int8 >= 1.80x faster than fake-quant/bf16{suffix or ' (both eager)'}: "
                  f"{result[key]:.2f}x")
    else:
        print("target: bitlinear/int8 vs fake-quant/bf16: n/a, this device has no int8 units (--all measures it anyway)")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
