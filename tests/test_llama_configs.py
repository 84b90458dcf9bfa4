"""The shipped Llama-3.1 configs build a BitNet student of the real size, on the meta device (no weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from megadistil.bitnet import BitLinear, to_bitnet
from megadistil.config import load_config
from megadistil.engine.memory import LLAMA31_PRESETS

ROOT = Path(__file__).resolve().parents[1]
ADDED = (".lora_A", ".lora_B", ".delta", ".sub_norm.weight")

# Published parameter counts (Meta's model cards: 8.03B, 70.6B); exact values of the HF checkpoints.
LLAMA31_PARAMS = {"llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496}


def _meta_student(name: str) -> tuple[nn.Module, object]:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    b = cfg.bitnet
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA31_PRESETS[name]))
        to_bitnet(model, lora_rank=b.lora_rank, lora_alpha=b.lora_alpha, exclude=tuple(b.exclude), subln=b.subln,
                  delta=cfg.relora.reset_every > 0, backward=b.backward)
    return model, cfg


def _count(model: nn.Module, suffix: str | None = None) -> int:
    return sum(p.numel() for n, p in model.named_parameters()
               if (suffix is None and not n.endswith(ADDED)) or (suffix is not None and n.endswith(suffix)))


@pytest.mark.parametrize("name", sorted(LLAMA31_PARAMS))
def test_meta_student_has_llama31_size_and_bitlinear_blocks(name: str) -> None:
    model, cfg = _meta_student(name)
    assert all(p.device.type == "meta" for p in model.parameters())
    base = _count(model)
    assert base == LLAMA31_PARAMS[name]
    assert round(base / 1e9, 2 if base < 1e10 else 1) == {"llama3.1-8b": 8.03, "llama3.1-70b": 70.6}[name]

    c = model.config
    layers = model.model.layers
    assert len(layers) == c.num_hidden_layers
    for i, block in enumerate(layers):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, (nn.Linear, BitLinear))}
        assert set(linears) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}, i
        assert all(type(m) is BitLinear for m in linears.values()), i
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert not any(isinstance(m, BitLinear) for m in (model.lm_head, model.model.embed_tokens))

    # Added parameters, from the shapes alone: LoRA r x (in + out) per linear, ΔW = every block linear's W,
    # SubLN = the inputs of o_proj and down_proj.
    h, kv, ff, L, r = c.hidden_size, c.num_key_value_heads * c.head_dim, c.intermediate_size, c.num_hidden_layers, \
        cfg.bitnet.lora_rank
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, ff), (h, ff), (ff, h)]  # (in, out)
    assert _count(model, (".lora_A", ".lora_B")) == L * sum(r * (i + o) for i, o in shapes)
    assert _count(model, ".delta") == L * sum(i * o for i, o in shapes)
    assert _count(model, ".sub_norm.weight") == L * (h + ff)
    embed = 2 * c.vocab_size * h
    assert _count(model, ".delta") == base - embed - L * 2 * h - h  # every block weight but the norms


def test_preset_dimensions_are_llama31() -> None:
    """The numbers a reader checks against Meta's config.json files."""
    p8, p70 = LLAMA31_PRESETS["llama3.1-8b"], LLAMA31_PRESETS["llama3.1-70b"]
    assert (p8["hidden_size"], p8["num_hidden_layers"], p8["num_attention_heads"], p8["num_key_value_heads"],
            p8["intermediate_size"], p8["vocab_size"]) == (4096, 32, 32, 8, 14336, 128256)
    assert (p70["hidden_size"], p70["num_hidden_layers"], p70["num_attention_heads"], p70["num_key_value_heads"],
            p70["intermediate_size"], p70["vocab_size"]) == (8192, 80, 64, 8, 28672, 128256)
    for p in (p8, p70):
        assert p["rope_scaling"]["rope_type"] == "llama3" and p["tie_word_embeddings"] is False
