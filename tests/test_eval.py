"""tools/evaluate.py: lm-eval tasks offline on local YAMLs, perplexity, generations, one results schema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megadistil.eval.generate import continuations, generations_markdown, read_prompts
from megadistil.eval.models import EvalError, files_sha256, parse_model
from tests._tasks import task_docs, write_task
from tests._tools import tool_main


def _tool_main():
    return tool_main("evaluate")


@torch.no_grad()
def _loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) summed over its tokens, and whether greedy decoding yields it: by hand."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    logp = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
    positions = range(len(ctx), len(whole))
    total = sum(float(logp[t - 1, whole[t]]) for t in positions)
    greedy = all(int(logp[t - 1].argmax()) == whole[t] for t in positions)
    return total, greedy


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    docs = task_docs()
    write_task(d, "local_choice", docs, "multiple_choice")
    write_task(d, "local_next", docs, "loglikelihood")
    return d


def test_local_task_yaml_scores_equal_a_hand_computation(tiny_llama_dir, task_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "results.json"
    rc = _tool_main()(["--model", f"tiny={tiny_llama_dir}", "--tasks", "local_choice,local_next",
                       "--include-path", str(task_dir), "--batch-size", "5", "--out", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())
    scores = results["models"][0]["tasks"]

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    docs = task_docs()
    acc, acc_norm, lls, greedy = [], [], [], []
    for d in docs:
        ll = np.array([_loglikelihood(model, tok, d["context"], " " + c)[0] for c in d["choices"]])
        acc.append(float(ll.argmax() == d["label"]))
        acc_norm.append(float((ll / [len(c) for c in d["choices"]]).argmax() == d["label"]))
        total, is_greedy = _loglikelihood(model, tok, d["context"], d["target"])
        lls.append(total)
        greedy.append(float(is_greedy))
    assert 0 < np.mean(acc) < 1  # a task the model neither always wins nor always loses: the check can fail
    assert scores["local_choice"]["samples"] == len(docs)
    assert scores["local_choice"]["acc"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert scores["local_choice"]["acc_norm"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
    assert scores["local_next"]["perplexity"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-4)
    assert scores["local_next"]["acc"] == pytest.approx(np.mean(greedy), abs=1e-12)
    # the schema every model kind shares: provenance and the model's fingerprint (over its weights' contents)
    assert results["schema"] == "megadistil.eval/1" and results["megadistil"]["version"]
    assert results["megadistil"]["git_commit"] is None or len(results["megadistil"]["git_commit"]) == 40
    m = results["models"][0]
    assert (m["name"], m["kind"], m["model_class"]) == ("tiny", "hf", "LlamaForCausalLM")
    expected = files_sha256([tiny_llama_dir / "config.json", *sorted(tiny_llama_dir.glob("*.safetensors"))])
    assert m["fingerprint"]["sha256"] == expected


def test_a_task_whose_data_is_missing_is_a_clear_error_naming_it(tiny_llama_dir, tmp_path, capsys):
    write_task(tmp_path, "gone_local", [], "multiple_choice", data=tmp_path / "not-here.jsonl")
    hub = (tmp_path / "gone_local.yaml").read_text().replace("gone_local", "gone_hub")
    hub = hub.replace("dataset_path: json", "dataset_path: megadistil-test/no-such-dataset")
    (tmp_path / "gone_hub.yaml").write_text(hub.split("dataset_kwargs")[0] + "test_split" + hub.split("test_split")[1])
    for task, missing in (("gone_local", "not-here.jsonl"), ("gone_hub", "megadistil-test/no-such-dataset")):
        rc = _tool_main()(["--model", str(tiny_llama_dir), "--tasks", task, "--include-path", str(tmp_path),
                           "--out", str(tmp_path / "r.json")])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert f"task {task!r}: its data is not on this machine" in err and missing in err, err
    assert not (tmp_path / "r.json").exists()


def test_model_arguments_gguf_is_refused_and_kinds_are_recognised(tiny_llama_dir, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(EvalError, match="GGUF models are not evaluated here; .*--format gguf"):
        parse_model(str(gguf))
    with pytest.raises(EvalError, match="does not exist"):
        parse_model(str(tmp_path / "absent"))
    with pytest.raises(EvalError, match="GGUF models are not evaluated here; .*--format gguf"):
        parse_model(str(tmp_path))  # a dir holding only a GGUF file
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="neither an HF model dir"):
        parse_model(str(tmp_path / "empty"))
    spec = parse_model(f"naive=ternary:{tiny_llama_dir}")
    assert (spec.name, spec.kind, spec.path) == ("naive", "ternary", tiny_llama_dir)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_1")
    assert parse_model(str(tmp_path / "run")).kind == "student"
    (tmp_path / "run" / "student.gguf").write_bytes(b"GGUF")  # convert_to_ternary --format gguf --output run/...
    assert parse_model(str(tmp_path / "run")).kind == "student"  # was refused as a GGUF model


def test_a_model_argument_that_is_an_existing_path_is_that_path(tmp_path, monkeypatch):
    """A run dir named lr=3e-4 was parsed as NAME=PATH: model 'lr' at the missing path 3e-4."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr=3e-4" / "checkpoints").mkdir(parents=True)
    (tmp_path / "lr=3e-4" / "checkpoints" / "latest").write_text("step_1")
    spec = parse_model("lr=3e-4")
    assert (spec.name, spec.kind, spec.path) == ("lr=3e-4", "student", Path("lr=3e-4"))
    assert parse_model("best=lr=3e-4").name == "best"  # NAME= before it still names it


