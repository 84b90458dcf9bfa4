"""Any decoder-only architecture: megadistil.models reaches every family's parts, output transform, attention and
q/k/v generically, and each family trains, converts and loads.

Unit tests (no launch) compare with vanilla transformers on tiny random models of every family in tests/_tiny.py.
One 2-rank launch trains every family in turn inside the same two processes (ZeRO-3, shared teacher with the
hidden-state and attention-relation terms, a ReLoRA merge, a checkpoint), checks the trainer's teacher perplexity
against vanilla transformers' on the same held-out sequences, and the pytest process converts each checkpoint with
--verify and loads the result with vanilla transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megadistil.bitnet import BitLinear, teacher_mode, to_bitnet
from megadistil.config import ConfigError, load_config
from megadistil.distill import LossConfig, chunked_lm_head_loss
from megadistil.engine.inputs import check_inputs
from megadistil.models import (
    attn_implementation,
    capture_qkv,
    decoder,
    decoder_layers,
    logit_transform,
    output_head,
    output_head_name,
)
from tests._tiny import ARCHITECTURES, tiny_config, tiny_model
from tests._tools import deepspeed_cmd

ROOT = Path(__file__).resolve().parents[1]
ARCHS = list(ARCHITECTURES)
TRAINED = [a for a in ARCHS if a not in ("cohere", "granite")]  # the families of issue 12's end-to-end list
HEAD_SCALE = 8.0  # peaked distributions, and logits well past Gemma2's softcap of 3


def _ids(vocab: int = 256, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------- parts


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_head_and_transform_reproduce_the_models_logits(arch):
    model, ids = tiny_model(arch, head_scale=HEAD_SCALE), _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        out = decoder(model)(input_ids=ids, output_hidden_states=True)
        z = output_head(model)(out.last_hidden_state)
        transform = logit_transform(model.config, type(model))
        logits = transform.apply_(z.clone())
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)  # Granite divides where we multiply
    if arch in ("llama31", "gemma2", "gpt_neox"):
        assert torch.equal(logits, expected)
    assert transform.identity == (arch not in ("gemma2", "cohere", "granite"))
    if not transform.identity:
        assert not torch.allclose(z, expected, atol=0.1)  # the family's transform matters at this scale
    # the decoder layers are the blocks whose outputs are the model's hidden states
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    seen = []
    handle = layers[0].register_forward_hook(lambda _m, _i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        decoder(model)(input_ids=ids)
    handle.remove()
    torch.testing.assert_close(seen[0], out.hidden_states[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_loss_with_the_transform_is_the_models_cross_entropy(arch):
    model, ids = tiny_model(arch, head_scale=HEAD_SCALE), _ids()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        hidden = decoder(model)(input_ids=ids).last_hidden_state[:, :-1]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1))
    parts = chunked_lm_head_loss(hidden, output_head(model).weight, ids[:, 1:],
                                 LossConfig(kd_weight=0.0, ce_weight=1.0, chunk_tokens=7),
                                 logit_transform=logit_transform(model.config, type(model)))
    torch.testing.assert_close(parts["ce"].double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_mode_of_the_bitnet_student_is_the_original_model(arch):
    model, ids = tiny_model(arch, head_scale=HEAD_SCALE), _ids()
    with torch.no_grad():
        original = model(input_ids=ids).logits
    head = output_head(model)
    to_bitnet(model, lora_rank=4)
    linears = [m for m in decoder(model).modules() if isinstance(m, nn.Linear)]
    assert not [m for m in linears if not isinstance(m, BitLinear)]  # fused projections included
    assert type(output_head(model)) is nn.Linear and output_head(model) is head
    with torch.no_grad():
        with teacher_mode(model):
            teacher = model(input_ids=ids).logits
        student = model(input_ids=ids).logits
    assert torch.equal(teacher, original)
    assert not torch.allclose(student, original, atol=1e-2)


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_layerwise_teacher_inside_the_students_forward_is_bitwise_the_whole_teacher_forward(arch, checkpointing):
    """LayerwiseTeacher runs each layer in teacher mode right before the student's: its final hidden states, layer
    outputs (the last one after the final norm, as HF gives it) and q/k/v are bitwise those of a teacher_mode()
    forward, and the student's loss and gradients under activation checkpointing (which replays the layers without
    the teacher) are bitwise unchanged. Without checkpointing the model keeps a KV cache (use_cache): the teacher's
    keys must not join it (they did: a wrong loss for Llama, a shape error for Gemma 2)."""
    from megadistil.engine.model import enable_activation_checkpointing
    from megadistil.engine.module import DistillModule
    from megadistil.engine.teachers import SharedTeacher

    model, ids = tiny_model(arch, head_scale=HEAD_SCALE), _ids()
    to_bitnet(model, lora_rank=4)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(2))
    if checkpointing:
        enable_activation_checkpointing(model)
    else:
        model.config.use_cache = True
    last = model.config.num_hidden_layers - 1
    cfg = LossConfig(hidden_weight=0.5, hidden_layers=[0, last], attn_relation_weight=0.3,
                     attn_relation_layers=[0, last])
    module, runs = DistillModule(model).train(), []
    for layerwise in (False, True):
        targets = SharedTeacher(model, layerwise=layerwise).targets({"input_ids": ids}, cfg)
        assert (targets.hidden is None) == layerwise  # layerwise: filled within the student's forward
        model.zero_grad()
        parts = module(ids, ids.roll(-1, 1), targets, cfg)
        parts["loss"].backward()
        runs.append((targets, parts, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (whole, whole_parts, whole_grads), (layerwise, parts, grads) = runs
    assert torch.equal(layerwise.hidden, whole.hidden)
    assert len(layerwise.layer_hidden) == 2 and all(map(torch.equal, layerwise.layer_hidden, whole.layer_hidden))
    assert sorted(layerwise.qkv) == sorted(whole.qkv) == [0, last]
    assert all(torch.equal(a, b) for i in whole.qkv for a, b in zip(layerwise.qkv[i], whole.qkv[i]))
    assert all(torch.equal(parts[k], whole_parts[k]) for k in ("loss", "kd", "hidden", "attn"))
    assert len(grads) > 0 and all(map(torch.equal, grads, whole_grads))
    assert "forward" not in vars(decoder_layers(model)[0])  # the layers' own forward is back


def _relation_kl_reference(student: torch.Tensor, teacher: torch.Tensor, heads: int, rows: torch.Tensor) -> float:
    """float64 MiniLM relation KL of one of q/k/v: each counted row against all its earlier positions (causal keys),
    mean over relation heads and counted rows."""
    total, n = 0.0, 0
    d = student.shape[-1] // heads
    for b, i in rows.nonzero().tolist():
        for h in range(heads):
            s, t = (x[b, : i + 1, h * d:(h + 1) * d].double() for x in (student, teacher))
            ls, lt = (torch.log_softmax(x[-1] @ x.T / d ** 0.5, -1) for x in (s, t))
            total += float((lt.exp() * (lt - ls)).sum())
            n += 1
    return total / n


def test_the_relation_term_of_a_completion_reaches_back_into_its_prompt():
    """On-policy and preference batches train the completion only (labels ignore the prompt): its rows' attention
    relations still span the prompt before them. The label mask was passed as the keys' mask, so the prompt dropped
    out of every softmax (the first completion row compared itself with itself: always 0)."""
    from megadistil.distill.losses import IGNORE_INDEX
    from megadistil.engine.module import DistillModule
    from megadistil.engine.teachers import SharedTeacher
    from megadistil.models import capture_qkv

    model, ids = tiny_model("llama31", head_scale=HEAD_SCALE), _ids(shape=(2, 12))
    to_bitnet(model, lora_rank=4)
    labels = ids.roll(-1, 1)
    labels[:, :5] = IGNORE_INDEX  # a 6-token prompt
    labels[:, -1] = IGNORE_INDEX
    cfg = LossConfig(attn_relation_weight=1.0, attn_relation_layers=[0], attn_relation_heads=2)
    targets = SharedTeacher(model, layerwise=False).targets({"input_ids": ids}, cfg)
    with torch.no_grad():
        parts = DistillModule(model)(ids, labels, targets, cfg)
        with capture_qkv(model, [0]) as qkv:
            model.model(input_ids=ids)
    rows = labels != IGNORE_INDEX
    expected = sum(_relation_kl_reference(s, t, 2, rows) for s, t in zip(qkv[0], targets.qkv[0], strict=True))
    assert expected > 1e-3
    assert float(parts["attn"]) == pytest.approx(expected, rel=1e-4)


def test_the_dual_space_projector_ce_trains_the_projector_not_the_students_head():
    """DSKD's projector learns to read the teacher's states through the student's head by CE; that CE must not train
    the head (official DSKD detaches it). With the head trainable (optim.param_groups), its gradient is the KD term's
    alone; the projected states still get the CE's gradient."""
    from megadistil.distill.losses import IGNORE_INDEX
    from megadistil.engine.module import HeadLoss
    from megadistil.engine.teachers import Targets

    model, ids = tiny_model("llama31", head_scale=HEAD_SCALE), _ids(shape=(2, 10))
    head = model.get_output_embeddings().weight.requires_grad_()
    labels = ids.roll(-1, 1)
    labels[:, -1] = IGNORE_INDEX
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 10, model.config.hidden_size, generator=g, requires_grad=True)
    projected = torch.randn(2, 10, model.config.hidden_size, generator=g, requires_grad=True)
    cfg = LossConfig(dskd_weight=1.0, kd_weight=0.0, ce_weight=1.0)
    targets = Targets(foreign_mask=torch.ones(2, 10, dtype=torch.bool))
    loss = HeadLoss(model)
    parts = {"loss": torch.zeros(())}
    loss._dual_space(parts, hidden, projected, head, labels, targets, cfg)
    grad_head, grad_projected = torch.autograd.grad(parts["loss"], (head, projected))
    kd_only = chunked_lm_head_loss(hidden, head, labels, LossConfig(kd_weight=1.0, ce_weight=0.0),
                                   teacher_hidden=projected.detach(), teacher_lm_head_weight=head)
    torch.testing.assert_close(grad_head, torch.autograd.grad(kd_only["loss"], head)[0])
    assert grad_projected.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama31", "gemma2", "cohere", "granite"])
