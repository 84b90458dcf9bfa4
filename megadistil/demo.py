"""`make demo`: the whole product on real text, offline, on a 2-core CPU in about 15 minutes.

Corpus: the Python standard library's own source (on every machine), split by file into a training split and a
held-out split. The teacher, a small Llama-3.1-shaped model pretrained on the whole training split, ships in
megadistil/assets/demo-teacher (`--remake-teacher` makes it again with this code, ~8 min). Beside it ships the
cross-tokenizer demo's teacher, megadistil/assets/demo-teacher-crosstok: the same model trained on the same split with
another tokenizer (6k vocab, digits split; `--remake-teacher crosstok`). The students see a slice of a few percent of
those tokens, many times over, and everything is evaluated on the held-out files. The runs:

  shards   BitNet student distilled from precomputed teacher shards      (2-rank ZeRO-3, ReLoRA, int8 backward)
  shared   BitNet student distilled from the live shared teacher          (same budget)
  ce       BitNet student trained with CE only on the slice (QAT without a teacher, same budget)

The naive ternary model (post-training quantization) is every run's step-0 evaluation. The `shards` student is then
converted with tools/convert_to_ternary.py --verify and evaluated in vanilla transformers, and written as GGUFs that
llama.cpp runs (`make demo` builds llama.cpp first, once per CPU): TQ2_0 verified and evaluated in llama.cpp, and
TQ2_0 / TQ1_0 / F16 / Q8_0 timed there.

  python -m megadistil.demo --out runs/demo [--quick] [--remake-teacher [{demo,crosstok}]]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megadistil.bitnet.kernels import cpu_model_name
from megadistil.tiny import make_tiny_llama, stdlib_files

ROOT = Path(__file__).resolve().parents[1]
TEACHER_ASSET = Path(__file__).resolve().parent / "assets" / "demo-teacher"
# The cross-tokenizer demo's teacher (CROSSTOK_TEACHER): another tokenizer (6k vocab, digits split) trained on the
# same training split, so its token ids and boundaries differ from the demo teacher's.
CROSSTOK_ASSET = Path(__file__).resolve().parent / "assets" / "demo-teacher-crosstok"


class DemoError(RuntimeError):
    """A stage failed; the message names it and the log that holds its output."""


@dataclass
class TeacherSettings:
    """The demo's teacher: a 4-layer, 256-wide Llama-3.1-shaped model with a 4k-token BPE, pretrained for 800 steps
    of 16 x 256 tokens (~3 epochs of the training split). Pretraining it takes ~8 min on 2 cores, so the result is
    shipped in megadistil/assets/demo-teacher (bf16, ~10 MB); `--remake-teacher` makes it again with this code.
    split_digits: the tokenizer's pre-tokenizer splits every digit off (train_bpe_tokenizer)."""

    hidden: int = 256
    layers: int = 4
    vocab: int = 4096
    split_digits: bool = False
    steps: int = 800
    batch: int = 16
    seq_len: int = 256
    seed: int = 0


CROSSTOK_TEACHER = TeacherSettings(vocab=6144, split_digits=True, seed=1)
"""The teacher for the cross-tokenizer demo: another tokenizer (6k vocab, digits split) trained on the same training
split (split_corpus), the same model size, steps and batch otherwise; shipped in CROSSTOK_ASSET
(`--remake-teacher crosstok` makes it again). More merges than the student's 4k and digits split: its token boundaries
are neither a refinement nor a coarsening of the student's (fewer merges of the same corpus would only refine them,
and every student position would align), so the alignment meets partial overlaps as it does between real families."""
# --remake-teacher NAME -> the settings and the asset directory it (re)makes
TEACHERS = {"demo": (TeacherSettings(), TEACHER_ASSET), "crosstok": (CROSSTOK_TEACHER, CROSSTOK_ASSET)}


