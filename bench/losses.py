"""Chunked LM-head KD loss vs the naive [N, V]-logits loss: time and peak memory of forward+backward.

Each case runs in a fresh subprocess; peak memory is the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs after the inputs exist), so it counts every allocation of the step itself.
Usage: python bench/losses.py [--tokens 2048] [--hidden 512] [--vocab 128256] [--chunk 1024]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _naive_step(h, W, labels, sparse, T):
    """What the chunked loss replaces: full logits, autograd through everything (forward KL + tail bucket)."""
    logq = torch.log_softmax((h @ W.T) / T, -1)
    q_top = logq.gather(-1, sparse.topk_ids).exp()
    q_tail = (1 - q_top.sum(-1)).clamp_min(1e-12)
    p_top = sparse.topk_logprobs.exp()
    kd = (p_top * (sparse.topk_logprobs - q_top.log())).sum(-1)
    p_tail = sparse.tail_logmass.exp()
    kd = kd + p_tail * (sparse.tail_logmass - q_tail.log())
    return (T * T * kd)[labels != -100].mean()


def run_case(mode: str, N: int, H: int, V: int, chunk: int) -> dict:
    from megadistil.distill import LossConfig, SparseTarget, chunked_lm_head_loss

    torch.manual_seed(0)
    h = torch.randn(N, H).requires_grad_()
    W = (torch.randn(V, H) * H**-0.5).requires_grad_()
    labels = torch.randint(0, V, (N,))
    k, T = 64, 1.0
    ids = torch.stack([torch.randperm(V)[:k] for _ in range(8)]).repeat(N // 8 + 1, 1)[:N]
    logprobs = torch.log_softmax(torch.randn(N, k), -1) - 0.05
    sparse = SparseTarget(ids, logprobs, torch.log1p(-logprobs.exp().sum(-1)))
    cfg = LossConfig(kind="forward_kl", temperature=T, chunk_tokens=chunk)
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_mib("VmRSS")
    start = time.perf_counter()
    if mode == "chunked":
        loss = chunked_lm_head_loss(h, W, labels, cfg, sparse=sparse)["loss"]
    elif mode == "live":  # shared-weight live teacher: dense teacher distribution per chunk
        teacher_h = h.detach() + 0.1
        loss = chunked_lm_head_loss(h, W, labels, cfg, teacher_hidden=teacher_h, teacher_lm_head_weight=W)["loss"]
    else:
        loss = _naive_step(h, W, labels, sparse, T)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"mode": mode, "tokens": N, "hidden": H, "vocab": V, "chunk": chunk if mode != "naive" else None,
            "seconds": round(seconds, 3), "peak_extra_mib": round(_rss_mib("VmHWM") - base, 1),
            "logits_fp32_mib": round(N * V * 4 / 2**20, 1), "loss": loss.item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.tokens, args.hidden, args.vocab, args.chunk)))
        return
    rows = []
    cases = (("naive", args.chunk), ("chunked", args.chunk), ("chunked", args.chunk // 4), ("live", args.chunk // 4))
    for mode, chunk in cases:
        cmd = [sys.executable, __file__, "--case", mode, "--tokens", str(args.tokens), "--hidden", str(args.hidden),
               "--vocab", str(args.vocab), "--chunk", str(chunk)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    print(f"forward+backward, N={args.tokens} tokens, H={args.hidden}, V={args.vocab}, forward KL "
          "(naive/chunked: top-64 sparse target; live: dense shared-weight teacher)")
    print(f"{'mode':<8} {'chunk':>6} {'seconds':>8} {'peak MiB':>9} {'[N,V] fp32 MiB':>15} {'loss':>10}")
    for r in rows:
        print(f"{r['mode']:<8} {r['chunk'] or '-':>6} {r['seconds']:>8.3f} {r['peak_extra_mib']:>9.1f} "
              f"{r['logits_fp32_mib']:>15.1f} {r['loss']:>10.5f}")
    out = Path(__file__).parent / "results" / "losses.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
