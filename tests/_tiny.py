"""Tiny models with real architectures (random weights, nothing downloaded)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA31_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def tiny_llama31_config(**overrides) -> LlamaConfig:
    """Llama-3.1's shape in miniature: GQA (4 query heads, 2 KV heads), llama3 rope scaling, SiLU MLP."""
    kwargs = {
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": LLAMA31_ROPE,
        "tie_word_embeddings": False, "attn_implementation": "eager",
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama31(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama31_config(**overrides)).to(dtype).eval()


# One tiny random model per decoder-only family megadistil supports: 2 layers, hidden 64, GQA where the family has it.
# Values that would make a family's peculiarity invisible at this size are set on purpose (a softcap or logit scale
# that bends random logits; tiny_model also draws biases and norm weights at random).
ARCHITECTURES = {
    "llama31": ("LlamaConfig", {"rope_scaling": LLAMA31_ROPE, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                                "tie_word_embeddings": False}),
    "llama31_tied": ("LlamaConfig", {"rope_scaling": LLAMA31_ROPE, "rope_theta": 500000.0,
                                     "max_position_embeddings": 131072, "tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),  # q/k/v biases, tied head
    "qwen3": ("Qwen3Config", {"head_dim": 16, "tie_word_embeddings": False}),  # q/k norms
    "mistral": ("MistralConfig", {"head_dim": 16, "sliding_window": 32}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),  # fused qkv_proj and gate_up_proj
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 3.0,
                                "sliding_window": 32}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32}),
    "olmo2": ("Olmo2Config", {"tie_word_embeddings": False}),  # post-norms, q/k norms over all heads
    "gpt_neox": ("GPTNeoXConfig", {"intermediate_size": 256, "tie_word_embeddings": False}),  # interleaved fused qkv
    # Output transforms other than Gemma's softcap: Cohere multiplies the logits, Granite divides them.
    "cohere": ("CohereConfig", {"logit_scale": 0.25, "tie_word_embeddings": True}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0, "tie_word_embeddings": False}),
}
# OLMo 2 normalises after attention, not before: layer 0's q/k/v read the embedding itself, whose init (std 0.02) makes
# q.k ~1e-5 and every attention uniform, for the teacher and the student alike (their relation KL ~1e-8, noise).
EMBEDDING_STD = {"olmo2": 1.0}


def tiny_config(arch: str, vocab_size: int = 256, eos_token_id: int = 0, **overrides):
    import transformers

    class_name, specific = ARCHITECTURES[arch]
    kwargs = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
              "eos_token_id": eos_token_id, "bos_token_id": eos_token_id, "pad_token_id": eos_token_id}
    if arch == "gpt_neox":
        del kwargs["num_key_value_heads"]
    return getattr(transformers, class_name)(**{**kwargs, **specific, **overrides})


def tiny_model(arch: str, seed: int = 0, vocab_size: int = 256, eos_token_id: int = 0, head_scale: float = 1.0,
               **overrides):
    """A random model of the family (float32, eval mode). Biases and norm weights are drawn at random (their init is
    0 / 1, which would hide a dropped bias or a misplaced norm); `head_scale` multiplies the output head so that
    next-token distributions are peaked like a trained model's."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, eos_token_id, **overrides),
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
        if arch in EMBEDDING_STD:
            model.get_input_embeddings().weight.normal_(0.0, EMBEDDING_STD[arch])
        model.get_output_embeddings().weight.mul_(head_scale)
    return model.eval()
