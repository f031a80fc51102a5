"""Each fault injected into a tiny real run, and the health monitor's answer to it."""

import pytest
import torch

import fullscale.run as run_module
import fullscale.train as train_module
from conftest import read_metrics
from fullscale import faults
from fullscale.train import train


@pytest.fixture(autouse=True)
def disarm():
    yield
    faults._POINTS.clear()


def health_events(run_dir, detector=None):
    return [r for r in read_metrics(run_dir) if r["event"] == "health" and detector in (None, r["detector"])]


def test_a_nan_loss_is_logged_as_nan_and_its_update_is_skipped(make_config):
    faults.arm("nan@4")
    config = make_config(max_steps=8, eval_steps=0, save_steps=100)
    result = train(config)
    assert result["stop_reason"] == "max_steps" and result["total_steps"] == 8
    [event] = health_events(config.output_dir, "nonfinite")
    assert event["step"] == 4 and event["action"] == "skip"
    losses = {r["step"]: r["loss"] for r in read_metrics(config.output_dir) if r["event"] == "train"}
    assert losses[4] == "nan"                                    # never hidden
    assert all(isinstance(losses[s], float) for s in (3, 5, 8))  # the run went on with finite losses


def test_nan_losses_k_steps_in_a_row_abort_with_a_diagnostic(make_config):
    faults.arm("nan@3,nan@4,nan@5")
    config = make_config(max_steps=10, eval_steps=0, save_steps=100, health_max_nonfinite=3)
    result = train(config)
    assert result["stop_reason"] == "health_abort" and result["total_steps"] == 4
    actions = [e["action"] for e in health_events(config.output_dir, "nonfinite")]
    assert actions == ["skip", "skip", "abort"]
    [abort] = [r for r in read_metrics(config.output_dir) if r["event"] == "health_abort"]
    assert abort["step"] == 5 and abort["rows"]                # the batch's row ids
    from fullscale.checkpoint import CheckpointManager

    assert CheckpointManager(config.output_dir).latest().step == 4  # resumable, before the bad update


@pytest.mark.slow   # the demo base learning the demo task; the rule itself: tests/unit/test_health_rules.py
def test_a_learning_rate_spike_is_detected_and_rolled_back_with_a_lower_rate(make_config):
    # The demo base learning the demo task: a real loss scale, converging by step 150.
    faults.arm("lr_spike@150")
    config = make_config(model_name_or_path=None, train_file=None, max_steps=170, eval_steps=0, save_steps=50,
                         learning_rate=4e-3, per_device_train_batch_size=16, gradient_accumulation_steps=1,
                         max_seq_length=128, logging_steps=1)
    result = train(config)
    spikes = health_events(config.output_dir, "spike")
    assert spikes, "the spike was not detected"
    assert 151 <= spikes[0]["step"] <= 154 and spikes[0]["action"] == "rollback"
    rollbacks = [r for r in read_metrics(config.output_dir) if r["event"] == "rollback"]
    assert rollbacks and rollbacks[0]["to_step"] == 150 and rollbacks[0]["lr_scale"] == 0.5
    assert result["num_rollbacks"] == 1 and result["total_steps"] == 170
    from transformers import get_scheduler

    # After the rollback the learning rate is the schedule's, halved.
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=4e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=9, num_training_steps=170)
    scheduled = {}
    for step in range(1, 171):
        opt.step()
        sched.step()
        scheduled[step] = sched.get_last_lr()[0]
    logged = {r["step"]: r["learning_rate"] for r in read_metrics(config.output_dir) if r["event"] == "train"}
    for step in range(156, 169):
        assert logged[step] == pytest.approx(0.5 * scheduled[step])
    steps = [r["step"] for r in read_metrics(config.output_dir) if r["event"] == "train"]
    assert steps == sorted(set(steps))                          # redone steps replace the rolled-back ones


@pytest.mark.slow   # the demo base learning the demo task; the rule itself: tests/unit/test_health_rules.py
def test_eval_loss_rising_while_train_loss_falls_warns_of_overfitting(make_config, monkeypatch):
    from fullscale.evaluate import EvalResult

    # The demo base learning the demo task (train loss falls fast); scripted eval losses rise.
    losses = iter([8.0, 5.0, 5.1, 5.2, 5.3, 5.4, 5.5])
    monkeypatch.setattr(run_module, "evaluate", lambda *a, **k: EvalResult(next(losses), 1.0, 10, 0.0))
    config = make_config(model_name_or_path=None, train_file=None, max_steps=60, eval_steps=10, save_steps=100,
                         learning_rate=4e-3, per_device_train_batch_size=16, gradient_accumulation_steps=1,
                         max_seq_length=128, early_stopping_patience=0)
    train(config)
    [event] = health_events(config.output_dir, "overfit")
    assert event["action"] == "warn" and "overfitting" in event["message"]


def test_a_scheduler_that_zeroes_the_learning_rate_early_is_reported(make_config, monkeypatch):
    def broken(optimizer, config, total_steps):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 if s < 4 else 0.0)

    monkeypatch.setattr(train_module, "build_scheduler", broken)
    config = make_config(max_steps=12, eval_steps=0, save_steps=100)
    train(config)
    [event] = health_events(config.output_dir, "lr")
    assert event["step"] == 4 and "scheduler" in event["message"]


def test_memory_that_keeps_growing_is_reported_as_a_leak(make_config, monkeypatch):
    leak = []
    import fullscale.loop as loop_module

    real = loop_module.token_loss_sum

    def leaky(logits, labels):
        leak.append(torch.ones(8 * 1024 * 1024 // 4 * 3))   # 24 MB kept per micro-step
        return real(logits, labels)

    monkeypatch.setattr(loop_module, "token_loss_sum", leaky)
    config = make_config(max_steps=16, eval_steps=0, save_steps=100, health_memory_window=3)
    train(config)
    leak.clear()
    [event] = health_events(config.output_dir, "memory")
    assert event["action"] == "warn" and "leak" in event["message"]


def test_a_clean_run_raises_no_health_event(make_config):
    config = make_config(max_steps=30, eval_steps=5, save_steps=10)
    result = train(config)
    assert health_events(config.output_dir) == [] and result["health_events"] == 0
