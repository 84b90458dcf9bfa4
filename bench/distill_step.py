"""One distillation step, three ways, same model / batch / machine (2 ranks, `deepspeed --num_gpus 2`, ZeRO-3, gloo):

  (a)  megadistil, shared teacher (teacher mode of the student's own W, each layer run as the teacher right before
       the student on one ZeRO-3 gather: teacher.layerwise), ReLoRA (ΔW allocated as int8 codes + row scales, the
       default relora.delta_format, resets on)
  (aw) the same with the whole teacher forward before the student's (teacher.layerwise=false: two gathers a layer)
  (ad) the same with relora.delta_format=dtype (ΔW in the model dtype, W-sized)
  (a0) the same with relora.reset_every=0 (no ΔW)
  (b)  megadistil, offline teacher shards (precomputed once here), teacher.kind=shards, ReLoRA
  (c)  naive baseline (bench/_naive_kd.py): separate frozen teacher copy + full-parameter AdamW student,
       forward KL on full logits, no LoRA, no quantisation (what TRL GKD / DistillKit do)

Throughput: global tokens per step / the median step time of the steps after the warm-up (rank 0's log).
Memory: peak RSS (VmHWM = ru_maxrss) of every rank process, polled from /proc while it runs (the lifetime peak,
loading included), and the steady-state peak each rank logs (the max over the training steps: the engine's and the
baseline's PeakMemory reset the high-water mark once loading is done); the memory target reads the steady-state one.
The "floor" is the peak RSS of a rank that only imports the engine and starts the process group: the runtime's fixed
cost, which no method can remove.

Where the time goes: the last step of each engine case runs under torch.profiler (log.profile_step; left out of the
median and of the steady-state peak: its event records cost memory and time), and a table gives its phases per rank
(--no-profile: off).

Allocator (--malloc, the same for every case's ranks, naive included): `kept`, the engine's CPU default (glibc keeps
freed blocks for reuse: distributed.keep_freed_blocks); `lean`, MALLOC_MMAP_THRESHOLD_=65536 (freed blocks over
64 KiB go back to the kernel); `jemalloc`, LD_PRELOADed libjemalloc (Debian: libjemalloc2) with its defaults.

Usage: python bench/distill_step.py [--hidden 768 --layers 6 --vocab 16384 --seq-len 256 --micro-batch 2 ...]
The weights-dominated setting of issue 15: --hidden 2048 --layers 8 --heads 16 --kv-heads 4 --intermediate 5632
--vocab 8192 --seq-len 128 --micro-batch 1 --steps 6 --warmup 2 --cases a,aw,ad,b (14 layers no longer fit the
naive baseline in 24 GiB on two ranks: killed at 12.1 GB a rank after its first step)
Writes bench/results/distill_step.json.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from megadistil.config import ReLoRAConfig

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
RESULTS = ROOT / "bench" / "results" / "distill_step.json"
WORLD = 2
MEM_TARGET, SPEED_TARGET = 0.25, 1.5


# ---------------------------------------------------------------- inputs
def build_model(args: argparse.Namespace, work: Path) -> Path:
    """A random Llama-3.1-shaped model + BPE tokenizer trained on the stdlib source; reused when it exists."""
    from megadistil.tiny import make_tiny_llama, stdlib_files

    out = work / f"llama-h{args.hidden}-l{args.layers}-i{args.intermediate}-v{args.vocab}"
    if not (out / "config.json").is_file():
        texts = [f.read_text(errors="replace") for f in stdlib_files()]
        make_tiny_llama(out, texts=texts, vocab_size=args.vocab, hidden_size=args.hidden, layers=args.layers,
                        heads=args.heads, kv_heads=args.kv_heads, intermediate_size=args.intermediate)
    return out


def write_train_text(model_dir: Path, args: argparse.Namespace, work: Path) -> Path:
    """Enough of the corpus for every step (each run sees the same packed sequences in the same order)."""
    need_chars = args.steps * args.micro_batch * WORLD * args.seq_len * 6  # ~3 chars/token, 2x margin
    path = work / f"train-{need_chars}.txt"
    if not path.is_file():
        path.write_text((model_dir / "corpus.txt").read_text()[:need_chars])
    return path


def build_shards(model_dir: Path, text: Path, args: argparse.Namespace, work: Path) -> tuple[Path, float | None]:
    """Teacher top-k shards for (b), written once (None seconds: reused from an earlier bench run)."""
    from megadistil.data.precompute import PrecomputeConfig, run_precompute

    out = work / f"shards-{model_dir.name}-s{args.seq_len}-k{args.top_k}-n{args.steps * args.micro_batch * WORLD}"
    if (out / "manifest.json").is_file():
        return out, None
    start = time.perf_counter()
    run_precompute(PrecomputeConfig(teacher=str(model_dir), text=[str(text)], out=str(out), seq_len=args.seq_len,
                                    top_k=args.top_k, max_sequences=args.steps * args.micro_batch * WORLD,
                                    progress=False))
    return out, time.perf_counter() - start


# ---------------------------------------------------------------- runs
def _rank_of(proc: psutil.Process) -> int | None:
    try:
        env = proc.environ()
    except (psutil.Error, OSError):
        return None
    return int(env["LOCAL_RANK"]) if "LOCAL_RANK" in env and "RANK" in env else None


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def launch(script: str, argv: list[str], port: int, log: Path) -> dict[int, float]:
    """Run `deepspeed --num_gpus 2 script argv`, polling each rank's peak RSS; returns {rank: peak MiB}."""
    cmd = [DEEPSPEED, "--num_gpus", str(WORLD), "--master_port", str(port), script, *argv]
    peaks: dict[int, float] = {}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **EXTRA_ENV})
        launcher = psutil.Process(proc.pid)
        while proc.poll() is None:
            for child in _children(launcher):
                rank = _rank_of(child) if script in " ".join(_cmdline(child)) else None
                hwm = _vm_hwm_mb(child.pid) if rank is not None else None
                if hwm is not None:
                    peaks[rank] = max(peaks.get(rank, 0.0), hwm)
            time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    if sorted(peaks) != list(range(WORLD)):
        raise RuntimeError(f"could not see every rank's memory of {script} (saw ranks {sorted(peaks)})")
    return peaks


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def common_overrides(args: argparse.Namespace, model_dir: Path, text: Path, dtype: str) -> list[str]:
    return [f"model.student={model_dir}", f"model.dtype={dtype}", f"data.text=[{text}]", "data.eval_text=[]",
            f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
            f"train.max_steps={args.steps}", f"train.save_every={args.steps}", "train.resume=never",
            f"bitnet.lora_rank={args.lora_rank}", *relora_overrides(args.reset_every), "optim.warmup_steps=1",
            f"loss.chunk_tokens={args.chunk_tokens}"]


