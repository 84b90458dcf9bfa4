"""Run a teacher once over a corpus and write its top-k outputs as WebDataset shards (multi-rank, resumable).

Resume model: global sequence i (after packing) belongs to rank ``i % world_size``. Each rank writes
``shard-r{rank}-{n}.tar`` sequentially; when a shard closes, a sidecar ``<shard>.json`` (samples, bytes, sha256,
first local sequence, run hash) is written atomically. A restarted run with the same arguments keeps the longest
prefix of this rank's shards whose sidecar and sha256 check out, deletes the rest, skips the sequences they hold
(tokenising again, no teacher work) and continues. Rank 0 merges all sidecars into manifest.json, last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from megadistil.data.shards import (
    Manifest,
    ProbCodec,
    ShardInfo,
    encode_sample,
    encodings_description,
    sha256_file,
    tokenizer_fingerprint,
)
from megadistil.data.text import batched, expand_files, pack_text
from megadistil.distill.targets import teacher_topk
from megadistil.distributed import cpu_threads, discover, free_local_port, init_distributed
from megadistil.utils import torch_dtype, write_atomic

log = logging.getLogger(__name__)
T = TypeVar("T")
PRECOMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # --dtype (megadistil.utils maps the names)


@dataclass
class PrecomputeConfig:
    teacher: str
    text: list[str]
    out: str
    seq_len: int = 2048
    top_k: int = 64
    temperature: float = 1.0
    batch_size: int = 4
    shard_bytes: float = 1e9
    max_sequences: int | None = None
    dtype: str = "auto"  # one of PRECOMPUTE_DTYPES; auto = bfloat16 where bf16 GEMMs are fast (CUDA, AMX CPUs), else float32
    zero3: bool = False  # shard a teacher too large for one device with ZeRO-3 inference
    logit_chunk: int = 1024  # positions per lm_head chunk: never materialise [B, S, V] logits
    codec: dict[str, float] = field(default_factory=lambda: asdict(ProbCodec()))
    progress: bool = True

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1 or self.shard_bytes <= 0:
            raise ValueError("--batch-size and --shard-bytes must be positive")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise ValueError(f"--max-sequences must be >= 1, got {self.max_sequences}")
        if self.dtype not in PRECOMPUTE_DTYPES:
            raise ValueError(f"--dtype must be {'|'.join(PRECOMPUTE_DTYPES)}, got {self.dtype}")
        if not os.path.isdir(self.teacher):
            raise FileNotFoundError(f"--teacher {self.teacher}: not a directory")


# ---------------------------------------------------------------- distributed helpers


def dist_env() -> tuple[int, int]:
    """(rank, world_size) from whatever launched us (deepspeed, torchrun, srun, mpirun; see megadistil.distributed),
    with the process group started (bounded timeout) when there is more than one rank."""
    if discover(os.environ, free_port=free_local_port).world_size == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        info = init_distributed()
        return info.rank, info.world_size
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def collective_batches(batches: Iterator[list[T]], lockstep: bool, world: int,
                       device: torch.device) -> Iterator[list[T] | None]:
    """This rank's batches; with `lockstep` (ZeRO-3: every forward gathers the weights on all ranks together) the
    loop runs until every rank is done, a rank out of batches getting None (it must run a dummy forward)."""
    for batch in batches:
        if lockstep:
            any_rank(True, world, device)
        yield batch
    while lockstep and any_rank(False, world, device):
        yield None


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


# ---------------------------------------------------------------- teacher


def _torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where bf16 GEMMs are fast on `device` (CUDA, AMX CPUs), else float32 (the trainer's rule)."""
    from megadistil.bitnet import hardware, resolve_dtype

    return resolve_dtype("auto", hardware(device)) if name == "auto" else torch_dtype(name)


def _device() -> torch.device:
    """This rank's device; on CPU, its share of the node's cores (see megadistil.distributed.cpu_threads)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    threads = cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.device("cpu")


def load_teacher(teacher: str, dtype_name: str, zero3: bool) -> tuple[Any, Any, torch.device]:
    """Load tokenizer and model (no remote code). With zero3, parameters are partitioned while loading."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher, trust_remote_code=False)
    device = _device()
    dtype = _torch_dtype(dtype_name, device)
    if not zero3:
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype, trust_remote_code=False)
        return tok, model.to(device).eval(), device
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                 "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
    keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained load straight into zero.Init partitions
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype, trust_remote_code=False)
    engine = deepspeed.initialize(model=model, config=ds_config)[0]
    engine.module.eval()
    engine.module._megadistil_ds_config = keep_alive
    return tok, engine.module, device


