"""--verify: does vanilla transformers, with no megadistil code, compute what the megadistil student computes?

The parent builds the student (base + to_bitnet + the checkpoint's tensors, eval mode, float32 but for the LoRA
factors, kept in the training dtype: the codes it trained with) and records its logits
on held-out sequences and its greedy generations. A subprocess that imports only torch and transformers (plus
safetensors, which transformers itself needs) loads the exported dir as a user would and records the same. The parent
compares: max |Δlogit|, argmax agreement, identical generations.
"""

from __future__ import annotations

import itertools
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
from safetensors.torch import load_file, save_file
from torch import nn

from megadistil.export.sources import BaseModel, ExportLoadError, StudentParts
from megadistil.export.ternary import StudentSpec
from megadistil.utils import short_dtype_name, torch_dtype


def load_failure(error: RuntimeError, runtime: str) -> dict[str, Any]:
    """A verification that failed because `runtime` could not load/run the export: figures with passed=False and the
    cause, the last line of the runtime's stderr (its exception), under "error"."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    return {"passed": False, "error": f"{runtime} could not load/run it: {lines[-1] if lines else error}",
            "stderr": str(error)}


@dataclass
class VerifyConfig:
    """Tolerances are on logits of the exported model loaded in its own dtype vs the student in float32.

    fp32 exports reproduce the student's integer matmuls exactly, so only summation order differs (~1e-5); a bf16
    export rounds weight_scale and every activation to bf16, which moves logits by a few 0.1 on a trained model
    and can flip near-ties, so it is held to argmax agreement instead of identical generations.
    """

    sequences: int = 8
    seq_len: int = 64
    new_tokens: int = 32
    prompts: int = 4
    prompt_len: int = 16
    seed: int = 0
    max_abs_diff: dict[str, float] | None = None
    min_argmax_agreement: dict[str, float] | None = None
    require_identical_generations: dict[str, bool] | None = None

    def tolerance(self, dtype: str) -> dict[str, Any]:
        """The tolerances of an export in `dtype`, either of its names (fp32 or float32: --dtype takes both); the
        overrides are keyed by either too."""
        def by_short(d: dict[str, Any] | None) -> dict[str, Any]:
            return {short_dtype_name(k): v for k, v in (d or {}).items()}

        key = short_dtype_name(dtype)
        max_abs = {"fp32": 1e-3, "fp16": 0.5, "bf16": 1.0} | by_short(self.max_abs_diff)
        agree = {"fp32": 1.0, "fp16": 0.98, "bf16": 0.95} | by_short(self.min_argmax_agreement)
        gens = {"fp32": True, "fp16": False, "bf16": False} | by_short(self.require_identical_generations)
        return {"max_abs_diff": max_abs[key], "min_argmax_agreement": agree[key],
                "identical_generations": gens[key]}


def build_student(base: BaseModel, parts: StudentParts, spec: StudentSpec, run_config) -> nn.Module:
    """The megadistil student in eval mode, in float32 with its LoRA factors in the training dtype (to_dtype), with its
    parameters rounded through the training dtype."""
    from transformers import AutoModelForCausalLM

    from megadistil.bitnet import to_bitnet

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=spec.train_dtype,
                                                 attn_implementation=run_attention(base, run_config))
    b = run_config.bitnet
    to_bitnet(model, lora_rank=spec.lora_rank, lora_alpha=b.lora_alpha, exclude=tuple(b.exclude), subln=spec.subln,
              delta=any(n.endswith(".delta") for n in parts.tensors),
              delta_format="int8" if any(n.endswith(".delta_scale") for n in parts.tensors) else "dtype",
              backward=b.backward)
    state = model.state_dict()
    with torch.no_grad():
        for name in parts.tensors:
            if name not in state:
                raise RuntimeError(f"checkpoint tensor {name!r} has no place in the rebuilt student")
            state[name].copy_(parts.get(name).to(state[name].dtype))
    return to_dtype(model, torch.float32, spec.train_dtype).eval()


def to_dtype(model: nn.Module, dtype: torch.dtype, factor_dtype: torch.dtype) -> nn.Module:
    """model.to(dtype), except that every BitLinear's LoRA factors keep `factor_dtype` (the training dtype) and their
    values: the dtype of A and B alone decides how s·B·A is formed (bitnet.linear._factors: a bf16 GEMM for bf16
    factors), so float32 factors of a bf16-trained student would give other ternary codes than the ones it trained
    with and the export writes (ternary.layer_codes)."""
    from megadistil.bitnet import BitLinear

    factors = [(m, m.lora_A.data, m.lora_B.data) for m in model.modules() if isinstance(m, BitLinear)]
    model.to(dtype)
    for m, a, b in factors:
        m.lora_A.data, m.lora_B.data = a.to(factor_dtype), b.to(factor_dtype)
    return model


def run_attention(base: BaseModel, run_config) -> str:
    """The run's model.attn_implementation as resolved for this machine (the check runs on CPU); a choice this machine
    cannot run (a GPU run's flash_attention_2) becomes what `auto` picks for the model here."""
    from transformers import AutoConfig

    from megadistil.models import attn_implementation

    config = AutoConfig.from_pretrained(base.path)
    try:
        return attn_implementation(config, run_config.model.attn_implementation, "cpu")
    except ValueError:
        return attn_implementation(config, "auto", "cpu")


def splits_special_tokens(run_config) -> bool:
    """The run's data.split_special_tokens: how its text was tokenized (a config from before the key: True)."""
    return bool(run_config.data.get("split_special_tokens", True))


def held_out_sequences(run_config, tokenizer, cfg: VerifyConfig, vocab_size: int) -> tuple[torch.Tensor, str]:
    """Held-out text if the run had some (data.eval_text), else the training text, else random tokens; tokenized as
    the run tokenized it."""
    from megadistil.data.text import pack_text

    split = splits_special_tokens(run_config)
    for key in ("eval_text", "text"):
        files = [f for f in run_config.data[key] if Path(f).is_file()]
        if files:
            seqs = list(itertools.islice(pack_text(files, tokenizer, cfg.seq_len, split_special_tokens=split),
                                         cfg.sequences))
            if len(seqs) == cfg.sequences:
                return torch.as_tensor(np.stack(seqs), dtype=torch.int64), f"data.{key}"
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, vocab_size, (cfg.sequences, cfg.seq_len), generator=g), "random tokens"


