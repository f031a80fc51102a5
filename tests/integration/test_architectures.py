"""Every architecture a user brings, as a tiny random model built from its transformers config class:
default targets resolve to its attention projections (fused or not), all-linear (fused MoE experts
included) trains, packing is proven isolated on the model or refused, attention auto picks a kernel
the model has, gradient checkpointing works, the merge verifies; a few are killed and resumed."""

import json
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

from archs import ARCHITECTURES, make_arch, save_arch
from conftest import run_cli as _cli
from tiny import make_tokenizer

# Models that cannot keep packed examples apart through position_ids: packing is refused there.
PACKING_REFUSED = {"opt", "bloom"}
# What the default targets must wrap (the attention projections under the model's own names).
ATTENTION = {
    "phi3": {"self_attn.qkv_proj", "self_attn.o_proj"},
    "deepseek_v3": {"self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                    "self_attn.kv_b_proj", "self_attn.o_proj"},
    "phi": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"},
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"},
    "gptj": {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj"}, "gpt_bigcode": {"attn.c_attn", "attn.c_proj"},
    "gpt_neox": {"attention.query_key_value", "attention.dense"},
    "falcon": {"self_attention.query_key_value", "self_attention.dense"},
    "bloom": {"self_attention.query_key_value", "self_attention.dense"},
}
QKVO = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}


def wrapped_kinds(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    from fullscale.model import _suffix

    return {_suffix(n) for n, m in model.named_modules() if isinstance(m, LoraLayer) and "experts" not in n}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_default_targets_are_the_attention_projections_and_packing_is_proven(arch):
    from fullscale.config import load_config
    from fullscale.model import add_lora
    from fullscale.packing import ISOLATION_TOLERANCE, isolation_error

    tok = make_tokenizer()
    model = add_lora(make_arch(arch, tok), load_config(None, {}))
    assert wrapped_kinds(model) == ATTENTION.get(arch, QKVO)
    diff, cannot = isolation_error(model, pad_token_id=tok.pad_token_id, vocab_size=len(tok))
    if arch in PACKING_REFUSED:
        assert cannot or diff > ISOLATION_TOLERANCE[torch.float32]
    else:
        assert cannot is None and diff <= ISOLATION_TOLERANCE[torch.float32], diff


def test_a_target_name_that_matches_nothing_is_refused_with_every_layer_name():
    from fullscale.config import load_config
    from fullscale.errors import ModelError
    from fullscale.model import add_lora

    with pytest.raises(ModelError, match=r"q_proj, v_proj match no Linear/Conv1D layer.*attn\.c_attn.*mlp\.c_fc"):
        add_lora(make_arch("gpt2"), load_config(None, {"lora_target_modules": ["q_proj", "v_proj"]}))


def test_all_linear_on_fused_experts_keeps_dropout_elsewhere_and_adapts_every_expert():
    from peft.tuners.lora import LoraLayer

    from fullscale.config import load_config
    from fullscale.model import add_lora

    for arch in ("qwen3_moe", "qwen2_moe", "mixtral"):
        model = add_lora(make_arch(arch), load_config(None, {"lora_target_modules": "all-linear"}))
        experts = [m for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper" and "experts" in n]
        assert len(experts) == 4, arch   # gate_up_proj and down_proj of both layers' routed experts
        dropouts = {type(m.lora_dropout["default"]).__name__ for m in model.modules()
                    if isinstance(m, LoraLayer) and type(m).__name__ != "ParamWrapper"}
        assert dropouts == {"Dropout"}, arch


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_each_architecture_trains_with_checkpointing_packing_and_merges_verified(arch, tmp_path, reverse_data):
    from fullscale.config import load_config
    from fullscale.errors import ConfigError
    from fullscale.export import export
    from fullscale.train import train

    model_dir = save_arch(arch, tmp_path / "model")
    values = dict(model_name_or_path=str(model_dir), train_file=str(reverse_data), output_dir=str(tmp_path / "run"),
                  max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=1, eval_steps=3,
                  save_steps=3, learning_rate=1e-3, report_to="none", eval_split=0.1, max_seq_length=64,
                  gradient_checkpointing=True, packing=True)
    if arch in PACKING_REFUSED:
        with pytest.raises(ConfigError, match="packing: true is refused"):
            train(load_config(None, values))
        values["packing"] = False
    result = train(load_config(None, values))
    assert result["total_steps"] == 3 and result["train_loss"] is not None
    merged = export(tmp_path / "run", tmp_path / "merged", merge=True)
    assert merged.verification.passed
    values.update(output_dir=str(tmp_path / "all"), lora_target_modules="all-linear", packing=False, max_steps=2,
                  gradient_checkpointing=False)
    assert train(load_config(None, values))["total_steps"] == 2


def test_attention_auto_falls_back_to_eager_where_the_model_has_no_sdpa(tmp_path):
    from fullscale.config import load_config
    from fullscale.model import choose

    for arch, expected in (("gemma2", "eager"), ("bloom", "eager"), ("llama", "sdpa")):
        save_arch(arch, tmp_path / arch)
        choices = choose(load_config(None, {"model_name_or_path": str(tmp_path / arch)}), torch.device("cpu"))
        assert choices.attn_implementation == expected, arch
    assert "does not support sdpa" in choices.describe() or choices.attn_implementation == "sdpa"


@pytest.mark.slow
@pytest.mark.parametrize("arch, targets", [("gpt2", None), ("phi3", None), ("falcon", None),
                                           ("qwen3_moe", "all-linear")])
def test_killed_and_resumed_runs_end_bitwise_equal_on_other_architectures(arch, targets, tmp_path, reverse_data):
    model_dir = save_arch(arch, tmp_path / "model")
    settings = dict(model_name_or_path=str(model_dir), train_file=str(reverse_data), max_steps=8,
                    per_device_train_batch_size=4, gradient_accumulation_steps=2, eval_steps=3, save_steps=2,
                    logging_steps=1, learning_rate=3e-3, lora_dropout=0.1, report_to="none", eval_split=0.1,
                    max_seq_length=64, gradient_checkpointing=False)
    if targets:
        settings["lora_target_modules"] = targets
    runs = {}
    for name in ("ref", "killed"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(dict(settings, output_dir=str(tmp_path / name))))
        runs[name] = path
    assert _cli("train", runs["ref"]).returncode == 0
    for fault in ("micro@3", "step@5"):
        assert _cli("train", runs["killed"], fault=fault).returncode == -signal.SIGKILL
    proc = _cli("train", runs["killed"])
    assert proc.returncode == 0, proc.stderr
    a = load_file(str(tmp_path / "ref" / "checkpoint-8" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoint-8" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / n / "training_result.json").read_text()) for n in ("ref", "killed"))
    assert ra["train_loss"] == rb["train_loss"] and ra["best_eval_loss"] == rb["best_eval_loss"]
