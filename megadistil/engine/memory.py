"""Per-GPU memory plan of a run before it is queued: what ZeRO-3 keeps on each rank, term by term.

The model is counted from its dimensions (config.json), not built. Every term is a formula a reader can check:

  weights W, ΔW      the frozen teacher weight and the ReLoRA merge buffer, ZeRO-3 partitions: numel·p / world
                     (tensors below stage3_param_persistence_threshold stay whole on every rank); on the CPU
                     with offload_param
  HF teacher W,      a separate teacher (teacher.kind=hf) and the preference reference, frozen, partitioned the same
  reference W        way (every parameter of the model transformers builds from their config.json, or a preset their
                     path names, on the meta device: experts included); their gathered blocks come and go before the
                     student's forward. One transformers cannot build here is not counted (no verdict), unless
                     BLOCK_LAYOUTS knows its model_type and it has no experts
  adapters + optim   LoRA + SubLN (the trainable set): param and grad partitions in p bytes, and the fp32 master,
                     Adam m and v and fp32 grad (16 B) partitions; those 16 B on the CPU with offload_optimizer
  gathered params    ZeRO-3's working set of all-gathered (whole) parameters: everything up to
                     stage3_max_live_parameters when a step reuses every parameter within
                     stage3_max_reuse_distance, else the prefetch bucket plus the two largest blocks in flight;
                     the whole student while it generates on-policy with onpolicy.gather_weights, plus the
                     int8 codes of every BitLinear's W it quantizes once for the generation (1 B each)
  all-gather buffer  the flat buffer a fetch gathers into (more than one rank): the prefetch bucket, at most
                     the model (twice on CPU/gloo, as measured)
  activations        activation checkpointing: the block inputs of every layer (p bytes per token and hidden
                     unit) plus the internals of the one block being recomputed (int8 inputs of its BitLinears,
                     attention and MLP tensors, norms in fp32; eager attention's [heads, S, S] softmax), its int8
                     weight codes and the two fp32 W_eff row blocks of its largest linear
                     (bitnet.linear.ROW_BLOCK_NUMEL); without checkpointing every block's internals
  teacher targets    the shared/HF teacher's final hidden states (and the hidden layers the loss uses)
  chunked logits     loss.chunk_tokens × vocab fp32 buffers, as measured: 4-6 against the shared teacher (its
                     logits and softmax too, by loss.kind), 2 against top-k targets, 2 for CE alone; +1 with a
                     softcapped head (logit_buffers); the stage that needs the most
  grad buckets       reduce_bucket_size elements of p bytes, twice with overlap_comm, at most the trainable set
  framework          CUDA context, NCCL and cuBLAS workspaces (fixed), and allocator fragmentation (a fraction)
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from megadistil.bitnet.linear import ROW_BLOCK_NUMEL, DeltaFormat
from megadistil.bitnet.surgery import SUBLN_TARGETS, is_excluded
from megadistil.config import ConfigError, RunConfig, in_force, shard_seq_len, shards_manifest, uses_onpolicy

GiB = 2**30
# The presets are the models' own config.json files (transformers config kwargs, model_type included): the planner
# and the tests size a model from them when its directory is not on this machine. Copied from the Hugging Face hub.
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA31_COMMON = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
                   "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                   "rope_scaling": LLAMA31_ROPE, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
                   "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001}
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B and -70B config.json (Meta).
    "llama3.1-8b": {**_LLAMA31_COMMON, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32},
    "llama3.1-70b": {**_LLAMA31_COMMON, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                     "num_attention_heads": 64},
    # Qwen/Qwen2.5-0.5B config.json (the base model; -Instruct has the same shapes, eos 151645).
    # Qwen2ForCausalLM: GQA 14 query / 2 KV heads of 64, q/k/v with biases (the modelling
    # code's, not a config key), the LM head tied to the embeddings: 494,032,768 parameters ("0.49B").
    "qwen2.5-0.5b": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
                     "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                     "hidden_act": "silu", "use_sliding_window": False, "sliding_window": 32768,
                     "max_window_layers": 24, "attention_dropout": 0.0, "bos_token_id": 151643,
                     "eos_token_id": 151643},
    # microsoft/Phi-3-mini-4k-instruct config.json (there is no base release; -128k-instruct has the same shapes
    # with longrope scaling to 131072 positions, so a 128k student path also resolves here: same memory).
    # Phi3ForCausalLM: fused qkv_proj (3072 -> 3 x 3072) and gate_up_proj (3072 -> 2 x 8192), no biases, 32 KV
    # heads (no GQA), untied LM head: 3,821,079,552 parameters (model card "3.8B", hub "3.82B").
    "phi-3-mini": {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_size": 3072,
                   "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "vocab_size": 32064, "tie_word_embeddings": False,
                   "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
                   "rope_scaling": None, "sliding_window": 2047, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                   "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 32000,
                   "pad_token_id": 32000},
}
# Fixed per-GPU cost outside PyTorch's tensors: CUDA context (~0.5 GB), NCCL buffers and cuBLAS workspaces.
CUDA_FRAMEWORK_BYTES = int(1.5 * GiB)
CUDA_FRAGMENTATION = 0.05
# DeepSpeed's defaults for the keys a ds_config may leave out.
ZERO3_DEFAULTS = {"stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5,
                  "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9, "reduce_bucket_size": 5e8,
                  "overlap_comm": True}


class BlockLinear(NamedTuple):
    """One linear of a decoder block: its module name in the block, (in, out) features, whether it has a bias."""

    name: str
    inp: int
    out: int
    bias: bool = False


# model_type -> how its block differs from Llama's (q, k, v, o, gate, up, down; biases from attention_bias /
# mlp_bias), read from transformers' modelling code: Qwen2 hard-codes biases on q/k/v only; Phi-3 fuses q/k/v into
# qkv_proj and gate/up into gate_up_proj, without biases (its config's attention_bias is not read); Qwen3 adds a
# per-head RMSNorm on q and k. Any other model_type is counted as a Llama block, and resolve_dims says so.
BLOCK_LAYOUTS: dict[str, dict[str, bool]] = {
    "llama": {}, "mistral": {},
    "qwen2": {"qkv_bias": True, "o_bias": False, "mlp_bias": False},
    "qwen3": {"qk_norm": True},
    "phi3": {"fused_qkv": True, "fused_gate_up": True, "qkv_bias": False, "o_bias": False, "mlp_bias": False},
}


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    model_type: str = "llama"
    fused_qkv: bool = False  # one qkv_proj: hidden -> (heads + 2 kv_heads) x head_dim
    fused_gate_up: bool = False  # one gate_up_proj: hidden -> 2 x intermediate
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm of head_dim on q and k
    layout_known: bool = True  # False: model_type not in BLOCK_LAYOUTS, counted as a Llama block
    # What the model's class supports and applies (models.attn_implementation, models.logit_transform); a model_type
    # transformers does not know here is taken as Llama's: sdpa and flash attention, no softcaps.
    sdpa: bool = True
    flash: bool = True
    attn_softcap: bool = False  # eager attention caps its scores (Gemma 2's attn_logit_softcapping): tanh kept
    logit_softcap: bool = False  # the output head's logits are softcapped (final_logit_softcapping)

    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str) -> ModelDims:
        """From a config.json dict of any of BLOCK_LAYOUTS' architectures (GQA, tied, fused, biased). A key the dict
        leaves out has the value transformers' config class gives it (Gemma's tie_word_embeddings is True, Gemma 2's
        num_key_value_heads and head_dim have defaults of their own), as the model is built with."""
        model_type = str(config.get("model_type") or "llama")
        try:
            heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
            required = {"intermediate": int(config["intermediate_size"]), "layers": int(config["num_hidden_layers"]),
                        "vocab": int(config["vocab_size"])}
        except KeyError as e:
            raise ConfigError(f"{source}: model config has no {e.args[0]!r}") from None
        resolved = hf_config(config)

        def key(name: str, default: Any) -> Any:
            value = getattr(resolved, name, None) if resolved is not None else config.get(name)
            return default if value is None else value

        attention_bias = bool(key("attention_bias", False))
        layout = {"qkv_bias": attention_bias, "o_bias": attention_bias, "mlp_bias": bool(key("mlp_bias", False)),
                  **BLOCK_LAYOUTS.get(model_type, {})}
        return cls(hidden=hidden, heads=heads, kv_heads=int(key("num_key_value_heads", heads)),
                   head_dim=int(key("head_dim", hidden // heads)), tied=bool(key("tie_word_embeddings", False)),
                   model_type=model_type, layout_known=model_type in BLOCK_LAYOUTS, **required, **layout,
                   **_class_traits(resolved))

    def block_linears(self) -> list[BlockLinear]:
        """The linears of one block, named as in transformers: Llama's seven, or Phi-3's four fused ones."""
        h, kv, q, ff = self.hidden, self.kv_heads * self.head_dim, self.heads * self.head_dim, self.intermediate
        if self.fused_qkv:
            attention = [BlockLinear("self_attn.qkv_proj", h, q + 2 * kv, self.qkv_bias)]
        else:
            attention = [BlockLinear(f"self_attn.{n}_proj", h, out, self.qkv_bias) for n, out in
                         (("q", q), ("k", kv), ("v", kv))]
        attention.append(BlockLinear("self_attn.o_proj", q, h, self.o_bias))
        if self.fused_gate_up:
            mlp = [BlockLinear("mlp.gate_up_proj", h, 2 * ff, self.mlp_bias)]
        else:
            mlp = [BlockLinear(f"mlp.{n}_proj", h, ff, self.mlp_bias) for n in ("gate", "up")]
        mlp.append(BlockLinear("mlp.down_proj", ff, h, self.mlp_bias))
        return attention + mlp

    def block_norms(self) -> list[int]:
        """Sizes of one block's norm weights: input and post-attention RMSNorm (+ Qwen3's q/k norms)."""
        return [self.hidden, self.hidden] + ([self.head_dim, self.head_dim] if self.qk_norm else [])

    @property
    def assumption(self) -> str:
        """What resolve_dims appends to its source when the block layout is a guess."""
        return "" if self.layout_known else f"; model_type {self.model_type!r} counted as a Llama block"


# Keys of a mixture-of-experts config (Mixtral, Qwen2-MoE/Qwen3-MoE, DeepSeek, OLMoE, ...): experts a Llama block lacks.
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "n_shared_experts")


def hf_config(config: dict[str, Any]) -> Any:
    """The transformers config object of a config.json dict (class defaults for the keys it leaves out), or None
    where this transformers does not know its model_type or refuses its values."""
    return _hf_config(config)[0]


def _hf_config(config: dict[str, Any]) -> tuple[Any, str]:
    import transformers
    from huggingface_hub.errors import StrictDataclassError  # transformers 5's validation of config values
    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = str(config.get("model_type") or "llama")
    if model_type not in CONFIG_MAPPING:
        return None, f"transformers {transformers.__version__} here does not know model_type {model_type!r}"
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **kwargs), ""
    except (ValueError, KeyError, TypeError, StrictDataclassError) as e:
        return None, f"transformers refuses its config ({type(e).__name__}: {str(e).splitlines()[0][:160]})"


def _class_traits(resolved: Any) -> dict[str, bool]:
    """ModelDims' attention and logit traits from the class AutoModelForCausalLM builds for `resolved`."""
    from megadistil.models import causal_lm_class, logit_transform, sdpa_unavailable

    if resolved is None:
        return {}
    try:
        model_class = causal_lm_class(resolved)
    except ValueError:
        return {}
    try:
        logit_softcap = logit_transform(resolved, model_class).softcap is not None
    except ValueError:  # an output transform megadistil refuses (the run says so); the planner takes the softcap key
        logit_softcap = getattr(resolved, "final_logit_softcapping", None) is not None
    return {"sdpa": sdpa_unavailable(resolved, model_class) is None,
            "flash": bool(getattr(model_class, "_supports_flash_attn", False) or
                          getattr(model_class, "_supports_flash_attn_2", False)),
            "attn_softcap": getattr(resolved, "attn_logit_softcapping", None) is not None,
            "logit_softcap": logit_softcap}


