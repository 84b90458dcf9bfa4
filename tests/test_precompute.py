"""precompute_teacher end to end: exact teacher top-k, resume after interruption, input errors, 2 ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from megadistil.data import Manifest, decode_sample
from megadistil.data.precompute import PrecomputeConfig, run_precompute
from megadistil.distill.targets import teacher_topk
from tests._tools import deepspeed_cmd

ROOT = Path(__file__).resolve().parents[1]


def _cfg(teacher, text, out, **kw) -> PrecomputeConfig:
    base = {"seq_len": 32, "top_k": 8, "temperature": 1.0, "batch_size": 4, "shard_bytes": 4000, "max_sequences": 24,
                "progress": False, "dtype": "float32"}  # the references below are float32 (auto is bf16 on fast-bf16 CPUs)
    return PrecomputeConfig(teacher=str(teacher), text=[str(text)], out=str(out), **{**base, **kw})


@pytest.fixture(scope="module")
def full_run(tiny_llama_dir, stdlib_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return run_precompute(_cfg(tiny_llama_dir, stdlib_text_file, out)), out


def test_shards_hold_the_teachers_exact_topk(full_run, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    manifest, out = full_run
    assert manifest.total_samples == 24 and len(manifest.shards) > 2
    assert Manifest.load(out).shards == manifest.shards
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    raw = next(iter(wds.tariterators.tarfile_samples([{"url": str(out / manifest.shards[1].name)}])))
    dec = decode_sample(raw, seq_len=32, top_k=8, vocab_size=manifest.vocab_size, codec=manifest.codec)
    target = teacher_topk(model, torch.from_numpy(dec.input_ids)[None], top_k=8, temperature=1.0)
    ids, lp = target.topk_ids, target.topk_logprobs
    assert np.array_equal(np.sort(dec.topk_ids, 1), np.sort(ids[0].numpy(), 1))
    np.testing.assert_allclose(np.exp(dec.topk_logprobs), np.exp(np.sort(lp[0].numpy(), 1)[:, ::-1]), atol=0.02)


def test_interrupted_run_resumes_and_keeps_complete_shards(full_run, tiny_llama_dir, stdlib_text_file, tmp_path):
    manifest, full = full_run
    out = tmp_path / "resumed"
    shutil.copytree(full, out)
    names = [s.name for s in manifest.shards]
    (out / "manifest.json").unlink()
    (out / (names[-1] + ".json")).unlink()  # the last shard was still being written
    with open(out / names[-2], "r+b") as f:  # and the one before got damaged on disk
        f.truncate(1000)
    kept = {n: os.stat(out / n).st_mtime_ns for n in names[:-2]}
    resumed = run_precompute(_cfg(tiny_llama_dir, stdlib_text_file, out))
    assert [(s.name, s.samples, s.sha256) for s in resumed.shards] == \
        [(s.name, s.samples, s.sha256) for s in manifest.shards]
    assert {n: os.stat(out / n).st_mtime_ns for n in names[:-2]} == kept, "complete shards must not be rewritten"


def test_an_interrupted_write_leaves_no_shard_that_looks_complete(full_run, tiny_llama_dir, stdlib_text_file,
                                                                   tmp_path, monkeypatch):
    """Interrupted mid-shard (Ctrl-C, a full disk: possibly inside a tar member), the open shard gets no sidecar and
    is deleted; closing it normally had recorded it as complete, checksum and all, and the resume then went on after
    it: a shard cut short (or unreadable) in the manifest, and the numbering shifted."""
    from megadistil.data import precompute

    manifest, _ = full_run
    real, calls = precompute.encode_sample, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "o"
    monkeypatch.setattr(precompute, "encode_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_precompute(_cfg(tiny_llama_dir, stdlib_text_file, out))
    shards, sidecars = sorted(out.glob("*.tar")), sorted(out.glob("*.tar.json"))
    assert [p.name + ".json" for p in shards] == [p.name for p in sidecars]  # no shard without its sidecar
    monkeypatch.setattr(precompute, "encode_sample", real)
    resumed = run_precompute(_cfg(tiny_llama_dir, stdlib_text_file, out))
    assert [(s.name, s.samples, s.sha256) for s in resumed.shards] == \
        [(s.name, s.samples, s.sha256) for s in manifest.shards]


def test_other_arguments_in_same_out_dir_are_refused(full_run, tiny_llama_dir, stdlib_text_file, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(full_run[1], out)
    # named: a resume on another rank count said "different arguments or teacher" (the count is not an argument)
    with pytest.raises(ValueError, match=r"shard-r000-000000.tar was written with top_k 8 \(now 4\); resume with"):
        run_precompute(_cfg(tiny_llama_dir, stdlib_text_file, out, top_k=4))


def test_an_edit_that_keeps_the_text_size_is_another_run(tiny_llama_dir, stdlib_text_file, tmp_path):
    """The resume identity holds each text's content hash: shards of the old text are not continued over an edited
    text of the same size (path and size alone matched, and the old shards were kept)."""
    from megadistil.data.generate import GenerateConfig
    from megadistil.data.generate import run_identity as generate_identity
    from megadistil.data.precompute import identity_hash, run_identity

    text = tmp_path / "corpus.txt"
    text.write_text(stdlib_text_file.read_text()[:5000])
    cfg = _cfg(tiny_llama_dir, text, tmp_path / "out")
    gen = GenerateConfig(teacher=str(tiny_llama_dir), text=[str(text)], out=str(tmp_path / "gen"))

    def hashes():
        return (identity_hash(run_identity(cfg, 1, "teacher", "tok", "float32")),
                identity_hash(generate_identity(gen, 1, "teacher", "tok", "float32")))

    before = hashes()
    assert hashes() == before
    data = bytearray(text.read_bytes())
    data[2500] = ord("x") if data[2500] != ord("x") else ord("y")
    text.write_bytes(bytes(data))
    after = hashes()
    assert after[0] != before[0] and after[1] != before[1]


def test_input_errors(tiny_llama_dir, stdlib_text_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt: file is empty"):
        run_precompute(_cfg(tiny_llama_dir, empty, tmp_path / "a"))
    with pytest.raises(ValueError, match="--top-k 385 is larger than the teacher's vocab size 384"):
        run_precompute(_cfg(tiny_llama_dir, stdlib_text_file, tmp_path / "b", top_k=385))
    with pytest.raises(FileNotFoundError, match="nothere.txt: no such file"):
        run_precompute(_cfg(tiny_llama_dir, tmp_path / "nothere.txt", tmp_path / "c"))
    assert not (tmp_path / "c").exists()  # refused before the output dir is made and the teacher loads
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="rows.jsonl: rows have no 'text' field"):
        run_precompute(_cfg(tiny_llama_dir, bad, tmp_path / "d"))


def test_cli_reports_errors_without_traceback(tiny_llama_dir, stdlib_text_file, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools/precompute_teacher.py"), "--teacher", str(tiny_llama_dir),
                        "--text", str(stdlib_text_file), "--out", str(tmp_path / "x"), "--top-k", "100000"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "--top-k 100000 is larger than the teacher's vocab size" in r.stderr


def test_a_teacher_or_out_of_the_wrong_kind_is_named_before_any_load(tiny_llama_dir, stdlib_text_file, tmp_path):
    from megadistil.data.precompute import PrecomputeConfig

    taken = tmp_path / "taken.txt"
    taken.write_text("not a directory")
    with pytest.raises(ValueError, match=f"--out {taken}: exists and is not a directory"):
        PrecomputeConfig(teacher=str(tiny_llama_dir), text=[str(stdlib_text_file)], out=str(taken)).validate()
    with pytest.raises(FileNotFoundError, match=f"--teacher {tmp_path}: no config.json, not a model directory"):
        PrecomputeConfig(teacher=str(tmp_path), text=[str(stdlib_text_file)], out=str(tmp_path / "o")).validate()


def _auto_dtype_on_rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from megadistil import bitnet
    from megadistil.bitnet import Hardware
    from megadistil.data.precompute import _torch_dtype

    gflops = {"fp32": 100.0, "bf16": 900.0 if rank == 0 else 90.0}  # a near tie measured apart, as under load
    bitnet.hardware = lambda device: Hardware("cpu", "test CPU", "AVX512", ["bf16"], gflops)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results[rank] = str(_torch_dtype("auto", torch.device("cpu")))
    dist.destroy_process_group()


def test_every_rank_loads_the_teacher_in_rank_zeros_auto_dtype():
    """Each rank measures its own device; `auto` is rank 0's choice on all of them (a 2-task precompute wrote float32
    and bf16 shards into one manifest: found by the run identity that now records the loaded dtype)."""
    import torch.multiprocessing as mp

    from megadistil.distributed import free_local_port

    results = mp.Manager().dict()
    mp.spawn(_auto_dtype_on_rank, args=(free_local_port(), results), nprocs=2, join=True)
    assert dict(results) == {0: "torch.bfloat16", 1: "torch.bfloat16"}


def test_every_tool_takes_both_spellings_of_a_dtype(tiny_llama_dir, stdlib_text_file, tmp_path):
    """bf16 and bfloat16 alike in precompute, evaluate and convert (each took one spelling and refused the other);
    the teacher tools record torch's name, which is also what vLLM takes."""
    from megadistil.data.precompute import PrecomputeConfig
    from megadistil.eval.harness import EvalSettings
    from megadistil.export import ExportConfig

    for short, name in (("bf16", "bfloat16"), ("fp32", "float32")):
        for given in (short, name):
            cfg = PrecomputeConfig(teacher=str(tiny_llama_dir), text=[str(stdlib_text_file)], out=str(tmp_path / "o"),
                                   dtype=given)
            cfg.validate()
            settings = EvalSettings(text=[str(stdlib_text_file)], dtype=given)
            settings.validate()
            ExportConfig(dtype=given).validate()
            assert cfg.dtype == settings.dtype == name
    with pytest.raises(ValueError, match="--dtype must be auto|bf16|bfloat16"):
        PrecomputeConfig(teacher=str(tiny_llama_dir), text=[str(stdlib_text_file)], out=str(tmp_path / "o"),
                         dtype="fp8").validate()


