"""megadistil.rundir (the run directory and checkpoint layout) and megadistil.utils, without DeepSpeed: ΔW read back
from partitions of any world size (and refused in another format), the checkpoint finder's errors, the atomic writer,
the dtype table, and the package boundaries (data/ and export/ import no engine module)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megadistil import rundir
from megadistil.rundir import CheckpointError
from megadistil.utils import dtype_name, from_safetensors_code, safetensors_code, torch_dtype, write_atomic

REPO = Path(__file__).resolve().parents[1]


def _save_partitions(directory: Path, tensors: dict[str, torch.Tensor], world: int) -> None:
    """What the engine writes under ZeRO-3: each rank's flat, equal-sized (padded) share of every ΔW."""
    flat = {}
    for name, t in tensors.items():
        per_rank = -(-t.numel() // world)
        flat[name] = torch.cat([t.reshape(-1), t.new_zeros(per_rank * world - t.numel())]).view(world, per_rank)
    for r in range(world):
        save_file({n: f[r].clone() for n, f in flat.items()}, str(directory / rundir.delta_file(r)))
    rundir.write_delta_index(directory, world, {n: (list(t.shape), t.dtype, flat[n].shape[1])
                                                for n, t in tensors.items()})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_delta_round_trips_through_partitions_of_any_world_size(tmp_path: Path, world: int) -> None:
    g = torch.Generator().manual_seed(world)
    tensors = {"student.a.delta": torch.randn(5, 7, generator=g), "student.b.delta": torch.randn(3, 2, generator=g)}
    _save_partitions(tmp_path, tensors, world)
    index = rundir.read_delta_index(tmp_path)
    assert rundir.delta_dtype(index) == torch.float32
    for name, t in tensors.items():
        assert torch.equal(rundir.read_delta(tmp_path, name, index), t)
        assert torch.equal(rundir.read_delta(tmp_path, name), t)


def test_delta_errors_name_the_missing_file_or_tensor(tmp_path: Path) -> None:
    assert rundir.read_delta_index(tmp_path) is None
    _save_partitions(tmp_path, {"student.a.delta": torch.ones(4, 4)}, 2)
    with pytest.raises(CheckpointError, match="no ΔW 'student.x.delta'"):
        rundir.read_delta(tmp_path, "student.x.delta")
    (tmp_path / rundir.delta_file(1)).unlink()
    with pytest.raises(CheckpointError, match=r"names world size 2 but delta\.rank1\.safetensors is missing"):
        rundir.read_delta(tmp_path, "student.a.delta")


def test_resuming_a_delta_of_another_format_names_the_config_key(tmp_path: Path) -> None:
    """A ΔW saved in the model dtype (relora.delta_format=dtype) is refused by a run that stores int8 codes, before
    any of it is copied in, naming the key; the same format round-trips."""
    from torch import nn

    from megadistil.bitnet import to_bitnet
    from megadistil.engine.checkpoint import load_deltas, save_deltas

    def model(delta_format: str) -> nn.Module:
        m = nn.Sequential(nn.Linear(8, 16, bias=False))
        to_bitnet(m, lora_rank=2, exclude=(), delta_format=delta_format)
        return m

    saved = model("dtype")
    with torch.no_grad():
        saved[0].delta.normal_()
    save_deltas(saved, tmp_path, rank=0, world_size=1)
    int8 = model("int8")
    with pytest.raises(CheckpointError, match=r"ΔW '0\.delta' was saved as float32, this run stores it as int8 "
                                              r"\(config key 'relora\.delta_format'"):
        load_deltas(int8, tmp_path, rank=0, world_size=1)
    assert torch.count_nonzero(int8[0].delta) == 0
    same = model("dtype")
    load_deltas(same, tmp_path, rank=0, world_size=1)
    assert torch.equal(same[0].delta, saved[0].delta)


def test_find_checkpoint_follows_latest_and_refuses_incomplete_ones(tmp_path: Path) -> None:
    root = rundir.checkpoints_dir(tmp_path)
    ckpt = root / rundir.tag_for(12)
    ckpt.mkdir(parents=True)
    assert ckpt.name == "step00000012" and rundir.latest_tag(root) is None
    with pytest.raises(CheckpointError, match="is not a megadistil checkpoint"):
        rundir.find_checkpoint(tmp_path)
    rundir.write_latest(root, ckpt.name)
    with pytest.raises(RuntimeError, match="incomplete"):
        rundir.latest_tag(root)
    with pytest.raises(CheckpointError, match="no meta.json"):
        rundir.find_checkpoint(tmp_path)
    (ckpt / rundir.META).write_text(json.dumps({"step": 12}))
    (ckpt / rundir.CONFIG).write_text("{}")
    with pytest.raises(CheckpointError, match="no DeepSpeed ZeRO files"):
        rundir.find_checkpoint(root)
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    for path in (tmp_path, root, ckpt):
        assert rundir.find_checkpoint(path) == ckpt and rundir.is_checkpoint(path)
    assert rundir.latest_tag(root) == ckpt.name and rundir.read_meta(ckpt) == {"step": 12}
    assert rundir.run_dir_of(root) is None  # no config.yaml beside checkpoints/: copied out of its run dir


def test_write_atomic_replaces_whole_files_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_atomic(path, "old")
    write_atomic(path, b"new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_fsync_tree_flushes_every_file_before_its_directory(tmp_path: Path, monkeypatch) -> None:
    from megadistil import utils

    (tmp_path / "tag" / "sub").mkdir(parents=True)
    files = [tmp_path / "tag" / "a.pt", tmp_path / "tag" / "sub" / "b.pt"]
    for f in files:
        f.write_bytes(b"x")
    synced: list[Path] = []
    real = utils.fsync_path
    monkeypatch.setattr(utils, "fsync_path", lambda p: (synced.append(Path(p)), real(p)))
    utils.fsync_tree(tmp_path / "tag")
    assert sorted(synced) == sorted([*files, tmp_path / "tag", tmp_path / "tag" / "sub"])
    for f in files:  # a directory's entries are flushed after the files in it
        assert synced.index(f) < synced.index(f.parent)
    assert synced.index(tmp_path / "tag" / "sub") < synced.index(tmp_path / "tag")
    synced.clear()
    write_atomic(tmp_path / "latest", "tag")  # the rename itself is made durable: its directory is flushed
    assert synced == [tmp_path]


def test_one_dtype_table_for_every_name() -> None:
    for short, long, code in (("bf16", "bfloat16", "BF16"), ("fp16", "float16", "F16"), ("fp32", "float32", "F32")):
        dt = torch_dtype(short)
        assert dt is torch_dtype(long) and dtype_name(dt) == long and safetensors_code(dt) == code
        assert from_safetensors_code(code) is dt
    assert from_safetensors_code("I64") is torch.int64 and safetensors_code(torch.uint8) == "U8"
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        torch_dtype("fp8")


def test_data_and_export_import_no_engine_module() -> None:
    code = ("import sys, megadistil.data.precompute, megadistil.export, megadistil.eval.models; "
            "print(sorted(m for m in sys.modules if m.startswith('megadistil.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         timeout=300)
    assert out.stdout.strip() == "[]"


def test_a_save_replaces_an_earlier_checkpoint_of_its_tag_whole(tmp_path: Path) -> None:
    """A run in an output dir another run used (train.resume=never) saves a tag the old one saved too: the new
    checkpoint replaces the old one whole. It was written into the old dir, so the old run's merged ΔW (delta.json)
    survived beside the new files and an export merged it into the new student. A staging dir a crashed save left
    behind is cleared; `latest` names the complete checkpoint."""
    from torch import nn

    from megadistil.engine import checkpoint

    class Engine:
        module = nn.Linear(2, 2)

        def save_checkpoint(self, root, tag, **kwargs):
            (Path(root) / tag).mkdir(parents=True, exist_ok=True)
            (Path(root) / tag / "mp_rank_00_model_states.pt").write_text(f"new, written as {tag}")

    root = tmp_path / "checkpoints"
    old = root / "step00000005"
    old.mkdir(parents=True)
    (old / rundir.DELTA_INDEX).write_text("{}")
    (old / "mp_rank_00_model_states.pt").write_text("old")
    rundir.write_latest(root, old.name)
    (root / "step00000005.partial").mkdir()
    (root / "step00000005.partial" / "left.over").write_text("a crashed save")
    tag = checkpoint.save(Engine(), root, 5, rank_state={"step": 5}, meta={}, config_yaml="a: 1\n", sync_files=True)
    assert tag == old.name and rundir.latest_tag(root) == tag
    assert sorted(p.name for p in old.iterdir()) == sorted([rundir.CONFIG, rundir.META, "mp_rank_00_model_states.pt",
                                                            rundir.rank_state_file(0)])
    assert (old / "mp_rank_00_model_states.pt").read_text() == "new, written as step00000005.partial"
    assert rundir.read_meta(old)["step"] == 5
    assert sorted(p.name for p in root.iterdir()) == [rundir.LATEST, tag]


class _TinyEngine:
    """What checkpoint.save asks of DeepSpeed's engine: a module (no ΔW) and save_checkpoint into <root>/<tag>."""

    def __init__(self) -> None:
        from torch import nn

        self.module = nn.Linear(2, 2)

    def save_checkpoint(self, root, tag, **kwargs):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            (Path(root) / tag / name).write_text(tag)


def _save_steps(root: Path, steps: list[int], keep_last: int) -> None:
    from megadistil.engine import checkpoint

    for step in steps:
        assert checkpoint.save(_TinyEngine(), root, step, rank_state={}, meta={}, config_yaml="a: 1\n",
                               sync_files=False, keep_last=keep_last) == rundir.tag_for(step)


def test_keep_last_keeps_the_newest_tags_and_latest_names_the_newest(tmp_path: Path) -> None:
    """train.keep_last=2 after 4 saves: the 2 newest tags stay, `latest` names the newest; nothing that is not a
    name the checkpoint module writes is touched."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "notes").mkdir()  # the user's: no tag name
    (root / "step5").mkdir()  # not rundir.tag_for's spelling
    _save_steps(root, [2, 4, 6, 8], keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == sorted([rundir.LATEST, "notes", "step5", "step00000006",
                                                             "step00000008"])
    assert rundir.latest_tag(root) == "step00000008"
    assert rundir.find_checkpoint(tmp_path) == root / "step00000008"
    assert rundir.read_meta(root / "step00000006")["step"] == 6


def test_keep_last_0_keeps_every_tag(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _save_steps(root, [2, 4, 6, 8], keep_last=0)
    assert sorted(p.name for p in root.iterdir()) == [rundir.LATEST, *(rundir.tag_for(s) for s in (2, 4, 6, 8))]
    assert rundir.latest_tag(root) == "step00000008"


def test_a_save_sweeps_the_staging_dirs_crashed_saves_and_prunes_left(tmp_path: Path) -> None:
    """`.partial` (a save that crashed while writing), `.replaced` (one that crashed replacing a tag) and `.pruned`
    (a deletion cut short) dirs of earlier saves are swept by the next save, whatever keep_last."""
    root = tmp_path / "checkpoints"
    _save_steps(root, [2], keep_last=0)
    for name in ("step00000003.partial", "step00000002.replaced", "step00000001.pruned"):
        (root / name / "sub").mkdir(parents=True)
        (root / name / "sub" / "x.pt").write_text("left over")
    _save_steps(root, [4], keep_last=0)
    assert sorted(p.name for p in root.iterdir()) == [rundir.LATEST, "step00000002", "step00000004"]


def test_prune_tags_never_deletes_the_tag_latest_names_nor_a_later_runs_tags(tmp_path: Path) -> None:
    """Pruning counts the tags up to the one `latest` names (always kept). Tags of later steps were left by an
    earlier run in this output dir (train.resume=never withdrew its `latest`): a save of their step replaces them,
    pruning leaves them. A pruned tag is renamed away from its tag name before it is deleted."""
    from megadistil.engine.checkpoint import PRUNED, prune_tags

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 9, 10):
        (root / rundir.tag_for(step)).mkdir(parents=True)
        (root / rundir.tag_for(step) / rundir.META).write_text(json.dumps({"step": step}))
    rundir.write_latest(root, rundir.tag_for(3))
    renamed = []
    real_rename = Path.rename

    def spying_rename(self, target):
        renamed.append((self.name, Path(target).name))
        return real_rename(self, target)

    import unittest.mock

    with unittest.mock.patch.object(Path, "rename", spying_rename):
        assert prune_tags(root, 1) == ["step00000001", "step00000002"]
    assert renamed == [("step00000001", "step00000001" + PRUNED), ("step00000002", "step00000002" + PRUNED)]
    assert sorted(p.name for p in root.iterdir()) == [rundir.LATEST, "step00000003", "step00000009", "step00000010"]
    assert rundir.latest_tag(root) == "step00000003"
    assert prune_tags(root, 5) == [] and prune_tags(root, 0) == []
    (root / rundir.LATEST).unlink()
    assert prune_tags(root, 1) == []  # no `latest`: nothing to anchor on, no tag deleted


@pytest.mark.parametrize("value", [-1, -3])
def test_train_keep_last_below_0_is_refused_naming_the_key(value: int) -> None:
    from megadistil.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"config key 'train.keep_last': must be >= 0 .*got {value}"):
        load_config(None, ["model.student=/m", "data.text=[a.txt]", f"train.keep_last={value}"])
    assert load_config(None, ["model.student=/m", "data.text=[a.txt]", "train.keep_last=2"]).train.keep_last == 2
