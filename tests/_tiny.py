"""Tiny models with real architectures (random weights, nothing downloaded)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA31_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def tiny_llama31_config(**overrides) -> LlamaConfig:
    """Llama-3.1's shape in miniature: GQA (4 query heads, 2 KV heads), llama3 rope scaling, SiLU MLP."""
    kwargs = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama31(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama31_config(**overrides)).to(dtype).eval()