@torch.no_grad()
def reference_outputs(model: nn.Module, ids: torch.Tensor, cfg: VerifyConfig) -> dict[str, torch.Tensor]:
    logits = model(input_ids=ids).logits.float()
    prompts = ids[: cfg.prompts, : cfg.prompt_len]
    return {"input_ids": ids, "logits": logits, "prompts": prompts, "generations": greedy(model, prompts, cfg)}


def greedy(model: nn.Module, prompts: torch.Tensor, cfg: VerifyConfig) -> torch.Tensor:
    # min_new_tokens keeps both models generating all 32 tokens (EOS is masked the same way on both sides).
    return model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, pad_token_id=0)


# Runs in a clean interpreter: no megadistil import, exactly what a user of the exported dir has.
SUBPROCESS = r"""
import json, sys
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

out_dir, io_dir, new_tokens, dtype, attn = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
ref = load_file(f"{io_dir}/reference.safetensors")
model = AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation=attn,
                                             dtype=dtype if dtype == "auto" else getattr(torch, dtype)).eval()
with torch.no_grad():
    logits = model(input_ids=ref["input_ids"]).logits.float()
    prompts = ref["prompts"]
    gens = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
save_file({"logits": logits.contiguous(), "generations": gens.contiguous()}, f"{io_dir}/exported.safetensors")
linear = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules() if "BitLinear" in type(m).__name__})
print(json.dumps({"megadistil_imported": any(k.split(".")[0] == "megadistil" for k in sys.modules),
                  "model_class": type(model).__name__, "linear_classes": linear, "dtype": str(model.dtype),
                  "attn_implementation": model.config._attn_implementation}))
"""


def compute_dtype(export_dtype: str) -> str:
    """The dtype the exported model runs in for the check: its own ("auto"), except that a bf16/fp16 export runs in
    float32 on a device without fast bf16 GEMMs (the rule of model.dtype=auto; ~80x faster on AVX2-only CPUs).
    Upcasting is exact, so the export's own rounding (weight scales in its dtype) is still what is checked."""
    from megadistil.bitnet import hardware

    return "auto" if torch_dtype(export_dtype) == torch.float32 or hardware("cpu").bf16_fast else "float32"  # the check runs on the CPU


