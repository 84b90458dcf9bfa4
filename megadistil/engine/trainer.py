"""The distillation recipe on a DeepSpeed engine: setup / train / save / cleanup."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.zero import unwrap_model_for_generation
from omegaconf import ListConfig, OmegaConf
from torch import Tensor, nn
from transformers import AutoConfig

from megadistil import rundir, stop_signal, utils
from megadistil.bitnet import set_quant_lambda
from megadistil.config import (
    ConfigError,
    Resume,
    RunConfig,
    TeacherKind,
    changed_settings,
    loss_configs,
    stage_config,
    to_yaml,
    uses_onpolicy,
    value_at,
)
from megadistil.data import ShardStream
from megadistil.data.crosstok import CrossTokenizerBatches, padded_vocab_map, vocab_map
from megadistil.data.packed import PackedTextBatches, eval_sequences, shifted_batch
from megadistil.data.precompute import teacher_dir_fingerprint
from megadistil.distill.losses import IGNORE_INDEX, LossConfig
from megadistil.distill.onpolicy import OnPolicyConfig, is_onpolicy, onpolicy_batch, sequence_indices
from megadistil.distributed import init_distributed
from megadistil.engine import checkpoint
from megadistil.engine.device import agreed, as_resumed, place
from megadistil.engine.ds_config import load_ds_config, reconcile_ds_config
from megadistil.engine.inputs import check_inputs
from megadistil.engine.metrics import MetricsLogger, OnPolicyStats, PeakMemory
from megadistil.engine.model import assign_param_groups, build_optimizer, build_student, load_causal_lm
from megadistil.engine.module import DistillModule
from megadistil.engine.profile import phase, profiled_step
from megadistil.engine.relora import relora_reset
from megadistil.engine.schedule import is_reset_step, run_lr_at
from megadistil.engine.teachers import (
    CrossTokenizerTeacher,
    HFTeacher,
    NoTeacher,
    OfflineTeacher,
    ReferenceModel,
    SharedTeacher,
    Targets,
    Teacher,
)
from megadistil.models import output_head, output_head_name
from megadistil.sampling import eos_token_ids, lockstep_any, sample


@dataclass
class TrainState:
    """What the loop counts, saved in every checkpoint's meta.json and restored on resume."""

    step: int = 0  # optimizer steps done
    resets: int = 0  # ReLoRA merges done
    nan_skipped: int = 0  # micro-batches skipped for a non-finite loss

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, int(state[f.name]))


