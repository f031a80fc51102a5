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

from archs import ARCHITECTURES, STATEFUL, make_arch, save_arch
from conftest import run_cli as _cli
from tiny import make_tokenizer

# Models that cannot keep packed examples apart through position_ids: packing is refused there.
PACKING_REFUSED = {"opt", "bloom"} | STATEFUL
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
    "lfm2": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"},
    "qwen3_next": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba", "linear_attn.out_proj"},
    "mamba2": {"mixer.in_proj"},   # no attention: the mixers' projections peft adapts (out_proj it refuses)
    "recurrent_gemma": {"temporal_block.q_proj", "temporal_block.k_proj", "temporal_block.v_proj",
                        "temporal_block.o_proj"},
    "deepseek_v2": {"self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                    "self_attn.kv_b_proj", "self_attn.o_proj"},
    "dbrx": {"attn.Wqkv", "attn.out_proj"},
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
    if arch in STATEFUL:
        assert cannot and "carry a state" in cannot
    elif arch in PACKING_REFUSED:
        assert cannot or diff > ISOLATION_TOLERANCE
    else:
        assert cannot is None and diff <= ISOLATION_TOLERANCE, diff


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


# The families past attention-only models, one of each kind, train end to end here; every one of
# them is also built and checked by the faster tests above (targets, all-linear, packing).
TRAINED = sorted(set(ARCHITECTURES) - {"lfm2", "falcon_h1", "qwen3_next", "deepseek_v2", "olmoe"})


@pytest.mark.parametrize("arch", TRAINED)
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


# What all-linear leaves out on purpose, by model type (kind -> a word of the reason).
ALL_LINEAR_LEFT_OUT = {
    "qwen2_moe": {"mlp.shared_expert_gate": "router"}, "qwen3_next": {"mlp.shared_expert_gate": "router"},
    "llama4_text": {"feed_forward.router": "router"},
    "falcon_h1": {"mamba.out_proj": "Mamba"}, "mamba2": {"mixer.out_proj": "Mamba"},
    "dbrx": {"router.layer": "router", "experts.mlp.w1": "2-D", "experts.mlp.v1": "2-D", "experts.mlp.w2": "2-D"},
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_all_linear_adapts_every_linear_layer_and_expert_tensor_or_says_why_not(arch):
    """Walks the model's modules and the adapter's tensors: every Linear/Conv1D layer but the output
    layer has LoRA tensors, and so does every fused 3-D expert tensor, unless the start line's
    left-out list names its kind with a reason."""
    import warnings

    from fullscale.config import load_config
    from fullscale.model import add_lora
    from fullscale.targets import fused_expert_parameters, linear_layers, suffix

    base = make_arch(arch)
    layers = linear_layers(base)
    experts = [n for n, p in base.named_parameters() if p.dim() == 3 and "expert" in n]
    fused = fused_expert_parameters(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # peft's pattern warnings (OLMoE) are not the user's
        model = add_lora(base, load_config(None, {"lora_target_modules": "all-linear"}))
    left_out = model.fullscale_targets.left_out
    assert left_out.keys() == ALL_LINEAR_LEFT_OUT.get(arch, {}).keys(), left_out
    for kind, word in ALL_LINEAR_LEFT_OUT.get(arch, {}).items():
        assert word in left_out[kind]
    lora = [n.replace("base_model.model.", "") for n, p in model.named_parameters() if p.requires_grad]
    for name in layers:
        # a module wrapper holds lora_A.default.weight; a ParamWrapper on the weight holds lora_A.default.weight too
        has = any(t.startswith(name + ".") and ".lora_A." in t for t in lora)
        assert has or suffix(name) in left_out, f"{arch}: {name} has no LoRA and is not said to be left out"
        assert not (has and suffix(name) in left_out), f"{arch}: {name} is both wrapped and left out"
    assert len(fused) == len({".".join(e.split(".")[-3:]) for e in experts})
    for name in experts:
        owner = name.rsplit(".", 1)[0]
        assert any(t.startswith(owner + ".") and ".lora_A." in t for t in lora), f"{arch}: {name} has no LoRA"


def test_routers_are_never_wrapped_and_llama4_all_linear_trains_a_step():
    from fullscale.config import load_config
    from fullscale.model import add_lora
    from fullscale.targets import wrapped_layers

    tok = make_tokenizer()
    model = add_lora(make_arch("llama4_text", tok), load_config(None, {"lora_target_modules": "all-linear"}))
    layers, _ = wrapped_layers(model)
    assert not any("router" in n for n in layers)
    ids = torch.randint(8, len(tok), (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_moe_dense_layers_and_shared_experts_keep_their_lora_through_save_load_and_merge(tmp_path):
    """peft rewrites targets named gate_proj/up_proj/down_proj into the experts on these model types;
    fullscale's adapter on the dense MLP and the shared experts saves, loads back in plain peft
    and merges to the same logits."""
    from peft import PeftModel

    from fullscale.config import load_config
    from fullscale.model import add_lora

    tok = make_tokenizer()
    for arch in ("glm4_moe", "deepseek_v2"):
        model = add_lora(make_arch(arch, tok), load_config(None, {"lora_target_modules": "all-linear"}))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)   # a trained-looking adapter, not the zero init
        model.eval()
        ids = torch.randint(8, len(tok), (2, 12))
        want = model(input_ids=ids).logits
        model.save_pretrained(tmp_path / arch)
        loaded = PeftModel.from_pretrained(make_arch(arch, tok), tmp_path / arch).eval()
        assert torch.equal(loaded(input_ids=ids).logits, want), arch
        merged = loaded.merge_and_unload()
        assert (merged(input_ids=ids).logits - want).abs().max() < 1e-4, arch
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("mlp.down_proj" in n and "shared" not in n for n in names) and \
            any("shared_experts.up_proj" in n for n in names), arch


def test_a_pure_state_space_model_trains_by_default_and_the_plan_models_it(tmp_path, reverse_data):
    from fullscale.config import load_config
    from fullscale.plan.shape import inspect_model
    from fullscale.train import train

    model_dir = save_arch("mamba2", tmp_path / "model")
    values = dict(model_name_or_path=str(model_dir), train_file=str(reverse_data), output_dir=str(tmp_path / "run"),
                  max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1, eval_steps=2,
                  save_steps=2, report_to="none", eval_split=0.1, max_seq_length=64)
    shape = inspect_model(load_config(None, values), dtype=torch.float32)
    assert shape.lora_parameters > 0 and shape.num_layers == 2
    result = train(load_config(None, values))
    assert result["total_steps"] == 2
    shape = inspect_model(load_config(None, dict(values, lora_target_modules=["in_proj"])), dtype=torch.float32)
    assert shape.lora_parameters > 0


def test_an_explicit_target_list_is_the_users_even_when_it_equals_the_old_default():
    from fullscale.config import load_config
    from fullscale.model import add_lora

    config = load_config(None, {"lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    assert "lora_target_modules" in config.explicit
    model = add_lora(make_arch("recurrent_gemma"), config)
    assert wrapped_kinds(model) == ATTENTION["recurrent_gemma"]
    assert model.fullscale_targets.meaning == "the layers named in lora_target_modules"


def test_peft_errors_name_the_models_own_layers_only():
    from fullscale.config import load_config
    from fullscale.errors import ModelError
    from fullscale.model import add_lora

    with pytest.raises(ModelError) as info:
        add_lora(make_arch("mamba2"), load_config(None, {"lora_target_modules": ["out_proj"]}))
    text = str(info.value)
    assert "mixer.out_proj" in text and "Mamba" in text
    assert "base_layer" not in text and "lora_A" not in text


@pytest.mark.parametrize("arch", ["jamba", "lfm2", "falcon_h1"])
def test_packing_on_a_stateful_hybrid_is_refused_in_bf16_too_and_the_proof_runs_in_fp32(arch):
    """The leak of these hybrids is below bf16's rounding of the logits: the proof runs in fp32 on the
    bf16 weights (and gives them back bitwise), and the state-carrying layers are refused by name."""
    from fullscale.config import load_config
    from fullscale.model import add_lora
    from fullscale.packing import ISOLATION_TOLERANCE, _logit_difference, isolation_error

    tok = make_tokenizer()
    model = add_lora(make_arch(arch, tok), load_config(None, {})).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    diff, cannot = isolation_error(model, pad_token_id=tok.pad_token_id, vocab_size=len(tok))
    assert cannot and "carry a state" in cannot and ("state-space" in cannot or "convolution" in cannot)
    leak = _logit_difference(model, pad_token_id=tok.pad_token_id, vocab_size=len(tok))
    assert leak > ISOLATION_TOLERANCE       # measured in fp32 on the bf16 weights
    assert leak < 5e-2                      # ... and below what a bf16 tolerance would have let through
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_dbrx_config_without_clip_qkv_is_a_clear_error_not_a_traceback(tmp_path, reverse_data):
    import json

    model_dir = save_arch("dbrx", tmp_path / "model")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["attn_config"]["clip_qkv"] = None
    (model_dir / "config.json").write_text(json.dumps(cfg))
    proc = _cli("train", f"model_name_or_path={model_dir}", f"train_file={reverse_data}",
                f"output_dir={tmp_path / 'run'}", "max_steps=1", "report_to=none", "max_seq_length=64")
    assert proc.returncode == 2, proc.stderr
    assert "clip_qkv" in proc.stderr and "Traceback" not in proc.stderr