def test_prompt_lines_end_at_newlines_only(tmp_path):
    """str.splitlines cut a prompt holding U+2028 or a form feed in two; a CRLF file's \\r is no part of a prompt."""
    path = tmp_path / "p.txt"
    path.write_bytes("one\u2028line\r\npage\x0cbreak\r\n\r\nlast\\nline".encode())
    assert read_prompts(path) == ["one\u2028line", "page\x0cbreak", "last\nline"]


@pytest.fixture(scope="module")
def llama_like(tiny_llama_dir):
    """The tiny teacher with a tokenizer that adds a BOS (as Llama's), its EOS reused as BOS: the vocab is the model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir, bos_token="<|eos|>", add_bos_token=True)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval(), tok


def test_generation_prompts_start_with_the_tokenizers_bos(llama_like):
    """Prompts were tokenized with add_special_tokens=False: a Llama model saw no BOS."""
    model, tok = llama_like
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["input_ids"][0].tolist()),
                                           with_kwargs=True)
    try:
        continuations(model, tok, ["def main("], max_new_tokens=2)
    finally:
        hook.remove()
    assert seen[0] == tok("def main(")["input_ids"] and seen[0][0] == tok.bos_token_id


def test_generation_stops_at_any_eos_of_the_generation_config(llama_like, monkeypatch):
    """Llama 3.1 stops at any of generation_config.eos_token_id ([<|end_of_text|>, <|eom_id|>, <|eot_id|>]); only
    the tokenizer's EOS stopped a continuation."""
    from megadistil.sampling import SamplingConfig, decode_text, sample

    model, tok = llama_like
    ids = torch.tensor(tok("def main(")["input_ids"])
    greedy = sample(model, [ids], SamplingConfig(max_new_tokens=8, temperatures=(0.0,)), eos_token_id=None,
                    pad_token_id=0).tokens[0].tolist()
    k = next(k for k in range(1, 7) if greedy[k] not in greedy[:k] + [tok.eos_token_id])
    assert tok.eos_token_id not in greedy[:k]
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, greedy[k]])
    got = continuations(model, tok, ["def main("], max_new_tokens=8)[0]["greedy"]
    assert got == decode_text(tok, greedy[:k + 1]) != decode_text(tok, greedy)