def meta_tensors(config: dict[str, Any]) -> tuple[list[int] | None, str]:
    """numel of each parameter tensor of the model AutoModelForCausalLM builds from `config`, on the meta device
    (no memory: about a second for a 141B mixture of experts), whatever its architecture: experts, extra norms, a
    tied head once. (None, why) where this transformers cannot build it (an unknown model_type, remote code)."""
    import torch

    from megadistil.models import causal_lm_class

    resolved, why = _hf_config(config)
    if resolved is None:
        return None, why
    try:
        model_class = causal_lm_class(resolved)
        with torch.device("meta"):
            model = model_class._from_config(resolved, attn_implementation="eager")
    except (ValueError, TypeError, KeyError, AttributeError, ImportError, RuntimeError) as e:
        return None, f"transformers cannot build it here ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return [p.numel() for p in model.parameters()], ""


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


NOT_COUNTED = "not counted"  # how a row whose size this machine cannot tell begins (Estimate.uncounted)


@dataclass
class Estimate:
    rows: list[tuple[str, int, str]] = field(default_factory=list)  # (term, bytes per GPU, how)
    cpu_rows: list[tuple[str, int, str]] = field(default_factory=list)  # offloaded bytes per rank (host memory)
    capacity: int | None = None

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.rows)

    def term(self, name: str) -> int:
        return next(b for n, b, _ in self.rows if n == name)

    @property
    def uncounted(self) -> list[str]:
        """Rows whose size is unknown here (a frozen model with no config.json on this machine and no preset)."""
        return [f"{name} ({how})" for name, _, how in self.rows + self.cpu_rows if how.startswith(NOT_COUNTED)]

    @property
    def fits(self) -> bool | None:
        """None: no capacity to compare with, or a row not counted (a verdict without a whole model is a guess)."""
        return None if self.capacity is None or self.uncounted else self.total <= self.capacity

    def verdict(self) -> str:
        if self.uncounted:
            return f"no verdict: {self.total / GiB:.1f} GiB per GPU counted, without {'; '.join(self.uncounted)}"
        if self.capacity is None:
            return f"needs {self.total / GiB:.1f} GiB per GPU"
        margin = self.capacity - self.total
        word = "fits" if margin >= 0 else "does not fit"
        return (f"{word}: {self.total / GiB:.1f} GiB of {self.capacity / GiB:.1f} GiB per GPU "
                f"({'+' if margin >= 0 else '-'}{abs(margin) / GiB:.1f} GiB, {100 * margin / self.capacity:+.0f}%)")


