"""Resumable WebDataset reader for teacher-output shards.

Ordering model (what makes exact resume possible):

- every (rank, stream) pair is a *slot*; a rank has ``max(1, num_workers)`` streams, one per DataLoader worker.
  The shards, in one seeded order, form a single sequence of samples; slot s of n owns its s-th n-th of it (a
  contiguous range, equal to one sample, which may begin or end inside a shard), so ranks and streams read disjoint
  data forever and no slot holds a shard's worth more than another.
- each slot is an infinite stream of passes over its range: pass e visits its pieces (whole shards, or a shard's
  members from one key to another) in a seeded order, through a seeded shuffle buffer that is drained at the end of
  the pass, so that a pass yields each of the slot's samples exactly once; samples are grouped into batches.
- a rank yields batches_per_epoch batches per epoch, a whole number of rounds over its streams, taking batch i from
  stream ``i % num_streams`` (the DataLoader's in-order round robin): each stream takes its share of an epoch from
  one pass, the first samples of the pass's shuffled order, and the rest of that pass (under a micro-batch and a
  round's remainder) is dropped, like a DataLoader's drop_last. So ranks never disagree on the batch count, and no
  epoch repeats a sample, unless skipped corrupt samples (data.on_corrupt=skip) leave its pass short of its share:
  then that pass is read again (same pieces, another seeded order) until the share is met, so the repeats stay in
  that epoch, of that pass's samples. Epoch e is always pass e, and the next epoch starts at the next pass's start.

The state is the number of batches yielded. A restarted reader starts each stream at the pass its position is in
(passes and their top-up reads are seeded by their index, so whole passes are skipped unread, in both on_corrupt
modes) and replays that pass's raw bytes up to the position (validated but not decoded), so the shuffle buffer is
rebuilt bit-exactly.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import itertools
import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from megadistil.data.shards import Manifest, ShardFormatError, check_raw_sample, decode_sample, decode_tokens
from megadistil.utils import require

log = logging.getLogger(__name__)
STATE_VERSION = 3  # 3: an epoch is one capped pass a stream; 2: passes ran on into the next epoch; 1: whole shards


class OnCorrupt(enum.StrEnum):
    """data.on_corrupt: a corrupt sample stops the run, or is skipped and counted."""

    fail = "fail"
    skip = "skip"


@dataclass
class DataConfig:
    """Reader knobs; the trainer supplies batch size, rank and world size."""

    shards: str = ""  # a precomputed shard dir (tools/precompute_teacher.py) with its manifest.json
    num_workers: int = 0  # shard loader worker processes per rank
    shuffle_buffer: int = 1000  # shard samples in the shuffle buffer (0: stream order)
    seed: int = 0  # shard shuffle seed (0: train.seed, which also shuffles packed text)
    on_corrupt: OnCorrupt = OnCorrupt.fail  # a corrupt sample or a shard of another size than the manifest's: stop, or skip and count
    epochs: int | None = None  # passes over the shards, no sample twice in one unless skipped ones left it short (None: endless)
    prefetch_factor: int = 2  # batches prefetched per worker

    def validate(self) -> None:
        require(self.on_corrupt in set(OnCorrupt), "data.on_corrupt",
                f"must be one of {[c.value for c in OnCorrupt]}, got {self.on_corrupt!r}")
        require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        require(self.epochs is None or self.epochs >= 1, "data.epochs", f"must be >= 1 or null, got {self.epochs}")
        require(self.prefetch_factor >= 1, "data.prefetch_factor", f"must be >= 1, got {self.prefetch_factor}")


Piece = tuple[int, int, int]  # (shard index in the manifest, first sample, end sample) of one slot's range


class _SlotSource:
    """Raw (validated, undecoded) samples of one slot, pass after pass."""

    def __init__(self, shard_dir: Path, manifest: Manifest, slot: int, n_slots: int, seed: int, on_corrupt: str):
        self.dir, self.m, self.slot, self.n_slots = shard_dir, manifest, slot, n_slots
        self.seed, self.on_corrupt = seed, on_corrupt
        # Samples of this slot's range found lost (on_corrupt=skip) since this reader started: a corrupt sample counts
        # 1, a truncated or unreadable shard the samples of the piece's range it no longer holds. Each problem counts
        # once (by shard and sample, or shard piece), however many passes and top-up reads meet it again; a resumed
        # reader recounts those it meets again from the pass it resumes at.
        self.skipped = 0
        self._seen: set[tuple[Any, ...]] = set()
        self.pieces = slot_pieces(manifest, n_slots, seed)[slot]
        self.size = sum(hi - lo for _, lo, hi in self.pieces)  # samples a pass yields when none is corrupt

    def passes(self, bufsize: int, cap: int, first: int = 0) -> Iterator[dict[str, Any]]:
        """Pass after pass from pass `first`, exactly `cap` samples of each (the stream's share of an epoch): each
        seeded by its own index (piece order and shuffle buffer), so a resume skips whole passes without reading
        them. A pass left with fewer than `cap` valid samples (skipped corrupt ones) is read again, round after
        round, each seeded by (pass, round), until it has given `cap`: its repeats stay in its own epoch."""
        epoch = first
        while True:
            n, rnd = 0, 0
            while n < cap:
                got = 0
                key = [self.seed, self.slot, 7, epoch] + ([rnd] if rnd else [])  # round 0: the plain pass's seed
                samples = _shuffled(self._pass(epoch, rnd), bufsize, np.random.default_rng(key))
                try:
                    for sample in samples:
                        n += 1
                        got += 1
                        yield sample
                        if n == cap:
                            break
                finally:
                    samples.close()  # closes the shard being read
                if got == 0:
                    raise ShardFormatError(f"{self.dir}: slot {self.slot} of {self.n_slots} got no valid sample in "
                                           f"epoch {epoch} (all its samples corrupt and skipped)")
                rnd += 1
            epoch += 1

    def _pass(self, epoch: int, rnd: int = 0) -> Iterator[dict[str, Any]]:
        """One read of pass `epoch`'s pieces; a top-up read (rnd > 0) visits them in another seeded order."""
        rng = np.random.default_rng([self.seed, epoch, self.slot] + ([rnd] if rnd else []))
        for i in rng.permutation(len(self.pieces)):
            shard, lo, hi = self.pieces[i]
            info = self.m.shards[shard]
            yield from self._piece(info.name, info.samples, lo, hi)

    def _piece(self, name: str, expected: int, lo: int, hi: int) -> Iterator[dict[str, Any]]:
        """Samples lo..hi-1 of a shard (the members before lo are passed over, not checked); the whole shard also
        checks its sample count against the manifest. Only samples lo..hi-1 have their data read, the others cost
        their headers (see _tar_samples): a slot whose range starts deep inside a shard does not read its head."""
        path = self.dir / name
        count, key = 0, None
        try:
            with open(path, "rb", buffering=_TAR_BUFFER) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for raw in _tar_samples(tar, str(path), lo, hi):
                    key = raw["__key__"]
                    count += 1
                    if count > hi:  # the shard's last piece reads on (headers only) to count its samples
                        continue
                    if count > lo and self._valid(name, count - 1, raw):
                        yield raw
                    if count == hi and hi < expected:
                        return
        except ShardFormatError:
            raise
        except OSError as exc:  # the filesystem failed, not the shard: skipping would make the stream unreplayable
            raise OSError(exc.errno, f"shard {name}: read failed after key {key} ({exc.strerror or exc}); not "
                                     "skipped under data.on_corrupt=skip, which is for corrupt data") from exc
        except Exception as exc:  # noqa: BLE001 - tarfile and format errors alike: this shard ends here
            self._corrupt(f"shard {name}: unreadable after key {key} ({type(exc).__name__}: {_first_arg(exc)})",
                          (name, lo, hi), max(0, hi - max(lo, count)))
            return
        if count != expected:
            self._corrupt(f"shard {name}: holds {count} samples, manifest says {expected} (truncated?) "
                          f"last key {key}", (name, lo, hi), max(0, hi - max(lo, count)))

    def _valid(self, name: str, index: int, raw: dict[str, Any]) -> bool:
        try:
            check_raw_sample(raw, seq_len=self.m.seq_len, top_k=self.m.top_k, vocab_size=self.m.vocab_size,
                             target_vocab_size=self.m.target_vocab, aligned=self.m.cross_tokenizer)
            return True
        except ValueError as exc:
            self._corrupt(f"shard {name} key {raw['__key__']}: {exc}", (name, index), 1)
            return False

    def _corrupt(self, msg: str, problem: tuple[Any, ...], lost: int) -> None:
        """`lost` samples of this slot's range are skipped; `problem` names them, so that rereads count them once."""
        if self.on_corrupt == "fail":
            raise ShardFormatError(msg + " [data.on_corrupt=fail]")
        if problem in self._seen:
            return
        self._seen.add(problem)
        self.skipped += lost
        log.warning("skipping corrupt data (%d samples lost so far in slot %d): %s", self.skipped, self.slot, msg)


# A shard file's read buffer: each member a seek lands on fills it once, so it holds just what tarfile reads there:
# the byte before (its check that the previous member's data is all there), then the member's pax header, pax
# record and ustar header (3 x 512 B; webdataset writes a pax mtime). open()'s default is the file's st_blksize,
# MiBs on some parallel filesystems. Member data, read whole, bypasses the buffer.
_TAR_BUFFER = 4 * tarfile.BLOCKSIZE
_WDS_META = re.compile(r"__[^/]*__($|/)")  # member names webdataset's tar reader skips (its skip_meta default)


def _tar_samples(tar: tarfile.TarFile, url: str, lo: int, hi: int) -> Iterator[dict[str, Any]]:
    """The samples webdataset's tarfile_samples yields from `tar`, in order, with the data of samples lo..hi-1 only
    (the others' fields are None). As there: a sample is a run of regular members with one key (the name up to the
    first dot of its last part), a field each (the rest, lower-cased), __meta__ names are skipped, a field twice in
    a sample is an error. `tar` must be in "r:" mode: tarfile.next() then seeks over the data of a member that
    was not read (checking with a 1-byte read that it is there), where "r|" mode (webdataset's) reads it."""
    members = (m for m in iter(tar.next, None) if m.isreg() and not _WDS_META.match(m.name))
    fields = ((*wds.tariterators.base_plus_ext(m.name), m) for m in members)
    runs = itertools.groupby((f for f in fields if f[0] is not None), key=lambda f: f[0])
    for i, (key, run) in enumerate(runs):
        raw: dict[str, Any] = {"__key__": key, "__url__": url}
        for _, field, m in run:
            field = field.lower()
            if field in raw:
                raise ValueError(f"{m.name}: duplicate file name in tar file {field} {raw.keys()}")
            raw[field] = tar.extractfile(m).read() if lo <= i < hi else None
        yield raw  # a run ends at the next key's header (or the tar's end): one header past the sample


def _first_arg(exc: BaseException) -> str:
    return str(exc.args[0]) if exc.args else type(exc).__name__


def slot_pieces(manifest: Manifest, n_slots: int, seed: int) -> list[list[Piece]]:
    """Each slot's range of the shards' samples, in one seeded shard order: slot s owns samples
    [s*T//n, (s+1)*T//n), as pieces (shard, first, end) of the shards it spans."""
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(manifest.shards)).tolist()
    total = manifest.total_samples
    bounds = [s * total // n_slots for s in range(n_slots + 1)]
    slots: list[list[Piece]] = [[] for _ in range(n_slots)]
    start = 0  # the first global sample of the current shard
    for shard in order:
        end = start + manifest.shards[shard].samples
        s = bisect.bisect_right(bounds, start) - 1  # the slot whose range holds the shard's first sample
        while s < n_slots and bounds[s] < end:
            lo, hi = max(bounds[s], start), min(bounds[s + 1], end)
            if lo < hi:
                slots[s].append((shard, lo - start, hi - start))
            s += 1
        start = end
    return slots


def batches_per_epoch(manifest: Manifest, world_size: int, batch_size: int, num_streams: int = 1) -> int:
    """The batches each rank yields in one pass over the shards: as many on every rank, a whole number of rounds over
    its loader streams (data.num_workers), each within its stream's range (see the module doc)."""
    return manifest.total_samples // (world_size * batch_size * num_streams) * num_streams


def _shuffled(items: Iterator[dict[str, Any]], bufsize: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """A shuffle buffer of `bufsize` items, drained in a random order once `items` ends."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[dict[str, Any]] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        j = int(rng.integers(bufsize))
        buf[j], item = item, buf[j]
        yield item
    for j in rng.permutation(len(buf)):
        yield buf[j]


def collate(samples: list[Any]) -> dict[str, torch.Tensor]:
    """Stack decoded samples (TeacherSamples, or token arrays alone); labels[t] = input_ids[t+1], last position -100
    (all fields at logit positions). Samples of cross-tokenizer shards add `kd_mask` (bool [B, S])."""
    tokens_only = isinstance(samples[0], np.ndarray)
    ids = torch.from_numpy(np.stack(samples if tokens_only else [s.input_ids for s in samples]).astype(np.int64))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    if tokens_only:
        return {"input_ids": ids, "labels": labels}
    batch = {
        "input_ids": ids,
        "labels": labels,
        "topk_ids": torch.from_numpy(np.stack([s.topk_ids for s in samples]).astype(np.int64)),
        "topk_logprobs": torch.from_numpy(np.stack([s.topk_logprobs for s in samples])),
        "tail_logmass": torch.from_numpy(np.stack([s.tail_logmass for s in samples])),
    }
    masks = [s.kd_mask for s in samples]
    if any(m is not None for m in masks):
        if any(m is None for m in masks):
            raise ValueError("a batch mixes samples with and without kd_mask")
        batch["kd_mask"] = torch.from_numpy(np.stack(masks).astype(bool))
    return batch


class _Streams(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: one logical stream, fast-forwarded to the resume point."""

    def __init__(self, owner: ShardStream, start: int):
        self.o, self.start = owner, start

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, int]]]:
        o = self.o
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        stream = (physical + self.start) % o.num_streams  # the loader asks worker 0 first
        done = len(range(stream, self.start, o.num_streams))
        slot = o.rank * o.num_streams + stream
        src = _SlotSource(o.dir, o.manifest, slot, o.world_size * o.num_streams, o.seed, o.on_corrupt)
        replay = done * o.batch_size  # samples this stream yielded before the resume point
        cap = o.batches_per_epoch // o.num_streams * o.batch_size  # its share of an epoch, <= src.size
        # Every pass gives exactly `cap` samples (a short one is topped up from itself), so whole passes are skipped
        # unread; the rest is replayed: read and validated, not decoded, so the shuffle buffer is rebuilt exactly.
        first, replay = divmod(replay, cap)
        batch: list[dict[str, Any]] = []
        for raw in src.passes(o.shuffle_buffer, cap, first):
            if replay > 0:
                replay -= 1
                continue
            batch.append(raw)
            if len(batch) == o.batch_size:
                yield o.decode_batch(batch), {"stream": stream, "skipped": src.skipped}
                batch = []


