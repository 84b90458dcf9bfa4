"""Byte format of teacher-output shards: codec, sample layout, manifest, fingerprints.

One tar sample = one packed sequence of ``seq_len`` tokens with two members:

- ``<key>.json``: small header (format version, lengths of every section of the blob, crc32 of the blob);
- ``<key>.bin``: raw bytes, the concatenation of the sections below (no pickle, no npy).

Per token position t the teacher's next-token distribution at temperature T is stored as:

- top-k ids, *sorted ascending*, Elias-Fano coded with a fixed number of bits per position
  (``L = floor(log2(V / k))`` low bits per id + ``k + ((V-1) >> L) + 1`` upper bits); ~13 bits/id at V=128,256, k=64.
  The descending-probability order is recovered from the decoded probabilities (ties: ascending id).
- the k probabilities in the same (id) order, quantised on the companded grid
  ``F(p) = sqrt(p) / delta + log(p) / c`` rounded to an integer level. The grid is fine where a token carries mass
  (KL ~ p * error**2, so the log-step shrinks like 1/sqrt(p)) and at most ``c`` nats wide where it does not.
  Levels are stored relative to the row minimum with Elias-gamma codes (split into a unary stream and a
  remainder stream so both decode vectorised in numpy).
- per row: the minimum level (int16) and ``logit(top-k mass)`` as float16, which gives both the top-k mass and the
  tail mass to ~1e-3 relative precision even when either is tiny. Decoded probabilities are renormalised to it.
- input token ids bit-packed with ``ceil(log2 V)`` bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LOGP_FLOOR = -60.0  # probabilities below e^-60 are stored as e^-60; they carry no mass worth a bit
TAIL_LOGMASS_FLOOR = -80.0  # k == vocab gives an exactly empty tail; keep it finite for the losses


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
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=count * width).reshape(count, width)
    weights = (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
    return bits.astype(np.int64) @ weights


def _fixed_nbytes(count: int, width: int) -> int:
    return (count * width + 7) // 8


def _gamma_encode(values: np.ndarray) -> tuple[bytes, bytes]:
    """Elias-gamma code values >= 1 as (unary stream of bit lengths, remainder stream)."""
    v = values.astype(np.int64).reshape(-1)
    nbits = np.floor(np.log2(v)).astype(np.int64)
    nbits += (1 << (nbits + 1)) <= v  # guard float rounding at powers of two
    nbits -= (1 << nbits) > v
    ends = np.cumsum(nbits + 1) - 1
    unary = np.zeros(int(ends[-1]) + 1 if v.size else 0, dtype=np.uint8)
    unary[ends] = 1
    total = int(nbits.sum())
    owner = np.repeat(np.arange(v.size), nbits)
    starts = np.cumsum(nbits) - nbits
    pos = np.arange(total) - starts[owner]
    shift = nbits[owner] - 1 - pos
    rem = ((v[owner] >> shift) & 1).astype(np.uint8)
    return np.packbits(unary).tobytes(), np.packbits(rem).tobytes()


def _gamma_decode(unary_buf: bytes, rem_buf: bytes, count: int) -> np.ndarray:
    unary = np.unpackbits(np.frombuffer(unary_buf, dtype=np.uint8))
    ends = np.flatnonzero(unary)
    if ends.size < count:
        raise ValueError(f"gamma stream holds {ends.size} codes, expected {count}")
    ends = ends[:count]
    nbits = np.diff(ends, prepend=-1) - 1
    total = int(nbits.sum())
    rem = np.unpackbits(np.frombuffer(rem_buf, dtype=np.uint8))
    if rem.size < total:
        raise ValueError(f"gamma remainder stream holds {rem.size} bits, needs {total}")
    owner = np.repeat(np.arange(count), nbits)
    starts = np.cumsum(nbits) - nbits
    shift = nbits[owner] - 1 - (np.arange(total) - starts[owner])
    low = np.bincount(owner, weights=(rem[:total].astype(np.int64) << shift), minlength=count)
    return (np.int64(1) << nbits) + low.astype(np.int64)


# ---------------------------------------------------------------- Elias-Fano for sorted top-k ids


def _ef_params(vocab_size: int, k: int) -> tuple[int, int]:
    low_bits = max(0, int(math.floor(math.log2(vocab_size / k)))) if k < vocab_size else 0
    upper_width = k + ((vocab_size - 1) >> low_bits) + 1
    return low_bits, upper_width


def _ef_encode(sorted_ids: np.ndarray, vocab_size: int) -> bytes:
    rows, k = sorted_ids.shape
    low_bits, width = _ef_params(vocab_size, k)
    ids = sorted_ids.astype(np.int64)
    upper = np.zeros((rows, width), dtype=np.uint8)
    np.put_along_axis(upper, (ids >> low_bits) + np.arange(k), 1, axis=1)
    return _pack_fixed(ids & ((1 << low_bits) - 1), low_bits) + np.packbits(upper.reshape(-1)).tobytes()


def _ef_nbytes(rows: int, k: int, vocab_size: int) -> int:
    low_bits, width = _ef_params(vocab_size, k)
    return _fixed_nbytes(rows * k, low_bits) + _fixed_nbytes(rows * width, 1)


def _ef_decode(buf: bytes, rows: int, k: int, vocab_size: int) -> np.ndarray:
    low_bits, width = _ef_params(vocab_size, k)
    n_low = _fixed_nbytes(rows * k, low_bits)
    low = _unpack_fixed(buf[:n_low], rows * k, low_bits).reshape(rows, k)
    upper = np.unpackbits(np.frombuffer(buf[n_low:], dtype=np.uint8), count=rows * width).reshape(rows, width)
    r, c = np.nonzero(upper)
    if r.size != rows * k or np.any(np.bincount(r, minlength=rows) != k):
        raise ValueError("Elias-Fano upper bits do not hold exactly k ids per position")
    high = c.reshape(rows, k) - np.arange(k)
    ids = (high << low_bits) | low
    if np.any(np.diff(ids, axis=1) <= 0) or ids.max(initial=0) >= vocab_size:
        raise ValueError("decoded top-k ids are not strictly increasing ids below the vocab size")
    return ids


# ---------------------------------------------------------------- probability codec


@dataclass(frozen=True)
class ProbCodec:
    """Companded quantiser for probabilities; see the module docstring. Stored in the manifest."""

    # measured (bench/shards.py): mean KL ~4e-4 nats on peaked 32k-vocab distributions at k=64
    delta: float = 0.008
    c: float = 1.0

    def level(self, logp: np.ndarray) -> np.ndarray:
        logp = np.maximum(logp.astype(np.float64), LOGP_FLOOR)
        return np.rint(np.exp(0.5 * logp) / self.delta + logp / self.c).astype(np.int64)

    def logp_of_level(self, levels: np.ndarray) -> np.ndarray:
        """Invert F at integer levels by bisection on log p (F is increasing); only unique levels are solved."""
        uniq, inverse = np.unique(levels, return_inverse=True)
        lo = np.full(uniq.shape, LOGP_FLOOR - 10.0)
        hi = np.full(uniq.shape, 1.0)
        target = uniq.astype(np.float64)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = np.exp(0.5 * mid) / self.delta + mid / self.c > target
            hi = np.where(above, mid, hi)
            lo = np.where(above, lo, mid)
        return np.minimum(0.5 * (lo + hi), 0.0)[inverse].reshape(levels.shape)


def _log_tail(log_top: np.ndarray) -> np.ndarray:
    """log(1 - exp(log_top)) computed stably."""
    with np.errstate(divide="ignore"):
        return np.where(log_top > -0.693, np.log(-np.expm1(log_top)), np.log1p(-np.exp(log_top)))


# ---------------------------------------------------------------- sample encode / decode


@dataclass
class TeacherSample:
    """One decoded sequence: token ids [S], top-k ids [S,k] (descending prob), log-probs [S,k], tail log-mass [S]."""

    input_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logmass: np.ndarray


def encode_sample(
    input_ids: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray, *, vocab_size: int,
    codec: ProbCodec = ProbCodec(),
) -> dict[str, bytes]:
    """Encode one sequence. topk_logprobs are exact log-probs at temperature T (any order, matching topk_ids)."""
    seq, k = topk_ids.shape
    order = np.argsort(topk_ids, axis=1, kind="stable")
    ids = np.take_along_axis(topk_ids.astype(np.int64), order, axis=1)
    logp = np.take_along_axis(topk_logprobs.astype(np.float64), order, axis=1)
    levels = codec.level(logp)
    row_min = levels.min(axis=1)
    log_top = np.logaddexp.reduce(logp, axis=1)
    top_logit = np.clip(log_top - _log_tail(np.minimum(log_top, 0.0)), -65000, 65000).astype(np.float16)
    unary, rem = _gamma_encode(levels - row_min[:, None] + 1)
    sections = {
        "tokens": _pack_fixed(input_ids.astype(np.int64), _id_bits(vocab_size)),
        "ids": _ef_encode(ids, vocab_size),
        "row_min": row_min.astype("<i2").tobytes(),
        "top_logit": top_logit.astype("<f2").tobytes(),
        "unary": unary,
        "rem": rem,
    }
    blob = b"".join(sections.values())
    header = {"v": FORMAT_VERSION, "seq": seq, "k": k, "sizes": {n: len(b) for n, b in sections.items()},
              "crc32": zlib.crc32(blob)}
    return {"json": json.dumps(header, separators=(",", ":")).encode(), "bin": blob}


def _id_bits(vocab_size: int) -> int:
    return max(1, int(vocab_size - 1).bit_length())


def check_raw_sample(sample: dict[str, Any], *, seq_len: int, top_k: int, vocab_size: int) -> dict[str, Any]:
    """Cheap validation before decoding (members, lengths, crc32); raises ValueError saying what is wrong."""
    missing = [m for m in ("json", "bin") if m not in sample]
    if missing:
        raise ValueError(f"missing member(s) {missing}")
    try:
        header = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON ({exc})") from None
    if header.get("v") != FORMAT_VERSION or header.get("seq") != seq_len or header.get("k") != top_k:
        raise ValueError(f"header {header.get('v'), header.get('seq'), header.get('k')} != "
                         f"(format {FORMAT_VERSION}, seq_len {seq_len}, k {top_k})")
    sizes = header["sizes"]
    fixed = {"tokens": _fixed_nbytes(seq_len, _id_bits(vocab_size)), "ids": _ef_nbytes(seq_len, top_k, vocab_size),
             "row_min": 2 * seq_len, "top_logit": 2 * seq_len}
    for name, size in fixed.items():
        if sizes.get(name) != size:
            raise ValueError(f"section {name} has {sizes.get(name)} bytes, expected {size}")
    blob = sample["bin"]
    if len(blob) != sum(sizes.values()):
        raise ValueError(f"bin member has {len(blob)} bytes, header says {sum(sizes.values())} (truncated?)")
    if zlib.crc32(blob) != header["crc32"]:
        raise ValueError("crc32 mismatch (corrupted bytes)")
    return header


def decode_sample(
    sample: dict[str, Any], *, seq_len: int, top_k: int, vocab_size: int, codec: ProbCodec = ProbCodec(),
) -> TeacherSample:
    """Decode a raw sample (dict with 'json' and 'bin' bytes). Raises ValueError on malformed input."""
    header = check_raw_sample(sample, seq_len=seq_len, top_k=top_k, vocab_size=vocab_size)
    blob, parts, off = sample["bin"], {}, 0
    for name, size in header["sizes"].items():
        parts[name] = blob[off:off + size]
        off += size
    tokens = _unpack_fixed(parts["tokens"], seq_len, _id_bits(vocab_size))
    ids = _ef_decode(parts["ids"], seq_len, top_k, vocab_size)
    row_min = np.frombuffer(parts["row_min"], dtype="<i2").astype(np.int64)
    top_logit = np.frombuffer(parts["top_logit"], dtype="<f2").astype(np.float64)
    levels = _gamma_decode(parts["unary"], parts["rem"], seq_len * top_k).reshape(seq_len, top_k)
    logp = codec.logp_of_level(levels - 1 + row_min[:, None])
    log_top = -np.logaddexp(0.0, -top_logit)  # log sigmoid
    log_tail = np.maximum(-np.logaddexp(0.0, top_logit), TAIL_LOGMASS_FLOOR)
    logp += (log_top - np.logaddexp.reduce(logp, axis=1))[:, None]
    order = _desc_order(logp, ids)
    return TeacherSample(
        input_ids=tokens,
        topk_ids=np.take_along_axis(ids, order, axis=1),
        topk_logprobs=np.take_along_axis(logp, order, axis=1).astype(np.float32),
        tail_logmass=log_tail.astype(np.float32),
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

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def codec(self) -> ProbCodec:
        p = self.encodings.get("topk_logprobs", {})
        return ProbCodec(delta=float(p.get("delta", ProbCodec.delta)), c=float(p.get("c", ProbCodec.c)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    def save(self, shard_dir: str | os.PathLike) -> Path:
        path = Path(shard_dir) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
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
            return cls(**raw)
        except TypeError as exc:
            raise ValueError(f"{path}: bad manifest ({exc})") from None

    def check_compatible(self, *, vocab_size: int, tokenizer_fingerprint: str | None) -> None:
        """Raise ValueError if a student with this vocab / tokenizer cannot learn from these shards."""
        if vocab_size != self.vocab_size:
            raise ValueError(f"manifest vocab_size {self.vocab_size} != student vocab_size {vocab_size}")
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != self.tokenizer_fingerprint:
            raise ValueError(f"manifest tokenizer_fingerprint {self.tokenizer_fingerprint} != student tokenizer "
                             f"fingerprint {tokenizer_fingerprint}")


def encodings_description(codec: ProbCodec, vocab_size: int, top_k: int) -> dict[str, Any]:
    low_bits, width = _ef_params(vocab_size, top_k)
    return {
        "layout": "members json (header, crc32) + bin (sections tokens|ids|row_min|top_logit|unary|rem)",
        "tokens": f"uint{_id_bits(vocab_size)} bit-packed, MSB first",
        "topk_ids": {"scheme": "elias-fano per position, ids ascending", "low_bits": low_bits, "upper_bits": width},
        "topk_logprobs": {"scheme": "level=rint(sqrt(p)/delta + log(p)/c), stored as elias-gamma(level-row_min+1)",
                          "delta": codec.delta, "c": codec.c, "logp_floor": LOGP_FLOOR},
        "tail": "float16 logit(top-k mass) per position; tail_logmass = log(1 - sum exp(topk_logprobs))",
    }


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


def teacher_fingerprint(model: Any) -> str:
    """Hash of the config plus a sample of every parameter (cheap on a 70B; distinguishes checkpoints)."""
    import torch

    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            h.update(name.encode())
            h.update(flat[::step][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]
