import json
import re
from functools import reduce
from pathlib import Path

import pytest

from megadistil.config import (
    ConfigError,
    RunConfig,
    StageConfig,
    load_config,
    stage_config,
)
from megadistil.engine.ds_config import load_ds_config, reconcile_ds_config
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
    cfg = load_config(yaml, ["train.max_steps=19", "bitnet.lora_rank=4"])
    assert (cfg.train.max_steps, cfg.train.seed, cfg.bitnet.lora_rank, cfg.optim.lr) == (19, 3, 4, 1e-3)


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("bitnet.lora_rank=abc", "bitnet.lora_rank"),
    ("train.max_steps=0", "train.max_steps"),
    ("loss.kind=kl", "loss.kind"),
    ("relora.optimizer_reset=drop", "relora.optimizer_reset"),
    ("optim.param_groups=[{pattern: '(', lr_mult: 1}]", "optim.param_groups.0.pattern"),
    ("data.shards=/s", "data"),  # both shards and text
    ("log.profile_step=101", "log.profile_step': must be a step of the run"),
    ("relora.delta_format=dtype", "relora.delta_format': is unused: relora.reset_every is 0"),
    ("relora.delta_format=int4", "relora.delta_format"),
    ("bitnet.quant_warmup_steps=100", "bitnet.quant_warmup_steps': 100 steps of λ warmup do not end within train"),
    # every section's own checks say the key the same way, and a stage's config is checked like the base one
    ("bitnet.lora_rank=0", "config key 'bitnet.lora_rank': must be >= 1, got 0"),
    ("loss.jsd_beta=1.5", "config key 'loss.jsd_beta': must be in (0, 1), got 1.5"),
    ("log.every=0", "config key 'log.every': must be >= 1, got 0"),
    ("optim.warmup_steps=-1", "config key 'optim.warmup_steps': must be >= 0, got -1"),
    ("stages=[{start_step: 3, overrides: {optim.lr: -1.0}}]", "config key 'stages.0.overrides.optim.lr': must be > 0"),
    ("stages=[{start_step: 80, overrides: {optim.lr: 1e-5}}, {start_step: 50, overrides: {optim.lr: 5e-4}}]",
     "config key 'stages.1.start_step': 50 does not come after stages.0.start_step: list the stages in the order"),
    ("stages=[{start_step: 3, overrides: {loss.ce_weight: 0.0, loss.kd_weight: 0.0}}]",
     "config key 'stages.0.overrides.loss.kd_weight': is 0 and so is loss.ce_weight"),
])
def test_bad_values_name_the_key(override, message):
    base = ["model.student=/m", "data.text=[a.txt]"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*base, override])


CE_ONLY = ["teacher.kind=none", "loss.kd_weight=0.0", "loss.ce_weight=1.0"]


