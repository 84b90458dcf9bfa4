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
from tests._tools import tool_main

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


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
    launcher = [DEEPSPEED, "--num_gpus", "2", "--master_port", "29542"] if ranks == 2 else [sys.executable]
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
    added = (est.total - est.term("framework")) - (plain.total - plain.term("framework"))  # fragmentation: 5 % of all
    assert added == est.term("HF teacher W") + est.term("reference W")


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