def test_top_k_targets_are_of_the_models_own_logits(arch):
    """The one producer of top-k targets (precompute's and the live HF teacher's TopKHead) sees the model's logits,
    softcapped or scaled as its forward makes them; the tail is the rest of the mass, in log space."""
    from megadistil.distill.targets import teacher_topk
    from megadistil.engine.teachers import TopKHead

    model, ids, T = tiny_model(arch, head_scale=HEAD_SCALE), _ids(), 2.0
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double() / T, -1)
        expected = logp.topk(5, dim=-1)
        target = teacher_topk(model, ids, top_k=5, temperature=T, chunk_tokens=7)
        head_ids, head_logps, head_tail = TopKHead(model, top_k=5)(ids, T, 7)
    rest = torch.logsumexp(logp.scatter(-1, expected.indices, float("-inf")), -1)
    for got_ids, got_logps, tail in ((target.topk_ids, target.topk_logprobs, target.tail_logmass),
                                     (head_ids, head_logps, head_tail)):
        assert torch.equal(got_ids, expected.indices)
        torch.testing.assert_close(got_logps.double(), expected.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tail.double(), rest, rtol=1e-4, atol=1e-4)


# The projections by hand from the weights, in each family's own layout (transformers' modeling code).
def _attention_module(model: nn.Module, arch: str, i: int) -> nn.Module:
    return model.gpt_neox.layers[i].attention if arch == "gpt_neox" else model.model.layers[i].self_attn


