"""Process-group set-up from whatever launched us: torchrun/deepspeed, SLURM's srun, OpenMPI's mpirun, or nothing;
and each rank's share of its node's cores. The trainer and the teacher precompute both start ranks this way, so it
lives outside engine/ and data/.

DeepSpeed reads only RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (its own MPI discovery uses an unbounded
default timeout and a fixed port), so megadistil derives these itself, exports them, and then initialises the
process group with a bounded collective timeout: a dead or frozen rank makes the others fail instead of hanging.

Discovery order (first match wins):

1. launcher env (torchrun, ``deepspeed``): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
2. OpenMPI (``mpirun``): OMPI_COMM_WORLD_*; master address and port broadcast from rank 0 with mpi4py when it is
   importable, else MASTER_ADDR/MASTER_PORT from the env (``mpirun -x``) or localhost when all ranks share a node;
3. SLURM (an ``srun`` step): SLURM_PROCID, SLURM_STEP_NUM_TASKS/SLURM_NTASKS, SLURM_LOCALID, tasks per node,
   master = first host of the step's nodelist, port derived from SLURM_JOB_ID unless MASTER_PORT is set;
4. a single process on a free local port.

OpenMPI is checked before SLURM because ``mpirun`` inside an allocation inherits the SLURM_* variables of the
step that started its daemons, which describe the daemons, not the ranks. MPICH's and Intel MPI's ``mpirun`` (Hydra)
is not read: its ranks inherit the SLURM_* of the one proxy a node it started with srun, so a PMI_RANK, PMIX_RANK or
PMI_SIZE that disagrees with the layout found (3 or 4) is refused rather than every rank of a node taken for rank 0.

The parsing helpers are pure functions of an env mapping so that they are tested without starting processes.
``python -m megadistil.distributed CMD ...`` exports the discovered variables and execs CMD, for entry
points that read RANK/WORLD_SIZE themselves.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

DERIVED_PORT_BASE = 20000  # below Linux's ephemeral range (32768+), so a derived port rarely collides
DERIVED_PORT_SPAN = 10000
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "deepspeed", "env", "openmpi", "slurm" or "single"

    def env(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous (and DeepSpeed) read."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


class DistEnvError(ValueError):
    """The launcher's environment is missing a variable or contradicts itself."""


