"""tools/convert_to_ternary.py --format gguf: TQ2_0 / TQ1_0 files that llama.cpp itself runs like the student.

llama.cpp comes from `make llama-cpp` (llama-cpp-python built from the registry's sdist, which `make test` runs
first); its vendored convert_hf_to_gguf.py is the independent converter the export is compared against.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from megadistil.bitnet.quant import ternary_codes
from megadistil.export.gguf import (
    PRE_TOKENIZER_REGEX,
    GGUFConfig,
    LinearType,
    convert_checkpoint_gguf,
    encode,
    export_gguf,
    gguf_architecture,
    permute_rope_rows,
    pre_tokenizer_name,
    ternary_values,
)
from megadistil.export.llamacpp import verify_gguf
from megadistil.export.sources import BaseModel, ExportError, StudentParts
from megadistil.export.ternary import StudentSpec, student_spec
from tests._tools import deepspeed_cmd
from tests.test_export import _run, _tensors, _tool_main, read_delta

REPO = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType
LLAMA3_REGEX = next(k for k, v in PRE_TOKENIZER_REGEX.items() if v == "llama-bpe")


def _llama_cpp_source() -> Path:
    found = sorted(REPO.glob(".cache/llama-cpp/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    assert found, "llama.cpp's source is missing: run the tests through `make test` (it runs `make llama-cpp`)"
    return found[-1].parent


# ---------------------------------------------------------------- the format, against independent references

@pytest.mark.parametrize("qtype", [LinearType.TQ2_0, LinearType.TQ1_0, LinearType.F16])
def test_a_ternary_tensor_stores_codes_and_mean_abs_the_inverse_of_transformers_weight_scale(qtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=g, dtype=torch.float64) * 0.02
    w[3, :256] = 0  # an all-zero block: d = 0, codes 0
    mean = w.abs().mean()
    codes = (w / mean).round().clamp(-1, 1)  # float64 Q3
    from transformers.integrations.bitnet import WeightQuant  # transformers' own BitNet quantizer (1/mean|W|)

    hf_scale = 1.0 / w.float().abs().mean().clamp(min=1e-5)  # what transformers' `bitlinear` stores
    assert torch.equal((WeightQuant.apply(w.float()) * hf_scale).round().double(), codes)
    raw = encode(ternary_values(*ternary_codes(w.float()), lambda t: t), qtype.ggml)
    back = torch.from_numpy(gguf.quants.dequantize(raw, qtype.ggml).astype(np.float64)).reshape(w.shape)
    d = float(np.float16(1.0 / hf_scale.item()))  # GGUF's d: 1/weight_scale (= mean|W|) rounded to fp16
    assert abs(d / mean.item() - 1) < 1e-3
    assert torch.equal(back, codes * d)
    if qtype != LinearType.F16:
        bpw = {LinearType.TQ2_0: 2.0625, LinearType.TQ1_0: 1.6875}[qtype]
        assert raw.nbytes == w.numel() * bpw / 8


def test_rope_row_permutation_is_llama_cpp_converters():
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads x head_dim 4
    # HF pairs (i, i + d/2) in a head; GGML's NORM rope pairs (2i, 2i + 1): rows 0,2,1,3 of each head
    assert permute_rope_rows(w, 2)[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


def _byte_level(**kw):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True} | kw


def test_pre_tokenizers_map_to_llama_cpp_names_or_are_refused():
    assert pre_tokenizer_name(_byte_level(), "t") == "gpt-2"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        _byte_level(use_regex=False)]}
    assert pre_tokenizer_name(llama3, "t") == "llama-bpe"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level()]}
    for bad in (digits, _byte_level(add_prefix_space=True), None):
        with pytest.raises(ExportError, match="tokenizer tok.json: its pre_tokenizer .* has no llama.cpp equivalent"):
            pre_tokenizer_name(bad, "tok.json")


def _spec(subln: bool) -> StudentSpec:
    return StudentSpec([], 1.0, torch.float32, subln, ["lm_head"], 4)


def test_architectures_llama_cpp_cannot_express_are_refused_with_the_reason():
    from transformers import LlamaConfig, Qwen2Config

    assert gguf_architecture(LlamaConfig(), _spec(False)) == "llama"
    assert gguf_architecture(LlamaConfig(tie_word_embeddings=True), _spec(True)) == "bitnet"
    with pytest.raises(ExportError, match="Llama-family students .*model_type='qwen2' is not one"):
        gguf_architecture(Qwen2Config(), _spec(False))
    with pytest.raises(ExportError, match="uses the token embedding as its output head.*tie_word_embeddings=false"):
        gguf_architecture(LlamaConfig(tie_word_embeddings=False), _spec(True))
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 5e5}
    with pytest.raises(ExportError, match="applies no rope scaling.*rope_type='llama3'"):
        gguf_architecture(LlamaConfig(tie_word_embeddings=True, rope_parameters=rope), _spec(True))


# ---------------------------------------------------------------- a trained 2-rank run, in llama.cpp

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A pretrained tiny Llama (hidden 256; MLP 384 wide, so down_proj's rows are not whole 256-blocks), distilled 4
    steps by 2 ranks with a ReLoRA merge into an int8 ΔW."""
    from megadistil.tiny import make_tiny_llama, stdlib_files

    tmp = tmp_path_factory.mktemp("gguf")
    texts = [f.read_text(errors="replace") for f in stdlib_files(6)]
    tiny = make_tiny_llama(tmp / "tiny", texts=texts, vocab_size=384, seed=0, pretrain_steps=60, hidden_size=256,
                           intermediate_size=384)
    _run([*deepspeed_cmd(2), "launch/train.py", "--ds_config", "ds_configs/zero3.json",
          "--config", "configs/tiny.yaml", f"model.student={tiny}", f"data.text=[{tiny}/corpus.txt]",
          "train.max_steps=4", "train.save_every=4", "relora.reset_every=2", "relora.restart_warmup_steps=1",
          "relora.delta_format=int8",
          "bitnet.lora_alpha=32", f"train.output_dir={tmp}/run", "model.dtype=fp32"])
    return {"tmp": tmp, "tiny": tiny, "run": tmp / "run"}


