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