# ---------------------------------------------------------------- pure parsing helpers


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise DistEnvError(f"{name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistEnvError(f"{name}={raw!r} is not an integer") from None


def _split_top_level(text: str, where: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistEnvError(f"{where}: unbalanced ']' in {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise DistEnvError(f"{where}: unbalanced '[' in {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range_set(body: str, nodelist: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept from the lower bound, as Slurm does)."""
    out: list[str] = []
    for item in body.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise DistEnvError(f"nodelist {nodelist!r}: bad range {item!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise DistEnvError(f"nodelist {nodelist!r}: range {item!r} runs backwards")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm hostlist expression -> host names: 'node[01-03,07],gpu5' -> node01 node02 node03 node07 gpu5.

    Several bracket groups in one name expand as a product ('r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2). This is the
    fallback for machines without ``scontrol``; see :func:`slurm_hostnames`.
    """
    if not nodelist.strip():
        raise DistEnvError("nodelist is empty")
    hosts: list[str] = []
    for expr in _split_top_level(nodelist.strip(), "nodelist"):
        names = [""]
        for literal, body in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", expr):
            if literal == "" and body == "":
                continue
            suffixes = _expand_range_set(body, nodelist) if body else [""]
            names = [n + literal + s for n in names for s in suffixes]
        if names == [""]:
            raise DistEnvError(f"nodelist {nodelist!r}: empty host name")
        hosts.extend(names)
    return hosts


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE syntax -> tasks on each node: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise DistEnvError(f"tasks-per-node {spec!r}: cannot parse {item!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def derived_port(job_id: int, step_id: int = 0) -> int:
    """A port every task of one job step computes alike, different for concurrent jobs (up to 10000 apart) and for
    the steps of one job (an srun of precompute beside one of training)."""
    return DERIVED_PORT_BASE + (job_id + 101 * step_id) % DERIVED_PORT_SPAN


def _check(info: DistInfo) -> DistInfo:
    where = f"[{info.launcher}]"
    if info.world_size < 1:
        raise DistEnvError(f"{where} world size {info.world_size} must be >= 1")
    if not 0 <= info.rank < info.world_size:
        raise DistEnvError(f"{where} rank {info.rank} is outside [0, world size {info.world_size})")
    if not 1 <= info.local_world_size <= info.world_size:
        raise DistEnvError(f"{where} local world size {info.local_world_size} is outside [1, {info.world_size}]")
    if not 0 <= info.local_rank < info.local_world_size:
        raise DistEnvError(f"{where} local rank {info.local_rank} is outside [0, local world size "
                           f"{info.local_world_size})")
    if not 0 < info.master_port < 65536:
        raise DistEnvError(f"{where} master port {info.master_port} is not a TCP port")
    if not info.master_addr:
        raise DistEnvError(f"{where} master address is empty")
    return info


def from_launcher_env(env: Mapping[str, str]) -> DistInfo | None:
    """torchrun / deepspeed launcher / a user who exported the five variables."""
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    missing = [v for v in LAUNCHER_VARS if not env.get(v)]
    if missing:
        raise DistEnvError(f"RANK/WORLD_SIZE are set but {', '.join(missing)} not: a launcher must set all of "
                           f"{', '.join(LAUNCHER_VARS)}")
    world = _int(env, "WORLD_SIZE")
    # torchrun exports LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", world))
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed" if "LOCAL_SIZE" in env else "env"
    return _check(DistInfo(rank=_int(env, "RANK"), world_size=world, local_rank=_int(env, "LOCAL_RANK"),
                           local_world_size=local_world, master_addr=env["MASTER_ADDR"],
                           master_port=_int(env, "MASTER_PORT"), launcher=launcher))


def from_openmpi_env(env: Mapping[str, str], rank0_endpoint: tuple[str, int] | None = None) -> DistInfo | None:
    """mpirun's OMPI_COMM_WORLD_*; ``rank0_endpoint`` is rank 0's (address, port) when mpi4py broadcast it."""
    if "OMPI_COMM_WORLD_RANK" not in env:
        return None
    world = _int(env, "OMPI_COMM_WORLD_SIZE")
    local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1 if world == 1 else None)
    if rank0_endpoint is not None:
        addr, port = rank0_endpoint
    else:
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if local_world == world else "")
        if not addr:
            raise DistEnvError("mpirun across several nodes without mpi4py: install mpi4py (pip install "
                               "'megadistil[mpi]') or pass the master address with `mpirun -x MASTER_ADDR=<host>`")
        port = _int(env, "MASTER_PORT", derived_port(_int(env, "OMPI_MCA_ess_base_jobid", 0)))
    return _check(DistInfo(rank=_int(env, "OMPI_COMM_WORLD_RANK"), world_size=world,
                           local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0), local_world_size=local_world,
                           master_addr=addr, master_port=port, launcher="openmpi"))


def _slurm_local_world(env: Mapping[str, str], ntasks: int, n_hosts: int) -> int:
    spec_var = next((v for v in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
                     if env.get(v)), None)
    if spec_var is None:
        if n_hosts != 1:
            raise DistEnvError("SLURM: no SLURM_STEP_TASKS_PER_NODE/SLURM_TASKS_PER_NODE/SLURM_NTASKS_PER_NODE")
        return ntasks
    per_node = parse_tasks_per_node(env[spec_var])
    if spec_var == "SLURM_NTASKS_PER_NODE" and len(per_node) == 1:
        per_node *= n_hosts  # a single number applies to every node
    if len(per_node) != n_hosts:
        raise DistEnvError(f"SLURM: {spec_var}={env[spec_var]!r} describes {len(per_node)} nodes but the nodelist "
                           f"has {n_hosts}")
    if sum(per_node) != ntasks:
        raise DistEnvError(f"SLURM: {spec_var}={env[spec_var]!r} adds up to {sum(per_node)} tasks, the step has "
                           f"{ntasks}")
    node = _int(env, "SLURM_NODEID", 0)
    if not 0 <= node < n_hosts:
        raise DistEnvError(f"SLURM: SLURM_NODEID={node} is outside the {n_hosts} nodes of the step")
    return per_node[node]


def _refuse_other_mpi(env: Mapping[str, str], rank: int, world: int, source: str) -> None:
    """Refuse a rank whose MPI launcher's variables (PMI_RANK/PMI_SIZE: MPICH, Intel MPI, srun --mpi=pmi2; PMIX_RANK:
    PMIx, which exports no size) disagree with the layout ``source`` gave: rank ``rank`` of ``world``. Hydra's srun'd
    proxies pass their own SLURM_PROCID and task count to every rank they start."""
    clash = [f"{var}={env[var]}" for var in ("PMI_RANK", "PMIX_RANK") if env.get(var) and _int(env, var) != rank]
    if env.get("PMI_SIZE") and _int(env, "PMI_SIZE") != world:
        clash.append(f"PMI_SIZE={env['PMI_SIZE']}")
    if clash:
        raise DistEnvError(f"MPI launcher variables ({', '.join(clash)}) contradict {source} (rank {rank} of {world}): "
                           "megadistil does not read the ranks of MPICH's or Intel MPI's mpirun (Hydra), whose ranks "
                           "inside a SLURM allocation inherit the SLURM_* of its one proxy a node; launch with "
                           "srun (one task per rank, e.g. `srun --ntasks-per-node=<GPUs> python ...`) or the deepspeed "
                           "launcher")


def from_slurm_env(env: Mapping[str, str],
                   hostnames: Callable[[str], list[str]] = expand_nodelist) -> DistInfo | None:
    """An srun task. A batch script or salloc shell with several tasks is refused: its tasks were never started."""
    if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env:
        return None
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEP_NUM_TASKS" in env
    ntasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    ntasks = _int(env, ntasks_var, 1)
    if not in_step:
        if ntasks > 1:
            raise DistEnvError(f"SLURM job {env['SLURM_JOB_ID']} has SLURM_NTASKS={ntasks} but this process is not "
                               f"in an srun step: start the tasks with `srun python ...` (see launch/slurm/)")
        return None
    _refuse_other_mpi(env, _int(env, "SLURM_PROCID"), ntasks, f"SLURM_PROCID/{ntasks_var}")
    nodelist_var = "SLURM_STEP_NODELIST" if env.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    if not env.get(nodelist_var):
        raise DistEnvError("SLURM: neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
    hosts = hostnames(env[nodelist_var])
    step = env.get("SLURM_STEP_ID", "0")
    port = _int(env, "MASTER_PORT", derived_port(_int(env, "SLURM_JOB_ID"), int(step) if step.isdigit() else 0))
    return _check(DistInfo(rank=_int(env, "SLURM_PROCID"), world_size=ntasks, local_rank=_int(env, "SLURM_LOCALID"),
                           local_world_size=_slurm_local_world(env, ntasks, len(hosts)),
                           master_addr=env.get("MASTER_ADDR") or hosts[0],
                           master_port=port, launcher="slurm"))


def discover(env: Mapping[str, str], *, hostnames: Callable[[str], list[str]] = expand_nodelist,
             rank0_endpoint: Callable[[], tuple[str, int] | None] = lambda: None,
             free_port: Callable[[], int] | None = None) -> DistInfo:
    """Rank layout of this process from ``env`` (see the module doc for the order)."""
    for found in (lambda: _one_world(from_launcher_env(env), env),
                  lambda: from_openmpi_env(env, rank0_endpoint() if "OMPI_COMM_WORLD_RANK" in env else None),
                  lambda: from_slurm_env(env, hostnames)):
        info = found()
        if info is not None:
            return info
    _refuse_other_mpi(env, 0, 1, "a single process (no launcher, OpenMPI or srun variables)")
    port = _int(env, "MASTER_PORT", free_port() if free_port else 29500)
    return _check(DistInfo(0, 1, 0, 1, env.get("MASTER_ADDR") or "127.0.0.1", port, "single"))


def _one_world(info: DistInfo | None, env: Mapping[str, str]) -> DistInfo | None:
    """A launcher's one-node world inside an srun step that spans nodes (`srun -N2 deepspeed ...`) would be one
    world per node, each training alone into the same output_dir: refused."""
    nodes = _int(env, "SLURM_STEP_NUM_NODES", 1)
    if info is not None and nodes > 1 and info.world_size == info.local_world_size:
        raise DistEnvError(f"[{info.launcher}] a world of {info.world_size} rank(s) on one node, started on each of "
                           f"the {nodes} nodes of an srun step: every node would train alone. Let srun start the "
                           "ranks (launch/slurm/train.sbatch), or give the launcher every node (a hostfile, "
                           "torchrun --nnodes)")
    return info


def rank_layout(env: Mapping[str, str]) -> DistInfo:
    """This process's ranks (world, rank, local rank and size) before any process group: its master address and port
    are placeholders, since mpirun across nodes learns rank 0's only through mpi4py, which init_distributed runs."""
    return discover(env, rank0_endpoint=lambda: ("rank0", 1), free_port=lambda: 1)


def device_local_rank(info: DistInfo, visible_gpus: int) -> int:
    """This rank's CUDA device index, which DeepSpeed reads from LOCAL_RANK (the engine and zero.Init set their device
    from it): the local rank, or, where a rank sees fewer GPUs than that (srun --gpus-per-task=1, --gpu-bind=closest,
    a per-rank CUDA_VISIBLE_DEVICES), the local rank modulo what it sees. Whether two ranks then share a GPU only the
    GPUs' identities tell, which NCCL checks as it connects (explained_init_error)."""
    if visible_gpus < 1:
        raise DistEnvError(f"[{info.launcher}] local rank {info.local_rank} sees no GPU, and DeepSpeed's accelerator "
                           "is CUDA: check CUDA_VISIBLE_DEVICES and the job's GPU request, or set DS_ACCELERATOR=cpu")
    if info.local_rank < visible_gpus:
        return info.local_rank
    if info.launcher == "openmpi":  # DeepSpeed asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK
        raise DistEnvError(f"local rank {info.local_rank} sees {visible_gpus} GPU(s): under mpirun DeepSpeed takes the "
                           "local rank as the GPU index, so let every rank see all of its node's GPUs")
    return info.local_rank % visible_gpus


def explained_init_error(exc: BaseException, launcher: str) -> BaseException:
    """NCCL's refusal of two ranks on one GPU ("Duplicate GPU detected", at the process group's start where DeepSpeed
    binds the device, else at the first collective) names no setting: the same error with the ones to change. Any
    other error is returned as it is."""
    if "Duplicate GPU" not in str(exc):
        return exc
    nccl = next((line.strip() for line in str(exc).splitlines() if "Duplicate GPU" in line), "")
    return DistEnvError(f"[{launcher}] two ranks on one GPU ({nccl}): more ranks on the node than GPUs they see. "
                        "Start one rank per GPU (srun --ntasks-per-node, deepspeed --num_gpus, torchrun "
                        "--nproc-per-node: the node's GPU count), or give each rank its own GPU (srun "
                        "--gpus-per-task=1)")


# ---------------------------------------------------------------- side effects: processes, sockets, mpi4py


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand with ``scontrol show hostnames`` (Slurm's own parser) when it is installed, else in Python."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False,
                             timeout=30)
        hosts = out.stdout.split()
        if out.returncode == 0 and hosts:
            return hosts
    return expand_nodelist(nodelist)


def free_local_port() -> int:
    """A TCP port free now for a rendezvous on this host, below the kernel's ephemeral range: a port the kernel
    handed out (bind to 0) is free only until it hands it again as the source port of an outgoing connection (gloo's
    pairs between the ranks of another job), and the rendezvous then fails with EADDRINUSE."""
    low = _first_ephemeral_port()
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        if 29500 <= port < 29700:  # torch's and DeepSpeed's default, and the fixed ports of other launches
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every try taken: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_ephemeral_port() -> int:
    """Where the kernel's range for outgoing connections' source ports starts (Linux; elsewhere IANA's 49152)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def cpu_threads(sharing: int, environ: Mapping[str, str] | None = None) -> int | None:
    """Intra-op threads for a rank whose allowed cores `sharing` ranks (itself included) run on: cores / sharing,
    unless the user (or a launcher such as torchrun or deepspeed --bind_cores_to_rank) set OMP_NUM_THREADS. None:
    leave torch's."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, len(allowed_cores()) // max(1, sharing))


def allowed_cores() -> frozenset[int]:
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def ranks_sharing(mine: tuple[str, frozenset[int]], every: Sequence[tuple[str, frozenset[int]]]) -> int:
    """How many of the ranks' (host, allowed cores) run on this rank's cores: those on its host whose cores
    intersect its own. Ranks a launcher bound to cores of their own (srun --cpus-per-task, mpirun --bind-to core)
    count 1 each; unbound ranks of a node count all of them."""
    host, cores = mine
    return sum(1 for h, c in every if h == host and c & cores)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
KEPT_BLOCK_BYTES = 1 << 30
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has a mallopt that does nothing)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_blocks(environ: Mapping[str, str] | None = None) -> bool:
    """Make glibc keep freed blocks of up to 1 GiB for reuse instead of unmapping them; True where it now does.
    Left alone where the environment tunes malloc (MALLOC_*_ variables, glibc.malloc tunables, an LD_PRELOADed
    jemalloc/tcmalloc/mimalloc) or the C library is not glibc.

    Why: glibc serves a block over 32 MiB with a fresh mmap and unmaps it when freed, so every ZeRO-3 gather of a
    layer page-faults in anew at each forward and recompute. The price is memory: the
    heap keeps what fragmentation leaves free. bench/distill_step.py on the Intel Xeon VM (394M params, 2 ranks):
    shared-teacher step ~14 s at ~4.7 GB a rank kept, ~17 s at ~1.9 GB with MALLOC_MMAP_THRESHOLD_=65536
    (its --malloc lean), which a user short of memory sets."""
    environ = os.environ if environ is None else environ
    if any(environ.get(k) for k in MALLOC_ENV) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", "") \
            or "malloc" in environ.get("LD_PRELOAD", ""):
        return False
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_TRIM_THRESHOLD, KEPT_BLOCK_BYTES)) \
        and bool(libc.mallopt(M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES))