def _read(path: Path) -> dict[str, tuple[Q, np.ndarray, np.ndarray]]:
    """name -> (type, raw data, dequantized float32 [out, in])."""
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, np.array(t.data), gguf.quants.dequantize(np.array(t.data), t.tensor_type))
            for t in reader.tensors}


@pytest.mark.multirank
@pytest.mark.parametrize("linear_type", ["tq2_0", "tq1_0"])
def test_the_gguf_runs_in_llama_cpp_like_the_student(run, linear_type, capsys):
    out = run["tmp"] / f"student-{linear_type}.gguf"
    rc = _tool_main()(["--format", "gguf", "--gguf-type", linear_type, "--checkpoint", str(run["run"]),
                       "--output", str(out), "--verify", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "PASSED" in printed and "llama.cpp ran llama" in printed
    assert "2 layer(s) whose input width is not a multiple of 256" in printed  # the down_projs, in f16
    tensors = _read(out)
    assert tensors["blk.0.attn_q.weight"][0] == Q[linear_type.upper()]
    assert tensors["blk.1.ffn_down.weight"][0] == Q.F16 and tensors["output.weight"][0] == Q.F16
    assert tensors["rope_freqs.weight"][0] == Q.F32  # Llama-3.1's rope scaling
    assert not list(out.parent.glob(f".{out.name}.partial*"))


@pytest.mark.multirank
def test_llama_cpp_agrees_on_perplexity_tokens_and_greedy_text(run):
    result = convert_checkpoint_gguf(run["run"], run["tmp"] / "verify.gguf", GGUFConfig(progress=False), verify=True)
    v = result.verify
    assert v["loaded_as"]["torch_imported"] is False and v["loaded_as"]["metadata"]["general.architecture"] == "llama"
    assert v["ppl_rel_diff"] < 0.01 and v["argmax_agreement"] >= 0.95  # measured 0.06 %, 99.4 % at hidden 256
    assert v["tokenization_identical"] and v["text_tokens"] > 1000
    assert v["prompts"] - len(v["partings"]) >= 1 and all(p["gap"] < 0.1 for p in v["partings"])
    ternary = 2 * (256 * 256 * 2 + 128 * 256 * 2 + 384 * 256 * 2)  # q, o, k, v, gate, up of 2 layers
    assert result.sizes["linear_bytes"] == ternary * 2.0625 / 8 + 2 * 256 * 384 * 2  # + the f16 down_projs
    assert result.fallback_layers == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


@pytest.mark.multirank
@pytest.mark.multirank
def test_verify_reads_text_spelling_a_special_token_as_the_run_did(run):
    """verify compares llama.cpp's tokenization of the held-out text with the run's: text spelling EOS is text by
    default and the control token under data.split_special_tokens=false (chat-formatted data), on both sides."""
    from transformers import AutoTokenizer

    from megadistil.export.llamacpp import run_llama_cpp

    path = run["tmp"] / "tokenize.gguf"
    convert_checkpoint_gguf(run["run"], path, GGUFConfig(progress=False), verify=False)
    tok = AutoTokenizer.from_pretrained(run["tiny"])
    text = f"def f():{tok.eos_token}    return 1"
    ids = torch.zeros(1, 4, dtype=torch.int64)
    for split in (True, False):
        got, _ = run_llama_cpp(path, ids, ids[:0, :1], [], 0, text, special=not split)
        want = tok(text, add_special_tokens=False, split_special_tokens=split)["input_ids"]
        assert (tok.eos_token_id in want) is not split and got["text_ids"].tolist() == want


def test_every_ternary_tensor_is_q3_of_the_float64_rebuilt_weight(run):
    """Independent of the exporter: W + codes·scale (ΔW partitions concatenated) + s·B·A in float64, Q3, q/k rows in
    GGML's rope order, against the TQ2_0 file's codes and d."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megadistil.export.sources import locate_checkpoint

    out = run["tmp"] / "float64.gguf"
    convert_checkpoint_gguf(run["run"], out, GGUFConfig(progress=False))
    got = _read(out)
    ckpt = locate_checkpoint(run["run"])
    trainable = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.root), tag=ckpt.tag, exclude_frozen_parameters=True)
    base = _tensors(run["tiny"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    layers = [n.removeprefix("student.").removesuffix(".lora_A") for n in trainable if n.endswith("lora_A")]
    assert len(layers) == 14
    for m in layers:
        a, b = trainable[f"student.{m}.lora_A"].double(), trainable[f"student.{m}.lora_B"].double()
        delta = (read_delta(ckpt.dir, f"student.{m}.delta").double()
                 * read_delta(ckpt.dir, f"student.{m}.delta_scale").double())
        w = base[f"{m}.weight"].double() + delta + 32 / 16 * b @ a
        heads = {"q_proj": 4, "k_proj": 2}.get(m.rsplit(".", 1)[1])
        w = permute_rope_rows(w, heads) if heads else w
        qtype, _, values = got[names.get_name(f"{m}.weight", try_suffixes=(".weight",))]
        assert qtype == (Q.F16 if m.endswith("down_proj") else Q.TQ2_0), m  # down_proj: 384 wide, f16 holds it
        values = torch.from_numpy(values.astype(np.float64)).reshape(w.shape)
        d = values.abs().max()
        assert d == float(np.float16(w.abs().mean().item())), m  # d = mean|W_eff| in fp16
        expect = (w / w.abs().mean()).round().clamp(-1, 1)
        near_half = ((w / w.abs().mean()).abs() - 0.5).abs() < 1e-5  # float32 vs float64 may round these either way
        assert torch.equal((values / d)[~near_half], expect[~near_half]), m
        assert int(near_half.sum()) <= w.numel() // 1000  # a few ties, never a share that would hide a wrong tensor


@pytest.mark.multirank
def test_llama_cpps_own_converter_reads_the_hf_export_to_the_same_ternary_tensors(run):
    """convert_hf_to_gguf.py --outtype tq2_0 on the HF export (fp32) writes the same TQ2_0 blocks as --format gguf.
    It refuses the tiny byte-level BPE tokenizer (it only knows tokenizers by the hash of their output), so its
    pre-tokenizer detection is given the name ours reads from tokenizer.json."""
    from megadistil.export import ExportConfig, convert_checkpoint

    hf = run["tmp"] / "hf_fp32"
    convert_checkpoint(run["run"], hf, ExportConfig(dtype="fp32", progress=False))
    source = _llama_cpp_source()
    theirs = run["tmp"] / "theirs.gguf"
    # --no-lazy: in its default lazy mode the converter's own bitnet unpacking fails (a CPU shift tensor meets its
    # meta tensors: "Tensor on device cpu is not on the expected device meta")
    cmd = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(hf), "--outtype", "tq2_0", "--outfile", str(theirs),
           "--no-lazy"]
    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=source, check=False)
    assert refused.returncode != 0 and "BPE pre-tokenizer was not recognized" in refused.stderr + refused.stdout
    patched = ("import sys, runpy; sys.argv = sys.argv[1:]; sys.path.insert(0, '.');"
               "from conversion.base import TextModel; TextModel.get_vocab_base_pre = lambda self, tok: 'gpt-2';"
               "runpy.run_path('convert_hf_to_gguf.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", patched, *cmd[1:]], capture_output=True, text=True, cwd=source,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = run["tmp"] / "ours.gguf"
    convert_checkpoint_gguf(run["run"], ours, GGUFConfig(progress=False))
    a, b = _read(ours), _read(theirs)
    assert set(a) == set(b)
    ternary = [n for n in a if a[n][0] == Q.TQ2_0]
    assert len(ternary) == 12  # 7 linears x 2 layers, less the two down_projs (f16 in both)
    for name in a:
        assert a[name][0] == b[name][0], name
        if a[name][0] == Q.TQ2_0:
            assert np.array_equal(a[name][1], b[name][1]), name  # byte for byte
        else:  # f16/f32 tensors: theirs come from the HF export's fp32 copy of the same values
            assert np.allclose(a[name][2], b[name][2], rtol=1e-3, atol=1e-6), name
    reader = gguf.GGUFReader(theirs)
    assert str(bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]), "utf-8") == "gpt-2"


def _llama3_style_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE with Llama-3's pre-tokenizer (its Split regex, then ByteLevel without a regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|end_of_text|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>")


def test_a_subln_student_is_llama_cpps_bitnet_graph(tmp_path):
    """A tied-embedding Llama without rope scaling, with SubLN and trained-looking LoRA and sub-norms (no DeepSpeed:
    the parts come from the model itself), exported as `bitnet` and run by llama.cpp; its tokenizer has Llama-3's
    pre-tokenizer, which llama.cpp must split exactly as transformers does."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from megadistil.bitnet import to_bitnet
    from megadistil.tiny import pretrain, stdlib_files

    texts = [f.read_text(errors="replace") for f in stdlib_files(4)]
    tok = _llama3_style_tokenizer(texts, 384)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    base = tmp_path / "base"
    teacher = LlamaForCausalLM(config)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    pretrain(teacher, torch.tensor([t for doc in ids for t in doc]), steps=60)  # logits with a shape: few near-ties
    teacher.save_pretrained(base)
    tok.save_pretrained(base)
    (tmp_path / "eval.txt").write_text("\n".join(texts))
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    to_bitnet(model, lora_rank=4, subln=True, delta=False)
    state = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_B", "sub_norm.weight")):
                p.add_(torch.randn_like(p) * (0.05 if name.endswith("lora_B") else 0.2))
            if name.endswith(("lora_A", "lora_B", "sub_norm.weight")):
                state[name] = p.detach().clone()
    parts = StudentParts({n: (lambda t=t: t) for n, t in state.items()}, {n: tuple(t.shape) for n, t in state.items()})
    run_config = OmegaConf.create({"bitnet": {"lora_rank": 4, "lora_alpha": None, "exclude": []},
                                   "data": {"eval_text": [str(tmp_path / "eval.txt")], "text": []}})
    spec = student_spec(parts, run_config, torch.float32)
    result = export_gguf(BaseModel(base), parts, spec, tmp_path / "bitnet.gguf", GGUFConfig(progress=False))
    assert result.architecture == "bitnet"
    got = _read(tmp_path / "bitnet.gguf")
    assert "output.weight" not in got and got["blk.1.ffn_sub_norm.weight"][2].shape == (512,)
    v = verify_gguf(result.output, model.eval(), AutoTokenizer.from_pretrained(base), run_config)
    assert v["loaded_as"]["metadata"]["general.architecture"] == "bitnet"
    assert v["loaded_as"]["metadata"]["tokenizer.ggml.pre"] == "llama-bpe" and v["text_tokens"] > 1000
    assert v["ppl_rel_diff"] < 0.01 and v["tokenization_identical"] and v["passed"], {k: v[k] for k in ("argmax_agreement", "partings", "max_abs_diff", "loaded_as")}


# ---------------------------------------------------------------- bad input loses nothing

@pytest.mark.multirank
def test_bad_input_is_refused_and_an_interrupted_write_leaves_nothing(run, tmp_path, capsys, monkeypatch):
    main = _tool_main()
    args = ["--format", "gguf", "--checkpoint", str(run["run"]), "--no-progress"]
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"keep me")
    assert main([*args, "--output", str(existing)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--output", str(existing), "--overwrite"]) == 2
    assert "is not a megadistil export (no GGUF header): --overwrite replaces exports only" in capsys.readouterr().err
    existing.write_bytes(b"GGUF keep me")  # an earlier export: --overwrite may replace it
    assert main([*args, "--output", str(tmp_path / "model")]) == 2
    assert "one file named *.gguf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--output", str(tmp_path / "x.gguf"), "--max-shard-size", "1GB"])
    assert "--format gguf does not use --max-shard-size" in capsys.readouterr().err

    import megadistil.export.gguf as g

    real = g.ternary_values
    calls = []

    def fail_late(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(g, "ternary_values", fail_late)
    with pytest.raises(KeyboardInterrupt):
        g.convert_checkpoint_gguf(run["run"], existing, GGUFConfig(progress=False, overwrite=True))
    assert len(calls) == 5  # interrupted mid-file: the old file stays, no partial file is left beside it
    assert existing.read_bytes() == b"GGUF keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["existing.gguf"]


def test_llama_cpp_dying_by_a_signal_runs_again_with_plain_weights(monkeypatch):
    """llama.cpp's AMX Q8_0 kernels segfault on the demo's shapes (issue #20824): a run killed by a signal is repeated
    once with the repacked layouts off and says so; any other failure is reported as it is."""
    from megadistil.export.llamacpp import _run_script

    monkeypatch.delenv("MEGADISTIL_LLAMA_PLAIN", raising=False)
    crash_unless_plain = ("import os, signal\nif os.environ.get('MEGADISTIL_LLAMA_PLAIN') != '1':\n"
                          "    os.kill(os.getpid(), signal.SIGSEGV)\nprint('ran')")
    proc, plain = _run_script(crash_unless_plain, [])
    assert (proc.returncode, proc.stdout.strip(), plain) == (0, "ran", True)
    proc, plain = _run_script("import sys; sys.exit('bad gguf')", [])
    assert (proc.returncode, proc.stderr.strip(), plain) == (1, "bad gguf", False)


def test_the_plain_weights_switch_reaches_llama_cpps_model_parameters(monkeypatch):
    from megadistil.export.llamacpp import PRELUDE, _run_script

    show = PRELUDE + "print(_bindings.llama_model_default_params().use_extra_bufts)"
    monkeypatch.delenv("MEGADISTIL_LLAMA_PLAIN", raising=False)
    assert _run_script(show, [])[0].stdout.split() == ["True"]
    monkeypatch.setenv("MEGADISTIL_LLAMA_PLAIN", "1")
    proc, plain = _run_script(show, [])
    assert (proc.stdout.split(), plain) == (["False"], True)


# ---------------------------------------------------------------- bases llama.cpp's graphs cannot or need not hold

def test_a_subln_student_of_a_base_with_attention_biases_is_refused():
    """llama.cpp's `bitnet` graph loads no q/k/v/o biases: such a file would load and compute without them."""
    from transformers import LlamaConfig

    with pytest.raises(ExportError, match="`bitnet` graph has no q/k/v/o biases, but this model_type='llama' base "
                                          "has attention_bias=true"):
        gguf_architecture(LlamaConfig(tie_word_embeddings=True, attention_bias=True), _spec(True))
    assert gguf_architecture(LlamaConfig(attention_bias=True), _spec(False)) == "llama"


def test_a_base_holding_rotary_inv_freq_exports_a_gguf_llama_cpp_runs(tmp_path):
    """Llama-2-era checkpoints hold rotary_emb.inv_freq buffers; llama.cpp recomputes them and refuses a file that
    holds them, so the export leaves them out (as llama.cpp's converter does)."""
    from safetensors.torch import load_file, save_file

    from megadistil.export.llamacpp import llama_cpp_perplexity, perplexity
    from tests.test_export import _base_dir, _student

    base_dir = _base_dir(tmp_path / "base", "llama31", hidden_size=256, intermediate_size=512)
    tensors = load_file(base_dir / "model.safetensors")
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(32)
    save_file(tensors, base_dir / "model.safetensors", metadata={"format": "pt"})
    model, base, parts, spec, _ = _student(base_dir)
    out = export_gguf(base, parts, spec, tmp_path / "m.gguf", GGUFConfig(progress=False)).output
    assert not [n for n in _read(out) if "rot_embd" in n]
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        student = perplexity(model(input_ids=ids).logits.float().numpy(), ids.numpy())
    assert abs(llama_cpp_perplexity(out, ids) / student - 1) < 0.02


def test_a_gguf_llama_cpp_cannot_load_fails_verification_and_is_kept(tmp_path):
    """A load failure during --verify is a failed verification with its cause: the file is kept as
    <output>.verify-failed, not deleted by a traceback."""
    from megadistil.export.gguf import verify_gguf_file
    from tests.test_export import _base_dir, _student

    model, base, parts, spec, run_config = _student(_base_dir(tmp_path / "base", "llama31"))

    def corrupt_then_verify(staged: Path, result) -> None:
        staged.write_bytes(staged.read_bytes()[:4096])  # cut short: its tensors' data is missing
        result.verify = verify_gguf_file(staged, model, None, run_config)

    out = tmp_path / "m.gguf"
    result = export_gguf(base, parts, spec, out, GGUFConfig(progress=False), finish=corrupt_then_verify)
    assert result.output == tmp_path / "m.gguf.verify-failed" and not out.exists()
    assert result.output.stat().st_size == 4096 and result.verify["passed"] is False
    assert result.verify["error"].startswith("llama.cpp could not load/run it: ")
    assert "load" in result.verify["error"].removeprefix("llama.cpp could not load/run it: ").lower()


@pytest.mark.multirank
def test_the_tool_keeps_a_gguf_llama_cpp_cannot_load_as_a_failed_verification(run, tmp_path, monkeypatch, capsys):
    import megadistil.export.gguf as g

    real = g.write_gguf

    def cut_short(staging: Path, *args, **kwargs) -> str:
        pre = real(staging, *args, **kwargs)
        staging.write_bytes(staging.read_bytes()[:4096])
        return pre

    monkeypatch.setattr(g, "write_gguf", cut_short)
    out = tmp_path / "m.gguf"
    assert _tool_main()(["--format", "gguf", "--checkpoint", str(run["run"]), "--output", str(out), "--verify",
                         "--verify-sequences", "2", "--no-progress"]) == 1
    assert (tmp_path / "m.gguf.verify-failed").stat().st_size == 4096 and not out.exists()
    (line,) = [e for e in capsys.readouterr().err.splitlines() if e.startswith("verification FAILED")]
    assert line.startswith("verification FAILED (llama.cpp could not load/run it: ")
    assert f"kept beside --output as {out}.verify-failed" in line


def test_a_base_with_a_sliding_window_is_refused_naming_it(tmp_path):
    """llama.cpp's `llama` graph attends over the whole context; transformers applies a Mistral base's sliding window,
    so past it the GGUF computed another model (max |Δlogit| 0.97 beyond a window of 16). Qwen2-style configs slide
    only with use_sliding_window; a window as long as the context never masks anything."""
    from transformers import MistralConfig, Qwen2Config

    from megadistil.export.gguf import sliding_window
    from tests.test_export import _base_dir, _student

    with pytest.raises(ExportError, match=r"GGUF: this model_type='mistral' base attends over a sliding window "
                                          r"\(config.sliding_window=16, max_position_embeddings=2048\), which "
                                          r"llama.cpp's `llama` graph does not apply: past 16 tokens"):
        gguf_architecture(MistralConfig(sliding_window=16, max_position_embeddings=2048), _spec(False))
    assert gguf_architecture(MistralConfig(sliding_window=None), _spec(False)) == "llama"
    assert gguf_architecture(MistralConfig(sliding_window=2048, max_position_embeddings=2048), _spec(False)) == "llama"
    assert sliding_window(Qwen2Config(sliding_window=16)) is None  # use_sliding_window=false: transformers ignores it
    assert sliding_window(Qwen2Config(use_sliding_window=True, sliding_window=16, num_hidden_layers=4,
                                      max_window_layers=2)) == 16
    assert sliding_window(Qwen2Config(use_sliding_window=True, sliding_window=16, num_hidden_layers=4,
                                      max_window_layers=4)) is None  # no layer slides

    _, base, parts, spec, _ = _student(_base_dir(tmp_path / "base", "mistral"))  # tests._tiny: sliding_window 32
    with pytest.raises(ExportError, match=r"config.sliding_window=32"):
        export_gguf(base, parts, spec, tmp_path / "m.gguf", GGUFConfig(progress=False))
    assert not list(tmp_path.glob("*m.gguf*"))
