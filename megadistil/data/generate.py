"""Teacher-generated data: continue prompts with a teacher, write the continuations as JSON lines (multi-rank,
resumable) and, optionally, teacher shards of the generated documents through the precompute writer.

Prompt i (in input order) belongs to rank i % world_size and samples from the generator of its global index (see
megadistil.sampling), so its continuation does not depend on which rank ran it. Each rank appends its lines to
parts/r{rank}.jsonl a batch at a time (flushed, fsynced). Restarted with the same arguments, a rank keeps the whole
batches its part holds (a line cut by the kill and a batch left incomplete are dropped: the batches stay those of an
uninterrupted run, so the files come out the same) and continues. Rank 0 then merges the parts in prompt order into
generations.jsonl, and writes generation.json (the run's identity and counts) last.

A line: {"index", "text" (prompt + continuation: what `data.text` and precompute_teacher read), "prompt",
"continuation", "prompt_ids", "continuation_ids", "stop" ("eos" | "length"), "sampling", "teacher" (fingerprint)}.
"""

from __future__ import annotations

import enum
import heapq
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from megadistil.data.precompute import (
    PrecomputeConfig,
    barrier,
    check_teacher_and_out,
    checked_dtype,
    collective_batches,
    dist_env,
    finish_group,
    identity_hash,
    load_teacher,
    loaded_dtype,
    run_precompute,
    teacher_dir_fingerprint,
)
from megadistil.data.shards import tokenizer_fingerprint
from megadistil.data.text import batched, expand_files, files_identity, iter_documents, text_lines
from megadistil.data.vllm_backend import VLLMSampler, check_vllm
from megadistil.sampling import SamplingConfig, chat_prompt_ids, decode_text, eos_token_ids, lockstep_any, sample
from megadistil.utils import write_atomic

GENERATIONS, IDENTITY, PARTS = "generations.jsonl", "generation.json", "parts"


class Backend(enum.StrEnum):
    """--backend: what samples the continuations."""

    torch = "torch"  # megadistil.sampling on the HF model: every setting, ZeRO-3 across ranks, CPU or GPU
    vllm = "vllm"  # vLLM's engine (GPU, where installed): one temperature, one process (megadistil.data.vllm_backend)


@dataclass
class ShardOptions:
    """Teacher shards of the generated documents (precompute_teacher's writer, run on generations.jsonl)."""

    out: str
    seq_len: int = 512
    top_k: int = 64
    temperature: float = 1.0

    def validate(self) -> None:
        # Checked with the other arguments, not by the precompute writer after every continuation is generated, and
        # named by this tool's flags (--top-k here is the sampling top-k).
        if self.seq_len < 2:
            raise ValueError(f"--shard-seq-len must be >= 2, got {self.seq_len}")
        if self.top_k < 1:
            raise ValueError(f"--shard-top-k must be >= 1, got {self.top_k}")


@dataclass
class GenerateConfig:
    teacher: str
    out: str
    text: list[str] = field(default_factory=list)  # documents: a prompt is a document's first prompt_tokens tokens
    prompts: str | None = None  # or a prompts file: .txt (a prompt a line, \n escapes) or .jsonl ("prompt" field)
    prompt_tokens: int = 64
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 8
    max_prompts: int | None = None
    dtype: str = "auto"  # as precompute_teacher's --dtype
    zero3: bool = False  # partition the teacher with ZeRO-3; the ranks then sample in lockstep
    progress: bool = True
    shards: ShardOptions | None = None
    backend: Backend = Backend.torch
    chat_template: bool = False  # each prompt a user turn in the teacher tokenizer's chat template

    def validate(self) -> None:
        if bool(self.text) == bool(self.prompts):
            raise ValueError("give either --text (prompts from documents) or --prompts (a prompts file), not both")
        if self.prompts is not None and Path(self.prompts).suffix not in (".txt", ".jsonl"):
            raise ValueError(f"--prompts {self.prompts}: use a .txt (a prompt a line) or .jsonl ('prompt' field)")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise FileNotFoundError(f"--prompts {self.prompts}: no such file")
        if self.chat_template and self.text:
            raise ValueError("--chat-template needs --prompts: a prompt from --text is a document's first "
                             "--prompt-tokens tokens, not a user turn")
        if self.text:
            expand_files(self.text)
        for key, value in (("--prompt-tokens", self.prompt_tokens), ("--batch-size", self.batch_size),
                           ("--max-prompts", self.max_prompts)):
            if value is not None and value < 1:  # max_prompts None: every prompt
                raise ValueError(f"{key} must be >= 1, got {value}")
        if self.shards is not None:
            self.shards.validate()
        self.dtype = checked_dtype(self.dtype)
        check_teacher_and_out(self.teacher, self.out)