def return_freed_heap() -> None:
    """glibc's malloc_trim: hand the heap's free pages back to the kernel (a no-op elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def set_up_cpu_rank(local_world_size: int) -> bool:
    """A CPU rank's process settings, for every entry point that starts one: its share of the node's cores
    (set_rank_threads) and malloc keeping freed blocks (keep_freed_blocks, whose result this returns)."""
    set_rank_threads(local_world_size)
    return keep_freed_blocks()


def set_rank_threads(local_world_size: int) -> int | None:
    """Set this rank's intra-op threads to its share of the node's cores (cpu_threads); the count set, or None where
    OMP_NUM_THREADS decides. With a process group, the ranks sharing its cores are counted from every rank's host and
    affinity (a collective: every rank calls this); without one, the launcher's local world size stands for them."""
    import torch
    import torch.distributed as dist

    sharing = local_world_size
    if dist.is_initialized() and dist.get_world_size() > 1:
        mine = (socket.gethostname(), allowed_cores())
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        sharing = ranks_sharing(mine, every)
    threads = cpu_threads(sharing)
    if threads is not None:
        torch.set_num_threads(threads)
    return threads


def mpi_rank0_endpoint() -> tuple[str, int] | None:
    """Rank 0's (address, port) broadcast over MPI; None when mpi4py is not importable."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    endpoint = None
    if comm.Get_rank() == 0:
        single_node = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "0")) == comm.Get_size()
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if single_node else socket.gethostname())
        port = int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else free_local_port()
        endpoint = (addr, port)
    return comm.bcast(endpoint, root=0)


def export_env(info: DistInfo, environ: dict[str, str] | None = None) -> None:
    (os.environ if environ is None else environ).update(info.env())


def _skip_shm_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce at process-group start (g++ and ninja, ~70 s on
    a fresh 2-core machine) that only tensor-parallel inference calls (inference_all_reduce); training's collectives
    go through the process group either way. Marking the op incompatible in the dict DeepSpeed probed (and keeps)
    skips the build."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


# torch 2.13 deprecates the two collectives ZeRO-3 gathers and reduces with (DeepSpeed <= 0.19 calls them): the notice,
# printed by every rank at its first gather and reduce, is for DeepSpeed's maintainers, not for whoever reads a run's log.
DEEPSPEED_COLLECTIVE_DEPRECATION = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


def accelerator_is_cuda() -> bool:
    """Whether DeepSpeed's accelerator, the device every rank computes on, is CUDA: not on a GPU node run with
    DS_ACCELERATOR=cpu, whose ranks then compute on the CPU and communicate over gloo."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cuda"


