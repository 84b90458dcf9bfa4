"""Export a megadistil student as a GGUF file that llama.cpp runs (TQ2_0 / TQ1_0 ternary weights).

Scale semantics: a ternary GGUF block (256 weights along a row) stores d = 1 / weight_scale = mean|W_eff| of its
tensor, rounded to fp16, and the codes in {-1, 0, 1}: W = d · code, the student's W_eff = code / weight_scale.
(transformers' `bitlinear` stores weight_scale = 1/mean|W|; GGUF stores its inverse.) A layer whose input width is not
a multiple of 256 cannot be a TQ tensor; its ternary values are written in the other tensors' type, where f16 holds
them exactly, and the export lists it.

Architectures: a student without SubLN of a Llama-family base is llama.cpp's `llama` (its q/k rows permuted to GGML's
rope layout, Llama-3.1 rope scaling as the rope_freqs tensor); a SubLN student is llama.cpp's `bitnet` where that graph
computes it (Llama blocks, the output head tied to the embedding, no rope scaling), otherwise refused with the reason.
The file is streamed tensor by tensor and written under a dot-named temporary name, renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from megadistil.export.sources import BaseModel, ExportError, ExportLoadError, StudentParts
from megadistil.export.ternary import (
    StudentSpec,
    check_base_matches,
    layer_codes,
    student_tensor,
    subln_unsupported,
    unconverted_modules,
)
from megadistil.export.writer import _release_freed_memory, check_output, publish, published_path

Q = gguf.GGMLQuantizationType


class LinearType(str, Enum):
    """How the BitLinear weights are stored. f16 and q8_0 hold the same ternary values unpacked: the baselines that
    bench/inference.py compares the ternary types against."""

    TQ2_0 = "tq2_0"  # 2.0625 bits per weight; llama.cpp's fastest ternary kernels
    TQ1_0 = "tq1_0"  # 1.6875 bits per weight (base-3 packing)
    F16 = "f16"
    Q8_0 = "q8_0"

    @property
    def ggml(self) -> Q:
        return Q[self.name]

    @property
    def file_type(self) -> int:
        return int(gguf.LlamaFileType[f"MOSTLY_{self.name}"])


class OtherType(str, Enum):
    F16 = "f16"
    Q8_0 = "q8_0"
    F32 = "f32"

    @property
    def ggml(self) -> Q:
        return Q[self.name]


LLAMA_FAMILY = ("llama", "mistral")  # what llama.cpp's `llama` graph computes exactly


@dataclass
class GGUFConfig:
    linear_type: LinearType = LinearType.TQ2_0
    other_type: OtherType = OtherType.F16  # embeddings, output head, non-ternary linears
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        try:
            self.linear_type = LinearType(self.linear_type)
        except ValueError:
            raise ExportError(f"--gguf-type must be one of {[t.value for t in LinearType]}, "
                              f"got {self.linear_type!r}") from None
        try:
            self.other_type = OtherType(self.other_type)
        except ValueError:
            raise ExportError(f"--gguf-other-type must be one of {[t.value for t in OtherType]}, "
                              f"got {self.other_type!r}") from None


@dataclass
class GGUFTensor:
    name: str
    qtype: Q
    shape: tuple[int, ...]  # torch order: [out, in]
    produce: Callable[[], np.ndarray]  # raw bytes (quantized) or the float array of qtype
    ternary: bool = False  # a decoder linear (for the size report)

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.shape[-1] // block * type_size


@dataclass
class GGUFResult:
    output: Path
    architecture: str
    sizes: dict[str, Any]
    fallback_layers: list[str] = field(default_factory=list)
    verify: dict[str, Any] | None = None


# ---------------------------------------------------------------- architecture and hyper-parameters

def gguf_architecture(config: Any, spec: StudentSpec, unconverted: list[str] | tuple[str, ...] = ()) -> str:
    """llama.cpp's architecture for this student, or ExportError with the reason none fits. `unconverted`: the modules
    left full precision (ternary.unconverted_modules)."""
    family = f"model_type={config.model_type!r}"
    if spec.subln:
        if reason := subln_unsupported(config.to_dict(), unconverted):
            raise ExportError(f"GGUF: {reason}")
        if getattr(config, "attention_bias", False):
            raise ExportError(f"GGUF: llama.cpp's `bitnet` graph has no q/k/v/o biases, but this {family} base has "
                              "attention_bias=true. Train it without SubLN to export it as `llama`")
        if not config.tie_word_embeddings:
            raise ExportError(f"GGUF: a SubLN student is llama.cpp's `bitnet` graph, which uses the token embedding as "
                              f"its output head; this {family} student has its own lm_head (tie_word_embeddings="
                              "false). Train it without SubLN to export it as `llama`")
        if rope_scaling(config)[0] != "default":
            raise ExportError(f"GGUF: llama.cpp's `bitnet` graph applies no rope scaling, but this {family} base has "
                              f"rope_type={rope_scaling(config)[0]!r}")
        return "bitnet"
    if config.model_type not in LLAMA_FAMILY:
        raise ExportError(f"GGUF export writes Llama-family students ({', '.join(LLAMA_FAMILY)}); {family} is not one")
    if getattr(config, "mlp_bias", False):
        raise ExportError(f"GGUF: {family} has mlp_bias=true, which llama.cpp's `llama` graph does not load")
    if (window := sliding_window(config)) is not None:
        context = getattr(config, "max_position_embeddings", None)
        raise ExportError(f"GGUF: this {family} base attends over a sliding window (config.sliding_window={window}, "
                          f"max_position_embeddings={context}), which llama.cpp's `llama` graph does not apply: past "
                          f"{window} tokens it would compute another model than the student. Export it with "
                          "--format hf, where transformers applies the window")
    return "llama"


def sliding_window(config: Any) -> int | None:
    """The attention window transformers applies to this base within its context, or None: sliding_window where it
    is set (Qwen2-style configs only with use_sliding_window, and only in layer_types' sliding_attention layers)
    and smaller than max_position_embeddings (a window that long never masks a position)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if (window is None or getattr(config, "use_sliding_window", True) is False
            or (layer_types is not None and "sliding_attention" not in layer_types)):
        return None
    limit = getattr(config, "max_position_embeddings", None)
    return window if limit is None or window < limit else None


def rope_scaling(config: Any) -> tuple[str, dict[str, Any]]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params.get("rope_type", params.get("type", "default")), params


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(params: dict[str, Any], dim: int) -> np.ndarray:
    """Llama-3.1's per-frequency rope divisors, as llama.cpp's converter writes them into rope_freqs."""
    freqs = 1.0 / (params.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = params.get("factor", 8.0), params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid)).astype(np.float32)