@pytest.mark.parametrize("overrides, message", [
    (["relora.restart_warmup_steps=7"], "'relora.restart_warmup_steps': is unused: relora.reset_every is 0"),
    (["relora.optimizer_reset=zero"], "'relora.optimizer_reset': is unused: relora.reset_every is 0"),
    (["relora.reset_every=5", "relora.restart_warmup_steps=2", "relora.optimizer_reset=zero", "relora.prune_ratio=0.5"],
     "'relora.prune_ratio': is unused: moments are pruned only with relora.reset_every > 0 and relora.optim"),
    (["train.eval_every=10"], "'train.eval_every': is unused: nothing is evaluated (no data.eval_text, no train."),
    (["train.eval_batches=3", "train.eval_tasks=[arc_easy]"],
     "'train.eval_batches': is unused: no data.eval_text to take held-out batches from"),
    (["train.eval_tasks_limit=5", "data.eval_text=[e.txt]"], "'train.eval_tasks_limit': is unused: train.eval_"),
    (["log.wandb.project=mine"], "'log.wandb.project': is unused: no wandb run is made (log.wandb.enabled is false"),
    (["log.wandb.mode=online"], "'log.wandb.mode': is unused: log.wandb.enabled is false"),
    # mode=disabled makes no wandb run either: a project or name set for it is read by nothing
    (["log.wandb.enabled=true", "log.wandb.mode=disabled", "log.wandb.name=r1"],
     "'log.wandb.name': is unused: no wandb run is made (log.wandb.enabled is false or log.wandb.mode is disabled)"),
    (["data.shuffle_buffer=16"], "'data.shuffle_buffer': is unused: the shard stream's setting, and data.shards is not"),
    (["data.seed=3"], "'data.seed': is unused: the shard stream's setting, and data.shards is not set (text is packed"),
    (["data.text=[]", "data.shards=/s", "data.prefetch_factor=8"],
     "'data.prefetch_factor': is unused: data.num_workers is 0 (the shards are read in the training process"),
    (["data.text=[]", "data.shards=/s", "data.split_special_tokens=false"],
     "'data.split_special_tokens': is unused: no text is tokenized (data.shards hold token ids, and there is no "),
    ([*CE_ONLY, "loss.temperature=2.0"], "'loss.temperature': is unused: loss.kd_weight and loss.dskd_weight are 0"),
    (["loss.jsd_beta=0.3"], "'loss.jsd_beta': is unused: no JSD is computed at any stage (loss.kind is not jsd"),
    (["loss.attn_relation_heads=4"], "'loss.attn_relation_heads': is unused: loss.attn_relation_weight is 0 at"),
    (["stages=[{start_step: 3, overrides: {loss.hidden_layers: [1]}}]"],
     "'stages.0.overrides.loss.hidden_layers': is unused from step 3 on: loss.hidden_weight is 0 at every stage"),
])
def test_a_setting_nothing_reads_is_refused_naming_it(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*BASE, *overrides])


@pytest.mark.parametrize("overrides", [
    ["loss.hidden_layers=[1]", "stages=[{start_step: 3, overrides: {loss.hidden_weight: 0.5}}]"],
    [*CE_ONLY[1:], "loss.temperature=2.0", "data.eval_text=[e.txt]"],  # the held-out KD to the shared teacher
    ["loss.jsd_beta=0.3", "onpolicy.kind=jsd", "stages=[{start_step: 3, overrides: {onpolicy.fraction: 0.5}}]"],
    ["relora.reset_every=5", "relora.optimizer_reset=zero", "relora.restart_warmup_steps=2"],
    ["train.eval_every=2", "train.eval_batches=3", "data.eval_text=[e.txt]"],
    ["log.wandb.enabled=true", "log.wandb.project=mine", "log.wandb.name=r1", "log.wandb.mode=online"],
    ["log.wandb.enabled=true", "log.wandb.mode=disabled"],
    ["data.text=[]", "data.shards=/s", "data.shuffle_buffer=16", "data.seed=3", "data.epochs=2",
     "data.num_workers=2", "data.prefetch_factor=8"],
    ["data.text=[]", "data.shards=/s", "data.eval_text=[e.txt]", "data.split_special_tokens=false"],
])
def test_a_setting_that_acts_at_some_stage_is_accepted(overrides):
    cfg, default = load_config(None, [*BASE, *overrides]), RunConfig()
    kept = [o.split("=")[0] for o in overrides if not o.startswith(("stages=", "data.text="))]
    assert all(reduce(getattr, k.split("."), cfg) != reduce(getattr, k.split("."), default) for k in kept), kept


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


def test_a_stage_that_sets_warmup_steps_rewarms_from_its_start():
    """The stage's warmup_steps once shifted the whole cosine and compared itself with the absolute step: a stage
    at 100 with warmup 20 jumped the LR up at once, one with 150 jumped and climbed on to its peak at step 150."""
    from megadistil.engine.schedule import run_lr_at

    stages = "[{start_step: 100, overrides: {optim.warmup_steps: 20}}, {start_step: 150, overrides: {optim.lr: 0.5}}]"
    cfg = load_config(None, [*BASE, "optim.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1",
                             "train.max_steps=200", f"stages={stages}"])
    lrs = {s: run_lr_at(s, cfg, stage_config(cfg, s)) for s in range(1, 201)}
    base = {s: lr_at(s, cfg.optim, cfg.relora, 200) for s in range(1, 201)}
    assert [lrs[s] for s in range(1, 100)] == [base[s] for s in range(1, 100)]
    assert [lrs[s] / base[s] for s in (100, 109, 119, 120, 149)] == pytest.approx([1 / 20, 10 / 20, 1, 1, 1])
    # a later stage that sets another key does not re-warm; its lr scales the same cosine
    assert lrs[150] == pytest.approx(0.5 * base[150]) and lrs[200] == pytest.approx(0.05)


