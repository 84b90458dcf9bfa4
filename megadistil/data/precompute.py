"""Run a teacher once over a corpus and write its top-k outputs as WebDataset shards (multi-rank, resumable).

Resume model: global sequence i (after packing) belongs to rank ``i % world_size``. Each rank writes
``shard-r{rank}-{n}.tar`` sequentially; when a shard closes, a sidecar ``<shard>.json`` (samples, bytes, sha256,
first local sequence, run hash) is written atomically. A restarted run with the same arguments keeps the longest
prefix of this rank's shards whose sidecar and sha256 check out, deletes the rest, skips the sequences they hold
(tokenising again, no teacher work) and continues. Rank 0 merges all sidecars into manifest.json, last.

A student whose tokenizer differs from the teacher's (``student_tokenizer``): the sequences are the student's packed
windows (``pack_text_windows``: exactly pack_text's), the teacher reads the same text tokenized its own way, and each
student position stores the teacher's top-k (teacher vocabulary ids) at the teacher position that has read the same
text, with the mask of positions that have one (megadistil.data.crosstok; the manifest says ``cross_tokenizer``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from megadistil.data.crosstok import TextWindow, pack_text_windows, teacher_batch
from megadistil.data.shards import (
    Manifest,
    ProbCodec,
    ShardInfo,
    encode_sample,
    encodings_description,
    sha256_file,
    tokenizer_fingerprint,
)
from megadistil.data.text import batched, expand_files, files_identity, pack_text
from megadistil.distill.targets import aligned_targets, teacher_topk
from megadistil.distributed import (
    accelerator_is_cuda,
    device_local_rank,
    init_distributed,
    rank_layout,
    set_up_cpu_rank,
)
from megadistil.models import output_head
from megadistil.utils import dtype_name, dtype_spellings, torch_dtype, write_atomic

log = logging.getLogger(__name__)
T = TypeVar("T")
PRECOMPUTE_DTYPES = ("auto", *dtype_spellings(torch.float32, torch.bfloat16, torch.float16))  # --dtype
ALIGNMENT = ("byte boundaries: a student position takes the teacher position that has read the same text "
             "(megadistil.data.crosstok), others masked")


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
    student_tokenizer: str | None = None  # the student's tokenizer dir when it differs from the teacher's
    split_special_tokens: bool = True  # text spelling a special token stays text; False: the control token (chat text)

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
        self.dtype = checked_dtype(self.dtype)
        check_teacher_and_out(self.teacher, self.out)
        if self.student_tokenizer is not None and not os.path.isdir(self.student_tokenizer):
            raise FileNotFoundError(f"--student-tokenizer {self.student_tokenizer}: not a directory")
        if self.student_tokenizer is not None and not self.split_special_tokens:
            raise ValueError("--no-split-special-tokens with --student-tokenizer: control tokens in the text need one "
                             "tokenizer (the teacher's would read the student's as text, and the two are aligned by text)")
        expand_files(self.text)  # a typo fails here, before the teacher loads


def checked_dtype(name: str) -> str:
    """A teacher --dtype (precompute and generate): auto, or torch's name of the dtype (what vLLM takes too)."""
    if name not in PRECOMPUTE_DTYPES:
        raise ValueError(f"--dtype must be {'|'.join(PRECOMPUTE_DTYPES)}, got {name}")
    return name if name == "auto" else dtype_name(torch_dtype(name))


def check_teacher_and_out(teacher: str, out: str) -> None:
    """--teacher is a model directory and --out, where it exists, a directory (precompute and generate alike)."""
    if not os.path.isdir(teacher):
        raise FileNotFoundError(f"--teacher {teacher}: not a directory")
    if not os.path.isfile(os.path.join(teacher, "config.json")):
        raise FileNotFoundError(f"--teacher {teacher}: no config.json, not a model directory (for a megadistil run, "
                                "pass its base model or the converted checkpoint)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory")


# ---------------------------------------------------------------- distributed helpers


