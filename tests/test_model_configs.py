"""Every shipped model config builds a BitNet student of the real size, on the meta device (no weights, no
download): the model's own transformers class from the preset's config.json values, BitLinear in every block, the
published parameter count, and the memory planner's tensor counts equal to the built student's."""

from __future__ import annotations

import contextlib
import io
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from megadistil.bitnet import BitLinear, to_bitnet
from megadistil.config import load_config
from megadistil.engine.memory import MODEL_PRESETS, count_tensors, preset_for, resolve_dims
from tests._tools import tool_main

ROOT = Path(__file__).resolve().parents[1]
ADDED = (".lora_A", ".lora_B", ".delta", ".sub_norm.weight")
# configs/tiny.yaml is the one config without a preset: its model is made by tools/make_tiny_llama.py, and the
# training, export and demo tests build and run it for real.
SHIPPED = sorted((p for p in (ROOT / "configs").glob("*.yaml") if p.name != "tiny.yaml"), key=lambda p: p.name)

# Parameter counts of the Hugging Face checkpoints (the sum of config.json's shapes; Llama: Meta's, Qwen: the
# safetensors total "494M", Phi-3: "3.82B params" on the hub), and the figure their model cards publish.
PARAMS = {
    "llama3.1-8b": (8_030_261_248, "8.03"),
    "llama3.1-70b": (70_553_706_496, "70.6"),
    "qwen2.5-0.5b": (494_032_768, "0.49"),
    "phi-3-mini": (3_821_079_552, "3.82"),
}


def _build_meta_student(name: str, cfg) -> nn.Module:
    preset = dict(MODEL_PRESETS[name])
    config = AutoConfig.for_model(preset.pop("model_type"), **preset)
    b = cfg.bitnet
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        to_bitnet(model, lora_rank=b.lora_rank, lora_alpha=b.lora_alpha, exclude=tuple(b.exclude), subln=b.subln,
                  delta=cfg.relora.reset_every > 0, backward=b.backward)
    return model


def _count(model: nn.Module, suffix: str | tuple[str, ...] | None = None) -> int:
    return sum(p.numel() for n, p in model.named_parameters()
               if (suffix is None and not n.endswith(ADDED)) or (suffix is not None and n.endswith(suffix)))


def test_every_shipped_model_config_has_a_preset_and_a_published_size() -> None:
    names = [p.stem for p in SHIPPED]
    assert {"llama3.1-8b", "llama3.1-70b", "qwen2.5-0.5b", "phi-3-mini"} <= set(names)
    assert all(preset_for(n) == n for n in names), {n: preset_for(n) for n in names}
    assert set(names) == set(PARAMS) == set(MODEL_PRESETS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_meta_student_has_the_published_size_bitlinear_blocks_and_the_planners_counts(path: Path) -> None:
    name = path.stem
    cfg = load_config(path)
    dims, source = resolve_dims(cfg, config_path=str(path))
    assert source.startswith(f"preset {name}") and "counted as a Llama block" not in source
    preset = MODEL_PRESETS[name]
    model = _build_meta_student(name, cfg)
    assert type(model).__name__ == preset["architectures"][0]
    assert all(p.device.type == "meta" for p in model.parameters())

    # The published size: the checkpoint's exact count, and the model card's figure, which is that count rounded
    # to the digits it shows (so the tolerance is half a unit of its last digit: 0.005B for "0.49", 0.05B for "70.6").
    base = _count(model)
    exact, published = PARAMS[name]
    assert base == exact
    decimals = len(published.split(".")[1])
    assert abs(base / 1e9 - float(published)) <= 0.5 * 10**-decimals

    # Every linear of every block is a BitLinear, with the planner's names, shapes and biases (Phi-3's fused
    # qkv_proj / gate_up_proj, Qwen2's q/k/v biases); the embeddings and the LM head stay as they are.
    expected = {lin.name: lin for lin in dims.block_linears()}
    layers = model.get_decoder().layers
    assert len(layers) == dims.layers == preset["num_hidden_layers"]
    for i, block in enumerate(layers):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, (nn.Linear, BitLinear))}
        assert set(linears) == set(expected), i
        for n, m in linears.items():
            assert type(m) is BitLinear, (i, n)
            assert (m.in_features, m.out_features, m.bias is not None) == \
                (expected[n].inp, expected[n].out, expected[n].bias), (i, n)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert type(head) is nn.Linear and type(embed) is nn.Embedding
    assert (head.weight is embed.weight) == preset["tie_word_embeddings"] == dims.tied

    # The memory planner counts exactly these tensors: W (+ biases, norms, embeddings), ΔW, LoRA + SubLN, one block.
    t = count_tensors(dims, cfg)
    assert sum(t.base) == base
    assert sum(t.delta) == _count(model, ".delta")
    assert sum(t.trainable) == _count(model, (".lora_A", ".lora_B", ".sub_norm.weight"))
    assert t.block_numel == sum(p.numel() for p in layers[0].parameters())
    assert t.largest_linear == max(m.weight.numel() for m in layers[0].modules() if isinstance(m, BitLinear))

    # What the run can use: sequences within the model's positions, SubLN only where the export can express it
    # (transformers' `bitnet` model is a Llama with sub-norms).
    assert cfg.data.seq_len <= preset["max_position_embeddings"]
    assert not cfg.bitnet.subln or preset["model_type"] == "llama"
    assert (_count(model, ".sub_norm.weight") > 0) == cfg.bitnet.subln


