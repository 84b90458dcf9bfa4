"""Which GEMM computes BitLinear's integer products, chosen by the hardware.

The products Q8(x)·Q3(W)ᵀ and Q8(g)·Q3(W) are sums of small integers, so any kernel that adds them exactly gives the
same result: int8 `torch._int_mm` (int32 accumulators) where the device has int8 units (AMX or VNNI CPUs, CUDA tensor
cores); otherwise a float32 GEMM on the codes, exact while every partial sum stays below 2**24 (K * 128 < 2**24,
K < 1024 for an int8 x int8 product, K < 131072 for int8 x ternary) and within float32 rounding beyond; or a bf16
GEMM (codes are exact in bf16; float32 output on CUDA where torch has it (>= 2.8, probed), otherwise rounded to bf16,
as on a CPU: there only an explicit choice takes it). The choice is a speed choice made once per process and device:
capability flags say which kernels have units, a short measurement says which is fastest, and `auto` never picks one
that measured slower than float32. Nothing here knows about DeepSpeed.
"""

from __future__ import annotations

import enum
import functools
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megadistil.utils import torch_dtype


class Kernel(enum.StrEnum):
    """bitnet.kernel: the GEMM that computes the integer products (auto: the fastest measured on the device)."""

    auto = "auto"
    int8 = "int8"
    fp32 = "fp32"
    bf16 = "bf16"


# How much faster than float32 a kernel must measure for `auto` to take it: a near tie keeps float32, so that timing
# noise never selects a kernel that is slower in the run.
AUTO_MARGIN = 1.10
# model.dtype=auto takes bf16 only where bf16 GEMMs beat float32 by this much: bf16 also costs conversions and
# elementwise passes that float32 does not, so a small GEMM win does not make a step faster.
BF16_DTYPE_MARGIN = 1.5
# M, K, N of the measurement: milliseconds on any unit that counts (a GPU needs a larger one to leave launch overhead).
PROBE_SHAPES = {"cpu": (256, 1024, 1024), "cuda": (4096, 4096, 4096)}