@pytest.mark.multirank
def test_two_ranks_write_disjoint_shards_and_one_manifest(full_run, tiny_llama_dir, stdlib_text_file, tmp_path):
    """Rank 1 finishes 12 s after rank 0, with the process group's timeout cut to 6 s (standing for hours apart and
    600 s): the rendezvous after the work waits (it timed out, and no manifest was written, on every rerun)."""
    out = tmp_path / "mr"
    cmd = [*deepspeed_cmd(2), str(ROOT / "tests/_slow_rank_precompute.py"),
           "--teacher", str(tiny_llama_dir), "--text", str(stdlib_text_file), "--out", str(out), "--seq-len", "32",
           "--top-k", "8", "--shard-bytes", "4000", "--max-sequences", "24", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, check=False,
                       env={**os.environ, "MEGADISTIL_TEST_DIST_TIMEOUT_S": "6", "MEGADISTIL_TEST_RANK1_DELAY_S": "12"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = Manifest.load(out)
    assert {s.name[:10] for s in m.shards} == {"shard-r000", "shard-r001"}
    keys = [raw["__key__"] for s in m.shards for raw in wds.tariterators.tarfile_samples([{"url": str(out / s.name)}])]
    single = full_run[0]
    assert len(keys) == len(set(keys)) == single.total_samples == m.total_samples


# ---------------------------------------------------------------- a teacher with another tokenizer

CROSS_SEQ_LEN, CROSS_SEQUENCES = 64, 32


@pytest.fixture(scope="module", params=["crosstok_teacher", "swapped"])
def cross_run(request, tiny_llama_dir, crosstok_teacher_dir, stdlib_text_file, tmp_path_factory):
    """Cross-tokenizer shards: the tiny student's tokenizer with the crosstok teacher (boundaries that differ in both
    directions), and the two swapped (a teacher vocab smaller than the student's; nearly every student boundary is
    a teacher boundary there)."""
    student, teacher = tiny_llama_dir, crosstok_teacher_dir
    if request.param == "swapped":
        student, teacher = teacher, student
    out = tmp_path_factory.mktemp(request.param)
    cfg = _cfg(teacher, stdlib_text_file, out, seq_len=CROSS_SEQ_LEN, max_sequences=CROSS_SEQUENCES,
               student_tokenizer=str(student))
    return run_precompute(cfg), out, cfg


def _samples(out: Path, manifest: Manifest) -> list[tuple[int, dict]]:
    """(global sequence index, raw sample) of every sample, in sequence order."""
    raws = [raw for s in manifest.shards for raw in wds.tariterators.tarfile_samples([{"url": str(out / s.name)}])]
    return sorted((int(raw["__key__"].split("-")[1]), raw) for raw in raws)


def test_cross_tokenizer_shards_hold_the_teachers_topk_at_aligned_positions(cross_run, stdlib_text_file):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from megadistil.data import ShardStream, pack_text, tokenizer_fingerprint
    from megadistil.data.crosstok import align_positions, pack_text_windows, tokenize_segments

    manifest, out, cfg = cross_run
    seq_len, n = CROSS_SEQ_LEN, CROSS_SEQUENCES
    student, teacher = AutoTokenizer.from_pretrained(cfg.student_tokenizer), AutoTokenizer.from_pretrained(cfg.teacher)
    student_vocab = AutoConfig.from_pretrained(cfg.student_tokenizer).vocab_size  # the student model's config
    teacher_vocab = AutoConfig.from_pretrained(cfg.teacher).vocab_size
    assert student_vocab != teacher_vocab
    assert manifest.cross_tokenizer and manifest.total_samples == n
    assert (manifest.vocab_size, manifest.target_vocab_size, manifest.target_vocab) == \
        (student_vocab, teacher_vocab, teacher_vocab)
    assert manifest.tokenizer_fingerprint == tokenizer_fingerprint(student)
    assert manifest.teacher_tokenizer_fingerprint == tokenizer_fingerprint(teacher)
    assert "byte boundaries" in manifest.alignment and manifest.encodings["topk_ids"]["vocab_size"] == teacher_vocab
    assert Manifest.load(out).cross_tokenizer
    manifest.check_compatible(vocab_size=student_vocab, tokenizer_fingerprint=tokenizer_fingerprint(student))

    samples = _samples(out, manifest)
    assert [i for i, _ in samples] == list(range(n))
    packed = [seq for _, seq in zip(range(n), pack_text([stdlib_text_file], student, seq_len))]
    windows = [w for _, w in zip(range(n), pack_text_windows([stdlib_text_file], student, seq_len))]
    model = AutoModelForCausalLM.from_pretrained(cfg.teacher).eval()
    masks, unaligned = {}, 0
    for (_, raw), seq, window in zip(samples, packed, windows, strict=True):
        dec = decode_sample(raw, seq_len=seq_len, top_k=8, vocab_size=student_vocab, codec=manifest.codec,
                            target_vocab_size=teacher_vocab, aligned=True)
        assert np.array_equal(dec.input_ids, seq), "the tokens are the student's pack_text windows"
        teacher_ids, teacher_ends = tokenize_segments(window.segments, teacher)
        index = align_positions(window.ends, teacher_ends)
        aligned = index >= 0
        assert np.array_equal(dec.kd_mask, aligned)
        masks[tuple(seq.tolist())] = aligned
        unaligned += int((~aligned).sum())
        # the teacher on its own tokens of the same text, alone (no padding), at the aligned teacher positions
        target = teacher_topk(model, torch.from_numpy(teacher_ids)[None], top_k=8, temperature=1.0)
        ref_ids, ref_lp = target.topk_ids[0, index[aligned]].numpy(), target.topk_logprobs[0, index[aligned]].numpy()
        assert np.array_equal(np.sort(dec.topk_ids[aligned], 1), np.sort(ref_ids, 1))
        np.testing.assert_allclose(np.exp(dec.topk_logprobs[aligned]), np.exp(np.sort(ref_lp, 1)[:, ::-1]), atol=0.02)
    total = n * seq_len
    assert unaligned < total // 2, f"{unaligned} of {total} positions unaligned"
    if student_vocab < teacher_vocab:  # the crosstok teacher: the mask holds both kinds
        assert unaligned > 0, "no unaligned position: the test needs both kinds"

    stream = ShardStream(out, batch_size=4, shuffle_buffer=0, epochs=1, vocab_size=student_vocab,
                         tokenizer_fingerprint=tokenizer_fingerprint(student))
    seen = 0
    for batch in stream:
        assert batch["kd_mask"].dtype == torch.bool and batch["kd_mask"].shape == (4, seq_len)
        assert int(batch["topk_ids"].max()) < teacher_vocab
        for ids, mask in zip(batch["input_ids"], batch["kd_mask"]):
            assert np.array_equal(mask.numpy(), masks[tuple(ids.tolist())])
            seen += 1
    assert seen == n


def test_cross_tokenizer_resume_identity_holds_the_student_tokenizer(cross_run, stdlib_text_file, tmp_path):
    from dataclasses import replace

    from transformers import AutoTokenizer

    manifest, full, cfg = cross_run
    out = tmp_path / "o"
    shutil.copytree(full, out)
    kept = {s.name: os.stat(out / s.name).st_mtime_ns for s in manifest.shards}
    again = run_precompute(replace(cfg, out=str(out)))
    assert again.shards == manifest.shards and again.cross_tokenizer
    assert {s.name: os.stat(out / s.name).st_mtime_ns for s in manifest.shards} == kept, "nothing is redone"
    with pytest.raises(ValueError, match=r"was written with .*tokenizer.* \(now "):  # the teacher's own tokens
        run_precompute(replace(cfg, out=str(out), student_tokenizer=None))
    other = AutoTokenizer.from_pretrained(cfg.student_tokenizer)
    other.add_tokens(["<extra_tok>"])  # another student tokenizer (the teacher's unchanged): another run
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"was written with .*student_tokenizer.* \(now "):
        run_precompute(replace(cfg, out=str(out), student_tokenizer=str(tmp_path / "other")))


def test_student_with_the_teachers_tokenizer_gets_ordinary_shards(full_run, tiny_llama_dir, stdlib_text_file,
                                                                  tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="megadistil.data.precompute"):
        manifest = run_precompute(_cfg(tiny_llama_dir, stdlib_text_file, tmp_path / "same",
                                       student_tokenizer=str(tiny_llama_dir)))
    assert "is the teacher's tokenizer (same fingerprint): writing ordinary shards" in caplog.text
    assert not manifest.cross_tokenizer and manifest.target_vocab_size == 0 and manifest.alignment == ""
    assert "aligned" not in manifest.encodings
    assert [(s.name, s.sha256) for s in manifest.shards] == [(s.name, s.sha256) for s in full_run[0].shards]


def test_control_tokens_in_text_are_part_of_the_identity_and_need_one_tokenizer(full_run, tiny_llama_dir,
                                                                                stdlib_text_file, tmp_path):
    """--no-split-special-tokens tokenizes another way: shards of the default run are not continued with it (and a
    run from before the option keeps its identity); with --student-tokenizer it is refused."""
    out = tmp_path / "o"
    shutil.copytree(full_run[1], out)
    with pytest.raises(ValueError, match=r"was written with split_special_tokens null \(now false\)"):
        run_precompute(_cfg(tiny_llama_dir, stdlib_text_file, out, split_special_tokens=False))
    with pytest.raises(ValueError, match="--no-split-special-tokens with --student-tokenizer: control tokens"):
        run_precompute(_cfg(tiny_llama_dir, stdlib_text_file, tmp_path / "a", split_special_tokens=False,
                            student_tokenizer=str(tiny_llama_dir)))
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from precompute_teacher import parse
    finally:
        sys.path.remove(str(ROOT / "tools"))
    base = ["--teacher", "t", "--text", "a.txt", "--out", "o"]
    assert parse(base).split_special_tokens and not parse([*base, "--no-split-special-tokens"]).split_special_tokens


def test_student_tokenizer_must_be_a_directory(tiny_llama_dir, stdlib_text_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="--student-tokenizer .*nope: not a directory"):
        run_precompute(_cfg(tiny_llama_dir, stdlib_text_file, tmp_path / "a", student_tokenizer=str(tmp_path / "nope")))


def test_cli_takes_the_student_tokenizer():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from precompute_teacher import parse
    finally:
        sys.path.remove(str(ROOT / "tools"))
    base = ["--teacher", "t", "--text", "a.txt", "--out", "o"]
    assert parse(base).student_tokenizer is None
    assert parse([*base, "--student-tokenizer", "student/"]).student_tokenizer == "student/"


@pytest.mark.multirank
def test_two_ranks_write_cross_tokenizer_shards(crosstok_teacher_dir, tiny_llama_dir, stdlib_text_file, tmp_path):
    """Sequence i on rank i % 2, with the student's tokens and the mask of aligned positions, through the CLI."""
    from transformers import AutoTokenizer

    from megadistil.data.crosstok import align_positions, pack_text_windows, tokenize_segments

    out = tmp_path / "mr"
    cmd = [*deepspeed_cmd(2), str(ROOT / "tools/precompute_teacher.py"),
           "--teacher", str(crosstok_teacher_dir), "--student-tokenizer", str(tiny_llama_dir), "--text",
           str(stdlib_text_file), "--out", str(out), "--seq-len", "32", "--top-k", "8", "--shard-bytes", "4000",
           "--max-sequences", "12", "--dtype", "float32", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = Manifest.load(out)
    student, teacher = AutoTokenizer.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(crosstok_teacher_dir)
    assert m.cross_tokenizer and (m.vocab_size, m.target_vocab) == (len(student), len(teacher))
    windows = [w for _, w in zip(range(12), pack_text_windows([stdlib_text_file], student, 32))]
    unaligned = 0
    for shard in m.shards:
        for raw in wds.tariterators.tarfile_samples([{"url": str(out / shard.name)}]):
            i = int(raw["__key__"].split("-")[1])
            assert shard.name.startswith(f"shard-r{i % 2:03d}-")
            dec = decode_sample(raw, seq_len=32, top_k=8, vocab_size=m.vocab_size, codec=m.codec,
                                target_vocab_size=m.target_vocab, aligned=True)
            assert np.array_equal(dec.input_ids, windows[i].input_ids)
            index = align_positions(windows[i].ends, tokenize_segments(windows[i].segments, teacher)[1])
            assert np.array_equal(dec.kd_mask, index >= 0)
            unaligned += int((index < 0).sum())
    assert m.total_samples == 12 and unaligned > 0


def test_inspect_shows_cross_tokenizer_shards(cross_run):
    """inspect_shards names the teacher's tokenizer and marks which positions carry a teacher target; the tokens are
    shown with the student's tokenizer, the candidates with the teacher's."""
    from transformers import AutoTokenizer

    from megadistil.data.inspect import describe

    manifest, out, cfg = cross_run
    text = describe(out, positions=CROSS_SEQ_LEN)
    assert f"cross-tokenizer: tokens are the student's, top-k ids the teacher's (vocab {manifest.target_vocab}" in text
    raw = _samples(out, manifest)[0][1]
    dec = decode_sample(raw, seq_len=CROSS_SEQ_LEN, top_k=8, vocab_size=manifest.vocab_size, codec=manifest.codec,
                        target_vocab_size=manifest.target_vocab)
    assert text.count("(aligned)") == int(dec.kd_mask.sum())
    assert text.count("(no teacher target)") == CROSS_SEQ_LEN - int(dec.kd_mask.sum())
    student = AutoTokenizer.from_pretrained(cfg.student_tokenizer)
    assert f"[0] token {student.decode([int(dec.input_ids[0])])!r} -> " in text


def test_a_manifest_missing_shards_another_node_wrote_is_refused(tiny_llama_dir, stdlib_text_file, tmp_path,
                                                                 monkeypatch):
    """Rank 0 merges the sidecars it sees: on node-local disks it would see only its node's, and write a short
    manifest. The sequences every rank wrote are summed over the ranks and must all be there."""
    from megadistil.data import precompute

    monkeypatch.setattr(precompute, "sum_over_ranks", lambda count, world, device, group=None: count + 7)
    with pytest.raises(ValueError, match=r"the ranks wrote \d+ sequences, the shards rank 0 sees hold \d+: --out must"):
        run_precompute(_cfg(tiny_llama_dir, stdlib_text_file, tmp_path / "x"))
    assert not (tmp_path / "x" / "manifest.json").exists()