# ---------------------------------------------------------------- prompts


def _prompt_texts(cfg: GenerateConfig) -> Iterator[str]:
    if cfg.text:
        yield from iter_documents(cfg.text)
        return
    path = Path(cfg.prompts)
    for n, line in text_lines(path):
        if path.suffix == ".txt":
            yield line.replace("\\n", "\n")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--prompts {path}: line {n} is not JSON ({exc})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str):
            raise ValueError(f"--prompts {path}: line {n} has no 'prompt' string")  # noqa: TRY004 (bad input)
        yield prompt


def iter_prompts(cfg: GenerateConfig, tok: Any, max_positions: int | None) -> Iterator[tuple[int, list[int]]]:
    """(global index, token ids): the tokenizer's own special tokens (BOS) first, or with --chat-template the
    template's user turn and assistant header; from documents, the first prompt_tokens tokens (a shorter document is a
    whole prompt); a prompt with no room for max_new_tokens in the model's context is refused."""
    for n, text in enumerate(_prompt_texts(cfg)):
        if cfg.max_prompts is not None and n >= cfg.max_prompts:
            return
        ids = chat_prompt_ids(tok, text, cfg.teacher) if cfg.chat_template else \
            tok(text, add_special_tokens=True)["input_ids"]
        ids = ids[:cfg.prompt_tokens] if cfg.text else ids
        if max_positions is not None and len(ids) + cfg.sampling.max_new_tokens > max_positions:
            raise ValueError(f"prompt {n} ({len(ids)} tokens) + --max-new-tokens {cfg.sampling.max_new_tokens} "
                             f"exceed the teacher's {max_positions} positions")
        yield n, ids


# ---------------------------------------------------------------- resume


def run_identity(cfg: GenerateConfig, world: int, teacher_fp: str, tok_fp: str, dtype: str) -> dict[str, Any]:
    inputs = expand_files(cfg.text) if cfg.text else [cfg.prompts]
    return {"teacher_fingerprint": teacher_fp, "tokenizer_fingerprint": tok_fp,
            "inputs": files_identity(inputs), "from_documents": bool(cfg.text),
            "prompt_tokens": cfg.prompt_tokens, "sampling": _sampling_dict(cfg.sampling),
            "batch_size": cfg.batch_size, "max_prompts": cfg.max_prompts, "dtype": dtype, "world_size": world,
            "backend": cfg.backend.value, **({"chat_template": True} if cfg.chat_template else {})}


def _sampling_dict(s: SamplingConfig) -> dict[str, Any]:
    return {**asdict(s), "temperatures": list(s.temperatures)}


def resume_part(part: Path, run_hash: str, batch_size: int) -> int:
    """Lines of `part` to keep (whole batches of complete lines); truncates the rest. Refuses another run's part."""
    side = part.with_suffix(".json")
    if side.is_file() and json.loads(side.read_text())["run"] != run_hash:
        raise ValueError(f"{part.parent.parent}: {part.name} was written with different arguments or teacher; use a "
                         "new --out directory or delete the old one")
    write_atomic(side, json.dumps({"run": run_hash}))
    if not part.is_file():
        part.touch()
        return 0
    lines = part.read_bytes().split(b"\n")[:-1]  # complete lines end in a newline; the last piece is cut or empty
    keep = len(lines) // batch_size * batch_size
    with open(part, "r+b") as f:
        f.truncate(sum(len(line) + 1 for line in lines[:keep]))
    return keep


