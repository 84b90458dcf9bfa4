"""Model surgery: turn a causal LM's linear layers into BitLinear, and flip between teacher and student."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from megadistil.bitnet.kernels import Kernel
from megadistil.bitnet.linear import Backward, BitLinear, DeltaFormat
from megadistil.bitnet.quant import VALUES_PER_BYTE
from megadistil.utils import full_shape, require


@dataclass
class BitNetConfig:
    """The `bitnet.*` section of a run config."""

    lora_rank: int = 64  # rank r of the one trainable adapter B·A of every BitLinear
    lora_alpha: float | None = None  # None: alpha = rank, scaling 1
    subln: bool = False  # BitDistill SubLN on the inputs of o_proj / down_proj (Llama bases: the export's bitnet model)
    backward: Backward = Backward.int8  # the input gradient's numerics (g quantized per row to int8, or kept)
    kernel: Kernel = Kernel.auto  # the GEMM for the integer products (auto: the fastest measured on the device)
    exclude: tuple[str, ...] = ()  # modules (names or dotted suffixes) whose linears stay nn.Linear; the head always does
    quant_warmup_steps: int = 0  # HF 1.58-bit λ warmup: λ goes 0 -> 1 over these steps; 0 = off
    # The quantizers, not the matmuls, decide BitLinear's speed; on CPU compiling costs seconds in every process.
    compile_quantizers: bool | None = None  # torch.compile the quantizers and W_eff's formation; None: on CUDA only

    def validate(self) -> None:
        require(self.lora_rank >= 1, "bitnet.lora_rank", f"must be >= 1, got {self.lora_rank}")
        require(self.lora_alpha is None or self.lora_alpha > 0, "bitnet.lora_alpha", f"must be > 0, got {self.lora_alpha}")
        require(self.quant_warmup_steps >= 0, "bitnet.quant_warmup_steps",
                f"must be >= 0, got {self.quant_warmup_steps}")


SUBLN_TARGETS = ("o_proj", "down_proj")  # where BitDistill (and transformers' `bitnet` model) put the sub-norms


def is_excluded(name: str, exclude: tuple[str, ...]) -> bool:
    """Whether module `name` is excluded (the rule the export shares): it, or a module it lies under, equals an entry
    or ends with "." + entry. So `down_proj` and `1.mlp.down_proj` name linears as before, and an entry naming a
    parent module (`mlp`, `model.layers.0`) excludes every linear under it, as plan_conversion accepts it."""
    parts = name.split(".")
    ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(a == e or a.endswith("." + e) for a in ancestors for e in exclude)


def to_bitnet(
    model: nn.Module,
    *,
    lora_rank: int,
    lora_alpha: float | None = None,
    exclude: tuple[str, ...] = (),
    subln: bool = False,
    delta: bool = True,
    delta_format: DeltaFormat | str = DeltaFormat.dtype,
    backward: str = "int8",
    kernel: Kernel | str = Kernel.auto,
) -> nn.Module:
    """Replace every nn.Linear of `model` (except `exclude` and the output embedding) by a BitLinear, in place.

    The BitLinear adopts the original weight Parameter, so teacher mode is the original model bit for bit.
    `delta=False` leaves out the dense ΔW (no ReLoRA merges), `delta_format` says how it is stored (DeltaFormat);
    `subln=True` adds SubLN before o_proj / down_proj.
    `kernel` computes the integer products (kernels.py; auto: measured on the device at the first forward).
    """
    BitNetConfig(lora_rank=lora_rank, lora_alpha=lora_alpha, backward=backward).validate()
    targets = plan_conversion(model, lora_rank=lora_rank, exclude=tuple(exclude))
    # SubLN uses the model's own RMSNorm eps, as transformers' `bitnet` architecture does on export.
    eps = getattr(getattr(model, "config", None), "rms_norm_eps", 1e-6)
    for name, linear in targets:
        layer = BitLinear.from_linear(
            linear, lora_rank=lora_rank, lora_alpha=lora_alpha, delta=delta, delta_format=delta_format,
            backward=backward, kernel=kernel,
            subln=subln and name.rsplit(".", 1)[-1] in SUBLN_TARGETS, subln_eps=eps,
        )
        model.set_submodule(name, layer)
    return model


class ConversionError(ValueError):
    """A model to_bitnet cannot convert as asked; `key` is the argument (BitNetConfig field) to change."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"to_bitnet: {message}")
        self.key = key