# Settings that give the student's parameters their shape or scale: a resumed run must keep the checkpoint's.
RESUMED_AS_SAVED = ("bitnet.lora_rank", "bitnet.lora_alpha", "bitnet.subln", "bitnet.exclude", "relora.delta_format")


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config_path: str) -> None:
        self.cfg, self.ds_config_path = cfg, ds_config_path
        self.run_dir = Path(cfg.train.output_dir)
        self.ckpt_root = rundir.checkpoints_dir(self.run_dir)
        self.state = TrainState()
        self.logger: MetricsLogger | None = None
        self._owns_process_group = False
        self._stage_config = (0, cfg)  # (stages started, the config they make)
        self._interval = _StepClock()
        self.changed_on_resume: dict[str, tuple[Any, Any]] = {}  # key -> (saved with the checkpoint, now)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self._owns_process_group = not dist.is_initialized()  # cleanup ends only a process group this run started
        self.dist = init_distributed(timeout_s=cfg.train.dist_timeout_s)
        self.resume_tag = self._agreed_resume_tag()
        stop_signal.watch()  # launch/train.py already does, before its imports
        self._check_resumable()
        try:
            placement = place(cfg.bitnet.kernel, cfg.model.dtype, local_world_size=self.dist.local_world_size,
                              compile_quantizers=cfg.bitnet.compile_quantizers)
        except ValueError as e:
            raise ConfigError(f"config key 'bitnet.kernel': {e}") from None
        try:
            self.placement = agreed(as_resumed(placement, self._resumed_placement(), kernel=cfg.bitnet.kernel,
                                               dtype=cfg.model.dtype))
        except ValueError as e:
            raise ConfigError(f"config key 'model.dtype': {e} ({self.ckpt_root})") from None
        self.device = self.placement.device
        self.peak = PeakMemory(self.device)
        self._print(self.placement.describe())
        _seed_everything(cfg.train.seed)
        bf16 = self.placement.dtype == torch.bfloat16
        self.ds_config = reconcile_ds_config(cfg, load_ds_config(self.ds_config_path),
                                             world_size=self.dist.world_size, bf16=bf16)
        self.inputs = check_inputs(cfg, self.dist.world_size)
        self.data = self._build_data()
        self._check_data_resumable()
        self.eval_seqs = self._build_eval()  # before any weight loads: a held-out text too short is a config error
        student = build_student(cfg, self.ds_config, self.placement)
        groups = assign_param_groups(student, cfg)
        projector = self._build_projector(student)
        if projector is not None:
            groups.append({"params": [projector.weight], "lr_mult": 1.0, "wd_mult": 1.0,
                           "weight_decay": cfg.optim.weight_decay})
        self._group_settings = [{k: g[k] for k in ("lr_mult", "wd_mult")} for g in groups]
        optimizer = build_optimizer(groups, cfg.optim, self.ds_config)
        self.module = DistillModule(student, cfg.preference if cfg.preference.reference else None, projector)
        if self.ds_config["zero_optimization"]["stage"] == 3:
            deepspeed.zero.register_external_parameter(self.module.head_loss, output_head(student).weight)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.teacher = self._build_teacher()
        self.reference = self._build_reference()
        self.lockstep = lockstep_any(self.device) if dist.is_initialized() and self.dist.world_size > 1 else None
        self.onpolicy_on = uses_onpolicy(cfg)
        self.eval_kd = self.eval_seqs is not None and self._shared_is_the_teacher()
        self._prepare_run_dir()
        if cfg.train.resume == Resume.auto:
            self._resume()
        self._record_run()  # after the resume: a refused one leaves the run's config.yaml as it was
        self._truncate_metrics()

    def _agreed_resume_tag(self) -> str | None:
        """The checkpoint this run resumes (resume=auto), the same on every rank: ranks that see different ones (an
        output dir on node-local disks) would enter DeepSpeed's collective load apart and hang."""
        tag = checkpoint.latest_tag(self.ckpt_root) if self.cfg.train.resume == Resume.auto else None
        if dist.is_initialized() and self.dist.world_size > 1:
            tags: list[str | None] = [None] * self.dist.world_size
            dist.all_gather_object(tags, tag)
            if len(set(tags)) > 1:
                seen = ", ".join(f"rank {r}: {t or 'none'}" for r, t in enumerate(tags))
                raise ConfigError(f"config key 'train.output_dir': the ranks see different checkpoints in "
                                  f"{self.ckpt_root} ({seen}): it must be one directory every node shares")
        return tag

    def _check_resumable(self) -> None:
        """The checkpoint to resume trained from this base, with adapters of this shape and scale: checked before any
        weight loads or the run dir is touched. Another base of the same shapes resumed silently; other adapter
        shapes were DeepSpeed's size-mismatch traceback after config.yaml had been rewritten."""
        if self.resume_tag is None:
            return
        tag_dir = self.ckpt_root / self.resume_tag
        recorded = rundir.read_meta(tag_dir).get("base_fingerprint")
        if recorded and not rundir.fingerprint_matches(self.cfg.model.student, recorded):
            raise ConfigError(f"config key 'model.student': {self.cfg.model.student} is not the base the checkpoint "
                              f"{tag_dir} trained from (its fingerprint differs from meta.json's): resume with that "
                              "base, or start a new train.output_dir")
        has_deltas = rundir.read_delta_index(tag_dir) is not None
        if has_deltas != (self.cfg.relora.reset_every > 0):
            held = "holds merged ΔW" if has_deltas else "holds no ΔW"
            raise ConfigError(f"config key 'relora.reset_every': {self.cfg.relora.reset_every} but the checkpoint "
                              f"{tag_dir} {held}: ReLoRA cannot be switched on or off in a resumed run (its merges "
                              "would be dropped, or the run has no ΔW to resume); start a new train.output_dir")
        saved = OmegaConf.load(tag_dir / rundir.CONFIG)
        for key in RESUMED_AS_SAVED:
            then, now = OmegaConf.select(saved, key, default=KeyError), value_at(self.cfg, key)
            then = OmegaConf.to_container(then) if isinstance(then, ListConfig) else then
            now = list(now) if isinstance(now, tuple) else now
            if then is not KeyError and then != now:  # KeyError: a config saved before the key existed
                raise ConfigError(f"config key {key!r}: {now} but the checkpoint {tag_dir} was trained with {then}: "
                                  "a resumed run keeps the adapters' shape and scale (start a new train.output_dir)")
        self.changed_on_resume = changed_settings(saved, self.cfg)
        if self.changed_on_resume:
            self._print(f"resuming {tag_dir} with settings changed since it was saved (run.json records them): " +
                        "; ".join(f"{k} {then!r} -> {now!r}" for k, (then, now) in self.changed_on_resume.items()))

    def _check_data_resumable(self) -> None:
        """The reader starts at the data position the checkpoint holds, if it fits this run's reader (world size,
        micro-batch size, seed, shards or text): checked on every rank before any weight loads (it was after the
        model and optimizer state had loaded, minutes on a 70B), and refused on every rank together (one rank alone
        would leave the others waiting in a collective)."""
        if self.resume_tag is None:
            return
        problem = ""
        try:
            self.data.load_state_dict(checkpoint.rank_state(self.ckpt_root, self.resume_tag, self.dist.rank)["data"])
        except ValueError as e:  # a changed micro-batch size, seed, world size or text: not the run it continues
            problem = f"rank {self.dist.rank}: {e}"
        if _over_ranks(torch.tensor(bool(problem), device=self.device), dist.ReduceOp.MAX):
            raise ConfigError(f"checkpoint {self.ckpt_root / self.resume_tag}: "
                              f"{problem or 'another rank cannot resume its data position'}")

    def _resumed_placement(self) -> dict | None:
        """The kernel and dtype of the checkpoint this run will resume, if any (checkpoints since they were saved)."""
        return rundir.read_meta(self.ckpt_root / self.resume_tag).get("placement") if self.resume_tag else None

    def _vocab_map(self, teacher_tokenizer: Any, teacher_vocab: int) -> Tensor | None:
        """A teacher's ids -> the student's (-1: none), or None where they are the student's own."""
        if teacher_tokenizer is None:
            student_vocab = utils.full_shape(output_head(self.engine.module.student).weight)[0]
            mapping = padded_vocab_map(teacher_vocab, student_vocab)
        else:
            mapping = vocab_map(teacher_tokenizer, self.inputs.tokenizer, teacher_vocab)
        return None if mapping is None else torch.from_numpy(mapping).to(self.device)

    def _build_data(self):
        cfg, d, tok = self.cfg, self.cfg.data, self.inputs.tokenizer
        common = {"batch_size": cfg.train.micro_batch_size, "rank": self.dist.rank,
                  "world_size": self.dist.world_size, "pin_memory": self.device.type == "cuda"}
        if d.shards:
            return ShardStream.from_config(replace(d, seed=d.seed or cfg.train.seed),
                                           targets=cfg.teacher.kind == TeacherKind.shards, **common)
        if d.preference:
            return PackedTextBatches.from_preference(list(d.preference), tok, d.seq_len, seed=cfg.train.seed,
                                                     split_special_tokens=d.split_special_tokens, **common)
        if self.inputs.teacher_tokenizer is not None:
            return CrossTokenizerBatches.from_files(list(d.text), tok, self.inputs.teacher_tokenizer, d.seq_len,
                                                    seed=cfg.train.seed, **common)
        return PackedTextBatches.from_files(list(d.text), tok, d.seq_len, seed=cfg.train.seed,
                                            split_special_tokens=d.split_special_tokens, **common)

    def _build_eval(self) -> np.ndarray | None:
        d = self.cfg.data
        if not d.eval_text:
            return None
        seq_len = self.inputs.manifest.seq_len if d.shards else d.seq_len
        per_round = self.cfg.train.micro_batch_size * self.dist.world_size
        seqs = eval_sequences(list(d.eval_text), self.inputs.tokenizer, seq_len,
                              self.cfg.train.eval_batches * per_round, split_special_tokens=d.split_special_tokens)
        # Whole rounds only: under ZeRO-3 a rank with one forward more than the others would wait in its gather forever.
        utils.require(len(seqs) >= per_round, "data.eval_text",
                      f"{len(seqs)} sequences of {seq_len} tokens, fewer than train.micro_batch_size "
                      f"{self.cfg.train.micro_batch_size} x {self.dist.world_size} ranks: every rank evaluates whole "
                      "micro-batches", error=ConfigError)
        return seqs[:len(seqs) - len(seqs) % per_round]

    def _build_teacher(self) -> Teacher:
        kind = self.cfg.teacher.kind
        if kind == TeacherKind.shared:
            return SharedTeacher(self.engine.module.student, self.cfg.teacher.layerwise)
        if kind == TeacherKind.shards:
            manifest = self.inputs.manifest
            return OfflineTeacher(self._vocab_map(self.inputs.shards_teacher_tokenizer, manifest.target_vocab))
        if kind == TeacherKind.none:
            return NoTeacher()
        model = load_causal_lm(self.cfg.teacher.path, self.cfg, self.ds_config, self.placement.dtype)
        teacher_vocab = utils.full_shape(output_head(model).weight)[0]
        mapping = self._vocab_map(self.inputs.teacher_tokenizer, teacher_vocab)
        if self.inputs.teacher_tokenizer is None:
            return HFTeacher(model, self.ds_config, top_k=self.cfg.teacher.top_k, vocab_map=mapping)
        return CrossTokenizerTeacher(model, self.ds_config, top_k=self.cfg.teacher.top_k, vocab_map=mapping)

    def _build_projector(self, student: nn.Module) -> nn.Module | None:
        """DSKD's projector (loss.dskd_weight at any stage): the teacher's hidden size -> the student's, trained with
        the adapters; born partitioned under ZeRO-3 like them."""
        if not any(loss.dskd_weight for _, loss in loss_configs(self.cfg)):
            return None
        teacher = AutoConfig.from_pretrained(self.cfg.teacher.path, trust_remote_code=self.cfg.model.trust_remote_code)
        zero3 = self.ds_config["zero_optimization"]["stage"] == 3
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=zero3):
            return nn.Linear(teacher.hidden_size, student.config.hidden_size, bias=False, dtype=self.placement.dtype)

    def _build_reference(self) -> ReferenceModel | None:
        path = self.cfg.preference.reference
        if not path:
            return None
        return ReferenceModel(load_causal_lm(path, self.cfg, self.ds_config, self.placement.dtype), self.ds_config)

    def _shared_is_the_teacher(self) -> bool:
        """Whether the held-out KD to the shared teacher (the base model) measures distillation to this run's
        teacher: with the shared kind, or with shards precomputed from the student's own base model."""
        kind = self.cfg.teacher.kind
        if kind == TeacherKind.shards:
            return self.inputs.manifest.teacher_fingerprint == \
                teacher_dir_fingerprint(self.cfg.model.student)
        return kind == TeacherKind.shared

    def _prepare_run_dir(self) -> None:
        if self.dist.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            withdrawn = rundir.withdraw_latest(self.ckpt_root) if self.cfg.train.resume == Resume.never else None
            if withdrawn:
                self._print(f"train.resume=never: {self.ckpt_root}/{rundir.LATEST} named {withdrawn!r} of an earlier "
                            "run; removed, so that neither a resume nor an export takes it for this run's")
        if dist.is_initialized():
            dist.barrier()
        self.logger = MetricsLogger(self.run_dir, self.cfg.log, rank=self.dist.rank,
                                    run_config=self._wandb_config(), resumed=self.resume_tag is not None)

    def _record_run(self) -> None:
        """config.yaml and run.json: this run's config, and where and how it runs (and what it changed on resume)."""
        if self.dist.rank == 0:
            (self.run_dir / rundir.CONFIG).write_text(to_yaml(self.cfg))
            (self.run_dir / rundir.RUN_INFO).write_text(json.dumps({
                "git_sha": utils.git_sha(), "world_size": self.dist.world_size, "placement": self.placement.as_dict(),
                "ds_config": self.ds_config, "changed_on_resume": self.changed_on_resume,
            }, indent=1))

    def _wandb_config(self) -> dict[str, Any]:
        """The resolved run config as wandb's run config, with the ds_config and placement it resolved to."""
        run = OmegaConf.to_container(OmegaConf.structured(self.cfg), enum_to_str=True)
        return {**run, "ds_config": self.ds_config, "placement": self.placement.as_dict()}

    def _truncate_metrics(self) -> None:
        """A killed run may have logged steps past its last checkpoint, and resume=never starts over: keep only the
        records up to the step we start from, so metrics.jsonl reads as one run."""
        path = self.run_dir / rundir.METRICS
        if self.dist.rank == 0 and path.is_file():
            keep = [line for line in path.read_text().splitlines() if _kept(line, self.state.step)]
            utils.write_atomic(path, "".join(line + "\n" for line in keep))

    def _resume(self) -> None:
        tag = self.resume_tag
        if tag is None:
            return
        try:
            meta, _ = checkpoint.load(self.engine, self.ckpt_root, tag, rank=self.dist.rank)
        except ValueError as e:
            if "parameter group" not in str(e):
                raise
            raise ConfigError(f"checkpoint {self.ckpt_root / tag}: {e}: optim.param_groups make other optimizer "
                              "groups than the checkpoint's (norm gains and biases now have groups of their own, "
                              "without weight decay; a checkpoint saved before that resumes with the megadistil that "
                              "saved it)") from None
        self.state.load_state_dict(meta)
        self._restore_group_settings()
        self._print(f"resumed from {self.ckpt_root / tag} at step {self.state.step}")

    def _restore_group_settings(self) -> None:
        """DeepSpeed's optimizer load takes every group setting from the checkpoint: this run's lr_mult, weight-decay
        multiplier, betas and eps win (lr and weight decay themselves are set again at every step)."""
        for group, mine in zip(self.optimizer.param_groups, self._group_settings, strict=True):
            group.update(mine, betas=tuple(self.cfg.optim.betas), eps=self.cfg.optim.eps)

    # ---------------------------------------------------------------- train
    def train(self) -> None:
        cfg = self.cfg
        if self.state.step >= cfg.train.max_steps:  # a resumed, finished run: its final evaluation is logged already
            self._print(f"nothing to train: the checkpoint is at step {self.state.step}, train.max_steps is "
                        f"{cfg.train.max_steps} (raise it to train on)")
            return
        batches = iter(self.data)
        self.engine.train()
        if self.state.step == 0 and self._evaluates():
            self._evaluate(teacher=True)
        self.peak.start_steps()
        with stop_signal.stoppable(sigterm=self.dist.launcher not in ("deepspeed", "torchrun")):
            self._steps(batches)

    def _steps(self, batches) -> None:
        """Steps until train.max_steps, or until a rank got a stop signal (saved there). A step's evaluation (every
        eval_every, and the last step's) comes before its checkpoint: a run killed in between resumes from the step
        before and evaluates again (a resume from the checkpoint would not: the evaluation was lost)."""
        cfg = self.cfg
        while self.state.step < cfg.train.max_steps:
            step = self.state.step + 1
            active = self._config_at(step)
            self._before_step(step, active)
            start = time.perf_counter()
            with profiled_step(self.run_dir, self.dist.rank) if step == cfg.log.profile_step else \
                    contextlib.nullcontext():
                parts, tokens, onpolicy = self._optimizer_step(batches, active)
            self.state.step = step
            if self._is_log_step(step):
                self._log_step(step, parts, tokens, start, onpolicy)
            else:
                self._interval.add(time.perf_counter() - start)
            last = step == cfg.train.max_steps
            if self._evaluates() and (last or cfg.train.eval_every and step % cfg.train.eval_every == 0):
                self._evaluate()
            if step % cfg.train.save_every == 0 or last:
                self.save()
            if not last and self._stop_agreed():  # the last step ends the run anyway
                if step % cfg.train.save_every:
                    self.save()
                why = stop_signal.reason() if stop_signal.requested() else "another rank's stop signal"
                self._print(f"step {step}: stopping on {why}: the checkpoint is saved, and the next job with this "
                            "train.output_dir resumes from it")
                return

    def _config_at(self, step: int) -> RunConfig:
        """The config in force at `step`, merged again only when another stage has started (an OmegaConf merge per
        step would be host time on the hot path)."""
        started = sum(s.start_step <= step for s in self.cfg.stages)
        if started != self._stage_config[0]:
            self._stage_config = (started, stage_config(self.cfg, step))
        return self._stage_config[1]

    def _before_step(self, step: int, active: RunConfig) -> None:
        if is_reset_step(step, self.cfg.relora):
            self.state.resets += 1
            relora_reset(self.engine.module.student, self.cfg.relora, seed=self.cfg.train.seed,
                         reset_index=self.state.resets)
        lr = run_lr_at(step, self.cfg, active)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = active.optim.weight_decay * group.get("wd_mult", 1.0)
        self.lr = lr
        warmup = self.cfg.bitnet.quant_warmup_steps
        if warmup:
            set_quant_lambda(self.engine.module.student, min(1.0, (step - 1) / warmup))

    def _optimizer_step(self, batches, active: RunConfig) -> tuple[dict[str, Tensor], Tensor, OnPolicyStats]:
        """grad_accum finite micro-batches, weighted by their trained tokens (_token_weight). A non-finite loss
        (on any rank) skips that micro-batch: no backward, no optimizer update; max_nan_steps of them in a row stop
        the run with the last checkpoint intact. The loss parts are summed on the device; a micro-batch reads back
        only the finite check and what the loss's chunk loop and input checks need on the host. An on-policy
        micro-batch (onpolicy.fraction) trains on the student's continuations of its prompts: all of a step's are
        generated first, since their token counts weigh the step (the weights do not change within a step, so the
        continuations are the same)."""
        accum = self.cfg.train.grad_accum
        # Micro-batch positions count every attempt, skipped ones too: a skip must not give two micro-batches one
        # position (the same on-policy choice and sampling seeds). nan_skipped is in every checkpoint.
        first, stats = self.state.step * accum + self.state.nan_skipped, OnPolicyStats()
        queue = [self._micro_batch(batches, active, first + i, stats) for i in range(accum)]
        step_tokens = sum(m.tokens for m in queue).double()
        if dist.is_initialized():
            dist.all_reduce(step_tokens)  # on the device: no host sync
        attempt, consecutive, sums = accum, 0, {}
        tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        kd_tokens = torch.zeros_like(tokens)
        while queue:
            micro = queue.pop(0)
            parts = self._forward(self._to_device(micro.batch), micro.loss_cfg)
            if not self._all_finite(parts["loss"]):
                consecutive += 1
                self.state.nan_skipped += 1
                self._print(f"step {self.state.step + 1}: non-finite loss, micro-batch skipped ({consecutive} in a row)")
                if consecutive >= self.cfg.train.max_nan_steps:
                    raise FloatingPointError(f"{consecutive} non-finite losses in a row at step {self.state.step + 1}; "
                                             f"stopping (last checkpoint: {checkpoint.latest_tag(self.ckpt_root)})")
                replacement = self._micro_batch(batches, active, first + attempt, stats)
                queue.append(replace(replacement, share=micro.share))  # the step's weights still sum to 1
                attempt += 1
                continue
            consecutive = 0
            with phase("backward"):
                self.engine.backward(parts["loss"] * self._token_weight(micro.share, step_tokens))
            with phase("optimizer"):
                self.engine.step()
            if micro.onpolicy:
                stats.trained(parts["tokens"], parts["kd"].detach().float())
            tokens += parts.pop("tokens")
            kd_tokens += parts.pop("kd_tokens")
            for k, v in parts.items():  # token-weighted like the gradient: this rank's mean over its trained tokens
                sums[k] = sums.get(k, 0.0) + v.detach().float() * micro.tokens
        sums = {k: v / tokens.clamp_min(1) for k, v in sums.items()}
        if self.inputs.cross_tokenizer_targets:  # the share of trained tokens a teacher of another tokenizer targets
            sums["kd_target_share"] = kd_tokens.double() / tokens.clamp_min(1)
        norm = self.engine.get_global_grad_norm()  # inf: ZeRO skipped the update (an inf or nan gradient)
        if norm is not None:
            sums["grad_norm"] = torch.as_tensor(norm, dtype=torch.float64)  # read back on logging steps only
        return sums, tokens, stats

    def _micro_batch(self, batches, active: RunConfig, micro: int,
                     stats: OnPolicyStats) -> _MicroBatch:
        """The next micro-batch; position `micro` in the schedule decides whether it is on-policy (then generated
        here, on the device). An off-policy one stays where the loader put it until its forward: a step's shard
        targets on the device at once would be grad_accum times the planned memory."""
        batch = next(batches, None)
        if batch is None:  # only data.epochs ends the data; check_inputs counted its steps without skipped ones
            raise RuntimeError(f"the data ran out at step {self.state.step + 1}: data.epochs={self.cfg.data.epochs} "
                               f"passes, {self.state.nan_skipped} non-finite micro-batches skipped (last checkpoint: "
                               f"{checkpoint.latest_tag(self.ckpt_root)})")
        loss_cfg, onpolicy = active.loss, is_onpolicy(micro, active.onpolicy.fraction)
        if onpolicy:
            with phase("generate"):
                batch = self._generate(self._to_device(batch), active.onpolicy, micro, stats)
            loss_cfg = replace(active.loss, kind=active.onpolicy.kind, ce_weight=0.0)
        tokens = (batch["labels"] != IGNORE_INDEX).sum().to(self.device, non_blocking=True)
        return _MicroBatch(batch, loss_cfg, tokens, onpolicy, share=tokens)

    def _token_weight(self, count: Tensor, step_tokens: Tensor) -> Tensor:
        """A micro-batch's loss weight, so that the step's gradient is the mean over every trained token of the step,
        on every rank: its tokens' share of the step's, times the grad_accum and world size that DeepSpeed divides by
        (backward's mean over micro-batches, the all-reduce's over ranks). Preference rows (padding), on-policy
        continuations and ranks differ in token counts; with equal counts every weight is exactly 1. The KD term of a
        teacher of another tokenizer stays a mean over each micro-batch's aligned tokens. A skipped micro-batch's
        replacement takes its share (the count agreed before the skip), so that the weights still sum to 1."""
        return (count * (self.cfg.train.grad_accum * self.dist.world_size) / step_tokens.clamp_min(1)).float()

    @torch.no_grad()
    def _generate(self, batch: dict[str, Tensor], op: OnPolicyConfig, micro: int,
                  stats: OnPolicyStats) -> dict[str, Tensor]:
        """The student continues each sequence's first onpolicy.prompt_tokens tokens; every rank in lockstep."""
        student = self.engine.module.student
        prompts = batch["input_ids"][:, :op.prompt_tokens]
        indices = sequence_indices(micro, self.dist.rank, self.dist.world_size, prompts.shape[0])
        tok = self.inputs.tokenizer
        stop = eos_token_ids(student.generation_config, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        start = time.perf_counter()
        zero3 = self.engine.zero_optimization_stage() == 3
        gathered, per_layer = zero3 and op.gather_weights, zero3 and not op.gather_weights
        self.engine.eval()  # transformers turns the KV cache off in train mode under gradient checkpointing
        try:
            with unwrap_model_for_generation(self.engine) if gathered else contextlib.nullcontext():
                gen = sample(student, list(prompts), op.sampling(self.cfg.train.seed),
                             eos_token_id=stop if stop is not None else tok.eos_token_id,
                             pad_token_id=pad if pad is not None else 0, indices=indices,
                             lockstep=self.lockstep if per_layer else None,  # whole weights: no collective per token
                             freeze_weight_codes=not per_layer)
        finally:
            self.engine.train()
        stats.generated(int(gen.lengths.sum()), time.perf_counter() - start)
        return onpolicy_batch(prompts, gen)

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loader's (pinned, on CUDA) CPU tensors onto the engine's device, without blocking the host."""
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _forward(self, batch: dict[str, Tensor], loss_cfg: LossConfig) -> dict[str, Tensor]:
        weighted = self.reference is not None
        with phase("teacher"):
            targets = self.teacher.targets(batch, loss_cfg, label_logprobs=weighted)
            if weighted:
                targets.reference_logprobs = self.reference.label_logprobs(batch, loss_cfg.chunk_tokens)
        with phase("student_forward"):
            return self.engine(batch["input_ids"], batch["labels"], targets, loss_cfg)

    def _peak_memory(self) -> dict[str, float]:
        """peak_mem_mb (lifetime, loading included) and steps_peak_mem_mb (the training steps only): the largest
        over ranks, and each rank's as <key>_rank<r>."""
        mine = torch.tensor([self.peak.lifetime_mb(), self.peak.steps_mb()], dtype=torch.float64, device=self.device)
        every = [mine]
        if dist.is_initialized():
            every = [torch.zeros_like(mine) for _ in range(self.dist.world_size)]
            dist.all_gather(every, mine)
        record = {}
        for i, key in enumerate(("peak_mem_mb", "steps_peak_mem_mb")):
            per_rank = {f"{key}_rank{r}": round(float(t[i]), 1) for r, t in enumerate(every)}
            record |= {key: max(per_rank.values()), **per_rank}
        return record

    def _all_finite(self, loss: Tensor) -> bool:
        return _over_ranks(torch.isfinite(loss.detach()).all(), dist.ReduceOp.MIN)

    def _is_log_step(self, step: int) -> bool:
        return step % self.cfg.log.every == 0 or step == self.cfg.train.max_steps

    def _log_step(self, step: int, parts: dict[str, Tensor], tokens: Tensor, start: float,
                  onpolicy: OnPolicyStats) -> None:
        """The logged step's loss parts (read back here, the one place they leave the device) and the speed over the
        steps since the last record; step time excludes checkpoints and evaluations."""
        values = {k: float(v) for k, v in parts.items()}  # waits for the device: the interval ends here
        seconds = self._interval.add(time.perf_counter() - start).mean_and_reset()
        # Every rank's tokens (on-policy and preference rows differ in length from rank to rank) and shard samples lost
        # to corruption (data.on_corrupt=skip), one collective
        skipping = getattr(self.data, "on_corrupt", None) == "skip"
        lost = torch.tensor([self.data.skipped if skipping else 0], dtype=torch.float64, device=self.device)
        summed = torch.cat([tokens.to(torch.float64).reshape(1), lost, onpolicy.as_tensor(self.device)])
        if dist.is_initialized():
            dist.all_reduce(summed)
        total_tokens = int(summed[0])
        record = {"step": step, **values, "lr": self.lr, "tokens": total_tokens,
                  "tokens_per_s": total_tokens / seconds, "step_time_s": seconds,
                  "resets": self.state.resets, "nan_skipped": self.state.nan_skipped, **self._peak_memory(),
                  **({"data_skipped": int(summed[1])} if skipping else {}),
                  **(onpolicy.record(total_tokens, summed[2:]) if self.onpolicy_on else {})}
        self.logger.log(record)

    @torch.no_grad()
    def _evaluate(self, teacher: bool = False) -> None:
        """Held-out perplexity of the student and, with the shared teacher, its KD to the teacher on the same text
        (once also the teacher's own perplexity), over every rank's slice of the eval sequences; train.eval_tasks."""
        from megadistil.bitnet import teacher_mode

        self.engine.eval()
        live = self.eval_kd
        loss_cfg = self.cfg.loss.held_out(kd=live)
        record = {"step": self.state.step, **self._task_scores()}
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

        table = run_tasks(self.engine.module.student, self.inputs.tokenizer, list(t.eval_tasks), checked=True,
                          include_path=t.eval_tasks_include_path or None, limit=t.eval_tasks_limit,
                          batch_size=t.micro_batch_size)
        return flat_scores(table)

    def _eval_pass(self, loss_cfg: LossConfig, live: bool) -> tuple[float, float]:
        """Token-weighted mean CE and KD over the eval sequences (all ranks)."""
        mb, world, rank = self.cfg.train.micro_batch_size, self.dist.world_size, self.dist.rank
        shared = SharedTeacher(self.engine.module.student, self.cfg.teacher.layerwise)
        total = torch.zeros(3, dtype=torch.float64, device=self.device)
        for start in range(rank * mb, len(self.eval_seqs), mb * world):
            batch = self._to_device(shifted_batch(self.eval_seqs[start:start + mb]))
            targets = shared.targets(batch, loss_cfg) if live else Targets()
            parts = self.engine(batch["input_ids"], batch["labels"], targets, loss_cfg)
            n = parts["tokens"].double()
            total += torch.stack([parts["ce"].double() * n, parts["kd"].double() * n, n])
        if dist.is_initialized():
            dist.all_reduce(total)
        n = float(total[2].clamp(min=1))
        return float(total[0]) / n, float(total[1]) / n

    # ---------------------------------------------------------------- save / cleanup
    def save(self) -> None:
        tag = checkpoint.save(self.engine, self.ckpt_root, self.state.step,
                              rank_state={"data": self.data.state_dict()},
                              meta={**self.state.state_dict(),
                                    "output_head": output_head_name(self.engine.module.student),
                                    "placement": {"kernel": self.placement.kernel.value,
                                                  "dtype": utils.dtype_name(self.placement.dtype)},
                                    "base_fingerprint": checkpoint.model_dir_fingerprint(self.cfg.model.student)},
                              config_yaml=to_yaml(self.cfg), sync_files=self.dist.local_rank == 0,
                              keep_last=self.cfg.train.keep_last)
        self._print(f"saved {self.ckpt_root / tag}")

    def _stop_agreed(self) -> bool:
        """Whether any rank got the stop signal: every rank stops after the same step (the save is collective)."""
        return _over_ranks(torch.tensor(stop_signal.requested(), device=self.device), dist.ReduceOp.MAX)

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if dist.is_initialized() and self._owns_process_group:
            dist.destroy_process_group()

    # ---------------------------------------------------------------- helpers
    def _print(self, message: str) -> None:
        if self.dist.rank == 0:
            print(f"[megadistil] {message}", flush=True)


@dataclass
class _MicroBatch:
    batch: dict[str, Tensor]  # the loader's (CPU) batch, or an on-policy one on the engine's device
    loss_cfg: LossConfig
    tokens: Tensor  # its trained (labelled) tokens, on the device
    onpolicy: bool
    share: Tensor  # the tokens its weight counts: its own, or those of the skipped micro-batch it replaces


def _kept(line: str, step: int) -> bool:
    """Whether a metrics.jsonl record stays when the run (re)starts from `step`: those of earlier steps, and of `step`
    itself (its evaluation) unless starting over; a line a kill cut mid-write goes (it stopped every resume)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return record.get("step", 0) < step or bool(step and record.get("step") == step)


def _over_ranks(flag: Tensor, op: dist.ReduceOp) -> bool:
    """A rank's flag, on its device, reduced over the ranks (MIN: all of them, MAX: any) and read back."""
    flag = flag.to(torch.float32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(flag, op=op)
    return bool(flag.item())


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: RunConfig, ds_config_path: str) -> Trainer:
    trainer = Trainer(cfg, ds_config_path)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer


