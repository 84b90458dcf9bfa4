"""The engine end to end: `deepspeed --num_gpus 2 launch/train.py` on gloo (CPU), ZeRO-3."""

import itertools
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from megadistil import rundir
from megadistil.config import ConfigError, load_config
from megadistil.distill.losses import LossConfig
from megadistil.engine.inputs import check_inputs
from tests._tools import deepspeed_cmd

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def deepspeed_run(script: str, args: list[str], *, nproc: int = 2, env: dict | None = None):
    cmd = [*deepspeed_cmd(nproc), script, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
                          env={**os.environ, **(env or {})})


def train(out: Path, overrides: list[str], **kwargs):
    """launch/train.py; with MEGADISTIL_FAULT_* in env, the tests' fault-injecting wrapper of it."""
    args = ["--ds_config", "ds_configs/zero3.json", "--config", "configs/tiny.yaml",
            f"train.output_dir={out}", *overrides]
    faults = any(k.startswith("MEGADISTIL_FAULT_") for k in kwargs.get("env") or {})
    return deepspeed_run("tests/_fault_train.py" if faults else "launch/train.py", args, **kwargs)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run) if "loss" in m}


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def text_overrides(tiny_llama_dir, stdlib_text_file):
    return [f"model.student={tiny_llama_dir}", f"data.text=[{stdlib_text_file}]", f"data.eval_text=[{stdlib_text_file}]",
            "data.seq_len=64", "train.micro_batch_size=2", "train.eval_batches=2", "relora.reset_every=4",
            "relora.restart_warmup_steps=2", "optim.warmup_steps=2", "bitnet.lora_rank=8", "optim.lr=1e-2",
            "loss.hidden_weight=0.1", "loss.attn_relation_weight=0.1", "loss.attn_relation_heads=4"]


@pytest.fixture(scope="module")
def onpolicy_overrides(text_overrides):
    """Every second micro-batch on-policy, all of them from step 5 on (a stage); ReLoRA merges every 4 steps into an
    int8 ΔW (its codes and row scales saved and restored by the killed run's resume). float32: the killed run is
    compared with another launch, and `auto` measures each launch's GEMMs (under load two can pick two dtypes)."""
    return [*text_overrides, "train.micro_batch_size=4", "train.max_steps=16", "train.save_every=6", "model.dtype=fp32",
            "relora.delta_format=int8", "onpolicy.fraction=0.5", "onpolicy.prompt_tokens=16", "onpolicy.max_new_tokens=32",
            "stages=[{start_step: 5, overrides: {onpolicy.fraction: 1.0}}]"]


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory, tiny_llama_dir, stdlib_text_file):
    from megadistil.data.precompute import PrecomputeConfig, run_precompute

    out = tmp_path_factory.mktemp("shards")
    run_precompute(PrecomputeConfig(teacher=str(tiny_llama_dir), text=[str(stdlib_text_file)], out=str(out),
                                    seq_len=64, top_k=16, max_sequences=96, progress=False))
    return out