def relora_overrides(reset_every: int) -> list[str]:
    """Merges every `reset_every` steps with a 1-step restart warmup; without merges, the warmup back at its default
    (configs/tiny.yaml sets one, and a run refuses a setting that nothing reads)."""
    warmup = 1 if reset_every else ReLoRAConfig.restart_warmup_steps
    return [f"relora.reset_every={reset_every}", f"relora.restart_warmup_steps={warmup}"]


def fresh(run_dir: Path) -> Path:
    """The engine appends to metrics.jsonl: a previous bench run's records must not mix into this one's median."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


DS_CONFIG = "ds_configs/zero3.json"  # replaced in main() by the work dir's copy with the --max-live limits
EXTRA_ENV: dict[str, str] = {}  # --malloc: every case's ranks under the same allocator setting


def malloc_env(choice: str) -> dict[str, str]:
    """The environment of --malloc's choice (keep_freed_blocks leaves malloc alone under either of the others)."""
    if choice == "lean":
        return {"MALLOC_MMAP_THRESHOLD_": "65536"}
    if choice == "jemalloc":
        library = ctypes.util.find_library("jemalloc")  # the soname, which the dynamic loader finds as ldconfig did
        if library is None:
            raise SystemExit("--malloc jemalloc: the dynamic loader knows no libjemalloc (Debian: apt install "
                             "libjemalloc2)")
        return {"LD_PRELOAD": library}
    return {}