@pytest.mark.parametrize("start", [0, 1])
def test_a_stage_from_the_first_step_that_sets_warmup_steps_is_the_runs_warmup(start):
    """start_step 0 and 1 are the same step: the stage's warmup replaces the run's (it multiplied the run's ramp by
    its own from step 1, and start 0 and 1 gave two ramps); warmup 0 turns it off."""
    from megadistil.engine.schedule import run_lr_at

    for warmup in (4, 0):
        stages = f"[{{start_step: {start}, overrides: {{optim.warmup_steps: {warmup}}}}}]"
        cfg = load_config(None, [*BASE, "optim.lr=1.0", "optim.warmup_steps=8", "train.max_steps=100",
                                 f"stages={stages}"])
        plain = load_config(None, [*BASE, "optim.lr=1.0", f"optim.warmup_steps={warmup}", "train.max_steps=100"])
        assert [run_lr_at(s, cfg, stage_config(cfg, s)) for s in range(1, 101)] == \
            [lr_at(s, plain.optim, plain.relora, 100) for s in range(1, 101)]


def test_a_stage_override_nothing_reads_while_it_is_in_force_is_refused():
    """A condition holding at some stage accepted an override at a stage where it does not hold: on-policy
    micro-batches read onpolicy.kind, so a loss.kind set at the stage that turns them all on-policy does nothing."""
    over = "stages=[{start_step: 500, overrides: {onpolicy.fraction: 1.0, loss.kind: reverse_kl}}]"
    with pytest.raises(ConfigError, match=r"config key 'stages.0.overrides.loss.kind': is unused from step 500 on: "):
        load_config(None, [*BASE, "train.max_steps=1000", "onpolicy.fraction=0.5", over])
    # the base's setting is in force until a stage overrides it: a condition that holds only later does not count
    late = "stages=[{start_step: 5, overrides: {loss.hidden_weight: 1.0, loss.hidden_layers: [1]}}]"
    with pytest.raises(ConfigError, match=r"config key 'loss.hidden_layers': is unused: loss.hidden_weight is 0"):
        load_config(None, [*BASE, "loss.hidden_layers=[2]", late])
    kept = load_config(None, [*BASE, "loss.hidden_layers=[2]", late.replace(", loss.hidden_layers: [1]", "")])
    assert stage_config(kept, 5).loss.hidden_layers == [2]


def test_list_and_number_settings_are_refused_or_wrapped_naming_the_key():
    assert load_config(None, [*BASE, "bitnet.exclude=lm_head"]).bitnet.exclude == ("lm_head",)  # a TupleConfig
    with pytest.raises(ConfigError, match=r"config key 'stages.0.start_step': a list is set whole"):
        load_config(None, [*BASE, "stages.0.start_step=5"])
    with pytest.raises(ConfigError, match=r"'train.dist_timeout_s': must be > 0 and finite, got inf"):
        load_config(None, [*BASE, "train.dist_timeout_s=inf"])


def test_readme_config_reference_is_the_generated_one():
    from megadistil.config import reference_markdown

    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    assert readme[readme.index(start) + len(start):readme.index(end)] == reference_markdown(), \
        "README's config reference is stale: paste the output of `python -m megadistil.config`"
    assert "| `train.max_steps` | `int` | `100` | optimizer steps |" in reference_markdown()


BASE = ["model.student=/m", "data.text=[a.txt]"]