def plan_conversion(model: nn.Module, *, lora_rank: int, exclude: tuple[str, ...] = ()) -> list[tuple[str, nn.Linear]]:
    """The (name, nn.Linear) pairs to_bitnet converts, checked: every `exclude` entry names a module, every target
    can be packed and carry the LoRA rank, and no other weight matrix would stay in full precision unasked (a
    mixture-of-experts' experts are 3-D parameters, not nn.Linear). Works on a meta-device model, before any load."""
    names = [name for name, _ in model.named_modules()]
    for entry in exclude:
        if not any(is_excluded(name, (entry,)) for name in names):
            raise ConversionError("exclude", f"exclude entry {entry!r} matches no module of {type(model).__name__}")
    output_embedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module is not output_embedding and not is_excluded(name, exclude)]
    if not targets:
        raise ConversionError("exclude", f"{type(model).__name__} has no nn.Linear layers to convert "
                                         f"(exclude={exclude})")
    for name, linear in targets:
        _check_convertible(name, linear, lora_rank)
    left = _unconverted_matrices(model, {name for name, _ in targets}, output_embedding, exclude)
    if left:
        raise ConversionError("exclude", (
            f"{type(model).__name__} has {len(left)} weight matrices outside nn.Linear layers, which would stay in "
            f"full precision: {', '.join(left[:3])}{' ...' if len(left) > 3 else ''} (mixture-of-experts experts "
            "and routers?); megadistil converts nn.Linear layers only: exclude those modules to keep them "
            "unquantized on purpose, or distil a dense model"))
    return targets


def _unconverted_matrices(model: nn.Module, targets: set[str], output_embedding: nn.Module | None,
                          exclude: tuple[str, ...]) -> list[str]:
    """Parameters of 2+ dims (ZeRO-3's partitioned ones by their full shape) that no target, embedding or
    excluded module owns."""
    kept = {name for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) or m is output_embedding or name in targets or is_excluded(name, exclude)}
    return [name for name, p in model.named_parameters()
            if p.is_floating_point() and len(full_shape(p)) >= 2
            and name.rpartition(".")[0] not in kept]


def _check_convertible(name: str, linear: nn.Linear, lora_rank: int) -> None:
    if linear.out_features % VALUES_PER_BYTE:
        raise ConversionError("exclude", (
            f"layer {name!r} has out_features={linear.out_features}, not divisible by {VALUES_PER_BYTE} "
            "(the packed 1.58-bit format stores 4 rows per byte); add it to `exclude`"))
    if lora_rank > min(linear.in_features, linear.out_features):
        raise ConversionError("lora_rank", (
            f"lora_rank={lora_rank} exceeds layer {name!r} ({linear.in_features} -> {linear.out_features}); "
            f"use a rank <= {min(linear.in_features, linear.out_features)}"))


def bitlinear_modules(model: nn.Module) -> Iterator[tuple[str, BitLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            yield name, module


@contextlib.contextmanager
def teacher_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every BitLinear computes the original x @ W.T (SubLN, ΔW and LoRA are bypassed)."""
    layers = [m for _, m in bitlinear_modules(model)]
    previous = [m.teacher for m in layers]
    for m in layers:
        m.teacher = True
    try:
        yield model
    finally:
        for m, was in zip(layers, previous):
            m.teacher = was


def set_quant_lambda(model: nn.Module, lam: float) -> None:
    """λ of the HF 1.58-bit warmup (x + λ·(Q(x) − x)): 1 is full quantization."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"quantization λ must be in [0, 1], got {lam}")
    for _, m in bitlinear_modules(model):
        m.quant_lambda = lam
