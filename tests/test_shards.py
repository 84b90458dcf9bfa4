"""Codec round trip against the exact teacher distribution, manifest errors, fingerprints."""

from __future__ import annotations

import json
import lzma
import struct
import zlib

import numpy as np
import pytest

from megadistil.data import Manifest, ProbCodec, decode_sample, encode_sample, tokenizer_fingerprint
from megadistil.data.shards import _LZMA_FILTERS, FORMAT_VERSION, _golomb_decode, _golomb_encode, golomb_parameter


def _kl_topk_tail(exact_lp: np.ndarray, ids: np.ndarray, dec) -> np.ndarray:
    """KL(exact || decoded) over the k+1 buckets (top-k + tail), float64, per position."""
    kl = np.zeros(len(ids))
    for t in range(len(ids)):
        q = dict(zip(dec.topk_ids[t].tolist(), dec.topk_logprobs[t].astype(np.float64)))
        p = exact_lp[t, ids[t]]
        kl[t] = np.sum(np.exp(p) * (p - np.array([q[i] for i in ids[t]])))
        if ids.shape[1] < exact_lp.shape[1]:  # k == vocab leaves an empty tail, which contributes nothing
            p_tail = np.log1p(-np.exp(np.logaddexp.reduce(p)))
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


@pytest.mark.parametrize("vocab,k", [(128256, 64), (1000, 1), (100, 99), (64, 64), (5, 2)])
def test_golomb_ids_round_trip_edge_values(vocab, k):
    rng = np.random.default_rng(k)
    rows = [np.arange(k), np.arange(vocab - k, vocab)] + [np.sort(rng.choice(vocab, k, replace=False)) for _ in range(6)]
    ids = np.stack(rows)
    assert np.array_equal(_golomb_decode(*_golomb_encode(ids, vocab), len(ids), k, vocab), ids)


def test_golomb_ids_cost_near_the_subset_entropy():
    """~log2 C(V, k) bits per position for random top-k sets (the old Elias-Fano code needed 830 bits at k=64)."""
    from math import lgamma, log

    vocab, k = 128256, 64
    rng = np.random.default_rng(0)
    ids = np.stack([np.sort(rng.choice(vocab, k, replace=False)) for _ in range(200)])
    bits = 8 * sum(map(len, _golomb_encode(ids, vocab))) / len(ids)
    entropy = (lgamma(vocab + 1) - lgamma(k + 1) - lgamma(vocab - k + 1)) / log(2)
    assert golomb_parameter(vocab, k) == 1367
    assert entropy < bits < entropy + 0.15 * k, (bits, entropy)


def _shaped_logprobs(shape: str, rows: int, vocab: int, rng) -> np.ndarray:
    """Next-token distributions of different shapes: peaked like a trained LM, flat top-k, near-uniform."""
    logits = rng.standard_normal((rows, vocab))
    if shape == "peaked":  # heavy top like a trained LM: entropy ~2 nats
        logits = logits * 6.0
    elif shape == "flat_topk":  # the worst case for the sqrt grid: every top-k value large
        logits[:, :64] += 6.0
        logits *= 0.3
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


@pytest.mark.parametrize("shape", ["peaked", "flat_topk", "uniform"])
@pytest.mark.parametrize("k", [16, 64, 128])
def test_kl_budget_holds_for_any_distribution_shape(shape, k):
    vocab = 20000
    lp = _shaped_logprobs(shape, 64, vocab, np.random.default_rng(k))
    ids = np.argsort(-lp, axis=1)[:, :k]
    dec = decode_sample(encode_sample(np.zeros(64, dtype=np.int64), ids, np.take_along_axis(lp, ids, 1),
                                      vocab_size=vocab), seq_len=64, top_k=k, vocab_size=vocab)
    kl = _kl_topk_tail(lp, ids, dec)
    assert kl.mean() <= min(1e-3, 1.15 * ProbCodec().kl_budget), (shape, k, kl.mean())
    assert kl.max() <= 2.5 * ProbCodec().kl_budget