# ---------------------------------------------------------------- fingerprints and run identity


def teacher_dir_fingerprint(teacher_dir: str) -> str:
    """config.json plus the header and a strided sample of every weight file (cheap for a 70B, no model load)."""
    h = hashlib.sha256()
    root = Path(teacher_dir)
    for path in sorted(root.glob("config.json")) + sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            for off in np.linspace(0, max(0, size - 4096), num=16, dtype=np.int64):
                f.seek(int(off))
                h.update(f.read(4096))
    return h.hexdigest()[:32]


def run_identity(cfg: PrecomputeConfig, world: int, teacher_fp: str, tok_fp: str) -> dict[str, Any]:
    files = expand_files(cfg.text)
    return {
        "teacher_fingerprint": teacher_fp, "tokenizer_fingerprint": tok_fp,
        "text": [[os.path.abspath(f), os.path.getsize(f)] for f in files],
        "seq_len": cfg.seq_len, "top_k": cfg.top_k, "temperature": cfg.temperature, "shard_bytes": cfg.shard_bytes,
        "max_sequences": cfg.max_sequences, "dtype": cfg.dtype, "world_size": world, "codec": cfg.codec,
    }


def identity_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- resume


def _shard_pattern(rank: int) -> str:
    return f"shard-r{rank:03d}-%06d.tar"


def complete_prefix(out: Path, rank: int, run_hash: str) -> tuple[int, int]:
    """(shards to keep, local sequences they hold); deletes this rank's later or damaged shards."""
    keep, seqs, n = 0, 0, 0
    while True:
        tar = out / (_shard_pattern(rank) % n)
        side = tar.with_name(tar.name + ".json")
        if not (tar.is_file() and side.is_file()):
            break
        meta = json.loads(side.read_text())
        if meta.get("run") != run_hash:
            raise ValueError(f"{out}: {tar.name} was written with different arguments or teacher; use a new "
                             "--out directory or delete the old shards")
        if meta["bytes"] != tar.stat().st_size or meta["sha256"] != sha256_file(tar):
            log.warning("%s: sha256/size does not match its sidecar; redoing it", tar.name)
            break
        keep, seqs, n = n + 1, seqs + meta["samples"], n + 1
    for stale in sorted(out.glob(f"shard-r{rank:03d}-*.tar*")):
        if int(stale.name.split("-")[2].split(".")[0]) >= keep:
            stale.unlink()
    return keep, seqs


# ---------------------------------------------------------------- the run


class _Sidecars:
    """ShardWriter `post` hook: records what each closed shard holds."""

    def __init__(self, run_hash: str, first_seq: int):
        self.run_hash, self.first_seq = run_hash, first_seq
        self.samples = self.tokens = 0

    def add(self, tokens: int) -> None:
        self.samples += 1
        self.tokens += tokens

    def __call__(self, fname: str) -> None:
        path = Path(fname)
        if self.samples == 0:
            path.unlink(missing_ok=True)  # ShardWriter opens a shard eagerly; drop it if nothing went in
            return
        write_atomic(path.with_name(path.name + ".json"), json.dumps({
            "samples": self.samples, "tokens": self.tokens, "bytes": path.stat().st_size,
            "sha256": sha256_file(path), "first_seq": self.first_seq, "run": self.run_hash}, indent=1))
        self.first_seq += self.samples
        self.samples = self.tokens = 0


def _my_sequences(cfg: PrecomputeConfig, tok: Any, rank: int, world: int, skip: int) -> Iterator[tuple[int, np.ndarray]]:
    """(global index, tokens) of this rank's sequences, after the `skip` it already wrote."""
    mine = 0
    for i, seq in enumerate(pack_text(cfg.text, tok, cfg.seq_len)):
        if cfg.max_sequences is not None and i >= cfg.max_sequences:
            return
        if i % world != rank:
            continue
        mine += 1
        if mine > skip:
            yield i, seq