def write_hparams(w: gguf.GGUFWriter, config: Any, arch: str, name: str, file_type: int) -> list[GGUFTensor]:
    """Model keys; returns the extra tensors they need (rope_freqs)."""
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(head_dim(config))
    w.add_value_length(head_dim(config))
    w.add_rope_dimension_count(head_dim(config))
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(file_type)
    kind, params = rope_scaling(config)
    w.add_rope_freq_base(params.get("rope_theta", 10000.0))
    if kind == "default":
        if arch == "bitnet":  # what llama.cpp's own converter writes for its bitnet models
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(1.0)
        return []
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(params["factor"])
        return []
    if kind == "llama3":
        factors = llama3_rope_factors(params, head_dim(config))
        return [GGUFTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", Q.F32, factors.shape,
                           lambda: factors)]
    raise ExportError(f"GGUF: rope_type={kind!r} of model_type={config.model_type!r} is not exported (default, "
                      "linear and llama3 are)")


# ---------------------------------------------------------------- tokenizer

# llama.cpp names a byte-level BPE's pre-tokenizer; these are the regexes of tokenizer.json that each name reproduces.
# (llama.cpp's own converter recognises tokenizers by hashing their output on a test text, so it refuses any it has
# not seen, the demo's among them; reading the pre-tokenizer itself has no such list of models.)
PRE_TOKENIZER_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def pre_tokenizer_name(pre: dict[str, Any] | None, where: str) -> str:
    """llama.cpp's pre-tokenizer for a tokenizer.json `pre_tokenizer`, or ExportError naming what it is."""
    def byte_level(p: dict[str, Any], use_regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and not p.get("add_prefix_space") and p.get("use_regex", True) == use_regex

    if pre and byte_level(pre, use_regex=True):
        return "gpt-2"  # ByteLevel's built-in regex is GPT-2's
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], use_regex=False):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in PRE_TOKENIZER_REGEX and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return PRE_TOKENIZER_REGEX[pattern]
    raise ExportError(f"tokenizer {where}: its pre_tokenizer {json.dumps(pre)} has no llama.cpp equivalent that "
                      f"megadistil knows (GPT-2's ByteLevel, {', '.join(PRE_TOKENIZER_REGEX.values())})")


