"""Test harness for the launch tests: Debian packages, a one-node Slurm cluster on localhost, OpenMPI.

The shell scripts beside this file do the work (so a developer can run them by hand); these wrappers turn their
failures into a SetupError carrying the script's output, which the tests let fail loudly (never skip).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


class SetupError(RuntimeError):
    """The machine could not be prepared (package install, daemons, mpirun)."""


def _script(name: str, *args: str, timeout: float = 900) -> str:
    cmd = [str(HERE / name), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SetupError(f"{name} did not finish within {timeout:.0f} s: {exc.stderr!s:.2000}") from None
    if done.returncode != 0:
        raise SetupError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout.strip()


def ensure_openmpi() -> str:
    """Path of a working mpirun (installs openmpi-bin + libopenmpi-dev if missing)."""
    return _script("check_openmpi.sh").splitlines()[-1]


def slurm_env() -> dict[str, str]:
    """os.environ plus SLURM_CONF of the test cluster, started (or reused) by slurm_up.sh."""
    conf = _script("slurm_up.sh").splitlines()[-1]
    return {**os.environ, "SLURM_CONF": conf}


def sbatch(script: Path, args: list[str], *, options: list[str], env: dict[str, str], cwd: Path) -> int:
    """Submit ``script`` with sbatch ``options`` and script ``args``; returns the job id."""
    done = subprocess.run(["sbatch", "--parsable", *options, str(script), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60, check=False)
    if done.returncode != 0:
        raise SetupError(f"sbatch {script.name} failed (exit {done.returncode}): {done.stderr.strip()}")
    return int(done.stdout.strip().split(";")[0])


def job_fields(job_id: int, env: dict[str, str]) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, ExitCode, ...); finished jobs stay visible for MinJobAge."""
    done = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, env=env,
                          timeout=30, check=False)
    if done.returncode != 0:
        raise SetupError(f"scontrol show job {job_id}: {done.stderr.strip()}")
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def wait_job(job_id: int, env: dict[str, str], timeout: float) -> dict[str, str]:
    """Poll until the job reaches a terminal state; cancel it and raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job_id, env)
        if fields.get("JobState") in TERMINAL_STATES:
            return fields
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job_id)], env=env, timeout=30, check=False)
            raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout:.0f} s "
                               f"(reason {fields.get('Reason')}); cancelled")
        time.sleep(0.5)
