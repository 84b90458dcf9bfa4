"""BitLinear and the engine's device boundary on CUDA: numerics against float64, and the kernel/dtype choice."""

import pytest
import torch

from megadistil.bitnet import BitLinear, Kernel, code_matmul, hardware, resolve_dtype

CUDA = torch.device("cuda")


def _layer(kernel: Kernel, dtype: torch.dtype, backward: str = "int8") -> BitLinear:
    torch.manual_seed(0)
    layer = BitLinear(512, 256, lora_rank=16, backward=backward, kernel=kernel, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        layer.lora_B.normal_(0, 0.05)
    return layer.to(CUDA, dtype)


def _float64_reference(layer: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """Q8(x) · Q3(W + s·B·A)ᵀ in float64 (the forward the straight-through estimator differentiates)."""
    h = x.double()
    sx = 127 / h.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    hq = (h * sx).round().clamp(-128, 127) / sx
    w = layer.weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    sw = 1 / w.abs().mean().clamp(min=1e-5)
    return hq @ ((w * sw).round().clamp(-1, 1) / sw).t()


@pytest.mark.parametrize("kernel", [Kernel.int8, Kernel.fp32, Kernel.bf16])
def test_code_matmul_on_cuda_is_the_integer_product(kernel):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (64, 4096), dtype=torch.int8, generator=g)
    b = torch.randint(-1, 2, (4096, 128), dtype=torch.int8, generator=g)
    got = code_matmul(a.to(CUDA), b.to(CUDA), kernel).cpu().double()
    ref = a.double() @ b.double()
    if kernel is Kernel.bf16 and not torch.equal(got, ref):  # only where torch lacks mm(out_dtype=float32)
        torch.testing.assert_close(got, ref, rtol=2**-8, atol=0)
    else:
        assert torch.equal(got, ref)


@pytest.mark.parametrize("kernel", [Kernel.int8, Kernel.fp32])
def test_bitlinear_forward_on_cuda_matches_float64(kernel):
    layer = _layer(kernel, torch.float32)
    x = torch.randn(4, 32, 512, device=CUDA)
    torch.testing.assert_close(layer(x).double(), _float64_reference(layer, x), rtol=1e-4, atol=1e-4)


def test_bitlinear_gradients_on_cuda_agree_across_kernels_to_the_bit():
    outs = []
    for kernel in (Kernel.int8, Kernel.fp32):
        layer = _layer(kernel, torch.float32)
        x = torch.randn(4, 32, 512, device=CUDA, generator=torch.Generator(CUDA).manual_seed(1), requires_grad=True)
        y = layer(x)
        y.square().sum().backward()
        outs.append((y, x.grad, layer.lora_A.grad, layer.lora_B.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_bf16_bitlinear_on_cuda_within_bf16_rounding_of_float64():
    layer = _layer(hardware(CUDA).kernel, torch.bfloat16)
    x = torch.randn(4, 32, 512, device=CUDA, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.device.type == "cuda"
    torch.testing.assert_close(y.double(), _float64_reference(layer, x), rtol=2e-2, atol=2e-2)


def test_bf16_weight_codes_on_cuda_are_the_cpus():
    """A model trained on a GPU and exported on a CPU keeps its codes: both form a bf16 s·B·A (rounded to bf16), so
    only the GEMMs' accumulation orders differ, which flips no code; float32 factors on one side would flip ~1e-4."""
    from megadistil.bitnet.linear import weight_codes

    g = torch.Generator().manual_seed(2)
    w = (torch.randn(2048, 2048, generator=g) * 0.02).bfloat16()
    a = ((torch.rand(64, 2048, generator=g) * 2 - 1) / 2048 ** 0.5).bfloat16()
    b = (torch.randn(2048, 64, generator=g) * 0.01).bfloat16()
    cpu_codes, cpu_scale = weight_codes(w, None, a, b, 1.0)
    cuda_codes, cuda_scale = weight_codes(w.to(CUDA), None, a.to(CUDA), b.to(CUDA), 1.0)
    torch.testing.assert_close(cuda_scale.cpu(), cpu_scale, rtol=1e-6, atol=0)
    assert torch.equal(cuda_codes.cpu(), cpu_codes)
    float32_codes, _ = weight_codes(w.to(CUDA), None, a.float().to(CUDA), b.float().to(CUDA), 1.0)
    assert not torch.equal(float32_codes.cpu(), cpu_codes)  # the test sees a product that is not bf16's


def test_auto_on_cuda_has_int8_units_bf16_dtype_and_never_a_kernel_slower_than_fp32():
    hw = hardware(CUDA)
    assert "int8" in hw.units and "bf16" in hw.units, hw.describe()
    assert resolve_dtype("auto", hw) == torch.bfloat16
    assert hw.gflops[hw.kernel.value] >= hw.gflops["fp32"]


def test_a_relora_reset_on_cuda_draws_the_cpus_adapter():
    """ReLoRA re-initialises A from a CPU generator seeded alike on every rank (engine/relora.py): on CUDA it is
    drawn on the CPU and copied, the same A as a CPU run's (uniform_ on a CUDA tensor refuses a CPU generator)."""
    on_cuda, on_cpu = _layer(Kernel.fp32, torch.float32), _layer(Kernel.fp32, torch.float32).cpu()
    for layer in (on_cuda, on_cpu):
        layer.reset_lora(torch.Generator().manual_seed(7))
    assert on_cuda.lora_A.device.type == "cuda" and torch.equal(on_cuda.lora_A.cpu(), on_cpu.lora_A)
    assert not on_cuda.lora_B.any()


def test_auto_attention_picks_flash_attention_only_for_a_half_precision_model():
    """flash_attention_2 runs in bf16/fp16 only (transformers' FA2 path finds no nn.Linear in a BitLinear model's
    attention to read an fp32 model's target dtype from, and fails with a bare StopIteration)."""
    from transformers import LlamaConfig

    from megadistil.models import attn_implementation

    assert attn_implementation(LlamaConfig(), "auto", CUDA, dtype=torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="runs in bf16 or fp16, the model is in torch.float32"):
        attn_implementation(LlamaConfig(), "flash_attention_2", CUDA, dtype=torch.float32)


@pytest.mark.parametrize("layout", ["forward", "input_grad"])
def test_int8_units_run_bitlinears_products_without_falling_back(layout):
    """code_matmul falls back to an exact float32 product where _int_mm refuses, so the numerics tests cannot see a
    refusal: this calls _int_mm on what code_matmul hands it for each product (B column-major)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (1024, 4096), dtype=torch.int8, generator=g).to(CUDA)
    w = torch.randint(-1, 2, (4096, 4096), dtype=torch.int8, generator=g).to(CUDA)
    b = w.t() if layout == "forward" else w.t().contiguous().t()  # [K, N] with stride (1, K)
    assert torch.equal(torch._int_mm(a, b).double(), a.double() @ b.double())  # float64: exact for these sums


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_quantizers_on_cuda_give_the_eager_outputs_and_gradients(dtype):
    """On CUDA bitnet.compile_quantizers defaults to on: the Triton-fused W_eff formation, activation quantizer and
    epilogue against the eager path, outputs and LoRA gradients (the scale may differ in its last bit: a weight at a
    rounding boundary then takes the neighbouring code, so compare to bf16/float32 rounding, not bit for bit)."""
    from megadistil.bitnet import compile_quantizers

    layer = _layer(Kernel.int8, dtype)
    x = torch.randn(64, 512, device=CUDA, dtype=dtype, requires_grad=True)

    def run():
        y = layer(x)
        return (y, *torch.autograd.grad(y.float().square().sum(), (x, layer.lora_A, layer.lora_B)))

    eager = run()
    compile_quantizers()
    try:
        compiled = run()
    finally:
        compile_quantizers(False)
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c.float(), e.float(), rtol=2e-2, atol=1e-3)


def test_auto_takes_the_bf16_kernel_only_where_its_sums_are_exact():
    """bf16 is a unit (model.dtype=auto: bf16) on any sm_80+ GPU, but code_product's bf16 GEMM sums exactly only where
    torch has mm(out_dtype=float32) (>= 2.8): the probe decides whether `auto` may take it."""
    from megadistil.bitnet import kernels

    hw = hardware(CUDA)
    if "bf16" not in hw.units:
        pytest.skip(f"{hw.name} has no bf16 units")
    assert hw.bf16_exact == kernels._cuda_bf16_exact(CUDA)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (64, 4096), dtype=torch.int8, generator=g)
    b = torch.randint(-1, 2, (4096, 128), dtype=torch.int8, generator=g)
    exact = torch.equal(code_matmul(a.to(CUDA), b.to(CUDA), Kernel.bf16).cpu().double(), a.double() @ b.double())
    assert exact == hw.bf16_exact
    if not hw.bf16_exact:
        assert hw.kernel is not Kernel.bf16


def test_two_ranks_on_one_gpu_stop_naming_the_setting(tmp_path):
    """torchrun --nproc-per-node 2 where each rank sees the one GPU: both are cuda:0, which NCCL refuses as it
    connects ("Duplicate GPU detected"); init_distributed's error says which settings to change."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "init.py"
    script.write_text("from megadistil.distributed import init_distributed\ninit_distributed(timeout_s=120)\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
           "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
                          env=env, cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "two ranks on one GPU" in proc.stderr and "Start one rank per GPU" in proc.stderr, \
        proc.stderr[-3000:]