def test_generations_are_the_exact_text_of_their_ids(tiny_llama_dir, monkeypatch):
    """A tokenizer saved with clean_up_tokenization_spaces=True: decode's default clean-up turned " ," into ","."""
    from transformers import AutoTokenizer

    from megadistil.eval import generate
    from megadistil.sampling import Generation

    # transformers >= 5.2x skips the clean-up for BPE tokenizers unless forced; 4.56-5.1x applied it to them
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir, clean_up_tokenization_spaces=True,
                                        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    ids = tok.encode("f(a , b) . c 's", add_special_tokens=False)
    exact = tok.backend_tokenizer.decode(ids)
    assert " , " in exact and tok.decode(ids) != exact  # the clean-up is on
    monkeypatch.setattr(generate, "sample", lambda *a, **kw: Generation(torch.tensor([ids]), torch.tensor([len(ids)])))
    row = continuations(torch.nn.Linear(1, 1), tok, ["x"], max_new_tokens=len(ids))[0]
    assert row["greedy"] == row["sampled"] == exact


def test_text_perplexity_and_seeded_generations(tiny_llama_dir, stdlib_text_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megadistil.data.packed import eval_sequences

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main(\nimport os\\nimport \n")
    out = tmp_path / "r.json"
    rc = _tool_main()(["--model", f"a={tiny_llama_dir}", "--model", f"b={tiny_llama_dir}", "--text",
                       str(stdlib_text_file), "--seq-len", "32", "--text-sequences", "6", "--generate", str(prompts),
                       "--max-new-tokens", "6", "--out", str(out)])
    assert rc == 0
    a, b = json.loads(out.read_text())["models"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = torch.from_numpy(eval_sequences([str(stdlib_text_file)], tok, 32, 6)).long()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss  # HF's own mean over the same next-token positions
    assert a["perplexity"]["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert a["generations"] == b["generations"]  # greedy, and sampling seeded per prompt
    assert [g["prompt"] for g in a["generations"]] == ["def main(", "import os\nimport "]
    other_seed = continuations(model, tok, ["def main("], max_new_tokens=6, seed=1)
    assert other_seed[0]["greedy"] == a["generations"][0]["greedy"]
    table = (tmp_path / "r.generations.md").read_text()
    assert table == generations_markdown({"a": a["generations"], "b": b["generations"]}, seed=0, temperature=0.8)
    assert "| a |" in table and "| b |" in table and "`import os⏎import `" in table


def test_a_run_with_eval_tasks_whose_data_is_missing_stops_before_any_weight_loads(tiny_llama_dir, stdlib_text_file,
                                                                                    tmp_path):
    from megadistil.config import ConfigError, load_config
    from megadistil.engine.inputs import check_inputs

    write_task(tmp_path, "gone_in_training", [], "multiple_choice", data=tmp_path / "absent.jsonl")
    cfg = load_config("configs/tiny.yaml", [f"model.student={tiny_llama_dir}", f"data.text=[{stdlib_text_file}]",
                                            "train.eval_tasks=[gone_in_training]",
                                            f"train.eval_tasks_include_path={tmp_path}"])
    with pytest.raises(ConfigError, match=r"train.eval_tasks.*'gone_in_training'.*absent.jsonl"):
        check_inputs(cfg, 1)
    with pytest.raises(ConfigError, match="train.eval_tasks_include_path"):
        load_config("configs/tiny.yaml", [f"model.student={tiny_llama_dir}", f"data.text=[{stdlib_text_file}]",
                                          f"train.eval_tasks_include_path={tmp_path}/nope"])


def test_model_card_takes_one_named_model_of_a_results_file(tmp_path):
    from megadistil.export.card import eval_record

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"models": [{"name": "a", "tasks": {}}, {"name": "b", "tasks": {}}]}))
    assert eval_record(path, "b")["name"] == "b"
    with pytest.raises(ValueError, match=r"holds models \['a', 'b'\]; name one with --eval-model"):
        eval_record(path)
    with pytest.raises(ValueError, match="none is named 'c'"):
        eval_record(path, "c")


def test_device_auto_is_where_the_models_run_and_a_missing_gpu_is_refused(stdlib_text_file):
    from megadistil.eval.harness import EvalSettings

    s = EvalSettings(text=[str(stdlib_text_file)])
    s.validate()
    assert s.device == ("cuda" if torch.cuda.is_available() else "cpu")  # recorded in the results' settings
    with pytest.raises(EvalError, match="--device must be auto, cpu or cuda"):
        EvalSettings(text=[str(stdlib_text_file)], device="gpu0").validate()
    if not torch.cuda.is_available():
        with pytest.raises(EvalError, match="--device cuda: this machine has no CUDA device"):
            EvalSettings(text=[str(stdlib_text_file)], device="cuda").validate()
    for bad, flag in (({"batch_size": 0}, "--batch-size must be >= 1, got 0"),  # were tracebacks after the models ran
                      ({"max_new_tokens": 0}, "--max-new-tokens must be >= 1"), ({"temperature": -1.0}, "--temperature"),
                      ({"text_sequences": 0}, "--text-sequences must be >= 1")):
        with pytest.raises(EvalError, match=flag):
            EvalSettings(text=[str(stdlib_text_file)], **bad).validate()


def test_a_result_path_that_is_a_directory_is_refused_before_anything_runs(tmp_path):
    from megadistil.eval.harness import check_outputs

    with pytest.raises(EvalError, match=f"--out {tmp_path} is a directory; give a file path"):
        check_outputs(tmp_path)
    check_outputs(tmp_path / "eval.json")


def test_an_evaluation_leaves_every_global_rng_as_it_found_it():
    """lm-eval reseeds python, numpy and torch (CUDA too): a run evaluating mid-training must draw what it would."""
    import random

    from megadistil.eval.tasks import preserved_rng

    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item()

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = draws()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    with preserved_rng():
        torch.manual_seed(1234), np.random.seed(1234), random.seed(1234)
        draws()
    assert draws() == expected


def test_chat_text_perplexity_reads_spelled_control_tokens_when_told(tiny_llama_dir, tmp_path):
    """--no-split-special-tokens: the perplexity of chat-formatted text is over its control tokens, as the trainer's
    held-out figure with data.split_special_tokens=false."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megadistil.data.packed import eval_sequences
    from megadistil.eval.perplexity import text_perplexity

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    chat = tmp_path / "chat.txt"
    chat.write_text("".join(f"question {i}{tok.eos_token}answer {i}{tok.eos_token}\n" for i in range(40)))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(eval_sequences([str(chat)], tok, 32, 6, split_special_tokens=False)).long()
    assert int((ids == tok.eos_token_id).sum()) > 6  # spelled ones, besides the separators
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    control = text_perplexity(model, tok, [str(chat)], seq_len=32, max_sequences=6, split_special_tokens=False)
    assert control["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert text_perplexity(model, tok, [str(chat)], seq_len=32, max_sequences=6)["perplexity"] != control["perplexity"]


def test_chat_generations_answer_user_turns_in_the_template(tiny_llama_dir, tmp_path):
    """--chat-template: each --generate prompt is a user turn in the tokenizer's chat template, the continuation
    what the model samples after the assistant's header; a tokenizer without a template is refused, naming it."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megadistil.sampling import SamplingConfig, sample
    from tests.test_generate_data import CHAT_TEMPLATE

    chat_dir = tmp_path / "chat"
    shutil.copytree(tiny_llama_dir, chat_dir)
    tok = AutoTokenizer.from_pretrained(chat_dir)
    tok.chat_template = CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32).eval()
    rows = continuations(model, tok, ["def main(", "import os"], max_new_tokens=6, chat_template=True)
    for i, prompt in enumerate(["def main(", "import os"]):
        ids = [*tok(prompt, add_special_tokens=False)["input_ids"], tok.eos_token_id, tok.eos_token_id]
        greedy = sample(model, [torch.tensor(ids)], SamplingConfig(max_new_tokens=6, temperatures=(0.0,)),
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, indices=[i])
        assert rows[i]["greedy"] == tok.decode(greedy.tokens[0, :greedy.lengths[0]], skip_special_tokens=True)
    assert rows != continuations(model, tok, ["def main(", "import os"], max_new_tokens=6)  # not the plain prompts
    with pytest.raises(ValueError, match="--chat-template: the tokenizer of .* has no chat template"):
        continuations(model, AutoTokenizer.from_pretrained(tiny_llama_dir), ["x"], chat_template=True)