def run_precompute(cfg: PrecomputeConfig, loaded: tuple[Any, Any, torch.device] | None = None) -> Manifest | None:
    """Write shards for this rank; rank 0 returns the merged manifest (others return None). `loaded`: the teacher's
    (tokenizer, model, device) from load_teacher, when the caller holds it already."""
    import webdataset as wds
    from tqdm import tqdm
    from transformers import AutoConfig

    cfg.validate()
    rank, world = dist_env()
    vocab = AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=False).vocab_size
    if cfg.top_k > vocab:
        raise ValueError(f"--top-k {cfg.top_k} is larger than the teacher's vocab size {vocab}")
    codec = ProbCodec(**cfg.codec)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, model, device = loaded or load_teacher(cfg.teacher, cfg.dtype, cfg.zero3)
    ident = run_identity(cfg, world, teacher_dir_fingerprint(cfg.teacher), tokenizer_fingerprint(tok))
    run_hash = identity_hash(ident)
    start_shard, done = complete_prefix(out, rank, run_hash)
    sidecars = _Sidecars(run_hash, done)
    writer = wds.ShardWriter(str(out / _shard_pattern(rank)), maxsize=cfg.shard_bytes, maxcount=1 << 40,
                             post=sidecars, start_shard=start_shard, verbose=0, encoder=False, mtime=0.0)
    bar = tqdm(unit="seq", disable=not cfg.progress or rank != 0, desc="teacher", initial=done)
    t0, tokens = time.time(), 0
    batches = batched(_my_sequences(cfg, tok, rank, world, done), cfg.batch_size)
    try:
        for batch in collective_batches(batches, cfg.zero3, world, device):
            rows = batch or [(-1, np.zeros(cfg.seq_len, dtype=np.int64))]
            ids = torch.from_numpy(np.stack([s for _, s in rows])).to(device)
            target = teacher_topk(model, ids, top_k=cfg.top_k, temperature=cfg.temperature,
                                  chunk_tokens=cfg.logit_chunk)
            for (index, seq), ti, tl in zip(batch or [], target.topk_ids.cpu().numpy(),
                                            target.topk_logprobs.cpu().double().numpy()):
                sample = encode_sample(seq, ti, tl, vocab_size=vocab, codec=codec)
                writer.write({"__key__": f"r{rank:03d}-{index:010d}", **sample})
                sidecars.add(len(seq))
            tokens += len(batch or []) * cfg.seq_len
            bar.update(len(batch or []))
            bar.set_postfix(tok_s=f"{tokens / max(time.time() - t0, 1e-9):.0f}")
    finally:
        writer.close()
        bar.close()
    barrier(world)
    manifest = None
    if rank == 0:
        manifest = merge_manifest(out, ident, vocab, codec, cfg)
    barrier(world)
    return manifest


def merge_manifest(out: Path, ident: dict[str, Any], vocab: int, codec: ProbCodec,
                   cfg: PrecomputeConfig) -> Manifest:
    """Collect every rank's sidecars into manifest.json (written last, atomically)."""
    run_hash = identity_hash(ident)
    shards = []
    for side in sorted(out.glob("shard-r*.tar.json")):
        meta = json.loads(side.read_text())
        if meta.get("run") != run_hash:
            raise ValueError(f"{side}: belongs to a different run; refusing to mix shards in {out}")
        shards.append(ShardInfo(name=side.name[:-5], samples=meta["samples"], bytes=meta["bytes"],
                                sha256=meta["sha256"], tokens=meta["tokens"]))
    if not shards:
        raise ValueError(f"{out}: no sequences were produced (is the text shorter than --seq-len {cfg.seq_len}?)")
    manifest = Manifest(
        vocab_size=vocab, top_k=cfg.top_k, temperature=cfg.temperature, seq_len=cfg.seq_len,
        teacher_fingerprint=ident["teacher_fingerprint"], tokenizer_fingerprint=ident["tokenizer_fingerprint"],
        encodings=encodings_description(codec, vocab, cfg.top_k), shards=shards, teacher=os.path.abspath(cfg.teacher),
        args={k: v for k, v in ident.items() if k not in ("teacher_fingerprint", "tokenizer_fingerprint")},
    )
    manifest.save(out)
    return manifest