def dist_env() -> tuple[int, int]:
    """(rank, world_size) from whatever launched us (deepspeed, torchrun, srun, mpirun; see megadistil.distributed),
    with the process group started (bounded timeout) when there is more than one rank."""
    if rank_layout(os.environ).world_size == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        info = init_distributed()
        return info.rank, info.world_size
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


# Ranks finish their share hours apart (a resume keeps different numbers of shards on each rank; a slower node), so
# the rendezvous after the work runs on a gloo group that waits this long, not the process group's bounded timeout
# (600 s: a rank that finished waited for the others, timed out, and wrote no manifest, on every rerun). The work's
# own collectives keep the bounded timeout; a dead rank still fails the wait at once (its sockets close).
FINISH_TIMEOUT = timedelta(days=2)


def finish_group(world: int) -> Any:
    """The group of the rendezvous after the work (a collective: every rank creates it at set-up)."""
    return torch.distributed.new_group(backend="gloo", timeout=FINISH_TIMEOUT) if world > 1 else None


def barrier(world: int, group: Any = None) -> None:
    if world > 1:
        torch.distributed.barrier(group=group)


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
    return bool(sum_over_ranks(int(flag), world, device))


def sum_over_ranks(count: int, world: int, device: torch.device, group: Any = None) -> int:
    """`count` summed over the ranks, on `device` (a gloo `group`'s on the CPU)."""
    if world == 1:
        return count
    t = torch.tensor([count], dtype=torch.int64, device=device if group is None else "cpu")
    torch.distributed.all_reduce(t, group=group)
    return int(t.item())


# ---------------------------------------------------------------- teacher


