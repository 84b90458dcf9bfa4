"""One table of the performance figures that the bench/ scripts wrote to bench/results/, with the targets beside them.

`make bench` runs every bench script, then this. Missing results are listed as such, never invented.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def bitlinear_rows(d) -> list[tuple[str, str, str]]:
    gemm = d["gemm_gflops"]
    rows = [(f"GEMM GFLOP/s on int8 codes, {d['machine']['name']} (int8 / bf16 / fp32)",
             f"{gemm['int8']:.1f} / {gemm['bf16']:.1f} / {gemm['fp32']:.1f}", "-"),
            (f"BitLinear fwd+bwd (kernel {d['machine']['kernel']}, {d['dtype']}) vs float32 Linear+LoRA",
             f"{d['bitlinear_vs_linear_lora']:.2f}x", "<= 2.50x")]
    if "int8_speedup_vs_fake_quant" in d:
        rows.append(("BitLinear int8 fwd+bwd vs bf16 fake-quant", f"{d['int8_speedup_vs_fake_quant']:.2f}x", ">= 1.80x"))
        if "int8_speedup_vs_fake_quant_compiled" in d:
                rows.append(("the same, both with compiled quantizers",
                         f"{d['int8_speedup_vs_fake_quant_compiled']:.2f}x", ">= 1.80x"))
    else:
        rows.append(("BitLinear int8 fwd+bwd vs bf16 fake-quant", "n/a", ">= 1.80x where int8 units exist"))
    return rows


def shards_rows(d) -> list[tuple[str, str, str]]:
    rows = []
    for r in d["rows"]:
        if r["vocab"] == 128256 and r["k"] == 64:
            rows.append((f"shard bytes/token, V=128,256, k=64, {r['teacher']} teacher (KL {r['kl_mean']:.1e})",
                         f"{r['bytes_per_token']:.1f}", "<= 128 (KL <= 1e-3)"))
    return rows


def losses_rows(d) -> list[tuple[str, str, str]]:
    naive = next(r for r in d if r["mode"] == "naive")
    return [(f"chunked loss peak extra memory, chunk {r['chunk']} ({r['mode']})",
             f"{r['peak_extra_mib']:.0f} MiB", f"< naive {naive['peak_extra_mib']:.0f} MiB")
            for r in d if r["mode"] != "naive"]


def distill_rows(d) -> list[tuple[str, str, str]]:
    rows = []
    for dtype in ("bf16", "fp32"):
        if dtype not in d:
            continue
        runs = d[dtype]["runs"]
        a, c = runs["a"], runs["c"]
        rows.append((f"distill step ({dtype}): shared-teacher ReLoRA peak RSS / naive",
                     f"{a['peak_rss_mb'] / c['peak_rss_mb']:.2f}x", "<= 0.25x"))
        rows.append((f"distill step ({dtype}): shared-teacher ReLoRA tokens/s / naive",
                     f"{a['tokens_per_s'] / c['tokens_per_s']:.2f}x", ">= 1.50x"))
    return rows


def inference_rows(d) -> list[tuple[str, str, str]]:
    rows = []
    for r in d["rows"]:
        if r["model"] == "llama-1b" and r["file"] in ("TQ2_0", "TQ1_0"):
            rows.append((f"llama.cpp generation tok/s, {r['file']} / F16, ~1B ({d['machine']})",
                         f"{r['tg_vs_f16']:.2f}x", ">= 2.50x" if r["file"] == "TQ2_0" else "-"))
            rows.append((f"decoder linears' bytes, {r['file']} / F16, ~1B", f"{r['linear_vs_f16']:.3f}x", "<= 0.20x"))
    return rows


def main() -> None:
    table: list[tuple[str, str, str]] = []
    missing = []
    for name, rows in (("bitlinear", bitlinear_rows), ("shards", shards_rows), ("losses", losses_rows),
                       ("distill_step", distill_rows), ("inference", inference_rows)):
        d = load(name)
        if d is None:
            missing.append(name)
        else:
            table += rows(d)
    width = max(len(r[0]) for r in table) if table else 20
    print(f"{'figure':<{width}}  {'measured':>12}  target")
    for what, value, target in table:
        print(f"{what:<{width}}  {value:>12}  {target}")
    for name in missing:
        print(f"(no results for bench/{name}.py: run it)")


if __name__ == "__main__":
    main()
