"""BitNet b1.58 quantizers: absmean ternary weights (Q3), absmax int8 activations (Q8), 2-bit packing.

The arithmetic follows transformers' `WeightQuant` / `ActQuant` (integrations/bitnet.py) exactly: scales are computed
in float32, weight scale = 1 / mean|W|, activation scale = 127 / max|x| per token, both clamped at 1e-5. The
integer-valued codes are returned separately from their scales so that matmuls can run on int8 kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EPS = 1e-5
# A gradient's rows are quantized like activations but scaled to their own absmax however small: gradients sit far
# below EPS (a mean loss over many tokens, split over grad_accum), where EPS would leave a row few levels or none.
# This floor only keeps 127 / absmax finite in float32.
GRAD_FLOOR = 1e-30
VALUES_PER_BYTE = 4  # four ternary values per uint8, along dim 0 (transformers' BitNet layout)


def _ternary_codes(weight: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3 codes: (int8 values in {-1, 0, 1}, float32 scalar scale) with W ≈ codes / scale. `scratch`, a float32
    tensor shaped like W, takes the float32 intermediates instead of new allocations."""
    w = weight.float()
    scale = 1.0 / torch.abs(w, out=scratch).mean().clamp(min=EPS)
    codes = torch.mul(w, scale, out=scratch).round_().clamp_(-1, 1).to(torch.int8)
    return codes, scale


