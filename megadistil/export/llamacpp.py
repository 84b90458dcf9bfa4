"""--verify for GGUF: does llama.cpp itself compute what the megadistil student computes?

The parent builds the student (as export/verify.py does) and records its logits on held-out sequences and its greedy
continuations. A subprocess that imports only llama_cpp (llama-cpp-python over the llama.cpp library) and numpy loads
the GGUF, tokenizes the held-out text with the GGUF's own tokenizer, and evaluates the same token ids. The parent
compares perplexity on the same tokens, logits, argmax agreement, greedy tokens and tokenization.

Where the two differ by design: llama.cpp quantizes a TQ matmul's activations to int8 per block of 256 values (Q8_K)
where the student uses one absmax scale per token, and it keeps the KV cache and non-ternary tensors in f16.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megadistil.export.sources import ExportError, ExportLoadError

INSTALL_HINT = "install llama-cpp-python with `make llama-cpp` (it builds llama.cpp from the registry's source)"


@dataclass
class LlamaCppVerifyConfig:
    """Tolerances against the student in float32 on the same token ids."""

    sequences: int = 8
    seq_len: int = 64
    new_tokens: int = 32
    prompts: int = 4
    prompt_len: int = 16
    text_chars: int = 4000  # held-out text that both tokenizers must split identically
    max_ppl_rel_diff: float = 0.02
    min_argmax_agreement: float = 0.95
    # Greedy continuations must be identical, except that one may part where the student's own top-2 logits are
    # closer than tie_margin (about the largest logit difference measured): there either token is the student's.
    tie_margin: float = 0.1


def require_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise ExportError(f"--verify of a GGUF runs it in llama.cpp, which is not installed: {INSTALL_HINT}")


# Both scripts below start with this. llama.cpp may keep a second, repacked copy of some weights for faster kernels
# ("extra buffer types": AMX tiles, interleaved rows). MEGADISTIL_LLAMA_PLAIN=1 turns that off; the binding does not
# expose the switch, so its model defaults are wrapped.
PRELUDE = r"""
import json, os, sys
import numpy as np
import llama_cpp.llama_cpp as _bindings
from llama_cpp import Llama

if os.environ.get("MEGADISTIL_LLAMA_PLAIN") == "1":
    _defaults = _bindings.llama_model_default_params

    def _plain_params():
        params = _defaults()
        if "use_extra_bufts" not in dict(params._fields_):  # a ctypes struct would take an unknown name silently
            raise SystemExit("this llama-cpp-python has no use_extra_bufts model parameter")
        params.use_extra_bufts = False
        return params

    _bindings.llama_model_default_params = _plain_params
"""

# Runs in a clean interpreter: llama.cpp through its Python binding, no megadistil, no torch.
SUBPROCESS = PRELUDE + r"""

gguf_path, io_dir = sys.argv[1], sys.argv[2]
inp = np.load(f"{io_dir}/input.npz", allow_pickle=False)
ids, prompts, eos = inp["ids"], inp["prompts"], inp["eos"]
new_tokens = int(inp["new_tokens"])
text = open(f"{io_dir}/text.txt", encoding="utf-8").read()
m = Llama(gguf_path, n_ctx=max(ids.shape[1], prompts.shape[1] + new_tokens), logits_all=True, n_batch=512,
          n_threads=int(os.environ.get("MEGADISTIL_LLAMA_THREADS", os.cpu_count())), verbose=False)
logits = []
for row in ids.tolist():
    m.reset()
    m.eval(row)
    logits.append(np.array(m.scores[: len(row)], dtype=np.float32))
gens = []
for row in prompts.tolist():  # greedy, EOS masked for every step like generate(min_new_tokens=...)
    m.reset()
    m.eval(row)
    out = list(row)
    for _ in range(new_tokens):
        last = np.array(m.scores[m.n_tokens - 1], dtype=np.float32)
        last[eos] = -np.inf
        out.append(int(last.argmax()))
        m.eval([out[-1]])
    gens.append(out)
text_ids = np.array(m.tokenize(text.encode("utf-8"), add_bos=False, special=bool(inp["special"])), dtype=np.int64)
np.savez(f"{io_dir}/output.npz", logits=np.stack(logits), generations=np.array(gens, dtype=np.int64),
         text_ids=text_ids)
print(json.dumps({"torch_imported": "torch" in sys.modules, "megadistil_imported": "megadistil" in sys.modules,
                  "n_vocab": m.n_vocab(), "metadata": {k: v for k, v in m.metadata.items()
                                                      if k.startswith(("general.", "tokenizer.ggml.pre"))}}))