def test_peaked_llama3_vocab_teacher_kl_and_bytes():
    """Peaked (entropy ~2 nats) 128,256-vocab distributions: KL <= 1e-3 and the measured size stays put."""
    vocab, k, seq = 128256, 64, 64
    rng = np.random.default_rng(3)
    lp = _shaped_logprobs("peaked", seq, vocab, rng)
    entropy = -(np.exp(lp) * lp).sum(1).mean()
    assert 1.0 < entropy < 4.0
    ids = np.argsort(-lp, axis=1)[:, :k]
    sample = encode_sample(rng.integers(0, vocab, seq), ids, np.take_along_axis(lp, ids, 1), vocab_size=vocab)
    dec = decode_sample(sample, seq_len=seq, top_k=k, vocab_size=vocab)
    assert np.array_equal(np.sort(dec.topk_ids, 1), np.sort(ids, 1))
    assert _kl_topk_tail(lp, ids, dec).mean() <= 1e-3
    # ids ~99.4 B + tokens 2.1 B + probs; the format-1 codec took ~155 B/token here
    assert len(sample["bin"]) / seq < 145


def test_old_format_is_rejected_with_its_version(tmp_path):
    with pytest.raises(ValueError, match="format-1 sample"):
        decode_sample({"json": b'{"v":1}', "bin": b"x"}, seq_len=8, top_k=4, vocab_size=100)
    (tmp_path / "manifest.json").write_text('{"format_version": 1}')
    with pytest.raises(ValueError, match=f"format_version 1, this reader knows {FORMAT_VERSION}"):
        Manifest.load(tmp_path)


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
        decode_sample({}, seq_len=8, top_k=4, vocab_size=100)
    with pytest.raises(ValueError, match="seq_len 9"):
        decode_sample(sample, seq_len=9, top_k=4, vocab_size=100)


def _manifest(**kw) -> Manifest:
    base = {"vocab_size": 384, "top_k": 16, "temperature": 1.0, "seq_len": 64, "teacher_fingerprint": "t",
                "tokenizer_fingerprint": "abc"}
    return Manifest(**{**base, **kw})


def test_manifest_save_load_and_compatibility(tmp_path):
    _manifest().save(tmp_path)
    m = Manifest.load(tmp_path)
    assert m.vocab_size == 384 and m.codec == ProbCodec()
    m.check_compatible(vocab_size=384, tokenizer_fingerprint="abc")
    m.check_compatible(vocab_size=384, tokenizer_fingerprint=None)
    m.check_compatible(vocab_size=385, tokenizer_fingerprint="abc")  # the same tokenizer, heads padded apart: the
    m.check_compatible(vocab_size=383, tokenizer_fingerprint="abc")  # trainer folds ids past the student's rows
    with pytest.raises(ValueError, match="manifest vocab_size 384 > student vocab_size 383"):
        m.check_compatible(vocab_size=383, tokenizer_fingerprint=None)  # nothing says the tokens are the student's
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


# ---------------------------------------------------------------- cross-tokenizer samples and manifests

# encode_sample(_OLD_TOKENS, _OLD_IDS, log([.5, .2, .1]) per row, vocab_size=50) as written before the cross-tokenizer
# fields existed (format 2): plain samples must keep reading and writing exactly this.
_OLD_TOKENS = np.array([33, 40, 1, 40, 23, 25])
_OLD_IDS = np.array([[14, 48, 30], [27, 20, 18], [2, 0, 7], [36, 11, 31], [12, 47, 8], [19, 40, 5]])
_OLD_BIN = bytes.fromhex(
    "1792c7ec5e007b2276223a322c22736571223a362c226b223a332c2273697a6573223a7b22746f6b656e73223a352c2269645f756e6172"
    "79223a352c2269645f707265666978223a352c2269645f6578747261223a332c226c6576656c73223a32357d7d8680685d90527e9b0d20"
    "f1309616a0696580e00017001100001186607461f256f97b6645cffa7e74e20000")