# ---------------------------------------------------------------- the run


def run_generation(cfg: GenerateConfig) -> dict[str, Any] | None:
    """Generate this rank's continuations; rank 0 merges them and returns generation.json's contents."""
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    cfg.validate()
    rank, world = dist_env()
    finish = finish_group(world)
    if cfg.backend is Backend.vllm:
        check_vllm(cfg.sampling, cfg.zero3, world)
    max_positions = getattr(AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=False),
                            "max_position_embeddings", None)
    # Every prompt is tokenised and checked before the model loads (a bad one stops every rank at once, not one rank
    # mid-collective); the count is the progress bar's total. The loop below tokenises them again, streaming.
    total = sum(1 for _ in iter_prompts(cfg, AutoTokenizer.from_pretrained(cfg.teacher, trust_remote_code=False),
                                        max_positions))
    if total == 0:  # else the run "succeeds" writing nothing; an empty --text file is refused by iter_documents
        source = f"--prompts {cfg.prompts}" if cfg.prompts else f"--text {' '.join(cfg.text)}"
        raise ValueError(f"{source}: holds no prompt (every line is blank)")
    out = Path(cfg.out)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    if cfg.backend is Backend.vllm:
        tok, model, device = AutoTokenizer.from_pretrained(cfg.teacher, trust_remote_code=False), None, \
            torch.device("cpu")
        eos = eos_token_ids(_generation_config(cfg.teacher), tok)
        continuations = VLLMSampler(cfg.teacher, cfg.dtype, cfg.sampling, eos)
    else:
        tok, model, device = load_teacher(cfg.teacher, cfg.dtype, cfg.zero3)
        eos = eos_token_ids(model.generation_config, tok)
        continuations = torch_sampler(model, cfg, tok, eos, world)
    teacher_fp = teacher_dir_fingerprint(cfg.teacher)
    ident = run_identity(cfg, world, teacher_fp, tokenizer_fingerprint(tok), loaded_dtype(model, cfg.dtype))
    part = out / PARTS / f"r{rank:03d}.jsonl"
    done = resume_part(part, identity_hash(ident), cfg.batch_size)
    mine = (p for p in iter_prompts(cfg, tok, max_positions) if p[0] % world == rank)
    batches = batched((p for i, p in enumerate(mine) if i >= done), cfg.batch_size)
    bar = tqdm(total=total, unit="prompt", disable=not cfg.progress or rank != 0, desc="generate",
               initial=min(done * world, total))
    t0, new_tokens = time.time(), 0
    with open(part, "a") as f:
        for batch in collective_batches(batches, cfg.zero3 and world > 1, world, device):
            # a rank out of prompts in a ZeRO-3 lockstep still samples (one dummy prompt), its rows unwritten
            rows = batch or [(-1, [tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id])]
            for (index, ids), new in zip(batch or [], continuations(rows)):
                f.write(json.dumps(_line(tok, index, ids, new, eos, cfg.sampling, teacher_fp, cfg.chat_template))
                        + "\n")
                new_tokens += len(new)
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch or []) * world)
            bar.set_postfix(new_tok_s=f"{new_tokens * world / max(time.time() - t0, 1e-9):.0f}")
    bar.close()
    barrier(world, finish)  # ranks end their prompts apart (a resume keeps different numbers of batches on each)
    summary = merge_parts(out, ident, world) if rank == 0 else None
    barrier(world, finish)
    if cfg.shards is not None:
        if isinstance(continuations, VLLMSampler):
            continuations.close()  # the HF teacher loads next, for its logits
        s = cfg.shards
        run_precompute(PrecomputeConfig(teacher=cfg.teacher, text=[str(out / GENERATIONS)], out=s.out,
                                        seq_len=s.seq_len, top_k=s.top_k, temperature=s.temperature,
                                        batch_size=cfg.batch_size, dtype=cfg.dtype, zero3=cfg.zero3,
                                        progress=cfg.progress, split_special_tokens=not cfg.chat_template),
                        loaded=(tok, model, device) if model else None)
    return summary


