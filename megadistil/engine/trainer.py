"""The distillation recipe on a DeepSpeed engine: setup / train / save / cleanup."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer

from megadistil.bitnet import set_quant_lambda
from megadistil.config import ConfigError, RunConfig, load_ds_config, reconcile_ds_config, stage_config, to_yaml
from megadistil.data import Manifest, ShardStream, tokenizer_fingerprint
from megadistil.data.packed import PackedTextBatches, eval_sequences, shifted_batch
from megadistil.distill.losses import (
    IGNORE_INDEX, LossConfig, attention_relation_loss, chunked_lm_head_loss, hidden_state_loss, resolve_layers,
)
from megadistil.engine import checkpoint
from megadistil.engine.architecture import check_architecture
from megadistil.engine.device import place
from megadistil.engine.distributed import init_distributed
from megadistil.engine.metrics import MetricsLogger, peak_memory_mb
from megadistil.engine.model import assign_param_groups, build_student, check_model_dir, load_causal_lm
from megadistil.engine.relora import relora_reset
from megadistil.engine.schedule import is_reset_step, lr_at
from megadistil.engine.teachers import HFTeacher, NoTeacher, OfflineTeacher, SharedTeacher, Targets, Teacher
from megadistil.models import capture_qkv, decoder, logit_transform, output_head, output_head_name


class DistillModule(nn.Module):
    """The student plus its loss, as one module so that ZeRO-3 gathers the lm_head weight for the chunked loss."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.logit_transform = logit_transform(student.config, type(student))  # softcapping etc.: the model's logits

    def forward(self, input_ids: Tensor, labels: Tensor, targets: Targets, cfg: LossConfig,
                hidden_layers: list[int], qkv_layers: list[int]) -> dict[str, Tensor]:
        with capture_qkv(self.student, qkv_layers) as qkv:
            out = decoder(self.student)(input_ids=input_ids, output_hidden_states=bool(hidden_layers))
        weight = output_head(self.student).weight
        parts = chunked_lm_head_loss(out.last_hidden_state, weight, labels, cfg, sparse=targets.sparse,
                                     teacher_hidden=targets.hidden,
                                     teacher_lm_head_weight=weight if targets.hidden is not None else None,
                                     logit_transform=self.logit_transform)
        mask = labels != IGNORE_INDEX
        if hidden_layers and targets.layer_hidden:
            student_hidden = [out.hidden_states[i + 1] for i in hidden_layers]
            parts["hidden"] = hidden_state_loss(student_hidden, targets.layer_hidden, mask,
                                                magnitude_weight=cfg.hidden_magnitude_weight)
            parts["loss"] = parts["loss"] + cfg.hidden_weight * parts["hidden"]
        if qkv_layers and targets.qkv:
            terms = [attention_relation_loss(qkv[i], targets.qkv[i], mask,
                                             num_relation_heads=cfg.attn_relation_heads,
                                             temperature=cfg.attn_relation_temperature) for i in qkv_layers]
            parts["attn"] = torch.stack(terms).mean()
            parts["loss"] = parts["loss"] + cfg.attn_relation_weight * parts["attn"]
        return parts


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config_path: str) -> None:
        self.cfg, self.ds_config_path = cfg, ds_config_path
        self.run_dir = Path(cfg.train.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.step = 0
        self.resets = 0
        self.nan_total = 0
        self.logger: MetricsLogger | None = None
        self.faults = _faults_from_env()
        self._batches_drawn = 0
        self._interval = _StepClock()
        self._owns_process_group = not dist.is_initialized()  # cleanup ends only a process group this run started

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(timeout_s=cfg.train.dist_timeout_s)
        try:
            self.placement = place(cfg.bitnet.kernel, cfg.model.dtype, local_world_size=self.dist.local_world_size)
        except ValueError as e:
            raise ConfigError(f"config key 'bitnet.kernel': {e}") from None
        self.device = self.placement.device
        self._print(self.placement.describe())
        _seed_everything(cfg.train.seed)
        bf16 = self.placement.dtype == torch.bfloat16
        self.ds_config = reconcile_ds_config(cfg, load_ds_config(self.ds_config_path),
                                             world_size=self.dist.world_size, bf16=bf16)
        self._check_inputs()
        self.data = self._build_data()
        student = build_student(cfg, self.ds_config, self.placement)
        groups = assign_param_groups(student, cfg)
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.module = DistillModule(student)
        if self.ds_config["zero_optimization"]["stage"] == 3:
            deepspeed.zero.register_external_parameter(self.module, output_head(student).weight)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.num_layers = student.config.num_hidden_layers
        self.teacher = self._build_teacher(student)
        self.eval_seqs = self._build_eval()
        self._prepare_run_dir()
        if cfg.train.resume == "auto":
            self._resume()
        self._truncate_metrics()

    def _check_inputs(self) -> None:
        """Everything that can be checked before a weight is loaded."""
        cfg = self.cfg
        check_model_dir(cfg.model.student, "model.student")
        if cfg.model.teacher not in ("shared", "none"):
            check_model_dir(cfg.model.teacher, "model.teacher")
        if cfg.model.teacher == "none" and not cfg.data.shards:
            raise ConfigError("config key 'model.teacher': none needs data.shards (offline targets)")
        student_config = AutoConfig.from_pretrained(cfg.model.student, trust_remote_code=cfg.model.trust_remote_code)
        check_architecture(student_config, cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.student,
                                                       trust_remote_code=cfg.model.trust_remote_code)
        if cfg.data.shards:
            manifest = Manifest.load(cfg.data.shards)
            try:
                manifest.check_compatible(vocab_size=student_config.vocab_size,
                                          tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer))
            except ValueError as e:
                raise ConfigError(f"config key 'data.shards': {e}") from None
            if not math.isclose(manifest.temperature, cfg.loss.temperature):
                raise ConfigError(f"config key 'loss.temperature': {cfg.loss.temperature} but the shards in "
                                  f"{cfg.data.shards} hold targets at T={manifest.temperature}")
        if cfg.train.eval_tasks:
            from megadistil.eval.tasks import EvalError, preflight

            try:
                preflight(list(cfg.train.eval_tasks), cfg.train.eval_tasks_include_path or None)
            except EvalError as e:
                raise ConfigError(f"config key 'train.eval_tasks': {e}") from None

    def _build_data(self):
        cfg, d = self.cfg, self.cfg.data
        common = dict(batch_size=cfg.train.micro_batch_size, rank=self.dist.rank, world_size=self.dist.world_size,
                      pin_memory=self.device.type == "cuda")
        if d.shards:
            return ShardStream(d.shards, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
                               seed=d.seed or cfg.train.seed, on_corrupt=d.on_corrupt, epochs=d.epochs, **common)
        return PackedTextBatches.from_files(list(d.text), self.tokenizer, d.seq_len, seed=cfg.train.seed, **common)

    def _build_eval(self) -> np.ndarray | None:
        d = self.cfg.data
        if not d.eval_text:
            return None
        seq_len = d.seq_len if d.text else Manifest.load(d.shards).seq_len
        count = self.cfg.train.eval_batches * self.cfg.train.micro_batch_size * self.dist.world_size
        return eval_sequences(list(d.eval_text), self.tokenizer, seq_len, count)

    def _build_teacher(self, student: nn.Module) -> Teacher:
        cfg = self.cfg
        if not (cfg.loss.kd_weight or cfg.loss.hidden_weight or cfg.loss.attn_relation_weight or cfg.stages):
            return NoTeacher()  # CE only: a teacher forward every step would be thrown away
        if cfg.model.teacher == "none":
            return OfflineTeacher()
        if cfg.model.teacher == "shared":
            if cfg.data.shards:
                return OfflineTeacher()  # the shards are the targets; the shared teacher is still used for eval
            hidden = resolve_layers(cfg.loss.hidden_layers, self.num_layers, "loss.hidden_layers") \
                if cfg.loss.hidden_weight else []
            qkv = resolve_layers(cfg.loss.attn_relation_layers, self.num_layers, "loss.attn_relation_layers") \
                if cfg.loss.attn_relation_weight else []
            return SharedTeacher(self.engine.module.student, hidden_layers=hidden, qkv_layers=qkv)
        model = load_causal_lm(cfg.model.teacher, cfg, self.ds_config, self.placement.dtype)
        return HFTeacher(model, self.ds_config, top_k=cfg.model.teacher_top_k, temperature=cfg.loss.temperature,
                         chunk_tokens=cfg.loss.chunk_tokens)

    def _prepare_run_dir(self) -> None:
        if self.dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            (self.run_dir / "run.json").write_text(json.dumps({
                "git_sha": _git_sha(), "world_size": self.dist.world_size, "placement": self.placement.as_dict(),
                "ds_config": self.ds_config,
            }, indent=1))
        if dist.is_initialized():
            dist.barrier()
        self.logger = MetricsLogger(self.run_dir, self.cfg.log, rank=self.dist.rank,
                                    run_config=json.loads(json.dumps(self.ds_config)))

    def _truncate_metrics(self) -> None:
        """A killed run may have logged steps past its last checkpoint, and resume=never starts over: keep only the
        records up to the step we start from, so metrics.jsonl reads as one run."""
        path = self.run_dir / "metrics.jsonl"
        if self.dist.rank == 0 and path.is_file():
            keep = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) < self.step
                    or (self.step and json.loads(line).get("step") == self.step)]
            checkpoint.write_atomic(path, "".join(line + "\n" for line in keep))

    def _resume(self) -> None:
        tag = checkpoint.latest_tag(self.ckpt_root)
        if tag is None:
            return
        meta, state = checkpoint.load(self.engine, self.ckpt_root, tag, rank=self.dist.rank)
        self.step, self.resets, self.nan_total = meta["step"], meta["resets"], meta["nan_total"]
        self.data.load_state_dict(state["data"])
        self._print(f"resumed from {self.ckpt_root / tag} at step {self.step}")

    # ---------------------------------------------------------------- train
    def train(self) -> None:
        cfg = self.cfg
        batches = iter(self.data)
        self.engine.train()
        if self.step == 0 and self._evaluates():
            self._evaluate(teacher=True)
        while self.step < cfg.train.max_steps:
            step = self.step + 1
            active = stage_config(cfg, step) if cfg.stages else cfg
            self._before_step(step, active)
            start = time.perf_counter()
            parts, tokens = self._optimizer_step(batches, active)
            self.step = step
            if self._is_log_step(step):
                self._log_step(step, parts, tokens, start)
            else:
                self._interval.add(time.perf_counter() - start)
            if step % cfg.train.save_every == 0 or step == cfg.train.max_steps:
                self.save()
            if self._evaluates() and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                self._evaluate()
            self._fault("kill_after_step", step)
        if self._evaluates() and not (cfg.train.eval_every and self.step % cfg.train.eval_every == 0):
            self._evaluate()

    def _before_step(self, step: int, active: RunConfig) -> None:
        if is_reset_step(step, self.cfg.relora):
            self.resets += 1
            relora_reset(self.engine.module.student, self.cfg.relora, seed=self.cfg.train.seed,
                         reset_index=self.resets)
        lr = lr_at(step, active.optim, self.cfg.relora, self.cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = active.optim.weight_decay
        self.lr = lr
        warmup = self.cfg.bitnet.quant_warmup_steps
        if warmup:
            set_quant_lambda(self.engine.module.student, min(1.0, (step - 1) / warmup))

    def _optimizer_step(self, batches, active: RunConfig) -> tuple[dict[str, Tensor], Tensor]:
        """grad_accum finite micro-batches. A non-finite loss (on any rank) skips that micro-batch: no backward,
        no optimizer update; max_nan_steps of them in a row stop the run with the last checkpoint intact.
        The loss parts are summed on the device; only the finite check reads a scalar back each micro-batch."""
        done, consecutive, sums, tokens = 0, 0, {}, torch.zeros((), dtype=torch.int64, device=self.device)
        while done < self.cfg.train.grad_accum:
            batch = self._to_device(next(batches))
            parts = self._forward(batch, active.loss)
            if self._fault("nan_batches", self._batches_drawn):
                parts["loss"] = parts["loss"] * float("nan")
            if not self._all_finite(parts["loss"]):
                consecutive += 1
                self.nan_total += 1
                self._print(f"step {self.step + 1}: non-finite loss, micro-batch skipped ({consecutive} in a row)")
                if consecutive >= self.cfg.train.max_nan_steps:
                    raise FloatingPointError(f"{consecutive} non-finite losses in a row at step {self.step + 1}; "
                                             f"stopping (last checkpoint: {checkpoint.latest_tag(self.ckpt_root)})")
                continue
            consecutive = 0
            self.engine.backward(parts["loss"])
            self.engine.step()
            done += 1
            tokens += parts.pop("tokens")
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / self.cfg.train.grad_accum
        return sums, tokens

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loader's (pinned, on CUDA) CPU tensors onto the engine's device, without blocking the host."""
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _forward(self, batch: dict[str, Tensor], loss_cfg: LossConfig) -> dict[str, Tensor]:
        self._batches_drawn += 1
        targets = self.teacher.targets(batch)
        hidden = getattr(self.teacher, "hidden_layers", [])
        qkv = getattr(self.teacher, "qkv_layers", [])
        return self.engine(batch["input_ids"], batch["labels"], targets, loss_cfg, hidden, qkv)

    def _peak_memory(self) -> dict[str, float]:
        """peak_mem_mb (the largest over ranks) and peak_mem_mb_rank<r> for each rank."""
        mine = torch.tensor([peak_memory_mb()], dtype=torch.float64, device=self.device)
        every = [mine]
        if dist.is_initialized():
            every = [torch.zeros_like(mine) for _ in range(self.dist.world_size)]
            dist.all_gather(every, mine)
        per_rank = {f"peak_mem_mb_rank{r}": round(float(t), 1) for r, t in enumerate(every)}
        return {"peak_mem_mb": max(per_rank.values()), **per_rank}

    def _all_finite(self, loss: Tensor) -> bool:
        flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _is_log_step(self, step: int) -> bool:
        return step % self.cfg.log.every == 0 or step == self.cfg.train.max_steps

    def _log_step(self, step: int, parts: dict[str, Tensor], tokens: Tensor, start: float) -> None:
        """The logged step's loss parts (read back here, the one place they leave the device) and the speed over the
        steps since the last record; step time excludes checkpoints and evaluations."""
        values = {k: float(v) for k, v in parts.items()}  # waits for the device: the interval ends here
        seconds = self._interval.add(time.perf_counter() - start).mean_and_reset()
        total_tokens = int(tokens) * self.dist.world_size
        record = {"step": step, **values, "lr": self.lr, "tokens": total_tokens,
                  "tokens_per_s": total_tokens / seconds, "step_time_s": seconds,
                  "resets": self.resets, "nan_skipped": self.nan_total, **self._peak_memory()}
        self.logger.log(record)

    @torch.no_grad()
    def _evaluate(self, teacher: bool = False) -> None:
        """Held-out perplexity of the student and, with the shared teacher, its KD to the teacher on the same text
        (once also the teacher's own perplexity), over every rank's slice of the eval sequences; train.eval_tasks."""
        from megadistil.bitnet import teacher_mode

        self.engine.eval()
        live = self.cfg.model.teacher == "shared"
        loss_cfg = LossConfig(kind=self.cfg.loss.kind, temperature=self.cfg.loss.temperature,
                              kd_weight=1.0 if live else 0.0, ce_weight=1.0, chunk_tokens=self.cfg.loss.chunk_tokens)
        record = {"step": self.step, **self._task_scores()}
        if self.eval_seqs is not None:
            ce, kd = self._eval_pass(loss_cfg, live)
            record.update({"eval_ppl_student": math.exp(ce), **({"eval_kd": kd} if live else {})})
        if teacher and live and self.eval_seqs is not None:
            with teacher_mode(self.engine.module.student):
                record["eval_ppl_teacher"] = math.exp(self._eval_pass(replace(loss_cfg, kd_weight=0.0), False)[0])
        self.engine.train()
        self.logger.log(record)

    def _evaluates(self) -> bool:
        return self.eval_seqs is not None or bool(self.cfg.train.eval_tasks)

    def _task_scores(self) -> dict[str, float]:
        """train.eval_tasks on the student, as tools/evaluate.py scores them. Every rank runs the same documents in
        lockstep (ZeRO-3 gathers each layer collectively, so no rank may skip a forward); rank 0 logs."""
        t = self.cfg.train
        if not t.eval_tasks:
            return {}
        from megadistil.eval.tasks import flat_scores, run_tasks

        table = run_tasks(self.engine.module.student, self.tokenizer, list(t.eval_tasks), checked=True,
                          include_path=t.eval_tasks_include_path or None, limit=t.eval_tasks_limit,
                          batch_size=t.micro_batch_size)
        return flat_scores(table)

    def _eval_pass(self, loss_cfg: LossConfig, live: bool) -> tuple[float, float]:
        """Token-weighted mean CE and KD over the eval sequences (all ranks)."""
        mb, world, rank = self.cfg.train.micro_batch_size, self.dist.world_size, self.dist.rank
        shared = SharedTeacher(self.engine.module.student, hidden_layers=[], qkv_layers=[])
        total = torch.zeros(3, dtype=torch.float64, device=self.device)
        for start in range(rank * mb, len(self.eval_seqs), mb * world):
            batch = self._to_device(shifted_batch(self.eval_seqs[start:start + mb]))
            targets = shared.targets(batch) if live else Targets()
            parts = self.engine(batch["input_ids"], batch["labels"], targets, loss_cfg, [], [])
            n = parts["tokens"].double()
            total += torch.stack([parts["ce"].double() * n, parts["kd"].double() * n, n])
        if dist.is_initialized():
            dist.all_reduce(total)
        n = float(total[2].clamp(min=1))
        return float(total[0]) / n, float(total[1]) / n

    # ---------------------------------------------------------------- save / cleanup
    def save(self) -> None:
        tag = checkpoint.save(self.engine, self.ckpt_root, self.step,
                              rank_state={"data": self.data.state_dict()},
                              meta={"resets": self.resets, "nan_total": self.nan_total,
                                    "output_head": output_head_name(self.engine.module.student),
                                    "base_fingerprint": checkpoint.model_dir_fingerprint(self.cfg.model.student)},
                              config_yaml=to_yaml(self.cfg))
        self._print(f"saved {self.ckpt_root / tag}")

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if dist.is_initialized() and self._owns_process_group:
            dist.destroy_process_group()

    # ---------------------------------------------------------------- helpers
    def _print(self, message: str) -> None:
        if self.dist.rank == 0:
            print(f"[megadistil] {message}", flush=True)

    def _fault(self, name: str, value: int) -> bool:
        """Fault injection for the tests (MEGADISTIL_FAULT_<NAME>=n,m): kill_after_step SIGKILLs every rank."""
        hit = value in self.faults.get(name, ())
        if hit and name == "kill_after_step":
            os.kill(os.getpid(), signal.SIGKILL)
        return hit


class _StepClock:
    """Step time between log records: device work queued by unlogged steps finishes inside the logged one."""

    def __init__(self) -> None:
        self.seconds, self.steps = 0.0, 0

    def add(self, seconds: float) -> _StepClock:
        self.seconds, self.steps = self.seconds + seconds, self.steps + 1
        return self

    def mean_and_reset(self) -> float:
        mean = self.seconds / max(self.steps, 1)
        self.seconds, self.steps = 0.0, 0
        return mean


def _faults_from_env() -> dict[str, set[int]]:
    faults = {}
    for name in ("kill_after_step", "nan_batches"):
        raw = os.environ.get(f"MEGADISTIL_FAULT_{name.upper()}", "")
        faults[name] = {int(v) for v in raw.split(",") if v.strip()}
    return faults


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(cfg: RunConfig, ds_config_path: str) -> Trainer:
    trainer = Trainer(cfg, ds_config_path)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer


