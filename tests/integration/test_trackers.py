"""report_to wandb and mlflow, offline (WANDB_MODE=offline, an MLflow file store): the scalars
TensorBoard gets, at the same steps, in one tracker run continued across a resume (stopped by
SIGTERM at step 9, resumed from checkpoint-8: nothing logged twice, nothing missing)."""

import glob
import json
import math
import struct
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def wandb_history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in every offline run file of `run_dir` (W&B's record log: 32 KiB
    blocks of length-prefixed chunks after a 7-byte header; each record a protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, pending = Path(path).read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0 and length == 0:
                pos += left
                continue
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pending)
                if record.WhichOneof("record_type") == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    if key in items:
                        rows.append((items["_step"], items[key]))
    return rows


@pytest.mark.slow
def test_wandb_and_mlflow_get_tensorboards_scalars_continuous_across_a_resume(tmp_path, tiny_model_dir,
                                                                            reverse_data, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data), output_dir=str(run), max_steps=14,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=2, eval_steps=4, save_steps=4,
        gradient_checkpointing=False, eval_split=0.1, eval_samples=1, report_to=["tensorboard", "wandb", "mlflow"])))
    store = f"file:{tmp_path / 'mlruns'}"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": store,
           "MLFLOW_ALLOW_FILE_STORE": "true"}
    assert run_cli("train", cfg, fault="sigterm@9", env_extra=env).returncode == 75
    first = json.loads((run / "trackers.json").read_text())
    proc = run_cli("train", cfg, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "trackers.json").read_text()) == first   # the same tracker runs, continued

    tb = EventAccumulator(str(run / "runs")).Reload()
    assert "train_start/total_steps" not in tb.Tags()["scalars"] and "eval/eval_loss" not in tb.Tags()["scalars"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(store)
    for key in ("train/loss", "train/learning_rate", "eval/loss"):
        expected = [(e.step, e.value) for e in tb.Scalars(key)]
        assert [x for x, _ in expected] == (list(range(2, 15, 2)) if key.startswith("train") else [0, 4, 8, 12, 14])
        got_mlflow = sorted((m.step, m.value) for m in client.get_metric_history(first["mlflow"], key))
        got_wandb = sorted(wandb_history(run, key))
        for got in (got_mlflow, got_wandb):
            assert [s for s, _ in got] == [s for s, _ in expected], (key, got)   # each step once
            assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(got, expected)), key


@pytest.mark.slow
def test_after_a_rollback_the_trackers_continue_in_a_new_run_and_never_mix_two_curves(tmp_path, tiny_model_dir,
                                                                                     reverse_data, monkeypatch):
    """A rollback redoes steps at a lower learning rate: W&B would drop them (its steps only go
    forward) and MLflow would hold two points per step. The trackers go on in a new tracker run
    from the checkpoint's step; the one before keeps what it had, each run's steps go forward."""
    from mlflow.tracking import MlflowClient

    from fullscale.demo import DEMO_BASE

    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(   # the demo base: a loss that the 100x learning rate visibly spikes
        model_name_or_path=str(DEMO_BASE), train_file=str(reverse_data), output_dir=str(run), max_steps=24,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1, eval_steps=0, save_steps=6,
        gradient_checkpointing=False, eval_split=0.1, eval_samples=0, learning_rate=3e-3,
        health_spike_threshold=1.0, report_to=["wandb", "mlflow"])))
    store = f"file:{tmp_path / 'mlruns'}"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": store,
           "MLFLOW_ALLOW_FILE_STORE": "true"}
    proc = run_cli("train", cfg, fault="lr_spike@14", env_extra=env)
    assert proc.returncode == 0, proc.stderr
    [rollback] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
                  if '"event": "rollback"' in x][:1]
    to, frm = rollback["to_step"], rollback["from_step"]
    state = json.loads((run / "trackers.json").read_text())
    [before] = state["segments"]
    assert before["mlflow"] != state["mlflow"] and before["wandb"] != state["wandb"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(store)
    old = [m.step for m in client.get_metric_history(before["mlflow"], "train/loss")]
    new = [m.step for m in client.get_metric_history(state["mlflow"], "train/loss")]
    assert sorted(old) == list(range(1, frm)) and sorted(new) == list(range(to + 1, 25))
    assert client.get_run(state["mlflow"]).data.tags["fullscale.run"] == "run"
    runs = sorted(glob.glob(str(run / "wandb" / "offline-run-*")))
    assert len(runs) == 2
    steps = [s for s, _ in wandb_history(run, "train/loss")]
    assert sorted(steps) == sorted(list(range(1, frm)) + list(range(to + 1, 25)))


@pytest.mark.slow
def test_a_force_resume_with_other_settings_continues_the_trackers_in_a_new_run(tmp_path, tiny_model_dir,
                                                                              reverse_data, monkeypatch):
    """Steps redone after a force_resume are not the ones logged: they are logged again, in a new
    tracker run, never skipped as if identical."""
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data), output_dir=str(run), max_steps=14,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, logging_steps=1, eval_steps=0, save_steps=4,
        gradient_checkpointing=False, eval_split=0.1, eval_samples=0, report_to=["mlflow"])))
    store = f"file:{tmp_path / 'mlruns'}"
    env = {"MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true"}
    assert run_cli("train", cfg, fault="step@11", env_extra=env).returncode == -9   # checkpoint-8; 9, 10 logged
    first = json.loads((run / "trackers.json").read_text())["mlflow"]
    proc = run_cli("train", cfg, "learning_rate=1e-3", "force_resume=true", env_extra=env)
    assert proc.returncode == 0, proc.stderr
    state = json.loads((run / "trackers.json").read_text())
    assert state["segments"] == [{"mlflow": first}] and state["mlflow"] != first
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(store)
    assert sorted(m.step for m in client.get_metric_history(first, "train/loss")) == list(range(1, 11))
    assert sorted(m.step for m in client.get_metric_history(state["mlflow"], "train/loss")) == list(range(9, 15))
    assert "force_resume at step 8" in client.get_run(state["mlflow"]).info.run_name
