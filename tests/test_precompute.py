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


def test_other_arguments_in_same_out_dir_are_refused(full_run, tiny_llama_dir, stdlib_text_file, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(full_run[1], out)
    with pytest.raises(ValueError, match="different arguments"):
        run_precompute(_cfg(tiny_llama_dir, stdlib_text_file, out, top_k=4))


def test_input_errors(tiny_llama_dir, stdlib_text_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt: file is empty"):
        run_precompute(_cfg(tiny_llama_dir, empty, tmp_path / "a"))
    with pytest.raises(ValueError, match="--top-k 385 is larger than the teacher's vocab size 384"):
        run_precompute(_cfg(tiny_llama_dir, stdlib_text_file, tmp_path / "b", top_k=385))
    with pytest.raises(FileNotFoundError, match="nothere.txt: no such file"):
        run_precompute(_cfg(tiny_llama_dir, tmp_path / "nothere.txt", tmp_path / "c"))
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="rows.jsonl: rows have no 'text' field"):
        run_precompute(_cfg(tiny_llama_dir, bad, tmp_path / "d"))


def test_cli_reports_errors_without_traceback(tiny_llama_dir, stdlib_text_file, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools/precompute_teacher.py"), "--teacher", str(tiny_llama_dir),
                        "--text", str(stdlib_text_file), "--out", str(tmp_path / "x"), "--top-k", "100000"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "--top-k 100000 is larger than the teacher's vocab size" in r.stderr


@pytest.mark.multirank
def test_two_ranks_write_disjoint_shards_and_one_manifest(full_run, tiny_llama_dir, stdlib_text_file, tmp_path):
    out = tmp_path / "mr"
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", "29617", str(ROOT / "tools/precompute_teacher.py"),
           "--teacher", str(tiny_llama_dir), "--text", str(stdlib_text_file), "--out", str(out), "--seq-len", "32",
           "--top-k", "8", "--shard-bytes", "4000", "--max-sequences", "24", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = Manifest.load(out)
    assert {s.name[:10] for s in m.shards} == {"shard-r000", "shard-r001"}
    keys = [raw["__key__"] for s in m.shards for raw in wds.tariterators.tarfile_samples([{"url": str(out / s.name)}])]
    single = full_run[0]
    assert len(keys) == len(set(keys)) == single.total_samples == m.total_samples