@pytest.mark.parametrize("overrides, message", [
    (["teacher.kind=shards", "data.text=[]", "data.shards=/s", "loss.hidden_weight=0.1"],
     "'loss.hidden_weight': needs the teacher's hidden, which teacher.kind=shards does not provide"),
    (["teacher.kind=hf", "teacher.path=/t", "stages=[{start_step: 3, overrides: {loss.attn_relation_weight: 0.1}}]"],
     "'stages.0.overrides.loss.attn_relation_weight': needs the teacher's qkv, which teacher.kind=hf"),
    (["teacher.kind=none"], "'loss.kd_weight': needs the teacher's logits, which teacher.kind=none"),
    (["teacher.kind=hf"], "'teacher.path': is required with teacher.kind=hf"),
    (["teacher.path=/t"], "'teacher.path': is unused: teacher.kind is not hf"),
    (["teacher.top_k=8"], "'teacher.top_k': is unused: teacher.kind is not hf (shards carry"),
    (["teacher.kind=shards", "data.text=[]", "data.shards=/s", "teacher.layerwise=false"],
     "'teacher.layerwise': is unused: teacher.kind is not shared"),
    (["teacher.kind=hf", "teacher.path=/t", "loss.kd_weight=0.0", "loss.ce_weight=1.0"],
     "'teacher.kind': hf: no loss term reads its targets"),
    (["teacher.kind=shards"], "'teacher.kind': shards needs data.shards"),
    (["teacher.kind=live"], "'teacher.kind': Invalid value 'live', expected one of [shared, hf, shards, none]"),
    (["model.teacher=/t"], "'model.teacher' moved to teacher.kind"),
    (["model.teacher_top_k=8"], "'model.teacher_top_k' moved to teacher.top_k"),
])
def test_the_teacher_contract_is_checked_for_every_stage(overrides, message):
    """Each loss term, in the base config and in every stage, is fed by the teacher kind or refused by name; a
    teacher setting nothing reads is refused too. All before any weight loads."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*BASE, *overrides])


def test_a_stage_that_turns_a_term_on_is_accepted_where_the_teacher_feeds_it():
    cfg = load_config(None, [*BASE, "stages=[{start_step: 3, overrides: {loss.hidden_weight: 0.1}}]"])
    assert stage_config(cfg, 3).loss.needs() == {"logits": "loss.kd_weight", "hidden": "loss.hidden_weight"}


def test_a_single_value_for_a_list_key_is_a_list_of_one(tmp_path):
    cfg = load_config(None, ["model.student=/m", "data.text=corpus.txt", "train.eval_tasks=hellaswag"])
    assert (cfg.data.text, cfg.train.eval_tasks) == (["corpus.txt"], ["hellaswag"])
    yaml = tmp_path / "run.yaml"
    yaml.write_text("model: {student: /m}\ndata: {text: corpus.txt, eval_text: held.txt}\n")
    cfg = load_config(yaml)
    assert (cfg.data.text, cfg.data.eval_text) == (["corpus.txt"], ["held.txt"])


def test_a_list_for_a_one_value_key_is_refused_naming_it(tmp_path):
    """OmegaConf alone says "Cannot convert 'ListConfig' to string"; the error names the key at any depth."""
    with pytest.raises(ConfigError, match=r"'data.shards' takes one value, not a list: \['a', 'b'\]"):
        load_config(None, ["model.student=/m", "data.shards=[a,b]"])
    yaml = tmp_path / "run.yaml"
    yaml.write_text("model: {student: /m}\ndata: {text: c.txt}\nlog: {wandb: {project: [p, q]}}\n")
    with pytest.raises(ConfigError, match=r"'log.wandb.project' takes one value"):
        load_config(yaml)


def test_the_shared_teacher_runs_only_for_stages_whose_loss_reads_it():
    """A CE-only stage costs no teacher forward; a stage that turns on the hidden-state term gets its layers."""
    import torch

    from megadistil.bitnet import to_bitnet
    from megadistil.engine.teachers import SharedTeacher
    from tests._tiny import tiny_llama31

    cfg = load_config(None, [*BASE, "loss.kd_weight=0.0", "loss.ce_weight=1.0",
                             "stages=[{start_step: 5, overrides: {loss.hidden_weight: 0.5, loss.hidden_layers: [1]}}]"])
    student = to_bitnet(tiny_llama31(seed=0), lora_rank=4)
    batch = {"input_ids": torch.randint(0, 256, (2, 8))}
    forwards = []
    student.model.register_forward_hook(lambda *_: forwards.append(1))
    for layerwise in (False, True):
        early = SharedTeacher(student, layerwise=layerwise).targets(batch, stage_config(cfg, 4).loss)
        assert early.layer_hidden == [] and early.layerwise is None and not forwards
    later = SharedTeacher(student, layerwise=False).targets(batch, stage_config(cfg, 5).loss)
    assert len(forwards) == 1 and len(later.layer_hidden) == 1 and later.hidden is None
    within = SharedTeacher(student).targets(batch, stage_config(cfg, 5).loss).layerwise  # runs in the student's
    assert len(forwards) == 1 and within.hidden_layers == [1] and within.qkv_layers == [] and not within.final


@pytest.mark.parametrize("overrides, message", [
    (["onpolicy.fraction=1.5"], "'onpolicy.fraction': must be in [0, 1], got 1.5"),
    (["onpolicy.fraction=0.5", "onpolicy.top_p=0.0"], "'onpolicy.top_p': must be in (0, 1], got 0.0"),
    (["onpolicy.fraction=0.5", "onpolicy.temperatures=[-1.0]"], "'onpolicy.temperatures': one or more"),
    (["onpolicy.fraction=0.5", "onpolicy.prompt_tokens=200"],
     "'onpolicy.prompt_tokens': 200 prompt + 64 new tokens (onpolicy.max_new_tokens) exceed data.seq_len 256"),
    (["onpolicy.fraction=0.5", "teacher.kind=shards", "data.text=[]", "data.shards=/s"],
     "'onpolicy.fraction': on-policy distillation needs a live teacher"),
    (["stages=[{start_step: 3, overrides: {onpolicy.fraction: 1.0, loss.kd_weight: 0.0, loss.ce_weight: 1.0}}]"],
     "'stages.0.overrides.loss.kd_weight': must be > 0 where onpolicy.fraction > 0"),
    (["stages=[{start_step: 3, overrides: {onpolicy.fraction: 2.0}}]"],
     "'stages.0.overrides.onpolicy.fraction': must be in [0, 1]"),
    (["onpolicy.top_k=8"], "'onpolicy.top_k': is unused: onpolicy.fraction is 0 at every stage"),
    (["onpolicy.fraction=0.5", "data.text=[]", "data.preference=[/p.jsonl]"],
     ("'onpolicy.fraction': on-policy prompts are each sequence's first onpolicy.prompt_tokens tokens, and "
      "data.preference rows hold prompts of their own lengths")),
])
def test_onpolicy_settings_are_checked_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*BASE, *overrides])


def test_a_stage_may_turn_onpolicy_on():
    cfg = load_config(None, [*BASE, "onpolicy.top_p=0.9", "stages=[{start_step: 3, overrides: {onpolicy.fraction: 1.0}}]"])
    assert (cfg.onpolicy.fraction, stage_config(cfg, 3).onpolicy.fraction) == (0.0, 1.0)
    assert stage_config(cfg, 3).onpolicy.sampling(seed=4).top_p == 0.9


@pytest.mark.parametrize("overrides, message", [
    (["data.preference=[p.jsonl]"], ("'data': set exactly one of data.shards, data.text and data.preference "
                                    "(set: data.text, data.preference)")),
    (["data.text=[]"], "'data': set exactly one of data.shards, data.text and data.preference (set: none)"),
    (["preference.beta=2.0"], "'preference.beta': is unused: preference.reference (the reference model) is not set"),
    (["preference.beta=-1.0"], "'preference.beta': must be finite and > 0"),
    (["preference.reference=/r", "teacher.kind=none", "loss.kd_weight=0.0", "loss.ce_weight=1.0"],
     "'preference.reference': token weights need the teacher's log-probs of the labels"),
    (["preference.reference=/no/such/ref"], "'preference.reference': /no/such/ref is not a model directory"),
])
def test_preference_settings_are_checked_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*BASE, *overrides])


# ---------------------------------------------------------------- settings that would fail late or do nothing

@pytest.mark.parametrize("overrides, message", [
    (["optim.eps=0"], "config key 'optim.eps': must be > 0, got 0.0"),
    (["optim.grad_clip=-1"], "config key 'optim.grad_clip': must be >= 0 (0: no clipping), got -1.0"),
    (["relora.reset_every=1", "relora.restart_warmup_steps=0"],
     "config key 'relora.reset_every': must be 0 (no merges) or >= 2, got 1"),
    (["relora.reset_every=10", "relora.restart_warmup_steps=-5"],
     "config key 'relora.restart_warmup_steps': must be >= 0, got -5"),
    (["relora.reset_every=20", "relora.restart_warmup_steps=20"],
     "config key 'relora.restart_warmup_steps': 20 must be < relora.reset_every=20: the LR would re-warm"),
    (["relora.reset_every=5"], "config key 'relora.restart_warmup_steps': 10 must be < relora.reset_every=5"),  # default
])
def test_a_value_that_fails_late_or_does_nothing_is_refused_naming_it(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*BASE, *overrides])


def test_a_shortened_run_of_a_full_config_is_honoured_as_far_as_it_goes():
    """Schedules may run past train.max_steps (a smoke test of a shipped config with fewer steps): the LR warmup,
    ReLoRA cycles, a stage and eval_every are honoured as far as the run goes, and a late stage's keys count."""
    cfg = load_config(None, [*BASE, "relora.reset_every=100", "relora.restart_warmup_steps=5", "optim.warmup_steps=100",
                             "train.eval_every=101", "data.eval_text=[e.txt]", "loss.hidden_layers=[0]",
                             "stages=[{start_step: 101, overrides: {loss.hidden_weight: 1.0}}]"])
    assert (cfg.train.max_steps, cfg.relora.reset_every, cfg.stages[0].start_step) == (100, 100, 101)



