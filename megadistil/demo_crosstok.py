"""`make demo-crosstok`: the demo's student distilled from a teacher with another tokenizer, offline, on 2 CPU cores.

Same corpus, held-out files, slice and student budget as `make demo` (megadistil.demo). The student's base is the demo
teacher (megadistil/assets/demo-teacher, 4k-token BPE); the other teacher (megadistil/assets/demo-teacher-crosstok) is
a model of the same size pretrained on the same training split with its own tokenizer (6k tokens, digits split). The
runs, each a BitNet student from the same naive ternarization with the same steps and tokens:

  crosstok      forward KL from the other teacher, live (teacher.kind=hf): it tokenizes each window's text itself,
                positions where both models have read the same text carry its targets, and its top-k is mapped onto
                the student's tokens that spell the same bytes (the rest joins the tail)
  crosstok_uld  CE + ULD from the other teacher: sorted probabilities, no vocabulary mapping
  sametok       forward KL from the student's own base (the shared teacher): `make demo`'s shared student
  ce            CE only (QAT without a teacher): the baseline

Perplexity is per student token on the held-out files; bits per byte also places the two teachers, whose tokens differ.

  python -m megadistil.demo_crosstok --out runs/demo-crosstok [--quick]
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from megadistil.bitnet.kernels import cpu_model_name
from megadistil.demo import (
    CROSSTOK_TEACHER,
    DemoSettings,
    TeacherSettings,
    banner,
    demo_setup,
    entry,
    final_eval,
    make_slice,
    make_teacher,
    publish,
    run_overrides,
    split_corpus,
    step0_eval,
    train_runs,
)

OTHER = ["teacher.kind=hf", "teacher.top_k=64"]  # + teacher.path, the other teacher
RUNS = {  # run -> (what the report calls it, overrides beyond the common ones)
    "crosstok": ("student distilled from the other-tokenizer teacher (forward KL, mapped vocabulary)", OTHER),
    "crosstok_uld": ("student distilled from the other-tokenizer teacher (CE + ULD)",
                     [*OTHER, "loss.kind=uld", "loss.ce_weight=1.0"]),
    "sametok": ("student distilled from its own base, shared teacher (forward KL)", []),
    "ce": ("CE-only student (QAT on the slice, no teacher)", ["loss.kd_weight=0.0", "loss.ce_weight=1.0"]),
}


@torch.no_grad()
def heldout_nll(model_dir: Path, heldout: Path, seq_len: int, sequences: int) -> dict[str, float]:
    """Per-token perplexity and bits per byte of an HF dir on the held-out sequences of its own tokenizer (the bytes
    are those of the predicted tokens' text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megadistil.bitnet import hardware, resolve_dtype
    from megadistil.data.packed import eval_sequences

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype("auto", hardware("cpu"))).eval()
    nll, tokens, nbytes = 0.0, 0, 0
    for seq in eval_sequences([str(heldout)], tok, seq_len, sequences):
        ids = torch.from_numpy(seq).unsqueeze(0)
        nll += float(model(input_ids=ids, labels=ids).loss) * (seq_len - 1)
        tokens += seq_len - 1
        nbytes += student_bytes(tok, seq)
    return {"ppl": math.exp(nll / tokens), "bits_per_byte": nll / math.log(2) / nbytes}


def student_bytes(tok, seq) -> int:
    """UTF-8 bytes of the text a sequence's predicted tokens (all but the first) spell, EOS counted as one."""
    body = [int(t) for t in seq[1:]]
    eos = sum(t == tok.eos_token_id for t in body)
    text = tok.decode([t for t in body if t != tok.eos_token_id], clean_up_tokenization_spaces=False)
    return len(text.encode()) + eos


def bits_per_byte(ppl: float, heldout: Path, tokenizer_dir: Path, seq_len: int, sequences: int) -> float:
    """A student's per-token perplexity (student tokens) as bits per byte of the same held-out sequences."""
    from transformers import AutoTokenizer

    from megadistil.data.packed import eval_sequences

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    seqs = eval_sequences([str(heldout)], tok, seq_len, sequences)
    nbytes = sum(student_bytes(tok, s) for s in seqs)
    return math.log(ppl) * len(seqs) * (seq_len - 1) / math.log(2) / nbytes