def write_ds_config(work: Path, max_live: float) -> str:
    """zero3.json with ZeRO-3's live-parameter and reuse-distance limits scaled to the bench model: DeepSpeed's
    defaults (1e9) keep every parameter of a model under 1B gathered between uses, which at this size would measure
    a replicated model, not the sharded regime an 8B/70B run is in. The same file serves all three cases."""
    ds = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"].update(stage3_max_live_parameters=max_live, stage3_max_reuse_distance=max_live)
    path = work / "ds_config.json"
    path.write_text(json.dumps(ds, indent=1))
    return str(path)


def run_engine(name: str, overrides: list[str], run_dir: Path, port: int, profile_step: int = 0) -> dict:
    argv = ["--ds_config", DS_CONFIG, "--config", "configs/tiny.yaml",
            f"train.output_dir={fresh(run_dir)}", *overrides, f"log.profile_step={profile_step}"]
    peaks = launch("launch/train.py", argv, port, run_dir.with_suffix(".log"))
    steps = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    profiles = {r: json.loads((run_dir / f"profile.rank{r}.json").read_text()) for r in range(WORLD)} \
        if profile_step else {}
    times = [m["step_time_s"] for m in steps if m["step"] != profile_step]  # the profiled step runs slower
    return {"name": name, "rss_mb": peaks, "engine_rank0_peak_mb": steps[-1]["peak_mem_mb_rank0"],
            # the engine logs the running peak; the profiled step's holds the profiler's own event records
            "steps_rss_mb": {r: max(m[f"steps_peak_mem_mb_rank{r}"] for m in steps if m["step"] != profile_step)
                             for r in range(WORLD)},
            "step_times": times, "losses": [m["loss"] for m in steps], "profile": profiles}


def run_naive(overrides: list[str], run_dir: Path, port: int) -> dict:
    argv = ["--config", "configs/tiny.yaml", "--ds_config", DS_CONFIG, "--out", str(fresh(run_dir)), *overrides]
    peaks = launch("bench/_naive_kd.py", argv, port, run_dir.with_suffix(".log"))
    per_rank = {r: [json.loads(line) for line in (run_dir / f"rank{r}.jsonl").read_text().splitlines()]
                for r in range(WORLD)}
    steps = per_rank[0]
    return {"name": "c", "rss_mb": peaks, "engine_rank0_peak_mb": steps[-1]["peak_mem_mb"],
            "steps_rss_mb": {r: max(m["steps_peak_mem_mb"] for m in recs) for r, recs in per_rank.items()},
            "step_times": [m["step_time_s"] for m in steps], "losses": [m["loss"] for m in steps]}


def run_floor(overrides: list[str], run_dir: Path, port: int) -> dict[int, float]:
    return launch("bench/_naive_kd.py", ["--config", "configs/tiny.yaml", "--out", str(run_dir), "--floor",
                                         *overrides], port, run_dir.with_suffix(".log"))


# ---------------------------------------------------------------- report
def param_counts(model_dir: Path, lora_rank: int) -> dict[str, int]:
    """Total parameters and the LoRA adapters' (r x (in + out) per projection of every block)."""
    c = json.loads((model_dir / "config.json").read_text())
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    block = sum(a * b for a, b in shapes) + 2 * h
    return {"total": layers * block + 2 * v * h + h, "lora": layers * sum(lora_rank * (a + b) for a, b in shapes)}


def summarize(run: dict, warmup: int, tokens_per_step: int) -> dict:
    steady = run["step_times"][warmup:]
    median = statistics.median(steady)
    return {**run, "median_step_s": median, "tokens_per_s": tokens_per_step / median,
            "peak_rss_mb": max(run["rss_mb"].values()), "steps_peak_mb": max(run["steps_rss_mb"].values())}


def machine() -> str:
    import deepspeed
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    load = os.getloadavg()[0]
    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__},"
            f" deepspeed {deepspeed.__version__}, {WORLD} ranks gloo ZeRO-3, load avg at start {load:.1f}")


DESCRIPTIONS = {
    "a": "megadistil shared teacher, ReLoRA (int8 ΔW)",
    "aw": "the same, whole teacher forward first",
    "ad": "megadistil shared teacher, ReLoRA, ΔW in model dtype",
    "a0": "megadistil shared teacher, reset_every=0",
    "b": "megadistil offline shards, ReLoRA (int8 ΔW)",
    "c": "naive: teacher copy + full AdamW student",
}