def _split(blob: bytes) -> tuple[dict, dict[str, bytes]]:
    """(header, sections) of a sample's bin member."""
    (hlen,) = struct.unpack_from("<H", blob, 4)
    header, off, parts = json.loads(blob[6:6 + hlen]), 6 + hlen, {}
    for name, size in header["sizes"].items():
        parts[name], off = blob[off:off + size], off + size
    return header, parts


def _repack(header: dict, parts: dict[str, bytes]) -> dict[str, bytes]:
    """A bin member with a valid crc32 around `header` (sizes replaced by those of `parts`) and `parts`."""
    header = dict(header, sizes={n: len(b) for n, b in parts.items()})
    raw = json.dumps(header, separators=(",", ":")).encode()
    body = struct.pack("<H", len(raw)) + raw + b"".join(parts.values())
    return {"bin": struct.pack("<I", zlib.crc32(body)) + body}


def test_plain_samples_keep_the_old_bytes():
    lp = np.log(np.tile([0.5, 0.2, 0.1], (6, 1)))
    old = decode_sample({"bin": _OLD_BIN}, seq_len=6, top_k=3, vocab_size=50)
    assert old.kd_mask is None and np.array_equal(old.input_ids, _OLD_TOKENS)
    assert np.array_equal(np.sort(old.topk_ids, 1), np.sort(_OLD_IDS, 1))
    plain = encode_sample(_OLD_TOKENS, _OLD_IDS, lp, vocab_size=50)["bin"]
    explicit = encode_sample(_OLD_TOKENS, _OLD_IDS, lp, vocab_size=50, target_vocab_size=50, kd_mask=None)["bin"]
    assert plain == explicit
    # the old layout byte for byte; the LZMA stream is compared decompressed (its bytes belong to liblzma's version)
    (h_new, p_new), (h_old, p_old) = _split(plain), _split(_OLD_BIN)
    assert list(h_new) == list(h_old) == ["v", "seq", "k", "sizes"] and list(h_new["sizes"]) == list(h_old["sizes"])
    assert dict(h_new, sizes=dict(h_new["sizes"], levels=0)) == dict(h_old, sizes=dict(h_old["sizes"], levels=0))
    assert {n: b for n, b in p_new.items() if n != "levels"} == {n: b for n, b in p_old.items() if n != "levels"}
    unlz = [lzma.decompress(p["levels"], format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS) for p in (p_new, p_old)]
    assert unlz[0] == unlz[1]
    if p_new["levels"] == p_old["levels"]:  # the same liblzma: the whole member
        assert plain == _OLD_BIN