def test_the_step_bounds_accept_their_last_useful_value():
    """At the bounds: the reset_every accepted last still merges once (engine/schedule.py's own reset steps), a
    stage starting at train.max_steps runs its one step, and grad_clip 0 (no clipping) is DeepSpeed's own off."""
    cfg = load_config(None, [*BASE, "relora.reset_every=99", "relora.restart_warmup_steps=98", "optim.warmup_steps=99",
                             "train.eval_every=100", "data.eval_text=[e.txt]", "optim.grad_clip=0",
                             "stages=[{start_step: 100, overrides: {optim.lr: 1e-4}}]"])
    steps = range(1, cfg.train.max_steps + 1)
    assert [s for s in steps if is_reset_step(s, cfg.relora)] == [100]
    assert stage_config(cfg, 100).optim.lr == 1e-4 and cfg.optim.grad_clip == 0
    assert lr_at(99, cfg.optim, cfg.relora, 100) == pytest.approx(cfg.optim.lr)  # the warmup ends inside the run


# ---------------------------------------------------------------- DSKD in the teacher contract

def test_dskd_alone_feeds_from_a_separate_teacher():
    """teacher.kind=hf with the dual-space term as its only reader is a run (engine/teachers.py computes the
    teacher's hidden states for it); the term reads a target only a separate teacher has."""
    cfg = load_config(None, [*BASE, "teacher.kind=hf", "teacher.path=/t", "loss.kd_weight=0.0", "loss.ce_weight=1.0",
                             "loss.dskd_weight=1.0"])
    assert cfg.loss.needs() == {"foreign_hidden": "loss.dskd_weight"}


