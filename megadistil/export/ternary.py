"""Export a megadistil run as a packed 1.58-bit Hugging Face checkpoint that vanilla transformers loads.

The student is W + ΔW + s·B·A (+ SubLN): W is read tensor by tensor from the base model's safetensors, ΔW from the
checkpoint's per-rank partitions and the trainable parts (LoRA, SubLN) from DeepSpeed's ZeRO files, lazily. Each
BitLinear weight is quantized with the same Q3 as training and packed in transformers' BitNet layout; the output
shards are streamed to disk tensor by tensor, so peak memory is a few of the largest tensors, never the model.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from megadistil import rundir
from megadistil.bitnet.linear import weight_codes
from megadistil.bitnet.quant import VALUES_PER_BYTE, pack_ternary
from megadistil.bitnet.surgery import SUBLN_TARGETS, is_excluded
from megadistil.export.sources import (
    BaseModel,
    CheckpointRef,
    ExportError,
    StudentParts,
    check_fingerprint,
    is_student_part,
    locate_checkpoint,
    tensor_nbytes,
    training_dtype,
)
from megadistil.export.writer import (
    OutputTensor,
    check_output,
    publish,
    published_path,
    staged_output,
    write_weights,
)
from megadistil.utils import dtype_name, dtype_spellings, torch_dtype

EXPORT_DTYPES = dtype_spellings(torch.bfloat16, torch.float32, torch.float16)  # what --dtype offers
LINEAR_CLASSES = ("bitlinear", "autobitlinear")
# transformers' `bitnet` model puts its sub-norms exactly where SubLN sits: on the inputs of o_proj and down_proj.
SUBNORM_NAMES = {"o_proj": "attn_sub_norm", "down_proj": "ffn_sub_norm"}
assert set(SUBNORM_NAMES) == set(SUBLN_TARGETS)
# A checkpoint's meta.json names its output head (module name), which stays full precision; checkpoints written before
# it did were all of transformers models whose head is lm_head.
LEGACY_OUTPUT_HEAD = "lm_head"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json")


@dataclass
class ExportConfig:
    """What `tools/convert_to_ternary.py` does; the defaults are what goes to the hub."""

    dtype: str = "bf16"  # bf16 | fp32 | fp16: non-ternary tensors, weight_scale and the loaded model's activations
    max_shard_size: str = "5GB"
    linear_class: str = "bitlinear"  # transformers' BitLinear (1/mean|W| scale) or AutoBitLinear (mean|W|), both packed
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.dtype not in EXPORT_DTYPES:
            raise ExportError(f"--dtype must be one of {EXPORT_DTYPES}, got {self.dtype!r}")
        if self.linear_class not in LINEAR_CLASSES:
            raise ExportError(f"linear_class must be one of {LINEAR_CLASSES}, got {self.linear_class!r}")
        shard_bytes(self.max_shard_size)


def shard_bytes(size: str | int) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size)
    except (ValueError, TypeError):
        raise ExportError(f"--max-shard-size {size!r} is not a size (e.g. 5GB, 500MB)") from None
    if value <= 0:
        raise ExportError(f"--max-shard-size must be > 0, got {size!r}")
    return value


# ---------------------------------------------------------------- the student's layout

@dataclass
class StudentSpec:
    """Where the BitLinear layers are and how to rebuild their effective weight exactly as training did."""

    bitlinear: list[str]  # module names (e.g. model.layers.0.self_attn.q_proj)
    scaling: float  # lora_alpha / lora_rank
    train_dtype: torch.dtype
    subln: bool
    modules_to_not_convert: list[str]  # the output head, then bitnet.exclude as to_bitnet matched it (names, suffixes)
    lora_rank: int


def student_spec(parts: StudentParts, run_config: DictConfig, train_dtype: torch.dtype,
                 output_head: str = LEGACY_OUTPUT_HEAD) -> StudentSpec:
    b = run_config.bitnet
    rank = int(b.lora_rank)
    alpha = float(b.lora_alpha) if b.lora_alpha is not None else float(rank)
    modules = sorted(n[: -len(".lora_A")] for n in parts.tensors if n.endswith(".lora_A"))
    for m in modules:
        if not parts.has(f"{m}.lora_B"):
            raise ExportError(f"layer {m}: checkpoint has lora_A but no lora_B")
        if parts.shapes[f"{m}.lora_A"][0] != rank:
            raise ExportError(f"layer {m}: lora_A has rank {parts.shapes[f'{m}.lora_A'][0]} but the run config "
                              f"says bitnet.lora_rank={rank}")
    subln = any(n.endswith(".sub_norm.weight") for n in parts.tensors)
    not_convert = list(dict.fromkeys([output_head, *b.exclude]))
    return StudentSpec(modules, alpha / rank, train_dtype, subln, not_convert, rank)


# ---------------------------------------------------------------- the output plan

def subnorm_output_name(module: str) -> str:
    parent, leaf = module.rsplit(".", 1)
    if leaf not in SUBNORM_NAMES:
        raise ExportError(f"layer {module} has a SubLN, but transformers' bitnet model has sub-norms only on "
                          f"the inputs of {tuple(SUBNORM_NAMES)}")
    return f"{parent}.{SUBNORM_NAMES[leaf]}.weight"


def check_base_matches(base: BaseModel, parts: StudentParts, spec: StudentSpec) -> None:
    """Every BitLinear of the checkpoint must find a weight of a matching shape in the base, and every other trained
    tensor (optim.param_groups: norms, biases, embeddings) the base tensor it replaces."""
    for name, shape in parts.shapes.items():
        if is_student_part(name):
            continue
        if name not in base.files:
            raise ExportError(f"checkpoint tensor {name!r} is neither a tensor of the base model {base.path} nor a "
                              "part megadistil adds (lora_A/lora_B/delta/sub_norm): the export has no place for it")
        if base.shape(name) != shape:
            raise ExportError(f"base model {base.path} does not match the checkpoint: its {name!r} is "
                              f"{list(base.shape(name))}, the checkpoint's trained one {list(shape)}")
    for m in spec.bitlinear:
        name = f"{m}.weight"
        if name not in base.files:
            raise ExportError(f"base model {base.path} does not match the checkpoint: it has no {name!r} "
                              "(the checkpoint trained a LoRA on it)")
        out, inp = base.shape(name) if len(base.shape(name)) == 2 else (None, None)
        expect = {f"{m}.lora_A": (spec.lora_rank, inp), f"{m}.lora_B": (out, spec.lora_rank), f"{m}.delta": (out, inp),
                  f"{m}.delta_scale": (out, 1)}
        for part, shape in expect.items():
            if parts.has(part) and parts.shapes[part] != shape:
                raise ExportError(f"base model {base.path} does not match the checkpoint at layer {m}: base weight "
                                  f"{list(base.shape(name))}, checkpoint {part.rsplit('.', 1)[-1]} "
                                  f"{list(parts.shapes[part])}")
        if out % VALUES_PER_BYTE:
            raise ExportError(f"layer {m}: out_features={out} is not a multiple of {VALUES_PER_BYTE}")


def student_tensor(base: BaseModel, parts: StudentParts, name: str) -> torch.Tensor:
    """The student's tensor `name`: the checkpoint's where training changed it (optim.param_groups), else the base's."""
    return parts.get(name) if parts.has(name) else base.get(name)