@pytest.mark.parametrize("seq", [13, 16])
def test_cross_tokenizer_round_trip_mask_and_target_vocab(seq):
    vocab, target_vocab, k = 50, 3000, 16  # tokens: the student's ids; top-k: the teacher's (a larger vocab)
    rng = np.random.default_rng(seq)
    logits = rng.standard_normal((seq, target_vocab)) * 3.0
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-lp, axis=1)[:, :k]
    ids[0] = np.arange(target_vocab - k, target_vocab)  # the largest teacher ids survive the Golomb code
    tokens = rng.integers(0, vocab, seq)
    tokens[-1] = vocab - 1
    mask = rng.random(seq) < 0.7
    mask[:2] = [False, True]
    sample = encode_sample(tokens, ids, np.take_along_axis(lp, ids, 1), vocab_size=vocab,
                           target_vocab_size=target_vocab, kd_mask=mask)
    header, parts = _split(sample["bin"])
    assert header["tv"] == target_vocab and len(parts["aligned"]) == (seq + 7) // 8
    assert len(parts["tokens"]) == (seq * 6 + 7) // 8, "tokens keep the student's vocab's bit width"
    for kw in ({}, {"target_vocab_size": target_vocab, "aligned": True}):
        dec = decode_sample(sample, seq_len=seq, top_k=k, vocab_size=vocab, **kw)
        assert np.array_equal(dec.input_ids, tokens)
        assert np.array_equal(np.sort(dec.topk_ids, 1), np.sort(ids, 1))
        assert dec.kd_mask.dtype == bool and np.array_equal(dec.kd_mask, mask)
        assert _kl_topk_tail(lp, ids, dec).mean() <= 1e-3
    with pytest.raises(ValueError, match="top-k ids are over a vocab of 3000, the manifest says 50"):
        decode_sample(sample, seq_len=seq, top_k=k, vocab_size=vocab, target_vocab_size=vocab)
    with pytest.raises(ValueError, match="manifest is not cross-tokenizer"):
        decode_sample(sample, seq_len=seq, top_k=k, vocab_size=vocab, aligned=False)
    with pytest.raises(ValueError, match=r"topk_ids span \[\d+, 2999\], outside a vocab of 50"):
        encode_sample(tokens, ids, np.take_along_axis(lp, ids, 1), vocab_size=vocab)
    with pytest.raises(ValueError, match=r"kd_mask has shape \(3,\)"):
        encode_sample(tokens, ids, np.take_along_axis(lp, ids, 1), vocab_size=vocab, target_vocab_size=target_vocab,
                      kd_mask=mask[:3])


def test_aligned_section_missing_or_wrong_size_is_refused():
    lp = np.log(np.tile([0.5, 0.2, 0.1], (6, 1)))
    masked = encode_sample(_OLD_TOKENS, _OLD_IDS + 100, lp, vocab_size=50, target_vocab_size=200,
                           kd_mask=np.ones(6, dtype=bool))
    header, parts = _split(masked["bin"])
    kw = {"seq_len": 6, "top_k": 3, "vocab_size": 50, "target_vocab_size": 200, "aligned": True}
    with pytest.raises(ValueError, match="section aligned has 2 bytes, expected 1"):
        decode_sample(_repack(header, dict(parts, aligned=b"\xff\xff")), **kw)
    plain = _repack(header, {n: b for n, b in parts.items() if n != "aligned"})
    with pytest.raises(ValueError, match="no 'aligned' section: cross-tokenizer shards carry the mask"):
        decode_sample(plain, **kw)
    assert decode_sample(plain, **{**kw, "aligned": None}).kd_mask is None


def test_cross_tokenizer_manifest_fields(tmp_path):
    _manifest().save(tmp_path)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    for name in ("target_vocab_size", "teacher_tokenizer_fingerprint", "alignment"):
        del raw[name]  # a manifest written before these fields existed
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    old = Manifest.load(tmp_path)
    assert not old.cross_tokenizer and old.target_vocab == 384 and old.target_vocab_size == 0

    cross = _manifest(target_vocab_size=300, teacher_tokenizer_fingerprint="teach", alignment="byte boundaries")
    cross.save(tmp_path)
    m = Manifest.load(tmp_path)
    assert m.cross_tokenizer and m.target_vocab == 300 and m.teacher_tokenizer_fingerprint == "teach"
    m.check_compatible(vocab_size=384, tokenizer_fingerprint="abc")
    m.check_compatible(vocab_size=512, tokenizer_fingerprint="abc")  # padded student embeddings: the tokens fit
    with pytest.raises(ValueError, match="manifest vocab_size 384 > student vocab_size 383"):
        m.check_compatible(vocab_size=383, tokenizer_fingerprint="abc")
    with pytest.raises(ValueError, match="tokenizer_fingerprint abc != student tokenizer fingerprint teach"):
        m.check_compatible(vocab_size=384, tokenizer_fingerprint="teach")  # the student's tokenizer is checked

    _manifest(target_vocab_size=300).save(tmp_path)
    with pytest.raises(ValueError, match="target_vocab_size 300 without a teacher_tokenizer_fingerprint"):
        Manifest.load(tmp_path)
    _manifest(teacher_tokenizer_fingerprint="abc").save(tmp_path)
    with pytest.raises(ValueError, match="teacher_tokenizer_fingerprint is the student's"):
        Manifest.load(tmp_path)