def _estimate_commands(path: Path) -> list[list[str]]:
    """The `python tools/estimate_memory.py ...` lines of a config's header comment."""
    lines = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    return [shlex.split(line)[2:] for line in lines if line.startswith("python tools/estimate_memory.py ")]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_the_estimate_in_each_config_header_runs_from_the_preset_and_fits(path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (the script is only `sys.exit(main())`), from the repo root as the header says to run it."""
    main = tool_main("estimate_memory")
    monkeypatch.chdir(ROOT)
    commands = _estimate_commands(path)
    assert commands, f"{path.name}: no `python tools/estimate_memory.py --config ...` line in its header"
    for args in commands:
        assert args[:2] == ["--config", f"configs/{path.name}"], args
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(args)
        assert code == 0, (args, out.getvalue())
        assert f"model: preset {path.stem} (model.student not on this machine)" in out.getvalue()
        assert "| total" in out.getvalue() and "fits:" in out.getvalue()


def test_preset_dimensions_are_the_official_config_json_values() -> None:
    """The numbers a reader checks against the models' config.json files on the hub."""
    def dims(p: dict) -> tuple:
        return (p["model_type"], p["hidden_size"], p["num_hidden_layers"], p["num_attention_heads"],
                p["num_key_value_heads"], p["intermediate_size"], p["vocab_size"], p["tie_word_embeddings"],
                p["max_position_embeddings"], p["rope_theta"])

    assert dims(MODEL_PRESETS["llama3.1-8b"]) == ("llama", 4096, 32, 32, 8, 14336, 128256, False, 131072, 5e5)
    assert dims(MODEL_PRESETS["llama3.1-70b"]) == ("llama", 8192, 80, 64, 8, 28672, 128256, False, 131072, 5e5)
    assert dims(MODEL_PRESETS["qwen2.5-0.5b"]) == ("qwen2", 896, 24, 14, 2, 4864, 151936, True, 32768, 1e6)
    assert dims(MODEL_PRESETS["phi-3-mini"]) == ("phi3", 3072, 32, 32, 32, 8192, 32064, False, 4096, 1e4)
    for name in ("llama3.1-8b", "llama3.1-70b"):
        assert MODEL_PRESETS[name]["rope_scaling"]["rope_type"] == "llama3"
    assert MODEL_PRESETS["phi-3-mini"]["rope_scaling"] is None  # the 4k model: no longrope