@dataclass
class DemoSettings:
    """The students' budget, sized for ~15 minutes on 2 CPU cores of either kind (an AVX2-only EPYC computes the
    integer products in float32 at ~1.5 s a step): a slice of ~0.7 % of the training split, seen ~27 times. Many
    passes are what a distillation budget has, and what tells distillation from QAT: with 18 (over 13k tokens) the
    CE-only student had not yet memorised its slice (1.37x the distilled one's perplexity, not 1.5x); with 36 (6.4k)
    the distilled one fell short of 1.05x its teacher."""

    seq_len: int = 256
    slice_tokens: int = 8_500
    distill_steps: int = 112
    micro_batch: int = 4  # per rank: 2 ranks x 4 = 8 sequences per step
    lora_rank: int = 64
    reset_every: int = 28
    lr: float = 3e-3
    eval_sequences: int = 64
    evals: int = 4  # held-out evaluations per run, after step 0's
    task_docs: int = 100  # documents in each of the two tasks made from the held-out split (~12 s a model)
    task_context_chars: int = 400  # the text before each task's target
    prompts: int = 4  # generations: prompts (held-out files' first `def` lines) and new tokens each
    new_tokens: int = 32
    teacher: TeacherSettings = field(default_factory=TeacherSettings)

    @classmethod
    def quick(cls) -> DemoSettings:
        """The same path with fewer, smaller steps (for a quick look, and the end-to-end test)."""
        return cls(distill_steps=24, micro_batch=2, reset_every=12, eval_sequences=16, evals=1, task_docs=24,
                   task_context_chars=200, prompts=1, new_tokens=8)


def banner(index: int, total: int, text: str) -> None:
    print(f"\n==> [{index}/{total}] {text}", flush=True)


def write_docs(path: Path, docs: list[str]) -> Path:
    """JSON lines with a `text` field: one document per source file, so that packing puts EOS between files (a
    .txt file would be read one line per document, newlines dropped, which is not how the teacher saw code)."""
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def read_docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def is_heldout(file: Path) -> bool:
    """About one file in ten, chosen by a hash of its name: the same files are held out on every Python version,
    so the shipped teacher never saw a held-out file."""
    return zlib.crc32(file.name.encode()) % 10 == 0


def split_corpus(out: Path) -> dict[str, Path]:
    files = stdlib_files()
    docs = {f: f.read_text(errors="replace") for f in files}
    return {"train": write_docs(out / "train.jsonl", [d for f, d in docs.items() if not is_heldout(f)]),
            "heldout": write_docs(out / "heldout.jsonl", [d for f, d in docs.items() if is_heldout(f)])}


def make_slice(train: Path, tokenizer_dir: Path, tokens: int, out: Path, seed: int = 0) -> int:
    """Whole training files drawn at random until about `tokens` tokens: the students' whole world, from the same
    distribution as the teacher's data and the held-out files. A file that would overshoot the budget by half is
    passed over (the stdlib has files of 30k tokens), so the slice's size, and the passes over it, are the ones set."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = read_docs(train)
    random.Random(seed).shuffle(docs)
    chosen, count = [], 0
    for doc in docs:
        n = len(tok(doc, add_special_tokens=False)["input_ids"]) + 1
        if count + n > 1.5 * tokens:
            continue
        chosen.append(doc)
        count += n
        if count >= tokens:
            break
    write_docs(out, chosen)
    return count


def make_teacher(t: TeacherSettings, train_text: Path, out: Path, *, remake: bool = False,
                 made_by: str = "python -m megadistil.demo") -> Path:
    """A shipped teacher when it was made with these settings; otherwise pretrain one into `out` (bf16), stamped
    with the settings and `made_by` (the command that made it)."""
    for candidate in ([] if remake else [TEACHER_ASSET, CROSSTOK_ASSET, out]):
        stamp = candidate / "teacher_settings.json"
        if stamp.is_file() and json.loads(stamp.read_text())["settings"] == asdict(t):
            print(f"using the teacher in {candidate} (made with these settings)")
            return candidate
    make_tiny_llama(out, texts=read_docs(train_text), vocab_size=t.vocab, seed=t.seed, pretrain_steps=t.steps,
                    pretrain_seq_len=t.seq_len, pretrain_batch=t.batch, hidden_size=t.hidden, layers=t.layers,
                    intermediate_size=t.hidden * 8 // 3 // 4 * 4, save_dtype=torch.bfloat16, keep_corpus=False,
                    split_digits=t.split_digits)
    provenance = {"settings": asdict(t), "made_by": made_by,
                  "python": platform.python_version(), "torch": torch.__version__,
                  "train_split_sha256": hashlib.sha256(train_text.read_bytes()).hexdigest()}
    (out / "teacher_settings.json").write_text(json.dumps(provenance, indent=1))
    return out


def train_run(name: str, out: Path, overrides: list[str], steps: int, log: Path) -> float:
    """One `deepspeed --num_gpus 2 launch/train.py` run, with a progress bar over its metrics.jsonl."""
    from tqdm import tqdm

    from megadistil.distributed import free_local_port

    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_local_port()), "launch/train.py",
           "--ds_config", "ds_configs/zero3.json", "--config", "configs/tiny.yaml", f"train.output_dir={out}",
           *overrides]
    start = time.time()
    with log.open("w") as f, tqdm(total=steps, desc=f"distil [{name}]", unit="step") as bar:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(1.0)
            bar.update(_last_step(out) - bar.n)
        bar.update(_last_step(out) - bar.n)
    if proc.returncode:
        raise DemoError(f"training run {name!r} failed (exit {proc.returncode}); see {log}")
    return time.time() - start


def _last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if '"loss"' in line]
    return max(steps, default=0)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def vanilla_perplexity(model_dir: Path, heldout: Path, seq_len: int, sequences: int) -> float:
    """Held-out perplexity of an HF dir loaded by transformers alone (the packed ternary checkpoint), on the same
    sequences the trainer evaluates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megadistil.bitnet import hardware, resolve_dtype
    from megadistil.data.packed import eval_sequences

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype("auto", hardware("cpu"))).eval()
    nll, count = 0.0, 0
    for seq in eval_sequences([str(heldout)], tok, seq_len, sequences):
        ids = torch.from_numpy(seq).unsqueeze(0)
        nll += float(model(input_ids=ids, labels=ids).loss) * (seq_len - 1)
        count += seq_len - 1
    return math.exp(nll / count)


