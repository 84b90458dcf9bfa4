import json
from pathlib import Path

import pytest

from megadistil.config import ConfigError, RunConfig, StageConfig, load_config, load_ds_config, reconcile_ds_config, stage_config
from megadistil.engine.schedule import is_reset_step, lr_at

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    for ds_path in sorted((ROOT / "ds_configs").glob("*.json")):
        ds = reconcile_ds_config(cfg, load_ds_config(ds_path), world_size=8, bf16=True)
        assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 8
        assert ds["bf16"]["enabled"] is True


def test_dotlist_overrides_yaml_which_overrides_defaults(tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("model: {student: /m}\ndata: {text: [a.txt]}\ntrain: {max_steps: 7, seed: 3}\n")
    cfg = load_config(yaml, ["train.max_steps=9", "bitnet.lora_rank=4"])
    assert (cfg.train.max_steps, cfg.train.seed, cfg.bitnet.lora_rank, cfg.optim.lr) == (9, 3, 4, 1e-3)


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("bitnet.lora_rank=abc", "bitnet.lora_rank"),
    ("train.max_steps=0", "train.max_steps"),
    ("loss.kind=kl", "loss.kind"),
    ("relora.optimizer_reset=drop", "relora.optimizer_reset"),
    ("optim.param_groups=[{pattern: '(', lr_mult: 1}]", "optim.param_groups.0.pattern"),
    ("data.shards=/s", "data"),  # both shards and text
])
def test_bad_values_name_the_key(override, message):
    base = ["model.student=/m", "data.text=[a.txt]"]
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [*base, override])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_ds_config_contradiction_is_an_error():
    cfg = load_config(None, ["model.student=/m", "data.text=[a.txt]", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=2 contradicts"):
        reconcile_ds_config(cfg, {"train_micro_batch_size_per_gpu": 2}, world_size=1, bf16=False)
    with pytest.raises(ConfigError, match="bf16.enabled=True contradicts model.dtype"):
        reconcile_ds_config(cfg, {"bf16": {"enabled": True}}, world_size=1, bf16=False)
    with pytest.raises(ConfigError, match="'optimizer' section"):
        reconcile_ds_config(cfg, {"optimizer": {"type": "Adam"}}, world_size=1, bf16=False)
    with pytest.raises(ConfigError, match="does not exist"):
        load_ds_config("/nonexistent/zero3.json")


def test_stages_apply_from_their_start_step():
    cfg = load_config(None, ["model.student=/m", "data.text=[a.txt]", "loss.ce_weight=0.0"])
    cfg.stages = [StageConfig(start_step=5, overrides={"loss.ce_weight": 1.0, "optim.lr": 0.01})]
    assert stage_config(cfg, 4).loss.ce_weight == 0.0
    assert stage_config(cfg, 5).loss.ce_weight == 1.0 and stage_config(cfg, 9).optim.lr == 0.01


def test_stage_overriding_a_non_loss_key_is_rejected(tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text(json.dumps({"model": {"student": "/m"}, "data": {"text": ["a"]},
                                "stages": [{"start_step": 3, "overrides": {"train.max_steps": 5}}]}))
    with pytest.raises(ConfigError, match="stages.0.overrides.train.max_steps"):
        load_config(yaml)


def test_jagged_cosine_schedule_rewarms_after_each_reset():
    cfg = load_config(None, ["model.student=/m", "data.text=[a.txt]", "optim.lr=1.0", "optim.warmup_steps=4",
                             "optim.min_lr_ratio=0.1", "relora.reset_every=10", "relora.restart_warmup_steps=5"])
    lrs = [lr_at(s, cfg.optim, cfg.relora, 100) for s in range(1, 101)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert [s for s in range(1, 101) if is_reset_step(s, cfg.relora)] == [11, 21, 31, 41, 51, 61, 71, 81, 91]
    cosine = lambda s: 0.1 + 0.9 * 0.5 * (1 + __import__("math").cos(__import__("math").pi * (s - 4) / 96))
    assert lrs[10] == pytest.approx(cosine(11) / 5)  # first step after a reset: 1/5 of the cosine value
    assert lrs[14] == pytest.approx(cosine(15))  # warm again after restart_warmup_steps
    assert lrs[-1] == pytest.approx(0.1)


def test_readme_config_reference_is_the_generated_one():
    from megadistil.config import reference_markdown

    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    assert readme[readme.index(start) + len(start):readme.index(end)] == reference_markdown(), \
        "README's config reference is stale: paste the output of `python -m megadistil.config`"
    assert "| `train.max_steps` | `int` | `100` | optimizer steps |" in reference_markdown()


@pytest.mark.parametrize("overrides, teacher", [
    (["loss.kd_weight=0.0", "loss.ce_weight=1.0"], "NoTeacher"),  # CE only: no teacher forward per step
    (["loss.kd_weight=0.0", "loss.ce_weight=1.0", "loss.hidden_weight=0.5"], "SharedTeacher"),
    (["loss.kd_weight=0.0", "loss.ce_weight=1.0", "stages=[{start_step: 5, overrides: {loss.kd_weight: 1.0}}]"],
     "SharedTeacher"),
])
def test_the_teacher_runs_only_when_the_loss_uses_it(overrides, teacher):
    from types import SimpleNamespace

    from megadistil.engine.trainer import Trainer

    cfg = load_config(ROOT / "configs/tiny.yaml", ["model.student=/m", *overrides])
    trainer = Trainer(cfg, str(ROOT / "ds_configs/zero3.json"))
    trainer.num_layers, trainer.engine = 2, SimpleNamespace(module=SimpleNamespace(student=None))  # no model needed
    assert type(trainer._build_teacher(student=None)).__name__ == teacher
