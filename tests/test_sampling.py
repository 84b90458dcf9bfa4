"""megadistil.sampling against transformers' generate and against its own definition."""

import math

import pytest
import torch
from _tiny import tiny_llama31, tiny_model

from megadistil.bitnet import teacher_mode, to_bitnet
from megadistil.sampling import SamplingConfig, SamplingError, eos_token_ids, filter_logits, sample

PAD = 255


def _prompts(lengths=(5, 9, 3), seed=1, vocab=250):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]


def _hf_greedy(model, prompt, new):
    ids = prompt[None]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, pad_token_id=PAD, eos_token_id=None)
    return out[0, ids.shape[1]:]


@pytest.mark.parametrize("arch", ["llama31", "qwen2", "phi3"])
def test_greedy_equals_transformers_generate_for_a_left_padded_batch(arch):
    model = tiny_model(arch, head_scale=8.0).eval()
    prompts = _prompts()
    got = sample(model, prompts, SamplingConfig(max_new_tokens=12, temperatures=[0.0]), eos_token_id=None,
                 pad_token_id=PAD)
    for row, prompt in enumerate(prompts):
        assert got.tokens[row].tolist() == _hf_greedy(model, prompt, 12).tolist(), (arch, row)
    assert got.lengths.tolist() == [12, 12, 12]


def test_the_shared_teacher_samples_as_the_original_model():
    original = tiny_llama31()
    student = to_bitnet(tiny_llama31(), lora_rank=4)
    cfg = SamplingConfig(max_new_tokens=8, temperatures=[0.0])
    with teacher_mode(student):
        shared = sample(student, _prompts(), cfg, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(shared.tokens, sample(original, _prompts(), cfg, eos_token_id=None, pad_token_id=PAD).tokens)


def test_seeded_samples_repeat_and_follow_the_sequence_not_the_batch():
    model = tiny_llama31()
    prompts = _prompts((4, 4, 4, 4))  # equal lengths: no padding, so each row's logits do not depend on the batch
    cfg = SamplingConfig(max_new_tokens=10, temperatures=[1.0], seed=7)
    a = sample(model, prompts, cfg, eos_token_id=None, pad_token_id=PAD).tokens
    assert torch.equal(a, sample(model, prompts, cfg, eos_token_id=None, pad_token_id=PAD).tokens)
    # rank 1 of 2 holding prompts 1 and 3 (prompt i on rank i % world) draws what one process drew for them
    half = sample(model, prompts[1::2], cfg, eos_token_id=None, pad_token_id=PAD, indices=[1, 3]).tokens
    assert torch.equal(half, a[1::2])
    other = sample(model, prompts, SamplingConfig(max_new_tokens=10, temperatures=[1.0], seed=8),
                   eos_token_id=None, pad_token_id=PAD).tokens
    assert not torch.equal(a, other)


def test_top_k_1_is_greedy_and_the_schedule_applies_per_position():
    model = tiny_llama31()
    greedy = sample(model, _prompts(), SamplingConfig(max_new_tokens=6, temperatures=[0.0]), eos_token_id=None,
                    pad_token_id=PAD).tokens
    top1 = sample(model, _prompts(), SamplingConfig(max_new_tokens=6, temperatures=[2.0], top_k=1), eos_token_id=None,
                  pad_token_id=PAD).tokens
    assert torch.equal(top1, greedy)
    # greedy first token, then hot sampling: the first column is the greedy one, the rest (almost surely) not
    hot_after = sample(model, _prompts(), SamplingConfig(max_new_tokens=6, temperatures=[0.0, 50.0]),
                       eos_token_id=None, pad_token_id=PAD).tokens
    assert torch.equal(hot_after[:, 0], greedy[:, 0]) and not torch.equal(hot_after[:, 1:], greedy[:, 1:])


def test_filter_logits_matches_its_definition():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    inf = -math.inf
    kept = filter_logits(logits, top_k=0, top_p=0.8)  # 0.5 + 0.2 < 0.8: the token that crosses (0.15) is kept
    assert torch.isfinite(kept).tolist() == [[True, True, True, False, False]]
    assert filter_logits(logits, top_k=2, top_p=1.0)[0, 2:].tolist() == [inf, inf, inf]
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)
    shuffled = logits[:, [3, 0, 4, 2, 1]]
    assert torch.isfinite(filter_logits(shuffled, 0, 0.8)).tolist() == [[False, True, False, True, True]]


def test_a_sequence_stops_at_eos_and_the_rest_is_padding():
    model = tiny_llama31()
    prompts = _prompts()
    greedy = sample(model, prompts, SamplingConfig(max_new_tokens=8, temperatures=[0.0]), eos_token_id=None,
                    pad_token_id=PAD).tokens
    eos = int(greedy[0, 2])
    stopped = sample(model, prompts, SamplingConfig(max_new_tokens=8, temperatures=[0.0]), eos_token_id=eos,
                     pad_token_id=PAD)
    first = next(i for i, t in enumerate(greedy[0].tolist()) if t == eos)
    assert stopped.lengths[0] == first + 1
    assert stopped.tokens[0, :first + 1].tolist() == greedy[0, :first + 1].tolist()
    assert set(stopped.tokens[0, first + 1:].tolist()) <= {PAD}
    # several stop ids (a generation_config's eos list): any of them stops a sequence
    either = sample(model, prompts, SamplingConfig(max_new_tokens=8, temperatures=[0.0]),
                    eos_token_id=[int(greedy[1, 1]), eos], pad_token_id=PAD)
    assert either.lengths[0] == first + 1 and either.lengths[1] <= 2


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperatures": [-1.0]}, "temperatures"),
    ({"temperatures": []}, "temperatures"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"top_k": -1}, "top_k"),
])
def test_bad_settings_are_refused_naming_the_key(kwargs, key):
    with pytest.raises(SamplingError, match=f"'sampling.{key}'"):
        SamplingConfig(**kwargs)


def test_eos_ids_are_the_generation_configs_else_the_tokenizers():
    from types import SimpleNamespace

    tok = SimpleNamespace(eos_token_id=2)
    assert eos_token_ids(SimpleNamespace(eos_token_id=[128001, 128008, 128009]), tok) == [128001, 128008, 128009]
    assert eos_token_ids(SimpleNamespace(eos_token_id=None), tok) == 2
    assert eos_token_ids(None, tok) == 2  # a model without a generation config
