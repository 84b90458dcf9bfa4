"""tools/estimate_memory.py: its terms on known shapes, its verdicts, and a check against measured CPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megadistil.config import ConfigError, load_config
from megadistil.data import Manifest
from megadistil.engine.ds_config import load_ds_config
from megadistil.engine.memory import (
    MODEL_PRESETS,
    GiB,
    Layout,
    ModelDims,
    as_trained,
    count_tensors,
    estimate,
    frozen_tensors,
    parse_bytes,
    resolve_dims,
)
from tests._tools import deepspeed_cmd, tool_main

ROOT = Path(__file__).resolve().parents[1]


def _cfg(name: str, *overrides: str):
    return load_config(ROOT / "configs" / name, list(overrides))


def test_a_shards_run_is_planned_at_the_shards_sequence_length(tmp_path):
    """A run on shards trains at their length, so the planner sizes activations at it, not at data.seq_len's
    default; a data.seq_len set to another length is refused, as the run refuses it."""
    Manifest(vocab_size=128256, top_k=64, temperature=1.0, seq_len=4096, teacher_fingerprint="t",
             tokenizer_fingerprint="k").save(tmp_path)
    on_shards = ["data.text=[]", f"data.shards={tmp_path}", "teacher.kind=shards"]
    base = _cfg("llama3.1-8b.yaml", "data.seq_len=256", *on_shards)
    dims, layout = ModelDims.from_hf(MODEL_PRESETS["llama3.1-8b"], "preset"), Layout(1, 8)
    ds = load_ds_config(ROOT / "ds_configs/zero3.json")
    planned, at_4096 = as_trained(base), _cfg("llama3.1-8b.yaml", "data.seq_len=4096", *on_shards)
    assert (base.data.seq_len, planned.data.seq_len, as_trained(at_4096).data.seq_len) == (256, 4096, 4096)
    activations = [estimate(c, dims, layout, ds).term("activations") for c in (base, planned, at_4096)]
    assert activations[1] == activations[2] > 3 * activations[0]
    with pytest.raises(ConfigError, match="'data.seq_len': 8192, but the shards in .* hold sequences of 4096 tokens"):
        as_trained(_cfg("llama3.1-8b.yaml", *on_shards))  # the yaml's 8192
    elsewhere = _cfg("llama3.1-8b.yaml", "data.text=[]", "data.shards=/not/here",
                     "teacher.kind=shards")
    assert as_trained(elsewhere) is elsewhere  # planned on another machine: data.seq_len says it


def test_weights_and_optimizer_terms_are_the_counts_over_the_ranks() -> None:
    cfg = _cfg("llama3.1-8b.yaml")
    dims, source = resolve_dims(cfg, config_path="configs/llama3.1-8b.yaml")
    assert source.startswith("preset llama3.1-8b")
    ds = load_ds_config(ROOT / "ds_configs" / "zero3.json")
    t = count_tensors(dims, cfg)
    assert sum(t.base) == 8_030_261_248
    one, eight = (estimate(cfg, dims, Layout(1, g), ds) for g in (1, 8))
    # every tensor of W is above the persistence threshold but the norms (4096 elements, whole on every rank)
    norms = (2 * 32 + 1) * 4096
    assert one.term("weights W") == 2 * sum(t.base)
    assert eight.term("weights W") == int(((sum(t.base) - norms) / 8 + norms) * 2)
    assert eight.term("fp32 master + Adam") == int(sum(t.trainable) / 8 * 16)
    assert eight.term("activations") == one.term("activations")  # not sharded
    assert eight.total < one.total


def test_offload_moves_states_to_the_host() -> None:
    cfg = _cfg("llama3.1-70b.yaml")
    dims, _ = resolve_dims(cfg, config_path="configs/llama3.1-70b.yaml")
    plain = estimate(cfg, dims, Layout(1, 8), load_ds_config(ROOT / "ds_configs" / "zero3.json"))
    off = estimate(cfg, dims, Layout(1, 8), load_ds_config(ROOT / "ds_configs" / "zero3_offload.json"))
    moved = {"weights W", "ΔW", "fp32 master + Adam"}
    assert {n for n, _, _ in off.cpu_rows} == moved and not moved & {n for n, _, _ in off.rows}
    assert sum(b for _, b, _ in off.cpu_rows) == sum(plain.term(n) for n in moved)


def _tool_main():
    return tool_main("estimate_memory")


def test_cli_verdicts_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: each interpreter start costs seconds here, and the script is only `sys.exit(main())`."""
    import contextlib
    import io
    from types import SimpleNamespace

    main = _tool_main()
    monkeypatch.chdir(ROOT)

    def run(*args: str) -> SimpleNamespace:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
        return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())

    fits = run("--config", "configs/llama3.1-70b.yaml", "--nodes", "8", "--gpus-per-node", "8")
    assert fits.returncode == 0 and "fits:" in fits.stdout and "| weights W" in fits.stdout
    small = run("--config", "configs/llama3.1-70b.yaml", "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory",
                "40GB")
    assert small.returncode == 1 and "does not fit:" in small.stdout
    missing = run("--config", "configs/tiny.yaml", "model.student=/nowhere/model", "--nodes", "1")
    assert missing.returncode == 2 and "model.student" in missing.stderr and "--model-config" in missing.stderr
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"hidden_size": 64}))
    bad = run("--config", "configs/tiny.yaml", "model.student=/nowhere", "--model-config", str(cfg))
    assert bad.returncode == 2 and "has no 'num_attention_heads'" in bad.stderr
    for size in ("lots", "0"):  # 0 was a ZeroDivisionError
        bad_size = run("--config", "configs/llama3.1-70b.yaml", "--gpu-memory", size)
        assert bad_size.returncode == 2 and f"--gpu-memory '{size}': expected a size like 80GB" in bad_size.stderr
    cfg.write_text("hidden_size: 64")  # not JSON: was a JSONDecodeError traceback
    garbled = run("--config", "configs/tiny.yaml", "model.student=/nowhere", "--model-config", str(cfg))
    assert garbled.returncode == 2 and f"--model-config {cfg}: {cfg} is not a model's config.json" in garbled.stderr
    assert parse_bytes("80GB") == 80 * GiB and parse_bytes("81920MiB") == 80 * GiB
    # A teacher whose size the planner cannot tell (no config.json here, no preset) gets no verdict (it said fits)
    mystery = run("--config", "configs/llama3.1-8b.yaml", "teacher.kind=hf", "teacher.path=/models/mystery")
    assert mystery.returncode == 2 and "\nno verdict: " in mystery.stdout and "fits" not in mystery.stdout
    assert "no verdict: HF teacher W (not counted: /models/mystery/config.json is not on this machine" in mystery.stderr
    # The trainer's ds_config checks: a plan the trainer refuses is no "fits" (these said fits, exit 0)
    base = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    for change, message in (({"train_micro_batch_size_per_gpu": 99}, "train_micro_batch_size_per_gpu=99 contradicts"),
                            ({"bfloat16": {"enabled": True}}, 'ds_config "bfloat16"'),
                            ({"amp": {"enabled": True}}, 'ds_config "amp"')):
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps({**base, **change}))
        refused = run("--config", "configs/llama3.1-8b.yaml", "--ds_config", str(ds))
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_readme_planner_tables_are_the_tools_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```-quoted `$ python tools/estimate_memory.py ...` in the README is what the tool prints now."""
    import contextlib
    import io
    import re
    import shlex

    main = _tool_main()
    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"```\n\$ python tools/estimate_memory\.py (.*?)\n(.*?)```", (ROOT / "README.md").read_text(),
                        re.DOTALL)
    assert len(blocks) >= 6 and {"configs/qwen2.5-0.5b.yaml", "configs/phi-3-mini.yaml"} <= \
        {shlex.split(args)[1] for args, _ in blocks}
    for args, shown in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(shlex.split(args))
        assert shown == out.getvalue(), f"README's table for `{args}` is stale: paste the tool's output"


def test_block_layout_by_architecture_and_unknown_ones_said(tmp_path: Path) -> None:
    from megadistil.engine.memory import MODEL_PRESETS, ModelDims

    names = lambda d: [lin.name.split(".")[-1] for lin in d.block_linears()]
    phi = ModelDims.from_hf(MODEL_PRESETS["phi-3-mini"], "phi")
    assert names(phi) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert [(lin.inp, lin.out) for lin in phi.block_linears()] == [(3072, 9216), (3072, 3072), (3072, 16384),
                                                                   (8192, 3072)]
    qwen = ModelDims.from_hf(MODEL_PRESETS["qwen2.5-0.5b"], "qwen")
    assert [lin.bias for lin in qwen.block_linears()] == [True, True, True, False, False, False, False] and qwen.tied
    qwen3 = ModelDims.from_hf({**MODEL_PRESETS["qwen2.5-0.5b"], "model_type": "qwen3", "head_dim": 128}, "qwen3")
    assert qwen3.block_norms() == [896, 896, 128, 128] and not any(lin.bias for lin in qwen3.block_linears())
    llama = ModelDims.from_hf({**MODEL_PRESETS["llama3.1-8b"], "attention_bias": True}, "llama")
    assert [lin.bias for lin in llama.block_linears()] == [True] * 4 + [False] * 3

    unknown = tmp_path / "config.json"
    unknown.write_text(json.dumps({**MODEL_PRESETS["llama3.1-8b"], "model_type": "gpt_neox"}))
    cfg = _cfg("tiny.yaml", "model.student=/nowhere")
    dims, source = resolve_dims(cfg, model_config=str(unknown))
    assert not dims.layout_known and source == f"{unknown}; model_type 'gpt_neox' counted as a Llama block"
    _, known = resolve_dims(cfg, model_config="phi-3-mini")
    assert known == "preset phi-3-mini"


# ---------------------------------------------------------------- against measured runs


@pytest.fixture(scope="module")
def mem_model(tmp_path_factory) -> Path:
    """Big enough that weights dominate the measured increment: 512 hidden, 4 layers, 2k vocab (~47 MB fp32)."""
    from megadistil.tiny import make_tiny_llama, stdlib_files

    texts = [p.read_text() for p in stdlib_files(6)]
    return make_tiny_llama(tmp_path_factory.mktemp("mem_model"), texts=texts, vocab_size=2048, hidden_size=512,
                           layers=4, heads=8, kv_heads=4, intermediate_size=1536)


@pytest.mark.multirank
@pytest.mark.parametrize("ranks", [1, 2])
def test_estimate_within_25_percent_of_measured_cpu_runs(tmp_path: Path, mem_model: Path, ranks: int) -> None:
    """What is compared: for each rank of a real run of configs/tiny.yaml (the Trainer on ZeRO-3, gloo, fp32, the
    shipped ds_configs/zero3.json, 2 steps so the second one runs with ZeRO-3's trace and prefetch), the highest
    anonymous resident memory (RssAnon, sampled every 2 ms while training) minus RssAnon after all imports and
    before any model exists, against estimate(..., device="cpu") for the same config and world size (no CUDA
    framework term). Anonymous memory leaves out file pages (shared libraries, the mmap'd safetensors file);
    MALLOC_MMAP_THRESHOLD_ makes freed tensors leave the RSS, as a GPU's max_memory_allocated would."""
    overrides = [f"model.student={mem_model}", f"data.text=[{mem_model / 'corpus.txt'}]", "model.dtype=fp32",
                 "train.max_steps=2", "train.save_every=100", "train.resume=never", f"train.output_dir={tmp_path}"]
    out = tmp_path / "mem"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    # One rank needs no launcher (init_distributed starts a 1-process group), which saves its ~8 s of start-up.
    launcher = deepspeed_cmd(2) if ranks == 2 else [sys.executable]
    proc = subprocess.run([*launcher, "tests/_memory_probe.py", "--out", str(out), "--ds_config",
                           "ds_configs/zero3.json", "--config", "configs/tiny.yaml", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    dims, _ = resolve_dims(cfg)
    est = estimate(cfg, dims, Layout(1, ranks), load_ds_config(ROOT / "ds_configs" / "zero3.json"), device="cpu")
    for rank in range(ranks):
        r = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        measured = (r["train_anon_peak_mb"] - r["baseline_anon_mb"]) * 2**20
        print(f"ranks={ranks} rank={rank}: estimate {est.total / 2**20:.0f} MiB, measured {measured / 2**20:.0f} "
              f"MiB ({est.total / measured - 1:+.1%})")
        assert abs(est.total / measured - 1) <= 0.25, (est.total / 2**20, measured / 2**20, r)


def test_a_separate_teacher_and_a_reference_are_counted_partitioned(tmp_path: Path) -> None:
    """A 70B teacher for an 8B student (teacher.kind=hf, named by a path the planner does not have: its preset) and a
    reference model whose config.json is here: each adds its whole parameter count over the ranks."""
    reference = tmp_path / "ref"
    reference.mkdir()
    (reference / "config.json").write_text(json.dumps(MODEL_PRESETS["qwen2.5-0.5b"]))
    cfg = _cfg("llama3.1-8b.yaml", "teacher.kind=hf", "teacher.path=/models/Llama-3.1-70B-Instruct",
               f"preference.reference={reference}")
    dims, _ = resolve_dims(cfg, config_path="configs/llama3.1-8b.yaml")
    ds = load_ds_config(ROOT / "ds_configs" / "zero3.json")
    est = estimate(cfg, dims, Layout(1, 8), ds)
    teacher = frozen_tensors(ModelDims.from_hf(MODEL_PRESETS["llama3.1-70b"], "70b"))
    assert sum(teacher) == 70_553_706_496  # Llama-3.1-70B's parameter count
    keep = ds["zero_optimization"]["stage3_param_persistence_threshold"]
    assert est.term("HF teacher W") == int(sum(n if n < keep else n / 8 for n in teacher) * 2)
    qwen = frozen_tensors(ModelDims.from_hf(MODEL_PRESETS["qwen2.5-0.5b"], "qwen"))
    assert est.term("reference W") == int(sum(n if n < keep else n / 8 for n in qwen) * 2)
    plain = estimate(_cfg("llama3.1-8b.yaml"), dims, Layout(1, 8), ds)
    # fragmentation: 5 % of all; the chunked loss: 2 buffers against the HF teacher's top-k, 4 against the shared one
    unshared = ("framework", "chunked logits")
    added = sum(est.term(n) for n, _, _ in est.rows if n not in unshared) - \
        sum(plain.term(n) for n, _, _ in plain.rows if n not in unshared)
    assert added == est.term("HF teacher W") + est.term("reference W")
    assert (est.term("chunked logits"), plain.term("chunked logits")) == (2048 * 128256 * 4 * 2, 2048 * 128256 * 4 * 4)


def test_onpolicy_generation_gathers_the_whole_student() -> None:
    """With onpolicy.gather_weights the student generates from whole weights: the working set is every parameter (an
    int8 ΔW at a byte a value) plus the int8 codes of every linear's W (8B: 32 layers of q, k, v, o and the MLP), not
    ZeRO-3's per-layer one (8B: beyond stage3_max_reuse_distance, so the prefetch bucket and two blocks); with it off
    the per-layer set stays."""
    ds = load_ds_config(ROOT / "ds_configs" / "zero3.json")
    on = ["onpolicy.fraction=0.5", "onpolicy.prompt_tokens=64", "onpolicy.max_new_tokens=128"]
    cfg = _cfg("llama3.1-8b.yaml", *on)
    dims, _ = resolve_dims(cfg, config_path="configs/llama3.1-8b.yaml")
    t = count_tensors(dims, cfg)
    p = 2  # bf16
    whole = estimate(cfg, dims, Layout(1, 8), ds)
    weights_bytes = (sum(t.base) + sum(t.trainable)) * p + sum(t.delta) * 1  # the 8B config's ΔW: int8
    assert whole.term("gathered params") == weights_bytes
    per_value = weights_bytes / (sum(t.base) + sum(t.delta) + sum(t.trainable))  # a gather's mix of the two
    assert whole.term("generation codes") == sum(t.delta) == 32 * (4096 * (4096 + 2 * 1024 + 4096) + 3 * 4096 * 14336)
    layered = estimate(_cfg("llama3.1-8b.yaml", *on, "onpolicy.gather_weights=false"), dims, Layout(1, 8), ds)
    assert layered.term("gathered params") == int((5e7 + 2 * t.block_numel) * per_value) < weights_bytes / 7
    assert layered.term("gathered params") == estimate(_cfg("llama3.1-8b.yaml"), dims, Layout(1, 8), ds).term(
        "gathered params")


def test_an_int8_delta_costs_a_byte_per_weight_and_its_row_scales() -> None:
    """relora.delta_format=int8 (8B, bf16, 8 ranks): ΔW's term is the int8 codes over the ranks plus the per-row
    scales in bf16 (each row vector under the persistence threshold: whole on every rank), about half the bf16 ΔW."""
    ds = load_ds_config(ROOT / "ds_configs" / "zero3.json")
    cfg = _cfg("llama3.1-8b.yaml")  # the shipped 8B config stores ΔW in int8
    dims, _ = resolve_dims(cfg, config_path="configs/llama3.1-8b.yaml")
    t = count_tensors(dims, cfg)
    rows = 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096)  # out_features of q, k, v, o, gate, up, down
    int8 = estimate(cfg, dims, Layout(1, 8), ds).term("ΔW")
    assert int8 == int(sum(t.delta) / 8 + rows * 2)
    bf16 = estimate(_cfg("llama3.1-8b.yaml", "relora.delta_format=dtype"), dims, Layout(1, 8), ds).term("ΔW")
    assert bf16 == int(sum(t.delta) / 8 * 2) and 0.5 < int8 / bf16 < 0.52


# ---------------------------------------------------------------- frozen models of any architecture, the loss's buffers,
# eager attention, class defaults, bitnet.exclude, teachers without a KV cache

MIXTRAL_8X22B = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 6144,
                 "intermediate_size": 16384, "num_hidden_layers": 56, "num_attention_heads": 48,
                 "num_key_value_heads": 8, "vocab_size": 32768, "num_local_experts": 8, "num_experts_per_tok": 2,
                 "tie_word_embeddings": False}


def _run_tool(*args: str):
    import contextlib
    import io
    from types import SimpleNamespace

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _tool_main()(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_a_frozen_model_is_counted_as_transformers_builds_it_or_gets_no_verdict(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A separate teacher counts every parameter of the model transformers builds from its config.json (meta device):
    Mixtral-8x22B's 141B with its experts, not a 22B Llama block (that said fits on 4 GPUs, exit 0). One transformers
    cannot build here is not counted where it has experts or a block layout the planner does not know: no verdict."""
    monkeypatch.chdir(ROOT)
    teacher = tmp_path / "Mixtral-8x22B"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(MIXTRAL_8X22B))
    args = ["--config", "configs/llama3.1-8b.yaml", "--nodes", "1", "--gpus-per-node", "4", "teacher.kind=hf"]
    moe = _run_tool(*args, f"teacher.path={teacher}")
    assert "| HF teacher W       |   65.49 | 140,630,071,296 / 4 (" in moe.stdout, moe.stdout
    assert moe.returncode == 1 and "does not fit:" in moe.stdout
    # Gemma 2 (four norms a block, no tie key: tied by its class): counted as built, not as a Llama block
    gemma = {"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000}
    (teacher / "config.json").write_text(json.dumps(gemma))
    assert "| 9,241,705,984 / 4 (" in _run_tool(*args, f"teacher.path={teacher}").stdout  # gemma-2-9b's count
    for config, why in (({**MIXTRAL_8X22B, "model_type": "my_moe"}, "a mixture of experts (num_local_experts=8)"),
                        ({**MODEL_PRESETS["llama3.1-8b"], "model_type": "my_arch"},
                         "model_type 'my_arch', whose block layout the planner does not know")):
        (teacher / "config.json").write_text(json.dumps(config))
        unknown = _run_tool(*args, f"teacher.path={teacher}")
        assert unknown.returncode == 2 and "\nno verdict: " in unknown.stdout and "fits" not in unknown.stdout
        assert f"HF teacher W (not counted: {teacher / 'config.json'}: {why}, and transformers " in unknown.stderr


def test_chunked_logits_buffers_follow_the_target_kind() -> None:
    """fp32 [chunk x vocab] buffers at the loss's peak (measured below): 4 (forward KL, reverse KL), 5 (JSD), 6 (ULD)
    against the shared teacher's dense logits, 2 against top-k targets (shards, an HF teacher), 2 for CE alone, one
    more with a softcapped head (Gemma 2); the stage that needs the most."""
    ds = load_ds_config(ROOT / "ds_configs" / "zero3.json")
    dims = ModelDims.from_hf(MODEL_PRESETS["llama3.1-8b"], "8b")
    shards = ["data.text=[]", "data.shards=/not/here", "teacher.kind=shards"]
    cases = {(): 4, ("loss.kind=reverse_kl",): 4, ("loss.kind=jsd",): 5, ("loss.kind=uld",): 6,
             ("teacher.kind=hf", "teacher.path=/models/Llama-3.1-70B"): 2, tuple(shards): 2,
             ("teacher.kind=none", "loss.kd_weight=0", "loss.ce_weight=1"): 2}
    for overrides, buffers in cases.items():
        cfg = _cfg("llama3.1-8b.yaml", *overrides)
        chunk = min(cfg.loss.chunk_tokens, cfg.train.micro_batch_size * cfg.data.seq_len)
        assert estimate(cfg, dims, Layout(1, 8), ds).term("chunked logits") == chunk * 128256 * 4 * buffers, overrides
    gemma = ModelDims.from_hf({"model_type": "gemma2", "hidden_size": 256, "intermediate_size": 512,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000}, "gemma2")
    assert gemma.logit_softcap and not dims.logit_softcap
    assert estimate(_cfg("llama3.1-8b.yaml"), gemma, Layout(1, 8), ds).term("chunked logits") == 2048 * 1000 * 4 * 5
    staged = _cfg("llama3.1-8b.yaml", "loss.kd_weight=0", "loss.ce_weight=1",
                  'stages=[{"start_step": 10, "overrides": {"loss.kd_weight": 1.0}}]')
    assert estimate(staged, dims, Layout(1, 8), ds).term("chunked logits") == 2048 * 128256 * 4 * 4


def _storage_peak(fn) -> int:
    """Peak bytes of the storages that ops under fn make, each counted while a tensor still holds it."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Mode(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, tuple[int, list]] = {}  # storage address -> (bytes, weakrefs of its tensors)
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # Storages no tensor holds are gone first: their addresses may be those of this op's outputs.
            alive = {k: (n, [r for r in refs if r() is not None]) for k, (n, refs) in self.live.items()}
            self.live = {k: v for k, v in alive.items() if v[1]}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    self.live.setdefault(st.data_ptr(), (st.nbytes(), []))[1].append(weakref.ref(t))
            self.peak = max(self.peak, sum(n for n, _ in self.live.values()))
            return out

    with Mode() as mode:
        fn()
    return mode.peak


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("target", ["forward_kl", "reverse_kl", "jsd", "uld", "sparse", "ce"])
def test_the_chunked_loss_peak_is_the_planners_buffer_count(target: str, dtype: str) -> None:
    """The loss's fwd+bwd, storages tracked op by op: its peak, less the [N, H] and [V, H] gradient accumulators, is
    within the planner's buffer count and above one buffer fewer (a regression, or a constant left stale, fails)."""
    import torch

    from megadistil.distill.losses import LossConfig, SparseTarget, chunked_lm_head_loss
    from megadistil.engine.memory import CE_LOGIT_BUFFERS, DENSE_LOGIT_BUFFERS, SPARSE_LOGIT_BUFFERS

    g = torch.Generator().manual_seed(0)
    N, H, V, chunk, k = 512, 4, 8192, 128, 32
    dt = getattr(torch, dtype)
    h, W = (torch.randn(n, H, generator=g).to(dt).requires_grad_() for n in (N, V))
    labels = torch.randint(0, V, (N,), generator=g)
    kw, buffers = {}, CE_LOGIT_BUFFERS
    cfg = LossConfig(kind="forward_kl" if target in ("sparse", "ce") else target, chunk_tokens=chunk, temperature=2.0)
    if target == "ce":
        cfg = LossConfig(chunk_tokens=chunk, kd_weight=0.0, ce_weight=1.0)
    elif target == "sparse":
        ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
        kw["sparse"], buffers = SparseTarget(ids, torch.log_softmax(torch.randn(N, k, generator=g), -1) - 0.1,
                                             torch.full((N,), -2.35)), SPARSE_LOGIT_BUFFERS
    else:
        kw = {"teacher_hidden": torch.randn(N, H, generator=g).to(dt),
              "teacher_lm_head_weight": torch.randn(V, H, generator=g).to(dt)}
        buffers = DENSE_LOGIT_BUFFERS[target]
    peak = _storage_peak(lambda: chunked_lm_head_loss(h, W, labels, cfg, **kw)["loss"].backward())
    measured = (peak - (N + V) * H * 4) / (chunk * V * 4)
    assert buffers - 1 < measured <= buffers + 0.1, (target, dtype, measured)


def test_eager_attention_keeps_its_scores_and_sdpa_its_qkv(tmp_path: Path) -> None:
    """Eager attention keeps the [heads, S, S] softmax per sequence (fp32, and its bf16 cast; with Gemma 2's score
    softcap the tanh's output too) and q, k, v repeated to every head; sdpa keeps q, k after RoPE, v, the output and
    the logsumexp. Checked against the saved-tensor hooks of one converted Llama block (fp32): the difference between
    the two implementations is the planner's to within 1 %."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask

    from megadistil.bitnet import to_bitnet
    from megadistil.engine.memory import attention_implementation, block_internals_per_token

    S, heads, head_dim, kv = 256, 8, 32, 2
    config = {"model_type": "llama", "hidden_size": heads * head_dim, "intermediate_size": 512, "num_hidden_layers": 1,
              "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": 512}
    dims = ModelDims.from_hf(config, "llama")
    planned, saved = {}, {}
    for impl in ("sdpa", "eager"):
        cfg = _cfg("tiny.yaml", "model.dtype=fp32", f"model.attn_implementation={impl}", f"data.seq_len={S}")
        assert attention_implementation(dims, cfg, 4) == impl
        planned[impl] = block_internals_per_token(dims, cfg, 4) * S
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), attn_implementation=impl)
        to_bitnet(model, lora_rank=8, delta=False, kernel="fp32")
        model.train()
        storages: dict[int, int] = {}

        def pack(t, storages=storages):
            storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        emb = model.model.embed_tokens(torch.randint(0, 512, (1, S))).detach().requires_grad_()
        pos = torch.arange(S)[None]
        # the cache positionally: transformers 5.25 named it `cache`, earlier releases `past_key_values`
        mask = create_causal_mask(model.config, emb, None, None, position_ids=pos)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model.layers[0](emb, attention_mask=mask, position_ids=pos,
                                  position_embeddings=model.model.rotary_emb(emb, pos))
        saved[impl] = sum(storages.values())
    q = heads * head_dim
    assert planned["eager"] - planned["sdpa"] == S * (3 * q * 4 + heads * S * 4 - (2 * q + 2 * kv * head_dim) * 4 -
                                                      heads * 4)
    assert abs((planned["eager"] - planned["sdpa"]) / (saved["eager"] - saved["sdpa"]) - 1) < 0.01, (planned, saved)
    # bf16: the softmax in fp32 and its cast; Gemma 2's auto resolves to eager (no sdpa), with the tanh of its softcap
    cfg = _cfg("llama3.1-8b.yaml")
    llama = ModelDims.from_hf(MODEL_PRESETS["llama3.1-8b"], "8b")
    eager = _cfg("llama3.1-8b.yaml", "model.attn_implementation=eager")
    gemma = ModelDims.from_hf({**MODEL_PRESETS["llama3.1-8b"], "model_type": "gemma2", "head_dim": 128}, "gemma2")
    assert attention_implementation(gemma, cfg, 2) == "eager" and gemma.attn_softcap
    extra = block_internals_per_token(llama, eager, 2) - block_internals_per_token(llama, cfg, 2)
    assert extra == 3 * 4096 * 2 + 32 * 8192 * (4 + 2) - (2 * 4096 + 2 * 1024) * 2 - 32 * 4
    assert block_internals_per_token(gemma, cfg, 2) - block_internals_per_token(llama, eager, 2) == 32 * 8192 * 2


def test_config_keys_left_out_take_the_class_defaults() -> None:
    """Gemma 2's config class ties the LM head when config.json has no tie_word_embeddings (it counted a second
    vocab x hidden matrix) and has kv heads and a head_dim of its own; Llama's class unties."""
    gemma = ModelDims.from_hf({"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336,
                               "num_hidden_layers": 42, "num_attention_heads": 16, "vocab_size": 256000}, "gemma2")
    assert (gemma.tied, gemma.kv_heads, gemma.head_dim) == (True, 4, 256)
    assert frozen_tensors(gemma).count(256000 * 3584) == 1
    llama = {k: v for k, v in MODEL_PRESETS["llama3.1-8b"].items() if k != "tie_word_embeddings"}
    assert not ModelDims.from_hf(llama, "llama").tied


def test_excluded_linears_have_no_adapters_delta_or_subln() -> None:
    """bitnet.exclude keeps linears nn.Linear: the planner counts their W but no LoRA, ΔW or SubLN, as to_bitnet
    converts a meta-device model (a layer-qualified entry excludes that layer's linear alone)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megadistil.bitnet import to_bitnet

    config = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
    exclude = ("o_proj", "1.mlp.down_proj")
    cfg = _cfg("tiny.yaml", f"bitnet.exclude=[{','.join(exclude)}]", "bitnet.subln=true", "relora.reset_every=20",
               "bitnet.lora_rank=8")
    t = count_tensors(ModelDims.from_hf(config, "llama"), cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    to_bitnet(model, lora_rank=8, subln=True, delta=True, exclude=exclude)
    count = lambda *ends: sum(p.numel() for n, p in model.named_parameters() if n.endswith(ends))
    assert sum(t.trainable) == count(".lora_A", ".lora_B", ".sub_norm.weight")
    assert sum(t.delta) == count(".delta")
    assert sum(t.base) == sum(p.numel() for p in model.parameters()) - sum(t.trainable) - sum(t.delta)
    assert t.block_numel == max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)


def test_teacher_forwards_build_no_kv_cache() -> None:
    """The teacher's forwards (precompute's and the HF teacher's top-k, the reference's log p(label)) ask the decoder
    for no KV cache: config.use_cache defaults to True, and each forward kept every layer's keys and values."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.cache_utils import Cache

    from megadistil.distill.targets import model_label_logprobs, teacher_topk
    from megadistil.engine.teachers import LabelLogprobHead, TopKHead
    from megadistil.models import decoder

    for model_type in ("llama", "qwen2", "gemma2"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256)).eval()
        assert model.config.use_cache
        caches: list[bool] = []
        decoder(model).register_forward_hook(
            lambda _m, _a, out, caches=caches: caches.append(any(isinstance(v, Cache) for v in out.values())))
        ids = torch.randint(0, 256, (2, 16))
        with torch.no_grad():
            teacher_topk(model, ids, top_k=4, temperature=1.0)
            model_label_logprobs(model, ids, ids)
            TopKHead(model, 4)(ids, 1.0, 8)
            TopKHead(model, 4)(ids, 1.0, 8, labels=ids)
            LabelLogprobHead(model)(ids, ids, 8)
        assert caches == [False] * 5, (model_type, caches)