@pytest.fixture(scope="module")
def partitioned_ds_config(tmp_path_factory) -> str:
    """ZeRO-3 with every parameter partitioned (no persistence threshold), as a large model's head is: the tiny
    models' would otherwise stay whole on every rank and hide a weight read outside its module's forward."""
    config = json.loads((ROOT / "ds_configs/zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_partitioned.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def released_ds_config(tmp_path_factory, partitioned_ds_config) -> str:
    """Every parameter partitioned and released after each use (stage3_max_reuse_distance 0), as in a model larger
    than the reuse distance (Llama-3.1-8B: 8e9 > the default 1e9): every use of a layer is a gather."""
    config = json.loads(Path(partitioned_ds_config).read_text())
    config["zero_optimization"]["stage3_max_reuse_distance"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_released.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def crosstok_shards_dir(tmp_path_factory, tiny_llama_dir, crosstok_teacher_dir, stdlib_text_file):
    """Shards of the student's windows with the targets of the teacher with another tokenizer, aligned."""
    from megadistil.data.precompute import PrecomputeConfig, run_precompute

    out = tmp_path_factory.mktemp("crosstok_shards")
    run_precompute(PrecomputeConfig(teacher=str(crosstok_teacher_dir), student_tokenizer=str(tiny_llama_dir),
                                    text=[str(stdlib_text_file)], out=str(out), seq_len=64, top_k=16, max_sequences=96,
                                    progress=False))
    return out


@pytest.fixture(scope="module")
def padded_teacher_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny student's weights and tokenizer with 64 padding rows added to the embeddings and the head (as
    Qwen2.5-7B has 128 more than 0.5B): copies of rows 0-63, so the padding ids score like real ones and reach the
    top-k. A live teacher's top-k then holds ids past the student's vocabulary."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + 64, mean_resizing=False)
    with torch.no_grad():
        for emb in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            emb[vocab:] = emb[:64]
    out = tmp_path_factory.mktemp("padded_teacher")
    model.save_pretrained(out)
    for f in Path(tiny_llama_dir).glob("tokenizer*"):
        shutil.copy(f, out)
    return out


@pytest.fixture(scope="module")
def five_sequence_text(tmp_path_factory, tiny_llama_dir, stdlib_text_file) -> Path:
    """Held-out text that packs into 5 sequences of 64 tokens: not a whole number of 2 ranks x 2-sequence batches."""
    from transformers import AutoTokenizer

    from megadistil.data.text import pack_text

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    path, lines = tmp_path_factory.mktemp("heldout") / "five.txt", stdlib_text_file.read_text().splitlines()
    for n in range(1, len(lines)):
        path.write_text("\n".join(lines[:n]))
        if len(list(pack_text([path], tok, 64))) == 5:
            return path
    raise AssertionError("no prefix of the corpus packs into 5 sequences")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_overrides, onpolicy_overrides, tiny_llama_dir, shards_dir, stdlib_text_file,
         crosstok_teacher_dir, crosstok_shards_dir, reference_dir, preference_file,
         partitioned_ds_config, released_ds_config, five_sequence_text, padded_teacher_dir) -> dict[str, Path]:
    """The module's training runs in one 2-rank launch (tests/_runs_probe.py: one Trainer after another in the same
    processes), each in its own dir. `onpolicy` goes first, as the killed run's fresh processes start."""
    specs = {
        "onpolicy": {"overrides": onpolicy_overrides},
        # every parameter partitioned: on-policy generation from whole weights gathered once (the default) and from
        # each layer gathered at every new token
        "onpolicy_whole": {"overrides": [*onpolicy_overrides, "train.max_steps=2", "train.save_every=100"],
                           "ds_config": partitioned_ds_config},
        "onpolicy_layered": {"overrides": [*onpolicy_overrides, "train.max_steps=2", "train.save_every=100",
                                           "onpolicy.gather_weights=false"], "ds_config": partitioned_ds_config},
        "straight": {"overrides": [*text_overrides, "train.max_steps=12", "train.save_every=6",
                                   "log.profile_step=3"]},
        "shards": {"overrides": [
            f"model.student={tiny_llama_dir}", "teacher.kind=shards", f"data.shards={shards_dir}", "data.text=[]",
            "data.seq_len=64", f"data.eval_text=[{stdlib_text_file}]", "train.eval_batches=2", "train.micro_batch_size=2",
            "train.max_steps=10", "train.save_every=5", "bitnet.lora_rank=8", "optim.lr=1e-2", "optim.warmup_steps=2",
            "data.shuffle_buffer=16"]},
        "hf": {"overrides": [
            f"model.student={tiny_llama_dir}", "teacher.kind=hf", f"teacher.path={padded_teacher_dir}",
            "teacher.top_k=32", f"data.text=[{stdlib_text_file}]", "data.seq_len=64", "train.micro_batch_size=2",
            "train.max_steps=10",
            "train.save_every=10", "bitnet.lora_rank=8", "optim.lr=1e-2", "optim.warmup_steps=2",
            "onpolicy.prompt_tokens=16", "onpolicy.max_new_tokens=16",
            "stages=[{start_step: 9, overrides: {onpolicy.fraction: 1.0}}]"]},
        "crosstok": {"overrides": [
            f"model.student={tiny_llama_dir}", "teacher.kind=hf", f"teacher.path={crosstok_teacher_dir}",
            "teacher.top_k=32", "loss.kind=forward_kl", f"data.text=[{stdlib_text_file}]", "data.seq_len=64",
            "train.micro_batch_size=2", "train.max_steps=10", "train.save_every=10", "bitnet.lora_rank=8",
            "optim.lr=1e-2", "optim.warmup_steps=2", "loss.chunk_tokens=32", "loss.dskd_weight=0.5",
            f"data.eval_text=[{five_sequence_text}]", "train.eval_batches=2"],
            "ds_config": partitioned_ds_config},
        "crosstok_shards": {"overrides": [
            f"model.student={tiny_llama_dir}", "teacher.kind=shards", f"data.shards={crosstok_shards_dir}",
            "data.text=[]", "data.seq_len=64", "loss.kind=uld", "train.micro_batch_size=2", "train.max_steps=10", "train.save_every=10",
            "bitnet.lora_rank=8", "optim.lr=1e-2", "optim.warmup_steps=2", "data.shuffle_buffer=16"]},
        "preference": {"overrides": [
            f"model.student={tiny_llama_dir}", f"data.preference=[{preference_file}]", "data.text=[]",
            "data.seq_len=64", f"preference.reference={reference_dir}", "preference.beta=2.0", "loss.ce_weight=0.5",
            "train.micro_batch_size=2", "train.max_steps=6", "train.save_every=6", "bitnet.lora_rank=8",
            "optim.lr=1e-2", "optim.warmup_steps=2"], "ds_config": partitioned_ds_config},
        # one step over the same 4 preference rows (completions of different lengths), as 2 micro-batches of 1 row
        # per rank and as 1 micro-batch of 2: the gradient is the mean over the step's trained tokens either way
        **{name: {"overrides": [f"model.student={tiny_llama_dir}", f"data.preference=[{preference_file}]",
                                "data.text=[]", "data.seq_len=128", "model.dtype=fp32", "train.max_steps=1",
                                "train.save_every=100", "bitnet.lora_rank=8", *extra]}
           for name, extra in (("accum_rows", ["train.micro_batch_size=1", "train.grad_accum=2"]),
                               ("batch_rows", ["train.micro_batch_size=2", "train.grad_accum=1"]))},
        # float32: the base is float32, so the teacher's W and logits are bitwise the base's and a merge is invisible
        # bit for bit (a bf16 ΔW rounds the merged value: ~2 % of the largest logit on this model)
        "relora": {"overrides": [*text_overrides, "train.max_steps=6", "train.save_every=100",
                                 "relora.optimizer_reset=zero", "model.dtype=fp32", "relora.delta_format=dtype"],
                   "relora_probe": True},
        # an int8 ΔW, every parameter partitioned: a reset requantizes ΔW per row, within 5 % of the largest logit
        # (measured 3.3 % after these 6 steps; a bf16 ΔW's merge moved this model's logits by ~2.3 %)
        "relora_int8": {"overrides": [*text_overrides, "train.max_steps=6", "train.save_every=100",
                                      "relora.optimizer_reset=zero", "model.dtype=fp32", "relora.delta_format=int8"],
                        "relora_probe": True, "relora_tolerance": 0.05, "ds_config": partitioned_ds_config},
        "nan": {"overrides": [*text_overrides, "train.max_steps=12", "train.save_every=3", "train.max_nan_steps=3"],
                "nan_batches": [2, 7, 8, 9]},
        # one gather, two models: the same steps (a ReLoRA merge at step 4) with the layerwise shared teacher, with a
        # whole teacher forward before the student's, and CE only (no teacher), every gather counted
        **{name: {"overrides": [*text_overrides, "train.max_steps=6", "train.save_every=100", "model.dtype=fp32",
                                *extra], "ds_config": released_ds_config, "count_gathers": True}
           for name, extra in (("layerwise", []), ("whole_teacher", ["teacher.layerwise=false"]),
                               ("ce_only", ["loss.ce_weight=1", "loss.kd_weight=0", "loss.hidden_weight=0",
                                            "loss.attn_relation_weight=0",  # and its setting, unused, back
                                            f"loss.attn_relation_heads={LossConfig.attn_relation_heads}"]))},
    }
    for name, spec in specs.items():
        spec["out"] = str(tmp_path_factory.mktemp(name))
    # the straight run's checkpoints, resumed by ranks of which one sees none (as on node-local disks)
    specs["split_view"] = {"overrides": specs["straight"]["overrides"], "out": specs["straight"]["out"],
                           "hide_checkpoints_on_rank": 1, "probe_dir": str(tmp_path_factory.mktemp("split_view"))}
    # the straight run started again once finished: nothing to train, nothing logged twice
    specs["finished"] = {"overrides": specs["straight"]["overrides"], "out": specs["straight"]["out"],
                         "probe_dir": str(tmp_path_factory.mktemp("finished"))}
    # the straight run's output dir used by a run that starts over (resume=never): `latest` no longer names the
    # earlier run's checkpoint once set up, so a kill before its first save cannot resume (or export) the other run
    specs["restarted"] = {"overrides": [*specs["straight"]["overrides"], "train.resume=never", "train.max_steps=2",
                                        "train.save_every=100", "log.profile_step=0"], "out": str(tmp_path_factory.mktemp("restarted")),
                          "copy_from": specs["straight"]["out"]}
    ok(deepspeed_run("tests/_runs_probe.py", [json.dumps(list(specs.values()))]))
    return {name: Path(spec.get("probe_dir", spec["out"])) for name, spec in specs.items()}


def probe(run: Path) -> list[dict]:
    return [json.loads((run / f"probe.rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def straight_run(runs):
    assert all(p["error"] is None for p in probe(runs["straight"]))
    return runs["straight"]


def _held_out_kd_falls(run: Path) -> None:
    """KD of the student to the (shared) teacher on the same held-out sequences, before and after training."""
    evals = [m for m in metrics(run) if "eval_kd" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] > 0
    assert evals[-1]["eval_kd"] < 0.9 * evals[0]["eval_kd"], evals


@pytest.mark.multirank
def test_shared_teacher_run_lowers_kd_and_writes_the_run_dir(straight_run):
    _held_out_kd_falls(straight_run)
    assert (straight_run / "config.yaml").is_file() and (straight_run / "run.json").is_file()
    assert (straight_run / "checkpoints" / "latest").read_text() == "step00000012"
    records = metrics(straight_run)
    step_records = [m for m in records if "loss" in m]
    assert [m["step"] for m in step_records] == list(range(1, 13))
    assert {"lr", "tokens_per_s", "peak_mem_mb", "step_time_s", "ce", "hidden", "attn"} <= set(step_records[0])
    assert all(0 < m["grad_norm"] < math.inf for m in step_records), step_records  # before clipping
    for m in step_records:  # each rank's steps-only peak is within its lifetime peak, which never falls
        assert all(0 < m[f"steps_peak_mem_mb_rank{r}"] <= m[f"peak_mem_mb_rank{r}"] for r in (0, 1)), m
    assert all(a["peak_mem_mb"] <= b["peak_mem_mb"] for a, b in itertools.pairwise(step_records))
    assert step_records[-1]["resets"] == 2  # before steps 5 and 9
    evals = [m for m in records if "eval_ppl_student" in m]
    assert "eval_ppl_teacher" in evals[0] and evals[-1]["step"] == 12


@pytest.mark.multirank
def test_profiled_step_says_where_its_time_goes(straight_run):
    """log.profile_step: each rank writes the step's phases; the top-level ones fit in the step, the loss and the
    layerwise teacher inside the student's forward, and ZeRO-3 on 2 ranks spends time in collectives (gathers,
    reduce-scatters)."""
    for rank in (0, 1):
        prof = json.loads((straight_run / f"profile.rank{rank}.json").read_text())
        p = prof["phases_s"]
        assert all(p[k] > 0 for k in ("teacher", "student_forward", "loss", "backward", "optimizer")), p
        assert p["generate"] == 0 and p["loss"] < p["student_forward"] and p["teacher"] < p["student_forward"]
        assert p["student_forward"] + p["backward"] + p["optimizer"] <= prof["step_s"]
        assert 0 < prof["collectives_s"] < prof["step_s"] and prof["collective_ops"], prof


@pytest.mark.multirank
def test_killed_run_resumes_with_identical_losses(tmp_path, runs, onpolicy_overrides):
    """Bit-exact on CPU: same data order, same reductions, RNG and optimizer state restored, and the same samples
    (on-policy micro-batches are seeded by their position in the run). The run is killed one step after its
    checkpoint, so the resumed run redoes step 7 and metrics.jsonl keeps one record per step."""
    killed = train(tmp_path, onpolicy_overrides, env={"MEGADISTIL_FAULT_KILL_AFTER_STEP": "7"})
    assert killed.returncode != 0
    assert [m["step"] for m in metrics(tmp_path) if "loss" in m] == list(range(1, 8))
    resumed_run = train(tmp_path, onpolicy_overrides)
    ok(resumed_run)
    for collective in ("all_gather_into_tensor", "reduce_scatter_tensor"):  # torch's deprecation of DeepSpeed's calls
        assert f"torch.distributed.{collective}` is deprecated" not in resumed_run.stderr  # (distributed.py)
    assert [m["step"] for m in metrics(tmp_path) if "loss" in m] == list(range(1, 17))
    resumed, uninterrupted = metrics(tmp_path), metrics(runs["onpolicy"])
    keys = ("loss", "kd", "hidden", "attn", "onpolicy_kd", "onpolicy_share", "tokens")
    assert [{k: m.get(k) for k in keys} for m in resumed if m.get("step", 0) >= 7 and "loss" in m] == \
        [{k: m.get(k) for k in keys} for m in uninterrupted if m.get("step", 0) >= 7 and "loss" in m]


@pytest.mark.multirank
def test_onpolicy_run_lowers_the_reverse_kl_on_its_own_samples(runs):
    """The student samples from prompts cut from its batches, the shared teacher scores those tokens, the loss covers
    them alone; the schedule and the stage decide which steps: 2 and 4 (fraction 0.5), then every step."""
    steps = [m for m in metrics(runs["onpolicy"]) if "loss" in m]
    assert [m["onpolicy_share"] for m in steps[:4]] == [0.0, 1.0, 0.0, 1.0]
    assert all(m["onpolicy_share"] == 1.0 and m["gen_tokens_per_s"] > 0 for m in steps[4:])
    assert all("onpolicy_kd" not in m for m in steps[0:4:2])
    assert all(m["tokens"] <= 2 * 4 * 32 for m in steps[4:])  # generated tokens only: 2 ranks x 4 x 32 at most
    kd = [m["onpolicy_kd"] for m in steps if "onpolicy_kd" in m]
    first, last = sum(kd[:2]) / 2, sum(kd[-4:]) / 4  # the first two on-policy steps (2 and 4), the last four
    assert last < 0.9 * first, kd


@pytest.mark.multirank
def test_generation_from_whole_weights_samples_what_per_layer_gathers_sample(runs):
    """onpolicy.gather_weights: the whole student gathered once for a generation (no collective per new token)
    samples the same tokens and so gives the same losses as ZeRO-3's per-layer gathers; step 2 is on-policy (warmup:
    the learning rates of steps 1-2 do not depend on max_steps)."""
    keys = ("loss", "kd", "onpolicy_kd", "onpolicy_share", "tokens")
    whole, layered = ([{k: m.get(k) for k in keys} for m in metrics(runs[name]) if "loss" in m]
                      for name in ("onpolicy_whole", "onpolicy_layered"))
    assert [m["onpolicy_share"] for m in whole] == [0.0, 1.0]
    assert whole == layered


@pytest.mark.multirank
def test_offline_shards_run_lowers_kd(runs):
    """Training targets come from the shards only; the shared teacher is used for the held-out KD measurement."""
    assert all(p["error"] is None for p in probe(runs["shards"]))
    _held_out_kd_falls(runs["shards"])
    assert (runs["shards"] / "checkpoints" / "step00000010" / "meta.json").is_file()


@pytest.mark.multirank
def test_separate_hf_teacher_as_zero3_inference_engine(runs):
    """The teacher is another HF model (here: the same weights, loaded again, with a head padded past the student's
    vocabulary) partitioned by its own ZeRO-3 engine; its live top-k targets make the KD (the padding ids' mass in
    the tail: they stopped the run with "ids outside" before), so the student's KD to it falls like with the shared
    teacher. From step 9 (a stage) it scores the student's own samples instead: its engine's forward runs in lockstep
    on both ranks."""
    assert all(p["error"] is None for p in probe(runs["hf"]))
    steps = [m for m in metrics(runs["hf"]) if "kd" in m]
    kd = [m["kd"] for m in steps]
    assert len(kd) == 10 and all(math.isfinite(v) and v > 0 for v in kd)
    assert sum(kd[5:8]) < sum(kd[:3])
    assert [m["onpolicy_share"] for m in steps] == [0.0] * 8 + [1.0] * 2
    # isclose: onpolicy_kd is (kd x tokens) / tokens in float32, which rounds where the count is no power of two
    assert all(math.isclose(m["onpolicy_kd"], m["kd"], rel_tol=1e-6) and m["tokens"] <= 2 * 2 * 16 for m in steps[8:])


def _kd_and_target_shares(run: Path) -> tuple[list[float], list[float]]:
    """Per step of a run every rank finished: KD, and the share of tokens with a teacher target."""
    assert all(p["error"] is None for p in probe(run))
    steps = [m for m in metrics(run) if "kd" in m]
    return [m["kd"] for m in steps], [m["kd_target_share"] for m in steps]


@pytest.mark.multirank
def test_teacher_with_another_tokenizer_distils_on_the_shared_vocabulary(runs):
    """A separate teacher whose tokenizer differs (another vocabulary and merges, same text): it tokenizes each
    window's text itself, positions where both have read the same text carry its targets, its top-k is mapped onto
    the student's tokens of the same bytes (the rest in the tail), and the forward KL on them falls. The dual-space
    term's projector (DSKD) learns to read the teacher's hidden states through the student's head in the same steps."""
    kd, shares = _kd_and_target_shares(runs["crosstok"])
    assert len(kd) == 10 and all(math.isfinite(v) and v > 0 for v in kd)
    assert sum(kd[6:9]) < 0.9 * sum(kd[:3]), kd  # KD falls
    assert all(0.3 < share < 1.0 for share in shares), shares  # on the tokens with a teacher target only
    proj_ce = [m["dskd_proj_ce"] for m in metrics(runs["crosstok"]) if "dskd_proj_ce" in m]
    assert len(proj_ce) == 10 and sum(proj_ce[-3:]) < 0.95 * sum(proj_ce[:3]), proj_ce
    assert all(math.isfinite(m["dskd"]) for m in metrics(runs["crosstok"]) if "dskd" in m)


def test_held_out_text_is_cut_to_whole_rounds_and_refused_below_one(tiny_llama_dir, five_sequence_text):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from megadistil.engine.inputs import Inputs
    from megadistil.engine.trainer import Trainer

    text = [f"model.student={tiny_llama_dir}", f"data.text=[{five_sequence_text}]", "data.seq_len=64",
            f"data.eval_text=[{five_sequence_text}]"]
    for micro_batch, kept in ((2, 4), (4, None)):  # 2 ranks
        trainer = Trainer(load_config(None, [*text, f"train.micro_batch_size={micro_batch}"]), "unused.json")
        trainer.dist, trainer.inputs = SimpleNamespace(rank=0, world_size=2), Inputs(AutoTokenizer.from_pretrained(tiny_llama_dir))
        if kept is not None:
            assert len(trainer._build_eval()) == kept
            continue
        with pytest.raises(ConfigError, match=re.escape("'data.eval_text': 5 sequences of 64 tokens, fewer than "
                                                        "train.micro_batch_size 4 x 2 ranks")):
            trainer._build_eval()


@pytest.mark.multirank
def test_held_out_text_of_an_uneven_count_is_evaluated_in_whole_rounds(runs):
    """5 held-out sequences, 2 ranks of 2-sequence micro-batches, every parameter partitioned: rank 0 used to run a
    second forward alone and wait in its ZeRO-3 gather for the dist timeout. The 4 of whole rounds are evaluated."""
    evals = [m for m in metrics(runs["crosstok"]) if "eval_ppl_student" in m]
    assert [m["step"] for m in evals] == [0, 10] and all(math.isfinite(m["eval_ppl_student"]) for m in evals), evals


@pytest.mark.multirank
def test_shards_of_a_teacher_with_another_tokenizer_distil_by_uld(runs):
    """The same teacher precomputed into shards (tools/precompute_teacher.py --student-tokenizer): the student's
    windows with the aligned targets and their mask; ULD on them falls as with the live teacher."""
    kd, shares = _kd_and_target_shares(runs["crosstok_shards"])
    assert len(kd) == 10 and all(math.isfinite(v) and v > 0 for v in kd)
    assert sum(kd[6:9]) < 0.9 * sum(kd[:3]), kd  # KD falls
    assert all(0.3 < share < 1.0 for share in shares), shares  # on the tokens with a teacher target only


@pytest.mark.multirank
def test_preference_weighted_run_on_chosen_completions(runs):
    """Prompt + chosen response, loss on the response only; each token's KD and CE weighted by the teacher's and the
    reference's log-ratio (both scored live on 2 ZeRO-3 ranks)."""
    assert all(p["error"] is None for p in probe(runs["preference"]))
    steps = [m for m in metrics(runs["preference"]) if "loss" in m]
    assert len(steps) == 6 and all(math.isfinite(m["loss"]) for m in steps)
    weights = [m["token_weight"] for m in steps]
    assert all(0.0 < w < 4.0 for w in weights) and len(set(weights)) > 1 and 1.0 not in weights, weights
    # completion-only: far fewer tokens than the 2 ranks x 2 sequences x 63 positions a packed batch trains on
    assert all(m["tokens"] < 2 * 2 * 63 for m in steps)


@pytest.mark.multirank
def test_gradient_accumulation_weighs_micro_batches_by_their_tokens(runs):
    """The same step as two micro-batches of one row per rank and as one of two rows: the gradient (its norm before
    clipping, over both ranks) is the mean over the step's trained tokens either way; a mean of per-micro-batch means
    gives the short rows' tokens more weight."""
    accum, batch = (metrics(runs[name])[-1] for name in ("accum_rows", "batch_rows"))
    assert accum["tokens"] == batch["tokens"] < 4 * 127  # the same rows, completions only
    assert accum["grad_norm"] == pytest.approx(batch["grad_norm"], rel=1e-5)


@pytest.mark.multirank
def test_relora_invariant_frozen_teacher_on_two_ranks(runs):
    """After training: a full ReLoRA reset leaves the student's logits bitwise equal and zeroes the Adam moments
    (2 ranks, ZeRO-3); the teacher's W is bitwise the base model's; the shared teacher is the original model. And
    megadistil.sampling on the partitioned student: each rank's own prompt, in lockstep (rank 0 stops at EOS first),
    draws exactly what the two prompts as one batch drew."""
    for result in probe(runs["relora"]):
        assert result.pop("error") is None
        assert len(result) == 10 and all(result.values()), result


@pytest.mark.multirank
def test_the_layerwise_teacher_shares_the_students_gathers(runs):
    """With every layer released after each use, the forward of a step with the layerwise shared teacher all-gathers
    exactly the bytes of a CE-only forward (the student alone), and so does the whole step; a whole teacher forward
    before the student's gathers the whole decoder (embedding, layers, final norm) once more. The losses are bitwise those of the whole teacher
    forward, through a ReLoRA merge."""
    layerwise, whole, ce_only = (probe(runs[k]) for k in ("layerwise", "whole_teacher", "ce_only"))
    for rank in (0, 1):
        forward = layerwise[rank]["forward_gathered_bytes"]
        assert len(forward) == 6 and len(set(forward)) == 1
        assert forward == ce_only[rank]["forward_gathered_bytes"]
        assert layerwise[rank]["gathered_bytes"] == ce_only[rank]["gathered_bytes"]
        # after the first step, which records DeepSpeed's trace
        decoder_bytes = layerwise[rank]["decoder_bytes"]
        assert [w - f for w, f in zip(whole[rank]["forward_gathered_bytes"][1:], forward[1:])] == [decoder_bytes] * 5
    assert step_losses(runs["layerwise"]) == step_losses(runs["whole_teacher"])
    assert len(step_losses(runs["layerwise"])) == 6


def test_relora_reset_of_a_partitioned_int8_delta(runs):
    """relora.delta_format=int8 with every parameter partitioned: the same checks, the logits within 5 % of the
    largest after a reset (the merge requantizes ΔW per row) instead of bitwise; ΔW stays int8 codes."""
    for result in probe(runs["relora_int8"]):
        assert result.pop("error") is None
        change = result.pop("reset_logit_change")
        assert len(result) == 10 and all(result.values()), (change, result)
    index = json.loads((runs["relora_int8"] / "checkpoints" / "step00000006" / "delta.json").read_text())
    assert {t["dtype"] for n, t in index["tensors"].items() if n.endswith(".delta")} == {"int8"}


@pytest.mark.multirank
def test_nan_losses_are_skipped_and_a_streak_stops_with_checkpoint_intact(runs):
    run = runs["nan"]
    assert all("3 non-finite losses in a row" in p["error"] for p in probe(run))
    steps = [m for m in metrics(run) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5]  # batch 2 skipped; batches 7-9 (step 6) stop the run
    assert steps[-1]["nan_skipped"] == 1
    assert (run / "checkpoints" / "latest").read_text() == "step00000003"
    assert (run / "checkpoints" / "step00000003" / "meta.json").is_file()


def test_ranks_that_see_different_checkpoints_stop_before_any_load_naming_the_output_dir(runs):
    """One rank sees the straight run's checkpoints, the other none (node-local disks): both stop with an error at
    once instead of entering DeepSpeed's collective load apart and hanging until the collective timeout."""
    for p in probe(runs["split_view"]):
        assert p["error"].startswith("config key 'train.output_dir': the ranks see different checkpoints in "), p
        assert "(rank 0: step00000012, rank 1: none): it must be one directory every node shares" in p["error"], p
    assert (runs["straight"] / "checkpoints" / "latest").read_text() == "step00000012"  # nothing touched


def test_a_finished_run_started_again_trains_and_logs_nothing(runs):
    """The straight run (12 steps) started again on its own output dir: no step, and no second final evaluation
    (it evaluated again and logged a second record for step 12, and re-ran train.eval_tasks)."""
    assert all(p["error"] is None for p in probe(runs["finished"]))
    final = [m for m in metrics(runs["straight"]) if m.get("step") == 12]
    assert len([m for m in final if "eval_ppl_student" in m]) == 1 and len([m for m in final if "loss" in m]) == 1


def test_a_run_that_starts_over_withdraws_the_earlier_runs_latest(runs):
    """resume=never in the straight run's output dir (checkpoints of steps 6 and 12): after set-up `latest` names
    nothing (it named step 12, which a kill before the first save then resumed as this run's); the run's own final
    save is `latest` at the end, and metrics.jsonl holds this run's steps only."""
    assert [p["latest_after_setup"] for p in probe(runs["restarted"])] == [None, None]
    assert rundir.latest_tag(runs["restarted"] / "checkpoints") == "step00000002"
    assert [m["step"] for m in metrics(runs["restarted"]) if "loss" in m] == [1, 2]


def _inputs(tmp_path, overrides):
    return check_inputs(load_config(ROOT / "configs/tiny.yaml", [f"train.output_dir={tmp_path}", *overrides]), 2)


def test_a_stage_error_names_the_key_where_it_was_set(tmp_path, tiny_llama_dir, stdlib_text_file):
    """The value at fault is the base config's: the stage (which sets another key) was named for it."""
    base = [f"model.student={tiny_llama_dir}", f"data.text=[{stdlib_text_file}]", "loss.hidden_layers=[40]"]
    with pytest.raises(ConfigError, match=r"config key 'loss.hidden_layers': loss.hidden_layers: layer 40 out of "):
        _inputs(tmp_path, [*base, "stages=[{start_step: 5, overrides: {loss.hidden_weight: 0.5}}]"])
    # read at stage 2, set at stage 1
    with pytest.raises(ConfigError, match=r"config key 'stages.1.overrides.loss.hidden_layers': .*layer 50 out of "):
        stages = ("[{start_step: 5, overrides: {loss.kd_weight: 0.5}}, {start_step: 6, overrides: "
                  "{loss.hidden_layers: [50]}}, {start_step: 7, overrides: {loss.hidden_weight: 0.5}}]")
        _inputs(tmp_path, [*base[:2], f"stages={stages}"])


def test_bad_inputs_fail_before_any_weight_is_loaded(tmp_path, tiny_llama_dir, shards_dir, stdlib_text_file):
    with pytest.raises(ConfigError, match="teacher.path.*/no/such/teacher is not a model directory"):
        _inputs(tmp_path, [f"model.student={tiny_llama_dir}", "teacher.kind=hf", "teacher.path=/no/such/teacher",
                            f"data.text=[{stdlib_text_file}]"])
    with pytest.raises(ConfigError, match="model.student"):
        _inputs(tmp_path, ["model.student=/no/such/student"])
    with pytest.raises(ConfigError, match="'model.tokenizer': meta-llama/Llama-3.1-8B is not a directory .a tokenizer "
                                          "is read from disk, never fetched from a hub"):
        _inputs(tmp_path, [f"model.student={tiny_llama_dir}", "model.tokenizer=meta-llama/Llama-3.1-8B"])
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ConfigError, match=f"'train.output_dir': {tmp_path}/taken exists and is not a directory"):
        check_inputs(load_config(ROOT / "configs/tiny.yaml", [f"train.output_dir={tmp_path}/taken",
                                                              f"model.student={tiny_llama_dir}"]), 2)
    other = tmp_path / "other_model"
    from megadistil.tiny import make_tiny_llama

    make_tiny_llama(other, texts=[stdlib_text_file.read_text()[:20000]], vocab_size=300)
    with pytest.raises(ConfigError, match="data.shards.*tokenizer_fingerprint"):
        _inputs(tmp_path, [f"model.student={other}", f"data.shards={shards_dir}", "data.text=[]", "data.seq_len=64"])
    on_shards = [f"model.student={tiny_llama_dir}", "teacher.kind=shards", f"data.shards={shards_dir}", "data.text=[]"]
    with pytest.raises(ConfigError, match="loss.temperature"):
        _inputs(tmp_path, [*on_shards, "data.seq_len=64", "loss.temperature=2.0"])
    with pytest.raises(ConfigError, match=re.escape(f"'data.seq_len': 128, but the shards in {shards_dir} hold "
                                                    "sequences of 64 tokens: set it to 64")):
        _inputs(tmp_path, on_shards)  # configs/tiny.yaml packs text at 128
    on_shards.append("data.seq_len=64")  # 96 samples: 12 micro-batches of 4 a rank on 2 ranks
    with pytest.raises(ConfigError, match=re.escape(
            f"'data.epochs': 1 pass(es) over the 96 samples of {shards_dir} give 12 micro-batches a rank each, 12 "
            "optimizer steps of train.micro_batch_size 4 x train.grad_accum 1 x 2 ranks, fewer than train.max_steps "
            "60: raise data.epochs")):
        _inputs(tmp_path, [*on_shards, "data.epochs=1"])
    assert _inputs(tmp_path, [*on_shards, "data.epochs=5"]).manifest.total_samples == 96  # 60 steps: enough
    text = [f"model.student={tiny_llama_dir}", f"data.text=[{stdlib_text_file}]"]
    with pytest.raises(ConfigError, match=re.escape(f"'data.text': text input {tmp_path}/typo.txt: no such file")):
        _inputs(tmp_path, [*text[:1], f"data.text=[{stdlib_text_file},{tmp_path}/typo.txt]"])
    (tmp_path / "held.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"'data.eval_text': held-out text .*held.csv: unsupported suffix"):
        _inputs(tmp_path, [*text, f"data.eval_text=[{tmp_path}/held.csv]"])
    with pytest.raises(ConfigError, match=r"'data.shards': .*no manifest \(is .*unfinished a precompute_teacher"):
        _inputs(tmp_path, [*on_shards[:3], f"data.shards={tmp_path}/unfinished", "data.text=[]"])


def test_a_teacher_or_reference_that_cannot_run_the_attention_setting_is_refused_before_any_load(
        tmp_path, tiny_llama_dir, stdlib_text_file):
    """model.attn_implementation applies to every model the run loads: a teacher or reference whose class cannot
    run it is refused by name before the student's weights load (it used to fail at its own load, after them)."""
    from transformers import AutoConfig, Gemma2Config, Gemma2ForCausalLM

    vocab = AutoConfig.from_pretrained(tiny_llama_dir).vocab_size
    gemma = tmp_path / "gemma2"
    Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16)).save_pretrained(gemma)
    for f in tiny_llama_dir.glob("tokenizer*"):
        shutil.copy(f, gemma)  # the student's tokenizer: the exact path, nothing else to refuse
    base = [f"model.student={tiny_llama_dir}", f"data.text=[{stdlib_text_file}]", "model.attn_implementation=sdpa"]
    for key, overrides in (("teacher.path", ["teacher.kind=hf", f"teacher.path={gemma}"]),
                           ("preference.reference", [f"preference.reference={gemma}"])):
        with pytest.raises(ConfigError, match=re.escape(
                f"'model.attn_implementation': for {key} {gemma}: model.attn_implementation='sdpa' cannot run here: "
                "Gemma2ForCausalLM does not support sdpa")):
            _inputs(tmp_path, [*base, *overrides])
        _inputs(tmp_path, [*base[:2], *overrides])  # auto: eager for Gemma 2, sdpa for the student
    _inputs(tmp_path, base)  # the student alone runs sdpa


def test_a_teacher_with_another_tokenizer_is_checked_before_any_weight_loads(tmp_path, tiny_llama_dir, shards_dir,
                                                                            stdlib_text_file, crosstok_teacher_dir,
                                                                            crosstok_shards_dir):
    common = [f"model.student={tiny_llama_dir}", "teacher.kind=hf", f"teacher.path={crosstok_teacher_dir}"]
    text = f"data.text=[{stdlib_text_file}]"
    with pytest.raises(ConfigError, match="'loss.dskd_weight': needs the teacher's foreign_hidden, which "
                                          "teacher.kind=shared does not provide .kinds that do: hf."):
        _inputs(tmp_path, [f"model.student={tiny_llama_dir}", text, "loss.dskd_weight=0.5"])
    with pytest.raises(ConfigError, match="'data.text': is required"):
        _inputs(tmp_path, [*common, "loss.kind=uld", f"data.shards={shards_dir}", "data.text=[]"])
    with pytest.raises(ConfigError, match=r"'teacher.top_k': 100000 exceeds the teacher's vocabulary \(\d+ tokens\)"):
        _inputs(tmp_path, [*common, text, "loss.kind=uld", "teacher.top_k=100000"])
    with pytest.raises(ConfigError, match="'onpolicy.fraction': on-policy distillation needs the teacher to score"):
        _inputs(tmp_path, [*common, text, "loss.kind=uld", "onpolicy.fraction=0.5"])
    with pytest.raises(ConfigError, match="'data.split_special_tokens': control tokens in the text need one tokenizer"):
        _inputs(tmp_path, [*common, text, "loss.kind=uld", "data.split_special_tokens=false"])
    with pytest.raises(ConfigError, match="'preference.reference': .* has another tokenizer than the student"):
        _inputs(tmp_path, [f"model.student={tiny_llama_dir}", text,
                            f"preference.reference={crosstok_teacher_dir}"])
    # Shards of such a teacher: ULD reads them as they are; another divergence needs the teacher's tokenizer to map
    # its ids, found at manifest.teacher (and refused, naming the fix, where that directory is gone).
    shards = [f"model.student={tiny_llama_dir}", "teacher.kind=shards", "data.text=[]", "data.seq_len=64"]
    on_shards = _inputs(tmp_path, [*shards, f"data.shards={crosstok_shards_dir}", "loss.kind=jsd"])
    assert on_shards.shards_teacher_tokenizer is not None and on_shards.cross_tokenizer_targets
    moved = tmp_path / "moved_shards"
    shutil.copytree(crosstok_shards_dir, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps({**manifest, "teacher": str(tmp_path / "gone")}))
    _inputs(tmp_path, [*shards, f"data.shards={moved}", "loss.kind=uld"])
    with pytest.raises(ConfigError, match="'loss.kind': the shards in .* loss.kind forward_kl maps them onto the "
                                          "student's vocabulary .* use loss.kind=uld"):
        _inputs(tmp_path, [*shards, f"data.shards={moved}", "loss.kind=forward_kl"])
    live = _inputs(tmp_path, [*common, text, "loss.kind=uld"])
    assert live.teacher_tokenizer is not None and live.cross_tokenizer_targets
    same = _inputs(tmp_path, [f"model.student={tiny_llama_dir}", "teacher.kind=hf", f"teacher.path={tiny_llama_dir}",
                              text])
    assert same.teacher_tokenizer is None  # the same tokenizer: today's exact path, any divergence
    assert not same.cross_tokenizer_targets


@pytest.mark.multirank
def test_a_time_limit_warning_saves_after_the_step_and_stops_every_rank(tmp_path, text_overrides):
    """SIGUSR1 (train.sbatch's --signal=USR1@600) reaching one rank: every rank stops after the same step, with a
    checkpoint of it, and exits cleanly; Python's default for SIGUSR1 was to die, losing the steps since the last
    save. The next job resumes from it. (SIGTERM under srun: test_launch.py.)"""
    overrides = [*text_overrides, "train.max_steps=6", "train.save_every=100"]
    proc = train(tmp_path, overrides, env={"MEGADISTIL_FAULT_SIGNAL_AT_STEP": "3"})
    ok(proc)
    assert "step 3: stopping on SIGUSR1 (a time limit ahead): the checkpoint is saved" in proc.stdout
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000003"
    assert [m["step"] for m in metrics(tmp_path) if "loss" in m] == [1, 2, 3]


@pytest.mark.multirank
def test_cli_reports_config_errors_on_every_rank_without_training(tmp_path):
    proc = train(tmp_path, ["train.max_stepz=3"])
    assert proc.returncode != 0
    assert "config key 'train.max_stepz'" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.multirank
def test_relora_merges_where_the_world_size_does_not_divide_the_adapters(tmp_path, tiny_llama_dir, stdlib_text_file,
                                                                         partitioned_ds_config):
    """3 ranks, LoRA A of 8 x 64 = 512 = 2 x 171 + 170 elements: the first merge crashed on the last rank ("start
    (342) + length (171) exceeds dimension size (512)") and left the others waiting in a collective."""
    args = ["--ds_config", partitioned_ds_config, "--config", "configs/tiny.yaml", f"train.output_dir={tmp_path}",
            f"model.student={tiny_llama_dir}", f"data.text=[{stdlib_text_file}]", "data.seq_len=64",
            "train.micro_batch_size=1", "train.max_steps=3", "train.save_every=100", "relora.reset_every=2",
            "relora.restart_warmup_steps=1", "optim.warmup_steps=1", "bitnet.lora_rank=8", "train.dist_timeout_s=60"]
    ok(deepspeed_run("launch/train.py", args, nproc=3))
    steps = [m for m in metrics(tmp_path) if "loss" in m]
    assert [m["resets"] for m in steps] == [0, 0, 1] and all(math.isfinite(m["loss"]) for m in steps), steps


def test_weight_decay_acts_on_matrices_and_a_resume_keeps_this_runs_group_settings(tiny_llama_dir):
    """SubLN gains get a group without weight decay (it would pull them to 0); DeepSpeed's optimizer load takes
    lr_mult, betas and eps from the checkpoint, and the run's own come back over them."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from megadistil.bitnet import to_bitnet
    from megadistil.engine.model import assign_param_groups
    from megadistil.engine.trainer import Trainer

    model = to_bitnet(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), lora_rank=4, subln=True)
    cfg = load_config(None, [f"model.student={tiny_llama_dir}", "data.text=[x]", "optim.weight_decay=0.1",
                             "optim.betas=[0.8,0.99]", "optim.eps=1e-6", "bitnet.subln=true"])
    groups = assign_param_groups(model, cfg)
    assert sorted((g["wd_mult"], g["weight_decay"], {p.dim() for p in g["params"]} == {1}) for g in groups) == [
        (0.0, 0.0, True), (1.0, 0.1, False)]
    for param in model.parameters():  # as ZeRO-3 leaves them: 1-D and empty, the full shape in ds_shape
        param.ds_shape, param.data = param.shape, torch.empty(0)
    assert [(g["wd_mult"], len(g["params"])) for g in assign_param_groups(model, cfg)] == [
        (g["wd_mult"], len(g["params"])) for g in groups]  # every matrix kept its decay (all were 1-D: none did)
    for groups_set, index, pattern in ((["{pattern: nothing_here, lr_mult: 1.0}"], 0, "nothing_here"),
                                       (["{pattern: lora_, lr_mult: 1.0}", "{pattern: lora_A, lr_mult: 2.0}"], 1, "lora_A")):
        shadowed = load_config(None, [f"model.student={tiny_llama_dir}", "data.text=[x]", "bitnet.subln=true",
                                      f"optim.param_groups=[{','.join(groups_set)}]"])
        with pytest.raises(ConfigError, match=rf"'optim.param_groups.{index}.pattern': '{pattern}' matches no parameter"):
            assign_param_groups(model, shadowed)
    trainer = Trainer(cfg, "unused.json")
    trainer._group_settings = [{k: g[k] for k in ("lr_mult", "wd_mult")} for g in groups]
    loaded = [{"lr_mult": 0.5, "wd_mult": 1.0, "betas": (0.9, 0.95), "eps": 1e-8} for _ in groups]  # the checkpoint's
    trainer.optimizer = SimpleNamespace(param_groups=loaded)
    trainer._restore_group_settings()
    assert [(g["lr_mult"], g["wd_mult"], g["betas"], g["eps"]) for g in loaded] == [
        (1.0, s["wd_mult"], (0.8, 0.99), 1e-6) for s in trainer._group_settings]


@pytest.mark.parametrize("ds_config, expected", [("zero3.json", "AdamW"), ("zero3_offload.json", "DeepSpeedCPUAdam")])
def test_an_offloaded_optimizer_is_deepspeeds_cpu_adam(monkeypatch, ds_config, expected):
    """DeepSpeed refuses any client optimizer but its CPU Adam where ZeRO offloads the optimizer (the shipped
    zero3_offload.json crashed at start). Stubbed: the real one JIT-builds its kernel (~1 min; run by hand)."""
    import deepspeed.ops.adam

    from megadistil.engine.ds_config import load_ds_config
    from megadistil.engine.model import build_optimizer

    class DeepSpeedCPUAdam(torch.optim.AdamW):
        def __init__(self, params, adamw_mode, **kw):
            assert adamw_mode is True
            super().__init__(params, **kw)

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", DeepSpeedCPUAdam)
    cfg = load_config(None, ["model.student=/m", "data.text=[x]", "optim.betas=[0.8,0.99]"])
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "lr_mult": 0.5, "wd_mult": 1.0}]
    opt = build_optimizer(groups, cfg.optim, load_ds_config(ROOT / "ds_configs" / ds_config))
    assert type(opt).__name__ == expected and opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert opt.param_groups[0]["lr_mult"] == 0.5


def test_a_resume_is_refused_before_any_load_where_the_base_or_the_adapters_differ(tmp_path, tiny_llama_dir):
    """A checkpoint resumes only onto the base it trained from (meta.json's fingerprint samples the weights: a base of
    the same shapes and other weights used to resume silently) and with its adapters' shape and scale."""
    from types import SimpleNamespace

    from megadistil import rundir
    from megadistil.config import to_yaml
    from megadistil.engine.trainer import Trainer

    base = [f"model.student={tiny_llama_dir}", "data.text=[x]", f"train.output_dir={tmp_path / 'run'}"]
    tag = tmp_path / "run" / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    (tag / rundir.CONFIG).write_text(to_yaml(load_config(None, [*base, "bitnet.lora_rank=8"])))
    (tag / rundir.META).write_text(json.dumps({"base_fingerprint": rundir.model_dir_fingerprint(tiny_llama_dir)}))

    def check(overrides):
        trainer = Trainer(load_config(None, [*base, *overrides]), "unused.json")
        trainer.resume_tag, trainer.dist = tag.name, SimpleNamespace(rank=0)
        trainer._check_resumable()
        return trainer

    assert check(["bitnet.lora_rank=8"]).changed_on_resume == {}  # the run it continues
    # other settings resume as changed, said and recorded (run.json), not silently
    changed = check(["bitnet.lora_rank=8", "optim.lr=0.05", "train.max_steps=77", "loss.kind=jsd"]).changed_on_resume
    defaults = load_config(None, base)
    assert changed == {"optim.lr": (defaults.optim.lr, 0.05), "train.max_steps": (defaults.train.max_steps, 77),
                       "loss.kind": (str(defaults.loss.kind), "jsd")}
    with pytest.raises(ConfigError, match=r"'bitnet.lora_rank': 4 but the checkpoint .*step00000004 was trained with 8"):
        check(["bitnet.lora_rank=4"])
    other = tmp_path / "other"  # the same files but for some weights' bytes: same config, headers and shapes
    shutil.copytree(tiny_llama_dir, other)
    with (other / "model.safetensors").open("r+b") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))  # the first tensor's data
        first = f.read(64)
        f.seek(-64, 1)
        f.write(bytes(b ^ 0x40 for b in first))
    with pytest.raises(ConfigError, match=rf"'model.student': {other} is not the base the checkpoint .* trained from"):
        check([f"model.student={other}", "bitnet.lora_rank=8"])
    # ReLoRA on or off as saved: resumed without it, the merged ΔW the checkpoint holds were silently not loaded.
    with pytest.raises(ConfigError, match=r"'relora.reset_every': 20 but the checkpoint .* holds no ΔW"):
        check(["bitnet.lora_rank=8", "relora.reset_every=20"])
    rundir.write_delta_index(tag, 1, {})
    check(["bitnet.lora_rank=8", "relora.reset_every=20"])
    with pytest.raises(ConfigError, match=r"'relora.reset_every': 0 but the checkpoint .* holds merged ΔW"):
        check(["bitnet.lora_rank=8"])


