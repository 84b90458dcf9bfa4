"""Kernel choice: every kernel computes the integer products of the float64 reference, `auto` follows the
measurement, explicit kernels the device lacks are refused, and ranks do not oversubscribe the cores."""

import os

import pytest
import torch

from megadistil.bitnet import BitLinear, Hardware, Kernel, code_matmul, hardware, kernels, resolve_dtype, resolve_kernel
from megadistil.bitnet.kernels import cpu_units
from megadistil.config import ConfigError, load_config
from megadistil.distributed import cpu_threads, keep_freed_blocks, ranks_sharing
from megadistil.engine.device import place

CONCRETE = [Kernel.int8, Kernel.fp32, Kernel.bf16]


def _codes(m, k, n, seed=0, ternary=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    low = -1 if ternary else -128
    b = torch.randint(low, -low + (0 if not ternary else 1), (k, n), dtype=torch.int8, generator=g)
    return a, b


@pytest.mark.parametrize("kernel", CONCRETE)
def test_every_kernel_computes_the_float64_integer_product(kernel):
    a, b = _codes(37, 4096, 24)  # int8 x ternary, the BitLinear case: sums reach ~1e5, far past bf16's 256
    ref = a.double() @ b.double()
    got = code_matmul(a, b, kernel)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    if kernel is Kernel.bf16:  # CPU bf16 GEMMs round the output to bf16 (8 significant bits)
        torch.testing.assert_close(got.double(), ref, rtol=2**-8, atol=0)
        assert not torch.equal(got.double(), ref)  # and that rounding is real: why auto must measure, not assume
    else:
        assert torch.equal(got.double(), ref)  # exact: sums of 4096 int8 x ternary terms stay below 2**24


def test_float32_kernel_is_within_float32_rounding_beyond_2_pow_24():
    a, b = _codes(8, 2048, 8, ternary=False)  # int8 x int8: |sum| can reach 2048 * 128 * 128 = 2**25
    ref = a.double() @ b.double()
    torch.testing.assert_close(code_matmul(a, b, Kernel.fp32).double(), ref, rtol=2**-23 * 4, atol=2.0)
    if "int8" in hardware("cpu").units:  # int32 accumulators; oneDNN capped below VNNI saturates int16 pair sums
        assert torch.equal(code_matmul(a, b, Kernel.int8).double(), ref)


def test_auto_refuses_to_resolve_inside_the_matmul():
    a, b = _codes(4, 8, 4)
    with pytest.raises(ValueError, match="concrete kernel"):
        code_matmul(a, b, Kernel.auto)


@pytest.mark.parametrize("backward", ["int8", "bf16"])
def test_bitlinear_is_bitwise_the_same_on_int8_and_fp32_kernels(backward):
    """The products are exact integers on both, so outputs and every gradient agree to the bit."""
    results = []
    for kernel in (Kernel.int8, Kernel.fp32):
        torch.manual_seed(0)
        layer = BitLinear(256, 128, lora_rank=8, backward=backward, kernel=kernel)
        with torch.no_grad():
            layer.weight.normal_(0, 0.05)
            layer.lora_B.normal_(0, 0.05)
        x = torch.randn(3, 16, 256, requires_grad=True)
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append((y, x.grad, layer.lora_A.grad, layer.lora_B.grad))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def _hw(gflops, units=("int8", "bf16"), device="cpu"):
    return Hardware(device, "test CPU", "AVX512", list(units), dict(gflops))


@pytest.mark.parametrize("gflops, expected", [
    ({"fp32": 67.0, "int8": 1.0, "bf16": 0.8}, Kernel.fp32),  # the AVX2-only EPYC, were its int8 ever measured
    ({"fp32": 205.0, "int8": 1786.0, "bf16": 900.0}, Kernel.int8),  # an AMX Xeon
    ({"fp32": 100.0, "int8": 105.0}, Kernel.fp32),  # a near tie keeps float32
    # the CPU's bf16 kernel rounds its output to bf16: never `auto`'s, however it measured (a probe run while another
    # process holds the cores measures scheduler slices, ~17 GFLOP/s for every kernel on a 2-core EPYC)
    ({"fp32": 100.0, "int8": 50.0, "bf16": 300.0}, Kernel.fp32),
    ({"fp32": 17.0, "int8": 17.0, "bf16": 30.0}, Kernel.fp32),
    ({"fp32": 150.0, "int8": 700.0, "bf16": 1500.0}, Kernel.int8),
])
def test_auto_takes_the_fastest_measured_exact_kernel_and_never_a_slower_one_than_fp32(gflops, expected):
    hw = _hw(gflops)
    assert hw.kernel is expected
    assert resolve_kernel("auto", hw) is expected
    assert hw.gflops[hw.kernel.value] >= hw.gflops["fp32"]


def test_auto_takes_cudas_bf16_kernel_which_is_exact_there():
    assert _hw({"fp32": 50.0, "int8": 400.0, "bf16": 600.0}, device="cuda:0").kernel is Kernel.bf16
    assert _hw({"fp32": 50.0, "int8": 400.0, "bf16": 600.0}).kernel is Kernel.int8


def test_this_machines_auto_kernel_is_not_slower_than_fp32_as_measured():
    hw = hardware("cpu")
    assert "fp32" in hw.gflops and set(hw.gflops) == {"fp32", *hw.units}
    assert hw.gflops[hw.kernel.value] >= hw.gflops["fp32"]
    assert hardware("cpu") is hw  # measured once per process


def test_the_cpu_probe_times_every_kernel_on_one_thread_and_restores_the_threads(monkeypatch):
    """One thread: a GEMM split over both cores while another process holds one times scheduler slices."""
    seen = {}

    def measure(probe, device, *args):
        seen["threads"], seen["kernels"] = torch.get_num_threads(), probe
        return {k.value: 1.0 for k in probe}

    monkeypatch.setattr(kernels, "measure_gflops", measure)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        hw = kernels._hardware.__wrapped__("cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen["threads"] == 1 and seen["kernels"] == [Kernel.fp32, *map(Kernel, hw.units)]
    assert "GEMM GFLOP/s a core: fp32 1" in hw.describe()


def test_cpu_units_come_from_the_flags():
    assert cpu_units({"avx2", "fma"}) == []
    assert cpu_units({"avx512f", "avx512_vnni"}) == ["int8"]
    assert cpu_units({"amx_int8", "amx_bf16", "amx_tile"}) == ["int8", "bf16"]
    assert cpu_units({"avx512_bf16"}) == ["bf16"]


def test_cpu_units_are_those_onednns_isa_cap_lets_it_use():
    """ONEDNN_MAX_CPU_ISA caps what oneDNN, which runs the CPU's int8 and bf16 GEMMs, dispatches to."""
    amx = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16", "amx_tile"}
    assert cpu_units(amx, "avx2") == []  # an AVX2-only machine, as oneDNN sees it
    assert cpu_units(amx, "AVX2_VNNI") == ["int8"]
    assert cpu_units({"avx512f", "avx512_vnni"}, "AVX512_CORE") == []
    assert cpu_units({"avx_vnni"}, "AVX512_CORE") == []  # AVX2_VNNI is not a subset of AVX512_CORE
    assert cpu_units(amx, "AVX512_CORE_VNNI") == ["int8"]
    assert cpu_units(amx, "AVX512_CORE_BF16") == ["int8", "bf16"]
    assert cpu_units({"amx_int8", "amx_bf16"}, "AVX512_CORE_BF16") == []  # AMX alone needs the AMX ISA
    for no_cap in (None, "", "DEFAULT", "ALL"):
        assert cpu_units(amx, no_cap) == ["int8", "bf16"]


def test_an_explicit_kernel_the_device_lacks_is_refused_naming_key_and_device():
    hw = Hardware("cpu", "AMD EPYC", "AVX2", [], {"fp32": 67.0})
    for kernel in ("int8", "bf16"):
        with pytest.raises(ValueError, match=rf"bitnet.kernel={kernel} needs .*cpu \(AMD EPYC, AVX2\) lacks"):
            resolve_kernel(kernel, hw)
    assert resolve_kernel("fp32", hw) is Kernel.fp32
    assert resolve_kernel("int8", _hw({"fp32": 1.0, "int8": 2.0})) is Kernel.int8


def test_place_refuses_a_kernel_this_cpu_lacks_and_otherwise_records_the_choice():
    hw = hardware("cpu")
    missing = [k for k in ("int8", "bf16") if k not in hw.units]
    for kernel in missing:
        with pytest.raises(ValueError, match=f"bitnet.kernel={kernel}"):
            place(kernel, "auto", local_world_size=1, device=torch.device("cpu"))
    placed = place("auto", "auto", local_world_size=1, device=torch.device("cpu"))
    assert placed.kernel is hw.kernel and placed.dtype == resolve_dtype("auto", hw)
    record = placed.as_dict()
    assert record["kernel"] == hw.kernel.value and record["hardware"]["name"] == hw.name
    assert record["hardware"]["gflops"]["fp32"] > 0


def test_dtype_auto_is_bf16_only_where_bf16_gemms_are_fast():
    assert resolve_dtype("auto", _hw({"fp32": 205.0, "int8": 1786.0, "bf16": 900.0})) == torch.bfloat16
    assert resolve_dtype("auto", _hw({"fp32": 100.0, "bf16": 120.0})) == torch.float32  # not 1.5x: float32
    assert resolve_dtype("auto", _hw({"fp32": 67.0}, units=())) == torch.float32
    assert resolve_dtype("auto", _hw({"fp32": 1.0, "bf16": 1.0}, device="cuda:0")) == torch.bfloat16
    assert resolve_dtype("fp32", _hw({"fp32": 1.0, "bf16": 900.0})) == torch.float32


def test_ranks_share_the_cores_unless_omp_num_threads_is_set():
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(1, {}) == cores
    assert cpu_threads(2, {}) == max(1, cores // 2)
    assert cpu_threads(4 * cores, {}) == 1
    assert cpu_threads(2, {"OMP_NUM_THREADS": "3"}) is None  # the user's (or launcher's) choice stands


def test_ranks_bound_to_their_own_cores_do_not_divide_them():
    a, b, all4 = frozenset({0, 1}), frozenset({2, 3}), frozenset(range(4))
    bound = [("n1", a), ("n1", b), ("n2", a), ("n2", b)]  # srun --cpus-per-task=2, two tasks a node
    assert ranks_sharing(("n1", a), bound) == 1
    unbound = [("n1", all4), ("n1", all4), ("n2", all4), ("n2", all4)]  # deepspeed's launcher, one node each
    assert ranks_sharing(("n1", all4), unbound) == 2
    by_socket = [("n1", a), ("n1", b), ("n1", a), ("n1", b)]  # mpirun --bind-to socket, four ranks on two sockets
    assert ranks_sharing(("n1", b), by_socket) == 2


_HEAP_PROBE = """
import ctypes, torch
from megadistil.distributed import keep_freed_blocks
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                                                      "fordblks keepcost").split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
kept = keep_freed_blocks({})
mapped = libc.mallinfo2().hblkhd
block = torch.ones(16 << 20)  # 64 MiB of float32
mapped_while_alive = libc.mallinfo2().hblkhd - mapped
del block
print(kept, mapped_while_alive >> 20, libc.mallinfo2().fordblks >> 20)
"""


def test_malloc_keeps_freed_blocks_unless_the_environment_tunes_malloc():
    """glibc maps a block over 32 MiB on its own and unmaps it when freed, so the next one page-faults in anew; kept,
    a 64 MiB block comes from the heap and stays there, free for the next. A user's (or launcher's) malloc settings
    stand."""
    import subprocess
    import sys

    def probe(code: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()

    kept, mapped_mib, free_heap_mib = probe(_HEAP_PROBE)
    assert (kept, mapped_mib) == ("True", "0") and int(free_heap_mib) >= 64
    kept, mapped_mib, _ = probe(_HEAP_PROBE.replace("keep_freed_blocks({})", "False"))
    assert int(mapped_mib) >= 64  # glibc's default, which the probe must be able to see
    for env in ({"MALLOC_MMAP_THRESHOLD_": "65536"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}):
        assert keep_freed_blocks(env) is False


def test_config_names_a_bad_kernel(tiny_llama_dir, stdlib_text_file):
    base = [f"model.student={tiny_llama_dir}", f"data.text=[{stdlib_text_file}]"]
    assert load_config("configs/tiny.yaml", [*base, "bitnet.kernel=fp32"]).bitnet.kernel == "fp32"
    with pytest.raises(ConfigError, match=r"'bitnet.kernel': Invalid value 'fp8', expected one of \[auto, int8, fp32, bf16\]"):
        load_config("configs/tiny.yaml", [*base, "bitnet.kernel=fp8"])


def _agree_on_rank(rank: int, port: int, results, rank1_units: list[str]) -> None:
    import torch.distributed as dist

    from megadistil.engine.device import Placement, agreed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    hw = Hardware("cpu", "test CPU", "AVX512", ["int8", "bf16"] if rank == 0 else rank1_units, {"fp32": 1.0})
    # a near tie measured differently: rank 0 int8 + bf16, rank 1 fp32 + float32
    mine = Placement(torch.device("cpu"), hw, Kernel.int8 if rank == 0 else Kernel.fp32,
                     torch.bfloat16 if rank == 0 else torch.float32, 1)
    try:
        got = agreed(mine)
        results[rank] = (got.kernel.value, str(got.dtype), got.hardware.name)
    except ValueError as e:
        results[rank] = str(e)
    dist.destroy_process_group()


def test_every_rank_takes_rank_zeros_kernel_and_dtype():
    """Ranks measure their devices apart; agreed() gives every rank rank 0's choice (its own hardware record stays),
    and refuses it, naming the kernel and the rank, where that rank lacks the units."""
    import torch.multiprocessing as mp

    from megadistil.distributed import free_local_port

    results = mp.Manager().dict()
    mp.spawn(_agree_on_rank, args=(free_local_port(), results, ["int8"]), nprocs=2, join=True)
    assert dict(results) == {0: ("int8", "torch.bfloat16", "test CPU"), 1: ("int8", "torch.bfloat16", "test CPU")}
    mp.spawn(_agree_on_rank, args=(free_local_port(), results, []), nprocs=2, join=True)
    assert results[1] == ("rank 0 chose the int8 kernel, which rank 1's cpu (test CPU, AVX512) lacks; set "
                          "bitnet.kernel=fp32 on a mixed cluster")


def _threads_on_rank(rank: int, port: int, results, hosts: list[str]) -> None:
    import socket

    import torch.distributed as dist

    from megadistil.distributed import set_up_cpu_rank

    os.environ.pop("OMP_NUM_THREADS", None)
    socket.gethostname = lambda: hosts[rank]  # this process only: the rank "runs" on hosts[rank]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    set_up_cpu_rank(local_world_size=2)  # what a launcher without LOCAL_WORLD_SIZE reports: the world size
    results[rank] = torch.get_num_threads()
    dist.destroy_process_group()


def test_ranks_count_who_shares_their_cores_over_the_process_group():
    """The threads follow the ranks found on the same host and cores, not the launcher's local world size: two
    ranks of one node split its cores, one rank a node keeps them all."""
    import torch.multiprocessing as mp

    from megadistil.distributed import free_local_port

    cores = len(os.sched_getaffinity(0))
    results = mp.Manager().dict()
    mp.spawn(_threads_on_rank, args=(free_local_port(), results, ["n1", "n1"]), nprocs=2, join=True)
    assert dict(results) == {0: max(1, cores // 2), 1: max(1, cores // 2)}
    mp.spawn(_threads_on_rank, args=(free_local_port(), results, ["n1", "n2"]), nprocs=2, join=True)
    assert dict(results) == {0: cores, 1: cores}


def test_a_resumed_run_keeps_the_kernel_and_dtype_its_checkpoint_was_trained_with():
    """A new measurement under other load may pick otherwise (a near tie): `auto` takes the checkpoint's choice, whose
    optimizer files DeepSpeed names by dtype; an explicit dtype that differs is refused naming the key; a recorded
    kernel this device lacks leaves `auto`'s own choice."""
    from megadistil.engine.device import Placement, as_resumed

    hw = Hardware("cpu", "test CPU", "AVX512", ["int8"], {"fp32": 1.0})
    now = Placement(torch.device("cpu"), hw, Kernel.fp32, torch.float32, 1)  # what this start measured
    recorded = {"kernel": "int8", "dtype": "bfloat16"}
    got = as_resumed(now, recorded, kernel="auto", dtype="auto")
    assert (got.kernel, got.dtype) == (Kernel.int8, torch.bfloat16)
    assert as_resumed(now, None, kernel="auto", dtype="auto") == now  # a fresh run, or a checkpoint from before
    assert as_resumed(now, recorded, kernel="fp32", dtype="auto").kernel is Kernel.fp32  # explicit: honoured
    assert as_resumed(now, {"kernel": "bf16", "dtype": "float32"}, kernel="auto", dtype="auto").kernel is Kernel.fp32
    with pytest.raises(ValueError, match=r"fp32 \(model.dtype\), but the checkpoint to resume was trained in "
                                         r"bfloat16; a resumed run keeps its dtype: set model.dtype=auto or bfloat16"):
        as_resumed(now, recorded, kernel="auto", dtype="fp32")


def _cuda_hardware(monkeypatch, bf16_exact: bool) -> Hardware:
    """A CUDA profile as _hardware builds it, with the probes stubbed (no GPU here)."""
    from types import SimpleNamespace

    monkeypatch.setattr(kernels, "_cuda_units", lambda device: ["int8", "bf16"])
    monkeypatch.setattr(kernels, "_cuda_bf16_exact", lambda device: bf16_exact)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(name="GPU", major=9,
                                                                                            minor=0))
    monkeypatch.setattr(kernels, "measure_gflops",
                        lambda probe, device, *args: {"fp32": 50.0, "int8": 400.0, "bf16": 600.0})
    return kernels._hardware.__wrapped__("cuda:0")


@pytest.mark.parametrize("exact, expected", [(True, Kernel.bf16), (False, Kernel.int8)])
def test_auto_takes_cudas_bf16_kernel_only_where_the_probe_found_float32_output(monkeypatch, exact, expected):
    """Under torch 2.6-2.7 (pyproject allows them) CUDA has no mm(out_dtype=float32): code_product's bf16 kernel falls
    back to a bf16-output GEMM that rounds integer sums above 256, yet `auto` took it as exact. bf16 stays a unit
    (model.dtype=auto is still bf16 there, and bitnet.kernel=bf16 may still be asked for)."""
    hw = _cuda_hardware(monkeypatch, exact)
    assert hw.bf16_exact is exact and hw.kernel is expected and resolve_kernel("auto", hw) is expected
    assert "bf16" in hw.units and hw.bf16_fast and resolve_dtype("auto", hw) == torch.bfloat16
    assert resolve_kernel("bf16", hw) is Kernel.bf16
    assert hw.as_dict()["bf16_exact"] is exact
    assert hardware("cpu").bf16_exact is False  # the CPU's bf16 GEMM rounds its output


def test_the_bf16_exactness_probe_needs_a_float32_sum_of_257_ones(monkeypatch):
    """The probe itself, on the CPU with torch.mm stubbed as each torch behaves: 2.6-2.7 have no out_dtype (TypeError),
    a backend may refuse it (RuntimeError) or return bf16 (257 rounds to 256); >= 2.8 on CUDA returns float32 sums."""
    mm = torch.mm

    def no_out_dtype(a, b):
        return mm(a, b)

    def refusing(a, b, out_dtype=None):
        raise RuntimeError("out_dtype unsupported")

    def bf16_out(a, b, out_dtype=None):
        return mm(a, b)

    def float32_out(a, b, out_dtype=None):
        return mm(a.float(), b.float()).to(out_dtype)

    for stub, expected in ((no_out_dtype, False), (refusing, False), (bf16_out, False), (float32_out, True)):
        monkeypatch.setattr(torch, "mm", stub)
        assert kernels._cuda_bf16_exact(torch.device("cpu")) is expected, stub.__name__
