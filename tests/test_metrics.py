import json

import pytest
import torch

from megadistil.config import LogConfig, WandbConfig
from megadistil.engine.metrics import MetricsLogger, PeakMemory


def test_rank0_writes_jsonl_stdout_and_offline_wandb(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LogConfig(wandb=WandbConfig(enabled=True, mode="offline", project="megadistil-test"))
    logger = MetricsLogger(tmp_path, cfg, rank=0, run_config={"train": {"max_steps": 2}})
    logger.log({"step": 1, "loss": 0.5, "lr": 1e-3})
    logger.log({"step": 2, "loss": 0.25, "lr": 1e-3})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == [0.5, 0.25]
    assert "step 2 | loss 0.25 | lr 0.001" in capsys.readouterr().out
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_a_resumed_run_continues_its_wandb_run_and_a_new_one_starts_another(tmp_path, monkeypatch):
    """The wandb run id is kept in the run dir: a resume (from a checkpoint) logs into the same wandb run (every
    resume made a new one), a run started afresh in the same dir into a new one."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LogConfig(wandb=WandbConfig(enabled=True, mode="offline", project="megadistil-test"))
    ids = []
    for resumed in (False, True, False):
        logger = MetricsLogger(tmp_path, cfg, rank=0, run_config={}, resumed=resumed)
        ids.append(logger.wandb.id)
        logger.close()
    assert ids[0] == ids[1] != ids[2]
    assert (tmp_path / "wandb_run_id").read_text().strip() == ids[2]


def test_other_ranks_log_nothing(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, LogConfig(), rank=1, run_config={})
    logger.log({"step": 1, "loss": 0.5})
    assert not (tmp_path / "metrics.jsonl").exists() and capsys.readouterr().out == ""


def test_wandb_gets_the_resolved_run_config():
    """The run config after defaults <- yaml <- dotlist (enums as their strings), plus what it resolved to."""
    from pathlib import Path
    from types import SimpleNamespace

    from megadistil.config import load_config
    from megadistil.engine.trainer import Trainer

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/tiny.yaml", ["model.student=/m", "train.max_steps=7", "loss.kind=jsd"])
    trainer = Trainer(cfg, "unused.json")
    trainer.ds_config, trainer.placement = {"train_batch_size": 8}, SimpleNamespace(as_dict=lambda: {"kernel": "fp32"})
    got = trainer._wandb_config()
    assert got["train"]["max_steps"] == 7 and got["loss"]["kind"] == "jsd" and got["teacher"]["kind"] == "shared"
    assert type(got["loss"]["kind"]) is str and got["ds_config"] == {"train_batch_size": 8}
    assert got["placement"] == {"kernel": "fp32"} and got["model"]["student"] == "/m"


def test_steps_peak_leaves_out_the_load_peak_and_the_lifetime_peak_keeps_it():
    """200 MB touched and freed while "loading", 50 MB during the "steps": the steps' peak sees only the second, the
    lifetime peak still the first (the kernel's high-water mark was reset in between). The process may have peaked
    higher before this test (other tests, in the same pytest worker): the first reset makes the mark its RSS now."""
    peak = PeakMemory(torch.device("cpu"))
    earlier = peak.lifetime_mb()
    peak.start_steps()
    base = peak.steps_mb()
    load = bytearray(200 * 2**20)  # zero-filled: every page is touched
    del load  # a large block goes back to the kernel at once (glibc mmaps it)
    assert peak.steps_mb() >= base + 200 - 5
    peak.start_steps()
    steps = bytearray(50 * 2**20)
    assert base + len(steps) / 2**20 - 5 <= peak.steps_mb() < base + 100  # the 200 MB transient is not in it
    assert peak.lifetime_mb() >= max(earlier, base + 200 - 5)  # neither reset lost an earlier peak


def test_onpolicy_figures_are_every_ranks():
    """The logged on-policy share and generation speed come from the counts summed over the ranks (the step's tokens
    too): rank 0's counts times the world size stood for every rank's. The KD is this rank's, like the loss parts."""
    import torch

    from megadistil.engine.metrics import OnPolicyStats

    ranks = []
    for loss_tokens, kd, new_tokens in ((10, 0.5, 12), (30, 0.25, 40)):
        stats = OnPolicyStats()
        stats.generated(new_tokens, 2.0)
        stats.trained(torch.tensor(loss_tokens), torch.tensor(kd))
        ranks.append(stats)
    summed = sum(s.as_tensor(torch.device("cpu")) for s in ranks)
    record = ranks[0].record(80.0, summed)
    assert record == {"onpolicy_share": 0.5, "onpolicy_kd": 0.5, "gen_time_s": 2.0, "gen_tokens_per_s": 26.0}
    assert ranks[0].record(20.0) == {"onpolicy_share": 0.5, "onpolicy_kd": 0.5, "gen_time_s": 2.0,
                                     "gen_tokens_per_s": 6.0}
    both = OnPolicyStats()  # two micro-batches of 10 and 30 tokens: the KD is their mean over the 40 tokens
    both.generated(52, 4.0)
    for loss_tokens, kd in ((10, 0.5), (30, 0.25)):
        both.trained(torch.tensor(loss_tokens), torch.tensor(kd))
    assert both.record(40.0)["onpolicy_kd"] == pytest.approx((10 * 0.5 + 30 * 0.25) / 40)
