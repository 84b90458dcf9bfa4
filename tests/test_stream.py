"""ShardStream: exact resume (workers + shuffle buffer), disjoint ranks with equal batch counts, corrupt shards."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tarfile

import pytest
import torch

from megadistil.data import ShardFormatError, ShardStream
from megadistil.data.precompute import PrecomputeConfig, run_precompute
from megadistil.data.shards import sha256_file


@pytest.fixture(scope="module")
def shards(tiny_llama_dir, stdlib_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    run_precompute(PrecomputeConfig(teacher=str(tiny_llama_dir), text=[str(stdlib_text_file)], out=str(out),
                                    seq_len=16, top_k=4, batch_size=8, shard_bytes=1500, max_sequences=70,
                                    progress=False))
    return out


def _rows(batches) -> list[tuple[int, ...]]:
    return [tuple(r.tolist()) for b in batches for r in b["input_ids"]]


def _take(stream, n):
    out = []
    for b in stream:
        out.append(b)
        if len(out) == n:
            break
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_batch_layout(shards):
    b = next(iter(ShardStream(shards, batch_size=3, shuffle_buffer=0)))
    assert b["input_ids"].shape == (3, 16) and b["topk_ids"].shape == (3, 16, 4)
    assert b["input_ids"].dtype == b["labels"].dtype == b["topk_ids"].dtype == torch.int64
    assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:]) and (b["labels"][:, -1] == -100).all()
    total = b["topk_logprobs"].double().exp().sum(-1) + b["tail_logmass"].double().exp()
    torch.testing.assert_close(total, torch.ones_like(total), atol=2e-3, rtol=0)
    assert (b["topk_logprobs"].diff(dim=-1) <= 0).all()


def test_a_run_that_reads_no_targets_decodes_only_tokens(shards, monkeypatch):
    """teacher.kind other than shards: the same token batches, and the top-k + tail are never decoded."""
    from megadistil.data import stream

    full = _take(ShardStream(shards, batch_size=3, shuffle_buffer=5, seed=1), 4)
    monkeypatch.setattr(stream, "decode_sample", lambda *a, **k: pytest.fail("decoded the targets"))
    tokens = _take(ShardStream(shards, batch_size=3, shuffle_buffer=5, seed=1, targets=False), 4)
    assert all(t.keys() == {"input_ids", "labels"} for t in tokens)
    _same(tokens, [{k: b[k] for k in ("input_ids", "labels")} for b in full])


@pytest.mark.parametrize("kind, targets", [("shards", True), ("shared", False)])
def test_the_trainer_reader_gets_every_data_key(shards, kind, targets):
    from types import SimpleNamespace

    from megadistil.config import load_config
    from megadistil.engine.inputs import Inputs
    from megadistil.engine.trainer import Trainer

    cfg = load_config(None, ["model.student=/m", f"teacher.kind={kind}", f"data.shards={shards}",
                             "data.prefetch_factor=5", "data.num_workers=2", "data.shuffle_buffer=7",
                             "data.on_corrupt=skip", "data.epochs=3", "train.seed=11"])
    trainer = Trainer(cfg, "unused.json")
    trainer.dist, trainer.device = SimpleNamespace(rank=0, world_size=1), torch.device("cpu")
    trainer.inputs = Inputs(tokenizer=None)  # shards carry token ids: no tokenizer is read
    reader = trainer._build_data()
    assert (reader.prefetch_factor, reader.num_workers, reader.shuffle_buffer, reader.on_corrupt, reader.epochs,
            reader.seed, reader.targets) == (5, 2, 7, "skip", 3, 11, targets)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_yields_the_same_batches(shards, workers):
    kw = {"batch_size": 4, "num_workers": workers, "shuffle_buffer": 10, "seed": 3}
    reference = _take(ShardStream(shards, **kw), 25)  # crosses an epoch boundary (17 batches per epoch)
    first = ShardStream(shards, **kw)
    head = _take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ShardStream(shards, **kw)
    resumed.load_state_dict(state)
    _same(head + _take(resumed, 18), reference)
    assert resumed.state_dict()["batches"] == 25


def test_a_resume_skips_whole_passes_unread(shards, monkeypatch):
    """Resumed past its first pass, a stream starts at its second: the same batches, and pass 0 is never read
    (a long run restarted without replaying its history)."""
    from megadistil.data import stream as stream_module

    kw = {"batch_size": 4, "shuffle_buffer": 10, "seed": 3}
    reference = _take(ShardStream(shards, **kw), 30)  # 17 batches a pass
    first = ShardStream(shards, **kw)
    _take(first, 20)
    state = first.state_dict()
    read: list[int] = []
    real = stream_module._SlotSource._pass
    monkeypatch.setattr(stream_module._SlotSource, "_pass",
                        lambda self, epoch, *rnd: read.append(epoch) or real(self, epoch, *rnd))
    resumed = ShardStream(shards, **kw)
    resumed.load_state_dict(state)
    _same(_take(resumed, 10), reference[20:])
    assert read and 0 not in read, read


def test_resume_state_must_match(shards):
    sd = ShardStream(shards, batch_size=4, num_workers=2).state_dict()
    with pytest.raises(ValueError, match="num_workers=2 but this reader has 0"):
        ShardStream(shards, batch_size=4).load_state_dict(sd)


def test_two_ranks_disjoint_same_batch_count(shards):
    streams = [ShardStream(shards, batch_size=4, rank=r, world_size=2, num_workers=2, epochs=1) for r in (0, 1)]
    seen = [_rows(list(s)) for s in streams]
    assert len(seen[0]) == len(seen[1]) == 4 * streams[0].batches_per_epoch == 4 * len(streams[0])
    assert not set(seen[0]) & set(seen[1])
    everything = set(_rows(list(ShardStream(shards, batch_size=1, epochs=1, shuffle_buffer=0))))
    assert set(seen[0]) | set(seen[1]) <= everything


@pytest.mark.parametrize("sizes, n_slots", [([6] * 11 + [4], 4), ([40, 40, 40, 10], 3), ([5, 0, 7, 1], 13), ([3], 2)])
def test_slots_own_every_sample_once_in_ranges_equal_to_one(shards, sizes, n_slots):
    from dataclasses import replace

    from megadistil.data.shards import Manifest, ShardInfo
    from megadistil.data.stream import slot_pieces

    manifest = replace(Manifest.load(shards), shards=[ShardInfo(f"s{i}", n, 0, "") for i, n in enumerate(sizes)])
    slots = slot_pieces(manifest, n_slots, seed=5)
    owned = sorted((shard, j) for pieces in slots for shard, lo, hi in pieces for j in range(lo, hi))
    assert owned == [(shard, j) for shard, n in enumerate(sizes) for j in range(n)]
    counts = [sum(hi - lo for _, lo, hi in pieces) for pieces in slots]
    assert max(counts) - min(counts) <= 1, counts


@pytest.mark.parametrize("world, workers, batch, buffer", [(2, 2, 4, 10), (5, 0, 2, 0), (1, 2, 5, 3), (1, 4, 4, 3),
                                                          (1, 3, 3, 5)])
def test_no_epoch_reads_a_sample_twice(shards, world, workers, batch, buffer):
    """70 samples in 12 shards of 6 and one of 4. Each slot (rank x loader stream) owns a balanced contiguous range
    of the samples, across shard ends, drains its shuffle buffer at the end of its pass, and gives an epoch one pass's
    worth, a whole round of the streams: no epoch repeats a sample, the second included. Whole shards a slot gave 36
    and 34 samples to two streams that take 35 each; the buffer, not drained, pulled its last samples from the next
    pass; 17 batches a rank over 4 streams (ranges of 17-18 samples) took 5 batches of 4 from the first stream; and a
    pass's leftover began the next epoch, before the reshuffled pass that holds it again."""
    streams = [ShardStream(shards, batch_size=batch, rank=r, world_size=world, num_workers=workers,
                           shuffle_buffer=buffer, epochs=2) for r in range(world)]
    per_epoch = streams[0].batches_per_epoch
    assert per_epoch % max(1, workers) == 0
    batches = [list(s) for s in streams]
    for epoch in range(2):
        rows = [row for b in batches for row in _rows(b[epoch * per_epoch:(epoch + 1) * per_epoch])]
        assert len(rows) == len(set(rows)) == world * batch * per_epoch