def run_overrides(s: DemoSettings, teacher: Path, heldout: Path) -> list[str]:
    return [f"model.student={teacher}", f"data.eval_text=[{heldout}]", f"data.seq_len={s.seq_len}",
            f"train.max_steps={s.distill_steps}", f"train.save_every={s.distill_steps}",
            f"train.micro_batch_size={s.micro_batch}", f"train.eval_every={max(s.distill_steps // s.evals, 1)}",
            f"train.eval_batches={max(s.eval_sequences // (2 * s.micro_batch), 1)}",
            f"bitnet.lora_rank={s.lora_rank}", "bitnet.backward=int8", f"relora.reset_every={s.reset_every}",
            f"optim.lr={s.lr}", "loss.kind=forward_kl",
            # A 4-layer model's activations are a few MB: recomputing them would cost ~10 % of the demo's time.
            "model.activation_checkpointing=false"]


def distil_all(s: DemoSettings, out: Path, teacher: Path, paths: dict[str, Path], shards: Path) -> dict[str, dict]:
    common = run_overrides(s, teacher, paths["heldout"])
    runs = {
        "shards": [*common, "teacher.kind=shards", f"data.shards={shards}", "data.text=[]"],
        "shared": [*common, f"data.text=[{paths['slice']}]"],
        "ce": [*common, f"data.text=[{paths['slice']}]", "loss.kd_weight=0.0", "loss.ce_weight=1.0"],
    }
    return train_runs(s, out, runs)


def train_runs(s: DemoSettings, out: Path, runs: dict[str, list[str]]) -> dict[str, dict]:
    """The students one after another, each in out/run-<name>: name -> its metrics and wall time."""
    results = {}
    for name, overrides in runs.items():
        shutil.rmtree(out / f"run-{name}", ignore_errors=True)  # a fresh run, not a resume of an older demo
        seconds = train_run(name, out / f"run-{name}", overrides, s.distill_steps, out / f"run-{name}.log")
        results[name] = {"metrics": read_metrics(out / f"run-{name}"), "wall_s": seconds}
    return results


def publish(summary: dict, out: Path, write: Callable[[dict, Path], Path]) -> int:
    """summary.json, then the report `write` makes of it, printed."""
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    report = write(summary, out)
    print(report.read_text())
    print(f"report: {report}")
    return 0


