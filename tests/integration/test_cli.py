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


def test_prune_holds_the_runs_lock_so_no_run_starts_in_its_window(tmp_path, tiny_model_dir, reverse_data):
    from fullscale import rundir

    cfg = write_yaml(tmp_path / "my.yaml", model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data),
                     output_dir=str(tmp_path / "run"), **dict(BASE, max_steps=2, eval_steps=0, save_steps=1))
    assert run_cli("train", cfg).returncode == 0
    run = tmp_path / "run"
    held = rundir.RunLock(run).acquire()            # a run (here: this test) holds the directory
    try:
        proc = run_cli("checkpoints", run, "--prune")
        assert proc.returncode == 2 and "in use by process" in proc.stderr and "--prune" in proc.stderr
    finally:
        held.release()
    # While --prune works it holds the lock itself: what a run starting then would meet.
    from fullscale.cli import main

    import fullscale.checkpoint as ckpt
    seen = []
    real_rotate = ckpt.CheckpointManager.rotate

    def rotate(self, **kw):
        try:
            rundir.RunLock(run).acquire().release()
            seen.append("free")
        except rundir.RunLockedError:
            seen.append("held")
        return real_rotate(self, **kw)

    ckpt.CheckpointManager.rotate = rotate
    try:
        assert main(["checkpoints", str(run), "--prune"]) == 0
    finally:
        ckpt.CheckpointManager.rotate = real_rotate
    assert seen == ["held"]
    assert run_cli("checkpoints", tmp_path, "--prune").returncode == 2   # not a run: never touched


def test_data_paths_that_cannot_be_read_as_files_are_named_for_what_they_are(tmp_path, tiny_model_dir):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    dangling = tmp_path / "gone.jsonl"
    dangling.symlink_to(tmp_path / "nowhere.jsonl")
    for path, words in ((fifo, "not a regular file"), (loop, "loops"), (dangling, "does not exist")):
        proc = run_cli("train", f"model_name_or_path={tiny_model_dir}", f"train_file={path}",
                       f"output_dir={tmp_path / 'run'}", timeout=60)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_base_id_and_push_to_hub_take_hub_ids_only(tmp_path):
    for bad in ("a/b/c", "../../etc/passwd", "org/", "my model/x", "-x/y", "org/na--me"):
        proc = run_cli("export", tmp_path, "--out", tmp_path / "x", f"--base-id={bad}")
        assert proc.returncode == 2 and "not a Hugging Face repository id" in proc.stderr, (bad, proc.stderr)
    from fullscale.cli.registry import hub_id

    assert hub_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B" and hub_id("gpt2") == "gpt2"


def test_bad_rows_are_described_in_plain_words(tmp_path, tiny_model_dir):
    from fullscale.data.readers import load_rows as read_rows

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "unterminated\n{"prompt": 1,, "c": 2}\n')
    reasons = [why for _, _, why in read_rows(path) if why]
    assert reasons[0].startswith("invalid JSON at column ") and "at at" not in " ".join(reasons)
    assert reasons[1].startswith("invalid JSON at column ") and len(reasons) == 2
    from fullscale.data.formats import _null_word

    assert _null_word(float("nan")).startswith("NaN") and _null_word(None) == "null"


def test_a_tokenizer_that_is_not_the_models_is_named_not_a_traceback(tmp_path, tiny_model_dir, reverse_data):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["vocab_size"] = 64            # fewer embedding rows than the tokenizer's 108 tokens
    (model / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    w = load_file(str(model / "model.safetensors"))
    w = {k: (v[:64] if v.shape[0] == 108 else v) for k, v in w.items()}
    save_file(w, str(model / "model.safetensors"), metadata={"format": "pt"})
    proc = run_cli("train", f"model_name_or_path={model}", f"train_file={reverse_data}",
                   f"output_dir={tmp_path / 'run'}", "max_steps=1", "report_to=none", "plan_check=false")
    assert proc.returncode == 2 and "108 tokens" in proc.stderr and "64" in proc.stderr, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr


def test_an_unparsable_tokenizer_file_is_named(tmp_path, tiny_model_dir, reverse_data):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    proc = run_cli("train", f"model_name_or_path={model}", f"train_file={reverse_data}",
                   f"output_dir={tmp_path / 'run'}", "max_steps=1", "report_to=none")
    assert proc.returncode == 2 and "tokenizer.json is not valid JSON" in proc.stderr, proc.stderr[-1500:]
    assert "weights" not in proc.stderr
