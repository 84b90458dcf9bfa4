"""Run under `deepspeed --num_gpus 2`: several training runs in turn inside these two processes (one launch instead
of one per run: the process group outlives each Trainer). argv[1] is a JSON list of runs:

    {"out": run dir, "overrides": [key=value ...], "nan_batches": [i, ...], "relora_probe": true|false,
     "relora_tolerance": the logit change a reset may make (default 0: bitwise), "ds_config": path (default
     ds_configs/zero3.json), "count_gathers": true|false, "hide_checkpoints_on_rank": r (that rank sees none, as
     on a node whose disk is not the others'), "probe_dir": where probe.rank<r>.json goes (default: out),
     "copy_from": a run dir copied into out first (an output dir another run used)}

Each run writes <out>/probe.rank<r>.json: the error that stopped it (null if none), with copy_from the checkpoint
`latest` names once set-up is done (`latest_after_setup`: a run killed in its first steps leaves that) and, with
relora_probe, the checks after training: a full ReLoRA reset leaves the logits bitwise equal and zeroes the Adam
moments, the teacher's W is bitwise the base model's, the shared teacher's logits are the original model's; and ranks
sampling in lockstep draw what one batch draws. With count_gathers, `gathered_bytes` lists the bytes each optimizer
step all-gathers (DeepSpeed's all-gather calls, counted at its communication backend).
"""

import contextlib
import json
import shutil
import sys
from pathlib import Path
from unittest import mock

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistil.bitnet import bitlinear_modules, teacher_mode
from megadistil.config import ConfigError, load_config
from megadistil.distributed import init_distributed
from megadistil.engine import checkpoint
from megadistil.engine.relora import MOMENTS, relora_reset
from megadistil.engine.trainer import Trainer
from megadistil.models import decoder
from megadistil.sampling import SamplingConfig, lockstep_any, sample
from tests._fault_train import faults


def gathered(params):
    with deepspeed.zero.GatheredParameters(list(params)):
        return [p.detach().clone() for p in params]


def relora_checks(trainer: Trainer, tolerance: float = 0.0) -> dict[str, bool]:
    """tolerance: the largest logit change a reset may make, relative to the largest logit (0: bitwise equal); with
    a tolerance the measured change comes back as reset_logit_change."""
    cfg, student = trainer.cfg, trainer.engine.module.student
    ids = torch.randint(0, student.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(7))
    trainer.engine.eval()
    with torch.no_grad():
        before = student(input_ids=ids).logits
        relora_reset(student, cfg.relora, seed=123, reset_index=99)
        after = student(input_ids=ids).logits
        with teacher_mode(student):
            teacher_logits = student(input_ids=ids).logits
    original = AutoModelForCausalLM.from_pretrained(cfg.model.student, dtype=torch.float32).eval()
    with torch.no_grad():
        original_logits = original(input_ids=ids).logits
    base = load_file(f"{cfg.model.student}/model.safetensors")
    layers = list(bitlinear_modules(student))
    weights_equal = all(torch.equal(w, base[f"{name}.weight"])
                        for (name, layer), (w,) in ((nl, gathered([nl[1].weight])) for nl in layers))
    moments_zero = all(float(safe_get_full_optimizer_state(p, key).abs().max()) == 0.0
                       for _, layer in layers for p in (layer.lora_A, layer.lora_B) for key in MOMENTS)
    a_full, b_full = gathered([layers[0][1].lora_A, layers[0][1].lora_B])
    change = float((after - before).abs().max() / before.abs().max())
    return {
        "logits_equal_after_reset": bool(torch.equal(before, after)) if tolerance == 0 else 0 < change <= tolerance,
        **({"reset_logit_change": change} if tolerance else {}),
        "moments_zero": moments_zero,
        "b_zero_working": bool(torch.count_nonzero(b_full) == 0),
        "b_zero_master": float(safe_get_full_fp32_param(layers[0][1].lora_B).abs().max()) == 0.0,
        "a_master_equals_working": bool(torch.equal(safe_get_full_fp32_param(layers[0][1].lora_A), a_full.float())),
        "teacher_weights_bitwise_base": weights_equal,
        "teacher_logits_equal_original": bool(torch.equal(teacher_logits, original_logits)),
        "student_differs_from_teacher": not torch.allclose(before, teacher_logits),
    }