# ---------------------------------------------------------------------------------------------------- model dims


def preset_for(*names: str) -> str | None:
    """The preset whose name a path or config stem spells (Llama-3.1-8B, llama3.1_70b_instruct,
    Qwen2.5-0.5B-Instruct, Phi-3-mini-4k-instruct, ...)."""
    for name in names:
        flat = Path(name).name.lower().replace("-", "").replace("_", "")
        for key in sorted(MODEL_PRESETS, key=len, reverse=True):
            if key.replace("-", "") in flat:
                return key
    return None


def resolve_dims(cfg: RunConfig, *, model_config: str | None = None, config_path: str = "") -> tuple[ModelDims, str]:
    """Dims from the student's config.json when it exists, else --model-config, else a preset named by the student
    path or the run config's file name. Returns the dims and where they came from."""
    config, source = _model_config(cfg, model_config, config_path)
    dims = ModelDims.from_hf(config, source)
    return dims, source + dims.assumption


def as_trained(cfg: RunConfig) -> RunConfig:
    """The run config at the sequence length the run trains at: on shards this machine can read, theirs (elsewhere,
    data.seq_len, which should then say it)."""
    if not cfg.data.shards or not Path(cfg.data.shards).is_dir():
        return cfg
    seq_len = shard_seq_len(cfg, shards_manifest(cfg).seq_len)
    return replace(cfg, data=replace(cfg.data, seq_len=seq_len))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}: {path} is not a model's config.json ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{what}: {path} is not a model's config.json (not a JSON object)")
    return config


