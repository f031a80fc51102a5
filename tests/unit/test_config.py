import subprocess
import sys

import pytest
import yaml

from fullscale.config import Config, load_config
from fullscale.errors import ConfigError
from fullscale.cli import main


def test_defaults_equal_the_settled_small_scale_values():
    c = Config()
    assert c.learning_rate == 2e-4
    assert c.per_device_train_batch_size == 8
    assert c.num_train_epochs == 3
    assert c.warmup_ratio == 0.05
    assert c.weight_decay == 0.01
    assert c.gradient_accumulation_steps == 4
    assert c.gradient_checkpointing is True
    assert (c.save_steps, c.eval_steps, c.save_total_limit, c.logging_steps) == (500, 500, 3, 10)
    assert (c.lora_rank, c.lora_alpha, c.lora_dropout) == (32, 32, 0.05)
    assert c.lora_target_modules == "attention"   # q/k/v/o_proj on the chapter's Llama-family models
    assert (c.early_stopping_patience, c.early_stopping_min_delta) == (3, 0.001)
    assert (c.max_grad_norm, c.lr_scheduler_type, c.bf16) == (1.0, "cosine", "auto")
    assert (c.max_seq_length, c.eval_split, c.seed, c.max_steps) == (1024, 0.05, 42, -1)
    assert c.trust_remote_code is False and c.packing is False
    assert c.report_to == ["tensorboard"]


def test_yaml_then_overrides_and_numbers_from_yaml_strings(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("learning_rate: 1e-4\nper_device_train_batch_size: 2\n")
    c = load_config(path, ["per_device_train_batch_size=4", "lora_target_modules=all-linear"])
    assert c.learning_rate == 1e-4 and c.per_device_train_batch_size == 4
    assert c.lora_target_modules == "all-linear"
    assert c.output_dir == "runs/my"


def test_unknown_key_suggests_the_close_one_with_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\nlearnig_rate: 1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "learnig_rate" in text and "did you mean 'learning_rate'" in text and f"{path}:2" in text


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["per_device_train_batch_size=two", "warmup_ratio=1.5", "bf16=maybe", "lora_rnk=8"])
    assert len(err.value.problems) == 4


def test_evaluation_settings_without_eval_data_are_refused():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["eval_split=0", "eval_steps=100", "early_stopping_patience=2"])
    text = str(err.value)
    assert "eval_steps" in text and "early_stopping_patience" in text


def test_early_stopping_without_periodic_evaluation_is_refused():
    with pytest.raises(ConfigError, match="early_stopping_patience"):
        load_config(None, ["eval_steps=0", "early_stopping_patience=2"])


def test_missing_train_file_is_reported_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(None, [f"train_file={tmp_path / 'nope.jsonl'}"])


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nlearning_rate: [1e-4\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(path)


def test_cli_config_error_exits_2_without_traceback(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lerning_rate: 1e-4\n")
    proc = subprocess.run([sys.executable, "-m", "fullscale", "train", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'learning_rate'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_resolved_config_round_trips_through_yaml():
    c = load_config(None, ["seed=7"])
    again = load_config(None, yaml.safe_load(c.to_yaml()))
    assert again.to_dict() == c.to_dict()


def test_help_keys_lists_every_key(capsys):
    assert main(["train", "--help-keys"]) == 0
    out = capsys.readouterr().out
    for key in Config.keys():
        assert key in out