def test_encodings_describe_the_cross_tokenizer_sections():
    from megadistil.data.shards import encodings_description

    plain = encodings_description(ProbCodec(), 384, 16)
    cross = encodings_description(ProbCodec(), 384, 16, target_vocab_size=128256, aligned=True)
    assert "aligned" not in plain and "|aligned" not in plain["layout"] and "vocab_size" not in plain["topk_ids"]
    assert cross["layout"].endswith("tokens|id_unary|id_prefix|id_extra|levels|aligned (sizes in the header)")
    assert cross["topk_ids"]["vocab_size"] == 128256 and "packbits" in cross["aligned"]
    assert cross["topk_ids"]["golomb_m"] == golomb_parameter(128256, 16) != plain["topk_ids"]["golomb_m"]
    assert cross["tokens"] == plain["tokens"] == "uint9 bit-packed, MSB first"


def _one_sample_shard_dir(tmp_path):
    """A shard dir of one sample (plain ids, no tokenizer): what inspect_shards reads."""
    import webdataset as wds

    from megadistil.data.shards import ShardInfo

    rng = np.random.default_rng(0)
    lp = np.log(np.full((8, 4), 1 / 64))
    sample = encode_sample(rng.integers(0, 64, 8), np.tile(np.arange(4), (8, 1)), lp, vocab_size=64)
    with wds.TarWriter(str(tmp_path / "s.tar")) as tar:
        tar.write({"__key__": "k0", **sample})
    _manifest(vocab_size=64, top_k=4, seq_len=8, shards=[ShardInfo("s.tar", 1, 0, "0" * 64)]).save(tmp_path)
    return tmp_path


def test_inspect_names_a_truncated_shard_and_a_missing_tokenizer(tmp_path, capsys):
    """A cut tar was a tarfile.ReadError traceback (exit 1), and a --tokenizer that is no directory was dropped for
    raw ids without a word."""
    from megadistil.data.inspect import describe
    from tools.inspect_shards import main

    shards = _one_sample_shard_dir(tmp_path)
    assert "sample k0 (first 4 positions" in describe(shards)
    missing = tmp_path / "nope"
    assert main([str(shards), "--tokenizer", str(missing)]) == 2
    assert capsys.readouterr().err == f"inspect_shards: error: --tokenizer {missing}: not a directory\n"
    tar = shards / "s.tar"
    tar.write_bytes(tar.read_bytes()[:100])
    assert main([str(shards)]) == 2
    assert capsys.readouterr().err == (f"inspect_shards: error: {tar}: not a readable tar shard (truncated header); "
                                       "it is corrupt or truncated\n")


def test_levels_that_expand_past_their_size_are_refused_before_they_do():
    """A sample (valid crc32) whose levels section is an LZMA2 bomb (100 MB of zeros in 15 kB), cut short, or padded:
    refused naming the section, reading at most one byte past the expected size (it expanded whole first)."""
    lp = np.log(np.tile([0.5, 0.2, 0.1], (6, 1)))
    header, parts = _split(encode_sample(_OLD_TOKENS, _OLD_IDS, lp, vocab_size=50)["bin"])
    levels = lzma.decompress(parts["levels"], format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    squeeze = lambda raw: lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    cases = {squeeze(bytes(10**8)): "expand past the 24 bytes expected", squeeze(levels + b"\0"): "expand past",
             parts["levels"][:-4]: "cut short|do not decompress", squeeze(levels[:-1]): "hold 23 bytes, expected 24"}
    for bad, message in cases.items():
        with pytest.raises(ValueError, match=message):
            decode_sample(_repack(header, {**parts, "levels": bad}), seq_len=6, top_k=3, vocab_size=50)
