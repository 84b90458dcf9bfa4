"""`make demo-generate`: generate, then distil. Two more students of `make demo`'s budget, on 2 CPU cores.

Same corpus, held-out files, teacher, slice and student budget as `make demo` (megadistil.demo). The runs, each a
BitNet student from the same naive ternarization with the same steps and micro-batches:

  shared      forward KL from the live shared teacher on the slice: `make demo`'s shared student, the baseline
  generated   forward KL from teacher shards of text the teacher wrote: tools/generate_teacher_data.py continues
              the first PROMPT_TOKENS tokens of every seq_len-token piece of the slice (so the generated text is about
              the slice's size) and writes teacher shards (top-64 + tail) of the generated documents in the same pass
  onpolicy    half the micro-batches on-policy: the student continues the first PROMPT_TOKENS tokens of its slice
              sequences, the shared teacher scores the student's own tokens (reverse KL on the generated tokens
              only); the other half as `shared`

The report gives held-out perplexity, the demo's two held-out tasks (tools/evaluate.py) and the wall time of each
student (for `generated`, the generation and its shards too); CE-only and converted students are `make demo`'s.

  python -m megadistil.demo_generate --out runs/demo-generate [--quick]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from megadistil.bitnet.kernels import cpu_model_name
from megadistil.demo import (
    ROOT,
    DemoError,
    DemoSettings,
    banner,
    demo_setup,
    entry,
    evaluate_models,
    final_eval,
    make_slice,
    make_teacher,
    publish,
    read_docs,
    run_overrides,
    split_corpus,
    step0_eval,
    task_report,
    train_runs,
    write_docs,
)

PROMPT_TOKENS = 32
SAMPLING = ["--temperatures", "1.0", "--top-p", "0.95", "--seed", "0"]  # the teacher's samples: full temperature
ONPOLICY = {"fraction": 0.5, "max_new_tokens": 96}  # the quick demo generates fewer tokens (quick_onpolicy)
LABELS = {
    "teacher": "teacher (pretrained on the whole training split)",
    "naive_ternary": "teacher naively ternarized (post-training quantization, no training)",
    "shared": "student distilled from the shared live teacher on the slice (off-policy)",
    "generated": "student distilled from teacher shards of teacher-generated text",
    "onpolicy": "student distilled on-policy (half the micro-batches) from the shared teacher",
}


def prompt_pieces(slice_path: Path, tokenizer_dir: Path, seq_len: int, min_tokens: int) -> list[str]:
    """The slice's documents cut into pieces of seq_len tokens (whole tokens, by their character offsets), pieces
    shorter than min_tokens dropped: the generator reads each piece's first tokens as a prompt, so a prompt per
    seq_len tokens of the slice and continuations filling the rest make generated text of about the slice's size."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pieces = []
    for doc in read_docs(slice_path):
        spans = tok(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for lo in range(0, len(spans), seq_len):
            chunk = spans[lo:lo + seq_len]
            if len(chunk) >= min_tokens:
                pieces.append(doc[chunk[0][0]:chunk[-1][1]])
    return pieces


def generate(s: DemoSettings, base: Path, slice_path: Path, out: Path) -> tuple[Path, dict]:
    """Teacher continuations of the slice's prompts and teacher shards of them; returns the shards and the
    generation's figures (prompts, new tokens, stops, wall time)."""
    pieces = write_docs(out / "prompt-pieces.jsonl", prompt_pieces(slice_path, base, s.seq_len, 2 * PROMPT_TOKENS))
    gen, shards = out / "generated", out / "generated-shards"
    for d in (gen, shards):
        shutil.rmtree(d, ignore_errors=True)  # a fresh generation: the run resumes only its own arguments
    cmd = [sys.executable, "tools/generate_teacher_data.py", "--teacher", str(base), "--text", str(pieces),
           "--prompt-tokens", str(PROMPT_TOKENS), "--max-new-tokens", str(s.seq_len - PROMPT_TOKENS), *SAMPLING,
           "--batch-size", "16", "--out", str(gen), "--shards", str(shards), "--shard-top-k", "64",
           "--shard-seq-len", str(s.seq_len), "--no-progress"]
    start = time.time()
    with (out / "generate.log").open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise DemoError(f"generate_teacher_data failed (exit {proc.returncode}); see {out / 'generate.log'}")
    lines = [json.loads(line) for line in (gen / "generations.jsonl").read_text().splitlines()]
    stops = json.loads((gen / "generation.json").read_text())["stops"]
    return shards, {"prompts": len(lines), "new_tokens": sum(len(x["continuation_ids"]) for x in lines),
                    "stops": stops, "wall_s": time.time() - start}


def onpolicy_overrides(s: DemoSettings) -> list[str]:
    new = min(ONPOLICY["max_new_tokens"], s.seq_len - PROMPT_TOKENS)
    if s.distill_steps < DemoSettings().distill_steps:
        new = min(new, 32)  # --quick: the same path, fewer tokens
    return [f"onpolicy.fraction={ONPOLICY['fraction']}", f"onpolicy.prompt_tokens={PROMPT_TOKENS}",
            f"onpolicy.max_new_tokens={new}"]


def distil(s: DemoSettings, out: Path, base: Path, paths: dict[str, Path], shards: Path) -> dict[str, dict]:
    common = run_overrides(s, base, paths["heldout"])
    on_slice = [*common, f"data.text=[{paths['slice']}]"]
    runs = {"shared": on_slice,
            "generated": [*common, "teacher.kind=shards", f"data.shards={shards}", "data.text=[]"],
            "onpolicy": [*on_slice, *onpolicy_overrides(s)]}
    return train_runs(s, out, runs)


def onpolicy_figures(metrics: list[dict]) -> dict:
    """The on-policy run's steps: reverse KL on its own samples (first and last on-policy quarter), generation time,
    generated tokens/s, the share of loss tokens that were on-policy."""
    steps = [m for m in metrics if m.get("onpolicy_share", 0) > 0]
    if not steps:
        raise DemoError("the on-policy run logged no on-policy step (metrics.jsonl has no onpolicy_share > 0)")
    q = max(len(steps) // 4, 1)
    mean = lambda rows, key: sum(m[key] for m in rows) / len(rows)
    return {"steps": len(steps), "kd_first": mean(steps[:q], "onpolicy_kd"), "kd_last": mean(steps[-q:], "onpolicy_kd"),
            "gen_time_s": sum(m["gen_time_s"] for m in steps), "gen_tokens_per_s": mean(steps, "gen_tokens_per_s"),
            "share": mean(steps, "onpolicy_share")}


def summarize(s: DemoSettings, results: dict, generation: dict, tasks: dict, wall_s: float) -> dict:
    start = step0_eval(results["shared"])
    ppl = {"teacher": start["eval_ppl_teacher"], "naive_ternary": start["eval_ppl_student"],
           **{k: final_eval(r) for k, r in results.items()}}
    run_wall = {k: r["wall_s"] for k, r in results.items()}
    return {"settings": asdict(s), "perplexity": ppl, "tasks": tasks, "wall_s": wall_s, "run_wall_s": run_wall,
            "generation": generation, "onpolicy": onpolicy_figures(results["onpolicy"]["metrics"])}


def write_report(summary: dict, out: Path) -> Path:
    ppl, gen, op = summary["perplexity"], summary["generation"], summary["onpolicy"]
    wall = summary["run_wall_s"]
    lines = ["# megadistil demo: generate, then distil", "",
             (f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {cpu_model_name()}; total wall time "
              f"{summary['wall_s'] / 60:.1f} min."), "", "Held-out perplexity on files no model trained on:", "",
             "| model | held-out perplexity | vs teacher | wall time |", "|---|---:|---:|---:|"]
    for k, v in ppl.items():
        time_s = (f"{wall[k]:.0f} s" + (f" + {gen['wall_s']:.0f} s generation" if k == "generated" else "")
                  if k in wall else "")
        lines.append(f"| {LABELS[k]} | {v:.2f} | {v / ppl['teacher']:.3f}x | {time_s} |")
    lines += ["", (f"Teacher-generated text: {gen['prompts']} prompts (the first {PROMPT_TOKENS} tokens of each "
                   f"{summary['settings']['seq_len']}-token piece of the slice), {gen['new_tokens']:,} new tokens, "
                   f"continuations ended at EOS: {gen['stops']['eos']}; sampling `{' '.join(SAMPLING)}`."), "",
              (f"On-policy: {op['steps']} of {summary['settings']['distill_steps']} steps had on-policy "
               f"micro-batches ({100 * op['share']:.0f} % of their loss tokens); reverse KL on the student's own "
               f"samples {op['kd_first']:.3f} (first quarter of them) -> {op['kd_last']:.3f} (last quarter); "
               f"generation took {op['gen_time_s']:.0f} s of the run at {op['gen_tokens_per_s']:.0f} tokens/s."),
              *task_report(summary, out, LABELS), "", "Settings: `" + json.dumps(summary["settings"]) + "`", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # as megadistil.demo: no BitLinear compile for a few forwards
    s, out = demo_setup(argv, __doc__, "runs/demo-generate")
    start, total = time.time(), 6
    banner(1, total, "corpus: the Python standard library's source, split by file (~1 file in 10 held out)")
    paths = split_corpus(out)
    banner(2, total, "teacher: the demo's (shipped)")
    base = make_teacher(s.teacher, paths["train"], out / "teacher")
    banner(3, total, f"distillation slice: ~{s.slice_tokens:,} tokens of the training split")
    paths["slice"] = out / "slice.jsonl"
    make_slice(paths["train"], base, s.slice_tokens, paths["slice"])
    banner(4, total, f"the teacher continues the slice's prompts ({PROMPT_TOKENS} tokens each), and teacher shards")
    shards, generation = generate(s, base, paths["slice"], out)
    banner(5, total, f"distil on a 2-rank ZeRO-3 engine: 3 students x {s.distill_steps} steps")
    results = distil(s, out, base, paths, shards)
    banner(6, total, f"evaluate: 2 tasks x {s.task_docs} documents made from the held-out files; report")
    models = {"teacher": base, "naive_ternary": f"ternary:{base}", **{k: out / f"run-{k}" for k in results}}
    tasks = evaluate_models(s, out, models, paths["heldout"])
    return publish(summarize(s, results, generation, tasks, time.time() - start), out, write_report)


if __name__ == "__main__":
    entry(main, "demo-generate")
