"""Tiny Llama-3.1-shaped models with a byte-level BPE tokenizer trained on text on this machine.

Nothing is downloaded: the default corpus is the Python standard library's own source, present on every machine.
Used by configs/tiny.yaml, the tests and the demo.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

LLAMA31_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
EOS = "<|end_of_text|>"


def stdlib_files(limit: int | None = None) -> list[Path]:
    """The standard library's top-level .py files, sorted (deterministic on a given Python)."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    return files[:limit] if limit else files


def train_bpe_tokenizer(texts: list[str], vocab_size: int, *, split_digits: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`. With split_digits every digit is its own pre-token, so no merge spans
    digits: a tokenizer whose merges differ from the plain one's, not just its size. Without it, the tokenizer the
    shipped demo teacher was made with, byte for byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def tiny_llama_config(vocab_size: int, eos_token_id: int, *, hidden_size: int = 64, layers: int = 2,
                      heads: int = 4, kv_heads: int = 2, intermediate_size: int | None = None) -> LlamaConfig:
    """Llama-3.1's architecture in miniature: GQA, llama3 rope scaling, SiLU MLP, untied head."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=dict(LLAMA31_ROPE),
        tie_word_embeddings=False, eos_token_id=eos_token_id, bos_token_id=eos_token_id,
    )


def pretrain(model: LlamaForCausalLM, tokens: torch.Tensor, *, steps: int, seq_len: int = 128, batch_size: int = 16,
             lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Plain next-token pretraining on random windows of `tokens` (1-D int64), AdamW + cosine. Returns the losses."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    losses = []
    for _ in (bar := tqdm(range(steps), desc="pretrain teacher", unit="step")):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def make_tiny_llama(out: str | Path, *, texts: list[str], vocab_size: int = 512, seed: int = 0,
                    pretrain_steps: int = 0, pretrain_seq_len: int = 128, pretrain_batch: int = 16,
                    save_dtype: torch.dtype = torch.float32, keep_corpus: bool = True, split_digits: bool = False,
                    **arch) -> Path:
    """Write an HF dir: a tiny Llama (random, or pretrained in fp32 for `pretrain_steps` on `texts`) saved in
    `save_dtype` + a tokenizer trained on `texts` (split_digits: see train_bpe_tokenizer), and (keep_corpus)
    corpus.txt holding the texts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(texts, vocab_size, split_digits=split_digits)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), tokenizer.eos_token_id, **arch))
    if pretrain_steps:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        flat = torch.tensor([t for doc in ids for t in (*doc, tokenizer.eos_token_id)], dtype=torch.int64)
        pretrain(model, flat, steps=pretrain_steps, seq_len=pretrain_seq_len, batch_size=pretrain_batch, seed=seed)
    model.to(save_dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    if keep_corpus:
        (out / "corpus.txt").write_text("\n".join(texts))
    return out


def write_random_llama(path: str | Path, config: LlamaConfig, tokenizer_from: str | Path, *,
                       dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """An HF dir of a random Llama of any size written a layer at a time (one safetensors file per layer, read through
    the index), so that a 1B model never sits in memory whole; the tokenizer files are copied from `tokenizer_from`.
    For tests and benches where the values do not matter (speed, memory, file layout)."""
    import json
    import shutil

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True)
    config.save_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    def layer(n: int) -> dict[str, torch.Tensor]:
        norms = {f"model.layers.{n}.{k}.weight": torch.ones(h, dtype=dtype)
                 for k in ("input_layernorm", "post_attention_layernorm")}
        return {f"model.layers.{n}.{k}.weight": randn(*s) for k, s in shapes.items()} | norms

    def rest() -> dict[str, torch.Tensor]:
        head = {} if config.tie_word_embeddings else {"lm_head.weight": randn(config.vocab_size, h)}
        return {"model.embed_tokens.weight": randn(config.vocab_size, h),
                "model.norm.weight": torch.ones(h, dtype=dtype)} | head

    weight_map = {}
    files = [(f"layer{n}.safetensors", lambda n=n: layer(n)) for n in range(config.num_hidden_layers)]
    for file, make in [*files, ("rest.safetensors", rest)]:
        tensors = make()
        save_file(tensors, str(path / file))
        weight_map |= dict.fromkeys(tensors, file)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_from) / f, path / f)
    return path