def code_matmul(a: torch.Tensor, b: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """a [M, K] int8 codes @ b [K, N] int8 codes -> float32 [M, N] integer sums, on `kernel`."""
    return code_product(a, b, kernel).float()


def code_product(a: torch.Tensor, b: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """code_matmul's product as the kernel returns it (int32 from int8; float32 or bf16), for a fused epilogue.

    int8 is exact for any K; fp32 is exact while K * max|a| * max|b| < 2**24; bf16 rounds the output to bf16 where
    the backend has no float32-output bf16 GEMM (CPU; CUDA under torch < 2.8), which `auto` therefore never picks
    (Hardware.bf16_exact).
    `torch._int_mm` refuses some shapes on CUDA (M <= 16, K or N not a multiple of 8): those run in float32, exact
    alike. On CUDA b goes column-major (the forward's W codes transposed already are; the input gradient's are not):
    cuBLASLt's int8 GEMM takes that layout ("TN") on every GPU and CUDA version.
    """
    if kernel is Kernel.int8:
        if a.is_cuda:
            if a.shape[0] <= 16 or a.shape[1] % 8 or b.shape[1] % 8:
                return a.float() @ b.float()
            if b.stride(0) != 1:
                b = b.t().contiguous().t()
        try:
            return torch._int_mm(a, b)
        except RuntimeError:
            return a.float() @ b.float()
    if kernel is Kernel.fp32:
        return a.float() @ b.float()
    if kernel is Kernel.bf16:
        if a.is_cuda:
            try:  # float32 accumulate *and* output (torch >= 2.8 on CUDA): exact like fp32 below 2**24
                return torch.mm(a.bfloat16(), b.bfloat16(), out_dtype=torch.float32)
            except (TypeError, RuntimeError):
                pass
        return a.bfloat16() @ b.bfloat16()
    raise ValueError(f"code_matmul needs a concrete kernel, got {kernel!r} (resolve 'auto' with resolve_kernel)")


@dataclass
class Hardware:
    """What a device offers, measured once per process: which kernels have units, and their GEMM speed."""

    device: str  # "cpu" or "cuda:N"
    name: str  # CPU model name (lscpu's) or the GPU's name
    capability: str  # torch's CPU capability (AVX2, AVX512...) or the CUDA compute capability
    units: list[str]  # kernels with matrix units on this device: subset of int8, bf16 (fp32 always runs)
    gflops: dict[str, float] = field(default_factory=dict)  # GEMM throughput of fp32 and each unit kernel (CPU: a core)
    # Whether the bf16 kernel's sums are exact (float32 output): probed on CUDA (_cuda_bf16_exact), never on a CPU.
    # None (a profile built by hand): by the device type, exact on CUDA.
    bf16_exact: bool | None = None

    @property
    def kernel(self) -> Kernel:
        """The fastest exact kernel measured, unless it fails to beat float32 by AUTO_MARGIN. The CPU's bf16 kernel
        rounds its output to bf16, so `auto` never takes it (`bitnet.kernel=bf16` does): every CPU with bf16 units
        also has int8 ones, ~2x faster, so only timing noise ever made it win (a probe run while another process held
        the cores: one pytest worker's every --verify failed at once, twice, the second time through a 1.5x margin).
        On CUDA it rounds too where torch lacks mm(out_dtype=float32) (torch < 2.8): `auto` takes it only where the
        probe found its sums exact."""
        exact = {k: v for k, v in self.gflops.items() if k != "bf16" or self.bf16_sums_exact}
        best = max(exact, key=exact.get)
        return Kernel(best if exact[best] >= AUTO_MARGIN * self.gflops["fp32"] else "fp32")

    @property
    def bf16_sums_exact(self) -> bool:
        return self.bf16_exact if self.bf16_exact is not None else self.device.startswith("cuda")

    @property
    def bf16_fast(self) -> bool:
        if self.device.startswith("cuda"):  # whether or not its GEMM outputs float32 sums (bf16_exact)
            return "bf16" in self.units  # tensor cores: bf16 is the GPU's native training dtype
        return "bf16" in self.units and self.gflops.get("bf16", 0.0) >= BF16_DTYPE_MARGIN * self.gflops["fp32"]

    def describe(self) -> str:
        speeds = ", ".join(f"{k} {v:.0f}" for k, v in self.gflops.items())
        per = " a core" if self.device == "cpu" else ""
        return f"{self.name} ({self.capability}; units: {', '.join(self.units) or 'none'}), GEMM GFLOP/s{per}: {speeds}"

    def as_dict(self) -> dict:
        return asdict(self) | {"kernel": self.kernel.value, "bf16_fast": self.bf16_fast}


def cpu_model_name() -> str:
    """lscpu's 'Model name' (from /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# oneDNN's ISA masks (dnnl_cpu_isa_t): oneDNN dispatches to an ISA under ONEDNN_MAX_CPU_ISA=cap iff isa & cap == isa.
ONEDNN_ISA = {"SSE41": 0x1, "AVX": 0x3, "AVX2": 0x7, "AVX2_VNNI": 0xF, "AVX2_VNNI_2": 0x1F, "AVX512_CORE": 0x27,
              "AVX512_CORE_VNNI": 0x67, "AVX512_CORE_BF16": 0xE7, "AVX10_1_512": 0x1EF, "AVX512_CORE_FP16": 0x1EF,
              "AVX10_1_512_AMX": 0xFEF, "AVX512_CORE_AMX": 0xFEF, "AVX10_1_512_AMX_FP16": 0x1FEF,
              "AVX512_CORE_AMX_FP16": 0x1FEF}
# /proc/cpuinfo flag -> (the kernel it gives units to, the oneDNN ISA that uses it)
_UNIT_FLAGS = {"amx_int8": ("int8", "AVX512_CORE_AMX"), "avx512_vnni": ("int8", "AVX512_CORE_VNNI"),
               "avx_vnni": ("int8", "AVX2_VNNI"), "amx_bf16": ("bf16", "AVX512_CORE_AMX"),
               "avx512_bf16": ("bf16", "AVX512_CORE_BF16")}


def cpu_units(flags: set[str], max_isa: str | None = None) -> list[str]:
    """int8 units: AMX-INT8, AVX512-VNNI or AVX-VNNI; bf16 units: AMX-BF16 or AVX512-BF16; each only where oneDNN,
    which runs the CPU's int8 and bf16 GEMMs, may use it: `max_isa` is ONEDNN_MAX_CPU_ISA (unset, DEFAULT or a name
    oneDNN does not know: no cap). Capped below VNNI, oneDNN's int8 GEMM saturates int16 pair sums (int8 x int8
    products come out wrong) and its bf16 GEMM runs at ~1 GFLOP/s."""
    cap = ONEDNN_ISA.get((max_isa or "").strip().upper())
    units = []
    for flag, (unit, isa) in _UNIT_FLAGS.items():
        usable = cap is None or ONEDNN_ISA[isa] & cap == ONEDNN_ISA[isa]
        if flag in flags and usable and unit not in units:
            units.append(unit)
    return units


def _cuda_units(device: torch.device) -> list[str]:
    units = []
    try:  # _int_mm needs int8 tensor-core support (sm_75+ with cuBLASLt); a probe is the honest test
        a = torch.ones(32, 32, dtype=torch.int8, device=device)
        torch._int_mm(a, a.t())  # B column-major, as code_matmul hands it on CUDA
        units.append("int8")
    except RuntimeError:
        pass
    if torch.cuda.get_device_capability(device) >= (8, 0):  # this device's (Ampere on); V100/T4 only emulate bf16
        units.append("bf16")  # units: bf16 is fast (model.dtype); whether code_product's bf16 sums are exact is apart
    return units


def _cuda_bf16_exact(device: torch.device) -> bool:
    """Whether the CUDA bf16 kernel adds its codes exactly: torch.mm(bf16, bf16, out_dtype=float32) runs (torch >= 2.8)
    and returns the float32 sum. Elsewhere code_product falls back to a bf16-output GEMM, which rounds sums above 256:
    the probe's 257 ones would come back 256."""
    try:
        a = torch.ones(16, 257, dtype=torch.bfloat16, device=device)
        out = torch.mm(a, a.t(), out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return False
    return out.dtype == torch.float32 and bool((out == 257).all())


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_gflops(kernels: list[Kernel], device: torch.device, shape: tuple[int, int, int] | None = None,
                   repeat: int = 7) -> dict[str, float]:
    """Best-of-`repeat` throughput of `code_matmul` on random codes of `shape` (M, K, N) for each kernel, warm-up
    excluded. The kernels take turns within each round, so a burst of load from another process (the other ranks
    starting, a test worker) slows every kernel alike instead of one kernel's whole measurement."""
    m, k, n = shape or PROBE_SHAPES.get(device.type, PROBE_SHAPES["cpu"])
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g).to(device)
    b = torch.randint(-1, 2, (k, n), dtype=torch.int8, generator=g).to(device)
    best = {kernel: float("inf") for kernel in kernels}
    for kernel in kernels:
        code_matmul(a, b, kernel)
    synchronize(device)
    for _ in range(repeat):
        for kernel in kernels:
            start = time.perf_counter()
            code_matmul(a, b, kernel)
            synchronize(device)
            best[kernel] = min(best[kernel], time.perf_counter() - start)
    return {kernel.value: 2 * m * k * n / seconds / 1e9 for kernel, seconds in best.items()}