def _model_config(cfg: RunConfig, model_config: str | None, config_path: str) -> tuple[dict[str, Any], str]:
    student = Path(cfg.model.student) / "config.json"
    if student.is_file():
        return _read_json(student, "config key 'model.student'"), str(student)
    if model_config:
        if model_config in MODEL_PRESETS:
            return MODEL_PRESETS[model_config], f"preset {model_config}"
        path = Path(model_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"--model-config {model_config}: no such file (a config.json, a model dir or one of "
                              f"{sorted(MODEL_PRESETS)})")
        return _read_json(path, f"--model-config {model_config}"), str(path)
    preset = preset_for(cfg.model.student, Path(config_path).stem)
    if preset is None:
        raise ConfigError(f"config key 'model.student': {student} does not exist and no preset matches "
                          f"{cfg.model.student!r}; pass --model-config (a config.json or one of {sorted(MODEL_PRESETS)})")
    return MODEL_PRESETS[preset], f"preset {preset} (model.student not on this machine)"


# ---------------------------------------------------------------------------------------------------- counting


@dataclass(frozen=True)
class Tensors:
    """numel of each parameter tensor, by role: what ZeRO-3 partitions, one tensor at a time."""

    base: list[int]  # W of the blocks, norms, embeddings, lm_head
    delta: list[int]
    trainable: list[int]  # LoRA A/B, SubLN
    block_numel: int  # every parameter of one block (what one fetch gathers)
    largest_linear: int
    linear_numel: int  # every block linear's W: the BitLinears a student quantizes


