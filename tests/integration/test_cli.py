"""The command line as a user runs it: a model directory and a jsonl file they bring."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import read_metrics, step_losses, torchrun

ROOT = Path(__file__).parents[2]


def run_cli(*args, cwd=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "fullscale", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def write_yaml(path, **values):
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


BASE = dict(max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, eval_steps=2,
            save_steps=2, logging_steps=1, learning_rate=1e-3, lora_dropout=0.0, report_to="none")


def test_train_on_a_users_model_directory_and_jsonl(tmp_path, tiny_model_dir, reverse_data):
    cfg = write_yaml(tmp_path / "my.yaml", model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data),
                     output_dir=str(tmp_path / "run"), **BASE)
    proc = run_cli("train", cfg)
    assert proc.returncode == 0, proc.stderr
    assert "detected 'prompt_completion'" in proc.stdout
    assert "trainable" in proc.stdout
    run = tmp_path / "run"
    saved = json.loads((run / "training_result.json").read_text())
    assert saved["total_steps"] == 4
    import yaml

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["learning_rate"] == 1e-3 and resolved["weight_decay"] == 0.01


def test_a_missing_model_directory_is_a_clear_error(tmp_path, reverse_data):
    cfg = write_yaml(tmp_path / "c.yaml", model_name_or_path=str(tmp_path / "no-model"), train_file=str(reverse_data))
    proc = run_cli("train", cfg)
    assert proc.returncode == 2
    assert "no-model" in proc.stderr and "Traceback" not in proc.stderr


def test_a_model_directory_without_weights_is_a_clear_error(tmp_path, reverse_data):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    cfg = write_yaml(tmp_path / "c.yaml", model_name_or_path=str(empty), train_file=str(reverse_data),
                     output_dir=str(tmp_path / "run"), **BASE)
    proc = run_cli("train", cfg)
    assert proc.returncode == 2, proc.stderr
    assert "cannot" in proc.stderr and "empty-model" in proc.stderr and "Traceback" not in proc.stderr


def test_a_data_file_with_no_usable_rows_is_a_clear_error(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n{"foo": 2}\n')
    cfg = write_yaml(tmp_path / "c.yaml", model_name_or_path=str(tiny_model_dir), train_file=str(bad),
                     output_dir=str(tmp_path / "run"), **BASE)
    proc = run_cli("train", cfg)
    assert proc.returncode == 2
    assert "bad.jsonl" in proc.stderr and "Traceback" not in proc.stderr


def test_reusing_a_run_directory_with_resume_never_is_refused_and_keeps_the_run(tmp_path, tiny_model_dir, reverse_data):
    cfg = write_yaml(tmp_path / "my.yaml", model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data),
                     output_dir=str(tmp_path / "run"), **BASE)
    assert run_cli("train", cfg).returncode == 0
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    proc = run_cli("train", cfg, "resume=never")
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_checkpoints_command_lists_steps_best_and_latest(tmp_path, tiny_model_dir, reverse_data):
    cfg = write_yaml(tmp_path / "my.yaml", model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data),
                     output_dir=str(tmp_path / "run"), **BASE)
    assert run_cli("train", cfg).returncode == 0
    proc = run_cli("checkpoints", tmp_path / "run", "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "latest" in proc.stdout and "yes" in proc.stdout and "total disk use" in proc.stdout


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_process_at_the_same_effective_batch(tmp_path, tiny_model_dir,
                                                                                     reverse_data):
    common = dict(BASE, max_steps=5, model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data))
    one = write_yaml(tmp_path / "one.yaml", output_dir=str(tmp_path / "one"), **dict(common, per_device_train_batch_size=8))
    two = write_yaml(tmp_path / "two.yaml", output_dir=str(tmp_path / "two"), **common)
    assert run_cli("train", one).returncode == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(torchrun("-m", "fullscale", "train", two),
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 5
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-4)
    start = next(r for r in read_metrics(tmp_path / "two") if r["event"] == "train_start")
    assert start["processes"] == 2
    # Only rank 0 writes: one metrics line per step, one set of files.
    assert len([r for r in read_metrics(tmp_path / "two") if r["event"] == "train"]) == 5


def test_checkpoints_prune_sets_invalid_ones_aside_and_applies_the_limit(tmp_path, tiny_model_dir, reverse_data):
    cfg = write_yaml(tmp_path / "my.yaml", model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data),
                     output_dir=str(tmp_path / "run"), **dict(BASE, max_steps=6, eval_steps=0, save_steps=1,
                                                              save_total_limit=10))
    assert run_cli("train", cfg).returncode == 0
    run = tmp_path / "run"
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("save_total_limit: 10",
                                                                             "save_total_limit: 2"))
    (run / "checkpoint-6" / "optimizer.pt").write_bytes(b"broken")
    proc = run_cli("checkpoints", run, "--verify", "--prune")
    assert proc.returncode == 0, proc.stderr
    assert "set aside checkpoint-6" in proc.stdout
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if "." not in p.name)
    assert steps == [4, 5]
    assert any(p.name.startswith("checkpoint-6.invalid-") for p in run.iterdir())