@functools.cache
def _hardware(device: str) -> Hardware:
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        units = _cuda_units(dev)
        hw = Hardware(device, props.name, f"sm_{props.major}{props.minor}", units,
                      bf16_exact="bf16" in units and _cuda_bf16_exact(dev))
    else:
        max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
        hw = Hardware("cpu", cpu_model_name(), torch.backends.cpu.get_cpu_capability(),
                      cpu_units(_cpu_flags(), max_isa), bf16_exact=False)
    # Only kernels with units are measured: without them int8 runs at ~1 GFLOP/s and the probe alone would take
    # seconds, for an answer known in advance.
    # The CPU probe runs on one thread: what a kernel's units give per core is what the choice needs, and a GEMM
    # split over every core while another process holds one (the other ranks starting, a second test worker) waits
    # at each barrier for a descheduled thread, so it times scheduler slices (~17 GFLOP/s for every kernel on the
    # 2-core EPYC under a 2-thread load, where one thread read fp32 65-86, int8 300-350, bf16 160-190 through the
    # same load, as alone).
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        hw.gflops = measure_gflops([Kernel(k) for k in ("fp32", *hw.units)], dev)
    finally:
        torch.set_num_threads(threads)
    return hw


def hardware(device: torch.device | str) -> Hardware:
    """The Hardware profile of the device the work runs on, measured on first use and cached for the process. No
    default: on a GPU machine, a model that stays on the CPU must not be given the GPU's dtype."""
    dev = torch.device(device)
    key = "cpu" if dev.type == "cpu" else f"{dev.type}:{dev.index if dev.index is not None else 0}"
    return _hardware(key)


def resolve_kernel(requested: Kernel | str, hw: Hardware, key: str = "bitnet.kernel") -> Kernel:
    """`auto` -> the measured choice; an explicit kernel must have units on the device (fp32 always does)."""
    kernel = Kernel(requested)
    if kernel is Kernel.auto:
        return hw.kernel
    if kernel is not Kernel.fp32 and kernel.value not in hw.units:
        need = "int8 matrix units (AMX, AVX512-VNNI or AVX-VNNI; CUDA tensor cores)" if kernel is Kernel.int8 \
            else "bf16 matrix units (AMX-BF16 or AVX512-BF16; CUDA sm_80+)"
        raise ValueError(f"{key}={kernel.value} needs {need}, which {hw.device} ({hw.name}, {hw.capability}) lacks; "
                         "use auto or fp32")
    return kernel


def resolve_dtype(requested: str, hw: Hardware) -> torch.dtype:
    """model.dtype: auto -> bf16 where bf16 GEMMs are fast (CUDA, AMX CPUs), else float32."""
    if requested == "auto":
        return torch.bfloat16 if hw.bf16_fast else torch.float32
    return torch_dtype(requested)