def layer_codes(base: BaseModel, parts: StudentParts, spec: StudentSpec, m: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's Q3 codes and scale of layer `m`, by the function its forward used (weight_codes)."""
    # Every operand is first rounded to the dtype it had in the training forward (the optimizer's fp32 masters were
    # not used there). Loaded here, W and ΔW are freed when this frame returns.
    delta, delta_scale = (parts.get(n) if parts.has(n) else None for n in (f"{m}.delta", f"{m}.delta_scale"))
    t = spec.train_dtype
    return weight_codes(student_tensor(base, parts, f"{m}.weight").to(t), delta, parts.get(f"{m}.lora_A").to(t),
                        parts.get(f"{m}.lora_B").to(t), spec.scaling, delta_scale)


def plan_output(base: BaseModel, parts: StudentParts, spec: StudentSpec, dtype: torch.dtype,
                linear_class: str = "bitlinear") -> list[OutputTensor]:
    """The output tensors in the base's order; each BitLinear weight becomes its packed weight + weight_scale, and a
    SubLN weight follows its layer's weight under transformers' bitnet name. A tensor the checkpoint trained replaces
    the base's."""
    layers = set(spec.bitlinear)
    plan: list[OutputTensor] = []
    cache: dict[str, torch.Tensor] = {}  # the scale, computed with the packed weight, is written right after it

    for name in base.names():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module in layers:
            plan += _bitlinear_outputs(base, parts, spec, module, dtype, cache, linear_class)
        else:
            plan.append(OutputTensor(name, dtype if base.dtype(name).is_floating_point else base.dtype(name),
                                     base.shape(name),
                                     lambda name=name: _cast(student_tensor(base, parts, name), spec, dtype)))
    return plan


def _cast(t: torch.Tensor, spec: StudentSpec, dtype: torch.dtype) -> torch.Tensor:
    # The student saw its frozen tensors in the training dtype; rounding through it keeps the export identical.
    return t.to(spec.train_dtype).to(dtype) if t.is_floating_point() else t


def _bitlinear_outputs(base: BaseModel, parts: StudentParts, spec: StudentSpec, m: str, dtype: torch.dtype,
                       cache: dict[str, torch.Tensor], linear_class: str) -> list[OutputTensor]:
    out, inp = base.shape(f"{m}.weight")

    def packed() -> torch.Tensor:
        codes, scale = layer_codes(base, parts, spec, m)  # scale = 1 / mean|W_eff|
        cache[m] = stored_scale(scale.reshape(1).float(), linear_class)
        return pack_ternary(codes)

    tensors = [
        OutputTensor(f"{m}.weight", torch.uint8, ((out + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE, inp), packed,
                     ternary_values=out * inp),
        OutputTensor(f"{m}.weight_scale", dtype, (1,), lambda: cache.pop(m).to(dtype)),
    ]
    if parts.has(f"{m}.sub_norm.weight"):
        tensors.append(OutputTensor(subnorm_output_name(m), dtype, (inp,),
                                    lambda: parts.get(f"{m}.sub_norm.weight").to(spec.train_dtype).to(dtype)))
    return tensors


def stored_scale(scale: torch.Tensor, linear_class: str) -> torch.Tensor:
    """weight_scale as `linear_class` reads it, from the student's scale = 1/mean|W_eff|: transformers' BitLinear
    divides its output by weight_scale (so 1/mean|W|), AutoBitLinear (offline) multiplies by it (so mean|W|)."""
    return scale if linear_class == "bitlinear" else 1.0 / scale  # in float32, as the GGUF's d = 1/scale


def unconverted_modules(base: BaseModel, spec: StudentSpec) -> list[str]:
    """The full names of the modules left full precision: the output head, then the base's modules that bitnet.exclude
    kept out of to_bitnet (matched as it matched them, by surgery.is_excluded: a name or a dotted suffix of the module
    or of a module it lies under, so an entry naming a parent lists every linear under it)."""
    head, *exclude = spec.modules_to_not_convert
    modules = [n.removesuffix(".weight") for n in base.names() if n.endswith(".weight") and len(base.shape(n)) == 2]
    layers = set(spec.bitlinear)
    excluded = [m for m in modules if m != head and m not in layers and is_excluded(m, tuple(exclude))]
    return [head, *excluded]


def subln_unsupported(config: dict[str, Any], unconverted: list[str] | tuple[str, ...] = ()) -> str | None:
    """Why a SubLN student of this base cannot be exported, or None if it can. A SubLN student is written as
    transformers' `bitnet` model: Llama's blocks (attention_bias on q/k/v/o alike, bias-free MLP) plus RMSNorms of
    hidden_size on the inputs of o_proj and down_proj, every one of them a BitLinear. Only a Llama base computes exactly
    that; every other family differs in its blocks (fused or biased projections, q/k norms, extra norms, sliding
    windows, parallel residuals). `unconverted`: the modules the student left full precision (bitnet.exclude)."""
    name = f"model_type={config.get('model_type')!r} ({', '.join(config.get('architectures') or ['?'])})"
    if config.get("model_type") != "llama":
        return (f"a SubLN student exports as transformers' `bitnet` model (Llama blocks + sub-norms), which cannot "
                f"express {name}; train it without SubLN")
    if config.get("mlp_bias"):
        return f"transformers' `bitnet` model has a bias-free MLP, but {name} has mlp_bias=true"
    heads, head_dim = config["num_attention_heads"], config.get("head_dim") or 0
    if head_dim and heads * head_dim != config["hidden_size"]:
        return (f"transformers' `bitnet` attention sub-norm is hidden_size={config['hidden_size']} wide, but {name} "
                f"has {heads} heads x head_dim {head_dim}")
    # The `bitnet` model applies attn_sub_norm / ffn_sub_norm in every layer, but the student has no SubLN where it
    # kept o_proj / down_proj full precision: exported, that layer would be normalised where the student is not.
    for m in unconverted:
        if (norm := SUBNORM_NAMES.get(m.rsplit(".", 1)[-1])) is not None:
            return (f"layer {m} is excluded from BitNet (bitnet.exclude), so the SubLN student has no sub-norm on its "
                    f"input, but transformers' `bitnet` model applies {norm} in every layer; train it without SubLN "
                    "or without excluding o_proj/down_proj")
    return None


def output_config(base_config: dict[str, Any], spec: StudentSpec, cfg: ExportConfig,
                  unconverted: list[str]) -> dict[str, Any]:
    """config.json; `unconverted`: the full names of the modules left full precision (unconverted_modules)."""
    config = {k: v for k, v in base_config.items() if k not in ("quantization_config", "transformers_version")}
    config["dtype"] = dtype_name(torch_dtype(cfg.dtype))
    config.pop("torch_dtype", None)
    if spec.subln:
        if reason := subln_unsupported(config, unconverted):
            raise ExportError(reason)
        config.update(model_type="bitnet", architectures=["BitNetForCausalLM"])
    config["quantization_config"] = {
        "quant_method": "bitnet", "linear_class": cfg.linear_class, "quantization_mode": "offline",
        # transformers reads each entry as a start-anchored regex or a plain suffix (`up_proj` would also name Phi-3's
        # gate_up_proj, `1.mlp.down_proj` layer 11's), so the modules to_bitnet left are named in full, escaped
        "modules_to_not_convert": [re.escape(m) for m in unconverted], "use_rms_norm": False,
        "rms_norm_eps": base_config.get("rms_norm_eps", 1e-6),
    }
    return config


def write_side_files(directory: Path, base: BaseModel, tokenizer_dir: Path, config: dict[str, Any]) -> None:
    from transformers import GenerationConfig

    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (base.path / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(base.path)
    else:
        from transformers import PretrainedConfig
        gen = GenerationConfig.from_model_config(PretrainedConfig.from_dict(base.config))
    gen.save_pretrained(directory)
    copied = [f for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()]
    if not copied:
        raise ExportError(f"tokenizer dir {tokenizer_dir} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])})")
    for f in copied:  # copied byte for byte: re-saving through a tokenizer class could change them
        shutil.copyfile(tokenizer_dir / f, directory / f)


# ---------------------------------------------------------------- the whole conversion

@dataclass
class ExportResult:
    output: Path
    sizes: dict[str, Any]
    config: dict[str, Any]
    verify: dict[str, Any] | None = None


def export_student(base: BaseModel, parts: StudentParts, spec: StudentSpec, output: str | Path, cfg: ExportConfig,
                   *, tokenizer_dir: str | Path | None = None,
                   finish: Callable[[Path, ExportResult], None] | None = None) -> ExportResult:
    """Quantize, pack and write the student as an HF dir at `output` (atomically). `finish(staging_dir, result)`
    runs on the complete files before they take the output's name (verification, model card); an export whose
    verification failed takes <output>.verify-failed instead (writer.published_path)."""
    cfg.validate()
    output = Path(output).resolve()
    check_output(output, cfg.overwrite, [("--base", base.path, False)])
    check_base_matches(base, parts, spec)
    dtype = torch_dtype(cfg.dtype)
    config = output_config(base.config, spec, cfg, unconverted_modules(base, spec))
    plan = plan_output(base, parts, spec, dtype, cfg.linear_class)
    with staged_output(output) as staging:
        sizes = write_weights(staging, plan, shard_bytes(cfg.max_shard_size), cfg.progress)
        write_side_files(staging, base, Path(tokenizer_dir or base.path), config)
        sizes.update(size_report(sizes, base, staging))
        result = ExportResult(output, sizes, config)
        if finish is not None:
            finish(staging, result)
        result.output = published_path(output, result.verify)
        publish(staging, result.output)
    return result


def size_report(sizes: dict[str, Any], base: BaseModel, directory: Path) -> dict[str, Any]:
    ideal = sizes["ternary_values"] * 2 / 8
    # The teacher as it would be shipped in bf16, whatever dtype its files happen to be in.
    teacher_bf16 = sum(
        tensor_nbytes(torch.bfloat16 if base.dtype(n).is_floating_point else base.dtype(n), base.shape(n))
        for n in base.names())
    on_disk = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    return {"ideal_2bit_bytes": ideal, "packed_vs_ideal": sizes["packed_bytes"] / ideal if ideal else float("nan"),
            "bits_per_ternary_weight": 8 * sizes["packed_bytes"] / max(sizes["ternary_values"], 1),
            "checkpoint_bytes": on_disk, "teacher_bf16_bytes": teacher_bf16,
            "checkpoint_vs_teacher_bf16": on_disk / teacher_bf16}


def format_size_report(sizes: dict[str, Any]) -> str:
    gib = 1024**3
    packed = (f"packed ternary weights: {sizes['packed_bytes']:,} bytes for {sizes['ternary_values']:,} weights "
              f"= {sizes['bits_per_ternary_weight']:.4f} bits/weight ({100 * (sizes['packed_vs_ideal'] - 1):+.3f}% vs "
              f"the ideal 2 bits: {int(sizes['ideal_2bit_bytes']):,} bytes)")
    whole = (f"whole checkpoint: {sizes['checkpoint_bytes'] / gib:.4f} GiB on disk vs "
             f"{sizes['teacher_bf16_bytes'] / gib:.4f} GiB for the teacher in bf16 "
             f"({100 * sizes['checkpoint_vs_teacher_bf16']:.1f}%)")
    return f"{packed}\n{whole}"


@dataclass
class LoadedStudent:
    """A checkpoint located and checked against its base: everything an export reads."""

    ckpt: Any  # CheckpointRef
    base: BaseModel
    parts: StudentParts
    spec: StudentSpec
    tokenizer_dir: Path


def output_inputs(checkpoint: str | Path, base: str | Path | None) -> list[tuple[str, Path | None, bool]]:
    """What an export must not overwrite (writer.check_output): the run dir, its checkpoints and the base model
    (cheap: the checkpoint is located, not read)."""
    ckpt = locate_checkpoint(checkpoint)
    return [("the run dir of --checkpoint", ckpt.run_dir, True), ("--checkpoint", ckpt.root, False),
            ("--base", Path(base or ckpt.config.model.student), False)]


def load_student(checkpoint: str | Path, base: str | Path | None = None) -> LoadedStudent:
    ckpt = locate_checkpoint(checkpoint)
    base_model = BaseModel(base or ckpt.config.model.student)
    check_fingerprint(ckpt, base_model)
    parts = StudentParts.from_checkpoint(ckpt)
    spec = student_spec(parts, ckpt.config, training_dtype(ckpt), ckpt.meta.get("output_head", LEGACY_OUTPUT_HEAD))
    tokenizer_dir = Path(ckpt.config.model.tokenizer or base_model.path)
    if ckpt.config.model.tokenizer and not tokenizer_dir.is_dir():
        tokenizer_dir = base_model.path
    return LoadedStudent(ckpt, base_model, parts, spec, tokenizer_dir)


def check_evaluated(record: dict[str, Any], ckpt: CheckpointRef) -> None:
    """A tools/evaluate.py record whose scores go into the card must be of this checkpoint's student (kind student,
    its step, and where its path is on this machine, this very checkpoint): the base model's or another run's
    scores would be published as the export's."""
    where = f"--eval-results model {record.get('name')!r}"
    if record.get("kind") != "student":
        raise ExportError(f"{where} is a {record.get('kind')} model ({record.get('path')}), not this checkpoint's "
                          f"student: evaluate the checkpoint (tools/evaluate.py --model NAME={ckpt.dir})")
    step, evaluated_step = str(ckpt.meta.get("step")), (record.get("fingerprint") or {}).get("checkpoint_step")
    if evaluated_step != step:
        raise ExportError(f"{where} evaluated the checkpoint of step {evaluated_step}, this one is step {step}")
    path = Path(record.get("path", ""))
    if not path.exists():
        return  # evaluated on another machine: kind and step are what can be checked
    try:
        found = rundir.find_checkpoint(path)
    except rundir.CheckpointError as e:
        raise ExportError(f"{where}: {e}") from None
    if found.resolve() != ckpt.dir.resolve():
        raise ExportError(f"{where} evaluated {found}, not {ckpt.dir}")


def convert_checkpoint(checkpoint: str | Path, output: str | Path, cfg: ExportConfig | None = None, *,
                       base: str | Path | None = None, verify: bool = False, verify_config=None,
                       evaluated: dict[str, Any] | None = None) -> ExportResult:
    """The whole tool: locate the checkpoint, check the base, export, optionally verify, write the model card
    (`evaluated`: a tools/evaluate.py record of this model, whose scores join the card's model-index)."""
    from megadistil.export.card import run_metrics, write_card
    from megadistil.export.verify import verify_export

    cfg = cfg or ExportConfig()
    cfg.validate()
    check_output(Path(output), cfg.overwrite, output_inputs(checkpoint, base))
    if evaluated is not None:  # before the student's tensors load: locating the checkpoint reads its meta only
        check_evaluated(evaluated, locate_checkpoint(checkpoint))
    s = load_student(checkpoint, base)
    ckpt = s.ckpt

    def finish(staging: Path, result: ExportResult) -> None:
        if verify:
            result.verify = verify_export(staging, s.base, s.parts, s.spec, ckpt.config, cfg.dtype, s.tokenizer_dir,
                                          verify_config)
        write_card(staging, run_config=ckpt.config, meta=ckpt.meta,
                   metrics=run_metrics(ckpt.run_dir, int(ckpt.meta.get("step", 0))), sizes=result.sizes,
                   export_config=result.config, base_path=s.base.path, verify=result.verify, evaluated=evaluated,
                   name=Path(output).name, run_dir=ckpt.run_dir)

    return export_student(s.base, s.parts, s.spec, output, cfg, tokenizer_dir=s.tokenizer_dir, finish=finish)
