"""BitLinear: one frozen weight, two models.

Teacher mode computes the original `x @ W.T`. Student mode computes `Q8(x) @ Q3(W + ΔW + s·B·A).T` through one
autograd Function that saves only the int8 activation codes and their per-token scales, recomputes the ternary weight
in backward, and never forms a dense weight gradient (only the LoRA factors train).
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megadistil.bitnet.kernels import Kernel, code_product, hardware
from megadistil.bitnet.quant import EPS, GRAD_FLOOR, block_quantizers, dequantize, int8_codes, q3, q8


class Backward(enum.StrEnum):
    """bitnet.backward: the input gradient's numerics (g quantized per row to int8, or kept in the compute dtype)."""

    int8 = "int8"
    bf16 = "bf16"


class DeltaFormat(enum.StrEnum):
    """relora.delta_format: how the merged ΔW is stored."""

    dtype = "dtype"  # in the parameters' dtype, W-sized: a merge is invisible bit for bit where that is float32
    int8 = "int8"  # int8 codes + a per-row scale (ΔW_ij = code_ij · scale_i): half of a bf16 W; a merge rounds ΔW


# W_eff = W + ΔW + s·B·A is formed in blocks of rows: whole, a float32 copy of the largest linear is 235 MB at
# Llama-3.1-8B and 940 MB at 70B, two of them at once, in every forward and recompute. A block holds at most this
# many float32 values: cache-sized on a CPU (where two such buffers are kept from call to call instead of two
# W-sized ones); on a GPU, an 8B linear whole (no second rank-r product) and a 70B MLP in 4 blocks.
ROW_BLOCK_NUMEL = {"cpu": 1 << 20, "cuda": 1 << 26}


