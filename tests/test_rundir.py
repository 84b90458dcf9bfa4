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