"""


def run_llama_cpp(gguf_path: Path, ids: torch.Tensor, prompts: torch.Tensor, eos: list[int], new_tokens: int,
                  text: str, special: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """`special`: `text` spelling a special token is the control token (data.split_special_tokens=false)."""
    require_llama_cpp()
    with tempfile.TemporaryDirectory(prefix="megadistil-llamacpp-") as io_dir:
        np.savez(f"{io_dir}/input.npz", ids=ids.numpy(), prompts=prompts.numpy(), eos=np.array(eos, dtype=np.int64),
                 new_tokens=np.array(new_tokens), special=np.array(special))
        Path(io_dir, "text.txt").write_text(text, encoding="utf-8")
        proc, plain = _run_script(SUBPROCESS, [str(gguf_path), io_dir], cwd=io_dir)
        if proc.returncode != 0:
            raise ExportLoadError(f"verify: llama.cpp could not load/run {gguf_path}:\n{_failure(proc)}")
        with np.load(f"{io_dir}/output.npz", allow_pickle=False) as out:
            return dict(out), json.loads(proc.stdout.strip().splitlines()[-1]) | {"plain_weights": plain}


def _run_script(script: str, args: list[str], cwd: str | None = None) -> tuple[subprocess.CompletedProcess, bool]:
    """Run one of the scripts above; where llama.cpp dies by a signal, once more with its repacked weight layouts off
    (its AMX Q8_0 kernels segfault on some shapes, llama.cpp issue #20824). Returns the run and whether it was
    that plain one."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          check=False)
    if proc.returncode >= 0 or env.get("MEGADISTIL_LLAMA_PLAIN") == "1":
        return proc, env.get("MEGADISTIL_LLAMA_PLAIN") == "1"
    print(f"[megadistil] llama.cpp died ({_failure(proc).strip()}); running it again with its repacked weight layouts "
          "off (MEGADISTIL_LLAMA_PLAIN=1)", file=sys.stderr, flush=True)
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=cwd,
                          env={**env, "MEGADISTIL_LLAMA_PLAIN": "1"}, check=False), True