@pytest.mark.parametrize("overrides, message", [
    (["loss.dskd_weight=0.5"],
     ("'loss.dskd_weight': needs the teacher's foreign_hidden, which teacher.kind=shared does not provide (kinds that "
     "do: hf)")),
    (["teacher.kind=shards", "data.text=[]", "data.shards=/s", "stages=[{start_step: 3, overrides: {loss.dskd_weight: 1.0}}]"],
     "'stages.0.overrides.loss.dskd_weight': needs the teacher's foreign_hidden, which teacher.kind=shards does not"),
    (["teacher.kind=hf", "teacher.path=/t", "loss.kd_weight=0.0", "loss.ce_weight=1.0"],
     "'teacher.kind': hf: no loss term reads its targets (loss.kd_weight and loss.dskd_weight are 0 at every stage)"),
    (["teacher.kind=shards", "data.text=[]", "data.shards=/s", "loss.kd_weight=0.0", "loss.ce_weight=1.0"],
     "'teacher.kind': shards: no loss term reads its targets (loss.kd_weight is 0 at every stage)"),
])
def test_dskd_is_refused_where_no_teacher_of_another_tokenizer_feeds_it(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*BASE, *overrides])


# ---------------------------------------------------------------- loss settings on-policy micro-batches replace

@pytest.mark.parametrize("overrides, message", [
    (["onpolicy.fraction=1.0", "loss.ce_weight=0.5"],
     "'loss.ce_weight': is unused: onpolicy.fraction is 1 at every stage (on-policy micro-batches train without CE"),
    (["onpolicy.fraction=1.0", "loss.kind=reverse_kl"],
     ("'loss.kind': is unused: no KD or dual-space term reads it at any stage (loss.kd_weight and loss.dskd_weight "
     "are 0, or onpolicy.fraction is 1: on-policy micro-batches use onpolicy.kind)")),
    (["onpolicy.fraction=1.0", "loss.jsd_beta=0.3"], "'loss.jsd_beta': is unused: no JSD is computed at any stage"),
    # the base never runs when a stage starts at step 1 (stage 0 and 1 are both step 1)
    (["loss.ce_weight=0.5", "stages=[{start_step: 1, overrides: {onpolicy.fraction: 1.0}}]"],
     "'loss.ce_weight': is unused: onpolicy.fraction is 1 at every stage"),
    (["loss.ce_weight=0.5", ("stages=[{start_step: 0, overrides: {onpolicy.fraction: 0.5}}, "
                            "{start_step: 1, overrides: {onpolicy.fraction: 1.0}}]")],
     "'loss.ce_weight': is unused: onpolicy.fraction is 1 at every stage"),
])
def test_loss_settings_that_onpolicy_replaces_everywhere_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*BASE, *overrides])


