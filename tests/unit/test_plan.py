"""The planner's arithmetic against the real tensors: bytes of weights, adapter, gradients and
AdamW states exactly; the activations autograd keeps exactly; the recommendation and the checks."""

import re
import time

import pytest
import torch

from fullscale import plan as P
from fullscale.config import load_config
from fullscale.errors import ConfigError

CPU = torch.device("cpu")


def make_config(model_dir, **values):
    base = {"model_name_or_path": str(model_dir), "report_to": "none", "memory_budget_gb": 16}
    base.update(values)
    return load_config(None, base)


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """Tiny Llamas saved with save_pretrained: the tests' usual one, a wider one with tied
    embeddings, and only a config.json (no weights)."""
    from tiny import save_tiny_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("plan-models")
    dirs = {"tiny": save_tiny_model(root / "tiny", hidden_size=64, num_layers=2)}
    tied = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(tied).save_pretrained(root / "tied")
    dirs["tied"] = root / "tied"
    (root / "config-only").mkdir()
    (root / "config-only" / "config.json").write_text((dirs["tiny"] / "config.json").read_text())
    dirs["config-only"] = root / "config-only"
    return dirs


# ----------------------------------------------------------------------------- exact bytes

@pytest.mark.parametrize("model, values", [
    ("tiny", {}),
    ("tiny", {"lora_target_modules": "all-linear", "lora_rank": 8}),
    ("tiny", {"bf16": True, "lora_rank": 4, "lora_target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("tied", {"lora_target_modules": "all-linear", "lora_rank": 16}),
])
def test_weights_adapter_gradients_and_adamw_states_equal_the_real_tensors_bytes(llama_dirs, model, values):
    from fullscale.loss import token_loss_sum
    from fullscale.model import build_model, choose
    from fullscale.train import build_optimizer

    config = make_config(llama_dirs[model], **values)
    plan = P.build_plan(config, device=CPU)
    shape, memory = plan.model, plan.memory

    real = build_model(config, choose(config, CPU))
    optimizer = build_optimizer(real, config)
    ids = torch.randint(0, shape.vocab_size, (2, 12))
    loss, count = token_loss_sum(real(input_ids=ids).logits, ids)
    (loss / count).backward()
    optimizer.step()

    frozen = [p for p in real.parameters() if not p.requires_grad]
    trainable = [p for p in real.parameters() if p.requires_grad]
    assert sum(p.nbytes for p in frozen) == shape.weight_bytes
    assert sum(b.nbytes for b in real.buffers()) == shape.buffer_bytes
    assert memory.weights == shape.weight_bytes + shape.buffer_bytes
    assert sum(p.nbytes for p in trainable) == shape.lora_bytes == memory.lora
    assert len(trainable) == shape.lora_tensors
    assert sum(p.grad.nbytes for p in trainable) == memory.gradients
    states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    assert sum(t.nbytes for t in states) == memory.optimizer
    # The adapter by the textbook formula: r x (in + out) per adapted Linear, fp32.
    per_layer = sum(li.lora_rank * (li.in_features + li.out_features) for li in shape.linears)
    assert per_layer * shape.num_layers * 4 == shape.lora_bytes


# ----------------------------------------------------------------------------- activations, exactly

def _saved_bytes(model, batch, params) -> int:
    """Bytes of the distinct storages autograd keeps for the backward (parameters excluded)."""
    from fullscale.loss import token_loss_sum

    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(**batch, use_cache=False).logits
        token_loss_sum(logits, batch["input_ids"])
    return sum(seen.values())


@pytest.mark.parametrize("values, attn", [
    ({}, "sdpa"),
    ({"lora_dropout": 0.0, "lora_target_modules": "all-linear"}, "sdpa"),
    ({"bf16": True, "lora_target_modules": "all-linear"}, "sdpa"),
    ({"bf16": True, "lora_dropout": 0.0}, "sdpa"),
    ({"lora_target_modules": ["gate_proj", "down_proj"]}, "sdpa"),
    ({"lora_dropout": 0.0}, "eager"),
])
def test_the_activation_formula_equals_what_autograd_saves(llama_dirs, values, attn):
    from fullscale.model import build_model, choose

    config = make_config(llama_dirs["tiny"], attn_implementation=attn, gradient_checkpointing=False, **values)
    shape = P.inspect_model(config, dtype=choose(config, CPU).dtype, attn_implementation=attn)
    model = build_model(config, choose(config, CPU))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    b, t = 3, 24
    ids = torch.randint(0, shape.vocab_size, (b, t))
    mask = torch.ones_like(ids)
    mask[1:, -5:] = 0  # padded rows: the mask path real batches take
    measured = _saved_bytes(model, {"input_ids": ids, "attention_mask": mask}, params)

    w = P.Workload(batch=b, seq=t, gradient_checkpointing=False, dropout=config.lora_dropout, attn=attn,
                   padded=True, mask_bytes=shape.lora_dtype_bytes)
    est = P.estimate_activations(shape, w)
    # The loss over full logits (the path without LabelledHead): fp32 log-softmax + int64 targets
    # at every position (labels are shifted, the last position has none).
    loss_saved = b * t * shape.vocab_size * 4 + b * t * 8
    if attn == "eager":
        est_saved = est.saved - b * t * t * shape.dtype_bytes   # the additive mask is held, not saved
    else:
        est_saved = est.saved
    assert abs(measured - (est_saved + loss_saved)) <= 64, (measured, est_saved + loss_saved)


def test_checkpointing_keeps_only_layer_inputs_and_costs_one_layer_in_the_backward(llama_dirs):
    config = make_config(llama_dirs["tiny"])
    shape = P.inspect_model(config, dtype=torch.float32)
    kw = dict(batch=4, seq=64, dropout=0.05, attn="sdpa", padded=True, mask_bytes=4)
    off = P.estimate_activations(shape, P.Workload(gradient_checkpointing=False, **kw))
    on = P.estimate_activations(shape, P.Workload(gradient_checkpointing=True, **kw))
    n = 4 * 64
    layer, _ = P._layer_saved(shape, P.Workload(gradient_checkpointing=False, **kw), x_rg=True)
    assert on.saved < off.saved
    assert on.saved >= shape.num_layers * n * shape.hidden_size * 4
    assert on.peak >= on.saved + layer - n * shape.hidden_size * 4
    assert on.logits == off.logits


# ----------------------------------------------------------------------------- recommendation and checks

def test_a_tight_budget_gets_settings_that_fit_the_same_effective_batch(llama_dirs):
    big = make_config(llama_dirs["tiny"], per_device_train_batch_size=32, gradient_accumulation_steps=2,
                      max_seq_length=512, gradient_checkpointing=False, per_device_eval_batch_size=64)
    unlimited = P.build_plan(big, device=CPU)
    budget = (unlimited.memory.weights + unlimited.memory.optimizer) * 3 + unlimited.memory.train_peak // 6
    tight = make_config(llama_dirs["tiny"], per_device_train_batch_size=32, gradient_accumulation_steps=2,
                        max_seq_length=512, gradient_checkpointing=False, per_device_eval_batch_size=64,
                        memory_budget_gb=budget / P.GB, memory_margin=0.1)
    plan = P.build_plan(tight, device=CPU)
    assert not plan.fits
    r = plan.recommendation
    assert r is not None
    assert r.per_device_train_batch_size * r.gradient_accumulation_steps == 64
    assert plan.recommended_memory.peak <= plan.usable
    assert r.per_device_train_batch_size < 32


def test_the_largest_eval_batch_that_fits_is_reported_and_respects_the_budget(llama_dirs):
    roomy = P.build_plan(make_config(llama_dirs["tiny"], max_seq_length=512), device=CPU)
    assert any(f"per_device_eval_batch_size up to {P.EVAL_BATCH_LIMIT} fits (now 8)" in n for n in roomy.notes)
    # A budget with room for the training state and only a little more evaluation.
    base = make_config(llama_dirs["tiny"], max_seq_length=512)
    shape = P.inspect_model(base, dtype=torch.float32)
    target = P.Target(shape=shape, device_type="cpu", attn="sdpa", seq=512, dropout=base.lora_dropout,
                      num_processes=1, packing=False, sharding=P.Sharding())
    current = P.Settings(8, 4, True, 8)
    budget = target.memory(P.Settings(8, 4, True, 32)).peak
    assert P.largest_eval_batch(target, current, usable=budget) == 32
    assert P.largest_eval_batch(target, current, usable=target.memory(current).peak - 1) is None


def test_without_checkpointing_wins_when_it_fits_the_same_micro_batch(llama_dirs):
    config = make_config(llama_dirs["tiny"], per_device_train_batch_size=4, gradient_accumulation_steps=4,
                         gradient_checkpointing=True, max_seq_length=128)
    plan = P.build_plan(config, device=CPU)
    assert plan.fits
    assert plan.recommendation.gradient_checkpointing is False
    assert plan.recommendation.per_device_train_batch_size == 16


def test_nothing_fits_says_so_and_names_the_longest_sequence_that_would(llama_dirs):
    config = make_config(llama_dirs["tiny"], max_seq_length=4096, memory_budget_gb=0.02)
    plan = P.build_plan(config, device=CPU)
    assert not plan.fits and plan.recommendation is None
    assert plan.max_seq_length_that_fits is not None and plan.max_seq_length_that_fits < 4096
    assert "fsdp" in plan.refusal()


def test_check_plan_is_fast_needs_only_config_json_and_can_be_overridden(llama_dirs, monkeypatch):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("check_plan loaded model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    config = make_config(llama_dirs["config-only"])
    P.check_plan(config, num_processes=1, device=CPU)          # imports warm
    start = time.perf_counter()
    plan = P.check_plan(config, num_processes=1, device=CPU)
    assert time.perf_counter() - start < 1.0
    assert plan.fits
    tight = make_config(llama_dirs["config-only"], memory_budget_gb=0.001, max_seq_length=2048)
    with pytest.raises(ConfigError) as err:
        P.check_plan(tight, num_processes=1, device=CPU)
    assert "does not fit" in str(err.value)
    off = make_config(llama_dirs["config-only"], memory_budget_gb=0.001, max_seq_length=2048, plan_check=False)
    assert not P.check_plan(off, num_processes=1, device=CPU).fits


def test_the_refusal_names_the_overrides_to_copy(llama_dirs):
    tight = make_config(llama_dirs["tiny"], memory_budget_gb=0.05, max_seq_length=2048,
                        per_device_train_batch_size=8, gradient_checkpointing=False)
    with pytest.raises(ConfigError) as err:
        P.check_plan(tight, num_processes=1, device=CPU)
    text = str(err.value)
    found = dict(re.findall(r"(per_device_train_batch_size|gradient_accumulation_steps|gradient_checkpointing|"
                            r"per_device_eval_batch_size)=(\w+)", text))
    assert set(found) == {"per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
                          "per_device_eval_batch_size"}
    assert int(found["per_device_train_batch_size"]) * int(found["gradient_accumulation_steps"]) == 8 * 4


def test_new_keys_are_validated():
    with pytest.raises(ConfigError) as err:
        load_config(None, {"memory_budget_gb": 0, "memory_margin": 1.0, "report_to": "none"})
    assert "memory_budget_gb" in str(err.value) and "memory_margin" in str(err.value)
    c = load_config(None, {"memory_budget_gb": "40", "plan_check": False, "report_to": "none"})
    assert c.memory_budget_gb == 40.0 and c.plan_check is False


def test_a_gpu_can_be_planned_without_one_given_its_memory(llama_dirs):
    config = make_config(llama_dirs["tiny"], memory_budget_gb=80)
    plan = P.build_plan(config, device="cuda")
    assert plan.device == "cuda" and plan.dtype == "bfloat16"
    assert plan.memory.runtime == P.CUDA_RUNTIME_BYTES
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="memory_budget_gb"):
            P.build_plan(make_config(llama_dirs["tiny"], memory_budget_gb=None), device="cuda")


# ----------------------------------------------------------------------------- sharding

def test_fsdp_shards_the_layers_and_the_adapter_over_the_processes(llama_dirs):
    config = make_config(llama_dirs["tied"], memory_budget_gb=80)
    ddp = P.build_plan(config, device=CPU, num_processes=4)
    fsdp = P.build_plan(config, device=CPU, num_processes=4, sharding=P.Sharding("fsdp"))
    shape = ddp.model
    layers = shape.layer_bytes * shape.num_layers
    rest = shape.weight_bytes + shape.buffer_bytes - layers
    assert fsdp.memory.weights == rest + 2 * shape.layer_bytes + layers // 4
    assert fsdp.memory.optimizer == -(-ddp.memory.optimizer // 4)
    assert ddp.memory.gradients == 2 * shape.lora_bytes  # DDP's buckets
    offload = P.build_plan(config, device=CPU, num_processes=4,
                           sharding=P.Sharding("fsdp", offload_params=True, offload_optimizer=True))
    assert offload.memory.weights == rest + 2 * shape.layer_bytes and offload.memory.optimizer == 0


def test_sharding_is_read_from_accelerate_launch_environment_and_config_files():
    assert P.Sharding.from_env({}) == P.Sharding()
    assert P.Sharding.from_env({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}) == \
        P.Sharding("fsdp", offload_params=True, offload_optimizer=True)
    assert P.Sharding.from_env({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                                "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}) == \
        P.Sharding("zero3", offload_optimizer=True)
    from pathlib import Path

    root = Path(__file__).parents[2] / "configs" / "accelerate"
    assert P.Sharding.from_accelerate_config(root / "fsdp.yaml") == (P.Sharding("fsdp"), 8)
    assert P.Sharding.from_accelerate_config(root / "deepspeed_zero2_offload.yaml")[0] == \
        P.Sharding("zero2", offload_optimizer=True)
    assert P.Sharding.from_accelerate_config(root / "ddp.yaml")[0] == P.Sharding()


def test_the_table_and_json_show_every_row(llama_dirs):
    import json

    plan = P.build_plan(make_config(llama_dirs["tiny"]), device=CPU)
    table = P.format_plan(plan)
    for word in ("weights", "LoRA adapter", "gradients", "AdamW", "activations", "logits", "evaluation peak",
                 "fits", "disk", "decoder layer LlamaDecoderLayer"):
        assert word in table
    data = json.loads(json.dumps(plan.to_dict(), default=str))
    assert data["fits"] is True and data["memory"]["peak"] == plan.memory.peak
    assert data["disk"]["needed_bytes"] > 0


def test_pin_cpu_allocator_reports_whether_it_could():
    import platform
    import subprocess
    import sys

    # In a child process: the setting lasts for the process's life.
    out = subprocess.run([sys.executable, "-c", "from fullscale.plan import pin_cpu_allocator; "
                          "print(pin_cpu_allocator())"], capture_output=True, text=True, check=True).stdout
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out.strip() == str(glibc)


def test_the_cpu_allocator_is_pinned_only_when_memory_is_tight(llama_dirs):
    roomy = P.build_plan(make_config(llama_dirs["tiny"], memory_budget_gb=16), device=CPU)
    assert not roomy.pin_allocator
    peak = roomy.memory.peak
    tight = P.build_plan(make_config(llama_dirs["tiny"], memory_budget_gb=2 * peak / P.GB), device=CPU)
    assert tight.fits and tight.pin_allocator
    gpu = P.build_plan(make_config(llama_dirs["tiny"], memory_budget_gb=2 * peak / P.GB), device="cuda")
    assert not gpu.pin_allocator