def row_blocks(weight: torch.Tensor) -> list[slice]:
    """The row ranges W_eff is formed in (fixed by the shape and the device type, so every caller gets the same
    blocks: forward, recompute, merge and export agree bit for bit)."""
    out, inp = weight.shape
    rows = max(64, ROW_BLOCK_NUMEL.get(weight.device.type, ROW_BLOCK_NUMEL["cuda"]) // max(inp, 1))
    return [slice(i, min(i + rows, out)) for i in range(0, out, rows)]


def _lora_rows(rows: slice, a: torch.Tensor, b: torch.Tensor, scaling: float, out: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of s·B·A into float32 `out` from bf16 factors: one bf16 GEMM, its product rounded to bf16."""
    value = out.copy_(b[rows] @ a)
    return value.mul_(scaling) if scaling != 1.0 else value


def _merged_rows(rows: slice, delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                 delta_scale: torch.Tensor | None, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of ΔW + s·B·A in float32, into `out` (`scratch`: same shape, for ΔW's float32 copy)."""
    if a.dtype == torch.float32:
        value = out.copy_(delta[rows])
        if delta_scale is not None:
            value.mul_(delta_scale[rows])
        return value.addmm_(b[rows], a, alpha=scaling)
    value, d = _lora_rows(rows, a, b, scaling, out), scratch.copy_(delta[rows])
    return value.add_(d.mul_(delta_scale[rows]) if delta_scale is not None else d)


def _effective_rows(rows: slice, weight: torch.Tensor, delta: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                    scaling: float, delta_scale: torch.Tensor | None, out: torch.Tensor,
                    scratch: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of W + (ΔW + s·B·A) in float32, into `out` (`scratch`: same shape, takes W's float32 copy: a
    mixed-dtype add_ would allocate one). `a`, `b` and `delta_scale` come from _factors."""
    if delta is not None:
        value = _merged_rows(rows, delta, a, b, scaling, delta_scale, out, scratch)
    elif a.dtype != torch.float32:
        value = _lora_rows(rows, a, b, scaling, out)
    else:
        return out.copy_(weight[rows]).addmm_(b[rows], a, alpha=scaling)
    return value.add_(scratch.copy_(weight[rows]))  # floating-point addition commutes: W + (ΔW + s·B·A) either way


def _factors(lora_A: torch.Tensor, lora_B: torch.Tensor,
             delta_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A, B and ΔW's row scale as the rank-r product s·B·A takes them: float32, except bf16 factors, which form s·B·A
    in a bf16 GEMM (~3x a float32 one on CPUs with bf16 units; tensor cores on a GPU), its product rounded to bf16:
    relative 2^-9 of s·B·A, far below W's own bf16 step, as a bf16 ΔW's merge rounds it anyway. The dtype alone
    decides, on every device, so a model trained on a GPU and exported on a CPU gets the codes it trained with: on
    random 4096x4096 weights (|s·B·A| = 0.05-0.5 |W|) a float32 product on one device and a bf16 one on the other
    differ in 4e-5 to 4e-4 of the codes; bf16 products accumulated in two orders, in none."""
    ds = delta_scale.float() if delta_scale is not None else None
    if lora_A.dtype == lora_B.dtype == torch.bfloat16:
        return lora_A, lora_B, ds
    return lora_A.float(), lora_B.float(), ds


def effective_weight(weight: torch.Tensor, delta: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float, delta_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W + (ΔW + s·B·A) in float32, whole (export checks, fake quantization, tests; the student's forward never
    forms it), in the row blocks of weight_codes: the same values bit for bit.

    The bracket is `merged_delta`: after a ReLoRA merge (ΔW' = ΔW + s·B·A, B = 0) it evaluates to the same float32
    value bit for bit, so a merge leaves the student's logits exactly unchanged when ΔW is stored in float32.
    """
    value = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    a, b, ds = _factors(lora_A, lora_B, delta_scale)
    for rows in row_blocks(weight):
        _effective_rows(rows, weight, delta, a, b, scaling, ds, value[rows], torch.empty_like(value[rows]))
    return value


def merged_delta(delta: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 delta_scale: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW + s·B·A in float32: the value a ReLoRA merge writes into ΔW (int8 ΔW: codes · per-row scale)."""
    value = torch.empty(delta.shape, dtype=torch.float32, device=delta.device)
    a, b, ds = _factors(lora_A, lora_B, delta_scale)
    for rows in row_blocks(delta):
        _merged_rows(rows, delta, a, b, scaling, ds, value[rows], torch.empty_like(value[rows]))
    return value


_SCRATCH: dict[tuple[torch.device, int], torch.Tensor] = {}


def _scratch(slot: int, device: torch.device, numel: int) -> torch.Tensor:
    """A flat float32 buffer of at least `numel`, reused from call to call: a CPU allocator would map and page-fault
    every new block in anew (glibc's default above 32 MiB), or keep freed blocks and fragment."""
    key = (device, slot)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor even when first made under inference_mode
            buf = _SCRATCH[key] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf


@torch.no_grad()
def weight_codes(weight: torch.Tensor, delta: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float, delta_scale: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3 codes of W_eff = W + (ΔW + s·B·A): (int8 codes, float32 scale = 1 / mean|W_eff|), W_eff ≈ codes / scale.

    W_eff is formed one block of rows at a time (row_blocks), twice: the absmean first, then the codes (the last
    block's are still at hand; the others cost their rank-r product again). The blocks' float32 sums add up in
    float64: the scale is transformers' float32 mean to rounding. `scale`, the one an earlier call returned for
    these same tensors (a backward's recompute: its forward's), skips the absmean pass: the codes are the same."""
    blocks = row_blocks(weight)
    a, b, ds = _factors(lora_A, lora_B, delta_scale)
    fused = block_quantizers()
    if fused is not None:
        return _fused_weight_codes(fused, blocks, weight, delta, a, b, scaling, ds, scale)
    numel = (blocks[0].stop - blocks[0].start) * weight.shape[1]
    if weight.device.type == "cpu":
        out_buf, tmp_buf = _scratch(0, weight.device, numel), _scratch(1, weight.device, numel)
    else:  # a caching allocator: transients, free for the activations between layers
        out_buf, tmp_buf = (torch.empty(numel, dtype=torch.float32, device=weight.device) for _ in range(2))

    def rows_of(rows: slice) -> torch.Tensor:
        shape = (rows.stop - rows.start, weight.shape[1])
        n = shape[0] * shape[1]
        return _effective_rows(rows, weight, delta, a, b, scaling, ds, out_buf[:n].view(shape),
                               tmp_buf[:n].view(shape))

    value = None
    if scale is None:
        total = torch.zeros((), dtype=torch.float64, device=weight.device)
        for rows in blocks:
            value = rows_of(rows)
            total += torch.abs(value, out=tmp_buf[: value.numel()].view(value.shape)).sum()
        scale = 1.0 / (total / weight.numel()).float().clamp(min=EPS)
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for rows in reversed(blocks):
        value = value if value is not None and rows is blocks[-1] else rows_of(rows)
        codes[rows] = value.mul_(scale).round_().clamp_(-1, 1)
    return codes, scale


def _fused_weight_codes(fused: tuple, blocks: list[slice], weight: torch.Tensor, delta: torch.Tensor | None,
                        a: torch.Tensor, b: torch.Tensor, scaling: float, ds: torch.Tensor | None,
                        scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight_codes with compiled quantizers: per block of rows, one fused pass for Σ|W_eff| and one for the codes."""
    abs_sum, block_codes = fused

    def args(rows: slice) -> tuple:
        return (weight[rows], None if delta is None else delta[rows], None if ds is None else ds[rows], a, b[rows],
                scaling)

    if scale is None:
        total = sum(abs_sum(*args(rows)) for rows in blocks)
        scale = 1.0 / (total / weight.numel()).float().clamp(min=EPS)
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for rows in blocks:
        codes[rows] = block_codes(*args(rows), scale)
    return codes, scale


def int8_rows(value: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 codes of a float tensor and their scale (rounded to scale_dtype first, so that
    codes · scale is what the stored scale reproduces); a zero row gets scale 0 and codes 0."""
    scale = (value.abs().amax(dim=1, keepdim=True) / 127).to(scale_dtype)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    return (value / safe).round_().clamp_(-127, 127).to(torch.int8), scale


class BitLinearFunction(torch.autograd.Function):
    """y = Q8(x) @ Q3(W_eff).T with the straight-through estimator for both quantizers.

    Gradients (x̂ = Q8(x) dequantized, g = dL/dy, s = LoRA scaling):
      dA = s·(g·B)ᵀ·x̂ and dB = s·gᵀ·(x̂·Aᵀ), O(tokens·r·(in+out)), no dense dW;
      dx = g·Q3(W_eff), with g quantized per row to int8 (`int8`) or kept in the activation dtype (`bf16`);
      db = Σ_tokens g (accumulated in float32), where optim.param_groups trains the bias. W, ΔW: none (frozen).
    The integer products run on `kernel` (kernels.py): the result is the same on every kernel.
    """

    @staticmethod
    def forward(ctx, x, weight, delta, delta_scale, lora_A, lora_B, bias, scaling, backward_mode, keep_weight_codes,
                kernel):
        x_codes, x_scale = int8_codes(x.reshape(-1, x.shape[-1]))
        w_codes, w_scale = weight_codes(weight, delta, lora_A, lora_B, scaling, delta_scale)
        y = code_linear(x_codes, x_scale, w_codes, w_scale, bias, kernel, x.dtype)
        # Under non-reentrant activation checkpointing the first forward saves nothing, and the recompute runs one
        # block right before its backward: keeping the int8 codes then costs one layer's weight at a time.
        # The scale, a scalar, is always kept: a backward that recomputes the codes then skips the absmean pass.
        ctx.save_for_backward(x_codes, x_scale, weight, delta, delta_scale, lora_A, lora_B,
                              w_codes if keep_weight_codes else None, w_scale)
        ctx.scaling, ctx.backward_mode, ctx.kernel, ctx.x_shape = scaling, backward_mode, kernel, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x_codes, x_scale, weight, delta, delta_scale, lora_A, lora_B, w_codes, w_scale = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        s = ctx.scaling
        grad_x = grad_A = grad_B = grad_bias = None
        if ctx.needs_input_grad[0]:
            if w_codes is None:
                w_codes, w_scale = weight_codes(weight, delta, lora_A, lora_B, s, delta_scale, scale=w_scale)
            grad_x = _input_grad(g, w_codes, w_scale, ctx.backward_mode, ctx.kernel).reshape(ctx.x_shape)
        if ctx.needs_input_grad[6]:  # a bias optim.param_groups trains: dL/db = Σ_tokens g, as F.linear's
            grad_bias = g.sum(0, dtype=torch.promote_types(g.dtype, torch.float32)).to(ctx.bias_dtype)
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            dt = lora_A.dtype
            x_int = x_codes.to(dt)  # exact: |codes| <= 128 is representable in bf16
            inv_scale = (1.0 / x_scale).to(dt)
            g = g.to(dt)
            # x̂ = codes / scale row-wise: fold 1/scale into the narrow [tokens, r] factor, not the wide input.
            grad_A = s * ((g @ lora_B) * inv_scale).t() @ x_int
            grad_B = s * g.t() @ ((x_int @ lora_A.t()) * inv_scale)
        # W (the teacher's), ΔW and its row scale never train here (assign_param_groups refuses them): no gradient.
        return grad_x, None, None, None, grad_A, grad_B, grad_bias, None, None, None, None


def code_linear(x_codes: torch.Tensor, x_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, kernel: Kernel, dtype: torch.dtype) -> torch.Tensor:
    """Q8(x) @ Q3(W).T from the codes and scales: the integer product on `kernel`, then both scales divided out."""
    y = dequantize(code_product(x_codes, w_codes.t(), kernel), x_scale, w_scale, dtype)
    return y + bias if bias is not None else y


def _input_grad(g: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, mode: str,
                kernel: Kernel) -> torch.Tensor:
    if mode == "int8":
        g_codes, g_scale = int8_codes(g, GRAD_FLOOR)
        return dequantize(code_product(g_codes, w_codes, kernel), g_scale, w_scale, g.dtype)
    return (g @ w_codes.to(g.dtype)) * (1.0 / w_scale).to(g.dtype)


class SubLN(nn.Module):
    """RMSNorm on a BitLinear's input (BitDistill's SubLN), computed in float32 like LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class BitLinear(nn.Module):
    """A linear layer that is the teacher (frozen W) or the BitNet student (ternary W + ΔW + LoRA, int8 input)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        lora_rank: int,
        lora_alpha: float | None = None,
        bias: bool = False,
        delta: bool = True,
        delta_format: DeltaFormat | str = DeltaFormat.dtype,
        subln: bool = False,
        subln_eps: float = 1e-6,
        backward: str = "int8",
        kernel: Kernel | str = Kernel.auto,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        weight: nn.Parameter | None = None,
        bias_param: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        if backward not in set(Backward):
            raise ValueError(f"bitnet.backward must be one of {[b.value for b in Backward]}, got {backward!r}")
        self.in_features, self.out_features, self.lora_rank = in_features, out_features, lora_rank
        self.scaling = (lora_alpha if lora_alpha is not None else lora_rank) / lora_rank
        self.backward_mode = backward
        self.kernel = Kernel(kernel)  # auto: the device's measured choice, resolved at the first forward
        factory = {"device": device, "dtype": dtype}
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.weight = weight
        self.weight.requires_grad_(False)
        if bias_param is None and bias:
            bias_param = nn.Parameter(torch.zeros(out_features, **factory))
        self.bias = bias_param.requires_grad_(False) if bias_param is not None else None
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        int8_delta = delta and DeltaFormat(delta_format) is DeltaFormat.int8
        delta_dtype = torch.int8 if int8_delta else factory["dtype"]
        self.delta = nn.Parameter(torch.zeros(out_features, in_features, device=factory["device"], dtype=delta_dtype),
                                  requires_grad=False) if delta else None
        self.delta_scale = nn.Parameter(torch.zeros(out_features, 1, **factory), requires_grad=False) \
            if int8_delta else None
        self.lora_A = nn.Parameter(torch.empty(lora_rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, lora_rank, **factory))
        self.sub_norm = SubLN(in_features, eps=subln_eps, **factory) if subln else None
        self.teacher = False
        self.quant_lambda = 1.0  # < 1 during the HF 1.58-bit warmup (fake-quant path)
        self.keep_weight_codes = False
        self.codes_frozen = False  # frozen_weight_codes: quantize the weight once, reuse its codes
        self._frozen_codes: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.weight.device.type != "meta":
            self.reset_lora()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> BitLinear:
        """Wrap an nn.Linear, adopting its weight and bias Parameters (no copy: the teacher costs nothing)."""
        return cls(
            linear.in_features, linear.out_features, weight=linear.weight, bias_param=linear.bias,
            device=linear.weight.device, dtype=linear.weight.dtype, **kwargs,
        )

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """A ~ kaiming-uniform (as PEFT), B = 0: the adapter starts as an exact no-op."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) bound, as nn.Linear and PEFT
        if generator is None or generator.device == self.lora_A.device:
            self.lora_A.uniform_(-bound, bound, generator=generator)
        else:  # drawn where the generator lives (ReLoRA's CPU one: the same A on every device), then copied over
            a = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype, device=generator.device)
            self.lora_A.copy_(a.uniform_(-bound, bound, generator=generator))
        self.lora_B.zero_()

    def effective_weight(self) -> torch.Tensor:
        return effective_weight(self.weight, self.delta, self.lora_A, self.lora_B, self.scaling, self.delta_scale)

    @torch.no_grad()
    def merge_lora_(self) -> None:
        """ΔW += s·B·A (int8 ΔW: requantized per row); the caller re-initialises A and B (and, under ZeRO-3, their
        optimizer master copies)."""
        if self.delta is None:
            raise RuntimeError("BitLinear was built without ΔW (delta=False): ReLoRA merges need it")
        merged = merged_delta(self.delta, self.lora_A, self.lora_B, self.scaling, self.delta_scale)
        if self.delta_scale is None:
            self.delta.copy_(merged)
            return
        codes, scale = int8_rows(merged, self.delta_scale.dtype)
        self.delta.copy_(codes)
        self.delta_scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher:
            return F.linear(x, self.weight, self.bias)
        if self.sub_norm is not None:
            x = self.sub_norm(x)
        if self.quant_lambda < 1.0:
            return self.fake_quant_forward(x)
        if self.kernel is Kernel.auto:
            self.kernel = hardware(x.device).kernel
        if self.codes_frozen:
            return self._frozen_forward(x)
        return BitLinearFunction.apply(
            x, self.weight, self.delta, self.delta_scale, self.lora_A, self.lora_B, self.bias,
            self.scaling, self.backward_mode, self.keep_weight_codes, self.kernel,
        )

    @torch.no_grad()
    def _frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """BitLinearFunction's forward from weight codes quantized once (frozen_weight_codes), no autograd."""
        if self._frozen_codes is None:
            self._frozen_codes = weight_codes(self.weight, self.delta, self.lora_A, self.lora_B, self.scaling,
                                              self.delta_scale)
        x_codes, x_scale = int8_codes(x.reshape(-1, x.shape[-1]))
        y = code_linear(x_codes, x_scale, *self._frozen_codes, self.bias, self.kernel, x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def fake_quant_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain-autograd fake quantization (used for the λ warmup); saves float activations."""
        w = q3(self.effective_weight(), self.quant_lambda).to(x.dtype)
        return F.linear(q8(x, self.quant_lambda), w, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, lora_rank={self.lora_rank}, "
            f"scaling={self.scaling:g}, delta={self.delta is not None}"
            f"{' (int8)' if self.delta_scale is not None else ''}, subln={self.sub_norm is not None}, "
            f"backward={self.backward_mode}, kernel={self.kernel.value}"
        )


@contextlib.contextmanager
def frozen_weight_codes(model: nn.Module) -> Iterator[None]:
    """Inside, every student-mode BitLinear of `model` quantizes W + ΔW + s·B·A once, at its first forward, and reuses
    the codes (1 byte per weight, dropped on exit); no autograd. For generation: a forward per new token would
    otherwise recompute the effective weight, r times the token's own product, every time. The weights must not
    change inside, and must stay whole (ZeRO-3: gathered for the whole block, not layer by layer)."""
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    for layer in layers:
        layer.codes_frozen = True
    try:
        yield
    finally:
        for layer in layers:
            layer.codes_frozen, layer._frozen_codes = False, None
