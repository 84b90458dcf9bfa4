"""The naive distillation baseline for bench/distill_step.py, run under `deepspeed --num_gpus N`.

What TRL's GKD trainer / DistillKit do: a separate frozen teacher copy (a ZeRO-3 inference engine, no optimizer)
plus a full-parameter student trained with AdamW on the same ZeRO-3 engine, loss = forward KL on the full
[tokens x vocab] logits (temperature, T² scaling). No LoRA, no quantisation. Same data pipeline, ds_config
reconciliation, dtype, attention and activation checkpointing as megadistil's engine, so only the method differs.

Each rank writes <out>/rank<r>.jsonl: one JSON per step (step, loss, step_time_s, peak_mem_mb: lifetime peak,
steps_peak_mem_mb: the peak over the training steps alone; the engine's PeakMemory, so both sides measure alike).
With --floor it only imports what the engine imports, starts the process group and writes <out>/floor.rank<r>.json:
the runtime's own peak RSS, before any model exists.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import megadistil.engine.trainer  # noqa: F401 - the floor must import exactly what the engine imports
from megadistil.config import RunConfig, load_config
from megadistil.data.packed import IGNORE_INDEX, PackedTextBatches
from megadistil.distributed import init_distributed
from megadistil.engine.device import engine_device, place
from megadistil.engine.ds_config import load_ds_config, reconcile_ds_config
from megadistil.engine.metrics import PeakMemory
from megadistil.engine.model import load_causal_lm


def full_logits_kd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Forward KL(teacher || student) per token on the whole vocabulary, T²-scaled, mean over label tokens."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    mask = labels != IGNORE_INDEX
    return temperature**2 * kl[mask].mean()


def build_engines(cfg: RunConfig, ds_config: dict, dtype: torch.dtype):
    import deepspeed

    student = load_causal_lm(cfg.model.student, cfg, ds_config, dtype)
    if cfg.model.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.config.use_cache = False
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    student_engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    teacher = load_causal_lm(cfg.model.student, cfg, ds_config, dtype).requires_grad_(False).eval()
    teacher.config.use_cache = False
    teacher_engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
    return student_engine, teacher_engine


def train(cfg: RunConfig, ds_config: dict, rank: int, world: int, out: Path, placement) -> None:
    student, teacher = build_engines(cfg, ds_config, placement.dtype)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(cfg.model.student)
    data = iter(PackedTextBatches.from_files(list(cfg.data.text), tokenizer, cfg.data.seq_len,
                                             batch_size=cfg.train.micro_batch_size, rank=rank, world_size=world,
                                             seed=cfg.train.seed))
    student.train()
    peak = PeakMemory(placement.device)
    peak.start_steps()
    log = (out / f"rank{rank}.jsonl").open("w")
    for step in range(1, cfg.train.max_steps + 1):
        start = time.perf_counter()  # like the engine's step time: data, teacher, student, backward, update
        batch = {k: v.to(placement.device, non_blocking=True) for k, v in next(data).items()}
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"]).logits
        student_logits = student(input_ids=batch["input_ids"]).logits
        loss = full_logits_kd(student_logits, teacher_logits, batch["labels"], cfg.loss.temperature)
        student.backward(loss)
        student.step()
        seconds = time.perf_counter() - start
        del teacher_logits, student_logits
        log.write(json.dumps({"step": step, "loss": float(loss), "step_time_s": seconds,
                              "peak_mem_mb": peak.lifetime_mb(), "steps_peak_mem_mb": peak.steps_mb()}) + "\n")
        log.flush()
    log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config yaml (the benchmark's megadistil config)")
    parser.add_argument("--ds_config", default="ds_configs/zero3.json")
    parser.add_argument("--out", required=True, help="directory for rank<r>.jsonl")
    parser.add_argument("--floor", action="store_true", help="only measure the runtime's RSS floor")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for launch/train.py")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    info = init_distributed(timeout_s=cfg.train.dist_timeout_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.floor:
        torch.distributed.barrier()
        floor = PeakMemory(engine_device()).lifetime_mb()
        (out / f"floor.rank{info.rank}.json").write_text(json.dumps({"peak_mem_mb": floor}))
        return
    placement = place(cfg.bitnet.kernel, cfg.model.dtype, local_world_size=info.local_world_size)
    bf16 = placement.dtype == torch.bfloat16
    ds_config = reconcile_ds_config(cfg, load_ds_config(args.ds_config), world_size=info.world_size, bf16=bf16)
    train(cfg, ds_config, info.rank, info.world_size, out, placement)


if __name__ == "__main__":
    main()