def sampling_checks(trainer: Trainer) -> dict[str, bool]:
    """Under ZeRO-3, each rank samples its own prompt in lockstep (rank 0's stops at EOS early and keeps stepping on
    padding while rank 1 runs on) and draws exactly what both prompts sampled as one batch gave for it."""
    student, rank = trainer.engine.module.student, trainer.dist.rank
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, student.config.vocab_size, (6,), generator=g) for _ in range(2)]
    cfg = SamplingConfig(max_new_tokens=10, temperatures=[1.0], seed=3)
    pad = student.config.vocab_size - 1
    free = sample(student, prompts, cfg, eos_token_id=None, pad_token_id=pad, lockstep=lockstep_any(trainer.device))
    eos = int(free.tokens[0, 1])  # row 0 stops after two tokens
    full = sample(student, prompts, cfg, eos_token_id=eos, pad_token_id=pad, lockstep=lockstep_any(trainer.device))
    mine = sample(student, prompts[rank:rank + 1], cfg, eos_token_id=eos, pad_token_id=pad, indices=[rank],
                  lockstep=lockstep_any(trainer.device))
    return {"sampled_share_equals_batch": bool(torch.equal(mine.tokens[0], full.tokens[rank])
                                               and mine.lengths[0] == full.lengths[rank]),
            "rank0_stopped_before_rank1": int(full.lengths[0]) == 2 < int(full.lengths[1])}


@contextlib.contextmanager
def counting_gathers(trainer: Trainer, result: dict):
    """result["gathered_bytes"]: per optimizer step, the bytes its all-gathers received (ZeRO-3's parameter fetches
    among them); result["forward_gathered_bytes"]: those of its forward passes (teacher targets + student + loss);
    result["decoder_bytes"]: what the decoder's parameters (embedding, layers, final norm) hold whole."""
    from deepspeed.comm import comm

    backend, names = comm.cdb, ("all_gather_into_tensor", "all_gather", "all_gather_coalesced")
    originals = {name: getattr(backend, name) for name in names}
    received = [0]

    def counted(name):
        def call(*args, **kwargs):
            out = next((kwargs[k] for k in ("output_tensor", "tensor_list", "output_tensors") if k in kwargs), None)
            out = args[0] if out is None else out
            received[0] += sum(t.numel() * t.element_size() for t in (out if isinstance(out, (list, tuple)) else [out]))
            return originals[name](*args, **kwargs)
        return call

    def counting(method, key):
        counts = result.setdefault(key, [])

        def call(*args, **kwargs):
            before = received[0]
            out = method(*args, **kwargs)
            counts.append(received[0] - before)
            return out
        return call

    stack = decoder(trainer.engine.module.student)
    result["decoder_bytes"] = sum(p.ds_numel * p.element_size() for p in stack.parameters())
    for name in names:
        setattr(backend, name, counted(name))
    trainer._optimizer_step = counting(trainer._optimizer_step, "gathered_bytes")
    trainer._forward = counting(trainer._forward, "forward_gathered_bytes")
    try:
        yield
    finally:
        for name in names:
            delattr(backend, name)


def run(spec: dict) -> dict:
    if spec.get("copy_from") and torch.distributed.get_rank() == 0:
        shutil.copytree(spec["copy_from"], spec["out"], dirs_exist_ok=True)
    torch.distributed.barrier()
    cfg = load_config("configs/tiny.yaml", [f"train.output_dir={spec['out']}", *spec["overrides"]])
    trainer = Trainer(cfg, spec.get("ds_config", "ds_configs/zero3.json"))
    result = {"error": None}
    hidden = spec.get("hide_checkpoints_on_rank") == torch.distributed.get_rank()
    try:
        with faults(nan_batches=set(spec.get("nan_batches", ()))), \
                mock.patch.object(checkpoint, "latest_tag", return_value=None) if hidden else contextlib.nullcontext():
            trainer.setup()
            if spec.get("copy_from"):
                result["latest_after_setup"] = checkpoint.latest_tag(trainer.ckpt_root)
            gathers = counting_gathers(trainer, result) if spec.get("count_gathers") else contextlib.nullcontext()
            with gathers:
                trainer.train()
        if spec.get("relora_probe"):
            result.update(relora_checks(trainer, spec.get("relora_tolerance", 0.0)))
            result.update(sampling_checks(trainer))
    except (FloatingPointError, ConfigError) as e:  # the NaN streak, or ranks disagreeing, stop every rank alike
        result["error"] = str(e)
    finally:
        trainer.cleanup()
    return result


def main() -> None:
    specs = json.loads(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
    rank = init_distributed().rank  # one process group for every run
    for spec in specs:
        result = run(spec)
        Path(spec.get("probe_dir", spec["out"]), f"probe.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
