"""PrefKD's data and math halves: completion-only preference sequences (masking, truncation, dropping, errors),
PackedTextBatches with precomputed labels (resume), the token weights and their config."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from megadistil.data.packed import PackedTextBatches, shifted_batch
from megadistil.data.preference import PreferenceStats, preference_sequences
from megadistil.distill.losses import IGNORE_INDEX
from megadistil.distill.preference import PreferenceConfig, WeightTransform, label_logprobs, token_weights
from megadistil.tiny import train_bpe_tokenizer

I = IGNORE_INDEX

ROWS = [
    {"prompt": "Question: what is two plus two?\nAnswer:", "chosen": " four, of course.", "rejected": " five."},
    {"prompt": "Name a colour.", "chosen": " Blue is a colour of the sky.", "rejected": " A cat."},
    {"prompt": "Say hi:", "chosen": " hi there, friend", "rejected": " no"},
    {"prompt": "", "chosen": "an answer with no prompt", "rejected": ""},
    {"prompt": "Which is larger, ten or three?", "chosen": " Ten is larger than three.", "rejected": " three"},
]


@pytest.fixture(scope="module")
def tok():
    texts = [r[k] for r in ROWS for k in ("prompt", "chosen", "rejected")] * 4
    return train_bpe_tokenizer(texts + ["the quick brown fox jumps over the lazy dog"] * 4, 300)


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _ids(tok, text) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]  # as preference_sequences


def _expected(tok, row, seq_len) -> tuple[list[int], list[int]] | None:
    """input_ids and labels built position by position from the prompt's and chosen's token lists."""
    prompt, completion = _ids(tok, row["prompt"]), _ids(tok, row["chosen"]) + [tok.eos_token_id]
    tokens = [(t, False) for t in prompt] + [(t, True) for t in completion]  # (id, is a completion token)
    tokens = tokens[:seq_len]
    ids = [t for t, _ in tokens] + [tok.eos_token_id] * (seq_len - len(tokens))  # the tiny tokenizer pads with EOS
    labels = []
    for pos in range(seq_len):
        nxt = pos + 1
        labels.append(tokens[nxt][0] if nxt < len(tokens) and tokens[nxt][1] else I)
    return None if all(x == I for x in labels) else (ids, labels)


def test_labels_are_the_completion_tokens_only(tok, tmp_path):
    path = _write(tmp_path / "train.jsonl", ROWS)
    seq_len = 40
    ids, labels, stats = preference_sequences([path], tok, seq_len)
    assert stats == PreferenceStats(rows=5, truncated=0, dropped=0)
    assert ids.dtype == labels.dtype == np.int64 and ids.shape == labels.shape == (5, seq_len)
    for i, row in enumerate(ROWS):
        want_ids, want_labels = _expected(tok, row, seq_len)
        assert ids[i].tolist() == want_ids
        assert labels[i].tolist() == want_labels
        n_prompt, n_completion = len(_ids(tok, row["prompt"])), len(_ids(tok, row["chosen"])) + 1
        # every completion token is a label except a first one with no position before it (an empty prompt)
        assert (labels[i] != I).sum() == n_completion - (n_prompt == 0)
        # the prompt's last position predicts the completion's first token; the EOS is the last label
        if n_prompt:
            assert labels[i, n_prompt - 1] == _ids(tok, row["chosen"])[0]
            assert (labels[i, :n_prompt - 1] == I).all()
        assert labels[i, n_prompt + n_completion - 2] == tok.eos_token_id
        assert (labels[i, n_prompt + n_completion - 1:] == I).all()  # padding
    # the same positions as shifted_batch where a label is kept
    shifted = shifted_batch(ids)["labels"].numpy()
    kept = labels != I
    assert (labels[kept] == shifted[kept]).all() and kept.any()


def test_a_pad_token_is_used_for_padding(tok, tmp_path):
    tok = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token=tok.eos_token, pad_token="a")
    assert tok.pad_token_id not in (None, tok.eos_token_id)
    path = _write(tmp_path / "train.jsonl", ROWS[:1])
    ids, labels, _ = preference_sequences([path], tok, 40)
    n = len(_ids(tok, ROWS[0]["prompt"])) + len(_ids(tok, ROWS[0]["chosen"])) + 1
    assert ids[0, n - 1] == tok.eos_token_id and (ids[0, n:] == tok.pad_token_id).all()
    assert (labels[0, n - 1:] == I).all()


def test_truncation_keeps_the_prompt_start_and_dropping_counts(tok, tmp_path):
    long_prompt = {"prompt": "the quick brown fox jumps over the lazy dog " * 6, "chosen": " yes", "rejected": " no"}
    n_long = len(_ids(tok, long_prompt["prompt"]))
    n_short = len(_ids(tok, ROWS[2]["prompt"])) + len(_ids(tok, ROWS[2]["chosen"])) + 1
    seq_len = n_short - 2  # ROWS[2] is cut inside its completion, long_prompt's prompt alone fills seq_len
    assert n_long > seq_len and len(_ids(tok, ROWS[2]["prompt"])) < seq_len - 1
    path = _write(tmp_path / "train.jsonl", [ROWS[2], long_prompt, ROWS[2]])
    ids, labels, stats = preference_sequences([path], tok, seq_len)
    assert stats == PreferenceStats(rows=3, truncated=3, dropped=1)
    assert ids.shape == (2, seq_len)
    want_ids, want_labels = _expected(tok, ROWS[2], seq_len)
    assert ids[0].tolist() == want_ids == ids[1].tolist() and labels[0].tolist() == want_labels
    assert labels[0, -1] == I and labels[0, -2] != I  # cut: no EOS, the last kept token is still learned
    assert tok.eos_token_id not in ids[0].tolist()
    assert _expected(tok, long_prompt, seq_len) is None
    # one completion token left: a prompt of seq_len - 1 tokens keeps exactly one label
    prompt = _ids(tok, long_prompt["prompt"])[:seq_len - 1]
    row = {"prompt": tok.decode(prompt), "chosen": " yes", "rejected": ""}
    assert _ids(tok, row["prompt"]) == prompt
    ids, labels, stats = preference_sequences([_write(tmp_path / "one.jsonl", [row])], tok, seq_len)
    assert stats == PreferenceStats(rows=1, truncated=1, dropped=0)
    assert (labels[0] != I).sum() == 1 and labels[0, seq_len - 2] == _ids(tok, " yes")[0]


def test_every_row_dropped_is_an_error(tok, tmp_path):
    row = {"prompt": "the quick brown fox jumps over the lazy dog " * 6, "chosen": " yes", "rejected": " no"}
    with pytest.raises(ValueError, match="every one of 1 rows dropped"):
        preference_sequences([_write(tmp_path / "train.jsonl", [row])], tok, 8)


def test_rows_are_read_across_files_and_globs_in_order(tok, tmp_path):
    a = _write(tmp_path / "a.jsonl", ROWS[:2])
    _write(tmp_path / "b.jsonl", ROWS[2:])
    ids_glob, _, stats = preference_sequences([str(tmp_path / "*.jsonl")], tok, 40)
    ids_one, _, _ = preference_sequences([a], tok, 40)
    assert stats.rows == 5 and np.array_equal(ids_glob[:2], ids_one)


@pytest.mark.parametrize("rows, message", [
    ([ROWS[0], ROWS[1], {"prompt": "p", "rejected": "r"}],
     " row 3: field 'chosen' missing (fields: ['prompt', 'rejected'])"),
    ([ROWS[0], {"prompt": "p", "chosen": "c", "rejected": 3}], " row 2: field 'rejected' must be a string, got int"),
    ([{"prompt": None, "chosen": "c", "rejected": "r"}], " row 1: field 'prompt' must be a string, got NoneType"),
    ([ROWS[0], "", "{not json"], " row 3: not valid JSON (Expecting property name enclosed in double quotes)"),
    (['["a list"]'], " row 1: not a JSON object (got list)"),
    ([], ": file is empty"),
    (["", "  "], ": holds no rows"),
])
def test_bad_rows_name_the_file_row_and_field(tok, tmp_path, rows, message):
    path = _write(tmp_path / "train.jsonl", rows)  # a blank line still counts as a row number
    with pytest.raises(ValueError) as e:
        preference_sequences([path], tok, 40)
    assert str(e.value) == f"preference data {path}{message}"


def test_files_and_tokenizer_are_checked(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="preference data .*missing.jsonl: no such file"):
        preference_sequences([str(tmp_path / "missing.jsonl")], tok, 40)
    with pytest.raises(ValueError, match=r"train.txt: unsupported suffix"):
        preference_sequences([_write(tmp_path / "train.txt", ROWS)], tok, 40)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        preference_sequences([_write(tmp_path / "train.jsonl", ROWS)], tok, 1)
    no_eos = tok.__class__(tokenizer_object=tok.backend_tokenizer)
    assert no_eos.eos_token_id is None
    with pytest.raises(ValueError, match="tokenizer has no eos_token_id"):
        preference_sequences([_write(tmp_path / "train.jsonl", ROWS)], no_eos, 40)


def _batches(it, n):
    return [next(it) for _ in range(n)]


def test_batches_carry_the_given_labels_and_resume(tok, tmp_path):
    path = _write(tmp_path / "train.jsonl", ROWS * 3)  # 15 rows
    ids, labels, _ = preference_sequences([path], tok, 40)
    kw = {"batch_size": 2, "rank": 1, "world_size": 2, "seed": 7}
    data = PackedTextBatches.from_preference([path], tok, 40, **kw)
    assert data.per_epoch == 3
    it = iter(data)
    first = _batches(it, 4)  # crosses an epoch boundary
    by_row = {tuple(r): lab for r, lab in zip(ids.tolist(), labels.tolist())}
    for b in first:
        assert b["input_ids"].dtype == b["labels"].dtype == torch.int64 and b["labels"].shape == (2, 40)
        for r, lab in zip(b["input_ids"].tolist(), b["labels"].tolist()):
            assert by_row[tuple(r)] == lab  # the precomputed labels, not shifted_batch's
        assert not torch.equal(b["labels"], shifted_batch(b["input_ids"].numpy())["labels"])
    state = data.state_dict()
    rest = _batches(it, 3)
    resumed = PackedTextBatches(ids, labels=labels, **kw)
    resumed.load_state_dict(state)
    again = _batches(iter(resumed), 3)
    for x, y in zip(rest, again):
        assert x.keys() == y.keys() == {"input_ids", "labels"}
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    for changed, field in (({**kw, "seed": 8}, "seed"), ({**kw, "batch_size": 1}, "batch_size"),
                           ({**kw, "rank": 0}, "rank"), ({**kw, "labels": labels[::-1].copy()}, "sequences")):
        with pytest.raises(ValueError, match=rf"data state has {field}=.* but this reader has .*exact resume"):
            PackedTextBatches(ids, **{"labels": labels, **changed}).load_state_dict(state)
    # the same rows in the same order as without labels (only the labels differ)
    plain = _batches(iter(PackedTextBatches(ids, **kw)), 4)
    assert all(torch.equal(p["input_ids"], b["input_ids"]) for p, b in zip(plain, first))
    assert all(torch.equal(p["labels"], shifted_batch(b["input_ids"].numpy())["labels"]) for p, b in zip(plain, first))


def test_labels_must_match_the_sequences():
    seqs = np.zeros((4, 8), dtype=np.int64)
    with pytest.raises(ValueError, match="labels have shape"):
        PackedTextBatches(seqs, labels=np.zeros((4, 7), dtype=np.int64), batch_size=1, rank=0, world_size=1, seed=0)


def _reference_weight(r: float, cfg: PreferenceConfig) -> float:
    x = cfg.beta * r
    w = {"exp": math.exp(x), "sigmoid": 2 / (1 + math.exp(-x)), "linear": 1 + x}[cfg.transform]
    return min(max(w, cfg.min_weight), cfg.max_weight)


@pytest.mark.parametrize("transform", list(WeightTransform))
@pytest.mark.parametrize("beta, lo, hi", [(1.0, 0.0, 4.0), (0.5, 0.25, 1.5), (3.0, 0.0, 100.0)])
def test_token_weights_match_the_formulas(transform, beta, lo, hi):
    cfg = PreferenceConfig(reference="ref", transform=transform, beta=beta, min_weight=lo, max_weight=hi)
    cfg.validate()
    g = torch.Generator().manual_seed(0)
    lt = -torch.rand(3, 17, generator=g, dtype=torch.float64) * 6
    lr = -torch.rand(3, 17, generator=g, dtype=torch.float64) * 6
    w = token_weights(lt, lr, cfg)
    assert w.dtype == torch.float32 and w.shape == lt.shape
    want = torch.tensor([[_reference_weight(a - b, cfg) for a, b in zip(ra, rb)]
                         for ra, rb in zip(lt.tolist(), lr.tolist())], dtype=torch.float64)
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=1e-6)
    assert w.min() >= lo and w.max() <= hi
    if transform != WeightTransform.sigmoid or hi < 2:  # the clamp is reached (sigmoid never exceeds 2)
        assert (w == hi).any() or (w == lo).any()
    # r = 0: exactly 1, also from bf16 inputs
    same = lt.to(torch.bfloat16)
    assert torch.equal(token_weights(same, same.clone(), cfg), torch.ones(3, 17))


def test_token_weights_clamp_and_direction():
    cfg = PreferenceConfig(reference="ref", transform="linear", beta=2.0, min_weight=0.5, max_weight=2.0)
    r = torch.tensor([-10.0, -0.2, 0.0, 0.25, 10.0])
    assert token_weights(r, torch.zeros(5), cfg).tolist() == [0.5, 0.6000000238418579, 1.0, 1.5, 2.0]
    cfg = PreferenceConfig(reference="ref", transform="exp", beta=1.0, min_weight=0.0, max_weight=4.0)
    assert token_weights(torch.tensor([200.0, -200.0]), torch.zeros(2), cfg).tolist() == [4.0, 0.0]  # overflow: max
    with pytest.raises(ValueError, match="must match"):
        token_weights(torch.zeros(2, 3), torch.zeros(3), cfg)


def test_label_logprobs_against_log_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = I
    lp = label_logprobs(logits, labels)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape
    ref = torch.log_softmax(logits.double(), -1)
    for b in range(2):
        for t in range(5):
            want = 0.0 if labels[b, t] == I else ref[b, t, labels[b, t]].item()
            assert lp[b, t].item() == pytest.approx(want, abs=1e-5)
    assert lp[0, 1] == 0 and lp[1, 4] == 0 and (lp[labels != I] < 0).all()
    # ignored positions give weight 1 whatever the models say
    cfg = PreferenceConfig(reference="ref")
    w = token_weights(lp, label_logprobs(logits.flip(-1), labels), cfg)
    assert w[0, 1] == 1 and w[1, 4] == 1 and (w[labels != I] != 1).any()


@pytest.mark.parametrize("key, value, message", [
    ("beta", 0.0, "must be finite and > 0"),
    ("beta", -1.0, "must be finite and > 0"),
    ("beta", math.inf, "must be finite and > 0"),
    ("beta", math.nan, "must be finite and > 0"),
    ("min_weight", -0.1, "must be in [0, 1]"),
    ("min_weight", 1.5, "must be in [0, 1]"),
    ("max_weight", 0.9, "must be finite and >= 1"),
    ("max_weight", math.inf, "must be finite and >= 1"),
    ("transform", "softmax", "must be one of ['exp', 'sigmoid', 'linear']"),
    ("reference", None, "must be a path"),
])
def test_config_refusals_name_the_key(key, value, message):
    cfg = PreferenceConfig(reference="ref")
    cfg.validate()
    setattr(cfg, key, value)
    with pytest.raises(ValueError) as e:
        cfg.validate()
    assert str(e.value).startswith(f"config key 'preference.{key}': ") and message in str(e.value)




def _metaspace_tokenizer():
    """A SentencePiece-style BPE (Metaspace, prepend_scheme 'first': Llama-2 legacy=False, Mistral v0.3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    texts = ["Say hi: hi there, friend", "Count to ten. one two three ten"] * 4
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["</s>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


@pytest.mark.parametrize("row, completion", [
    ({"prompt": "Say hi:", "chosen": " hi there"}, ["▁hi", "▁there", "</s>"]),
    ({"prompt": "Count to", "chosen": " ten."}, ["▁ten.", "</s>"]),
    # tokenized apart, "en." would be "▁", "en", "." (a spurious "▁"); joined, "▁ten." straddles the boundary and is
    # counted as completion
    ({"prompt": "Count to t", "chosen": "en."}, ["▁ten.", "</s>"]),
])
def test_prompt_and_completion_are_tokenized_as_one_text(tmp_path, row, completion):
    tok = _metaspace_tokenizer()
    ids, labels, _ = preference_sequences([_write(tmp_path / "t.jsonl", [{**row, "rejected": ""}])], tok, 16)
    joint = _ids(tok, row["prompt"] + row["chosen"]) + [tok.eos_token_id]
    n, n_prompt = len(joint), len(joint) - len(completion)
    assert ids[0, :n].tolist() == joint and tok.convert_ids_to_tokens(joint[n_prompt:]) == completion
    assert (labels[0, :n_prompt - 1] == I).all() and (labels[0, n - 1:] == I).all()
    assert labels[0, n_prompt - 1:n - 1].tolist() == joint[n_prompt:]  # the prompt's last position predicts the first


def test_special_token_text_in_a_row_is_text(tok, tmp_path):
    row = {"prompt": "Say hi:", "chosen": f" hi {tok.eos_token} there", "rejected": ""}
    assert tok.eos_token_id in tok(row["chosen"], add_special_tokens=False)["input_ids"]  # the default would
    ids, labels, _ = preference_sequences([_write(tmp_path / "t.jsonl", [row])], tok, 40)
    n = len(_ids(tok, row["prompt"] + row["chosen"])) + 1
    assert np.flatnonzero(ids[0] == tok.eos_token_id).tolist() == list(range(n - 1, 40))  # the final EOS, padding
    assert (labels[0] == tok.eos_token_id).sum() == 1


def test_a_tokenizer_without_offsets_is_refused(tok, tmp_path):
    class NoOffsets:  # what transformers 5 Python (slow) tokenizers do: drop the offsets request silently
        eos_token_id = pad_token_id = tok.eos_token_id

        def __call__(self, texts, **kwargs):
            return {"input_ids": tok(texts, add_special_tokens=False)["input_ids"]}

    with pytest.raises(ValueError, match="NoOffsets: preference data needs a fast tokenizer"):
        preference_sequences([_write(tmp_path / "t.jsonl", ROWS)], NoOffsets(), 40)