def demo_setup(argv: list[str] | None, doc: str, default_out: str) -> tuple[DemoSettings, Path]:
    """A companion demo's command line (--out, --quick): its settings and its output dir, made."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=default_out)
    p.add_argument("--quick", action="store_true", help="fewer steps: a quick look")
    a = p.parse_args(argv)
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return DemoSettings.quick() if a.quick else DemoSettings(), out


def entry(main: Callable[[], int], name: str) -> None:
    """A demo's __main__: a failed stage exits with its message."""
    try:
        sys.exit(main())
    except DemoError as e:
        sys.exit(f"{name}: {e}")


def convert(run: Path, output: Path, log: Path) -> None:
    cmd = [sys.executable, "tools/convert_to_ternary.py", "--checkpoint", str(run), "--output", str(output),
           "--verify", "--overwrite", "--dtype", "bf16"]
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise DemoError(f"convert_to_ternary failed (exit {proc.returncode}); see {log}")


GGUF_TYPES = ("tq2_0", "tq1_0", "f16", "q8_0")  # the shards student's GGUFs; f16 and q8_0 are the speed baselines


def gguf_student(run: Path, out: Path, heldout: Path, tokenizer: Path, s: DemoSettings) -> dict:
    """The shards student as GGUFs: TQ2_0 verified in llama.cpp (convert-gguf.log) and its held-out perplexity there
    on the trainer's evaluation sequences; llama.cpp's speed and file size for each of GGUF_TYPES."""
    from transformers import AutoTokenizer

    from megadistil.data.packed import eval_sequences
    from megadistil.export.gguf import GGUFConfig, convert_checkpoint_gguf
    from megadistil.export.llamacpp import llama_cpp_perplexity, measure_speed

    main_file = out / "student-tq2_0.gguf"
    cmd = [sys.executable, "tools/convert_to_ternary.py", "--format", "gguf", "--gguf-type", "tq2_0", "--checkpoint",
           str(run), "--output", str(main_file), "--verify", "--overwrite", "--no-progress"]
    with (out / "convert-gguf.log").open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise DemoError(f"convert_to_ternary --format gguf failed (exit {proc.returncode}); see {out / 'convert-gguf.log'}")
    tok = AutoTokenizer.from_pretrained(tokenizer)
    ids = torch.stack([torch.from_numpy(q) for q in eval_sequences([str(heldout)], tok, s.seq_len, s.eval_sequences)])
    speed = {}
    for kind in GGUF_TYPES:
        path = main_file if kind == "tq2_0" else out / f"student-{kind}.gguf"
        if kind != "tq2_0":
            other = "q8_0" if kind == "q8_0" else "f16"  # a Q8_0 file is q8_0 throughout, as llama.cpp's converter writes
            convert_checkpoint_gguf(run, path, GGUFConfig(kind, other, overwrite=True, progress=False))
        speed[kind] = measure_speed(path, prompt=s.seq_len, gen=64) | {"file_bytes": path.stat().st_size}
    return {"ppl": llama_cpp_perplexity(main_file, ids), "speed": speed}


# task -> the score the report ranks models by (last_word's word-level perplexity: lower is better)
TASKS = {"demo_next_line": "acc_mutual_info", "demo_last_word": "perplexity"}


def evaluate_models(s: DemoSettings, out: Path, models: dict[str, Path | str], heldout: Path) -> dict:
    """Two tasks from the held-out files (a file's next two lines among other files' lines; a line's last
    identifier), scored by tools/evaluate.py for every model (name -> what --model takes: an HF dir, a run dir,
    ternary:DIR), with greedy and sampled generations."""
    from megadistil.eval.local_tasks import last_word_docs, next_line_docs, write_task

    docs = read_docs(heldout)
    chars = s.task_context_chars
    write_task(out / "tasks", "demo_next_line", "next_line", next_line_docs(docs, s.task_docs, context_chars=chars))
    write_task(out / "tasks", "demo_last_word", "last_word", last_word_docs(docs, s.task_docs, context_chars=chars))
    firsts = [ln for ln in (next((x for x in d.splitlines() if x.startswith("def ")), "") for d in docs) if ln]
    (out / "prompts.txt").write_text("".join(ln.split("(")[0] + "(\n" for ln in firsts[:s.prompts]))
    cmd = [sys.executable, "tools/evaluate.py", *[a for k, v in models.items() for a in ("--model", f"{k}={v}")],
           "--tasks", ",".join(TASKS), "--include-path", str(out / "tasks"), "--batch-size", "32",
           "--generate", str(out / "prompts.txt"), "--max-new-tokens", str(s.new_tokens),
           "--out", str(out / "eval.json"), "--generations-out", str(out / "generations.md")]
    with (out / "evaluate.log").open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise DemoError(f"evaluate failed (exit {proc.returncode}); see {out / 'evaluate.log'}")
    return {m["name"]: m["tasks"] for m in json.loads((out / "eval.json").read_text())["models"]}