def print_table(results: dict, floor: dict[int, float], dtype: str) -> None:
    c = results["c"]
    floor_mb = max(floor.values())
    print(f"\n[{dtype}]  runtime floor (imports + process group): "
          + ", ".join(f"rank{r} {v:.0f} MiB" for r, v in sorted(floor.items())))
    print("rss: lifetime peak RSS per rank (loading included); steps: the peak over the training steps alone (not "
          "the profiled one, which holds the profiler's records)")
    print(f"{'case':<4} {'what':<44} {'step s':>7} {'tok/s':>7} {'rss r0':>7} {'rss r1':>7} {'steps r0':>8}"
          f" {'steps r1':>8} {'mem/c':>6} {'steps/c':>7} {'net/c':>6} {'speed/c':>7}")
    for name, r in results.items():
        net = (r["steps_peak_mb"] - floor_mb) / (c["steps_peak_mb"] - floor_mb)
        print(f"{name:<4} {DESCRIPTIONS[name]:<44} {r['median_step_s']:7.2f} {r['tokens_per_s']:7.0f}"
              f" {r['rss_mb'][0]:7.0f} {r['rss_mb'][1]:7.0f} {r['steps_rss_mb'][0]:8.0f} {r['steps_rss_mb'][1]:8.0f}"
              f" {r['peak_rss_mb'] / c['peak_rss_mb']:6.2f} {r['steps_peak_mb'] / c['steps_peak_mb']:7.2f}"
              f" {net:6.2f} {r['tokens_per_s'] / c['tokens_per_s']:7.2f}")
    a = results["a"]
    mem, speed = a["steps_peak_mb"] / c["steps_peak_mb"], a["tokens_per_s"] / c["tokens_per_s"]
    print(f"target (a) steady-state peak <= {MEM_TARGET}x (c): {mem:.2f}x  {'MET' if mem <= MEM_TARGET else 'NOT MET'}"
          f"   (lifetime peak {a['peak_rss_mb'] / c['peak_rss_mb']:.2f}x; steady net of the runtime floor: "
          f"{(a['steps_peak_mb'] - floor_mb) / (c['steps_peak_mb'] - floor_mb):.2f}x)")
    print(f"target (a) tokens/s >= {SPEED_TARGET}x (c): {speed:.2f}x  {'MET' if speed >= SPEED_TARGET else 'NOT MET'}")


def print_profiles(results: dict, step: int) -> None:
    """Where the engine cases' time goes: the profiled step's phases (megadistil.engine.profile) per rank."""
    from megadistil.engine.profile import PHASES

    print(f"\nstep {step} by phase, seconds per rank (torch.profiler; loss, and a layerwise teacher, are part of "
          "student_forward; collectives: time inside all-gather / reduce-scatter / all-reduce ops, across phases; "
          "gathers: all-gather ops)")
    print(f"{'case':<4} {'rank':>4} {'step':>6} " + " ".join(f"{p:>15}" for p in PHASES)
          + f" {'collectives':>11} {'gathers':>7}")
    for name, r in results.items():
        for rank, prof in sorted(r.get("profile", {}).items()):
            gathers = sum(n for op, n in prof["collective_ops"].items() if "gather" in op.lower())
            print(f"{name:<4} {rank:>4} {prof['step_s']:6.2f} "
                  + " ".join(f"{prof['phases_s'][p]:15.2f}" for p in PHASES)
                  + f" {prof['collectives_s']:11.2f} {gathers:7d}")


