"""generate_teacher_data end to end: the lines hold each prompt and what the teacher samples for it alone, teacher
shards of the generations, a killed run resumes to identical files, bad input is refused, 2 ZeRO-3 ranks write what
one process wrote."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from megadistil.data import Manifest, decode_sample
from megadistil.data.generate import GENERATIONS, IDENTITY, PARTS, GenerateConfig, ShardOptions, run_generation
from megadistil.data.precompute import teacher_dir_fingerprint
from megadistil.data.text import iter_documents, pack_text
from megadistil.sampling import SamplingConfig, sample
from tests._tools import deepspeed_cmd

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = SamplingConfig(max_new_tokens=10, temperatures=(1.5, 0.7), top_p=0.9, seed=5)


def _cfg(teacher, text, out, **kw) -> GenerateConfig:
    base = {"prompt_tokens": 6, "max_prompts": 7, "batch_size": 3, "sampling": SAMPLING, "progress": False,
            "dtype": "float32"}  # auto is bf16 on a CPU with fast bf16 units; the references here are float32
    return GenerateConfig(teacher=str(teacher), out=str(out), text=[str(text)], **{**base, **kw})


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / GENERATIONS).read_text().splitlines()]


@pytest.fixture(scope="module")
def gen_run(tiny_llama_dir, stdlib_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    shards = ShardOptions(out=str(out / "shards"), seq_len=16, top_k=8)
    summary = run_generation(_cfg(tiny_llama_dir, stdlib_text_file, out / "gen", shards=shards))
    return summary, out / "gen", Path(shards.out)


def test_lines_hold_each_prompt_and_what_the_teacher_samples_for_it_alone(gen_run, tiny_llama_dir, stdlib_text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary, out, _ = gen_run
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    docs = [d for _, d in zip(range(7), iter_documents([stdlib_text_file]), strict=False)]
    lines = _lines(out)
    assert [row["index"] for row in lines] == list(range(7))
    assert summary["prompts"] == 7 == json.loads((out / IDENTITY).read_text())["prompts"]
    stops = 0
    for row, doc in zip(lines, docs, strict=True):
        assert row["prompt_ids"] == tok(doc)["input_ids"][:6]
        alone = sample(model, [torch.tensor(row["prompt_ids"])], SAMPLING, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.eos_token_id, indices=[row["index"]])
        assert row["continuation_ids"] == alone.tokens[0, :alone.lengths[0]].tolist()
        assert row["text"] == tok.decode(row["prompt_ids"] + row["continuation_ids"], skip_special_tokens=True)
        assert row["stop"] == ("eos" if row["continuation_ids"][-1] == tok.eos_token_id else "length")
        stops += row["stop"] == "eos"
        assert row["sampling"] == {**SAMPLING.__dict__, "temperatures": [1.5, 0.7]}
        assert row["teacher"] == teacher_dir_fingerprint(str(tiny_llama_dir))
    assert summary["stops"]["eos"] == stops
    assert len({tuple(r["continuation_ids"]) for r in lines}) > 1, "the prompts differ, so must their samples"


def test_shards_hold_the_generated_documents(gen_run, tiny_llama_dir):
    from transformers import AutoTokenizer

    _, out, shards = gen_run
    m = Manifest.load(shards)
    assert m.args["text"][0][0] == str(out / GENERATIONS) and m.total_samples > 0
    packed = next(pack_text([out / GENERATIONS], AutoTokenizer.from_pretrained(tiny_llama_dir), 16))
    raw = next(iter(wds.tariterators.tarfile_samples([{"url": str(shards / m.shards[0].name)}])))
    dec = decode_sample(raw, seq_len=16, top_k=8, vocab_size=m.vocab_size, codec=m.codec)
    assert np.array_equal(dec.input_ids, packed)


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ eos_token }}{% endif %}")  # EOS as the tiny vocab's only control token


def test_chat_prompts_are_user_turns_whose_control_tokens_the_lines_and_shards_keep(tiny_llama_dir, tmp_path):
    """--chat-template: each prompt is a user turn in the tokenizer's template (its control tokens as tokens), the
    lines' text spells them, and the shards written from that text hold them as control tokens again (as training
    with data.split_special_tokens=false reads it); without a template, or with --text, it is refused."""
    from transformers import AutoTokenizer

    from megadistil.data.generate import iter_prompts

    teacher = tmp_path / "chat_teacher"
    shutil.copytree(tiny_llama_dir, teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(teacher)
    prompts = tmp_path / "p.txt"
    prompts.write_text("the first prompt\nanother one\n")
    cfg = GenerateConfig(teacher=str(teacher), out=str(tmp_path / "gen"), prompts=str(prompts), chat_template=True,
                         sampling=SAMPLING, batch_size=2, progress=False, dtype="float32",
                         shards=ShardOptions(out=str(tmp_path / "shards"), seq_len=16, top_k=4))
    run_generation(cfg)
    eos = tok.eos_token_id
    lines = _lines(tmp_path / "gen")
    for row, prompt in zip(lines, ["the first prompt", "another one"], strict=True):
        assert row["prompt_ids"] == [*tok(prompt, add_special_tokens=False)["input_ids"], eos, eos]
        assert row["prompt"] == prompt + tok.eos_token * 2
        assert row["text"] == tok.decode(row["prompt_ids"] + row["continuation_ids"], skip_special_tokens=False)
    m = Manifest.load(tmp_path / "shards")
    raw = next(iter(wds.tariterators.tarfile_samples([{"url": str(tmp_path / "shards" / m.shards[0].name)}])))
    dec = decode_sample(raw, seq_len=16, top_k=4, vocab_size=m.vocab_size, codec=m.codec)
    first = lines[0]["prompt_ids"]
    assert len(first) < 16 and dec.input_ids.tolist()[:len(first)] == first
    with pytest.raises(ValueError, match="has no chat template"):
        list(iter_prompts(replace(cfg, teacher=str(tiny_llama_dir)), AutoTokenizer.from_pretrained(tiny_llama_dir), None))
    with pytest.raises(ValueError, match="--chat-template needs --prompts"):
        run_generation(replace(cfg, prompts=None, text=[str(prompts)]))


def test_a_killed_run_resumes_to_identical_files(gen_run, tiny_llama_dir, stdlib_text_file, tmp_path):
    _, full, _ = gen_run
    out = tmp_path / "resumed"
    shutil.copytree(full, out)
    part = out / PARTS / "r000.jsonl"
    data = part.read_bytes()
    fifth = data.split(b"\n")[4]
    part.write_bytes(data[:data.index(fifth) + len(fifth) // 2])  # killed while writing the fifth line
    (out / GENERATIONS).unlink()
    (out / IDENTITY).unlink()
    run_generation(_cfg(tiny_llama_dir, stdlib_text_file, out))
    assert (out / GENERATIONS).read_bytes() == (full / GENERATIONS).read_bytes()
    assert part.read_bytes() == data


def test_other_arguments_in_the_same_out_dir_are_refused(gen_run, tiny_llama_dir, stdlib_text_file, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(gen_run[1], out)
    with pytest.raises(ValueError, match="r000.jsonl was written with different arguments"):
        run_generation(_cfg(tiny_llama_dir, stdlib_text_file, out, sampling=replace(SAMPLING, seed=6)))


def test_bad_input_is_refused_naming_it(tiny_llama_dir, stdlib_text_file, tmp_path, capsys):
    from megadistil.data.generate import iter_prompts

    long = tmp_path / "p.txt"
    long.write_text("short\n" + "x " * 40 + "\n")
    cfg = GenerateConfig(teacher=str(tiny_llama_dir), out=str(tmp_path / "a"), prompts=str(long),
                         sampling=SamplingConfig(max_new_tokens=50))
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match=r"prompt 1 \(\d+ tokens\) \+ --max-new-tokens 50 exceed the teacher's 64"):
        list(iter_prompts(cfg, AutoTokenizer.from_pretrained(tiny_llama_dir), 64))
    rows = tmp_path / "p.jsonl"
    rows.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl: line 2 has no 'prompt' string"):
        run_generation(replace(cfg, prompts=str(rows)))
    with pytest.raises(ValueError, match="either --text"):
        run_generation(replace(cfg, text=[str(stdlib_text_file)]))


@pytest.mark.parametrize(("args", "error"), [
    (["--top-p", "1.5"], "--top-p: must be in (0, 1], got 1.5"), (["--top-p", "0"], "--top-p: must be in (0, 1], got 0"),
    (["--top-k", "-1"], "--top-k: must be >= 0"), (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["--temperatures", "0.7", "-1"], "--temperatures: one or more temperatures >= 0"),
])
def test_bad_sampling_flags_are_refused_naming_the_flag(args, error, tiny_llama_dir, tmp_path, capsys):
    """They were refused naming SamplingConfig's config key ('sampling.top_p'), which no one typed here."""
    from tools.generate_teacher_data import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    assert main(["--teacher", str(tiny_llama_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                 *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"generate_teacher_data: error: {error}") and "sampling." not in err
    assert not (tmp_path / "o").exists()



def test_shard_options_and_prompt_counts_are_refused_before_the_teacher_loads(tiny_llama_dir, tmp_path, capsys,
                                                                              monkeypatch):
    """--shard-top-k 0 / --shard-seq-len 1 were refused by the shard writer after every continuation, as --top-k /
    --seq-len; --max-prompts 0 and a blank prompts file wrote 0 continuations and exited 0; a --shard-* option
    without --shards was dropped."""
    from megadistil.data import generate
    from tools.generate_teacher_data import main

    def loaded(*_):
        raise AssertionError("the teacher loaded")

    monkeypatch.setattr(generate, "load_teacher", loaded)
    prompts, blank, out = tmp_path / "p.txt", tmp_path / "blank.txt", tmp_path / "gen"
    prompts.write_text("a\nb\n")
    blank.write_text("\n  \n")
    base = ["--teacher", str(tiny_llama_dir), "--out", str(out), "--no-progress"]
    shards = ["--prompts", str(prompts), "--shards", str(tmp_path / "shards")]
    for args, error in ((shards + ["--shard-top-k", "0"], "--shard-top-k must be >= 1, got 0"),
                        (shards + ["--shard-seq-len", "1"], "--shard-seq-len must be >= 2, got 1"),
                        (["--prompts", str(prompts), "--max-prompts", "0"], "--max-prompts must be >= 1, got 0"),
                        (["--prompts", str(blank)], f"--prompts {blank}: holds no prompt (every line is blank)")):
        assert main(base + args) == 2, args
        assert capsys.readouterr().err == f"generate_teacher_data: error: {error}\n"
        assert not out.exists()
    with pytest.raises(SystemExit) as exit_:
        main(base + ["--prompts", str(prompts), "--shard-top-k", "8"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith("error: --shard-top-k: used only with --shards\n")


@pytest.mark.multirank
def test_two_zero3_ranks_write_what_one_process_wrote(gen_run, tiny_llama_dir, stdlib_text_file, tmp_path):
    """Rank 0 holds prompts 0, 2, 4, 6 (two batches), rank 1 holds 1, 3, 5 (one): rank 1 samples a dummy batch in
    lockstep while rank 0 runs its second."""
    out = tmp_path / "mr"
    cmd = [*deepspeed_cmd(2), str(ROOT / "tools/generate_teacher_data.py"),
           "--teacher", str(tiny_llama_dir), "--text", str(stdlib_text_file), "--out", str(out), "--zero3",
           "--prompt-tokens", "6", "--max-prompts", "7", "--batch-size", "3", "--max-new-tokens", "10",
           "--temperatures", "1.5", "0.7", "--top-p", "0.9", "--seed", "5", "--dtype", "float32",
           "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((out / IDENTITY).read_text())["per_rank"] == [4, 3]
    assert (out / GENERATIONS).read_bytes() == (gen_run[1] / GENERATIONS).read_bytes()


FAKE_VLLM = '''
"""A stand-in for vllm's offline API (LLM, SamplingParams, RequestOutput): greedy decoding by transformers'
generate; like vLLM with stop_token_ids, the stopping token is reported in stop_reason, not in token_ids."""
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

CALLS = []


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class LLM:
    def __init__(self, model, **kwargs):
        CALLS.append(("LLM", model, kwargs))
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def generate(self, prompts, params, use_tqdm=True):
        outputs = []
        for prompt, p in zip(prompts, params, strict=True):
            CALLS.append(("generate", prompt["prompt_token_ids"], dict(p.__dict__)))
            assert p.temperature == 0, "the stand-in decodes greedily only"
            ids = torch.tensor([prompt["prompt_token_ids"]])
            new = self.model.generate(ids, max_new_tokens=p.max_tokens, do_sample=False,
                                      eos_token_id=None if p.ignore_eos else p.stop_token_ids,
                                      pad_token_id=0)[0, ids.shape[1]:].tolist()
            stopped = not p.ignore_eos and new[-1] in p.stop_token_ids
            completion = SimpleNamespace(token_ids=tuple(new[:-1] if stopped else new),
                                         finish_reason="stop" if stopped else "length",
                                         stop_reason=new[-1] if stopped else None)
            outputs.append(SimpleNamespace(outputs=[completion]))
        return outputs
'''


def test_vllm_backend_writes_what_the_torch_backend_writes_greedily(tiny_llama_dir, stdlib_text_file, tmp_path,
                                                                     monkeypatch):
    """--backend vllm through a stand-in with vLLM's offline API (vLLM needs a GPU): the prompts go in as token ids,
    each with its own seed, EOS as a stop token; greedy lines equal the torch backend's (the stopping EOS kept)."""
    from transformers import GenerationConfig

    from megadistil.data.generate import Backend

    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    monkeypatch.syspath_prepend(str(tmp_path))
    greedy = SamplingConfig(max_new_tokens=12, temperatures=(0.0,), top_k=0, seed=5)
    torch_cfg = _cfg(tiny_llama_dir, stdlib_text_file, tmp_path / "torch", sampling=greedy)
    run_generation(torch_cfg)
    run_generation(replace(torch_cfg, out=str(tmp_path / "vllm-out"), backend=Backend.vllm))
    import vllm

    assert _lines(tmp_path / "vllm-out") == _lines(tmp_path / "torch")
    init, *calls = vllm.CALLS
    assert init == ("LLM", str(tiny_llama_dir), {"dtype": "float32", "seed": 5, "trust_remote_code": False})
    eos = GenerationConfig.from_pretrained(tiny_llama_dir).eos_token_id
    for index, (_, ids, params) in enumerate(calls):
        assert ids == _lines(tmp_path / "torch")[index]["prompt_ids"]
        assert params == {"n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 12,
                          "seed": 5 * 1_000_003 + index, "stop_token_ids": [eos] if isinstance(eos, int) else eos,
                          "ignore_eos": False, "detokenize": False}


def test_vllm_backend_refuses_what_it_cannot_do(tiny_llama_dir, stdlib_text_file, tmp_path, monkeypatch):
    from megadistil.data.generate import Backend

    cfg = _cfg(tiny_llama_dir, stdlib_text_file, tmp_path / "a", backend=Backend.vllm)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "vllm" else True)
    with pytest.raises(ValueError, match="--backend vllm: vllm is not installed"):
        run_generation(cfg)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: True)
    with pytest.raises(ValueError, match=r"--temperatures 1.5 0.7: vLLM samples every position at one temperature"):
        run_generation(cfg)
    one = replace(cfg, sampling=SamplingConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="--zero3 partitions a torch model"):
        run_generation(replace(one, zero3=True))
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_a_character_split_between_prompt_and_continuation_goes_to_the_continuation_whole(tiny_llama_dir):
    """A prompt cut inside a character's bytes (byte-level tokens): the prompt and continuation fields split the text
    before that character, not into two U+FFFD halves; together they are the text."""
    from transformers import AutoTokenizer

    from megadistil.data.generate import _line

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = "a naïve café in 東京"
    ids = tok.encode(text, add_special_tokens=False)
    splits = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd")]
    assert len(splits) >= 3  # ï, é and the CJK characters are spelled in several byte tokens
    for k in splits:
        line = _line(tok, 0, ids[:k], ids[k:], None, SAMPLING, "teacher")
        assert line["prompt"] + line["continuation"] == line["text"] == tok.decode(ids)
        assert "\ufffd" not in line["text"] and line["prompt"] == tok.decode(ids[:k])[:-1].rstrip("\ufffd")


def test_line_text_is_the_exact_text_of_its_ids(tiny_llama_dir):
    """A tokenizer saved with clean_up_tokenization_spaces=True: decode's default clean-up turned " ," into "," (and
    " 's" into "'s"), so a line's text was not the text of its ids."""
    from transformers import AutoTokenizer

    from megadistil.data.generate import _line

    # transformers >= 5.2x skips the clean-up for BPE tokenizers unless forced; 4.56-5.1x applied it to them
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir, clean_up_tokenization_spaces=True,
                                        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    ids = tok.encode("f(a , b) . c 's", add_special_tokens=False)
    exact = tok.backend_tokenizer.decode(ids)
    assert " , " in exact and tok.decode(ids) != exact  # the clean-up is on
    line = _line(tok, 0, ids[:3], ids[3:], None, SAMPLING, "teacher")
    assert line["text"] == line["prompt"] + line["continuation"] == exact


def test_prompt_lines_end_at_newlines_only(tiny_llama_dir, tmp_path):
    """A JSON Lines prompt holding U+2028 (json.dumps(ensure_ascii=False) writes it as is) is one valid line, and a
    .txt prompt holding a form feed is one prompt: str.splitlines broke both (refused, or two prompts that shifted
    every later prompt's index and seed); a CRLF file's prompts end without their \r."""
    from megadistil.data.generate import _prompt_texts

    rows = tmp_path / "p.jsonl"
    rows.write_text(json.dumps({"prompt": "one\u2028line"}, ensure_ascii=False) + "\n" +
                    json.dumps({"prompt": "two"}) + "\n", encoding="utf-8")
    text = tmp_path / "p.txt"
    text.write_text("page one\x0cpage two\r\nsecond prompt\r\n", encoding="utf-8")  # CRLF: no \r kept
    cfg = GenerateConfig(teacher=str(tiny_llama_dir), out=str(tmp_path / "a"), prompts=str(rows))
    assert list(_prompt_texts(cfg)) == ["one\u2028line", "two"]
    assert list(_prompt_texts(replace(cfg, prompts=str(text)))) == ["page one\x0cpage two", "second prompt"]