class ShardStream:
    """Iterable of batches (dicts of tensors aligned to logit positions; see ``collate``).

    ``tail_logmass`` is log(1 - sum(exp(topk_logprobs))), float32 [B,S]; topk_* are sorted by descending prob.
    Cross-tokenizer shards (``manifest.cross_tokenizer``): topk_ids are the teacher's vocabulary ids and batches also
    carry ``kd_mask`` (bool [B,S], False where no teacher position read the same text; those rows are placeholders).
    """

    def __init__(
        self, shard_dir: str | Path, *, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
        shuffle_buffer: int = 1000, seed: int = 0, on_corrupt: str = "fail", epochs: int | None = None,
        prefetch_factor: int = 2, vocab_size: int | None = None, tokenizer_fingerprint: str | None = None,
        pin_memory: bool = False, targets: bool = True,
    ):
        DataConfig(str(shard_dir), num_workers, shuffle_buffer, seed, on_corrupt, epochs).validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.dir = Path(shard_dir)
        self.manifest = Manifest.load(self.dir)
        if vocab_size is not None:
            self.manifest.check_compatible(vocab_size=vocab_size, tokenizer_fingerprint=tokenizer_fingerprint)
        self._check_shard_files(on_corrupt)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.num_streams = num_workers, max(1, num_workers)
        self.shuffle_buffer, self.seed, self.on_corrupt, self.epochs = shuffle_buffer, seed, on_corrupt, epochs
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory  # pinned: non-blocking copies to CUDA
        self.targets = targets  # False: token ids only, the top-k + tail are never decoded
        self.batches_per_epoch = batches_per_epoch(self.manifest, world_size, batch_size, self.num_streams)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.dir}: {self.manifest.total_samples} samples are fewer than world_size "
                             f"{world_size} x batch_size {batch_size} x {self.num_streams} loader streams "
                             "(data.num_workers): a stream would get no batch in an epoch")
        self.consumed = 0
        self._skipped_by_stream: dict[int, int] = {}
        self._manifest_sha = hashlib.sha256((self.dir / "manifest.json").read_bytes()).hexdigest()[:16]

    def _check_shard_files(self, on_corrupt: str) -> None:
        """A missing shard stops the run; one of another size than the manifest's (a partial copy) too, unless
        data.on_corrupt=skip, which trains on the samples it still holds."""
        bad = self.manifest.mismatched_shards(self.dir)
        missing = [name for name, why in bad.items() if why == "missing"]
        if missing:
            raise FileNotFoundError(f"{self.dir}: shard(s) listed in the manifest are missing: {missing[:5]}")
        if bad:
            listed = "; ".join(f"{name}: {why}" for name, why in list(bad.items())[:5])
            if on_corrupt != "skip":
                raise ShardFormatError(f"{self.dir}: {len(bad)} shard(s) differ from the manifest ({listed}); a "
                                       "partial copy? data.on_corrupt=skip trains on the samples they still hold")
            log.warning("%s: %d shard(s) differ from the manifest (%s); their unreadable samples will be skipped",
                        self.dir, len(bad), listed)

    @classmethod
    def from_config(cls, cfg: DataConfig, *, batch_size: int, rank: int = 0, world_size: int = 1,
                    **kw: Any) -> ShardStream:
        return cls(cfg.shards, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=cfg.num_workers,
                   shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, on_corrupt=cfg.on_corrupt, epochs=cfg.epochs,
                   prefetch_factor=cfg.prefetch_factor, **kw)

    @property
    def skipped(self) -> int:
        """Samples found lost to corruption so far (on_corrupt='skip'; see _SlotSource.skipped), summed over this
        rank's streams."""
        return sum(self._skipped_by_stream.values())

    @property
    def epoch(self) -> int:
        return self.consumed // self.batches_per_epoch

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an infinite ShardStream (epochs=None) has no len()")
        return self.epochs * self.batches_per_epoch

    def decode_batch(self, raws: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        m, out = self.manifest, []
        for raw in raws:
            try:
                kw = {"seq_len": m.seq_len, "top_k": m.top_k, "vocab_size": m.vocab_size,
                      "target_vocab_size": m.target_vocab, "aligned": m.cross_tokenizer}
                out.append(decode_sample(raw, codec=m.codec, **kw) if self.targets else decode_tokens(raw, **kw))
            except ValueError as exc:
                raise ShardFormatError(f"shard {Path(raw['__url__']).name} key {raw['__key__']}: {exc}") from None
        return collate(out)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        total = None if self.epochs is None else self.epochs * self.batches_per_epoch
        if total is not None and self.consumed >= total:
            return
        ds = _Streams(self, self.consumed)
        kw = {"prefetch_factor": self.prefetch_factor} if self.num_workers else {}
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                             pin_memory=self.pin_memory, **kw)
        it = iter(loader)
        try:
            while total is None or self.consumed < total:
                batch, meta = next(it)
                self._skipped_by_stream[int(meta["stream"])] = int(meta["skipped"])
                self.consumed += 1
                yield batch
        finally:
            del it  # shuts the (infinite) workers down

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "batches": self.consumed, "skipped": self.skipped, **self._identity()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data-stream state version {sd.get('version')!r} != {STATE_VERSION}: it was saved by a "
                             "megadistil that dealt the shards to ranks otherwise, so its position cannot be resumed "
                             "exactly (start a new train.output_dir, or resume with the megadistil that saved it)")
        for name, mine in self._identity().items():
            if sd.get(name) != mine:
                raise ValueError(f"data-stream state has {name}={sd.get(name)!r} but this reader has {mine!r}; "
                                 "exact resume needs the same value")
        self.consumed = int(sd["batches"])

    def _identity(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer, "seed": self.seed,
                "manifest": self._manifest_sha}