def count_tensors(dims: ModelDims, cfg: RunConfig) -> Tensors:
    """Every linear of a block becomes a BitLinear (its W, bias, ΔW, LoRA A/B; SubLN on the inputs of o_proj and
    down_proj) but those bitnet.exclude names (model.layers.<i>.<name>, surgery.is_excluded), which stay nn.Linear;
    embeddings, norms and the LM head stay as they are (one matrix when tied)."""
    r, exclude = cfg.bitnet.lora_rank, tuple(cfg.bitnet.exclude)
    linears = dims.block_linears()
    base_block = [lin.inp * lin.out for lin in linears] + [lin.out for lin in linears if lin.bias] + dims.block_norms()
    delta, trainable, blocks, converted = [], [], [], []
    for i in range(dims.layers):
        bit = [lin for lin in linears if not is_excluded(f"model.layers.{i}.{lin.name}", exclude)]
        weights = [lin.inp * lin.out for lin in bit]
        lora = [n for lin in bit for n in (r * lin.inp, r * lin.out)]
        subln = [lin.inp for lin in bit if lin.name.rsplit(".", 1)[-1] in SUBLN_TARGETS] if cfg.bitnet.subln else []
        layer_delta = weights if cfg.relora.reset_every > 0 else []
        delta += layer_delta
        trainable += lora + subln
        converted += weights
        blocks.append(sum(base_block) + sum(layer_delta) + sum(lora) + sum(subln))
    return Tensors(base=frozen_tensors(dims), delta=delta, trainable=trainable, block_numel=max(blocks),
                   largest_linear=max(converted, default=0), linear_numel=sum(converted))


def frozen_tensors(dims: ModelDims) -> list[int]:
    """numel of each parameter tensor of the model as it is: the blocks' weights, biases and norms, the embeddings
    and LM head (one matrix when tied), the final norm."""
    linears = dims.block_linears()
    block = [lin.inp * lin.out for lin in linears] + [lin.out for lin in linears if lin.bias] + dims.block_norms()
    return dims.layers * block + [dims.vocab * dims.hidden] * (1 if dims.tied else 2) + [dims.hidden]


def frozen_models(cfg: RunConfig) -> list[tuple[str, str]]:
    """(term, model path) of the frozen models a run holds besides the student: a separate teacher, the reference."""
    models = [("HF teacher W", cfg.teacher.path)] if cfg.teacher.kind == "hf" else []
    return models + ([("reference W", cfg.preference.reference)] if cfg.preference.reference else [])


def _frozen_row(name: str, path: str, world: int, keep: float, p: int) -> tuple[str, int, str]:
    """A frozen model's ZeRO-3 partition: its parameters as transformers builds them from its config.json (else a
    preset its path names) on the meta device, so any architecture counts whole (a mixture of experts with every
    expert). Where transformers here cannot build it, the block layout counts it if BLOCK_LAYOUTS knows its
    model_type and it has no experts; otherwise the row is not counted (no verdict)."""
    config_file = Path(path) / "config.json"
    preset = preset_for(path)
    if config_file.is_file():
        config, source = _read_json(config_file, name), str(config_file)
    elif preset is not None:
        config, source = MODEL_PRESETS[preset], f"preset {preset}"
    else:
        return name, 0, f"{NOT_COUNTED}: {config_file} is not on this machine and no preset matches {path!r}"
    tensors, why = meta_tensors(config)
    if tensors is None:
        experts = [k for k in MOE_KEYS if config.get(k)]
        model_type = str(config.get("model_type") or "llama")
        if experts or model_type not in BLOCK_LAYOUTS:
            what = f"a mixture of experts ({experts[0]}={config[experts[0]]})" if experts else \
                f"model_type {model_type!r}, whose block layout the planner does not know"
            return name, 0, f"{NOT_COUNTED}: {source}: {what}, and {why}"
        tensors = frozen_tensors(ModelDims.from_hf(config, source))
    return name, int(sharded_numel(tensors, world, keep) * p), f"{sum(tensors):,} / {world} ({source})"


def sharded_numel(tensors: list[int], world: int, persistence: float) -> float:
    """Elements each rank holds: small tensors stay whole (ZeRO-3's persistence threshold), the rest partitioned."""
    return sum(n if n < persistence else n / world for n in tensors)


# ---------------------------------------------------------------------------------------------------- the estimate