@pytest.mark.parametrize("overrides", [
    # off-policy micro-batches before the stage: both act there
    ["loss.ce_weight=0.5", "loss.kind=reverse_kl", "stages=[{start_step: 3, overrides: {onpolicy.fraction: 1.0}}]"],
    ["loss.ce_weight=0.5", "loss.kind=reverse_kl", "onpolicy.fraction=0.5"],
    # the held-out KD to the shared teacher measures the base's loss.kind and jsd_beta
    ["onpolicy.fraction=1.0", "loss.kind=jsd", "loss.jsd_beta=0.3", "data.eval_text=[e.txt]"],
    # onpolicy.kind=jsd reads loss.jsd_beta on the on-policy micro-batches
    ["onpolicy.fraction=1.0", "onpolicy.kind=jsd", "loss.jsd_beta=0.3"],
])
def test_loss_settings_that_some_micro_batches_read_are_accepted(overrides):
    cfg = load_config(None, [*BASE, *overrides])
    assert cfg.loss.ce_weight == 0.5 or cfg.loss.jsd_beta == 0.3


# ---------------------------------------------------------------- the ds_config's precision sections and ZeRO stage

@pytest.mark.parametrize("ds, message", [
    ({"zero_optimization": {"stage": 2}},
     "ds_config zero_optimization.stage=2: megadistil runs on ZeRO-3 only; set it to 3 (or leave it out)"),
    ({"zero_optimization": {"stage": 0}}, "ds_config zero_optimization.stage=0: megadistil runs on ZeRO-3 only"),
    # DeepSpeed reads "bf16" before its alias: the reconciled "bf16" would silently win over this section
    ({"bfloat16": {"enabled": True}}, 'ds_config "bfloat16": DeepSpeed\'s old alias of "bf16"'),
    ({"bf16": True}, 'ds_config bf16=true: must be a section, e.g. "bf16": {"enabled": "auto"}'),
    ({"fp16": False}, 'ds_config fp16=false: must be a section, e.g. "fp16": {"enabled": "auto"}'),
    ({"amp": {"enabled": True}}, 'ds_config "amp": megadistil sets the precision from model.dtype'),
    ({"torch_autocast": {"enabled": True, "dtype": "torch.float16"}},
     'ds_config "torch_autocast": megadistil sets the precision from model.dtype'),
    # writers that commit after save_checkpoint returns, or never: `latest` would name a tag without its files
    ({"checkpoint": {"writer": {"decoupled": True}}}, "ds_config checkpoint.writer.decoupled=true: its files are"),
    ({"checkpoint": {"writer": {"type": "mock"}}}, 'ds_config checkpoint.writer.type="MOCK" writes no files'),
    ({"datastates_ckpt": {"host_cache_size": 16}}, "ds_config datastates_ckpt: DataStates writes checkpoints"),
])
def test_ds_config_sections_megadistil_cannot_honour_are_refused(ds, message):
    cfg = load_config(None, BASE)
    with pytest.raises(ConfigError, match=re.escape(message)):
        reconcile_ds_config(cfg, ds, world_size=1, bf16=False)


