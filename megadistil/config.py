"""The run config: typed sections composed into one schema, merged defaults <- yaml <- dotlist (strict), validated
in one place before any heavy work (engine/ds_config.py reconciles the DeepSpeed config with it)."""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import reduce
from pathlib import Path
from typing import Any

import omegaconf
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, ValueNode
from omegaconf.errors import OmegaConfBaseException

from megadistil.bitnet import BitNetConfig, DeltaFormat
from megadistil.data.shards import Manifest
from megadistil.data.stream import DataConfig
from megadistil.distill.losses import TARGET_WEIGHTS, KDKind, LossConfig, Target, resolve_layers
from megadistil.distill.onpolicy import OnPolicyConfig
from megadistil.distill.preference import PreferenceConfig
from megadistil.utils import require


class Dtype(enum.StrEnum):
    """model.dtype: auto = bf16 where bf16 GEMMs are fast (CUDA, AMX CPUs; measured), else fp32."""

    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class AttnImplementation(enum.StrEnum):
    auto = "auto"
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


class TeacherKind(enum.StrEnum):
    """Where the distillation targets come from."""

    shared = "shared"  # teacher mode of the student's own frozen W: zero extra bytes; logits, hidden states, q/k/v
    hf = "hf"  # a separate frozen HF model (teacher.path) as a ZeRO-3 inference engine: live top-k + tail; its
    # tokenizer may differ from the student's (then loss.kind=uld on positions whose token boundaries coincide)
    shards = "shards"  # top-k + tail precomputed into data.shards by tools/precompute_teacher.py
    none = "none"  # no teacher: CE only


# The contract: what each teacher kind can feed the loss (LossConfig.needs() says what a loss reads).
# DSKD's foreign hidden states come from a separate teacher only: the shared one has the student's tokenizer, shards
# hold no hidden states (engine/inputs.py refuses an hf teacher that shares the student's tokenizer).
TEACHER_PROVIDES: dict[TeacherKind, frozenset[Target]] = {
    TeacherKind.shared: frozenset({Target.logits, Target.hidden, Target.qkv}),
    TeacherKind.hf: frozenset({Target.logits, Target.foreign_hidden}),
    TeacherKind.shards: frozenset({Target.logits}),
    TeacherKind.none: frozenset(),
}

# Keys that moved, with where they went (load_config's error for an old key says so).
MOVED_KEYS = {"model.teacher": "teacher.kind (shared | hf | shards | none) and teacher.path",
              "model.teacher_top_k": "teacher.top_k"}


# What a stage may change mid-run besides loss.*. Parameter groups are fixed when the engine is built (ZeRO-3
# partitions the trainable set once), so a stage cannot move a parameter in or out of training.
STAGE_KEYS = ("optim.lr", "optim.min_lr_ratio", "optim.warmup_steps", "optim.weight_decay", "onpolicy.fraction")


class ConfigError(ValueError):
    """A run config or ds_config problem, named by its key."""


@dataclass
class ModelConfig:
    student: str = "???"  # HF model dir: the teacher's weights, which the student starts from
    tokenizer: str | None = None  # default: the student dir
    dtype: Dtype = Dtype.auto  # auto: bf16 where bf16 GEMMs are fast (CUDA, AMX CPUs; measured), else fp32
    attn_implementation: AttnImplementation = AttnImplementation.auto  # auto: flash_attention_2 (CUDA), else sdpa, else eager, as the model supports
    activation_checkpointing: bool = True  # non-reentrant, per decoder layer; keeps int8 W codes one layer at a time
    trust_remote_code: bool = False  # off: only transformers' own architectures load

    def validate(self) -> None:
        require(self.student != "???", "model.student", "is required (an HF model directory)")


@dataclass
class TeacherConfig:
    kind: TeacherKind = TeacherKind.shared  # shared | hf (teacher.path) | shards (data.shards) | none (CE only)
    path: str = ""  # kind hf: the teacher's HF model dir (another tokenizer: loss.kind uld, data.text)
    top_k: int = 64  # kind hf: live targets as top-k log-probs + tail, like the shards
    layerwise: bool = True  # kind shared: each layer runs as teacher, then student, on one gather (false: teacher first)

    def validate(self) -> None:
        require(self.path or self.kind != TeacherKind.hf, "teacher.path", "is required with teacher.kind=hf")
        require(self.top_k >= 1, "teacher.top_k", f"must be >= 1, got {self.top_k}")


