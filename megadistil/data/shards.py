"""Byte format of teacher-output shards: codec, sample layout, manifest, fingerprints.

One tar sample = one packed sequence of ``seq_len`` tokens in a single member ``<key>.bin`` (one member, not
two: each tar member costs a 512-byte header plus padding). Its layout (no pickle, no npy):

``crc32(rest) u32 LE | header length u16 LE | JSON header (format version, seq, k, section sizes) | sections``

Per token position t the teacher's next-token distribution at temperature T is stored as:

- top-k ids, *sorted ascending*, as Golomb codes of the gaps ``id[j] - id[j-1] - 1`` with the parameter ``M``
  that is optimal for a random k-subset of the vocab (~12.4 bits/id at V=128,256, k=64, within 0.1 bit of
  log2 C(V, k) / k). Three bit streams so that numpy decodes them without a Python loop: unary quotients,
  ``b-1`` fixed remainder bits per id, one extra bit for the ids whose remainder needs ``b`` bits
  (truncated binary). The descending-probability order is recovered from the decoded probabilities (ties:
  ascending id).
- the k probabilities (in id order) and the tail mass ``1 - sum(top-k)`` as the (k+1)-th value, each quantised to
  an integer level ``rint(sqrt(p) / delta + log(p) / c)``. KL(p || q) ~= 2 * sum (sqrt p - sqrt q)^2, so a uniform
  grid in sqrt(p) spends the error budget evenly: each value costs ~delta^2 / 6 nats on average (uniform rounding),
  whatever its size; ``delta = sqrt(6 * kl_budget / (k + 1))`` makes ``kl_budget`` the rows' mean reconstruction KL
  (a row's own can reach a few times it: measured against float64, the worst of a row is ~1-4x the budget). The log term keeps tiny
  values (and the tail) away from zero with steps of at most ``c`` nats. Levels are one byte each (two if the grid
  needs more than 256 levels) and the level bytes are entropy-coded with raw LZMA2 (stdlib ``lzma``), which comes
  within ~1% of their order-0 entropy and also exploits repeated positions. Decoded values are renormalised over
  the k+1 buckets, so top-k mass + tail mass = 1.
- input token ids bit-packed with ``ceil(log2 V)`` bits.
- optional, cross-tokenizer shards only (a teacher with another tokenizer; see megadistil.data.crosstok): the top-k
  ids are the *teacher's* vocabulary ids, Golomb-coded against the teacher's vocab size (the header then holds it as
  ``"tv"``; the tokens stay the student's, coded against ``vocab_size``), and a last section ``aligned``: the mask of
  student positions that have a teacher target, ``np.packbits`` of S bools (ceil(S/8) bytes). Rows at unaligned
  positions are placeholders that the loss never reads. Without these, a sample is byte for byte the plain layout.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import lzma
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megadistil.distill.losses import TAIL_LOGMASS_FLOOR
from megadistil.utils import write_atomic

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
LOGP_FLOOR = -60.0  # probabilities below e^-60 are stored as e^-60; they carry no mass worth a bit
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 1 << 22, "lc": 0, "lp": 0, "pb": 0}]


class ShardFormatError(ValueError):
    """A shard, sample or manifest that does not decode; the message names the shard and key."""


# ---------------------------------------------------------------- bit helpers


def _pack_fixed(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative ints into `width` bits each, MSB first."""
    if width == 0 or values.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = ((values.reshape(-1, 1).astype(np.int64) >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_fixed(buf: bytes, count: int, width: int) -> np.ndarray:
    if width == 0:
        return np.zeros(count, dtype=np.int64)
    if len(buf) < _fixed_nbytes(count, width):
        raise ValueError(f"fixed-width stream holds {len(buf)} bytes, needs {_fixed_nbytes(count, width)}")
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=count * width).reshape(count, width)
    weights = (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
    return bits.astype(np.int64) @ weights


def _fixed_nbytes(count: int, width: int) -> int:
    return (count * width + 7) // 8


def _unary_encode(values: np.ndarray) -> bytes:
    """values >= 0 as `value` zeros then a one, concatenated."""
    ends = np.cumsum(values.astype(np.int64) + 1) - 1
    bits = np.zeros(int(ends[-1]) + 1 if values.size else 0, dtype=np.uint8)
    bits[ends] = 1
    return np.packbits(bits).tobytes()


def _unary_decode(buf: bytes, count: int) -> np.ndarray:
    ends = np.flatnonzero(np.unpackbits(np.frombuffer(buf, dtype=np.uint8)))
    if ends.size < count:
        raise ValueError(f"unary stream holds {ends.size} codes, expected {count}")
    return np.diff(ends[:count], prepend=-1) - 1


# ---------------------------------------------------------------- Golomb-coded sorted top-k ids


def golomb_parameter(vocab_size: int, k: int) -> int:
    """Optimal Golomb M for the gaps of a random k-subset of range(vocab_size) (Gallager & van Voorhis)."""
    p = (k + 1) / (vocab_size + 1)  # gaps are ~geometric with mean (V - k) / (k + 1)
    if p >= 0.5:
        return 1
    return max(1, math.ceil(math.log(2 - p) / -math.log1p(-p)))


def _golomb_encode(sorted_ids: np.ndarray, vocab_size: int) -> tuple[bytes, bytes, bytes]:
    _rows, k = sorted_ids.shape
    m = golomb_parameter(vocab_size, k)
    gaps = np.diff(sorted_ids.astype(np.int64), axis=1, prepend=-1).reshape(-1) - 1
    q, r = np.divmod(gaps, m)
    if m == 1:
        return _unary_encode(q), b"", b""
    b = (m - 1).bit_length()
    u = (1 << b) - m  # remainders below u take b-1 bits, the others b bits (truncated binary)
    long = r >= u
    code = np.where(long, r + u, r << 1)  # b bits; short codes end in a dropped 0 bit
    return _unary_encode(q), _pack_fixed(code >> 1, b - 1), np.packbits((code[long] & 1).astype(np.uint8)).tobytes()


def _golomb_decode(unary: bytes, prefix: bytes, extra: bytes, rows: int, k: int, vocab_size: int) -> np.ndarray:
    n, m = rows * k, golomb_parameter(vocab_size, k)
    q = _unary_decode(unary, n)
    if m == 1:
        r = np.zeros(n, dtype=np.int64)
    else:
        b = (m - 1).bit_length()
        u = (1 << b) - m
        x = _unpack_fixed(prefix, n, b - 1)
        long = x >= u
        bits = np.unpackbits(np.frombuffer(extra, dtype=np.uint8))
        if bits.size < int(long.sum()):
            raise ValueError(f"Golomb extra-bit stream holds {bits.size} bits, needs {int(long.sum())}")
        r = x.copy()
        r[long] = (x[long] << 1) + bits[: int(long.sum())] - u
    ids = np.cumsum((q * m + r + 1).reshape(rows, k), axis=1) - 1
    if ids[:, -1].max(initial=0) >= vocab_size:
        raise ValueError(f"decoded top-k ids reach {int(ids[:, -1].max())} >= vocab size {vocab_size}")
    return ids


# ---------------------------------------------------------------- probability codec


@dataclass(frozen=True)
class ProbCodec:
    """Quantiser for probabilities (see the module docstring); its resolved fields are stored in the manifest.

    ``delta=None`` derives the sqrt-grid step from k so that the rows' mean reconstruction KL is ``kl_budget`` whatever
    the teacher's distribution looks like, a row's worst a few times it (measured: bench/shards.py,
    tests/test_shards.py).
    """

    kl_budget: float = 8e-4
    c: float = 4.0
    delta: float | None = None

    def resolved(self, k: int) -> ProbCodec:
        delta = self.delta if self.delta is not None else math.sqrt(6.0 * self.kl_budget / (k + 1))
        if not 0.0 < delta <= 1.0 or self.c <= 0.0:
            raise ValueError(f"ProbCodec needs 0 < delta <= 1 and c > 0, got delta={delta} c={self.c}")
        return dataclasses.replace(self, delta=delta)

    def _f(self, logp: np.ndarray) -> np.ndarray:
        assert self.delta is not None, "call resolved(k) first"
        return np.exp(0.5 * logp) / self.delta + logp / self.c

    @property
    def level_range(self) -> tuple[int, int]:
        return int(np.floor(self._f(np.float64(LOGP_FLOOR)))), int(np.ceil(self._f(np.float64(0.0))))

    def level(self, logp: np.ndarray) -> np.ndarray:
        logp = np.clip(np.nan_to_num(logp.astype(np.float64), nan=LOGP_FLOOR), LOGP_FLOOR, 0.0)
        return np.rint(self._f(logp)).astype(np.int64)

    def logp_of_level(self, levels: np.ndarray) -> np.ndarray:
        lo, hi = self.level_range
        if levels.size and (levels.min() < lo or levels.max() > hi):
            raise ValueError(f"probability levels outside [{lo}, {hi}]")
        return _level_table(self)[levels - lo]


@functools.lru_cache(maxsize=32)
def _level_table(codec: ProbCodec) -> np.ndarray:
    """log p at every integer level (F is increasing: bisection on log p), built once per codec."""
    lo, hi = codec.level_range
    target = np.arange(lo, hi + 1, dtype=np.float64)
    a, b = np.full(target.shape, LOGP_FLOOR - 10.0), np.full(target.shape, 1.0)
    for _ in range(60):
        mid = 0.5 * (a + b)
        above = codec._f(mid) > target
        b, a = np.where(above, mid, b), np.where(above, a, mid)
    table = np.minimum(0.5 * (a + b), 0.0)
    table.setflags(write=False)
    return table


def _log_tail(log_top: np.ndarray) -> np.ndarray:
    """log(1 - exp(log_top)) computed stably."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(log_top > -0.693, np.log(-np.expm1(log_top)), np.log1p(-np.exp(log_top)))


def _level_dtype(codec: ProbCodec) -> str:
    lo, hi = codec.level_range
    return "u1" if hi - lo < 256 else "<u2"


# ---------------------------------------------------------------- sample encode / decode


@dataclass
class TeacherSample:
    """One decoded sequence: token ids [S], top-k ids [S,k] (descending prob), log-probs [S,k], tail log-mass [S],
    and for cross-tokenizer shards the mask of positions with a teacher target (bool [S]; None: every position)."""

    input_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logmass: np.ndarray
    kd_mask: np.ndarray | None = None


def encode_sample(
    input_ids: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray, *, vocab_size: int,
    codec: ProbCodec = ProbCodec(), target_vocab_size: int | None = None, kd_mask: np.ndarray | None = None,
) -> dict[str, bytes]:
    """Encode one sequence. topk_logprobs are exact log-probs at temperature T (any order, matching topk_ids).

    input_ids index a vocab of `vocab_size`; topk_ids one of `target_vocab_size` (None: vocab_size; another value:
    a teacher with another tokenizer). `kd_mask` (bool [S]): the positions whose row is a real target, stored as the
    'aligned' section. Without both, the bytes are exactly the plain layout's.
    """
    seq, k = topk_ids.shape
    target_vocab = vocab_size if target_vocab_size is None else int(target_vocab_size)
    _check_range("input_ids", input_ids, vocab_size)
    _check_range("topk_ids", topk_ids, target_vocab)
    if kd_mask is not None and np.shape(kd_mask) != (seq,):
        raise ValueError(f"kd_mask has shape {np.shape(kd_mask)}, expected ({seq},)")
    codec = codec.resolved(k)
    order = np.argsort(topk_ids, axis=1, kind="stable")
    ids = np.take_along_axis(topk_ids.astype(np.int64), order, axis=1)
    logp = np.take_along_axis(topk_logprobs.astype(np.float64), order, axis=1)
    log_tail = _log_tail(np.minimum(np.logaddexp.reduce(logp, axis=1), 0.0))
    lo, _ = codec.level_range
    levels = (codec.level(np.concatenate([logp, log_tail[:, None]], axis=1)) - lo).astype(_level_dtype(codec))
    unary, prefix, extra = _golomb_encode(ids, target_vocab)
    sections = {
        "tokens": _pack_fixed(input_ids.astype(np.int64), _id_bits(vocab_size)),
        "id_unary": unary,
        "id_prefix": prefix,
        "id_extra": extra,
        "levels": lzma.compress(levels.tobytes(), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS),
    }
    if kd_mask is not None:
        sections["aligned"] = np.packbits(np.asarray(kd_mask, dtype=bool)).tobytes()
    fields: dict[str, Any] = {"v": FORMAT_VERSION, "seq": seq, "k": k,
                              "sizes": {n: len(b) for n, b in sections.items()}}
    if target_vocab != vocab_size:
        fields["tv"] = target_vocab
    header = json.dumps(fields, separators=(",", ":")).encode()
    body = struct.pack("<H", len(header)) + header + b"".join(sections.values())
    return {"bin": struct.pack("<I", zlib.crc32(body)) + body}


def _id_bits(vocab_size: int) -> int:
    return max(1, int(vocab_size - 1).bit_length())


def _check_range(name: str, ids: np.ndarray, vocab_size: int) -> None:
    """Ids outside [0, vocab) would be silently cut to their low bits by the bit packing."""
    if vocab_size < 1:
        raise ValueError(f"vocab size must be >= 1, got {vocab_size} (for {name})")
    if np.size(ids) and (np.min(ids) < 0 or np.max(ids) >= vocab_size):
        raise ValueError(f"{name} span [{np.min(ids)}, {np.max(ids)}], outside a vocab of {vocab_size}")


def check_raw_sample(sample: dict[str, Any], *, seq_len: int, top_k: int, vocab_size: int,
                     target_vocab_size: int | None = None, aligned: bool | None = None) -> dict[str, Any]:
    """Cheap validation before decoding (member, crc32, header, lengths); raises ValueError saying what is wrong.

    `target_vocab_size`: the vocab the top-k ids must index (None: whatever the sample says, i.e. its ``tv`` or
    vocab_size). `aligned`: True, the sample must carry the 'aligned' section (cross-tokenizer shards); False, it must
    not; None: either. Returns the header with an extra ``"offset"``: where the sections start in the member, and
    ``"tv"``: the vocab of the top-k ids.
    """
    if "json" in sample:
        raise ValueError(f"a format-1 sample (json+bin members); this reader knows format {FORMAT_VERSION}: "
                         "re-run precompute_teacher")
    if "bin" not in sample:
        raise ValueError("missing member(s) ['bin']")
    blob = sample["bin"]
    if len(blob) < 6:
        raise ValueError(f"bin member has {len(blob)} bytes (truncated?)")
    if zlib.crc32(blob[4:]) != struct.unpack_from("<I", blob)[0]:
        raise ValueError("crc32 mismatch (corrupted or truncated bytes)")
    (hlen,) = struct.unpack_from("<H", blob, 4)
    try:
        header = json.loads(blob[6:6 + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON ({exc})") from None
    if header.get("v") != FORMAT_VERSION:
        raise ValueError(f"sample format version {header.get('v')!r}, this reader knows {FORMAT_VERSION}")
    if header.get("seq") != seq_len or header.get("k") != top_k:
        raise ValueError(f"header (seq_len {header.get('seq')}, k {header.get('k')}) != "
                         f"(seq_len {seq_len}, k {top_k})")
    sizes = header["sizes"]
    tv = header.get("tv", vocab_size)
    if target_vocab_size is not None and tv != target_vocab_size:
        raise ValueError(f"top-k ids are over a vocab of {tv}, the manifest says {target_vocab_size}")
    if not isinstance(tv, int) or tv < 1:
        raise ValueError(f"header holds target vocab size {tv!r}")
    if aligned and "aligned" not in sizes:
        raise ValueError("no 'aligned' section: cross-tokenizer shards carry the mask of aligned positions")
    if aligned is False and "aligned" in sizes:
        raise ValueError("an 'aligned' section (a cross-tokenizer sample) in shards whose manifest is not "
                         "cross-tokenizer")
    expect = {"tokens": _fixed_nbytes(seq_len, _id_bits(vocab_size))}
    if "aligned" in sizes:
        expect["aligned"] = _fixed_nbytes(seq_len, 1)
    for name, size in expect.items():
        if sizes.get(name) != size:
            raise ValueError(f"section {name} has {sizes.get(name)} bytes, expected {size}")
    header["offset"], header["tv"] = 6 + hlen, tv
    if len(blob) != header["offset"] + sum(sizes.values()):
        raise ValueError(f"bin member has {len(blob)} bytes, header says {header['offset'] + sum(sizes.values())}")
    return header


def decode_tokens(sample: dict[str, Any], *, seq_len: int, top_k: int, vocab_size: int,
                  target_vocab_size: int | None = None, aligned: bool | None = None) -> np.ndarray:
    """Only the token ids of a raw sample (validated like decode_sample): for a run that does not read the targets."""
    header = check_raw_sample(sample, seq_len=seq_len, top_k=top_k, vocab_size=vocab_size,
                              target_vocab_size=target_vocab_size, aligned=aligned)
    return _unpack_fixed(sample["bin"][header["offset"]:header["offset"] + header["sizes"]["tokens"]], seq_len,
                         _id_bits(vocab_size))


def decode_sample(
    sample: dict[str, Any], *, seq_len: int, top_k: int, vocab_size: int, codec: ProbCodec = ProbCodec(),
    target_vocab_size: int | None = None, aligned: bool | None = None,
) -> TeacherSample:
    """Decode a raw sample (dict with 'bin' bytes). Raises ValueError on malformed input.

    target_vocab_size / aligned: what the manifest says (see check_raw_sample); kd_mask is None without the section.
    """
    header = check_raw_sample(sample, seq_len=seq_len, top_k=top_k, vocab_size=vocab_size,
                              target_vocab_size=target_vocab_size, aligned=aligned)
    target_vocab = header["tv"]
    codec = codec.resolved(top_k)
    blob, parts, off = sample["bin"], {}, header["offset"]
    for name, size in header["sizes"].items():
        parts[name] = blob[off:off + size]
        off += size
    tokens = _unpack_fixed(parts["tokens"], seq_len, _id_bits(vocab_size))
    ids = _golomb_decode(parts["id_unary"], parts["id_prefix"], parts["id_extra"], seq_len, top_k, target_vocab)
    dtype = np.dtype(_level_dtype(codec))
    expected = seq_len * (top_k + 1) * dtype.itemsize
    try:  # at most one byte past the expected size: a crafted sample cannot make it expand to gigabytes first
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
        raw_levels = decompressor.decompress(parts["levels"], max_length=expected + 1)
    except lzma.LZMAError as exc:
        raise ValueError(f"probability levels do not decompress ({exc})") from None
    if len(raw_levels) > expected:
        raise ValueError(f"probability levels expand past the {expected} bytes expected")
    if len(raw_levels) < expected or not decompressor.eof:
        raise ValueError(f"probability levels hold {len(raw_levels)} bytes{'' if decompressor.eof else ' (cut short)'}"
                         f", expected {expected}")
    levels = np.frombuffer(raw_levels, dtype=dtype).astype(np.int64).reshape(seq_len, top_k + 1)
    logq = codec.logp_of_level(levels + codec.level_range[0])
    if top_k >= target_vocab:
        logq[:, -1] = -np.inf  # the tail is exactly empty
    logq -= np.logaddexp.reduce(logq, axis=1, keepdims=True)
    logp, log_tail = logq[:, :-1], np.maximum(logq[:, -1], TAIL_LOGMASS_FLOOR)
    order = _desc_order(logp, ids)
    return TeacherSample(
        input_ids=tokens,
        topk_ids=np.take_along_axis(ids, order, axis=1),
        topk_logprobs=np.take_along_axis(logp, order, axis=1).astype(np.float32),
        tail_logmass=log_tail.astype(np.float32),
        kd_mask=(np.unpackbits(np.frombuffer(parts["aligned"], dtype=np.uint8), count=seq_len).astype(bool)
                 if "aligned" in parts else None),
    )


def _desc_order(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    # ids are ascending within a row, so a stable sort on -logp breaks ties by ascending id
    return np.argsort(-logp, axis=1, kind="stable")


# ---------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str
    tokens: int = 0


@dataclass
class Manifest:
    """manifest.json at the root of a shard directory; written last, atomically."""

    vocab_size: int
    top_k: int
    temperature: float
    seq_len: int
    teacher_fingerprint: str
    tokenizer_fingerprint: str
    encodings: dict[str, Any] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    teacher: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    # Cross-tokenizer shards (a teacher with another tokenizer): vocab_size and tokenizer_fingerprint are the
    # student's (the tokens are), the top-k ids index the teacher's vocab, and every sample carries the 'aligned' mask.
    target_vocab_size: int = 0  # the vocab the top-k ids index; 0: vocab_size
    teacher_tokenizer_fingerprint: str = ""  # set for cross-tokenizer shards only
    alignment: str = ""  # cross-tokenizer shards: how student positions were paired with teacher positions

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def cross_tokenizer(self) -> bool:
        """The teacher's tokenizer is not the student's: top-k ids are teacher ids, samples carry kd_mask."""
        return bool(self.teacher_tokenizer_fingerprint)

    @property
    def target_vocab(self) -> int:
        """The vocab size the top-k ids index (the teacher's)."""
        return self.target_vocab_size or self.vocab_size

    @property
    def codec(self) -> ProbCodec:
        p = self.encodings.get("topk_logprobs", {})
        delta = p.get("delta")
        return ProbCodec(kl_budget=float(p.get("kl_budget", ProbCodec.kl_budget)), c=float(p.get("c", ProbCodec.c)),
                         delta=None if delta is None else float(delta))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    def save(self, shard_dir: str | os.PathLike) -> Path:
        path = Path(shard_dir) / MANIFEST_NAME
        write_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, shard_dir: str | os.PathLike) -> Manifest:
        path = Path(shard_dir) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no manifest (is {shard_dir} a precompute_teacher output that finished?)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {raw.get('format_version')!r}, this reader knows "
                             f"{FORMAT_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}")
        try:
            raw["shards"] = [ShardInfo(**s) for s in raw.get("shards", [])]
            manifest = cls(**raw)
        except TypeError as exc:
            raise ValueError(f"{path}: bad manifest ({exc})") from None
        if manifest.target_vocab_size < 0 or (manifest.target_vocab_size and not manifest.cross_tokenizer):
            raise ValueError(f"{path}: target_vocab_size {manifest.target_vocab_size} without a "
                             "teacher_tokenizer_fingerprint (only cross-tokenizer shards have their own target vocab)")
        if manifest.cross_tokenizer and manifest.teacher_tokenizer_fingerprint == manifest.tokenizer_fingerprint:
            raise ValueError(f"{path}: teacher_tokenizer_fingerprint is the student's tokenizer_fingerprint "
                             "(shards of one tokenizer are not cross-tokenizer)")
        return manifest

    def mismatched_shards(self, shard_dir: str | os.PathLike, *, sha256: bool = False) -> dict[str, str]:
        """{shard name: what is wrong} for each listed shard that is missing or whose size (with sha256=True, also
        its digest, which reads every byte) is not the manifest's: a partial copy, a shard rewritten since."""
        out = {}
        for s in self.shards:
            path = Path(shard_dir) / s.name
            if not path.is_file():
                out[s.name] = "missing"
            elif path.stat().st_size != s.bytes:
                out[s.name] = f"{path.stat().st_size} bytes, the manifest says {s.bytes}"
            elif sha256 and sha256_file(path) != s.sha256:
                out[s.name] = f"sha256 {sha256_file(path)[:16]}..., the manifest says {s.sha256[:16]}..."
        return out

    def check_compatible(self, *, vocab_size: int, tokenizer_fingerprint: str | None) -> None:
        """Raise ValueError if a student with this vocab / tokenizer cannot learn from these shards.

        The student must hold the tokens (a vocab at least as large as theirs). Heads of the same tokenizer may differ
        in padding rows: the trainer folds a top-k id past the student's rows into the tail
        (crosstok.padded_vocab_map); cross-tokenizer top-k ids are mapped anyway."""
        if vocab_size < self.vocab_size and (self.cross_tokenizer or tokenizer_fingerprint is None):
            raise ValueError(f"manifest vocab_size {self.vocab_size} > student vocab_size {vocab_size} (the "
                             "student's tokens do not fit)")
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != self.tokenizer_fingerprint:
            raise ValueError(f"manifest tokenizer_fingerprint {self.tokenizer_fingerprint} != student tokenizer "
                             f"fingerprint {tokenizer_fingerprint}")


def encodings_description(codec: ProbCodec, vocab_size: int, top_k: int, *, target_vocab_size: int | None = None,
                          aligned: bool = False) -> dict[str, Any]:
    """The manifest's `encodings`; target_vocab_size / aligned: cross-tokenizer shards (see the module docstring)."""
    codec = codec.resolved(top_k)
    target_vocab = vocab_size if target_vocab_size is None else target_vocab_size
    m = golomb_parameter(target_vocab, top_k)
    sections = "tokens|id_unary|id_prefix|id_extra|levels" + ("|aligned" if aligned else "")
    out = {
        "layout": "one member <key>.bin: crc32(rest) u32le | header length u16le | JSON header | sections "
                  f"{sections} (sizes in the header)",
        "tokens": f"uint{_id_bits(vocab_size)} bit-packed, MSB first",
        "topk_ids": {"scheme": "ids ascending per position; gaps id[j]-id[j-1]-1 Golomb-coded: unary quotients, "
                               "b-1 prefix bits, 1 extra bit when prefix >= 2^b-M (truncated binary)",
                     "golomb_m": m, "b": (m - 1).bit_length()},
        "topk_logprobs": {"scheme": "k probabilities in id order, then the tail mass, per position: "
                                    "level=rint(sqrt(p)/delta + log(p)/c) - level_min as uint8 (<u2 if > 256 "
                                    "levels), raw LZMA2 (lc=lp=pb=0, dict 4 MiB); decoded values renormalised "
                                    "over the k+1 buckets",
                          "delta": codec.delta, "c": codec.c, "kl_budget": codec.kl_budget,
                          "level_min": codec.level_range[0], "logp_floor": LOGP_FLOOR},
        "tail": "the (k+1)-th quantised value; tail_logmass = log(1 - sum exp(topk_logprobs)), floored at "
                f"{TAIL_LOGMASS_FLOOR} when k == vocab",
    }
    if target_vocab != vocab_size:
        out["topk_ids"]["vocab_size"] = target_vocab
        out["topk_ids"]["note"] = "the teacher's vocabulary ids (header field tv); tokens are the student's"
    if aligned:
        out["aligned"] = ("kd_mask: bool per position, np.packbits (MSB first, ceil(S/8) bytes); False = no teacher "
                          "position read the same text, that position's top-k row is a placeholder")
    return out


# ---------------------------------------------------------------- fingerprints


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Stable hash of vocab, merges and special tokens (independent of file paths and tokenizer class)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        payload: Any = {"merges": model.get("merges"), "type": model.get("type")}
    else:
        payload = {}
    payload["vocab"] = tokenizer.get_vocab()  # includes added tokens
    payload["special"] = sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))
    payload["eos"] = getattr(tokenizer, "eos_token_id", None)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]