def test_nvme_parameter_offload_is_refused_where_relora_merges_into_partitions():
    """ΔW's partitions are merged into and checkpointed in memory (ds_tensor), which NVMe offload swaps out."""
    nvme = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/local"}}}
    with pytest.raises(ConfigError, match=re.escape("ds_config zero_optimization.offload_param.device=nvme with "
                                                    "relora.reset_every > 0: ReLoRA merges into")):
        reconcile_ds_config(load_config(None, [*BASE, "relora.reset_every=100"]), nvme, world_size=1, bf16=False)
    reconcile_ds_config(load_config(None, BASE), nvme, world_size=1, bf16=False)  # no ΔW: nothing swapped is touched
    cpu = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    reconcile_ds_config(load_config(None, [*BASE, "relora.reset_every=100"]), cpu, world_size=1, bf16=False)


def test_ds_config_without_a_stage_or_precision_gets_zero3_and_the_resolved_dtype():
    out = reconcile_ds_config(load_config(None, BASE), {}, world_size=1, bf16=True)
    assert (out["zero_optimization"]["stage"], out["bf16"], out["fp16"]) == (3, {"enabled": True}, {"enabled": False})


# ---------------------------------------------------------------- the shipped configs' shards hint

@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shards_hint_names_this_configs_seq_len_and_temperature(path):
    """data.seq_len and loss.temperature must be the shards' (engine/inputs.py refuses others), and
    tools/precompute_teacher.py's default --seq-len is not any shipped config's: the hint says what to pass."""
    text, cfg = path.read_text(), load_config(path)
    if "data.shards=DIR" not in text:
        assert path.name == "tiny.yaml"  # the one config without the hint
        return
    hint = f"tools/precompute_teacher.py --seq-len {cfg.data.seq_len} --temperature {cfg.loss.temperature}"
    assert hint in " ".join(line.strip().lstrip("# ") for line in text.splitlines()), hint


def test_a_config_file_that_is_no_yaml_mapping_is_refused_naming_the_file(tmp_path):
    """Broken YAML, a duplicate key and a top-level list were yaml/AttributeError tracebacks (exit 1: 'does not fit'
    for tools/estimate_memory.py)."""
    cases = {"broken.yaml": ("model: [\n", "is not valid YAML: while parsing a flow node"),
             "duplicate.yaml": ("model:\n  student: a\n  student: b\n", "is not valid YAML: .* duplicate key student"),
             "list.yaml": ("- a\n- b\n", "holds a list, not a mapping of sections")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=f"config file {re.escape(str(tmp_path / name))} {message}"):
            load_config(tmp_path / name)


def test_a_ds_config_activation_checkpointing_flag_that_is_on_is_refused():
    """DeepSpeed's engine parses the section but never applies it here: the flag would do nothing, silently."""
    cfg = load_config(None, BASE)
    for flag in ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization"):
        ds = {"activation_checkpointing": {"partition_activations": False, flag: True}}
        with pytest.raises(ConfigError, match=rf"ds_config activation_checkpointing\.{flag}=true: .*"
                                              r"model\.activation_checkpointing"):
            reconcile_ds_config(cfg, ds, world_size=1, bf16=False)


def test_a_ds_config_activation_checkpointing_section_with_every_flag_off_is_accepted():
    cfg = load_config(None, BASE)
    off = {"partition_activations": False, "cpu_checkpointing": False, "number_checkpoints": 4}
    for section in ({}, off):
        out = reconcile_ds_config(cfg, {"activation_checkpointing": section}, world_size=1, bf16=False)
        assert out["activation_checkpointing"] == section