def distil(s: DemoSettings, out: Path, base: Path, other: Path, paths: dict[str, Path]) -> dict[str, dict]:
    common = [*run_overrides(s, base, paths["heldout"]), f"data.text=[{paths['slice']}]"]
    runs = {}
    for name, (_, extra) in RUNS.items():
        runs[name] = [*common, *extra, *([f"teacher.path={other}"] if "teacher.kind=hf" in extra else [])]
    return train_runs(s, out, runs)


def summarize(s: DemoSettings, results: dict, teachers: dict, paths: dict, base: Path, wall_s: float) -> dict:
    rows = {"teacher": {"ppl": teachers["teacher"]["ppl"], "bits_per_byte": teachers["teacher"]["bits_per_byte"]},
            "other_teacher": {"ppl": None, "bits_per_byte": teachers["other_teacher"]["bits_per_byte"],
                              "own_token_ppl": teachers["other_teacher"]["ppl"]}}
    naive = step0_eval(results["ce"])["eval_ppl_student"]
    for name, ppl in [("naive_ternary", naive)] + [(k, final_eval(r)) for k, r in results.items()]:
        rows[name] = {"ppl": ppl, "bits_per_byte": bits_per_byte(ppl, paths["heldout"], base, s.seq_len,
                                                                  s.eval_sequences)}
    shares = [m["kd_target_share"] for m in results["crosstok"]["metrics"] if "kd_target_share" in m]
    return {"settings": asdict(s), "models": rows, "wall_s": wall_s,
            "kd_target_share": sum(shares) / len(shares), "run_wall_s": {k: r["wall_s"] for k, r in results.items()}}


LABELS = {"teacher": "student's base: the demo teacher (4k BPE)",
          "other_teacher": "the other teacher (6k BPE, digits split), on its own tokens",
          "naive_ternary": "base naively ternarized (no training)", **{k: v[0] for k, v in RUNS.items()}}


def write_report(summary: dict, out: Path) -> Path:
    m = summary["models"]
    lines = ["# megadistil cross-tokenizer demo", "",
             (f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {cpu_model_name()}"
             f"; total wall time {summary['wall_s'] / 60:.1f} min."), "",
             ("Held-out files no model trained on. Perplexity per student token (the other teacher's is per its own "
             "token, not comparable); bits per byte compares all."), "",
             "| model | held-out perplexity | bits per byte |", "|---|---:|---:|"]
    for key, row in m.items():
        ppl = f"{row['ppl']:.2f}" if row["ppl"] is not None else f"({row['own_token_ppl']:.2f} per own token)"
        lines.append(f"| {LABELS[key]} | {ppl} | {row['bits_per_byte']:.4f} |")
    lines += ["", (f"Positions with a target from the other teacher (both tokenizations' boundaries coincide, and "
                   f"a top-k token the student has): {100 * summary['kd_target_share']:.1f} % of the trained tokens "
                   "(crosstok); the others have no KD term."), "",
              "| run | wall time |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} s |" for k, v in summary["run_wall_s"].items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    s, out = demo_setup(argv, __doc__, "runs/demo-crosstok")
    start, total = time.time(), 5
    banner(1, total, "corpus: the Python standard library's source, split by file (~1 file in 10 held out)")
    paths = split_corpus(out)
    banner(2, total, "teachers: the student's base (4k BPE) and the other teacher (6k BPE, digits split)")
    base = make_teacher(TeacherSettings(), paths["train"], out / "teacher")
    other = make_teacher(CROSSTOK_TEACHER, paths["train"], out / "teacher-crosstok",
                         made_by="python -m megadistil.demo --remake-teacher crosstok")
    banner(3, total, f"distillation slice: ~{s.slice_tokens:,} tokens of the training split")
    paths["slice"] = out / "slice.jsonl"
    make_slice(paths["train"], base, s.slice_tokens, paths["slice"])
    banner(4, total, f"distil on a 2-rank ZeRO-3 engine: {len(RUNS)} students x {s.distill_steps} steps")
    results = distil(s, out, base, other, paths)
    banner(5, total, "held-out evaluation of the teachers, report")
    teachers = {"teacher": heldout_nll(base, paths["heldout"], s.seq_len, s.eval_sequences),
                "other_teacher": heldout_nll(other, paths["heldout"], s.seq_len, s.eval_sequences)}
    return publish(summarize(s, results, teachers, paths, base, time.time() - start), out, write_report)


if __name__ == "__main__":
    entry(main, "demo-crosstok")
