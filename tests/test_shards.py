"""Codec round trip against the exact teacher distribution, manifest errors, fingerprints."""

from __future__ import annotations

import numpy as np
import pytest

from megadistil.data import Manifest, ProbCodec, decode_sample, encode_sample, tokenizer_fingerprint
from megadistil.data.shards import _gamma_decode, _gamma_encode


def _kl_topk_tail(exact_lp: np.ndarray, ids: np.ndarray, dec) -> np.ndarray:
    """KL(exact || decoded) over the k+1 buckets (top-k + tail), float64, per position."""
    kl = np.zeros(len(ids))
    for t in range(len(ids)):
        q = dict(zip(dec.topk_ids[t].tolist(), dec.topk_logprobs[t].astype(np.float64)))
        p = exact_lp[t, ids[t]]
        kl[t] = np.sum(np.exp(p) * (p - np.array([q[i] for i in ids[t]])))
        p_tail = np.log1p(-np.exp(np.logaddexp.reduce(p)))
        if np.isfinite(p_tail):  # k == vocab leaves an empty tail, which contributes nothing
            kl[t] += np.exp(p_tail) * (p_tail - dec.tail_logmass[t])
    return kl


@pytest.mark.parametrize("vocab,k,scale", [(384, 16, 3.0), (32000, 64, 3.0), (5000, 128, 0.05), (64, 64, 2.0)])
def test_round_trip_synthetic(vocab, k, scale):
    rng = np.random.default_rng(vocab + k)
    logits = rng.standard_normal((48, vocab)) * scale
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-lp, axis=1)[:, :k]
    tokens = rng.integers(0, vocab, 48)
    dec = decode_sample(encode_sample(tokens, ids, np.take_along_axis(lp, ids, 1), vocab_size=vocab),
                        seq_len=48, top_k=k, vocab_size=vocab)
    assert np.array_equal(dec.input_ids, tokens)
    assert np.array_equal(np.sort(dec.topk_ids, 1), np.sort(ids, 1))
    assert np.all(np.diff(dec.topk_logprobs, axis=1) <= 0), "top-k must come sorted by descending prob"
    mass = np.exp(dec.topk_logprobs.astype(np.float64)).sum(1) + np.exp(dec.tail_logmass.astype(np.float64))
    np.testing.assert_allclose(mass[k < vocab], 1.0, atol=2e-3)
    assert _kl_topk_tail(lp, ids, dec).mean() <= 1e-3


def test_gamma_codes_round_trip_edge_values():
    v = np.array([1, 2, 3, 4, 7, 8, 255, 256, 1 << 20, (1 << 20) - 1, 1])
    assert np.array_equal(_gamma_decode(*_gamma_encode(v), v.size), v)


def test_teacher_round_trip_exact_ids_and_kl(tiny_llama_dir):
    """Tiny random Llama (peaked head): decoded ids = exact top-k, mean KL <= 1e-3 vs float64 distribution."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64).eval()
    vocab, k = model.config.vocab_size, 32
    ids_in = torch.randint(0, vocab, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = torch.log_softmax(model(ids_in).logits[0] / 0.8, -1).numpy()
    top = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    dec = decode_sample(encode_sample(ids_in[0].numpy(), top, np.take_along_axis(lp, top, 1), vocab_size=vocab),
                        seq_len=96, top_k=k, vocab_size=vocab)
    assert np.array_equal(np.sort(dec.topk_ids, 1), np.sort(top, 1))
    # where the quantised probs differ, the order must be the exact order
    exact_rank = np.argsort(np.argsort(-lp, axis=1), axis=1)
    ranks = np.take_along_axis(exact_rank, dec.topk_ids, 1)
    strict = np.diff(dec.topk_logprobs, axis=1) < 0
    assert np.all(np.diff(ranks, axis=1)[strict] > 0)
    kl = _kl_topk_tail(lp, top, dec)
    assert kl.mean() <= 1e-3, kl.mean()


def test_corrupted_bytes_are_rejected():
    rng = np.random.default_rng(0)
    lp = np.log(np.full((8, 4), 0.2))
    sample = encode_sample(rng.integers(0, 100, 8), np.tile(np.arange(4), (8, 1)), lp, vocab_size=100)
    bad = dict(sample, bin=sample["bin"][:5] + bytes([sample["bin"][5] ^ 1]) + sample["bin"][6:])
    with pytest.raises(ValueError, match="crc32"):
        decode_sample(bad, seq_len=8, top_k=4, vocab_size=100)
    with pytest.raises(ValueError, match="truncated"):
        decode_sample(dict(sample, bin=sample["bin"][:-3]), seq_len=8, top_k=4, vocab_size=100)
    with pytest.raises(ValueError, match="missing member"):
        decode_sample({"json": sample["json"]}, seq_len=8, top_k=4, vocab_size=100)
    with pytest.raises(ValueError, match="seq_len 9"):
        decode_sample(sample, seq_len=9, top_k=4, vocab_size=100)


def _manifest(**kw) -> Manifest:
    base = dict(vocab_size=384, top_k=16, temperature=1.0, seq_len=64, teacher_fingerprint="t",
                tokenizer_fingerprint="abc")
    return Manifest(**{**base, **kw})


def test_manifest_save_load_and_compatibility(tmp_path):
    _manifest().save(tmp_path)
    m = Manifest.load(tmp_path)
    assert m.vocab_size == 384 and m.codec == ProbCodec()
    m.check_compatible(vocab_size=384, tokenizer_fingerprint="abc")
    m.check_compatible(vocab_size=384, tokenizer_fingerprint=None)
    with pytest.raises(ValueError, match="vocab_size 384 != student vocab_size 385"):
        m.check_compatible(vocab_size=385, tokenizer_fingerprint="abc")
    with pytest.raises(ValueError, match="tokenizer_fingerprint abc != student tokenizer fingerprint xyz"):
        m.check_compatible(vocab_size=384, tokenizer_fingerprint="xyz")


def test_manifest_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 99}')
    with pytest.raises(ValueError, match="format_version 99"):
        Manifest.load(tmp_path)


def test_tokenizer_fingerprint_tracks_vocab(tiny_llama_dir):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(tiny_llama_dir)
    b = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.add_tokens(["<extra_tok>"])
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