def test_a_model_without_a_chat_template_is_refused_before_any_model_loads(tiny_llama_dir, tmp_path, monkeypatch,
                                                                           capsys):
    """evaluate.py --generate --chat-template: every model's tokenizer is checked first; the error came from the
    generation of the model without one, after the earlier models' evaluations (lost: nothing was written)."""
    from megadistil.eval import harness

    monkeypatch.setattr(harness, "load_model", lambda *a, **k: pytest.fail("a model loaded before the check"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main(\n")
    rc = _tool_main()(["--model", f"plain={tiny_llama_dir}", "--generate", str(prompts), "--chat-template", "--out",
                       str(tmp_path / "r.json")])
    assert rc == 2 and "--chat-template: the tokenizer of --model plain" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--text", "t.txt", "--generations-out", "g.md"], "--generations-out is used only with --generate"),
    (["--text", "t.txt", "--limit", "5"], "--limit is used only with --tasks"),
    (["--text", "t.txt", "--include-path", "tasks/"], "--include-path is used only with --tasks"),
    (["--tasks", "arc_easy", "--no-split-special-tokens"], "--no-split-special-tokens is used only with --text"),
    (["--text", "t.txt", "--chat-template"], "--chat-template is used only with --generate"),
])
def test_an_option_the_evaluation_would_not_read_is_refused(args, message, tmp_path, capsys):
    """They were accepted and ignored (exit 0, no generations file)."""
    with pytest.raises(SystemExit) as exit_:
        _tool_main()(["--model", str(tmp_path), "--out", str(tmp_path / "r.json"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_bf16_trained_student_is_evaluated_with_the_codes_it_trained_with(tmp_path, monkeypatch):
    """--model RUN rebuilds the student as --verify does and moves it to the evaluation dtype: model.to(float32) made
    a bf16 run's LoRA factors float32, whose float32 s·B·A gives other ternary codes than training's bf16 one."""
    from types import SimpleNamespace

    from megadistil.bitnet.linear import weight_codes
    from megadistil.eval.models import ModelSpec, load_model
    from megadistil.export import sources
    from megadistil.export.ternary import layer_codes
    from tests.test_export import _base_dir, _bf16_trained_student

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    base, parts, spec, run_config = _bf16_trained_student(_base_dir(tmp_path / "base", "llama31"))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "meta.json").write_text("{}")
    ckpt = SimpleNamespace(config=run_config, dir=tmp_path / "ckpt", meta={"step": 1})
    monkeypatch.setattr(sources, "locate_checkpoint", lambda path: ckpt)
    monkeypatch.setattr(sources, "check_fingerprint", lambda ckpt, base: None)
    monkeypatch.setattr(sources, "training_dtype", lambda ckpt: torch.bfloat16)
    monkeypatch.setattr(sources.StudentParts, "from_checkpoint", classmethod(lambda cls, ckpt: parts))
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(ModelSpec("s", "student", tmp_path / "run"), dtype).model
        assert model.dtype == dtype
        for m in spec.bitlinear:
            lin = model.get_submodule(m)
            assert lin.lora_A.dtype == lin.lora_B.dtype == torch.bfloat16
            codes, scale = layer_codes(base, parts, spec, m)
            got_codes, got_scale = weight_codes(lin.weight, lin.delta, lin.lora_A, lin.lora_B, lin.scaling)
            assert torch.equal(got_codes, codes) and torch.equal(got_scale, scale), m
