"""packing: true through the real loop: a short run, and an exact resume after real kills."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import read_metrics, step_losses
from fullscale.train import train

ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FULLSCALE_CACHE", str(tmp_path / "cache"))  # never the real ~/.cache (subprocesses too)


def test_a_packed_run_trains_end_to_end_and_evaluates_unpacked(make_config):
    # The reverse-task rows are 15-25 tokens: rows of 64 tokens hold about 3 of them.
    config = make_config(packing=True, max_seq_length=64, max_steps=6, eval_steps=3, save_steps=3)
    console = io.StringIO()
    result = train(config, stream=console)
    text = console.getvalue()
    assert "packing: 86 examples -> " in text and "rows of <=64 tokens" in text
    assert result["stop_reason"] == "max_steps" and result["total_steps"] == 6
    records = read_metrics(config.output_dir)
    start = next(r for r in records if r["event"] == "train_start")
    assert start["num_train_examples"] < 86 / 2          # packed rows, not examples
    train_logs = [r for r in records if r["event"] == "train"]
    assert len(train_logs) == 6 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in train_logs)
    evals = [r for r in records if r["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    # Evaluation is unpacked: its token count is the eval examples' label tokens, whatever packing does.
    unpacked = train(make_config(max_steps=1, eval_steps=0, save_steps=1,
                                 output_dir=str(Path(config.output_dir).parent / "unpacked")), stream=io.StringIO())
    first_eval = next(r for r in read_metrics(unpacked["config"]["output_dir"]) if r["event"] == "eval")
    assert first_eval["eval_loss"] == pytest.approx(evals[0]["eval_loss"], abs=1e-6)
    assert first_eval["eval_tokens"] == evals[0]["eval_tokens"]
    assert list(Path(config.output_dir).glob("checkpoint-*")) and (Path(config.output_dir) / "best_model").exists()


def test_an_epoch_of_packed_rows_trains_on_every_real_token_once(make_config):
    config = make_config(packing=True, max_seq_length=64, max_steps=-1, num_train_epochs=1, eval_steps=0,
                         save_steps=100, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    result = train(config, stream=io.StringIO())
    data = result["_data"]
    assert sorted(r for row in data.train for r in row["rows"]) == sorted(
        ex_row for ex_row in range(1, 97) if ex_row not in {ex["row"] for ex in data.eval})
    state = json.loads((Path(config.output_dir) / f"checkpoint-{result['total_steps']}" / "trainer_state.json")
                       .read_text())
    # tokens_seen counts real tokens only (real_mask), never the padding of the packed batches.
    assert state["train_state"]["tokens_seen"] == data.train_stats.num_tokens
    assert result["total_steps"] == -(-len(data.train) // 2)


# ----------------------------------------------------------------------------- exact resume

SETTINGS = dict(max_steps=10, per_device_train_batch_size=2, gradient_accumulation_steps=2, eval_steps=4,
                save_steps=2, save_total_limit=2, logging_steps=1, learning_rate=3e-3, lora_dropout=0.1,
                report_to="none", eval_split=0.1, packing=True, max_seq_length=64)


def write_config(tmp_path, name, model_dir, data):
    values = dict(SETTINGS, model_name_or_path=str(model_dir), train_file=str(data), output_dir=str(tmp_path / name))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def run_cli(config_path, fault=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("FULLSCALE_FAULT", None)
    if fault:
        env["FULLSCALE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "fullscale", "train", str(config_path)], capture_output=True,
                          text=True, env=env, timeout=300)


def final_adapter(run_dir):
    result = json.loads((Path(run_dir) / "training_result.json").read_text())
    return load_file(str(Path(run_dir) / f"checkpoint-{result['total_steps']}" / "adapter_model.safetensors")), result


@pytest.mark.slow
def test_a_packed_run_killed_and_resumed_ends_bitwise_equal(tmp_path, tiny_model_dir, reverse_data):
    reference = run_cli(write_config(tmp_path, "ref", tiny_model_dir, reverse_data))
    assert reference.returncode == 0, reference.stderr
    assert "packing: " in reference.stdout
    killed = write_config(tmp_path, "killed", tiny_model_dir, reverse_data)
    for fault in ("micro@3", "step@5", "eval@8"):
        proc = run_cli(killed, fault=fault)
        assert proc.returncode == -signal.SIGKILL, f"{fault}: {proc.returncode} {proc.stderr[-2000:]}"
    proc = run_cli(killed)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from checkpoint-" in proc.stdout
    assert "tokenized data: read from the cache" in proc.stdout   # the resumed runs reuse the tokenization
    wa, ra = final_adapter(tmp_path / "ref")
    wb, rb = final_adapter(tmp_path / "killed")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for key in ("total_steps", "stop_reason", "best_step", "best_eval_loss", "eval_loss", "train_loss"):
        assert ra[key] == rb[key], key
    assert step_losses(tmp_path / "ref") == step_losses(tmp_path / "killed")