def zero_options(ds_config: dict[str, Any], offload: bool) -> dict[str, Any]:
    z = {**ZERO3_DEFAULTS, **ds_config.get("zero_optimization", {})}
    if z.get("stage", 3) != 3:
        raise ConfigError(f"ds_config zero_optimization.stage={z.get('stage')}: the estimator models ZeRO-3 only")
    z["offload_param"] = offload or z.get("offload_param", {}).get("device", "none") in ("cpu", "nvme")
    z["offload_optimizer"] = offload or z.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")
    return z


def dtype_bytes(cfg: RunConfig) -> int:
    """auto resolves to bf16 on a GPU (the case this plans for)."""
    return 4 if cfg.model.dtype == "fp32" else 2


def attention_implementation(dims: ModelDims, cfg: RunConfig, p: int) -> str:
    """model.attn_implementation as models.attn_implementation resolves it on the GPUs planned for (Ampere+): auto is
    flash_attention_2 where the class supports it, the model runs in bf16 and flash_attn is installed (here), else
    sdpa where the class supports it (Gemma 2 does not), else eager."""
    requested = str(cfg.model.attn_implementation)
    if requested != "auto":
        return requested
    if dims.flash and p == 2 and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa" if dims.sdpa else "eager"


def block_internals_per_token(dims: ModelDims, cfg: RunConfig, p: int) -> float:
    """Bytes per token one block saves for its backward: int8 BitLinear inputs (+ a float32 scale each), the
    attention's tensors, the MLP's gate/up/activation, RMSNorms upcast to float32. A fused linear (Phi-3's qkv_proj,
    gate_up_proj) quantizes and saves its input once.

    Attention, as measured on the saved-tensor hooks of one Llama block: sdpa and flash attention keep q and k after
    RoPE (RoPE's backward needs only cos/sin: q, k before it are not kept), v, the output and the logsumexp. Eager
    attention keeps q, k and v repeated to every query head (repeat_kv) and, per sequence, the [heads, S, S] softmax
    in float32 plus its cast to the model dtype for the product with v (none in fp32), and with Gemma 2's score
    softcap the tanh's output: heads x S x (4 + p + p) bytes per token, S = data.seq_len."""
    h, ff, q, kv = dims.hidden, dims.intermediate, dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    linears = dims.block_linears()
    int8_inputs = sum(lin.inp for lin in linears) + 4 * len(linears)
    if attention_implementation(dims, cfg, p) == "eager":
        scores = 4 + (p if p != 4 else 0) + (p if dims.attn_softcap else 0)
        attention = 3 * q * p + dims.heads * cfg.data.seq_len * scores
    else:
        attention = (2 * q + 2 * kv) * p + dims.heads * 4  # q, k after RoPE, v, out, logsumexp
    mlp = 3 * ff * p
    norms = 2 * h * (4 + p) + ((q + kv) * (4 + p) if dims.qk_norm else 0)
    subln = (q + ff) * (4 + p) if cfg.bitnet.subln else 0
    return int8_inputs + attention + mlp + norms + subln


def estimate(cfg: RunConfig, dims: ModelDims, layout: Layout, ds_config: dict[str, Any], *, offload: bool = False,
             capacity: int | None = None, device: str = "cuda") -> Estimate:
    """Per-GPU bytes of a training step's peak. device="cpu" leaves out the CUDA framework terms (used to check
    the estimate against measured CPU runs, where the process's own baseline is subtracted instead)."""
    z, p, world = zero_options(ds_config, offload), dtype_bytes(cfg), layout.world
    t = count_tensors(dims, cfg)
    keep = z["stage3_param_persistence_threshold"]
    est = Estimate(capacity=capacity)
    gpu_or_cpu = est.cpu_rows if z["offload_param"] else est.rows
    where = " (CPU: offload_param)" if z["offload_param"] else ""
    gpu_or_cpu.append(("weights W", int(sharded_numel(t.base, world, keep) * p), f"{sum(t.base):,} / {world}{where}"))
    gpu_or_cpu.append(_delta_row(cfg, t, dims, world, keep, p, where))
    for name, path in frozen_models(cfg):
        gpu_or_cpu.append(_frozen_row(name, path, world, keep, p))
    train_local = sharded_numel(t.trainable, world, keep)
    train_part = sum(t.trainable) / world
    est.rows.append(("adapters + grads", int(train_local * p + train_part * p),
                     (f"{sum(t.trainable):,} trainable (LoRA r={cfg.bitnet.lora_rank}"
                      f"{' + SubLN' if cfg.bitnet.subln else ''}), param + grad in {p} B")))
    (est.cpu_rows if z["offload_optimizer"] else est.rows).append(
        ("fp32 master + Adam", int(train_part * 16), "16 B per trainable / world" +
         (" (CPU: offload_optimizer)" if z["offload_optimizer"] else "")))
    whole = uses_onpolicy(cfg) and cfg.onpolicy.gather_weights
    _working_set(est, t, z, p, world, staging=2 if device == "cpu" else 1, whole=whole,
                 delta_bytes=delta_value_bytes(cfg, p))
    _activations(est, cfg, dims, t, p)
    est.rows.append(("grad buckets", int(min(z["reduce_bucket_size"] * (2 if z["overlap_comm"] else 1),
                                             sum(t.trainable)) * p), f"reduce_bucket_size={z['reduce_bucket_size']:g}"))
    if device == "cuda":
        est.rows.append(("framework", int(CUDA_FRAMEWORK_BYTES + CUDA_FRAGMENTATION * est.total),
                         (f"CUDA context + NCCL {CUDA_FRAMEWORK_BYTES / GiB:.1f} GiB + {CUDA_FRAGMENTATION:.0%} "
                          "fragmentation")))
    return est