class OptimizerReset(enum.StrEnum):
    """relora.optimizer_reset: what happens to the Adam moments of the re-initialised adapters."""

    zero = "zero"
    prune = "prune"


class Resume(enum.StrEnum):
    auto = "auto"  # continue from <output_dir>/checkpoints/latest if present
    never = "never"


class WandbMode(enum.StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class ReLoRAConfig:
    reset_every: int = 0  # steps between merges of B·A into ΔW; 0 = no merges (and no ΔW allocated)
    restart_warmup_steps: int = 10  # the jagged schedule's warmup after each reset
    optimizer_reset: OptimizerReset = OptimizerReset.prune  # the re-initialised adapters' Adam moments: zeroed or pruned
    prune_ratio: float = 0.99  # fraction of the moments (smallest magnitude) zeroed by `prune`
    delta_format: DeltaFormat = DeltaFormat.int8  # int8 + a per-row scale (half of bf16), or the model dtype

    def validate(self) -> None:
        require(self.reset_every >= 0, "relora.reset_every", f"must be >= 0, got {self.reset_every}")
        # every step a merge: the adapters are re-initialised after each single update and never learn anything
        require(self.reset_every != 1, "relora.reset_every", "must be 0 (no merges) or >= 2, got 1")
        require(self.restart_warmup_steps >= 0, "relora.restart_warmup_steps",
                f"must be >= 0, got {self.restart_warmup_steps}")
        # a re-warmup as long as the cycle never reaches the full LR before the next reset
        require(not self.reset_every or self.restart_warmup_steps < self.reset_every, "relora.restart_warmup_steps",
                f"{self.restart_warmup_steps} must be < relora.reset_every={self.reset_every}: the LR would re-warm "
                "for the whole cycle between merges and never reach the schedule's value")
        require(0 <= self.prune_ratio <= 1, "relora.prune_ratio", f"must be in [0, 1], got {self.prune_ratio}")


@dataclass
class ParamGroup:
    pattern: str = ".*"  # regex on parameter names; first match wins
    lr_mult: float = 1.0  # 0 freezes


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate of the adapters (times each group's lr_mult)
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at train.max_steps
    warmup_steps: int = 10  # linear warmup at the start of the run; a stage that sets it re-warms from its start_step
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-8  # AdamW eps
    grad_clip: float = 1.0  # global gradient norm clip (the ds_config's gradient_clipping)
    # Trainable by default: the LoRA factors and SubLN. Groups here may unfreeze others (e.g. norms) or freeze.
    param_groups: list[ParamGroup] = field(default_factory=list)  # [{pattern: regex, lr_mult: x}], first match wins

    def validate(self) -> None:
        require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")  # Adam divides by sqrt(v) + eps
        require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0: no clipping), got {self.grad_clip}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
                f"must be two numbers in [0, 1), got {list(self.betas)}")
        for i, group in enumerate(self.param_groups):
            require(group.lr_mult >= 0, f"optim.param_groups.{i}.lr_mult", f"must be >= 0, got {group.lr_mult}")
            try:
                re.compile(group.pattern)
            except re.error as e:
                raise ValueError(f"config key 'optim.param_groups.{i}.pattern': not a regex ({e})") from None