def _torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where bf16 GEMMs are fast on `device` (CUDA, AMX CPUs), else float32 (the trainer's rule), rank 0's
    on every rank: each rank measures its own device, and a near tie under load resolves apart (one manifest of
    float32 and bf16 targets). Collective where the process group is up."""
    from megadistil.bitnet import hardware, resolve_dtype

    if name != "auto":
        return torch_dtype(name)
    dtype = resolve_dtype("auto", hardware(device))
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        choices = (torch.float32, torch.bfloat16)
        choice = torch.tensor([choices.index(dtype)], device=device)
        torch.distributed.broadcast(choice, src=0)
        dtype = choices[int(choice.item())]
    return dtype


def _device() -> torch.device:
    """This rank's device, by init_distributed's rule (distributed.device_local_rank); on CPU, with its share of the
    node's cores and malloc keeping freed blocks (megadistil.distributed.set_up_cpu_rank)."""
    info = rank_layout(os.environ)
    if accelerator_is_cuda():
        return torch.device("cuda", device_local_rank(info, torch.cuda.device_count()))
    set_up_cpu_rank(info.local_world_size)
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


def run_identity(cfg: PrecomputeConfig, world: int, teacher_fp: str, tok_fp: str, dtype: str,
                 teacher_tok_fp: str | None = None) -> dict[str, Any]:
    """What a resumed run must share with the shards it keeps. tok_fp: the tokenizer of the stored tokens (the
    student's for cross-tokenizer shards, whose teacher's is teacher_tok_fp; None: the same tokenizer). dtype: the
    teacher's as loaded (`auto` resolves by the machine: a resume elsewhere must not mix float32 and bf16 targets)."""
    files = expand_files(cfg.text)
    ident = {
        "teacher_fingerprint": teacher_fp, "tokenizer_fingerprint": tok_fp,
        "text": files_identity(files),
        "seq_len": cfg.seq_len, "top_k": cfg.top_k, "temperature": cfg.temperature, "shard_bytes": cfg.shard_bytes,
        "max_sequences": cfg.max_sequences, "dtype": dtype, "world_size": world, "codec": cfg.codec,
    }
    if teacher_tok_fp is not None:
        ident |= {"teacher_tokenizer_fingerprint": teacher_tok_fp, "student_tokenizer": cfg.student_tokenizer}
    if not cfg.split_special_tokens:  # only when set: the identities of runs from before the option stay theirs
        ident["split_special_tokens"] = False
    return ident


def loaded_dtype(model: Any, requested: str) -> str:
    """The dtype the teacher was loaded in (torch's name); `requested` where no model is loaded here (vLLM)."""
    return requested if model is None else dtype_name(next(model.parameters()).dtype)


def identity_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- resume


def _shard_pattern(rank: int) -> str:
    return f"shard-r{rank:03d}-%06d.tar"


def complete_prefix(out: Path, rank: int, ident: dict[str, Any]) -> tuple[int, int]:
    """(shards to keep, local sequences they hold); deletes this rank's later or damaged shards. A shard of another
    run (another identity) is refused, naming what differs (sidecars since they record their identity)."""
    run_hash = identity_hash(ident)
    keep, seqs, n = 0, 0, 0
    while True:
        tar = out / (_shard_pattern(rank) % n)
        side = tar.with_name(tar.name + ".json")
        if not (tar.is_file() and side.is_file()):
            break
        meta = json.loads(side.read_text())
        if meta.get("run") != run_hash:
            raise ValueError(f"{out}: {tar.name} was written with {_identity_change(meta.get('identity'), ident)}; "
                             "resume with those, or use a new --out directory or delete the old shards")
        if meta["bytes"] != tar.stat().st_size or meta["sha256"] != sha256_file(tar):
            log.warning("%s: sha256/size does not match its sidecar; redoing it", tar.name)
            break
        keep, seqs, n = n + 1, seqs + meta["samples"], n + 1
    for stale in sorted(out.glob(f"shard-r{rank:03d}-*.tar*")):
        if int(stale.name.split("-")[2].split(".")[0]) >= keep:
            stale.unlink()
    return keep, seqs


def _identity_change(then: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """What differs between a shard's run identity and this run's, e.g. "world_size 2 (now 1)" (the rank count is
    part of it: each rank's shards hold every world_size-th sequence)."""
    if not isinstance(then, dict):
        return "different arguments, teacher or rank count"
    keys = [k for k in sorted(then.keys() | now.keys()) if then.get(k) != now.get(k)]
    short = lambda v: (r if len(r := json.dumps(v)) <= 40 else r[:37] + "...")
    return ", ".join(f"{k} {short(then.get(k))} (now {short(now.get(k))})" for k in keys)


# ---------------------------------------------------------------- the run


class _Sidecars:
    """ShardWriter `post` hook: records what each closed shard holds."""

    def __init__(self, ident: dict[str, Any], first_seq: int):
        self.ident, self.run_hash, self.first_seq = ident, identity_hash(ident), first_seq
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
            "sha256": sha256_file(path), "first_seq": self.first_seq, "run": self.run_hash, "identity": self.ident},
            indent=1))
        self.first_seq += self.samples
        self.samples = self.tokens = 0


def _abandon(writer: Any) -> None:
    """An interrupted run's open shard may end inside a tar member: it gets no sidecar and is deleted, so that a
    resume rewrites it (closing it normally would have recorded it, checksum and all, as complete)."""
    writer.post = None
    open_shard = writer.fname if writer.tarstream is not None else None
    writer.close()
    if open_shard:
        Path(open_shard).unlink(missing_ok=True)


def _my_sequences(cfg: PrecomputeConfig, sequences: Iterator[T], rank: int, world: int,
                  skip: int) -> Iterator[tuple[int, T]]:
    """(global index, sequence) of this rank's sequences (token arrays or TextWindows), after the `skip` it already
    wrote."""
    mine = 0
    for i, seq in enumerate(sequences):
        if cfg.max_sequences is not None and i >= cfg.max_sequences:
            return
        if i % world != rank:
            continue
        mine += 1
        if mine > skip:
            yield i, seq


def _student_side(cfg: PrecomputeConfig, teacher_tok: Any) -> tuple[Any, int] | None:
    """(student tokenizer, student vocab size) when --student-tokenizer names another tokenizer than the teacher's;
    None when it is absent or has the teacher's fingerprint (ordinary shards)."""
    if cfg.student_tokenizer is None:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.student_tokenizer, trust_remote_code=False)
    if tokenizer_fingerprint(tok) == tokenizer_fingerprint(teacher_tok):
        log.info("--student-tokenizer %s is the teacher's tokenizer (same fingerprint): writing ordinary shards",
                 cfg.student_tokenizer)
        return None
    return tok, _vocab_size(cfg.student_tokenizer, tok)


def _vocab_size(model_dir: str, tok: Any) -> int:
    """The vocab size in the dir's config.json (a model's, possibly padded) if it has one, else the tokenizer's."""
    path = Path(model_dir) / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        if size:
            return int(size)
    return len(tok)


def _teacher_batch(rows: list[tuple[int, Any]], tok: Any, cross: bool,
                   seq_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's input ids [B, T] and, for cross-tokenizer shards, the aligned teacher position of every student
    position [B, S] (crosstok.teacher_batch)."""
    if not rows:  # ZeRO-3 lockstep: a rank without sequences still runs a forward
        return torch.zeros(1, seq_len, dtype=torch.int64), None
    if not cross:
        return torch.from_numpy(np.stack([s for _, s in rows])), None
    return teacher_batch([window for _, window in rows], tok)


def _head_gathered(model: Any, zero3: bool) -> contextlib.AbstractContextManager:
    """The LM head's weight whole for the chunked top-k (megadistil.distill.targets.hidden_topk applies it chunk by
    chunk without calling the module): one gather per batch under ZeRO-3, on every rank alike."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([output_head(model).weight])


def run_precompute(cfg: PrecomputeConfig, loaded: tuple[Any, Any, torch.device] | None = None) -> Manifest | None:
    """Write shards for this rank; rank 0 returns the merged manifest (others return None). `loaded`: the teacher's
    (tokenizer, model, device) from load_teacher, when the caller holds it already."""
    import webdataset as wds
    from tqdm import tqdm
    from transformers import AutoConfig

    cfg.validate()
    rank, world = dist_env()
    finish = finish_group(world)
    teacher_vocab = AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=False).vocab_size
    if cfg.top_k > teacher_vocab:
        raise ValueError(f"--top-k {cfg.top_k} is larger than the teacher's vocab size {teacher_vocab}")
    codec = ProbCodec(**cfg.codec)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, model, device = loaded or load_teacher(cfg.teacher, cfg.dtype, cfg.zero3)
    student = _student_side(cfg, tok)
    teacher_fp = teacher_dir_fingerprint(cfg.teacher)
    sequences: Iterator[Any]
    if student is None:
        vocab, target_vocab = teacher_vocab, None
        ident = run_identity(cfg, world, teacher_fp, tokenizer_fingerprint(tok), loaded_dtype(model, cfg.dtype))
        sequences = pack_text(cfg.text, tok, cfg.seq_len, split_special_tokens=cfg.split_special_tokens)
    else:
        student_tok, vocab = student
        target_vocab = teacher_vocab
        ident = run_identity(cfg, world, teacher_fp, tokenizer_fingerprint(student_tok),
                             loaded_dtype(model, cfg.dtype), teacher_tok_fp=tokenizer_fingerprint(tok))
        sequences = pack_text_windows(cfg.text, student_tok, cfg.seq_len)
        log.info("cross-tokenizer shards: the student's tokens (%s, vocab %d), the teacher's top-k (vocab %d) at the "
                 "student positions whose text the teacher read exactly (%s)", cfg.student_tokenizer, vocab,
                 teacher_vocab, ALIGNMENT)
    cross = student is not None
    start_shard, done = complete_prefix(out, rank, ident)
    sidecars = _Sidecars(ident, done)
    writer = wds.ShardWriter(str(out / _shard_pattern(rank)), maxsize=cfg.shard_bytes, maxcount=1 << 40,
                             post=sidecars, start_shard=start_shard, verbose=0, encoder=False, mtime=0.0)
    bar = tqdm(unit="seq", disable=not cfg.progress or rank != 0, desc="teacher", initial=done)
    t0, tokens = time.time(), 0
    batches = batched(_my_sequences(cfg, sequences, rank, world, done), cfg.batch_size)
    aligned = positions = 0
    try:
        for batch in collective_batches(batches, cfg.zero3, world, device):
            ids, teacher_index = _teacher_batch(batch or [], tok, cross, cfg.seq_len)
            with _head_gathered(model, cfg.zero3):
                target = teacher_topk(model, ids.to(device), top_k=cfg.top_k, temperature=cfg.temperature,
                                      chunk_tokens=cfg.logit_chunk)
            masks: list[np.ndarray | None] = [None] * len(batch or [])
            if teacher_index is not None:
                target, kd_mask = aligned_targets(target, teacher_index.to(device))
                masks = list(kd_mask.cpu().numpy())
                aligned, positions = aligned + int(kd_mask.sum()), positions + kd_mask.numel()
            for (index, item), ti, tl, mask in zip(batch or [], target.topk_ids.cpu().numpy(),
                                                   target.topk_logprobs.cpu().double().numpy(), masks):
                seq = item.input_ids if isinstance(item, TextWindow) else item
                sample = encode_sample(seq, ti, tl, vocab_size=vocab, codec=codec, target_vocab_size=target_vocab,
                                       kd_mask=mask)
                writer.write({"__key__": f"r{rank:03d}-{index:010d}", **sample})
                sidecars.add(len(seq))
            tokens += len(batch or []) * cfg.seq_len
            bar.update(len(batch or []))
            bar.set_postfix(tok_s=f"{tokens / max(time.time() - t0, 1e-9):.0f}")
    except BaseException:
        _abandon(writer)
        raise
    finally:
        bar.close()
    writer.close()
    if positions:
        log.info("rank %d: %d of %d student positions (%.1f%%) have a teacher position that read the same text",
                 rank, aligned, positions, 100.0 * aligned / positions)
    # every rank's sequences, kept ones included
    written = sum_over_ranks(sidecars.first_seq, world, device, group=finish)
    manifest = None
    if rank == 0:
        manifest = merge_manifest(out, ident, vocab, codec, cfg, target_vocab=target_vocab, written=written)
    barrier(world, finish)
    return manifest


def merge_manifest(out: Path, ident: dict[str, Any], vocab: int, codec: ProbCodec, cfg: PrecomputeConfig, *,
                   target_vocab: int | None = None, written: int | None = None) -> Manifest:
    """Collect every rank's sidecars into manifest.json (written last, atomically). target_vocab: the teacher's vocab
    for cross-tokenizer shards (ident then holds the teacher's tokenizer fingerprint). written: the sequences all
    ranks wrote, which the sidecars rank 0 sees must hold (else --out is not one directory for every node)."""
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
    seen = sum(s.samples for s in shards)
    if written is not None and seen != written:
        raise ValueError(f"{out}: the ranks wrote {written} sequences, the shards rank 0 sees hold {seen}: --out must "
                         "be one directory every node shares")
    fingerprints = ("teacher_fingerprint", "tokenizer_fingerprint", "teacher_tokenizer_fingerprint")
    cross = "teacher_tokenizer_fingerprint" in ident
    manifest = Manifest(
        vocab_size=vocab, top_k=cfg.top_k, temperature=cfg.temperature, seq_len=cfg.seq_len,
        teacher_fingerprint=ident["teacher_fingerprint"], tokenizer_fingerprint=ident["tokenizer_fingerprint"],
        encodings=encodings_description(codec, vocab, cfg.top_k, target_vocab_size=target_vocab, aligned=cross),
        shards=shards, teacher=os.path.abspath(cfg.teacher),
        args={k: v for k, v in ident.items() if k not in fingerprints},
        target_vocab_size=(target_vocab or vocab) if cross else 0,
        teacher_tokenizer_fingerprint=ident.get("teacher_tokenizer_fingerprint", ""),
        alignment=ALIGNMENT if cross else "",
    )
    manifest.save(out)
    return manifest