def _int8_codes(x: torch.Tensor, floor: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8 codes per row of the last dim: (int8 values in [-128, 127], float32 [..., 1] scale), x ≈ codes / scale."""
    xf = x.float()
    scale = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=floor)
    codes = (xf * scale).round_().clamp_(-128, 127).to(torch.int8)
    return codes, scale


def _effective_block(w: torch.Tensor, d: torch.Tensor | None, ds: torch.Tensor | None, a: torch.Tensor,
                     b: torch.Tensor, scaling: float) -> torch.Tensor:
    """One block of rows of W + (ΔW + s·B·A) in float32 as one expression, for the compiler to fuse: the operations
    of linear._effective_rows (the eager path, in place on reused buffers) in the same order. `a`, `b`, `ds` as
    linear._factors gives them (bf16 factors: the product rounded to bf16, then float32)."""
    if a.dtype == torch.float32:
        if d is None:
            return torch.addmm(w.float(), b, a, alpha=scaling)
        merged = torch.addmm(d.float() * ds if ds is not None else d.float(), b, a, alpha=scaling)
    else:
        merged = (b @ a).float()
        merged = merged * scaling if scaling != 1.0 else merged
        if d is not None:
            merged = merged + (d.float() * ds if ds is not None else d.float())
    return merged + w.float()


def _block_abs_sum(w, d, ds, a, b, scaling) -> torch.Tensor:
    """Σ|W_eff| over one block of rows, accumulated in float64."""
    return _effective_block(w, d, ds, a, b, scaling).abs().sum(dtype=torch.float64)


def _block_codes(w, d, ds, a, b, scaling, scale: torch.Tensor) -> torch.Tensor:
    """Q3 codes of one block of rows of W_eff: round(W_eff · scale) clamped to {-1, 0, 1}, int8."""
    return (_effective_block(w, d, ds, a, b, scaling) * scale).round().clamp(-1, 1).to(torch.int8)


def _dequantize(product: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    return product.float().div_(x_scale * w_scale).to(dtype)  # in place: a fresh product (int32 -> a float copy)


# The quantizers, not the matmuls, decide BitLinear's speed: eager they make several passes over a tensor each
# (W_eff's formation and codes ~10 per block of rows); compiled they fuse into one or two. Eager is the default on a
# CPU (no compiler needed, no seconds of compiling per process); `compile_quantizers()` switches, process-wide.
# The block entries are None while eager: linear.weight_codes then forms W_eff in place on reused buffers.
_EAGER = {"ternary": _ternary_codes, "int8": _int8_codes, "block_abs_sum": None, "block_codes": None,
          "dequantize": _dequantize}
_IMPL = dict(_EAGER)


def ternary_codes(weight: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3 codes: (int8 values in {-1, 0, 1}, float32 scalar scale) with W ≈ codes / scale. `scratch` (eager only: the
    compiled quantizer fuses its intermediates away) takes the float32 intermediates."""
    if scratch is not None and _IMPL["ternary"] is _ternary_codes:
        return _ternary_codes(weight, scratch)
    return _IMPL["ternary"](weight)


def int8_codes(x: torch.Tensor, floor: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8 codes per row of the last dim: (int8 values in [-128, 127], float32 [..., 1] scale), x ≈ codes / scale;
    the row absmax is clamped at `floor` (EPS for activations, as transformers' ActQuant; GRAD_FLOOR for gradients)."""
    return _IMPL["int8"](x, floor)


_FUSED = {**_EAGER, "block_abs_sum": _block_abs_sum, "block_codes": _block_codes}  # what compile_quantizers compiles
_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def compile_quantizers(enabled: bool = True) -> None:
    """Use torch.compile'd (fused) quantizers, process-wide, or the eager ones again. Both give the same codes, but
    for one thing: W_eff's absmean adds up in another order (float64 against float32 block sums), so its scale can
    differ in the last bit, and a weight exactly at a rounding boundary then gets the neighbouring code."""
    if not _COMPILED:
        _COMPILED.update({name: torch.compile(fn, dynamic=True) for name, fn in _FUSED.items()})
    _IMPL.update(_COMPILED if enabled else _EAGER)


def compile_by_default(setting: bool | None, device: torch.device) -> bool:
    """bitnet.compile_quantizers: None compiles on CUDA only (on a CPU, compiling costs seconds per process)."""
    return setting if setting is not None else device.type == "cuda"


def quantizers_compiled() -> bool:
    return _IMPL["int8"] is not _int8_codes


def block_quantizers() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] | None:
    """The compiled (Σ|W_eff|, codes) functions of one block of rows, or None while eager."""
    return None if _IMPL["block_abs_sum"] is None else (_IMPL["block_abs_sum"], _IMPL["block_codes"])


def dequantize(product: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """product / (x_scale · w_scale) in `dtype`: a BitLinear's integer product (int32 or float32) in real units."""
    return _IMPL["dequantize"](product, x_scale, w_scale, dtype)


def _ste(x: torch.Tensor, quantized: torch.Tensor, lam: float) -> torch.Tensor:
    # lam < 1 is the HF 1.58-bit warmup: blend towards the quantized value; the gradient is the identity either way.
    return x + (lam * (quantized - x)).detach()


def q3(weight: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Fake-quantized ternary weight with the straight-through estimator, in the input's dtype."""
    codes, scale = ternary_codes(weight)
    return _ste(weight, (codes.float() / scale).to(weight.dtype), lam)


def q8(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Fake-quantized int8 activation (per token) with the straight-through estimator, in the input's dtype."""
    codes, scale = int8_codes(x)
    return _ste(x, (codes.float() / scale).to(x.dtype), lam)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary codes [out, ...] into uint8 [ceil(out/4), ...]: value+1, row block i in bits 2i..2i+1.

    Identical to transformers.integrations.bitnet.pack_weights for out % 4 == 0 (which BitLinear requires).
    """
    out = codes.shape[0]
    rows = (out + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE
    padded = torch.zeros((rows * VALUES_PER_BYTE, *codes.shape[1:]), dtype=torch.uint8, device=codes.device)
    padded[:out] = (codes + 1).to(torch.uint8)
    packed = torch.zeros((rows, *codes.shape[1:]), dtype=torch.uint8, device=codes.device)
    for i in range(VALUES_PER_BYTE):
        packed |= padded[i * rows : (i + 1) * rows] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
    """Inverse of pack_ternary: int8 codes [out, ...]."""
    parts = [((packed >> (2 * i)) & 3).to(torch.int8) - 1 for i in range(VALUES_PER_BYTE)]
    codes = torch.cat(parts, dim=0)
    return codes if out_features is None else codes[:out_features]