def test_a_rank_writes_its_own_zero3_partition_of_a_merged_tensor():
    """ReLoRA writes the new A, zero B and pruned moments partition by partition: DeepSpeed's full setter slices past
    the end of a tensor the world size does not divide (LoRA A 128x4096 on 12 ranks: 524288 = 11 x 43691 + 43687)."""
    from megadistil.engine.relora import partition_of

    value = torch.arange(10.0).reshape(2, 5)
    parts = [partition_of(value, 4, rank) for rank in range(3)]  # ceil(10 / 3) = 4 a rank, the last padded
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
    big = torch.zeros(128 * 4096)
    assert partition_of(big, 43691, 11).numel() == 43691  # DeepSpeed's slice would end at 524292 > 524288


def test_dual_space_term_matches_its_definition():
    """DSKD's teacher-to-student half in DistillModule: the teacher's hidden states at aligned positions, projected
    into the student's space and read by the student's head, are the KD target (detached) at those positions; the
    projector learns by CE on the labels there. Against the same terms written out in float64."""
    import torch
    import torch.nn.functional as F

    from megadistil.distill.losses import IGNORE_INDEX
    from megadistil.engine.module import DistillModule
    from megadistil.engine.teachers import Targets
    from tests._tiny import tiny_llama31

    student = tiny_llama31(seed=0, vocab_size=96)
    g = torch.Generator().manual_seed(0)
    projector = torch.nn.Linear(48, 64, bias=False)
    module = DistillModule(student, projector=projector)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], 1)
    foreign = torch.randn(2, 12, 48, generator=g)
    aligned = torch.rand(2, 12, generator=g) > 0.3
    cfg = LossConfig(kind="forward_kl", kd_weight=0.0, ce_weight=1.0, dskd_weight=0.5, temperature=2.0, chunk_tokens=5)
    parts = module(ids, labels, Targets(foreign_hidden=foreign, foreign_mask=aligned), cfg)
    parts["loss"].backward()

    with torch.no_grad():
        h = student.model(input_ids=ids).last_hidden_state.double()
    W = student.lm_head.weight.detach().double()
    P = projector.weight.detach().double().requires_grad_()
    z_s, z_p = h @ W.T, (foreign.double() @ P.T) @ W.T
    valid = labels != IGNORE_INDEX
    both = valid & aligned
    safe = labels.clamp_min(0)
    ce = F.cross_entropy(z_s[valid], safe[valid])
    proj_ce = F.cross_entropy(z_p[both], safe[both])
    p_t, log_q = torch.softmax(z_p.detach() / 2.0, -1), torch.log_softmax(z_s / 2.0, -1)
    kd = (p_t * (p_t.log() - log_q)).sum(-1)[both].mean()
    torch.testing.assert_close(parts["dskd"].double(), kd, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(parts["dskd_proj_ce"].double(), proj_ce, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(parts["loss"].double(), ce + 0.5 * (4.0 * kd + proj_ce), rtol=2e-5, atol=1e-6)
    (0.5 * proj_ce).backward()  # the projector learns from its CE alone: the KD target is detached
    torch.testing.assert_close(projector.weight.grad.double(), P.grad, rtol=1e-4, atol=1e-7)


def test_a_metrics_line_torn_by_a_kill_is_dropped_on_resume():
    """A kill (or a full disk) mid-write leaves half a JSON line last in metrics.jsonl: every resume stopped on it
    with a JSONDecodeError, after loading everything. Records after the resume step go; the step's own stays."""
    from megadistil.engine.trainer import _kept

    lines = ['{"step": 7, "loss": 1.0}', '{"step": 8, "loss": 0.9}', '{"step": 8, "eval_loss": 2.0}',
             '{"step": 9, "loss": 0.8}', '{"step": 10, "lo']
    assert [line for line in lines if _kept(line, 8)] == lines[:3]
    assert [line for line in lines if _kept(line, 0)] == []  # starting over


def test_samples_lost_to_corrupt_shards_are_in_the_step_records(tmp_path, tiny_llama_dir):
    """data.on_corrupt=skip counted lost samples only in warnings and the checkpoint: each logged step says how many
    (summed over the ranks, in the tokens' collective); a run that does not skip has no such field."""
    from types import SimpleNamespace

    from megadistil.engine.metrics import OnPolicyStats
    from megadistil.engine.trainer import Trainer

    for data, expected in ((SimpleNamespace(on_corrupt="skip", skipped=3), {"data_skipped": 3}),
                           (SimpleNamespace(on_corrupt="fail", skipped=0), {}), (object(), {})):
        trainer = Trainer(load_config(None, [f"model.student={tiny_llama_dir}", "data.text=[x]"]), "unused.json")
        records = []
        trainer.data, trainer.device, trainer.lr, trainer.onpolicy_on = data, torch.device("cpu"), 1e-3, False
        trainer.logger, trainer._peak_memory = SimpleNamespace(log=records.append), dict
        trainer._log_step(1, {"loss": torch.tensor(0.5)}, torch.tensor(64), 0.0, OnPolicyStats())
        assert {k: v for k, v in records[0].items() if k == "data_skipped"} == expected
        assert records[0]["tokens"] == 64 and records[0]["loss"] == 0.5


def test_a_data_position_the_run_cannot_resume_is_refused_before_any_weight_loads(tmp_path, tiny_llama_dir):
    """Another seed, micro-batch size or text (the reader refuses the saved position), or another world size (no
    state file for this rank): refused at set-up, naming the rank, not after the model and optimizer loaded."""
    from types import SimpleNamespace

    from megadistil import rundir
    from megadistil.config import ConfigError
    from megadistil.engine.trainer import Trainer

    tag = tmp_path / "run" / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    (tag / rundir.rank_state_file(0)).write_text(json.dumps({"data": {"seed": 1}, "rng": {}}))

    def check(rank, seed):
        def load_state_dict(state):
            if state["seed"] != seed:
                raise ValueError(f"data state has seed={state['seed']} but this reader has {seed}")

        trainer = Trainer(load_config(None, [f"model.student={tiny_llama_dir}", "data.text=[x]",
                                             f"train.output_dir={tmp_path / 'run'}"]), "unused.json")
        trainer.resume_tag, trainer.device = tag.name, torch.device("cpu")
        trainer.dist, trainer.data = SimpleNamespace(rank=rank), SimpleNamespace(load_state_dict=load_state_dict)
        trainer._check_data_resumable()

    check(0, 1)  # the run it continues
    with pytest.raises(ConfigError, match=r"step00000004: rank 0: data state has seed=1 but this reader has 7"):
        check(0, 7)
    with pytest.raises(ConfigError, match=r"rank 1: it has no rank.*: it was saved by a different world size"):
        check(1, 1)


def _step_weights(counts: list[int], nan_at: tuple[int, ...] = (), accum: int = 4) -> tuple[list[float], list[int]]:
    """Trainer._optimizer_step on one rank with a stand-in engine and forward (every token's loss 1): each backward's
    loss over grad_accum (DeepSpeed's mean over micro-batches), and how many batches were on the device at each
    forward."""
    from types import SimpleNamespace

    from megadistil.distill.losses import IGNORE_INDEX
    from megadistil.engine.trainer import Trainer, TrainState

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = SimpleNamespace(train=SimpleNamespace(grad_accum=accum, max_nan_steps=5))
    trainer.state, trainer.device = TrainState(), torch.device("cpu")
    trainer.dist = SimpleNamespace(world_size=1, rank=0)
    trainer.inputs, trainer._print = SimpleNamespace(cross_tokenizer_targets=False), lambda message: None
    backwards, moved, on_device = [], [], []
    trainer.engine = SimpleNamespace(backward=lambda loss: backwards.append(float(loss) / accum), step=lambda: None,
                                     get_global_grad_norm=lambda: None)
    trainer._to_device = lambda batch: moved.append(batch) or batch

    def forward(batch, loss_cfg):
        on_device.append(len(moved))
        n = int((batch["labels"] != IGNORE_INDEX).sum())
        loss = torch.tensor(float("nan") if len(on_device) - 1 in nan_at else 1.0)
        return {"loss": loss, "ce": loss, "tokens": torch.tensor(n), "kd_tokens": torch.tensor(n)}

    trainer._forward = forward
    batches = [{"input_ids": torch.ones(1, 8, dtype=torch.long),
                "labels": torch.tensor([[1] * n + [IGNORE_INDEX] * (8 - n)])} for n in counts]
    trainer._optimizer_step(iter(batches), SimpleNamespace(loss=None, onpolicy=SimpleNamespace(fraction=0.0)))
    return backwards, on_device


def test_micro_batch_weights_are_token_shares_and_a_skipped_ones_replacement_takes_its_share():
    """The step's gradient is the token mean: weights in proportion to the micro-batches' tokens, summing to 1 after
    DeepSpeed's 1/grad_accum; a non-finite micro-batch's replacement takes the skipped one's share (weighed by its own
    tokens, an 8-token micro-batch replaced by a 1-token one gave the step's gradient half its size). A batch goes to
    the device at its own forward, not the step's all at once (shard targets: grad_accum times the planned memory)."""
    weights, on_device = _step_weights([8, 2, 2, 2])
    assert weights == pytest.approx([8 / 14, 2 / 14, 2 / 14, 2 / 14]) and on_device == [1, 2, 3, 4]
    assert _step_weights([8, 8, 8, 8])[0] == [0.25] * 4
    for counts in ([8, 2, 2, 2, 1], [2, 8, 8, 8, 2]):
        weights, _ = _step_weights(counts, nan_at=(0,))
        assert len(weights) == 4 and sum(weights) == pytest.approx(1.0)  # the skipped one has no backward
        assert weights[-1] == pytest.approx(counts[0] / sum(counts[:4]))
