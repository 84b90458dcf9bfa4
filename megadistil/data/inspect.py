"""Human-readable summary of a shard directory (backs tools/inspect_shards.py)."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds

from megadistil.data.shards import Manifest, decode_sample


def describe(shard_dir: str | os.PathLike, *, sample: int = 0, positions: int = 4, show_k: int = 5,
             tokenizer: str | None = None) -> str:
    # A tokenizer asked for by name is not dropped for ids the way a missing default one is: the user meant it.
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer {tokenizer}: not a directory")
    m = Manifest.load(shard_dir)
    tokens = m.seq_len * m.total_samples
    total_bytes = sum(s.bytes for s in m.shards)
    lines = [
        (f"manifest: format {m.format_version}  vocab {m.vocab_size}  k {m.top_k}  T {m.temperature}  "
         f"seq_len {m.seq_len}"),
        f"teacher {m.teacher} ({m.teacher_fingerprint})  tokenizer {m.tokenizer_fingerprint}",
        f"encodings: {json.dumps(m.encodings)}",
        (f"{len(m.shards)} shards  {m.total_samples} sequences  {tokens} tokens  {total_bytes / 1e6:.2f} MB  "
         f"{total_bytes / max(tokens, 1):.1f} bytes/token (tar overhead included)"),
    ]
    if m.cross_tokenizer:
        lines.append(f"cross-tokenizer: tokens are the student's, top-k ids the teacher's (vocab {m.target_vocab}, "
                     f"tokenizer {m.teacher_tokenizer_fingerprint}); {m.alignment}")
    lines += [f"  {s.name}: {s.samples} samples  {s.bytes} B  sha256 {s.sha256[:16]}..." for s in m.shards[:20]]
    raw = _raw_sample(Path(shard_dir) / m.shards[0].name, sample)
    if raw is None:
        raise ValueError(f"{m.shards[0].name}: has no sample {sample}")
    dec = decode_sample(raw, seq_len=m.seq_len, top_k=m.top_k, vocab_size=m.vocab_size, codec=m.codec,
                        target_vocab_size=m.target_vocab)
    teacher_tok = _tokenizer(m.teacher)
    student_tok = _tokenizer(tokenizer or (m.args.get("student_tokenizer") if m.cross_tokenizer else m.teacher))
    show_token, show = (_shower(tok) for tok in (student_tok, teacher_tok))
    lines.append(f"sample {raw['__key__']} (first {positions} positions; prob at T={m.temperature}):")
    for t in range(min(positions, m.seq_len)):
        cands = ", ".join(f"{show(i)} {np.exp(lp):.3f}" for i, lp in zip(dec.topk_ids[t, :show_k],
                                                                          dec.topk_logprobs[t, :show_k]))
        aligned = "" if dec.kd_mask is None else ("  (aligned)" if dec.kd_mask[t] else "  (no teacher target)")
        lines.append(f"  [{t}] token {show_token(dec.input_ids[t])} -> {cands}  tail "
                     f"{np.exp(dec.tail_logmass[t]):.4f}{aligned}")
    return "\n".join(lines)


def verify(shard_dir: str | os.PathLike) -> tuple[str, bool]:
    """Every shard's size and sha256 against the manifest (reads every byte): (report, all match)."""
    m = Manifest.load(shard_dir)
    bad = m.mismatched_shards(shard_dir, sha256=True)
    lines = [f"  {name}: {why}" for name, why in bad.items()]
    head = (f"{len(m.shards)} shards, {sum(s.bytes for s in m.shards)} bytes: " +
            ("all match the manifest (size and sha256)" if not bad else f"{len(bad)} differ from the manifest"))
    return "\n".join([head, *lines]), not bad


def _raw_sample(path: Path, sample: int) -> dict | None:
    """The shard's `sample`-th raw sample (None past its end); a corrupt or truncated tar is named, not a traceback."""
    raws = wds.tariterators.tarfile_samples([{"url": str(path)}])
    try:
        return next((r for i, r in enumerate(raws) if i == sample), None)
    except tarfile.TarError as exc:  # webdataset appends the stream and url to the reason: keep the reason alone
        raise ValueError(f"{path}: not a readable tar shard ({exc.args[0] if exc.args else exc}); "
                         "it is corrupt or truncated") from None


def _shower(tok):
    return (lambda i: repr(tok.decode([int(i)]))) if tok is not None else str


def _tokenizer(path: str | None):
    if not path or not Path(path).is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