def _failure(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode < 0:
        return f"killed by signal {-proc.returncode}\n{proc.stderr[-4000:]}"
    return proc.stderr[-4000:]


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp of the mean next-token NLL over every position of every row (float64)."""
    lg = logits[:, :-1].astype(np.float64)
    top = lg.max(-1, keepdims=True)
    logp = lg - top - np.log(np.exp(lg - top).sum(-1, keepdims=True))
    return float(np.exp(-np.take_along_axis(logp, ids[:, 1:, None], -1).mean()))


@torch.no_grad()
def partings(student: torch.nn.Module, ref: torch.Tensor, got: np.ndarray, prompt_len: int) -> list[dict[str, Any]]:
    """Where each pair of greedy continuations first differs, with the student's top-2 logit gap there."""
    out = []
    for r, g in zip(ref.tolist(), got.tolist()):
        step = next((i for i in range(prompt_len, len(r)) if r[i] != g[i]), None)
        if step is not None:
            top = student(input_ids=torch.tensor([r[:step]])).logits[0, -1].float().topk(2).values
            out.append({"step": step - prompt_len, "gap": float(top[0] - top[1])})
    return out


def held_out_text(run_config, chars: int) -> str:
    for key in ("eval_text", "text"):
        files = [f for f in run_config.data[key] if Path(f).is_file()]
        if files:
            return Path(files[0]).read_text(encoding="utf-8", errors="replace")[:chars]
    return ""


def verify_gguf(gguf_path: Path, student: torch.nn.Module, tokenizer, run_config,
                cfg: LlamaCppVerifyConfig | None = None) -> dict[str, Any]:
    """Figures of llama.cpp against `student` (float32, eval mode) on held-out tokens; figures["passed"]."""
    from megadistil.export.verify import VerifyConfig, held_out_sequences, reference_outputs, splits_special_tokens

    cfg = cfg or LlamaCppVerifyConfig()
    hf_cfg = VerifyConfig(sequences=cfg.sequences, seq_len=cfg.seq_len, new_tokens=cfg.new_tokens,
                          prompts=cfg.prompts, prompt_len=cfg.prompt_len)
    ids, source = held_out_sequences(run_config, tokenizer, hf_cfg, student.config.vocab_size)
    ref = reference_outputs(student, ids, hf_cfg)
    eos = student.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    text = held_out_text(run_config, cfg.text_chars)
    split = splits_special_tokens(run_config)  # both tokenizers read the text as the run did
    got, info = run_llama_cpp(gguf_path, ids, ref["prompts"], eos, cfg.new_tokens, text, special=not split)
    ref_logits = ref["logits"].numpy()
    ppl_ref, ppl_got = perplexity(ref_logits, ids.numpy()), perplexity(got["logits"], ids.numpy())
    hf_text_ids = tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"] if text else []
    figures = {
        "sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "source": source,
        "prompts": int(ref["prompts"].shape[0]), "new_tokens": cfg.new_tokens,
        "perplexity_student": ppl_ref, "perplexity_llama_cpp": ppl_got, "ppl_rel_diff": abs(ppl_got / ppl_ref - 1),
        "max_abs_diff": float(np.abs(ref_logits - got["logits"]).max()), "logit_range": float(np.abs(ref_logits).max()),
        "argmax_agreement": float((ref_logits.argmax(-1) == got["logits"].argmax(-1)).mean()),
        "generations_identical": bool(np.array_equal(ref["generations"].numpy(), got["generations"])),
        "generation_tokens_agreement": float((ref["generations"].numpy() == got["generations"]).mean()),
        "partings": partings(student, ref["generations"], got["generations"], ref["prompts"].shape[1]),
        "tokenization_identical": list(got["text_ids"]) == list(hf_text_ids), "text_tokens": len(hf_text_ids),
        "tolerance": {"max_ppl_rel_diff": cfg.max_ppl_rel_diff, "min_argmax_agreement": cfg.min_argmax_agreement,
                      "tie_margin": cfg.tie_margin},
        "loaded_as": info,
    }
    figures["passed"] = (figures["ppl_rel_diff"] <= cfg.max_ppl_rel_diff
                         and figures["argmax_agreement"] >= cfg.min_argmax_agreement
                         and all(p["gap"] < cfg.tie_margin for p in figures["partings"])
                         and figures["tokenization_identical"]
                         and not info["torch_imported"] and not info["megadistil_imported"])
    return figures


def format_llama_cpp_figures(f: dict[str, Any]) -> str:
    tol = f["tolerance"]
    meta = f["loaded_as"]["metadata"]
    parted = "".join(f"; one parts at token {p['step']} where the student's top-2 logits are {p['gap']:.3g} apart"
                     for p in f["partings"])
    return "\n".join([
        (f"verify: llama.cpp ran {meta.get('general.architecture')} with the GGUF's own tokenizer "
         f"({meta.get('tokenizer.ggml.pre')}); {f['sequences']} sequences x {f['seq_len']} tokens from {f['source']}"
         + ("; its repacked weight layouts off (the first run crashed)" if f["loaded_as"].get("plain_weights") else "")),
        (f"  perplexity: llama.cpp {f['perplexity_llama_cpp']:.4f}, student {f['perplexity_student']:.4f} "
         f"({100 * f['ppl_rel_diff']:.3f}% apart; tolerance {100 * tol['max_ppl_rel_diff']:g}%)"),
        (f"  max |logit diff| = {f['max_abs_diff']:.3g} (logits up to {f['logit_range']:.3g}); argmax agreement "
         f"{100 * f['argmax_agreement']:.2f}% (tolerance >= {100 * tol['min_argmax_agreement']:g}%)"),
        (f"  greedy continuations ({f['new_tokens']} tokens): {f['prompts'] - len(f['partings'])} of {f['prompts']} "
         f"identical{parted}" + (f" (a parting is allowed below {tol['tie_margin']:g})" if parted else "")),
        f"  tokenization of {f['text_tokens']} held-out tokens identical to transformers': {f['tokenization_identical']}",
        f"  {'PASSED' if f['passed'] else 'FAILED'}",
    ])


# Prompt processing (one batch of `prompt` tokens) and generation (`gen` single-token steps) as llama-bench measures
# them: fixed token ids, since speed does not depend on the values.
SPEED_SUBPROCESS = PRELUDE + r"""
import time

path, prompt, gen, repeats, threads = sys.argv[1], *map(int, sys.argv[2:6])
m = Llama(path, n_ctx=prompt + gen + 8, n_batch=prompt, n_threads=threads, n_threads_batch=threads, verbose=False)
tokens = np.random.default_rng(0).integers(1, m.n_vocab(), prompt + gen).tolist()
m.eval(tokens[:8])  # warm-up: first-touch of the weights
pp, tg = [], []
for _ in range(repeats):
    m.reset()
    t = time.perf_counter()
    m.eval(tokens[:prompt])
    pp.append(prompt / (time.perf_counter() - t))
    m.reset()
    m.eval(tokens[:1])
    t = time.perf_counter()
    for tok in tokens[1 : gen + 1]:
        m.eval([tok])
    tg.append(gen / (time.perf_counter() - t))
print(json.dumps({"pp_tokens_per_s": float(np.median(pp)), "tg_tokens_per_s": float(np.median(tg))}))
"""


def measure_speed(gguf_path: Path, prompt: int = 512, gen: int = 128, repeats: int = 3,
                  threads: int | None = None) -> dict[str, float]:
    """llama.cpp's prompt-processing and generation tokens/s for one GGUF (median of `repeats`), in a subprocess."""
    require_llama_cpp()
    threads = threads or len(os.sched_getaffinity(0))
    proc, plain = _run_script(SPEED_SUBPROCESS, [str(gguf_path), str(prompt), str(gen), str(repeats), str(threads)])
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp could not run {gguf_path}:\n{_failure(proc)}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"threads": threads, "prompt": prompt, "gen": gen,
                                                               "plain_weights": plain}


def llama_cpp_perplexity(gguf_path: Path, ids: torch.Tensor) -> float:
    """Perplexity that llama.cpp gives the token ids [sequences, seq_len] (every next token of every row)."""
    got, _ = run_llama_cpp(gguf_path, ids, ids[:0, :1], [], 0, "")
    return perplexity(got["logits"], ids.numpy())