def _generation_config(teacher: str) -> Any:
    """The teacher's generation_config.json, else the one transformers derives from config.json (as from_pretrained)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(teacher)
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(teacher, trust_remote_code=False))


def torch_sampler(model: Any, cfg: GenerateConfig, tok: Any, eos: int | list[int] | None,
                  world: int) -> Callable[[list[tuple[int, list[int]]]], list[list[int]]]:
    """Rows -> each prompt's continuation ids (the stopping EOS kept), by megadistil.sampling on the HF model."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lockstep = lockstep_any(next(model.parameters()).device) if cfg.zero3 and world > 1 else None

    def continuations(rows: list[tuple[int, list[int]]]) -> list[list[int]]:
        gen = sample(model, [torch.tensor(ids) for _, ids in rows], cfg.sampling, eos_token_id=eos,
                     pad_token_id=pad, indices=[max(i, 0) for i, _ in rows], lockstep=lockstep,
                     freeze_weight_codes=not cfg.zero3)
        return [toks[:n] for toks, n in zip(gen.tokens.tolist(), gen.lengths.tolist(), strict=True)]

    return continuations


def _line(tok: Any, index: int, prompt_ids: list[int], new_ids: list[int], eos: int | list[int] | None,
          sampling: SamplingConfig, teacher_fp: str, chat: bool = False) -> dict[str, Any]:
    """One generation as a JSON line; a chat's text spells its control tokens (the template's, the stop token), which
    data.split_special_tokens=false reads back as such."""
    stops = {eos} if isinstance(eos, int) else set(eos or ())
    stopped = bool(new_ids) and new_ids[-1] in stops
    text = decode_text(tok, prompt_ids + new_ids, special_tokens=chat)
    # The prompt's text is where its own decoding agrees with the whole: a character whose bytes the prompt's last
    # token and the continuation's first share goes to the continuation whole, not as U+FFFD on both sides.
    cut = len(os.path.commonprefix([text, decode_text(tok, prompt_ids, special_tokens=chat)]))
    return {"index": index, "text": text, "prompt": text[:cut], "continuation": text[cut:], "prompt_ids": prompt_ids,
            "continuation_ids": new_ids, "stop": "eos" if stopped else "length",
            "sampling": _sampling_dict(sampling), "teacher": teacher_fp}


def merge_parts(out: Path, ident: dict[str, Any], world: int) -> dict[str, Any]:
    """Every rank's lines in prompt order into generations.jsonl (atomically), then generation.json."""
    parts = [out / PARTS / f"r{r:03d}.jsonl" for r in range(world)]
    files = [p.open() for p in parts]
    tmp = out / f".{GENERATIONS}.tmp{os.getpid()}"
    counts, stops = [0] * world, {"eos": 0, "length": 0}
    try:
        with tmp.open("w") as dst:
            for _, r, stop, line in heapq.merge(*(_keyed(f, r) for r, f in enumerate(files))):
                dst.write(line)
                counts[r] += 1
                stops[stop] += 1
            dst.flush()
            os.fsync(dst.fileno())
    finally:
        for f in files:
            f.close()
    os.replace(tmp, out / GENERATIONS)
    summary = {**ident, "prompts": sum(counts), "per_rank": counts, "stops": stops}
    write_atomic(out / IDENTITY, json.dumps(summary, indent=1))
    return summary


def _keyed(lines: Iterator[str], rank: int) -> Iterator[tuple[int, int, str, str]]:
    for line in lines:
        row = json.loads(line)
        yield row["index"], rank, row["stop"], line