def bench_dtype(args: argparse.Namespace, dtype: str, model_dir: Path, text: Path, shards: Path,
                work: Path) -> dict:
    base = common_overrides(args, model_dir, text, dtype)
    tokens_per_step = WORLD * args.micro_batch * args.seq_len
    port = args.port
    runs = {}
    for name, extra in (("a", ["teacher.kind=shared"]),
                        ("aw", ["teacher.kind=shared", "teacher.layerwise=false"]),
                        ("ad", ["teacher.kind=shared", "relora.delta_format=dtype"]),
                        ("a0", ["teacher.kind=shared", *relora_overrides(0)]),
                        ("b", ["teacher.kind=shards", "data.text=[]", f"data.shards={shards}",
                               "data.shuffle_buffer=16"])):
        if name not in args.cases or (name in ("a0", "ad") and args.reset_every == 0):
            continue
        print(f"running ({name}) {dtype} ...", flush=True)
        runs[name] = run_engine(name, [*base, *extra], work / f"{dtype}-{name}", port := port + 1,
                                profile_step=args.steps if args.profile else 0)
    print(f"running (c) {dtype} ...", flush=True)
    runs["c"] = run_naive(base, work / f"{dtype}-c", port := port + 1)
    floor = run_floor(base, work / f"{dtype}-floor", port + 1)
    results = {k: summarize(v, args.warmup, tokens_per_step) for k, v in runs.items()}
    print_table(results, floor, dtype)
    if args.profile:
        print_profiles(results, args.steps)
    return {"runs": results, "floor_rss_mb": floor, "tokens_per_step": tokens_per_step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--reset-every", type=int, default=4, help="ReLoRA merge period of (a)/(b); a reset is in the run")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the median step time")
    p.add_argument("--dtype", choices=("bf16", "fp32", "both"), default="bf16")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_distill_step")
    p.add_argument("--port", type=int, default=29620)
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="profile the last step of the engine cases by phase (left out of their median step time)")
    p.add_argument("--cases", default="a,aw,ad,a0,b", help="engine cases to run besides (c), comma-separated")
    p.add_argument("--malloc", choices=("kept", "lean", "jemalloc"), default="kept",
                   help="every case's allocator (naive included): kept = the engine's default (glibc keeps freed "
                        "blocks for reuse), lean = MALLOC_MMAP_THRESHOLD_=65536 (less memory, more page faults), "
                        "jemalloc = LD_PRELOADed libjemalloc")
    p.add_argument("--max-live", type=float, default=1e7,
                   help="ZeRO-3 stage3_max_live_parameters / max_reuse_distance for all cases (see write_ds_config)")
    args = p.parse_args()
    args.cases = args.cases.split(",")
    if "a" not in args.cases or set(args.cases) - set(DESCRIPTIONS):
        p.error(f"--cases must include a and name only engine cases of {', '.join(DESCRIPTIONS)}")
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    args.work.mkdir(parents=True, exist_ok=True)
    global DS_CONFIG
    DS_CONFIG = write_ds_config(args.work, args.max_live)
    EXTRA_ENV.update(malloc_env(args.malloc))
    desc = machine() + f", --malloc {args.malloc}" + "".join(f" {k}={v}" for k, v in EXTRA_ENV.items())
    model_dir = build_model(args, args.work)
    text = write_train_text(model_dir, args, args.work)
    shards, precompute_s = build_shards(model_dir, text, args, args.work)
    counts = param_counts(model_dir, args.lora_rank)
    print(f"machine: {desc}")
    print(f"model: Llama-3.1-shaped, hidden {args.hidden}, {args.layers} layers, heads {args.heads}/{args.kv_heads}, "
          f"intermediate {args.intermediate}, vocab {json.loads((model_dir / 'config.json').read_text())['vocab_size']}"
          f", {counts['total'] / 1e6:.1f}M params (LoRA r={args.lora_rank}: {counts['lora'] / 1e6:.2f}M trainable); "
          f"batch {args.micro_batch} x {args.seq_len} tokens per rank, {args.steps} steps, median of steps "
          f"{args.warmup + 1}..{args.steps}; shards "
          + ("reused from an earlier run" if precompute_s is None else f"precomputed once in {precompute_s:.0f} s"))
    report = {"machine": desc, "args": {k: str(v) for k, v in vars(args).items()}, "params": counts,
              "precompute_s": precompute_s, "targets": {"mem_ratio_max": MEM_TARGET, "speed_ratio_min": SPEED_TARGET}}
    for dtype in (("bf16", "fp32") if args.dtype == "both" else (args.dtype,)):
        report[dtype] = bench_dtype(args, dtype, model_dir, text, shards, args.work)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