def write_tokenizer(w: gguf.GGUFWriter, tokenizer_dir: Path, vocab_size: int) -> str:
    """A byte-level BPE tokenizer (tokenizer.json) as llama.cpp's `gpt2` model; returns the pre-tokenizer name."""
    from transformers import AutoTokenizer

    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"GGUF: tokenizer dir {tokenizer_dir} has no tokenizer.json (a byte-level BPE is needed)")
    spec = json.loads(path.read_text())
    if spec["model"].get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(f"tokenizer {path}: GGUF export writes byte-level BPE tokenizers; this one is "
                          f"{spec['model'].get('type')} with decoder {(spec.get('decoder') or {}).get('type')}")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), str(path))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"tokenizer {path} has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):  # ids the tokenizer lacks pad the embedding rows, as llama.cpp's converter does
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
    return pre


# ---------------------------------------------------------------- tensors

def permute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's q/k rows (rotate-half pairs) in GGML's interleaved rope order, as llama.cpp's converter permutes them."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(values: np.ndarray, qtype: Q, chunk_values: int = 1 << 20) -> np.ndarray:
    """float32 values as a tensor of qtype (raw blocks for quantized types), quantized a few rows at a time: gguf's
    quantizers make several full-size temporaries, which would otherwise set the export's peak memory."""
    if qtype == Q.F32:
        return values.astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    rows = values.reshape(-1, values.shape[-1])
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(rows.shape, qtype), dtype=np.uint8)
    step = max(1, chunk_values // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = gguf.quants.quantize(rows[start:start + step].astype(np.float32), qtype)
    return out.reshape(gguf.quants.quant_shape_to_byte_shape(values.shape, qtype))


def storable(qtype: Q, shape: tuple[int, ...], fallback: Q) -> Q:
    """qtype if a row of `shape` is whole blocks of it, else the fallback (llama.cpp's converter does the same)."""
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else fallback


def ternary_values(codes: torch.Tensor, scale: torch.Tensor, rows: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """code · d with d = 1/weight_scale rounded to fp16: exactly what a TQ block holds, and exact in f16 too."""
    # 1/scale in float32, as the student's effective weight code/scale is; then fp16 as a TQ block stores it
    d = np.float32(np.float16(np.float32(1.0) / np.float32(scale.item())))
    values = rows(codes).numpy().astype(np.float32)
    values *= d
    return values


class TensorPlan:
    """The GGUF tensors of one student, in the base's order; each produced on demand."""

    def __init__(self, base: BaseModel, parts: StudentParts, spec: StudentSpec, config: Any, arch: str,
                 cfg: GGUFConfig) -> None:
        self.base, self.parts, self.spec, self.config, self.arch, self.cfg = base, parts, spec, config, arch, cfg
        self.names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
        self.fallback: list[str] = []

    def gguf_name(self, hf_name: str) -> str:
        name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"GGUF: base tensor {hf_name!r} has no place in llama.cpp's `{self.arch}` model")
        return name

    def rows(self, gguf_name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            return lambda t: permute_rope_rows(t, self.config.num_attention_heads)
        if self.arch == "llama" and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            return lambda t: permute_rope_rows(t, self.config.num_key_value_heads)
        return lambda t: t

    def tensors(self) -> list[GGUFTensor]:
        layers = set(self.spec.bitlinear)
        out: list[GGUFTensor] = []
        for name in self.base.names():
            module = name.removesuffix(".weight")
            out.append(self.ternary(module) if module in layers else self.plain(name))
            if module in layers and self.parts.has(f"{module}.sub_norm.weight"):
                out.append(self.sub_norm(module))
        return out

    def plain(self, name: str) -> GGUFTensor:
        target, rows, shape = self.gguf_name(name), self.rows(self.gguf_name(name)), self.base.shape(name)
        other = self.cfg.other_type.ggml
        qtype = Q.F32 if len(shape) == 1 else storable(other, shape, Q.F16)

        def produce() -> np.ndarray:  # rounded through the training dtype: what the student saw
            tensor = student_tensor(self.base, self.parts, name)  # a trained norm, bias or embedding: the student's
            return encode(rows(tensor.to(self.spec.train_dtype).float()).numpy(), qtype)
        return GGUFTensor(target, qtype, shape, produce)

    def ternary(self, m: str) -> GGUFTensor:
        target, rows, shape = self.gguf_name(f"{m}.weight"), self.rows(self.gguf_name(f"{m}.weight")), \
            self.base.shape(f"{m}.weight")
        qtype = storable(self.cfg.linear_type.ggml, shape, self.cfg.other_type.ggml)
        qtype = storable(qtype, shape, Q.F16)
        if qtype != self.cfg.linear_type.ggml:
            self.fallback.append(m)

        def produce() -> np.ndarray:
            return encode(ternary_values(*layer_codes(self.base, self.parts, self.spec, m), rows), qtype)
        return GGUFTensor(target, qtype, shape, produce, ternary=True)

    def sub_norm(self, m: str) -> GGUFTensor:
        kind = {"o_proj": gguf.MODEL_TENSOR.ATTN_SUB_NORM, "down_proj": gguf.MODEL_TENSOR.FFN_SUB_NORM}[m.rsplit(".", 1)[1]]
        block = int(self.gguf_name(f"{m}.weight").split(".")[1])
        name = gguf.TENSOR_NAMES[kind].format(bid=block) + ".weight"
        return GGUFTensor(name, Q.F32, self.parts.shapes[f"{m}.sub_norm.weight"],
                          lambda: self.parts.get(f"{m}.sub_norm.weight").to(self.spec.train_dtype).float().numpy())


# ---------------------------------------------------------------- writing

def _tensor_info(w: gguf.GGUFWriter, t: GGUFTensor) -> None:
    if t.qtype in (Q.F16, Q.F32):
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float16 if t.qtype == Q.F16 else np.float32), t.nbytes)
    else:
        w.add_tensor_info(t.name, gguf.quants.quant_shape_to_byte_shape(t.shape, t.qtype), np.dtype(np.uint8),
                          t.nbytes, raw_dtype=t.qtype)


def write_gguf(staging: Path, name: str, arch: str, config: Any, tensors: list[GGUFTensor], tokenizer_dir: Path,
               cfg: GGUFConfig) -> str:
    """Streams the file to `staging` (one tensor in memory at a time), fsynced; returns the pre-tokenizer."""
    w = gguf.GGUFWriter(None, arch)
    tensors = tensors + write_hparams(w, config, arch, name, cfg.linear_type.file_type)
    pre = write_tokenizer(w, tokenizer_dir, config.vocab_size)
    for t in tensors:
        _tensor_info(w, t)
    w.write_header_to_file(staging)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in tqdm(tensors, desc="gguf", unit="tensor", disable=not cfg.progress):
        data = t.produce()
        if data.nbytes != t.nbytes:
            raise RuntimeError(f"tensor {t.name}: produced {data.nbytes} bytes, planned {t.nbytes}")
        w.write_tensor_data(data)
        del data
        _release_freed_memory()
    w.close()
    fd = os.open(staging, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return pre


def size_report(tensors: list[GGUFTensor], output: Path) -> dict[str, Any]:
    linears = [t for t in tensors if t.ternary]
    values = sum(int(np.prod(t.shape)) for t in linears)
    return {"file_bytes": output.stat().st_size, "linear_bytes": sum(t.nbytes for t in linears),
            "linear_values": values, "linear_f16_bytes": 2 * values,
            "linear_vs_f16": sum(t.nbytes for t in linears) / max(2 * values, 1),
            "bits_per_linear_weight": 8 * sum(t.nbytes for t in linears) / max(values, 1)}


def format_gguf_sizes(r: GGUFResult) -> str:
    s = r.sizes
    lines = [(f"gguf: llama.cpp architecture `{r.architecture}`, pre-tokenizer {s['pre_tokenizer']}, "
              f"{s['file_bytes'] / 2**20:.2f} MiB"),
             (f"decoder linears: {s['linear_bytes']:,} bytes for {s['linear_values']:,} weights = "
              f"{s['bits_per_linear_weight']:.4f} bits/weight, {s['linear_vs_f16']:.3f}x their f16 size")]
    if r.fallback_layers:
        lines.append(f"{len(r.fallback_layers)} layer(s) whose input width is not a multiple of 256 hold their ternary "
                     f"values in the other tensors' type: {', '.join(r.fallback_layers)}")
    return "\n".join(lines)


def export_gguf(base: BaseModel, parts: StudentParts, spec: StudentSpec, output: str | Path, cfg: GGUFConfig, *,
                tokenizer_dir: str | Path | None = None,
                finish: Callable[[Path, GGUFResult], None] | None = None) -> GGUFResult:
    """Write the student as one GGUF file at `output` (atomically). `finish(staged_file, result)` runs on the
    complete file before it takes the output's name (verification); a failed verification publishes it as
    <output>.verify-failed instead (writer.published_path)."""
    from transformers import AutoConfig

    output = Path(output).resolve()
    if output.suffix != ".gguf":
        raise ExportError(f"a GGUF output is one file named *.gguf, got --output {output}")
    check_output(output, cfg.overwrite, [("--base", base.path, False)])
    check_base_matches(base, parts, spec)
    config = AutoConfig.from_pretrained(base.path)
    arch = gguf_architecture(config, spec, unconverted_modules(base, spec))
    plan = TensorPlan(base, parts, spec, config, arch, cfg)
    tensors = plan.tensors()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        pre = write_gguf(staging, output.stem, arch, config, tensors, Path(tokenizer_dir or base.path), cfg)
        result = GGUFResult(output, arch, size_report(tensors, staging) | {"pre_tokenizer": pre}, plan.fallback)
        if finish is not None:
            finish(staging, result)
        result.output = published_path(output, result.verify)
        publish(staging, result.output)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return result


def verify_gguf_file(path: Path, student: torch.nn.Module, tokenizer: Any, run_config: Any,
                     cfg: Any = None) -> dict[str, Any]:
    """llamacpp.verify_gguf's figures. A file llama.cpp cannot load or run failed its verification (figures with the
    cause under "error"), which keeps it as <output>.verify-failed for a look, rather than an error that deletes it."""
    from megadistil.export.llamacpp import verify_gguf
    from megadistil.export.verify import load_failure

    try:
        return verify_gguf(path, student, tokenizer, run_config, cfg)
    except ExportLoadError as e:
        return load_failure(e, "llama.cpp")


def convert_checkpoint_gguf(checkpoint: str | Path, output: str | Path, cfg: GGUFConfig | None = None, *,
                            base: str | Path | None = None, verify: bool = False,
                            verify_config: Any = None) -> GGUFResult:
    """tools/convert_to_ternary.py --format gguf: export, then (verify) run the file in llama.cpp against the
    student before it takes the output's name. llama.cpp must be installed before the export starts, so a missing
    runtime costs nothing."""
    from megadistil.export.llamacpp import require_llama_cpp
    from megadistil.export.ternary import load_student, output_inputs

    cfg = cfg or GGUFConfig()
    if Path(output).suffix != ".gguf":
        raise ExportError(f"a GGUF output is one file named *.gguf, got --output {output}")
    check_output(Path(output), cfg.overwrite, output_inputs(checkpoint, base))
    if verify:
        require_llama_cpp()
    s = load_student(checkpoint, base)

    def finish(staged: Path, result: GGUFResult) -> None:
        if not verify:
            return
        from transformers import AutoTokenizer

        from megadistil.export.verify import build_student

        student = build_student(s.base, s.parts, s.spec, s.ckpt.config)
        result.verify = verify_gguf_file(staged, student, AutoTokenizer.from_pretrained(s.tokenizer_dir),
                                         s.ckpt.config, verify_config)

    return export_gguf(s.base, s.parts, s.spec, output, cfg, tokenizer_dir=s.tokenizer_dir, finish=finish)