def _projections_by_hand(model: nn.Module, arch: str, i: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    attn, c = _attention_module(model, arch, i), model.config
    if arch == "phi3":
        w, q_out, kv_out = attn.qkv_proj.weight, c.num_attention_heads * attn.head_dim, \
            c.num_key_value_heads * attn.head_dim
        return x @ w[:q_out].T, x @ w[q_out:q_out + kv_out].T, x @ w[q_out + kv_out:].T
    if arch == "gpt_neox":
        heads, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        w = attn.query_key_value.weight.reshape(heads, 3, d, -1)
        b = attn.query_key_value.bias.reshape(heads, 3, d)
        return tuple(x @ w[:, j].reshape(heads * d, -1).T + b[:, j].reshape(-1) for j in range(3))
    return tuple(F.linear(x, p.weight, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj))


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_qkv_gives_the_projections_the_attention_uses(arch):
    model, ids = tiny_model(arch), _ids()
    inputs = {}
    handles = [_attention_module(model, arch, i).register_forward_pre_hook(
        lambda _m, args, kwargs, i=i: inputs.__setitem__(i, kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True) for i in range(2)]
    with torch.no_grad(), capture_qkv(model, [0, 1]) as qkv:
        model(input_ids=ids)
    for h in handles:
        h.remove()
    assert sorted(qkv) == [0, 1]
    for i in (0, 1):
        expected = _projections_by_hand(model, arch, i, inputs[i])
        for got, want in zip(qkv[i], expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        kv_width = (getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads) * \
            (getattr(model.config, "head_dim", None) or 16)
        assert [t.shape[-1] for t in qkv[i]] == [64, kv_width, kv_width]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_chosen_attention_is_one_the_model_accepts(arch):
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    chosen = attn_implementation(config, "auto", "cpu")
    assert chosen == ("eager" if arch == "gemma2" else "sdpa")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=chosen).eval()
    assert model.config._attn_implementation == chosen
    eager = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, eager(input_ids=_ids()).logits)
    with pytest.raises(ValueError, match="model.attn_implementation='flash_attention_2'.*CUDA"):
        attn_implementation(config, "flash_attention_2", "cpu")
    if arch == "gemma2":
        with pytest.raises(ValueError, match="model.attn_implementation='sdpa'.*Gemma2ForCausalLM"):
            attn_implementation(config, "sdpa", "cpu")


def test_a_score_softcap_rules_out_sdpa_where_the_class_claims_it(monkeypatch):
    """transformers < 5.25 says Gemma 2 supports sdpa, whose path drops attn_logit_softcapping: the run and the
    memory planner take eager all the same, and without the softcap sdpa again."""
    from transformers import Gemma2ForCausalLM

    from megadistil.engine.memory import ModelDims

    monkeypatch.setattr(Gemma2ForCausalLM, "_supports_sdpa", True)
    config = tiny_config("gemma2")
    assert attn_implementation(config, "auto", "cpu") == "eager"
    with pytest.raises(ValueError, match="'sdpa' cannot run here: Gemma2ForCausalLM does not support sdpa with "
                                         "attn_logit_softcapping"):
        attn_implementation(config, "sdpa", "cpu")
    assert not ModelDims.from_hf(config.to_dict(), "tiny gemma2").sdpa
    config.attn_logit_softcapping = None
    assert attn_implementation(config, "auto", "cpu") == "sdpa"
    assert ModelDims.from_hf(config.to_dict(), "tiny gemma2").sdpa


def test_an_unknown_output_transform_is_refused_naming_the_class():
    from transformers import LlamaForCausalLM

    class ClampedLlama(LlamaForCausalLM):
        def forward(self, input_ids=None, **kwargs):
            hidden_states = self.model(input_ids=input_ids).last_hidden_state
            logits = self.lm_head(hidden_states)
            logits = logits.clamp(-self.config.clamp_value, self.config.clamp_value)
            loss = None
            return loss, logits

    with pytest.raises(ValueError, match=r"ClampedLlama\.forward transforms .*clamp"):
        logit_transform(tiny_config("llama31"), ClampedLlama)


def test_output_head_name_is_the_heads_module_name_whatever_the_family_calls_it():
    from transformers import BioGptConfig, BioGptForCausalLM

    assert {output_head_name(tiny_model(a)) for a in TRAINED} == {"lm_head"}
    biogpt = BioGptForCausalLM(BioGptConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64))
    assert output_head_name(biogpt) == "output_projection"


