"""Teacher-output shard format: bytes/token, reconstruction KL, codec and loader throughput.

    .venv/bin/python bench/shards.py [--seq-len 2048] [--sequences 8]

seq_len 2048 is the real setting: per-sample tar overhead (one 512-byte member header + padding) amortises
over it. Columns ids/lvl/tok are the bytes/token of the top-k id, probability-level and input-token sections.

Teachers are tiny random Llamas (1 layer) with the given vocab; "peaked" scales the LM head so the next-token
entropy resembles a trained model's (a few nats), "random" leaves init weights (near-uniform distributions).
Also: the bytes one pass of 16 slots reads from 2 shards (slots whose ranges start inside a shard), seeking vs
streaming each piece from its shard's start. Writes bench/results/shards.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistil.data import Manifest, ShardInfo, ShardStream, decode_sample, encode_sample
from megadistil.data.precompute import PrecomputeConfig, run_precompute
from megadistil.data.shards import check_raw_sample, sha256_file
from megadistil.data.stream import _SlotSource
from tests.conftest import _stdlib_text, _train_tokenizer


def make_teacher(root: Path, vocab: int, head_scale: float) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _train_tokenizer(384)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    out = root / f"teacher-{vocab}-{head_scale}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def exact_logprobs(teacher: Path, ids: np.ndarray, temperature: float) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float64).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.from_numpy(ids)[None]).logits[0] / temperature, -1).numpy()


def mean_kl(lp: np.ndarray, dec, k: int) -> float:
    """KL(exact || decoded) over the decoded k ids + the rest; exact in float64.

    Uses the decoded id set, not the float64 top-k: the teacher ran in float32, so on near-uniform rows the k-th
    and (k+1)-th ids can swap, which would make a float64-top-k KL infinite without any codec error.
    """
    ids = dec.topk_ids.astype(np.int64)
    p = np.take_along_axis(lp, ids, 1)
    q = dec.topk_logprobs.astype(np.float64)
    kl = (np.exp(p) * (p - q)).sum(1)
    with np.errstate(divide="ignore"):
        p_rest = np.log1p(-np.minimum(np.exp(np.logaddexp.reduce(p, axis=1)), 1.0))
    rest = np.where(np.isfinite(p_rest), np.exp(p_rest) * (p_rest - dec.tail_logmass.astype(np.float64)), 0.0)
    return float(np.mean(kl + rest))


def first_sample(out: Path, m: Manifest):
    import webdataset as wds

    raw = next(iter(wds.tariterators.tarfile_samples([{"url": str(out / m.shards[0].name)}])))
    return raw, decode_sample(raw, seq_len=m.seq_len, top_k=m.top_k, vocab_size=m.vocab_size, codec=m.codec)


def codec_throughput(raw, m: Manifest, dec) -> tuple[float, float]:
    kw = {"seq_len": m.seq_len, "top_k": m.top_k, "vocab_size": m.vocab_size, "codec": m.codec}
    n = 5
    t = time.perf_counter()
    for _ in range(n):
        decode_sample(raw, **kw)
    dec_s = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        encode_sample(dec.input_ids, dec.topk_ids, dec.topk_logprobs, vocab_size=m.vocab_size, codec=m.codec)
    enc_s = (time.perf_counter() - t) / n
    return m.seq_len / enc_s, m.seq_len / dec_s


def section_bytes_per_token(raw, m: Manifest) -> dict[str, float]:
    header = check_raw_sample(raw, seq_len=m.seq_len, top_k=m.top_k, vocab_size=m.vocab_size)
    sizes = header["sizes"]
    ids = sizes["id_unary"] + sizes["id_prefix"] + sizes["id_extra"]
    return {"ids_B": ids / m.seq_len, "levels_B": sizes["levels"] / m.seq_len, "tokens_B": sizes["tokens"] / m.seq_len}


def loader_tokens_per_s(out: Path, workers: int, batches: int) -> float:
    stream = ShardStream(out, batch_size=2, num_workers=workers, shuffle_buffer=4)
    it = iter(stream)
    next(it)  # worker start-up is not throughput
    t = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += next(it)["input_ids"].numel()
    rate = tokens / (time.perf_counter() - t)
    it.close()
    return rate


def _rchar() -> int:
    """Bytes this process has read through read syscalls (Linux), page-cache hits included."""
    return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])


def slot_read_bytes(root: Path, seq_len: int, slots: int = 16, shards: int = 2, per_shard: int = 32) -> dict:
    """Bytes that one pass of each of `slots` slots (ranks x loader workers) reads from `shards` shards, over the
    shards' size. Most slots' ranges start inside a shard: "seek" is the reader (headers only up to its range),
    "stream" reads each piece as a tar stream from its shard's start, as the reader did before (webdataset)."""
    import webdataset as wds

    out, rng, k, vocab = root / "slot-reads", np.random.default_rng(0), 64, 128256
    out.mkdir()
    infos = []
    for s in range(shards):
        tar = out / f"s{s}.tar"
        with wds.TarWriter(str(tar), encoder=False, mtime=0.0) as tw:  # mtime as precompute writes it (pax headers)
            for i in range(per_shard):
                ids = np.stack([np.sort(rng.choice(vocab, k, replace=False)) for _ in range(seq_len)])
                lp = np.log(np.sort(rng.dirichlet(np.full(k + 1, 0.3), seq_len)[:, :k], 1)[:, ::-1] + 1e-9)
                tw.write({"__key__": f"s{s}-{i:06d}", **encode_sample(rng.integers(0, vocab, seq_len), ids, lp,
                                                                       vocab_size=vocab)})
        infos.append(ShardInfo(tar.name, per_shard, tar.stat().st_size, sha256_file(tar)))
    m = Manifest(vocab_size=vocab, top_k=k, temperature=1.0, seq_len=seq_len, teacher_fingerprint="bench",
                 tokenizer_fingerprint="bench", shards=infos)
    total = sum(i.bytes for i in infos)
    sources = [_SlotSource(out, m, s, slots, 0, "fail") for s in range(slots)]
    before = _rchar()
    for src in sources:
        for _ in src._pass(0):
            pass
    seek = _rchar() - before
    before = _rchar()
    for src in sources:
        for shard, lo, hi in src.pieces:
            for count, _ in enumerate(wds.tariterators.tarfile_samples([{"url": str(out / infos[shard].name)}]), 1):
                if count == hi and hi < per_shard:
                    break
    stream = _rchar() - before
    return {"slots": slots, "shards": shards, "samples_per_shard": per_shard, "sample_kB": total / 1e3 / len(
        infos) / per_shard, "seek_read_ratio": seek / total, "stream_read_ratio": stream / total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--sequences", type=int, default=8)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = root / "corpus.txt"
        text.write_text("\n".join(_stdlib_text()))
        for vocab, kind, scale in [(128256, "random", 1.0), (128256, "peaked", 40.0), (384, "peaked", 20.0)]:
            teacher = make_teacher(root, vocab, scale)
            lp_cache = {}
            for k in (16, 50, 64, 128):
                out = root / f"s-{vocab}-{kind}-{k}"
                m = run_precompute(PrecomputeConfig(teacher=str(teacher), text=[str(text)], out=str(out),
                                                    seq_len=args.seq_len, top_k=k, max_sequences=args.sequences,
                                                    progress=False, batch_size=2))
                raw, dec = first_sample(out, m)
                key = tuple(dec.input_ids[:8])
                if key not in lp_cache:
                    lp_cache[key] = exact_logprobs(teacher, dec.input_ids, m.temperature)
                lp = lp_cache[key]
                entropy = float(-(np.exp(lp) * lp).sum(1).mean())
                enc_tps, dec_tps = codec_throughput(raw, m, dec)
                row = {"vocab": vocab, "teacher": kind, "entropy_nats": round(entropy, 2), "k": k,
                       "bytes_per_token": sum(s.bytes for s in m.shards) / (m.total_samples * m.seq_len),
                       "kl_mean": mean_kl(lp, dec, k), "encode_tok_s": enc_tps, "decode_tok_s": dec_tps}
                if k == 64:
                    for w in (0, 1, 2):
                        row[f"loader_tok_s_w{w}"] = loader_tokens_per_s(out, w, batches=8)
                row.update(section_bytes_per_token(raw, m))
                rows.append(row)
                print(json.dumps(row), flush=True)
        reads = slot_read_bytes(root, args.seq_len)
    print()
    print(f"{'vocab':>7} {'teacher':>7} {'H':>5} {'k':>4} {'B/tok':>7} {'KL':>9} {'enc tok/s':>10} {'dec tok/s':>10}"
          f" {'ids':>6} {'lvl':>6} {'tok':>5} {'load w0':>9} {'w1':>9} {'w2':>9}")
    for r in rows:
        load = " ".join(f"{r.get(f'loader_tok_s_w{w}', float('nan')):9.0f}" for w in (0, 1, 2))
        print(f"{r['vocab']:7d} {r['teacher']:>7} {r['entropy_nats']:5.2f} {r['k']:4d} {r['bytes_per_token']:7.1f} "
              f"{r['kl_mean']:9.2e} {r['encode_tok_s']:10.0f} {r['decode_tok_s']:10.0f} {r['ids_B']:6.1f} "
              f"{r['levels_B']:6.1f} {r['tokens_B']:5.2f} {load}")
    print(f"\none pass of {reads['slots']} slots over {reads['shards']} shards of {reads['samples_per_shard']} "
          f"samples ({reads['sample_kB']:.0f} kB each) reads {reads['seek_read_ratio']:.2f}x the shards' bytes "
          f"(streaming each piece from its shard's start: {reads['stream_read_ratio']:.2f}x)")
    res = Path(__file__).resolve().parent / "results"
    res.mkdir(exist_ok=True)
    (res / "shards.json").write_text(json.dumps({"args": vars(args), "rows": rows, "slot_reads": reads}, indent=1))


if __name__ == "__main__":
    main()