def test_manifest_mismatch_is_refused(shards):
    with pytest.raises(ValueError, match="manifest vocab_size 384 > student vocab_size 300"):
        ShardStream(shards, batch_size=2, vocab_size=300)
    with pytest.raises(ValueError, match="tokenizer fingerprint nope"):
        ShardStream(shards, batch_size=2, vocab_size=384, tokenizer_fingerprint="nope")


def _flip_byte_in_member(path, member_suffix: str):
    """Rewrite the tar with one bit flipped in the first member ending in member_suffix; return its key."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    key = None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for m, data in members:
            if key is None and m.name.endswith(member_suffix):
                key = m.name[: -len(member_suffix)]
                data = data[:7] + bytes([data[7] ^ 4]) + data[8:]
            tf.addfile(m, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return key


def test_corrupted_member_fail_names_shard_and_key(shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    name = sorted(p.name for p in bad.glob("*.tar"))[2]
    key = _flip_byte_in_member(bad / name, ".bin")
    with pytest.raises(ShardFormatError, match=rf"shard {name} key {key}: crc32 mismatch"):
        list(ShardStream(bad, batch_size=2, shuffle_buffer=0, epochs=1))


def test_corrupted_member_skip_counts_and_logs(shards, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    name = min(p.name for p in bad.glob("*.tar"))
    _flip_byte_in_member(bad / name, ".bin")
    stream = ShardStream(bad, batch_size=2, shuffle_buffer=0, epochs=1, on_corrupt="skip")
    with caplog.at_level(logging.WARNING):
        n = len(list(stream))
    assert n == len(stream) and stream.skipped == 1 and stream.state_dict()["skipped"] == 1
    assert f"shard {name} key" in caplog.text


def test_truncated_shard(shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    name = sorted(p.name for p in bad.glob("*.tar"))[1]
    data = (bad / name).read_bytes()
    (bad / name).write_bytes(data[: len(data) // 2 + 100])
    # Refused before the first batch, by its size: not after training on the shards before it.
    with pytest.raises(ShardFormatError, match=rf"{bad}: 1 shard\(s\) differ from the manifest \({name}: "
                                               rf"{len(data) // 2 + 100} bytes, the manifest says {len(data)}\); "
                                               r"a partial copy\? data.on_corrupt=skip trains on"):
        ShardStream(bad, batch_size=2, shuffle_buffer=0, epochs=1)
    skipping = ShardStream(bad, batch_size=2, shuffle_buffer=0, epochs=1, on_corrupt="skip")
    assert len(list(skipping)) == len(skipping) and skipping.skipped >= 1


def _epoch_rows(batches, per_epoch):
    return [_rows(batches[e * per_epoch:(e + 1) * per_epoch]) for e in range(len(batches) // per_epoch)]


def test_a_pass_short_of_skipped_samples_is_topped_up_from_itself(shards, tmp_path):
    """One corrupt sample in 70, an epoch of 70 (batches of 2): each epoch is its own pass, its 69 valid samples and
    one of them again. Topped up from the next pass instead, every later epoch began inside a pass and repeated
    samples of it across the pass boundary; and the corrupt sample was counted again on every pass."""
    everything = set(_rows(list(ShardStream(shards, batch_size=1, epochs=1, shuffle_buffer=0))))
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    _flip_byte_in_member(bad / sorted(p.name for p in bad.glob("*.tar"))[3], ".bin")
    stream = ShardStream(bad, batch_size=2, shuffle_buffer=7, seed=2, epochs=5, on_corrupt="skip")
    epochs = _epoch_rows(list(stream), stream.batches_per_epoch)
    assert len(epochs) == 5
    (lost,) = everything - set(epochs[0])
    for rows in epochs:
        assert len(rows) == 70 and set(rows) == everything - {lost}  # the pass's valid samples, one of them twice
    assert len({tuple(rows) for rows in epochs}) == 5  # each pass (and its top-up) in its own order
    assert stream.skipped == 1 and stream.state_dict()["skipped"] == 1


def test_a_truncated_shard_counts_the_samples_it_lost(shards, tmp_path):
    """skipped counts samples lost, once each: a shard cut to a quarter loses most of its samples, not 1, and a
    corrupt sample in another shard adds 1, however many passes meet them."""
    everything = set(_rows(list(ShardStream(shards, batch_size=1, epochs=1, shuffle_buffer=0))))
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    names = sorted(p.name for p in bad.glob("*.tar"))
    data = (bad / names[1]).read_bytes()
    (bad / names[1]).write_bytes(data[: len(data) // 4])
    _flip_byte_in_member(bad / names[5], ".bin")
    stream = ShardStream(bad, batch_size=2, shuffle_buffer=5, seed=4, epochs=3, on_corrupt="skip")
    epochs = _epoch_rows(list(stream), stream.batches_per_epoch)
    kept = set(epochs[0])
    assert all(set(rows) == kept for rows in epochs) and kept < everything
    assert stream.skipped == len(everything) - len(kept) > 2


def test_a_resume_under_skip_starts_at_its_pass(shards, tmp_path, monkeypatch):
    """With corrupt samples skipped, epoch e is still pass e: a resume late in the run gives the batches the
    uninterrupted stream gives and reads only the passes from its own on (it replayed every pass from pass 0)."""
    from megadistil.data import stream as stream_module

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    names = sorted(p.name for p in bad.glob("*.tar"))
    _flip_byte_in_member(bad / names[0], ".bin")
    _flip_byte_in_member(bad / names[7], ".bin")
    kw = {"batch_size": 2, "shuffle_buffer": 7, "seed": 3, "on_corrupt": "skip"}
    per_epoch = ShardStream(bad, **kw).batches_per_epoch
    at = 4 * per_epoch - 1  # epoch 3's last batch: its pass's top-up read (68 valid samples, 70 an epoch)
    reference = _take(ShardStream(bad, **kw), at + per_epoch)
    first = ShardStream(bad, **kw)
    _take(first, at)
    state = json.loads(json.dumps(first.state_dict()))
    read: list[tuple[int, ...]] = []
    real = stream_module._SlotSource._pass
    monkeypatch.setattr(stream_module._SlotSource, "_pass",
                        lambda self, epoch, *rnd: read.append((epoch, *rnd)) or real(self, epoch, *rnd))
    resumed = ShardStream(bad, **kw)
    resumed.load_state_dict(state)
    _same(_take(resumed, per_epoch), reference[at:])
    assert min(read)[0] == 3, read
    assert (3, 1) in read and (4, 0) in read  # epoch 3 topped up from itself, then the next pass


def test_inspect_verify_reads_every_shard_against_the_manifest(shards, tmp_path, capsys):
    """A flipped byte keeps the size (the stream's startup check passes it); --verify's sha256 names the shard."""
    from tools.inspect_shards import main

    assert main([str(shards), "--verify"]) == 0
    assert "all match the manifest (size and sha256)" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    name = sorted(p.name for p in bad.glob("*.tar"))[1]
    _flip_byte_in_member(bad / name, ".bin")
    ShardStream(bad, batch_size=2, shuffle_buffer=0, epochs=1)
    assert main([str(bad), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "1 differ from the manifest" in out and f"  {name}: sha256 {sha256_file(bad / name)[:16]}..., " in out
    with pytest.raises(SystemExit):
        main([str(bad), "--verify", "--sample", "3"])
    assert "--verify checks the files only" in capsys.readouterr().err


def test_a_read_error_is_not_corruption_and_stops_even_when_skipping(shards, monkeypatch):
    """An I/O error (a network filesystem's EIO) says nothing about the shard: skipping it would drop data this one
    time only, and a resumed run's replay would then differ from the run it continues."""
    import errno

    _count_tar_reads(monkeypatch, fail_at=2500)  # a read that starts 2.5 kB or more into a shard fails
    with pytest.raises(OSError, match=r"shard shard-\S+\.tar: read failed after key \S+ \(Input/output error\); not "
                                      r"skipped under data.on_corrupt=skip") as info:
        list(ShardStream(shards, batch_size=2, shuffle_buffer=0, epochs=1, on_corrupt="skip"))
    assert info.value.errno == errno.EIO


def test_bad_config_is_refused(shards):
    with pytest.raises(ValueError, match=r"'data.on_corrupt': must be one of \['fail', 'skip'\], got 'ignore'"):
        ShardStream(shards, batch_size=2, on_corrupt="ignore")
    with pytest.raises(ValueError, match="fewer than world_size 2 x batch_size 1000"):
        ShardStream(shards, batch_size=1000, world_size=2)
    with pytest.raises(ValueError, match=r"70 samples are fewer than world_size 8 x batch_size 1 x 9 loader streams "
                                         r"\(data.num_workers\)"):
        ShardStream(shards, batch_size=1, world_size=8, num_workers=9)


# ---------------------------------------------------------------- a piece reads the data of its own samples only


class _CountingRaw(io.RawIOBase):
    """A shard file that adds the bytes read from it to `reads[-1]`, failing with EIO from offset `fail_at` on."""

    def __init__(self, f, reads: list[int], fail_at: int | None):
        self.f, self.reads, self.fail_at = f, reads, fail_at

    def readinto(self, b):
        import errno

        if self.fail_at is not None and self.f.tell() >= self.fail_at:
            raise OSError(errno.EIO, "Input/output error")
        n = self.f.readinto(b)
        self.reads[-1] += n or 0
        return n

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, *args):
        return self.f.seek(*args)

    def tell(self):
        return self.f.tell()

    def close(self):
        self.f.close()
        super().close()


def _count_tar_reads(monkeypatch, fail_at: int | None = None) -> list[int]:
    """From now on, the bytes each .tar opened for reading gives (one entry an open), whichever reader opens it
    (webdataset's streaming read too): the buffered file's reads of the underlying file, i.e. what the OS serves."""
    import builtins

    real, reads = builtins.open, []

    def counting_open(file, mode="r", buffering=-1, *args, **kw):
        if not str(file).endswith(".tar") or "r" not in mode:
            return real(file, mode, buffering, *args, **kw)
        reads.append(0)
        raw = _CountingRaw(real(file, "rb", buffering=0), reads, fail_at)
        return io.BufferedReader(raw, buffering if buffering > 0 else io.DEFAULT_BUFFER_SIZE)

    monkeypatch.setattr(builtins, "open", counting_open)
    return reads


def _big_shard(path, n=24, expected=None):
    """A one-shard dir of `n` random samples of ~6.7 KB (seq 256, top-16 of 1000), keys k0000...; the manifest says
    `expected` samples (default n)."""
    import numpy as np
    import webdataset as wds

    from megadistil.data import Manifest, ShardInfo, encode_sample

    path.mkdir()
    rng = np.random.default_rng(0)
    tar = path / "s.tar"
    with wds.TarWriter(str(tar), encoder=False, mtime=0.0) as tw:
        for i in range(n):
            ids = np.stack([rng.choice(1000, 16, replace=False) for _ in range(256)])
            lp = np.log(np.tile(np.linspace(0.1, 0.01, 16), (256, 1)))
            tw.write({"__key__": f"k{i:04d}", **encode_sample(rng.integers(0, 1000, 256), ids, lp, vocab_size=1000)})
    Manifest(vocab_size=1000, top_k=16, temperature=1.0, seq_len=256, teacher_fingerprint="t",
             tokenizer_fingerprint="x",
             shards=[ShardInfo(tar.name, n if expected is None else expected, tar.stat().st_size, sha256_file(tar))]
             ).save(path)
    return tar


def _source(shard_dir, on_corrupt="fail"):
    from megadistil.data import Manifest
    from megadistil.data.stream import _SlotSource

    return _SlotSource(shard_dir, Manifest.load(shard_dir), 0, 1, 0, on_corrupt)


def _streamed(tar) -> list[dict]:
    """The shard as webdataset's streaming read gives it (what the reader used before it seeked)."""
    import webdataset as wds

    return list(wds.tariterators.tarfile_samples([{"url": str(tar)}]))


def _member_offsets(tar) -> list[int]:
    """Each member's header offset, then the end of the last member's data (padded)."""
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
    return [m.offset for m in members] + [members[-1].offset_data + -(-members[-1].size // 512) * 512]


@pytest.mark.parametrize("lo, hi", [(0, 24), (0, 5), (9, 24), (9, 14), (23, 24)])
def test_a_piece_yields_what_the_streaming_read_gives(tmp_path, lo, hi):
    """The same dicts (keys, __url__, the bin bytes, field order) as webdataset's tarfile_samples, sliced."""
    tar = _big_shard(tmp_path / "d")
    got = list(_source(tmp_path / "d")._piece("s.tar", 24, lo, hi))
    expected = _streamed(tar)[lo:hi]
    assert [list(r) for r in got] == [list(r) for r in expected] and got == expected


def test_pieces_of_precomputed_shards_match_the_streaming_read(shards):
    src = _source(shards)
    for info in src.m.shards:
        whole, n = _streamed(shards / info.name), info.samples
        for lo, hi in {(0, n), (0, n // 2), (n // 2, n), (1, n - 1)}:
            if lo < hi:
                assert list(src._piece(info.name, n, lo, hi)) == whole[lo:hi], (info.name, lo, hi)


def test_a_piece_inside_a_shard_reads_its_own_samples_data_only(tmp_path, monkeypatch):
    """A slot's range that starts deep in a shard: the members before it cost their headers (one 2 KiB read each),
    not their data. The streaming read read all of members 0..20 (2.7x the bytes here, with 8 KiB members)."""
    tar = _big_shard(tmp_path / "d")
    at = _member_offsets(tar)
    reads = _count_tar_reads(monkeypatch)
    got = list(_source(tmp_path / "d")._piece("s.tar", 24, 16, 20))
    assert [r["__key__"] for r in got] == [f"k{i:04d}" for i in range(16, 20)]
    # the piece's members, and a read of the headers of each member up to the one after the piece (where its last
    # sample is known to end)
    assert len(reads) == 1 and reads[0] <= at[20] - at[16] + 21 * 2048 < at[17], (reads, at[20] - at[16])


def test_the_last_piece_counts_the_samples_past_it_by_their_headers(tmp_path, monkeypatch, caplog):
    """A shard with 4 samples more than the manifest says: its last piece counts them, reading their headers only."""
    tar = _big_shard(tmp_path / "d", expected=20)
    at = _member_offsets(tar)
    reads = _count_tar_reads(monkeypatch)
    src = _source(tmp_path / "d", "skip")
    with caplog.at_level(logging.WARNING):
        got = list(src._piece("s.tar", 20, 18, 20))
    assert [r["__key__"] for r in got] == ["k0018", "k0019"] and src.skipped == 0  # none of the range was lost
    assert "shard s.tar: holds 24 samples, manifest says 20 (truncated?) last key k0023" in caplog.text
    assert len(reads) == 1 and reads[0] <= at[20] - at[18] + 25 * 2048 < at[21], (reads, at[20] - at[18])
    with pytest.raises(ShardFormatError, match=r"holds 24 samples, manifest says 20 \(truncated\?\) last key k0023 "
                                               r"\[data.on_corrupt=fail\]"):
        list(_source(tmp_path / "d")._piece("s.tar", 20, 18, 20))


@pytest.mark.parametrize("on_corrupt", ["skip", "fail"])
@pytest.mark.parametrize("damage, lo, hi, kept, msg", [
    # cut inside member 12's data: found reading it (in the piece), or seeking past it (before the piece)
    ("cut", 8, 16, 4, "unreadable after key k0011 (ReadError: unexpected end of data)"),
    ("cut", 16, 20, 0, "unreadable after key k0011 (ReadError: unexpected end of data)"),
    ("cut", 4, 12, 8, None),  # a piece that ends before the cut reads whole (the next piece reports it)
    # member 12's header fails its checksum: tarfile ends the archive there (as webdataset's read did), and the
    # count check reports it
    ("header", 8, 16, 4, "holds 12 samples, manifest says 24 (truncated?) last key k0011"),
    ("header", 16, 20, 0, "holds 12 samples, manifest says 24 (truncated?) last key k0011"),
])
def test_a_damaged_shard_ends_the_piece_where_it_is_damaged(tmp_path, caplog, on_corrupt, damage, lo, hi, kept, msg):
    tar = _big_shard(tmp_path / "d")
    at = _member_offsets(tar)
    data = bytearray(tar.read_bytes())
    if damage == "cut":
        del data[at[12] + 512 + 3000:]
    else:
        data[at[12] + 1] ^= 0x40  # a byte of the name: the header's checksum no longer matches
    tar.write_bytes(bytes(data))
    src, got = _source(tmp_path / "d", on_corrupt), []
    lost = hi - lo - kept if msg else 0
    with caplog.at_level(logging.WARNING):
        if on_corrupt == "fail" and msg:
            with pytest.raises(ShardFormatError, match=re.escape(f"shard s.tar: {msg} [data.on_corrupt=fail]")):
                got.extend(src._piece("s.tar", 24, lo, hi))
        else:
            got.extend(src._piece("s.tar", 24, lo, hi))
    assert [r["__key__"] for r in got] == [f"k{i:04d}" for i in range(lo, lo + kept)]
    if on_corrupt == "skip":
        assert src.skipped == lost and (not msg or f"({lost} samples lost so far in slot 0): shard s.tar: {msg}"
                                        in caplog.text)


def test_a_piece_closed_early_closes_its_shard(tmp_path, monkeypatch):
    import builtins

    tar = _big_shard(tmp_path / "d")
    real, opened = builtins.open, []
    monkeypatch.setattr(builtins, "open", lambda file, *a, **kw: opened.append(real(file, *a, **kw)) or opened[-1])
    piece = _source(tmp_path / "d")._piece("s.tar", 24, 5, 15)
    assert next(piece)["__key__"] == "k0005" and not opened[-1].closed and opened[-1].name == str(tar)
    piece.close()
    assert opened[-1].closed


# ---------------------------------------------------------------- cross-tokenizer shards (synthetic)

_CROSS = {"vocab_size": 40, "target_vocab_size": 500, "top_k": 4, "seq_len": 12}


def _cross_dir(path, *, with_mask: bool = True, n: int = 6):
    """A one-shard cross-tokenizer shard dir: tokens < 40 (the student's), top-k ids < 500 (the teacher's), masks."""
    import numpy as np
    import webdataset as wds

    from megadistil.data import Manifest, ShardInfo, encode_sample

    path.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    with wds.TarWriter(str(path / "shard-r000-000000.tar"), encoder=False, mtime=0.0) as tw:
        for i in range(n):
            tokens = rng.integers(0, 40, 12)
            ids = np.stack([rng.choice(500, 4, replace=False) for _ in range(12)])
            mask = rng.random(12) < 0.6
            sample = encode_sample(tokens, ids, np.log(np.tile([0.4, 0.3, 0.2, 0.05], (12, 1))), vocab_size=40,
                                   target_vocab_size=500, kd_mask=mask if with_mask else None)
            tw.write({"__key__": f"r000-{i:010d}", **sample})
            rows.append((tokens, ids, mask))
    tar = path / "shard-r000-000000.tar"
    Manifest(vocab_size=40, top_k=4, temperature=1.0, seq_len=12, teacher_fingerprint="t",
             tokenizer_fingerprint="student", target_vocab_size=500, teacher_tokenizer_fingerprint="teacher",
             alignment="byte boundaries",
             shards=[ShardInfo(tar.name, n, tar.stat().st_size, sha256_file(tar))]).save(path)
    return rows


def test_cross_tokenizer_batches_carry_kd_mask(tmp_path):
    rows = _cross_dir(tmp_path / "x")
    stream = ShardStream(tmp_path / "x", batch_size=3, shuffle_buffer=0, epochs=1, vocab_size=40,
                         tokenizer_fingerprint="student")
    batches = list(stream)
    assert len(batches) == 2
    for b, start in zip(batches, (0, 3)):
        assert b["kd_mask"].dtype == torch.bool and b["kd_mask"].shape == (3, 12)
        for r, (tokens, ids, mask) in enumerate(rows[start:start + 3]):
            assert b["input_ids"][r].tolist() == tokens.tolist()
            assert b["kd_mask"][r].tolist() == mask.tolist()
            assert sorted(b["topk_ids"][r, 5].tolist()) == sorted(ids[5].tolist())  # teacher ids, up to 499
    assert int(torch.stack([b["topk_ids"] for b in batches]).max()) >= 40
    tokens_only = next(iter(ShardStream(tmp_path / "x", batch_size=3, shuffle_buffer=0, targets=False)))
    assert tokens_only.keys() == {"input_ids", "labels"}


def test_cross_tokenizer_sample_without_mask_is_refused_naming_shard_and_key(tmp_path):
    _cross_dir(tmp_path / "x", with_mask=False)
    with pytest.raises(ShardFormatError, match=r"shard shard-r000-000000.tar key r000-0000000000: no 'aligned' "
                                               r"section: cross-tokenizer shards carry the mask of aligned positions"):
        list(ShardStream(tmp_path / "x", batch_size=3, shuffle_buffer=0, epochs=1))
    for targets in (True, False):  # the tokens-only reader refuses it too (the bytes are validated before decoding)
        with pytest.raises(ShardFormatError, match="no 'aligned' section"):
            next(iter(ShardStream(tmp_path / "x", batch_size=3, shuffle_buffer=0, targets=targets)))


def test_cross_tokenizer_corrupt_mask_section_is_refused(tmp_path):
    """A flipped bit in the 'aligned' section fails the crc32, and the message names the shard and key."""
    _cross_dir(tmp_path / "x")
    tar = tmp_path / "x" / "shard-r000-000000.tar"
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, (m, data) in enumerate(members):
            if i == 1:
                data = data[:-1] + bytes([data[-1] ^ 1])  # the last byte: the mask's
            tf.addfile(m, io.BytesIO(data))
    tar.write_bytes(buf.getvalue())
    with pytest.raises(ShardFormatError, match=r"shard shard-r000-000000.tar key r000-0000000001: crc32 mismatch"):
        list(ShardStream(tmp_path / "x", batch_size=3, shuffle_buffer=0, epochs=1))


def test_plain_manifest_refuses_masked_samples(tmp_path):
    import json

    _cross_dir(tmp_path / "x")
    raw = json.loads((tmp_path / "x" / "manifest.json").read_text())
    raw.update(target_vocab_size=0, teacher_tokenizer_fingerprint="", alignment="", vocab_size=500)
    (tmp_path / "x" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardFormatError, match="key r000-0000000000: .*manifest is not cross-tokenizer"):
        list(ShardStream(tmp_path / "x", batch_size=3, shuffle_buffer=0, epochs=1))