def init_distributed(backend: str | None = None, timeout_s: float = 600) -> DistInfo:
    """Discover the rank layout, export it, and start DeepSpeed's process group with a bounded timeout."""
    import deepspeed
    import torch

    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    info = discover(os.environ, hostnames=slurm_hostnames, rank0_endpoint=mpi_rank0_endpoint,
                    free_port=free_local_port)
    export_env(info)
    cuda = accelerator_is_cuda()
    if cuda:
        device = device_local_rank(info, torch.cuda.device_count())
        os.environ["LOCAL_RANK"] = str(device)
        torch.cuda.set_device(device)
    _skip_shm_comm_op()
    warnings.filterwarnings("ignore", DEEPSPEED_COLLECTIVE_DEPRECATION, FutureWarning)
    try:
        deepspeed.init_distributed(dist_backend=backend or ("nccl" if cuda else "gloo"),
                                   timeout=timedelta(seconds=timeout_s), auto_mpi_discovery=False,
                                   verbose=info.rank == 0)
    except Exception as exc:
        explained = explained_init_error(exc, info.launcher)
        if explained is exc:
            raise
        raise explained from exc
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m megadistil.distributed CMD ...``: export the discovered layout, then exec CMD."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:  # no mpi4py here: MPI must not be initialised in a process that is about to exec
        info = discover(os.environ, hostnames=slurm_hostnames, free_port=free_local_port)
    except DistEnvError as exc:
        print(f"megadistil.distributed: error: {exc}", file=sys.stderr)
        return 2
    export_env(info)
    if info.rank == 0:
        print(f"megadistil.distributed: {asdict(info)}", file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