def delta_value_bytes(cfg: RunConfig, p: int) -> int:
    """Bytes of one ΔW value: an int8 code, or the model dtype's p (relora.delta_format)."""
    return 1 if cfg.relora.delta_format == DeltaFormat.int8 else p


def _delta_row(cfg: RunConfig, t: Tensors, dims: ModelDims, world: int, keep: float, p: int,
               where: str) -> tuple[str, int, str]:
    """ΔW in the model dtype (p bytes), or int8 codes (1 byte) + a per-row scale in p bytes (relora.delta_format)."""
    if not t.delta:
        return "ΔW", 0, "relora.reset_every=0: none"
    if delta_value_bytes(cfg, p) == p:
        return "ΔW", int(sharded_numel(t.delta, world, keep) * p), f"{sum(t.delta):,} / {world}{where}"
    scales = [lin.out for lin in dims.block_linears()] * dims.layers
    return ("ΔW", int(sharded_numel(t.delta, world, keep) + sharded_numel(scales, world, keep) * p),
            f"{sum(t.delta):,} int8 + {sum(scales):,} row scales / {world}{where}")


def _working_set(est: Estimate, t: Tensors, z: dict[str, Any], p: int, world: int, staging: int,
                 whole: bool, delta_bytes: int) -> None:
    total = sum(t.base) + sum(t.delta) + sum(t.trainable)
    # Bytes per gathered value: a gather takes W, ΔW and the adapters in the proportions the model has them.
    per_value = (p * (sum(t.base) + sum(t.trainable)) + delta_bytes * sum(t.delta)) / total
    if whole:
        live, how = total, f"all {total:,} while the student generates (onpolicy.gather_weights)"
        est.rows.append(("generation codes", t.linear_numel, "int8 codes of every BitLinear's W while generating"))
    elif total <= z["stage3_max_reuse_distance"]:
        live = min(total, z["stage3_max_live_parameters"])
        how = f"all {total:,} (every reuse within stage3_max_reuse_distance)"
    else:
        live = min(total, z["stage3_prefetch_bucket_size"] + 2 * t.block_numel)
        how = f"prefetch {z['stage3_prefetch_bucket_size']:g} + 2 blocks of {t.block_numel:,}"
    est.rows.append(("gathered params", int(live * per_value), how))
    # On gloo (CPU) the measured 2-rank runs need a second bucket-sized buffer: the gather is staged, then copied.
    buffer = staging * min(z["stage3_prefetch_bucket_size"], total) if world > 1 else 0
    est.rows.append(("all-gather buffer", int(buffer * per_value),
                     (f"prefetch bucket{' x2 (gloo staging)' if staging > 1 else ''}") if world > 1 else
                     "one rank: none"))