def task_report(summary: dict, out: Path, labels: dict[str, str]) -> list[str]:
    docs = summary["settings"]["task_docs"]
    lines = ["", (f"Tasks made from the held-out files ({docs} documents each, tools/evaluate.py through "
                  "lm-evaluation-harness, offline): `demo_next_line` picks a file's next two lines among lines of "
                  "other files (acc_mutual_info: log p(choice | context) - log p(choice), so a choice cannot win "
                  "by being common text); `demo_last_word` predicts a line's last identifier (perplexity per "
                  "identifier: lower is better; eval.json also holds acc, the greedy match)."),
             "", "| model | " + " | ".join(f"{t} {m}" for t, m in TASKS.items()) + " |", "|---|---:|---:|"]
    lines += [f"| {labels[k]} | " + " | ".join(f"{scores[t][m]:.4g}" for t, m in TASKS.items()) + " |"
              for k, scores in summary["tasks"].items()]
    lines += ["", "Generations (greedy, and sampled with a fixed seed) from the first `def` line of held-out files:",
              "", (out / "generations.md").read_text().rstrip()]
    return lines


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern))


def plot_losses(results: dict[str, dict], teacher_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = [m for m in r["metrics"] if "loss" in m]
        key = "ce" if name == "ce" else "kd"
        train_ax.plot([m["step"] for m in steps], [m[key] for m in steps], label=f"{name} ({key})")
        evals = [m for m in r["metrics"] if "eval_ppl_student" in m]
        eval_ax.plot([m["step"] for m in evals], [m["eval_ppl_student"] for m in evals], marker="o", label=name)
    eval_ax.axhline(teacher_ppl, color="black", linestyle="--", label="teacher")
    train_ax.set(title="training loss (KD for the distilled students, CE for ce)", xlabel="step", yscale="log")
    eval_ax.set(title="held-out perplexity (step 0: the naive ternary model)", xlabel="step", yscale="log")
    train_ax.legend(), eval_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def final_eval(r: dict) -> float:
    return [m for m in r["metrics"] if "eval_ppl_student" in m][-1]["eval_ppl_student"]


def step0_eval(r: dict) -> dict:
    return next(m for m in r["metrics"] if "eval_ppl_student" in m and m["step"] == 0)


MODELS = {  # summary key -> what the report calls it
    "teacher": "teacher (pretrained on the whole training split)",
    "naive_ternary": "teacher naively ternarized (post-training quantization, no training)",
    "ce_only": "CE-only student (QAT on the slice, no teacher)",
    "distilled_shards": "student distilled from shards",
    "distilled_shared": "student distilled from the shared live teacher",
    "converted": "converted 1.58-bit checkpoint in vanilla transformers",
}
PPL_ONLY = {"gguf_llama_cpp": "the same student as a TQ2_0 GGUF in llama.cpp"}  # in the perplexity table only
TARGETS = [  # (numerator, denominator, bound, what the bound is)
    ("distilled_shards", "teacher", 1.05, "at most"),
    ("ce_only", "distilled_shards", 1.5, "at least"),
    ("naive_ternary", "distilled_shards", 1.5, "at least"),
]


def summarize(s: DemoSettings, results: dict, converted_ppl: float, sizes: dict, wall_s: float,
              tokens: dict) -> dict:
    start = step0_eval(results["shared"])
    ppl = {"teacher": start["eval_ppl_teacher"], "naive_ternary": start["eval_ppl_student"],
           "ce_only": final_eval(results["ce"]), "distilled_shards": final_eval(results["shards"]),
           "distilled_shared": final_eval(results["shared"]), "converted": converted_ppl}
    steps = [m for m in results["shards"]["metrics"] if "loss" in m]
    return {"settings": asdict(s), "perplexity": ppl, "wall_s": wall_s,
            "tokens": {**tokens, "distilled": sum(m["tokens"] for m in steps)},
            "peak_mem_mb_per_rank": {k: [max(m[f"peak_mem_mb_rank{i}"] for m in r["metrics"] if "loss" in m)
                                         for i in range(2)] for k, r in results.items()},
            "run_wall_s": {k: r["wall_s"] for k, r in results.items()}, "sizes": sizes}


def gguf_report(summary: dict) -> list[str]:
    speed = summary.get("gguf_speed")
    if not speed:
        return []
    f16 = speed["f16"]
    first = next(iter(speed.values()))
    lines = ["", (f"The shards student in llama.cpp ({first['threads']} threads; prompt {first['prompt']} tokens in one "
                  f"batch, then {first['gen']} generated one by one; median of 3). At this size llama.cpp's per-token "
                  "overhead, not the weights, sets the speed: bench/inference.py measures a 1B model."),
             "", "| GGUF | file | prompt tok/s | generation tok/s | generation vs F16 |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k.upper()}{'*' if v.get('plain_weights') else ''} | {v['file_bytes'] / 2**20:.2f} MiB | "
              f"{v['pp_tokens_per_s']:.0f} | {v['tg_tokens_per_s']:.0f} | "
              f"{v['tg_tokens_per_s'] / f16['tg_tokens_per_s']:.2f}x |" for k, v in speed.items()]
    if any(v.get("plain_weights") for v in speed.values()):
        lines += ["", ("\\* llama.cpp crashed in its repacked-weight kernels for this type (AMX Q8_0 on some shapes, "
                       "llama.cpp issue #20824) and was measured again with them off.")]
    return lines


def write_report(summary: dict, out: Path) -> Path:
    ppl, t, sz = summary["perplexity"], summary["tokens"], summary["sizes"]
    lines = ["# megadistil demo", "",
             (f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
              f"{cpu_model_name()}; total wall time {summary['wall_s'] / 60:.1f} min."), "",
             "Held-out perplexity on files no model trained on:", "",
             "| model | held-out perplexity | vs teacher |", "|---|---:|---:|"]
    lines += [f"| {(MODELS | PPL_ONLY)[k]} | {v:.2f} | {v / ppl['teacher']:.3f}x |" for k, v in ppl.items()]
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    for num, den, bound, how in TARGETS:
        ratio = ppl[num] / ppl[den]
        met = ratio <= bound if how == "at most" else ratio >= bound
        lines.append(f"| {num} / {den}: {how} {bound}x | {ratio:.3f}x | {'yes' if met else 'no'} |")
    lines += ["", (f"Tokens: teacher pretraining {t['teacher']:,}; distillation slice {t['slice']:,} "
                   f"({100 * t['slice'] / t['teacher_split']:.1f}% of the {t['teacher_split']:,}-token training "
                   f"split); tokens trained per student {t['distilled']:,} ({t['distilled'] / t['slice']:.0f} passes "
                   "over the slice)."), "",
              "| run | wall time | peak RSS rank 0 | peak RSS rank 1 |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {summary['run_wall_s'][k]:.0f} s | " +
              " | ".join(f"{mb:.0f} MB" for mb in summary["peak_mem_mb_per_rank"][k]) + " |"
              for k in summary["run_wall_s"]]
    lines += ["", (f"Files: bf16 teacher {sz['teacher_bytes'] / 2**20:.2f} MiB of safetensors; packed 1.58-bit "
                   f"student {sz['student_bytes'] / 2**20:.2f} MiB ({sz['teacher_bytes'] / sz['student_bytes']:.1f}x "
                   "smaller; embeddings and lm_head stay in their dtype)."),
              *gguf_report(summary), *task_report(summary, out, MODELS), "", "![loss curves](loss_curves.png)", "",
              "Settings: `" + json.dumps(summary["settings"]) + "`", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    # transformers' BitLinear torch.compiles itself on first use: ~1 min of compiling per process on a 2-core CPU for
    # the few forwards the demo's checks make. The same math runs uncompiled (here and in the stages' subprocesses).
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    torch._dynamo.config.disable = os.environ["TORCHDYNAMO_DISABLE"] == "1"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="fewer steps: the end-to-end test's setting")
    p.add_argument("--remake-teacher", nargs="?", const="demo", choices=TEACHERS, metavar="{demo,crosstok}",
                   help=(f"pretrain a shipped teacher again (~8 min) and stop: demo (the default) into "
                         f"{TEACHER_ASSET.relative_to(ROOT)}, crosstok (the cross-tokenizer demo's teacher) into "
                         f"{CROSSTOK_ASSET.relative_to(ROOT)}"))
    a = p.parse_args(argv)
    s = DemoSettings.quick() if a.quick else DemoSettings()
    t = TEACHERS[a.remake_teacher][0] if a.remake_teacher else s.teacher
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start, total = time.time(), 9
    banner(1, total, "corpus: the Python standard library's source, split by file (~1 file in 10 held out)")
    paths = split_corpus(out)
    banner(2, total, f"teacher: {t.layers}-layer {t.hidden}-wide Llama-3.1-shaped model, {t.vocab}-token BPE"
           f"{' (digits split)' if t.split_digits else ''}, {t.steps} steps x {t.batch} x {t.seq_len} tokens of "
           "pretraining on the whole training split")
    if a.remake_teacher:
        asset = TEACHERS[a.remake_teacher][1]
        made = make_teacher(t, paths["train"], asset, remake=True,
                            made_by=f"python -m megadistil.demo --remake-teacher {a.remake_teacher}")
        print(f"wrote {made}")
        return 0
    teacher = make_teacher(t, paths["train"], out / "teacher")
    banner(3, total, f"distillation slice: ~{s.slice_tokens:,} tokens of the training split")
    paths["slice"] = out / "slice.jsonl"
    slice_tokens = make_slice(paths["train"], teacher, s.slice_tokens, paths["slice"])
    banner(4, total, "precompute teacher shards on the slice (top-64 log-probs + tail)")
    shards = out / "shards"
    shutil.rmtree(shards, ignore_errors=True)  # seconds to remake; an older demo's may come from another slice
    precompute = subprocess.run([sys.executable, "tools/precompute_teacher.py", "--teacher", str(teacher), "--text",
                                 str(paths["slice"]), "--out", str(shards), "--seq-len", str(s.seq_len),
                                 "--top-k", "64"], cwd=ROOT, check=False)
    if precompute.returncode:
        raise DemoError(f"precompute_teacher failed (exit {precompute.returncode}); its output is above")
    banner(5, total, f"distil on a 2-rank ZeRO-3 engine: 3 students x {s.distill_steps} steps")
    results = distil_all(s, out, teacher, paths, shards)
    banner(6, total, "convert the shards-distilled student to a packed 1.58-bit checkpoint and verify it")
    converted = out / "student-ternary"
    convert(out / "run-shards", converted, out / "convert.log")
    converted_ppl = vanilla_perplexity(converted, paths["heldout"], s.seq_len, s.eval_sequences)
    banner(7, total, "the same student as GGUFs for llama.cpp: TQ2_0 verified in llama.cpp, speed of each type")
    gguf = gguf_student(out / "run-shards", out, paths["heldout"], teacher, s)
    banner(8, total, f"evaluate: 2 tasks x {s.task_docs} documents made from the held-out files, generations "
           "(tools/evaluate.py on all six models)")
    models = {"teacher": teacher, "naive_ternary": f"ternary:{teacher}", "ce_only": out / "run-ce",
              "distilled_shards": out / "run-shards", "distilled_shared": out / "run-shared", "converted": converted}
    task_scores = evaluate_models(s, out, models, paths["heldout"])
    banner(9, total, "report")
    plot_losses(results, step0_eval(results["shared"])["eval_ppl_teacher"], out / "loss_curves.png")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    split_tokens = sum(len(ids) + 1 for ids in tok(read_docs(paths["train"]), add_special_tokens=False)["input_ids"])
    tokens = {"teacher": t.steps * t.batch * t.seq_len, "slice": slice_tokens,
              "teacher_split": split_tokens}
    sizes = {"teacher_bytes": dir_bytes(teacher), "student_bytes": dir_bytes(converted)}
    summary = summarize(s, results, converted_ppl, sizes, time.time() - start, tokens)
    summary["perplexity"]["gguf_llama_cpp"] = gguf["ppl"]
    summary["gguf_speed"] = gguf["speed"]
    summary["tasks"] = task_scores
    return publish(summary, out, write_report)


if __name__ == "__main__":
    entry(main, "demo")
