"""Crash safety and exact resume with real processes killed by real signals.

Kills come from FULLSCALE_FAULT (see fullscale/faults.py): the process SIGKILLs itself at a
named point (inside an accumulation window, during evaluation, at each point of the checkpoint
commit protocol, during rotation). After each kill the same command runs again, as a user or a
scheduler would; the final adapter must be bitwise equal to an uninterrupted run's.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import free_port, read_metrics, run_cli, step_losses, torchrun

ROOT = Path(__file__).parents[2]
EXIT_PREEMPTED = 75

SETTINGS = dict(max_steps=14, per_device_train_batch_size=4, gradient_accumulation_steps=2, eval_steps=3,
                save_steps=2, save_total_limit=2, logging_steps=1, learning_rate=3e-3, lora_dropout=0.1,
                early_stopping_patience=2, early_stopping_min_delta=0.02, report_to="tensorboard", eval_split=0.1)


def write_config(tmp_path, name, model_dir, data, **over):
    values = dict(SETTINGS, model_name_or_path=str(model_dir), train_file=str(data),
                  output_dir=str(tmp_path / name), **over)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def final_adapter(run_dir):
    result = json.loads((Path(run_dir) / "training_result.json").read_text())
    return load_file(str(Path(run_dir) / f"checkpoint-{result['total_steps']}" / "adapter_model.safetensors")), result


def assert_same_run(a, b):
    wa, ra = final_adapter(a)
    wb, rb = final_adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"
    for key in ("total_steps", "stop_reason", "best_step", "best_eval_loss", "eval_loss", "train_loss"):
        assert ra[key] == rb[key], key
    assert step_losses(a) == step_losses(b)
    evals_a = [(r["step"], r["eval_loss"]) for r in read_metrics(a) if r["event"] == "eval"]
    evals_b = [(r["step"], r["eval_loss"]) for r in read_metrics(b) if r["event"] == "eval"]
    assert evals_a == evals_b
    # No duplicated steps in the records of the interrupted run.
    train_steps = [r["step"] for r in read_metrics(b) if r["event"] == "train"]
    assert train_steps == sorted(set(train_steps))


def assert_matches_across_engines(a, b):
    """Two runs at the same effective batch under different engines (DDP, FSDP, ZeRO): equal within
    float rounding (a sharded or partitioned reduction may round differently)."""
    wa, ra = final_adapter(a)
    wb, rb = final_adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    assert ra["total_steps"] == rb["total_steps"] and ra["best_step"] == rb["best_step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, reverse_data):
    tmp = tmp_path_factory.mktemp("reference")
    cfg = write_config(tmp, "ref", tiny_model_dir, reverse_data)
    proc = run_cli("train", cfg)
    assert proc.returncode == 0, proc.stderr
    return tmp / "ref"


@pytest.mark.slow
def test_a_run_killed_at_nine_points_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, reference,
                                                                                  tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "killed", tiny_model_dir, reverse_data)
    faults = ["micro@2", "step@3", "eval@3", "save_file@4", "before_manifest@4", "before_rename@6",
              "rotation@8", "micro@9", "eval@9"]
    for fault in faults:
        proc = run_cli("train", cfg, fault=fault)
        assert proc.returncode == -signal.SIGKILL, f"{fault}: {proc.returncode} {proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr
        # Whatever the kill left, no directory without a valid manifest is ever taken as a checkpoint.
    proc = run_cli("train", cfg)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from checkpoint-" in proc.stdout
    assert_same_run(reference, tmp_path / "killed")
    resumes = [r for r in read_metrics(tmp_path / "killed") if r["event"] == "resume"]
    assert resumes and all("steps_redone" in r for r in resumes)
    assert not any(p.name.startswith((".staging-", ".trash-")) for p in (tmp_path / "killed").iterdir())


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(
        tmp_path, reference, tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "corrupt", tiny_model_dir, reverse_data)
    assert run_cli("train", cfg, fault="step@7").returncode == -signal.SIGKILL
    run = tmp_path / "corrupt"
    newest = run / "checkpoint-6"
    data = (newest / "adapter_model.safetensors").read_bytes()
    (newest / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    proc = run_cli("train", cfg)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint-6 is not usable" in proc.stdout and "set aside" in proc.stdout
    assert "resuming from checkpoint-4" in proc.stdout
    assert any(p.name.startswith("checkpoint-6.invalid-") for p in run.iterdir())
    assert_same_run(reference, run)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sigterm@3", "sigterm@5", "sigterm_eval@6", "sigterm@12"])
def test_sigterm_saves_a_resumable_checkpoint_and_exits_75(tmp_path, reference, tiny_model_dir, reverse_data, fault):
    # A real SIGTERM, sent by the process to itself at a chosen point: after the update of an eval
    # step (before its evaluation), of a step that neither evaluates nor saves, inside an
    # evaluation, and at step 12, where the evaluation decides early stopping.
    cfg = write_config(tmp_path, "term", tiny_model_dir, reverse_data)
    proc = run_cli("train", cfg, fault=fault)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    assert "SIGTERM received" in proc.stderr and "Traceback" not in proc.stderr
    from fullscale.checkpoint import CheckpointManager

    run = tmp_path / "term"
    latest = CheckpointManager(run).latest(verify=True)
    assert latest is not None and latest.valid
    assert latest.step == int(fault.split("@")[1])
    state = json.loads((latest.path / "trainer_state.json").read_text())
    assert state["stop_reason"] == "preempted"
    assert state["train_state"]["eval_pending"] == (fault in ("sigterm@3", "sigterm@12"))
    proc = run_cli("train", cfg)
    assert proc.returncode == 0, proc.stderr
    assert_same_run(reference, run)


@pytest.mark.slow
def test_a_sigterm_at_the_last_step_still_gets_the_final_evaluation(tmp_path, tiny_model_dir, reverse_data):
    short = dict(max_steps=4, early_stopping_patience=0)
    ref = write_config(tmp_path, "ref", tiny_model_dir, reverse_data, **short)
    assert run_cli("train", ref).returncode == 0
    cfg = write_config(tmp_path, "term", tiny_model_dir, reverse_data, **short)
    assert run_cli("train", cfg, fault="sigterm@4").returncode == EXIT_PREEMPTED
    proc = run_cli("train", cfg)
    assert proc.returncode == 0, proc.stderr
    assert_same_run(tmp_path / "ref", tmp_path / "term")
    assert [r["step"] for r in read_metrics(tmp_path / "term") if r["event"] == "eval"] == [0, 3, 4]
    result = json.loads((tmp_path / "term" / "training_result.json").read_text())
    assert result["stop_reason"] == "max_steps"


@pytest.mark.slow
def test_an_external_sigterm_during_training_is_handled_the_same(tmp_path, reference, tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "term", tiny_model_dir, reverse_data)
    proc = run_cli("train", cfg, wait=False)
    run = tmp_path / "term"
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and '"event": "train"' in metrics.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == EXIT_PREEMPTED, err
    proc = run_cli("train", cfg)
    assert proc.returncode == 0, proc.stderr
    assert_same_run(reference, run)


def test_a_disk_that_fills_during_a_save_stops_clearly_and_keeps_committed_checkpoints(
        tmp_path, tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "full", tiny_model_dir, reverse_data)
    proc = run_cli("train", cfg, fault="enospc@4")
    assert proc.returncode == 1, proc.stderr
    assert "cannot write checkpoint-4" in proc.stderr and "No space left" in proc.stderr
    assert "Traceback" not in proc.stderr
    run = tmp_path / "full"
    from fullscale.checkpoint import CheckpointManager

    valid = CheckpointManager(run).valid(verify=True)
    assert [i.step for i in valid] == [2]
    assert not any(p.name.startswith(".staging-") for p in run.iterdir())


def test_resuming_with_changed_data_or_batch_is_refused_with_the_list(tmp_path, tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "changed", tiny_model_dir, reverse_data, max_steps=2)
    assert run_cli("train", cfg).returncode == 0
    other = tmp_path / "other.jsonl"
    other.write_text(reverse_data.read_text().replace("rev", "REV"))
    proc = run_cli("train", cfg, f"train_file={other}", "gradient_accumulation_steps=4")
    assert proc.returncode == 2
    assert "train data contents changed" in proc.stderr and "gradient_accumulation_steps" in proc.stderr
    assert "force_resume" in proc.stderr
    # Harmless changes are accepted and recorded.
    proc = run_cli("train", cfg, "logging_steps=5")
    assert proc.returncode == 0, proc.stderr
    assert "logging_steps" in proc.stdout


def test_resume_command_continues_with_the_saved_config(tmp_path, tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "cmd", tiny_model_dir, reverse_data, max_steps=4)
    assert run_cli("train", cfg, fault="step@3").returncode == -signal.SIGKILL
    proc = run_cli("resume", tmp_path / "cmd")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from checkpoint-2" in proc.stdout
    assert json.loads((tmp_path / "cmd" / "training_result.json").read_text())["total_steps"] == 4


def run_torchrun(cfg, *, fault=None, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("FULLSCALE_FAULT", None)
    if fault:
        env["FULLSCALE_FAULT"] = fault
    return subprocess.run(torchrun("-m", "fullscale", "train", cfg), capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_two_processes_killed_and_resumed_end_bitwise_equal(tmp_path, tiny_model_dir, reverse_data):
    over = dict(per_device_train_batch_size=2, max_steps=8)
    ref = write_config(tmp_path, "ref2", tiny_model_dir, reverse_data, **over)
    proc = run_torchrun(ref)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = write_config(tmp_path, "killed2", tiny_model_dir, reverse_data, **over)
    for fault in ["micro@3", "before_manifest@4", "eval@6"]:
        proc = run_torchrun(cfg, fault=fault)
        assert proc.returncode != 0, fault
    proc = run_torchrun(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "ref2", tmp_path / "killed2")
    assert (tmp_path / "killed2" / "checkpoint-8" / "rng_state_1.pt").exists()


# What `accelerate launch --config_file configs/accelerate/fsdp.yaml` puts in the environment.
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
            "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false"}


@pytest.mark.slow
def test_fsdp_run_killed_and_resumed_ends_bitwise_equal_and_matches_ddp(tmp_path, tiny_model_dir, reverse_data):
    over = dict(per_device_train_batch_size=2, max_steps=8)
    ddp = write_config(tmp_path, "ddp", tiny_model_dir, reverse_data, **over)
    assert run_torchrun(ddp).returncode == 0
    ref = write_config(tmp_path, "fsdp", tiny_model_dir, reverse_data, **over)
    proc = run_torchrun(ref, env_extra=FSDP_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP2: base weights sharded per LlamaDecoderLayer" in proc.stdout
    assert_matches_across_engines(tmp_path / "fsdp", tmp_path / "ddp")

    cfg = write_config(tmp_path, "fsdp-killed", tiny_model_dir, reverse_data, **over)
    proc = run_torchrun(cfg, fault="sigterm@3", env_extra=FSDP_ENV)   # after the update of an eval step
    assert "SIGTERM received" in proc.stderr, proc.stderr[-3000:]
    for fault in ["before_manifest@4", "micro@5", "eval@6"]:
        proc = run_torchrun(cfg, fault=fault, env_extra=FSDP_ENV)
        assert proc.returncode != 0, fault
    proc = run_torchrun(cfg, env_extra=FSDP_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "fsdp", tmp_path / "fsdp-killed")

    # The checkpoint is an ordinary one: a DDP run resumes it, and peft loads its adapter.
    mixed = write_config(tmp_path, "fsdp-then-ddp", tiny_model_dir, reverse_data, **over)
    assert run_torchrun(mixed, fault="micro@5", env_extra=FSDP_ENV).returncode != 0
    proc = run_torchrun(mixed)
    assert proc.returncode == 0 and "resuming from checkpoint-4" in proc.stdout, proc.stderr[-3000:]
    assert_matches_across_engines(tmp_path / "fsdp-then-ddp", tmp_path / "ddp")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      tmp_path / "fsdp" / "best_model")
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_fsdp_settings_fullscale_cannot_honour_are_refused_with_exit_2(tmp_path, tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "bad", tiny_model_dir, reverse_data, max_steps=2)
    proc = run_cli("train", cfg, env_extra={**FSDP_ENV, "FSDP_VERSION": "1"})
    assert proc.returncode == 2 and "fsdp_version: 2" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", cfg, env_extra={**FSDP_ENV, "FSDP_OFFLOAD_PARAMS": "true"})
    assert proc.returncode == 2 and "without a GPU" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoint-2").exists()


def run_accelerate(config_name, cfg, *, fault=None):
    """`accelerate launch --config_file configs/accelerate/NAME`, as users start it, on 2 processes."""
    import shutil

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("FULLSCALE_FAULT", None)
    if fault:
        env["FULLSCALE_FAULT"] = fault
    return subprocess.run([accelerate, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / config_name),
                           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "fullscale",
                           "train", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_deepspeed_zero3_offload_run_killed_and_resumed_ends_bitwise_equal_and_matches_ddp(
        tmp_path, tiny_model_dir, reverse_data):
    over = dict(per_device_train_batch_size=2, max_steps=8)
    # Every run meets a NaN at step 6: the update must be skipped under ZeRO as under DDP (DeepSpeed
    # holds the gradients in its own partitions until its step).
    nan = "nan@6"
    ddp = write_config(tmp_path, "ddp", tiny_model_dir, reverse_data, **over)
    assert run_torchrun(ddp, fault=nan).returncode == 0
    ref = write_config(tmp_path, "zero3", tiny_model_dir, reverse_data, **over)
    proc = run_accelerate("deepspeed_zero3_offload.yaml", ref, fault=nan)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("DeepSpeed ZeRO-3: weights, gradients and optimizer states partitioned, optimizer and parameters "
            "offloaded to CPU") in proc.stdout
    assert "health [nonfinite -> skip] step 6" in proc.stdout
    assert_matches_across_engines(tmp_path / "zero3", tmp_path / "ddp")

    cfg = write_config(tmp_path, "zero3-killed", tiny_model_dir, reverse_data, **over)
    proc = run_accelerate("deepspeed_zero3_offload.yaml", cfg, fault=f"sigterm@3,{nan}")  # after an eval step's update
    assert "SIGTERM received" in proc.stderr, proc.stderr[-3000:]
    proc = run_accelerate("deepspeed_zero3_offload.yaml", cfg, fault=f"micro@5,{nan}")   # SIGKILL inside a window
    assert proc.returncode != 0
    proc = run_accelerate("deepspeed_zero3_offload.yaml", cfg, fault=nan)
    assert proc.returncode == 0 and "resuming from checkpoint-4" in proc.stdout, proc.stderr[-3000:]
    assert_same_run(tmp_path / "zero3", tmp_path / "zero3-killed")

    # The checkpoints are ordinary ones: a DDP run's checkpoint resumes under ZeRO-2.
    mixed = write_config(tmp_path, "ddp-then-zero2", tiny_model_dir, reverse_data, **over)
    assert run_torchrun(mixed, fault=f"micro@5,{nan}").returncode != 0
    proc = run_accelerate("deepspeed_zero2.yaml", mixed, fault=nan)
    assert proc.returncode == 0 and "resuming from checkpoint-4" in proc.stdout, proc.stderr[-3000:]
    assert "DeepSpeed ZeRO-2: gradients and optimizer states partitioned" in proc.stdout
    assert_matches_across_engines(tmp_path / "ddp-then-zero2", tmp_path / "ddp")


def test_deepspeed_settings_fullscale_cannot_honour_are_refused_with_exit_2(tmp_path, tiny_model_dir, reverse_data):
    cfg = write_config(tmp_path, "bad", tiny_model_dir, reverse_data, max_steps=2, gradient_accumulation_steps=2)
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
           "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "ds.json")}
    proc = run_cli("train", cfg, env_extra=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "3 config errors" in proc.stderr
    assert "offload_param_device: cpu needs zero_stage 3" in proc.stderr
    assert "gradient_accumulation_steps: 4 but the fullscale config has gradient_accumulation_steps: 2" in proc.stderr
    assert "deepspeed_config_file" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoint-2").exists()


@pytest.mark.slow
def test_a_force_resume_onto_another_batch_size_keeps_the_position_in_examples(tmp_path, tiny_model_dir,
                                                                                reverse_data):
    """4 examples a micro-batch, killed after checkpoint-6 (24 examples of the epoch done), resumed
    with 8: the run goes on from example 24, so every example of the epoch is trained once, as in
    the uninterrupted run (the tokens seen say it), and the start line says so."""
    import signal

    import yaml

    from conftest import run_cli

    settings = dict(model_name_or_path=str(tiny_model_dir), train_file=str(reverse_data), num_train_epochs=1,
                    per_device_train_batch_size=4, gradient_accumulation_steps=1, eval_steps=0, save_steps=3,
                    logging_steps=1, report_to="none", eval_split=0.1, max_seq_length=64,
                    gradient_checkpointing=False)
    cfg = tmp_path / "killed.yaml"
    cfg.write_text(yaml.safe_dump(dict(settings, output_dir=str(tmp_path / "killed"))))
    proc = run_cli("train", cfg, fault="step@7")
    assert proc.returncode == -signal.SIGKILL
    # The epoch's tokens, as the data report counts them: what one pass over every example sees.
    import re

    epoch_tokens = int(re.search(r"train split\): \d+ rows -> \d+ examples, ([\d,]+) tokens", proc.stdout)
                       .group(1).replace(",", ""))
    proc = run_cli("train", cfg, "per_device_train_batch_size=8", "force_resume=true")
    assert proc.returncode == 0, proc.stderr
    assert "24 examples of epoch 0 were done in micro-batches of 4" in proc.stdout
    assert "from micro-batch 3 of 8 examples" in proc.stdout
    last = max((tmp_path / "killed").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    tokens = {"killed": json.loads((last / "trainer_state.json").read_text())["train_state"]["tokens_seen"],
              "ref": epoch_tokens}
    assert tokens["killed"] == tokens["ref"]
