"""trainer/checkpoint/manager.py: round trip, RNG resume, pruning, `latest`, corruption fallback,
crash safety at every commit step, same-step re-save. Fast CPU tier (~2 s)."""
import json
import os
import random

import numpy as np
import pytest
import torch

import loom.trainer.checkpoint.manager as checkpoint
from loom.trainer.checkpoint.manager import CheckpointError, CheckpointManager, rng_state, set_rng_state


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(16, 8, generator=g)
    return {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: shares storage
        "block.0.w_T": torch.randn(8, 4, generator=g).t(),  # non-contiguous
        "block.0.bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "block.0.idx": torch.arange(7),
        "scalar": torch.tensor(3.5),
    }


def _state(step: int) -> dict:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"optim": opt.state_dict(), "data": {"epoch": np.int64(2), "offset": step * 7}, "rng": rng_state()}


def _latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def _leftovers(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-")))


def _assert_state_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_state_equal(x, y)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    else:
        assert a == b and type(a) is type(b)


def test_round_trip(tmp_path):
    manager = CheckpointManager(tmp_path)
    tensors, state = _tensors(), _state(10)
    path = manager.save(10, tensors, state, meta={"loss": 2.5, "config": {"seed": 0}})
    assert path == tmp_path / "checkpoints" / "step-00000010"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "meta.json", "model.safetensors", "trainer_state.pt"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["step"] == 10
    assert set(manifest["files"]) == {"meta.json", "model.safetensors", "trainer_state.pt"}

    loaded, loaded_state, meta = manager.load(path)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    _assert_state_equal(state, loaded_state)
    assert meta == {"loss": 2.5, "config": {"seed": 0}, "step": 10}


def test_rng_round_trip_reproduces_draws(tmp_path):
    manager = CheckpointManager(tmp_path)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    manager.save(1, {}, {"rng": rng_state()})
    expected = (torch.rand(4), random.random(), np.random.rand(3))

    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    _, state, _ = manager.load(manager.latest_valid())
    set_rng_state(state["rng"])
    got = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(got[0], expected[0])
    assert got[1] == expected[1]
    assert np.array_equal(got[2], expected[2])


def test_keep_last_prunes_oldest_and_updates_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        manager.save(step, _tensors(step), {"step": step})
        assert _latest(tmp_path) == f"step-{step:08d}"
    assert [s for s, _ in manager.list()] == [30, 40]
    assert manager.latest_valid() == tmp_path / "checkpoints" / "step-00000040"
    assert _leftovers(tmp_path) == []


def test_keep_last_never_deletes_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        manager.save(step, {}, {})
    manager.save(5, {}, {})  # e.g. a run restarted from an older checkpoint
    assert _latest(tmp_path) == "step-00000005"
    assert [s for s, _ in manager.list()] == [5, 20, 30]


@pytest.mark.parametrize("keep_last", [0, -1])
def test_keep_last_non_positive_keeps_all(tmp_path, keep_last):
    manager = CheckpointManager(tmp_path, keep_last=keep_last)
    for step in range(5):
        manager.save(step, {}, {})
    assert [s for s, _ in manager.list()] == [0, 1, 2, 3, 4]


def test_list_ignores_other_entries(tmp_path):
    manager = CheckpointManager(tmp_path)
    assert manager.list() == [] and manager.latest_valid() is None
    manager.save(3, {}, {})
    (tmp_path / "checkpoints" / "step-notes").mkdir()
    (tmp_path / "checkpoints" / "step-00000099.txt").write_text("x")
    assert manager.list() == [(3, tmp_path / "checkpoints" / "step-00000003")]


def test_corrupt_byte_falls_back_with_one_warning(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(20, _tensors(20), {"step": 20})
    bad = manager.save(40, _tensors(40), {"step": 40})
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    lines = []
    assert manager.latest_valid(log=lines.append) == tmp_path / "checkpoints" / "step-00000020"
    assert lines == ["warning: skipping corrupt checkpoint step-00000040 "
                     "(model.safetensors checksum mismatch); using step-00000020"]
    _, state, _ = manager.load(tmp_path / "checkpoints" / "step-00000020")
    assert state == {"step": 20}

    with pytest.raises(CheckpointError) as err:
        manager.load(bad)
    assert str(err.value) == f"checkpoint {bad} is corrupt: model.safetensors checksum mismatch"


@pytest.mark.parametrize("damage, problem", [
    ("truncate_manifest", "unreadable manifest"),
    ("delete_manifest", "missing manifest"),
    ("delete_state", "missing file trainer_state.pt"),
    ("truncate_weights", "model.safetensors size mismatch"),
])
def test_damaged_checkpoint_is_rejected(tmp_path, damage, problem):
    manager = CheckpointManager(tmp_path)
    manager.save(1, _tensors(1), {"step": 1})
    path = manager.save(2, _tensors(2), {"step": 2})
    if damage == "truncate_manifest":
        text = (path / "manifest.json").read_text()
        (path / "manifest.json").write_text(text[: len(text) // 2])
    elif damage == "delete_manifest":
        (path / "manifest.json").unlink()
    elif damage == "delete_state":
        (path / "trainer_state.pt").unlink()
    else:
        with open(path / "model.safetensors", "r+b") as f:
            f.truncate(100)

    with pytest.raises(CheckpointError, match=f"^checkpoint .*step-00000002 is corrupt: {problem}"):
        manager.verify(path)
    lines = []
    assert manager.latest_valid(log=lines.append).name == "step-00000001"
    assert len(lines) == 1 and problem in lines[0] and lines[0].endswith("using step-00000001")


def test_no_valid_checkpoint_returns_none(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, {}, {})
    (path / "manifest.json").unlink()
    lines = []
    assert manager.latest_valid(log=lines.append) is None
    assert lines == ["warning: skipping corrupt checkpoint step-00000001 (missing manifest); "
                     "no valid checkpoint left"]


def _fail_torch_save(monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("simulated crash")
    monkeypatch.setattr(torch, "save", boom)


def _fail_manifest_write(monkeypatch):
    write_text = checkpoint._write_text

    def boom(path, text):
        if path.name == "manifest.json":
            write_text(path, text[:10])  # a torn write, then the crash
            raise OSError("simulated crash")
        write_text(path, text)
    monkeypatch.setattr(checkpoint, "_write_text", boom)


def _fail_rename(monkeypatch):
    def boom(src, dst):
        raise OSError("simulated crash")
    monkeypatch.setattr(os, "rename", boom)


def _fail_latest_replace(monkeypatch):
    def boom(src, dst):
        raise OSError("simulated crash")
    monkeypatch.setattr(os, "replace", boom)


@pytest.mark.parametrize("crash", [_fail_torch_save, _fail_manifest_write, _fail_rename, _fail_latest_replace])
def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch, crash):
    manager = CheckpointManager(tmp_path)
    manager.save(10, _tensors(10), {"step": 10})
    with monkeypatch.context() as m:
        crash(m)
        with pytest.raises(CheckpointError, match=r"^could not save checkpoint step-00000020: .*simulated crash"):
            manager.save(20, _tensors(20), {"step": 20})

    assert _latest(tmp_path) == "step-00000010"
    # a failed save removes its own temporary folder (a full disk gets its space back)
    assert not any(name.startswith(".tmp-step") for name in _leftovers(tmp_path))
    lines = []
    path = CheckpointManager(tmp_path).latest_valid(log=lines.append)  # a new manager cleans leftovers
    assert path.name == "step-00000010" and lines == []
    assert _leftovers(tmp_path) == []
    _, state, _ = manager.load(path)
    assert state == {"step": 10}

    manager.save(30, _tensors(30), {"step": 30})
    assert _latest(tmp_path) == "step-00000030" and _leftovers(tmp_path) == []


def test_later_save_cleans_stale_tmp(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    manager.save(10, {}, {})
    stale = tmp_path / "checkpoints" / f".tmp-step-00000020-{os.getpid()}"  # what a kill -9 mid-save leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"torn")
    assert _leftovers(tmp_path) == [stale.name]
    manager.save(20, {}, {})
    assert _leftovers(tmp_path) == [] and [s for s, _ in manager.list()] == [10, 20]


def test_save_same_step_twice_replaces(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(10, _tensors(1), {"v": 1})
    path = manager.save(10, _tensors(2), {"v": 2})
    tensors, state, _ = manager.load(path)
    assert state == {"v": 2} and torch.equal(tensors["embed.weight"], _tensors(2)["embed.weight"])
    assert manager.list() == [(10, path)] and _leftovers(tmp_path) == []


def test_failed_same_step_resave_keeps_old(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    manager.save(10, {}, {"v": 1})
    rename = os.rename

    def boom(src, dst):
        if os.path.basename(src).startswith(".tmp-step"):
            raise OSError("simulated crash")
        rename(src, dst)
    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(CheckpointError):
        manager.save(10, {}, {"v": 2})
    monkeypatch.undo()
    assert manager.load(manager.latest_valid())[1] == {"v": 1}


def test_crash_during_same_step_swap_is_restored(tmp_path):
    """Process killed between moving the old step-10 aside and renaming the new one in."""
    manager = CheckpointManager(tmp_path)
    old = manager.save(10, {}, {"v": 1})
    root = tmp_path / "checkpoints"
    os.rename(old, root / f".old-step-00000010-{os.getpid()}")
    (root / f".tmp-step-00000010-{os.getpid()}").mkdir()

    manager = CheckpointManager(tmp_path)
    assert _leftovers(tmp_path) == []
    assert manager.load(manager.latest_valid())[1] == {"v": 1}


def test_live_writers_tmp_is_left_alone(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {}, {})
    live = tmp_path / "checkpoints" / f".tmp-step-00000002-{os.getppid()}"
    live.mkdir()
    CheckpointManager(tmp_path)
    assert live.is_dir()


def test_bad_meta_fails_before_touching_disk(tmp_path):
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="meta is not JSON-serialisable"):
        manager.save(1, {}, {}, meta={"loss": torch.tensor(1.0)})
    assert not (tmp_path / "checkpoints").exists()