def run_exported(output: Path, reference: dict[str, torch.Tensor], cfg: VerifyConfig,
                 dtype: str = "auto", attn: str = "sdpa") -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory(prefix="megadistil-verify-") as io_dir:
        # clones: the prompts are a slice of the ids, a view safetensors refuses where it is contiguous (prompts=1)
        save_file({k: v.clone() for k, v in reference.items()}, f"{io_dir}/reference.safetensors")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([sys.executable, "-c", SUBPROCESS, str(output), io_dir, str(cfg.new_tokens), dtype, attn],
                              capture_output=True, text=True, cwd=io_dir, env=env, check=False)
        if proc.returncode != 0:
            raise ExportLoadError(f"verify: transformers could not load/run {output}:\n{proc.stderr[-4000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        return load_file(f"{io_dir}/exported.safetensors"), info


def compare(reference: dict[str, torch.Tensor], exported: dict[str, torch.Tensor], dtype: str,
            cfg: VerifyConfig, source: str) -> dict[str, Any]:
    ref, got = reference["logits"], exported["logits"]
    tol = cfg.tolerance(dtype)
    figures = {
        "sequences": int(ref.shape[0]), "seq_len": int(ref.shape[1]), "source": source, "dtype": dtype,
        "max_abs_diff": float((ref - got).abs().max()),
        "logit_range": float(ref.abs().max()),
        "argmax_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
        "generations_identical": bool(torch.equal(reference["generations"], exported["generations"])),
        "generation_tokens_agreement": float((reference["generations"] == exported["generations"]).float().mean()),
        "tolerance": tol,
    }
    figures["passed"] = (figures["max_abs_diff"] <= tol["max_abs_diff"]
                         and figures["argmax_agreement"] >= tol["min_argmax_agreement"]
                         and (figures["generations_identical"] or not tol["identical_generations"]))
    return figures


def verify_export(output: Path, base: BaseModel, parts: StudentParts, spec: StudentSpec, run_config, dtype: str,
                  tokenizer_dir: Path, cfg: VerifyConfig | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    cfg = cfg or VerifyConfig()
    model = build_student(base, parts, spec, run_config)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids, source = held_out_sequences(run_config, tokenizer, cfg, model.config.vocab_size)
    reference = reference_outputs(model, ids, cfg)
    del model
    try:
        exported, info = run_exported(Path(output), reference, cfg, compute_dtype(dtype),
                                      run_attention(base, run_config))
    except ExportLoadError as e:  # an export that does not load failed its verification: it is kept for a look
        return load_failure(e, "transformers")
    figures = compare(reference, exported, dtype, cfg, source)
    figures.update(loaded_as=info)
    if info["megadistil_imported"]:
        figures["passed"] = False
        figures["error"] = "the verifying subprocess imported megadistil"
    return figures


def format_figures(f: dict[str, Any]) -> str:
    tol = f["tolerance"]
    loaded = f["loaded_as"]
    head = (f"verify: {loaded['model_class']} ({', '.join(loaded['linear_classes'])}) loaded by vanilla transformers "
            f"in {loaded['dtype']} with {loaded['attn_implementation']} attention; {f['sequences']} sequences x "
            f"{f['seq_len']} tokens from {f['source']}")
    diff = (f"  max |logit diff| = {f['max_abs_diff']:.3g}  (tolerance {tol['max_abs_diff']:g}; "
            f"logits up to {f['logit_range']:.3g})")
    agree = (f"  argmax agreement = {100 * f['argmax_agreement']:.2f}%  "
             f"(tolerance >= {100 * tol['min_argmax_agreement']:g}%)")
    gens = (f"  greedy generations identical: {f['generations_identical']} "
            f"({100 * f['generation_tokens_agreement']:.1f}% of tokens; required: {tol['identical_generations']})")
    return "\n".join([head, diff, agree, gens, f"  {'PASSED' if f['passed'] else 'FAILED'}"])
