import json

from fullscale.checkpoint import CheckpointManager, commit_directory, staging_dir, verify_directory


def _fake_checkpoint(manager, step, *, best_step=None, eval_loss=1.0):
    """A checkpoint with every file a resume reads, each loadable (small real tensors)."""
    import torch
    from safetensors.torch import save_file

    def write(d):
        save_file({"lora_A": torch.full((2, step), float(step))}, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text("{}")
        for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
            torch.save({"step": step}, d / name)
        state = {"early_stopping": {"best_step": best_step}, "last_eval_loss": eval_loss,
                 "train_state": {"step": step}, "config": {}}
        (d / "trainer_state.json").write_text(json.dumps(state))

    return manager.save(step, write, manifest={})


def test_a_committed_checkpoint_verifies_and_a_changed_file_does_not(tmp_path):
    m = CheckpointManager(tmp_path)
    path = _fake_checkpoint(m, 5)
    assert verify_directory(path) is None
    size = (path / "adapter_model.safetensors").stat().st_size
    (path / "adapter_model.safetensors").write_bytes(b"y" * size)   # same size, other content
    assert "SHA-256" in verify_directory(path)
    (path / "adapter_model.safetensors").write_bytes(b"y")
    assert "bytes" in verify_directory(path)


def test_a_directory_without_manifest_is_not_a_checkpoint(tmp_path):
    m = CheckpointManager(tmp_path)
    _fake_checkpoint(m, 2)
    half = tmp_path / "checkpoint-4"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"partial")
    assert m.latest().step == 2
    assert [i.step for i in m.valid()] == [2]


def test_rotation_keeps_the_best_checkpoint(tmp_path):
    m = CheckpointManager(tmp_path, save_total_limit=2)
    for step in (10, 20, 30, 40):
        _fake_checkpoint(m, step, best_step=10)
        m.rotate(best_step=10)
    assert [i.step for i in m.valid()] == [10, 30, 40]
    assert m.best().step == 10


def test_rotation_without_a_best_keeps_the_newest(tmp_path):
    m = CheckpointManager(tmp_path, save_total_limit=1)
    for step in (1, 2, 3):
        _fake_checkpoint(m, step)
        m.rotate(best_step=None)
    assert [i.step for i in m.valid()] == [3]


def test_newest_verified_sets_a_corrupt_checkpoint_aside(tmp_path):
    m = CheckpointManager(tmp_path)
    _fake_checkpoint(m, 1)
    bad = _fake_checkpoint(m, 2)
    (bad / "adapter_model.safetensors").write_bytes(b"")
    said = []
    info = m.newest_verified(say=said.append)
    assert info.step == 1
    assert "checkpoint-2" in said[0] and "set aside" in said[0]
    assert any(p.name.startswith("checkpoint-2.invalid-") for p in tmp_path.iterdir())


def test_cleanup_removes_staging_leftovers(tmp_path):
    m = CheckpointManager(tmp_path)
    s = staging_dir(tmp_path, "checkpoint-9")
    (s / "adapter_model.safetensors").write_bytes(b"half")
    notes = m.cleanup()
    assert notes and not s.exists()


def test_replacing_a_committed_directory_keeps_one_complete_copy(tmp_path):
    final = tmp_path / "best_model"
    for content in (b"old", b"new"):
        s = staging_dir(tmp_path, "best_model")
        (s / "w.bin").write_bytes(content)
        commit_directory(s, final)
    assert (final / "w.bin").read_bytes() == b"new" and verify_directory(final) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]