# ---------------------------------------------------------------------------------------------------- SubLN


def _model_dir(root: Path, arch: str, tokenizer_dir: Path) -> Path:
    """An HF dir of the family: config, random weights (head scaled up) and the tests' tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = root / arch
    tiny_model(arch, vocab_size=len(tok), eos_token_id=tok.eos_token_id, head_scale=HEAD_SCALE).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_multimodal_model_is_refused_before_any_weight_loads(tmp_path, tiny_llama_dir):
    """Gemma 3 4B+ configs are composite: AutoModelForCausalLM builds the vision-language model, whose vision tower
    to_bitnet would quantize, and whose config has no num_hidden_layers (a crash after the weights loaded)."""
    from transformers import AutoTokenizer, Gemma3Config

    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 32}
    model_dir = tmp_path / "gemma3-vlm"
    Gemma3Config(text_config={**tiny, "vocab_size": 300}, vision_config={**tiny, "image_size": 28, "patch_size": 14}
                 ).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(model_dir)  # a config and no weights at all
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"model.student={model_dir}",
                                                   f"data.text=[{tiny_llama_dir}/tokenizer.json]"])
    with pytest.raises(ConfigError, match="'model.student': Gemma3Config holds a Gemma3TextConfig inside a multimodal "
                                          "model .Gemma3ForConditionalGeneration."):
        check_inputs(cfg, 1)


def test_a_layer_the_conversion_cannot_take_is_refused_before_any_weight_loads(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer, MixtralConfig

    model_dir = tmp_path / "mixtral"
    MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_local_experts=4, vocab_size=300).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(model_dir)  # a config and no weights at all
    data = f"data.text=[{tiny_llama_dir}/tokenizer.json]"
    with pytest.raises(ConfigError, match="'bitnet.exclude': to_bitnet: MixtralForCausalLM has 6 weight matrices"):
        check_inputs(load_config(ROOT / "configs/tiny.yaml", [f"model.student={model_dir}", data]), 1)
    with pytest.raises(ConfigError, match="'bitnet.lora_rank': to_bitnet: lora_rank=4096 exceeds layer"):
        check_inputs(load_config(ROOT / "configs/tiny.yaml", [f"model.student={tiny_llama_dir}", data,
                                                              "bitnet.lora_rank=4096"]), 1)
    # optim.param_groups against the converted student's parameter names, before the load too
    with pytest.raises(ConfigError, match="'optim.param_groups': model.embed_tokens.weight would train, but the shared"):
        check_inputs(load_config(ROOT / "configs/tiny.yaml", [f"model.student={tiny_llama_dir}", data,
                                                              "optim.param_groups=[{pattern: embed_tokens}]"]), 1)
    with pytest.raises(ConfigError, match="'optim.param_groups.0.pattern': 'lora_C' matches no parameter"):
        check_inputs(load_config(ROOT / "configs/tiny.yaml", [f"model.student={tiny_llama_dir}", data,
                                                              "optim.param_groups=[{pattern: lora_C}]"]), 1)
    with pytest.raises(ConfigError, match="'bitnet.subln': layer o_proj is excluded from BitNet"):
        check_inputs(load_config(ROOT / "configs/tiny.yaml", [f"model.student={tiny_llama_dir}", data,
                                                              "bitnet.subln=true", "bitnet.exclude=[o_proj]"]), 1)
    with pytest.raises(ConfigError, match="'loss.attn_relation_heads': 7 does not divide the student's q width"):
        check_inputs(load_config(ROOT / "configs/tiny.yaml", [f"model.student={tiny_llama_dir}", data,
                                                              "loss.attn_relation_weight=0.1",
                                                              "loss.attn_relation_heads=7"]), 1)


def test_the_conversion_check_builds_its_skeleton_whatever_attention_the_config_names(tmp_path, tiny_llama_dir):
    """A config.json naming flash_attention_2 (some hub configs do) must not need flash-attn for the meta skeleton
    the conversion is checked on (it raised ImportError on a machine without it), nor be changed by it."""
    import json

    from transformers import AutoTokenizer

    model_dir = tmp_path / "fa2"
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(model_dir)
    config = json.loads((Path(tiny_llama_dir) / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "attn_implementation": "flash_attention_2"}))
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"model.student={model_dir}", "model.attn_implementation=sdpa",
                                                   f"data.text=[{tiny_llama_dir}/tokenizer.json]"])
    check_inputs(cfg, 1)


@pytest.mark.parametrize("arch", TRAINED)
def test_subln_is_refused_before_any_weight_loads_except_where_the_export_can_write_it(arch, tmp_path,
                                                                                      tiny_llama_dir):
    from transformers import AutoTokenizer

    model_dir = tmp_path / arch
    tiny_config(arch, vocab_size=len(AutoTokenizer.from_pretrained(tiny_llama_dir))).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(model_dir)  # a config and no weights at all
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"model.student={model_dir}", "bitnet.subln=true",
                                                   f"data.text=[{tiny_llama_dir}/tokenizer.json]"])
    if arch.startswith("llama"):
        check_inputs(cfg, 1)
        return
    with pytest.raises(ConfigError, match=rf"'bitnet.subln'.*model_type='{tiny_config(arch).model_type}'"):
        check_inputs(cfg, 1)


# ---------------------------------------------------------------------------------------------------- end to end

TRAIN_OVERRIDES = [
    "model.dtype=fp32", "bitnet.kernel=fp32", "bitnet.lora_rank=4", "data.seq_len=32", "train.micro_batch_size=2",
    "train.max_steps=3", "train.save_every=3", "train.eval_batches=1", "relora.reset_every=2",
    "relora.restart_warmup_steps=1", "optim.warmup_steps=1", "optim.lr=1e-2", "loss.hidden_weight=0.1",
    "loss.attn_relation_weight=0.1", "loss.attn_relation_heads=4", "loss.attn_relation_layers=[0,1]",
]
LAUNCH_TIMEOUT_S = 600
SMALL_VERIFY = {"sequences": 2, "seq_len": 32, "new_tokens": 8, "prompts": 2, "prompt_len": 8}


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory, tiny_llama_dir, stdlib_text_file) -> dict[str, dict]:
    """Every family trained by one 2-rank launch; each checkpoint converted with --verify in this process as soon
    as its run ends (while the launch trains the next family), and loaded with vanilla transformers."""
    root = tmp_path_factory.mktemp("architectures")
    heldout = root / "heldout.txt"
    heldout.write_text((Path(os.__file__).parent / "shlex.py").read_text())  # not in the training corpus
    dirs = [str(_model_dir(root / "models", arch, tiny_llama_dir)) for arch in TRAINED]
    probe, log = root / "probe.jsonl", root / "launch.log"
    cmd = [*deepspeed_cmd(2), "tests/_arch_probe.py", str(probe), str(root / "runs"), str(heldout),
           str(stdlib_text_file), *dirs, "--", *TRAIN_OVERRIDES]
    results: dict[str, dict] = {}
    with log.open("w") as out, pytest.MonkeyPatch.context() as env:
        env.setenv("TORCHDYNAMO_DISABLE", "1")  # transformers' BitLinear compiles itself; eager is the same math
        launch = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            _convert_as_runs_finish(launch, probe, root / "converted", results)
        finally:
            launch.kill()
            launch.wait()
    for arch in TRAINED:
        results.setdefault(arch, {"error": f"not trained; launch exit {launch.returncode}:\n"
                                           f"{log.read_text()[-5000:]}"})
    return results


def _convert_as_runs_finish(launch: subprocess.Popen, probe: Path, out_root: Path, results: dict) -> None:
    """Convert each family as soon as the probe records its run; stop when all are in, when the launch has ended
    with nothing new, or at the deadline."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while len(results) < len(TRAINED) and time.monotonic() < deadline:
        finished = launch.poll() is not None
        complete = probe.read_text().split("\n")[:-1] if probe.is_file() else []  # a line being written waits
        records = [json.loads(line) for line in complete]
        new = [r for r in records if Path(r["model_dir"]).name not in results]
        for record in new:
            arch = Path(record["model_dir"]).name
            results[arch] = _convert_and_load(record, out_root / arch)
        if finished and not new:
            return
        if not new:
            time.sleep(0.5)


