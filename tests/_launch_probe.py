"""Stand-in for launch/train.py in the launch tests: init_distributed, one all_reduce, a JSON report per rank.

Takes the arguments train.sbatch passes (--ds_config FILE --config FILE [key=value ...]) and records them.
Environment:
  PROBE_OUT        directory for rank<N>.json (required)
  PROBE_TIMEOUT_S  collective timeout given to init_distributed (default 60)
  PROBE_FAULT      "kill:<rank>" (that rank SIGKILLs itself after the first all_reduce) or "stop:<rank>" (it
                   SIGSTOPs itself: a frozen node that keeps its sockets open); the others then run a second
                   all_reduce, which must fail, and record the error in their JSON before exiting with 3.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistil.distributed import init_distributed
from megadistil.utils import write_atomic


def _write(out: Path, rank: int, report: dict) -> None:
    write_atomic(out / f"rank{rank}.json", json.dumps(report))


def _shm_comm_op_loaded() -> bool:
    from deepspeed.comm import comm  # the module whose global is the live backend

    return getattr(comm.cdb, "shm_comm_op", None) is not None


def _fault(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    kind, _, rank = spec.partition(":")
    if kind not in ("kill", "stop") or not rank.isdigit():
        raise SystemExit(f"PROBE_FAULT={spec!r}: expected kill:<rank> or stop:<rank>")
    return kind, int(rank)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ds_config")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(os.environ["PROBE_OUT"])
    fault = _fault(os.environ.get("PROBE_FAULT", ""))

    import torch
    import torch.distributed as dist

    info = init_distributed(timeout_s=float(os.environ.get("PROBE_TIMEOUT_S", "60")))
    total = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(total)
    report = {**info.__dict__, "allreduce_sum": total.item(), "torch_rank": dist.get_rank(),
              "torch_world_size": dist.get_world_size(), "backend": dist.get_backend(), "argv": vars(args),
              "hostname": socket.gethostname(), "pid": os.getpid(), "env_rank": os.environ["RANK"],
              "mpi4py": "mpi4py.MPI" in sys.modules, "shm_comm_op": _shm_comm_op_loaded()}
    _write(out, info.rank, report)
    if fault is None:
        dist.barrier()
        dist.destroy_process_group()
        return 0
    kind, victim = fault
    if info.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
        time.sleep(3600)  # a stopped process stays here until someone kills it
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        report["second_allreduce"] = "returned"
    except Exception as exc:  # noqa: BLE001 - we record whatever the backend raises
        report["second_allreduce"] = f"{type(exc).__name__}: {exc}"[:500]
    report["second_allreduce_s"] = time.monotonic() - start
    _write(out, info.rank, report)
    print(f"rank {info.rank}: second all_reduce: {report['second_allreduce']}", file=sys.stderr, flush=True)
    os._exit(3)  # a normal exit would wait on the broken process group


if __name__ == "__main__":
    sys.exit(main())