def _activations(est: Estimate, cfg: RunConfig, dims: ModelDims, t: Tensors, p: int) -> None:
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    per_block = block_internals_per_token(dims, cfg, p) * tokens
    block_weights = sum(lin.inp * lin.out for lin in dims.block_linears())
    transients = 2 * min(t.largest_linear, ROW_BLOCK_NUMEL["cuda"]) * 4  # fp32 blocks of rows of W + ΔW + s·B·A
    if cfg.model.activation_checkpointing:
        act = dims.layers * tokens * dims.hidden * p + per_block + block_weights + transients
        how = (f"{tokens} tokens: {dims.layers} block inputs + 1 recomputed block "
               f"({per_block / 2**20:.0f} MiB) + its int8 W codes + fp32 W_eff blocks")
    else:
        act = dims.layers * per_block + transients
        how = f"{tokens} tokens x {dims.layers} blocks, no checkpointing"
    est.rows.append(("activations", int(act), how))
    teacher = tokens * dims.hidden * p * (1 + _hidden_layers(cfg, dims)) if cfg.teacher.kind in ("shared", "hf") else 0
    est.rows.append(("teacher targets", int(teacher), "final hidden states" if teacher else "offline: in the batch"))
    stages = [(min(c.loss.chunk_tokens, tokens), logit_buffers(c, dims)) for _, c in in_force(cfg)]
    chunk, buffers = max(stages, key=lambda stage: stage[0] * stage[1])  # the stage whose loss needs the most
    est.rows.append(("chunked logits", int(chunk * dims.vocab * 4 * buffers),
                     f"{chunk} x {dims.vocab} fp32 x {buffers} buffers"))


# fp32 [chunk x vocab] buffers live at the peak of the chunked LM head loss (distill.losses._ChunkedLMHeadLoss, which
# forms each chunk's gradient in its forward), as tests/test_memory.py measures them with a TorchDispatchMode that
# tracks every storage made during the loss and its backward (fp32 and bf16, any temperature): against the shared
# teacher's hidden states (dense: the teacher's logits and both softmaxes too) 4 forward_kl and reverse_kl, 5 jsd,
# 6 uld; against top-k + tail targets (shards, an HF teacher) 2 for every kind; CE only 1 (fp32), 1.5 (bf16: the
# matmul's bf16 output beside its fp32 copy). A softcapped head keeps its derivative too: one buffer more
# (LogitTransform.derivative).
DENSE_LOGIT_BUFFERS = {"forward_kl": 4, "reverse_kl": 4, "jsd": 5, "uld": 6}
SPARSE_LOGIT_BUFFERS, CE_LOGIT_BUFFERS = 2, 2


def logit_buffers(cfg: RunConfig, dims: ModelDims) -> int:
    """fp32 [chunk x vocab] buffers of the loss under `cfg` (one stage's config): dense against the shared teacher
    (and DSKD's projected teacher states), sparse against top-k + tail targets."""
    loss, kind = cfg.loss, str(cfg.loss.kind)
    if loss.dskd_weight or (loss.kd_weight and cfg.teacher.kind == "shared"):
        buffers = DENSE_LOGIT_BUFFERS.get(kind, max(DENSE_LOGIT_BUFFERS.values()))
    elif loss.kd_weight and cfg.teacher.kind != "none":
        buffers = SPARSE_LOGIT_BUFFERS
    else:
        buffers = CE_LOGIT_BUFFERS
    return buffers + (1 if dims.logit_softcap else 0)


def _hidden_layers(cfg: RunConfig, dims: ModelDims) -> int:
    if not cfg.loss.hidden_weight:
        return 0
    spec = cfg.loss.hidden_layers
    return dims.layers if spec == "all" else len(list(spec))


# ---------------------------------------------------------------------------------------------------- output


def table(est: Estimate, title: str) -> str:
    width = max(len(n) for n, _, _ in est.rows + est.cpu_rows)
    lines = [title, "", f"| {'term':<{width}} | GiB/GPU | how |", f"|{'-' * (width + 2)}|--------:|-----|"]
    lines += [f"| {n:<{width}} | {b / GiB:7.2f} | {how} |" for n, b, how in est.rows]
    lines.append(f"| {'total':<{width}} | {est.total / GiB:7.2f} | |")
    if est.cpu_rows:
        lines += ["", "host memory per rank (offloaded):"]
        lines += [f"  {n}: {b / GiB:.2f} GiB ({how})" for n, b, how in est.cpu_rows]
    lines += ["", est.verdict()]
    return "\n".join(lines)


def parse_bytes(text: str) -> int:
    """80GB, 80GiB, 40G, 81920MiB, 8.5e10 -> bytes (GB and GiB both mean 2^30: what nvidia-smi calls 80 GB)."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        value = int(float(s[:-1]) * scale[s[-1]]) if s and s[-1] in scale else int(float(s))
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size like 80GB or 81920MiB")
    return value