def _convert_and_load(record: dict, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from megadistil.export import ExportConfig, convert_checkpoint
    from megadistil.export.sources import locate_checkpoint
    from megadistil.export.verify import VerifyConfig

    metrics = [json.loads(line) for line in (Path(record["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    try:
        result = convert_checkpoint(record["run_dir"], out, ExportConfig(dtype="fp32", progress=False), verify=True,
                                    verify_config=VerifyConfig(**SMALL_VERIFY))
        model = AutoModelForCausalLM.from_pretrained(out)
    except Exception as e:  # noqa: BLE001 - reported by the family's own test, not by every family's
        return {**record, "metrics": metrics, "error": f"{type(e).__name__}: {e}"}
    return {**record, "metrics": metrics, "verify": result.verify, "loaded_class": type(model).__name__,
            "loaded_bitlinear": sum("BitLinear" in type(m).__name__ for m in model.modules()),
            "checkpoint_meta": locate_checkpoint(record["run_dir"]).meta,
            "modules_to_not_convert": result.config["quantization_config"]["modules_to_not_convert"]}


@pytest.mark.multirank
@pytest.mark.parametrize("arch", TRAINED)
def test_family_trains_with_the_models_own_teacher_perplexity_converts_verifies_and_loads(arch, end_to_end):
    run = end_to_end[arch]
    assert "error" not in run, run["error"]
    steps = [m for m in run["metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    # Both live-teacher terms were computed, and measured something: a term between identical or uniform attentions
    # is float32 noise (~1e-8, of either sign), not 0
    assert all(m["attn"] > 1e-5 and m["hidden"] > 1e-5 for m in steps), [(m["attn"], m["hidden"]) for m in steps]
    assert steps[-1]["resets"] == 1  # a ReLoRA merge: the checkpoint's ΔW is not zero
    teacher_ppl = next(m["eval_ppl_teacher"] for m in run["metrics"] if m["step"] == 0 and "eval_ppl_teacher" in m)
    assert run["eval_sequences"] == 4
    assert abs(teacher_ppl - run["vanilla_ppl"]) / run["vanilla_ppl"] < 1e-4, (teacher_ppl, run["vanilla_ppl"])
    assert run["checkpoint_meta"]["output_head"] == "lm_head"
    assert run["modules_to_not_convert"] == ["lm_head"]  # the run's head, read from its checkpoint, stays unpacked
    v = run["verify"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-3 and v["generations_identical"], v
    assert v["loaded_as"]["attn_implementation"] == ("eager" if arch == "gemma2" else "sdpa")
    assert v["loaded_as"]["megadistil_imported"] is False
    original = tiny_model(arch)
    assert run["loaded_class"] == v["loaded_as"]["model_class"] == type(original).__name__
    assert run["loaded_bitlinear"] == sum(type(m) is nn.Linear for m in decoder_layers(original).modules())
    print(f"{arch}: teacher ppl {teacher_ppl:.6g} vs vanilla {run['vanilla_ppl']:.6g} "
          f"(rel {abs(teacher_ppl - run['vanilla_ppl']) / run['vanilla_ppl']:.2e}); verify max |dlogit| "
          f"{v['max_abs_diff']:.2g}; loaded {run['loaded_class']} with {run['loaded_bitlinear']} BitLinear")
