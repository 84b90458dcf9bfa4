"""Run under `deepspeed --num_gpus 2`: train a few steps, then check the ReLoRA reset invariant, the optimizer state
after a full reset, that the teacher's weights are bitwise the base model's, and that the shared teacher's logits
are the original model's. Writes one JSON per rank to argv[1]."""

import json
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from megadistil.bitnet import bitlinear_modules, teacher_mode
from megadistil.config import load_config
from megadistil.engine.relora import MOMENTS, relora_reset
from megadistil.engine.trainer import Trainer


def gathered(params):
    with deepspeed.zero.GatheredParameters(list(params)):
        return [p.detach().clone() for p in params]


def main() -> None:
    out, config, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, "ds_configs/zero3.json")
    trainer.setup()
    trainer.train()
    student = trainer.engine.module.student
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
    result = {
        "logits_equal_after_reset": bool(torch.equal(before, after)),
        "moments_zero": moments_zero,
        "b_zero_working": bool(torch.count_nonzero(b_full) == 0),
        "b_zero_master": float(safe_get_full_fp32_param(layers[0][1].lora_B).abs().max()) == 0.0,
        "a_master_equals_working": bool(torch.equal(safe_get_full_fp32_param(layers[0][1].lora_A), a_full.float())),
        "teacher_weights_bitwise_base": weights_equal,
        "teacher_logits_equal_original": bool(torch.equal(teacher_logits, original_logits)),
        "student_differs_from_teacher": not torch.allclose(before, teacher_logits),
    }
    with open(f"{out}.rank{trainer.dist.rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
