"""Real short runs on a tiny Llama saved to disk, through the real loop."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics, step_losses
from fullscale.train import train


def test_a_run_writes_the_whole_run_directory(make_config):
    config = make_config(report_to="tensorboard", save_total_limit=1)
    result = train(config)
    run = config.output_dir
    from pathlib import Path

    run = Path(run)
    for name in ("config.yaml", "metrics.jsonl", "runs", "best_model", "training_result.json"):
        assert (run / name).exists(), name
    assert list(run.glob("checkpoint-*"))
    assert list((run / "runs").glob("events.out.tfevents.*"))
    saved = json.loads((run / "training_result.json").read_text())
    for key in ("train_loss", "eval_loss", "best_eval_loss", "best_step", "total_steps", "stop_reason",
                "elapsed_hours", "peak_memory_gb", "tokens_per_second", "config"):
        assert key in saved, key
    assert saved["total_steps"] == 6 and saved["stop_reason"] == "max_steps"
    evals = [r for r in read_metrics(run) if r["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 3, 6]   # before the first step, then every eval_steps
    assert result["best_eval_loss"] == min(e["eval_loss"] for e in evals)

    # best_model/ loads with plain peft and gives the logged best eval loss's model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(config.model_name_or_path)
    model = PeftModel.from_pretrained(base, run / "best_model")
    tok = AutoTokenizer.from_pretrained(run / "best_model")
    assert model(**tok("rev abc:", return_tensors="pt")).logits.shape[-1] == len(tok)


def test_only_lora_parameters_change_and_base_weights_stay_bit_identical(make_config, tiny_model_dir):
    config = make_config(max_steps=4, eval_steps=0, save_steps=4)
    result = train(config)
    model = result["_model"]
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    changed_lora = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            changed_lora += int("lora_B" in name and param.abs().sum() > 0)  # B starts at zero
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(param.detach(), original[key]), f"base weight {key} changed"
    assert changed_lora > 0


def test_accumulation_4x2_gives_the_same_losses_as_1x8(make_config, tmp_path):
    a = make_config(per_device_train_batch_size=2, gradient_accumulation_steps=4, output_dir=str(tmp_path / "a"),
                    eval_steps=0, save_steps=100)
    b = make_config(per_device_train_batch_size=8, gradient_accumulation_steps=1, output_dir=str(tmp_path / "b"),
                    eval_steps=0, save_steps=100)
    train(a)
    train(b)
    la, lb = step_losses(a.output_dir), step_losses(b.output_dir)
    assert la.keys() == lb.keys() and len(la) == 6
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-5)


def test_early_stopping_stops_after_patience_non_improving_evaluations(make_config):
    # min_delta larger than any possible improvement: every evaluation after the first is "bad".
    config = make_config(max_steps=50, eval_steps=2, save_steps=100, early_stopping_patience=2,
                         early_stopping_min_delta=100.0)
    result = train(config)
    assert result["stop_reason"] == "early_stopping"
    assert result["total_steps"] == 4          # evals at 0 (best), 2 (bad 1), 4 (bad 2) -> stop
    assert result["best_step"] == 0


def test_rotation_never_removes_the_best_checkpoint(make_config, monkeypatch):
    # Scripted eval losses through the real loop: the best is at step 2, then it only gets worse.
    import fullscale.run as run_module
    from fullscale.checkpoint import CheckpointManager
    from fullscale.evaluate import EvalResult

    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9])
    monkeypatch.setattr(run_module, "evaluate",
                        lambda *a, **k: EvalResult(next(losses), 1.0, 10, 0.0))
    config = make_config(max_steps=12, eval_steps=2, save_steps=2, save_total_limit=1,
                         early_stopping_patience=0)
    result = train(config)
    steps = [i.step for i in CheckpointManager(config.output_dir).valid()]
    assert result["best_step"] == 2
    assert steps == [2, 12]


def test_epochs_end_the_run_with_their_stop_reason(make_config):
    config = make_config(max_steps=-1, num_train_epochs=1, per_device_train_batch_size=16,
                         gradient_accumulation_steps=2, eval_steps=0, save_steps=100)
    result = train(config)
    # 86 train rows (96 - 10%) -> 6 micro-batches of 16 (last 6 rows kept) -> 3 steps
    assert result["stop_reason"] == "epochs" and result["total_steps"] == 3


def test_group_by_length_trains_on_batches_of_similar_length(make_config, capsys):
    import io

    stream = io.StringIO()
    result = train(make_config(group_by_length=True, max_steps=4, eval_steps=0, early_stopping_patience=0),
                   stream=stream)
    assert result["total_steps"] == 4 and result["stop_reason"] == "max_steps"
    line = next(x for x in stream.getvalue().splitlines() if x.startswith("group_by_length: padding"))
    grouped, shuffled = (float(x.split("%")[0].split()[-1]) for x in line.split("(shuffled:"))
    assert grouped < shuffled