@dataclass
class RunDataConfig(DataConfig):
    text: list[str] = field(default_factory=list)  # text files for a live teacher (instead of shards); text spelling a special token stays text
    preference: list[str] = field(default_factory=list)  # preference JSONL (prompt, chosen, rejected): prompt + chosen, loss on chosen
    eval_text: list[str] = field(default_factory=list)  # held-out text for perplexity
    seq_len: int = 256  # packing length for text (shards carry their own: set, it must be theirs)
    split_special_tokens: bool = True  # text spelling a special token stays text; false: the control token (chat-formatted text)

    def validate(self) -> None:
        super().validate()
        sources = [key for key in ("shards", "text", "preference") if getattr(self, key)]
        require(len(sources) == 1, "data", f"set exactly one of data.shards, data.text and data.preference (set: "
                f"{', '.join('data.' + k for k in sources) or 'none'})")
        require(self.shards or self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps
    micro_batch_size: int = 4  # sequences per rank per micro step (the ds_config's train_micro_batch_size_per_gpu)
    grad_accum: int = 1  # micro steps per optimizer step; the step's loss is the mean over all its trained tokens
    output_dir: str = "runs/tiny"  # the run dir: config.yaml, metrics.jsonl, checkpoints/
    save_every: int = 50  # steps between checkpoints (and one at the end)
    keep_last: int = 0  # checkpoints kept: the newest N tags (0: all); the tag `latest` names is never deleted
    seed: int = 0  # seeds torch/numpy/python, the data order and ReLoRA's re-initialisation
    resume: Resume = Resume.auto  # auto: continue from <output_dir>/checkpoints/latest if present | never
    eval_every: int = 0  # steps between evaluations (held-out perplexity, eval_tasks); 0 = only at the end
    eval_batches: int = 8  # micro batches per rank of held-out sequences per evaluation
    eval_tasks: list[str] = field(default_factory=list)  # lm-eval tasks scored on the student at every evaluation
    eval_tasks_include_path: str = ""  # a dir of local task YAMLs for eval_tasks (dataset_path: json + data_files)
    eval_tasks_limit: int | None = None  # documents per task (None: all)
    max_nan_steps: int = 3  # consecutive non-finite losses that stop the run
    dist_timeout_s: float = 600.0  # collective timeout: a dead rank ends the job instead of hanging it

    def validate(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum", "save_every", "max_nan_steps"):
            require(getattr(self, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(self, key)}")
        require(self.keep_last >= 0, "train.keep_last", f"must be >= 0 (0: keep every checkpoint), got {self.keep_last}")
        require(self.eval_every >= 0, "train.eval_every", f"must be >= 0, got {self.eval_every}")
        require(self.eval_batches >= 1, "train.eval_batches", f"must be >= 1, got {self.eval_batches}")
        require(self.eval_tasks_limit is None or self.eval_tasks_limit >= 1, "train.eval_tasks_limit",
                f"must be >= 1 or null, got {self.eval_tasks_limit}")
        require(not self.eval_tasks_include_path or Path(self.eval_tasks_include_path).is_dir(),
                "train.eval_tasks_include_path", f"{self.eval_tasks_include_path} is not a directory")
        require(0 < self.dist_timeout_s < math.inf, "train.dist_timeout_s",
                f"must be > 0 and finite, got {self.dist_timeout_s}")


@dataclass
class WandbConfig:
    enabled: bool = False  # log to wandb as well (pip install megadistil[wandb])
    project: str = "megadistil"  # wandb project
    name: str | None = None  # wandb run name
    mode: WandbMode = WandbMode.offline  # offline | online | disabled


@dataclass
class LogConfig:
    every: int = 1  # log every N steps (the last step always)
    profile_step: int = 0  # profile this optimizer step by phase on every rank (profile.rank<r>.json); 0 = off
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        require(self.every >= 1, "log.every", f"must be >= 1, got {self.every}")


@dataclass
class StageConfig:
    """From `start_step` on, these dotted overrides apply (e.g. BitDistill's stages: loss weights, lr, groups)."""

    start_step: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    bitnet: BitNetConfig = field(default_factory=BitNetConfig)
    relora: ReLoRAConfig = field(default_factory=ReLoRAConfig)
    data: RunDataConfig = field(default_factory=RunDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    stages: list[StageConfig] = field(default_factory=list)  # [{start_step: n, overrides: {loss.x: v, optim.lr: v}}]


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """defaults <- yaml <- dotlist, strict: an unknown key or a wrong type is an error naming the key. A list key given
    one value (data.text=corpus.txt) is a list of one; a key that moved names its new place."""
    for item in overrides:  # OmegaConf would merge {"0": ...} into the list: a TypeError naming no key
        key = item.split("=", 1)[0]
        _check(not any(part.isdigit() for part in key.split(".")), key,
               "a list is set whole (optim.betas=[0.9,0.99], stages=[{start_step: 5, overrides: {...}}]), not by index")
    try:
        schema = OmegaConf.structured(RunConfig)
        layers = [OmegaConf.from_dotlist(list(overrides))]
        if path is not None:
            layers.insert(0, _load_yaml(Path(path)))
        merged = schema
        for layer in layers:
            raw = OmegaConf.to_container(layer, resolve=False)
            _refuse_moved(raw)
            merged = OmegaConf.merge(merged, _listify(schema, raw))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"config key {key!r}: {str(e).splitlines()[0]}" if key else str(e)) from None
    validate(cfg)
    return cfg


def _load_yaml(path: Path) -> DictConfig:
    """A config file as OmegaConf reads it; a missing file, broken YAML or anything but a mapping is a ConfigError
    naming the file (yaml's own errors were tracebacks)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    except OmegaConfBaseException as e:  # e.g. a duplicate key
        raise ConfigError(f"config file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config file {path} holds a list, not a mapping of sections")
    return layer


def _refuse_moved(raw: dict[str, Any]) -> None:
    for key, where in MOVED_KEYS.items():
        section, name = key.split(".")
        if isinstance(raw.get(section), dict) and name in raw[section]:
            raise ConfigError(f"config key {key!r} moved to {where} (README: migrating configs)")


# OmegaConf 2.4 gives a tuple[...] field (bitnet.exclude) a TupleConfig, which is no ListConfig; 2.3 has none.
_SEQUENCE_NODES = tuple(c for c in (ListConfig, getattr(omegaconf, "TupleConfig", None)) if c is not None)


def _listify(schema: DictConfig, raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A scalar given for a list key becomes a list of one, at any depth of the typed sections; a list given for a
    scalar key is refused naming it (OmegaConf would say only "Cannot convert 'ListConfig' to string")."""
    out = {}
    for key, value in raw.items():
        node = schema._get_node(key) if key in schema else None
        if isinstance(node, _SEQUENCE_NODES) and not isinstance(value, (list, dict)) and value is not None:
            value = [value]
        elif isinstance(node, DictConfig) and isinstance(value, dict) and node._metadata.object_type is not dict:
            value = _listify(node, value, f"{prefix}{key}.")
        elif isinstance(node, ValueNode) and isinstance(value, list):
            raise ConfigError(f"config key {prefix + key!r} takes one value, not a list: {value}")
        out[key] = value
    return out


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def stage_config(cfg: RunConfig, step: int) -> RunConfig:
    """The config in force at `step`: the base with every stage that has started applied in order."""
    active = [s for s in cfg.stages if s.start_step <= step]
    if not active:
        return cfg
    merged = OmegaConf.structured(cfg)
    for stage in active:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{k}={json.dumps(v)}" for k, v in stage.overrides.items()]))
    return OmegaConf.to_object(merged)


def _check(condition: object, key: str, message: str) -> None:
    require(condition, key, message, ConfigError)


def validate(cfg: RunConfig) -> None:
    """Every check that needs no heavy work. Sections validate themselves, in the base config and in the config
    each stage makes; cross-section rules live here."""
    _validate_sections(cfg, "")
    validate_stages(cfg)
    validate_schedule(cfg)
    validate_teacher(cfg)
    validate_onpolicy(cfg)
    validate_preference(cfg)
    validate_unused(cfg)


def validate_stages(cfg: RunConfig) -> None:
    """Each stage starts after the one before it, overrides only what a stage may change, and makes a config that
    passes the sections' own checks."""
    for i, stage in enumerate(cfg.stages):
        _check(stage.start_step >= 0, f"stages.{i}.start_step", "must be >= 0")
        _check(i == 0 or stage.start_step > cfg.stages[i - 1].start_step, f"stages.{i}.start_step",
               f"{stage.start_step} does not come after stages.{i - 1}.start_step: list the stages in the order they "
               "start (each applies over the ones before it)")
        for key in stage.overrides:
            _check(key.startswith("loss.") or key in STAGE_KEYS, f"stages.{i}.overrides.{key}",
                   f"stages may override loss.* and {', '.join(STAGE_KEYS)} only")
        try:
            staged = stage_config(cfg, stage.start_step)
        except (OmegaConfBaseException, ValueError) as e:
            raise ConfigError(f"config key 'stages.{i}.overrides': {str(e).splitlines()[0]}") from None
        _validate_sections(staged, f"stages.{i}.overrides.")


def validate_schedule(cfg: RunConfig) -> None:
    """What the export or the profiler needs within train.max_steps. Other schedules (LR warmup, ReLoRA cycles,
    stages, eval_every) may run past it: a shortened run of a shipped config is honoured as far as it goes."""
    max_steps = cfg.train.max_steps
    _check(cfg.bitnet.quant_warmup_steps < max_steps, "bitnet.quant_warmup_steps",
           f"{cfg.bitnet.quant_warmup_steps} steps of λ warmup do not end within train.max_steps={max_steps}: the run "
           f"would stop before it trains the fully ternary student it exports")
    _check(0 <= cfg.log.profile_step <= max_steps, "log.profile_step",
           f"must be a step of the run (1..train.max_steps={max_steps}) or 0 (off), got {cfg.log.profile_step}")


def _validate_sections(cfg: RunConfig, where: str) -> None:
    """Each section's own checks; `where` puts a stage's prefix before the key at fault."""
    for section in (cfg.model, cfg.teacher, cfg.bitnet, cfg.relora, cfg.data, cfg.loss, cfg.onpolicy, cfg.preference,
                    cfg.optim, cfg.train, cfg.log):
        try:
            section.validate()
        except ValueError as e:
            raise ConfigError(str(e).replace("config key '", f"config key '{where}", 1)) from None


def staged_configs(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """The config in force at each stage: ("", base) then ("stages.<i>.overrides.", the config from that stage on)."""
    return [("", cfg)] + [(f"stages.{i}.overrides.", stage_config(cfg, s.start_step)) for i, s in enumerate(cfg.stages)]


def loss_configs(cfg: RunConfig) -> list[tuple[str, LossConfig]]:
    """The loss in force at each stage, keyed as staged_configs."""
    return [(where, c.loss) for where, c in staged_configs(cfg)]


def in_force(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """staged_configs less those no step runs under: the base where a stage starts at step 0 or 1, and a stage
    replaced at the step it starts (start_step 0 and 1 are both step 1). A stage past train.max_steps counts: the
    config is the full run's, shortened."""
    starts = [max(s.start_step, 1) for s in cfg.stages]
    ends = [*starts, float("inf")]
    return [staged for staged, start, end in zip(staged_configs(cfg), [1, *starts], ends) if start < end]


def uses_onpolicy(cfg: RunConfig) -> bool:
    """Whether any stage trains on-policy micro-batches."""
    return any(c.onpolicy.fraction > 0 for _, c in staged_configs(cfg))


def validate_teacher(cfg: RunConfig) -> None:
    """The teacher <-> loss contract, for the base config and every stage: each term a stage turns on gets its
    targets from the teacher kind, and a teacher that no term reads is not loaded or decoded."""
    kind = cfg.teacher.kind
    provides, losses = TEACHER_PROVIDES[kind], loss_configs(cfg)
    for where, loss in losses:
        for target, key in loss.needs().items():
            _check(target in provides, setter_of(cfg, where, key), f"needs the teacher's {target.value}, which teacher.kind={kind} does "
                   f"not provide (kinds that do: {', '.join(k for k, p in TEACHER_PROVIDES.items() if target in p)})")
    if kind in (TeacherKind.hf, TeacherKind.shards):
        fed = [f"loss.{TARGET_WEIGHTS[t]}" for t in Target if t in provides]
        _check(any(provides & loss.needs().keys() for _, loss in losses), "teacher.kind",
               f"{kind}: no loss term reads its targets ({' and '.join(fed)} {'is' if len(fed) == 1 else 'are'} 0 at "
               "every stage); use none for CE only")
    _check(kind != TeacherKind.shards or bool(cfg.data.shards), "teacher.kind", "shards needs data.shards")


def validate_onpolicy(cfg: RunConfig) -> None:
    """On-policy micro-batches need a live teacher to score the student's tokens, a KD term to train on them, and room
    in data.seq_len."""
    op = cfg.onpolicy
    if not uses_onpolicy(cfg):
        return
    _check(cfg.teacher.kind in (TeacherKind.shared, TeacherKind.hf), "onpolicy.fraction",
           f"on-policy distillation needs a live teacher to score the student's own tokens (teacher.kind shared or "
           f"hf); teacher.kind={cfg.teacher.kind} has none")
    for where, c in staged_configs(cfg):
        _check(c.onpolicy.fraction == 0 or c.loss.kd_weight > 0, f"{where}loss.kd_weight" if where else "loss.kd_weight",
               "must be > 0 where onpolicy.fraction > 0 (on-policy micro-batches train on the KD term alone)")
    _check(not cfg.data.preference, "onpolicy.fraction",
           "on-policy prompts are each sequence's first onpolicy.prompt_tokens tokens, and data.preference rows hold "
           "prompts of their own lengths followed by the chosen answer and padding: the student would continue "
           "answers and padding, or cut prompts")
    if not cfg.data.shards:
        _check(op.prompt_tokens + op.max_new_tokens <= cfg.data.seq_len, "onpolicy.prompt_tokens",
               f"{op.prompt_tokens} prompt + {op.max_new_tokens} new tokens (onpolicy.max_new_tokens) exceed "
               f"data.seq_len {cfg.data.seq_len}")


def validate_preference(cfg: RunConfig) -> None:
    """Preference weights need the teacher's log p(label) (a live teacher) and a reference model."""
    pref = cfg.preference
    if not pref.reference:
        return
    _check(cfg.teacher.kind in (TeacherKind.shared, TeacherKind.hf), "preference.reference",
           f"token weights need the teacher's log-probs of the labels (teacher.kind shared or hf); teacher.kind="
           f"{cfg.teacher.kind} has none")
    _check(Path(pref.reference, "config.json").is_file(), "preference.reference",
           f"{pref.reference} is not a model directory (no config.json)")


def _others(cls: type, section: str, but: str) -> tuple[str, ...]:
    return tuple(f"{section}.{f.name}" for f in fields(cls) if f.name != but)


def _held_out_kd(c: RunConfig) -> bool:
    """Whether evaluation measures the held-out KD to the shared teacher (with the base's loss.kind, jsd_beta, T)."""
    return bool(c.data.eval_text) and c.teacher.kind == TeacherKind.shared


def _reads_kd_settings(c: RunConfig) -> bool:
    """Whether loss.temperature acts: a KD or dual-space term, or the held-out KD."""
    return c.loss.kd_weight > 0 or c.loss.dskd_weight > 0 or _held_out_kd(c)


def _offpolicy(c: RunConfig) -> bool:
    """Whether some micro-batches train with the loss as set: an on-policy one runs with kind := onpolicy.kind and
    ce_weight := 0 (the trainer's _optimizer_step), and with onpolicy.fraction 1 every one is on-policy."""
    return c.onpolicy.fraction < 1


def _reads_loss_kind(c: RunConfig) -> bool:
    """Whether loss.kind acts: a KD or dual-space term on off-policy micro-batches, or the held-out KD."""
    return (_offpolicy(c) and (c.loss.kd_weight > 0 or c.loss.dskd_weight > 0)) or _held_out_kd(c)


def _reads_jsd_beta(c: RunConfig) -> bool:
    """Whether a JSD is computed: loss.kind where it acts, or onpolicy.kind on on-policy micro-batches."""
    return (_reads_loss_kind(c) and c.loss.kind == KDKind.jsd) or \
        (c.onpolicy.fraction > 0 and c.onpolicy.kind == KDKind.jsd)


# Settings that act only under a condition: the keys, the condition (on the config in force at a stage), and why they
# do nothing without it. A key set away from its default whose condition holds at no stage is refused as unused,
# naming it: a run never silently ignores what its user set.
CONDITIONAL_KEYS: tuple[tuple[tuple[str, ...], Callable[[RunConfig], bool], str], ...] = (
    (("teacher.path", "teacher.top_k"), lambda c: c.teacher.kind == TeacherKind.hf,
     "teacher.kind is not hf (shards carry their own top-k; the shared teacher is the student's own weights)"),
    (("teacher.layerwise",), lambda c: c.teacher.kind == TeacherKind.shared,
     "teacher.kind is not shared (only the shared teacher runs inside the student's forward)"),
    (("relora.restart_warmup_steps", "relora.optimizer_reset", "relora.delta_format"),
     lambda c: c.relora.reset_every > 0, "relora.reset_every is 0 (no ReLoRA merges, no ΔW)"),
    (("relora.prune_ratio",), lambda c: c.relora.reset_every > 0 and c.relora.optimizer_reset == OptimizerReset.prune,
     "moments are pruned only with relora.reset_every > 0 and relora.optimizer_reset=prune"),
    (("data.num_workers", "data.shuffle_buffer", "data.seed", "data.on_corrupt", "data.epochs", "data.prefetch_factor"),
     lambda c: bool(c.data.shards),
     "the shard stream's setting, and data.shards is not set (text is packed in memory, shuffled by train.seed)"),
    (("data.prefetch_factor",), lambda c: c.data.num_workers > 0,
     "data.num_workers is 0 (the shards are read in the training process, nothing is prefetched)"),
    (("data.split_special_tokens",), lambda c: bool(c.data.text or c.data.preference or c.data.eval_text),
     "no text is tokenized (data.shards hold token ids, and there is no data.eval_text)"),
    (("train.eval_every",), lambda c: bool(c.data.eval_text or c.train.eval_tasks),
     "nothing is evaluated (no data.eval_text, no train.eval_tasks)"),
    (("train.eval_batches",), lambda c: bool(c.data.eval_text), "no data.eval_text to take held-out batches from"),
    (("train.eval_tasks_limit", "train.eval_tasks_include_path"), lambda c: bool(c.train.eval_tasks),
     "train.eval_tasks is empty"),
    (("log.wandb.mode",), lambda c: c.log.wandb.enabled, "log.wandb.enabled is false"),
    (("log.wandb.project", "log.wandb.name"), lambda c: c.log.wandb.enabled and c.log.wandb.mode != WandbMode.disabled,
     "no wandb run is made (log.wandb.enabled is false or log.wandb.mode is disabled)"),
    (("loss.kind",), _reads_loss_kind,
     ("no KD or dual-space term reads it at any stage (loss.kd_weight and loss.dskd_weight are 0, or onpolicy.fraction "
      "is 1: on-policy micro-batches use onpolicy.kind), and no held-out KD to the shared teacher is measured")),
    (("loss.temperature",), _reads_kd_settings,
     "loss.kd_weight and loss.dskd_weight are 0 at every stage, and no held-out KD to the shared teacher is measured"),
    (("loss.ce_weight",), _offpolicy,
     ("onpolicy.fraction is 1 at every stage (on-policy micro-batches train without CE: the labels are the student's "
      "own samples)")),
    (("loss.jsd_beta",), _reads_jsd_beta,
     "no JSD is computed at any stage (loss.kind is not jsd where it acts, nor onpolicy.kind where on-policy is on)"),
    (("loss.hidden_layers", "loss.hidden_magnitude_weight"), lambda c: c.loss.hidden_weight > 0,
     "loss.hidden_weight is 0 at every stage"),
    (("loss.attn_relation_heads", "loss.attn_relation_layers", "loss.attn_relation_temperature"),
     lambda c: c.loss.attn_relation_weight > 0, "loss.attn_relation_weight is 0 at every stage"),
    (_others(OnPolicyConfig, "onpolicy", but="fraction"), lambda c: c.onpolicy.fraction > 0,
     "onpolicy.fraction is 0 at every stage"),
    (_others(PreferenceConfig, "preference", but="reference"), lambda c: bool(c.preference.reference),
     "preference.reference (the reference model) is not set"),
)


def validate_unused(cfg: RunConfig) -> None:
    """Refuses a key set away from its default where nothing reads it (CONDITIONAL_KEYS) while that setting is in
    force: the base's until a stage overrides the key, a stage's until a later one does."""
    staged, default = staged_configs(cfg), RunConfig()
    live = {where for where, _ in in_force(cfg)}
    for keys, condition, why in CONDITIONAL_KEYS:
        holds = [where in live and condition(c) for where, c in staged]
        for key in keys:
            for setter, span in _settings(cfg, staged, default, key):
                if not any(holds[j] for j in span):
                    at = "" if not setter.startswith("stages.") else \
                        f" from step {cfg.stages[int(setter.split('.')[1])].start_step} on"
                    raise ConfigError(f"config key {setter!r}: is unused{at}: {why}")


def _settings(cfg: RunConfig, staged: list[tuple[str, RunConfig]], default: RunConfig,
              key: str) -> list[tuple[str, range]]:
    """Where `key` is set away from its default (the base, stages.<i>.overrides) and the indices into staged_configs
    of the configs that setting is in force in."""
    overriding = [i + 1 for i, s in enumerate(cfg.stages) if key in s.overrides]
    ends = [*overriding, len(cfg.stages) + 1]
    out = [(key, range(ends[0]))] if value_at(cfg, key) != value_at(default, key) else []
    for j, end in zip(overriding, ends[1:]):
        if value_at(staged[j][1], key) != value_at(default, key):
            out.append((f"stages.{j - 1}.overrides.{key}", range(j, end)))
    return out


def value_at(cfg: RunConfig, key: str) -> Any:
    """The setting at a dotted key (train.max_steps)."""
    return reduce(getattr, key.split("."), cfg)


def changed_settings(saved: DictConfig, cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """dotted key -> (value in `saved`, value in `cfg`) for every setting they both hold and that differs (a key the
    saved config predates is not a change)."""
    then, now = flat_settings(OmegaConf.to_container(saved, enum_to_str=True)), flat_settings(
        OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True))
    return {key: (then[key], now[key]) for key in then if key in now and then[key] != now[key]}


def flat_settings(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as a plain nested dict -> {dotted key: value} (lists, and tuples as lists, are values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value  # TupleConfig's, as saved
    return out


def setter_of(cfg: RunConfig, where: str, key: str) -> str:
    """`key` as the user set the value in force at a staged_configs prefix (`where`): the last stage up to that one
    that overrides it, else the base config's key."""
    upto = int(where.split(".")[1]) + 1 if where else 0
    return next((f"stages.{i}.overrides.{key}" for i in reversed(range(upto)) if key in cfg.stages[i].overrides), key)


def shards_manifest(cfg: RunConfig) -> Manifest:
    """data.shards' manifest, or a ConfigError naming the key."""
    try:
        return Manifest.load(cfg.data.shards)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key 'data.shards': {e}") from None


def shard_seq_len(cfg: RunConfig, shards_seq_len: int) -> int:
    """A run on shards trains at their sequence length; data.seq_len, where set, must be it (the memory planner
    sizes activations from it)."""
    _check(cfg.data.seq_len in (RunDataConfig.seq_len, shards_seq_len), "data.seq_len",
           f"{cfg.data.seq_len}, but the shards in {cfg.data.shards} hold sequences of {shards_seq_len} tokens: set it "
           f"to {shards_seq_len}")
    return shards_seq_len


def layer_lists(loss: LossConfig, num_layers: int) -> tuple[list[int], list[int]]:
    """The decoder layers the hidden-state and attention-relation terms read (empty when their weight is 0)."""
    hidden = resolve_layers(loss.hidden_layers, num_layers, "loss.hidden_layers") if loss.hidden_weight else []
    qkv = resolve_layers(loss.attn_relation_layers, num_layers, "loss.attn_relation_layers") \
        if loss.attn_relation_weight else []
    return hidden, qkv


def _field_comments(cls: type) -> dict[str, str]:
    """The `# ...` comment on each field's line of a dataclass's source (the schema documents itself)."""
    import inspect
    import io
    import tokenize

    comments, line_of = {}, {}
    source = inspect.getsource(cls)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_of.values():
            line_of.setdefault(tok.string, tok.start[0])
        elif tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("# ").strip()
    return {name: comments.get(line, "") for name, line in line_of.items()}


def reference_markdown() -> str:
    """The config reference table, generated from the schema (README's copy is checked against it by a test)."""
    import dataclasses
    import typing

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        notes = {}
        for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
            notes.update(_field_comments(base))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                walk(type(default), f"{prefix}{f.name}.")
                continue
            hint = hints[f.name]
            kind = " | ".join(hint) if isinstance(hint, enum.EnumMeta) else \
                f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            shown = "required" if default == "???" else json.dumps(default, default=str)
            kind, note = kind.replace("|", "\\|"), notes.get(f.name, "").replace("|", "\\|")
            rows.append(f"| `{prefix}{f.name}` | `{kind}` | `{shown}` | {note} |")

    walk(RunConfig, "")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
