import torch

from fullscale.config import load_config
from fullscale.model import add_lora, choose, count_parameters, enable_gradient_checkpointing


def test_auto_settings_on_cpu_are_fp32_sdpa_and_no_tf32():
    c = choose(load_config(None, {}), torch.device("cpu"))
    assert c.dtype == torch.float32 and c.attn_implementation == "sdpa" and c.tf32 is False


def test_a_missing_optional_kernel_falls_back_to_sdpa_instead_of_crashing():
    c = choose(load_config(None, {"attn_implementation": "flash_attention_2"}), torch.device("cpu"))
    assert c.attn_implementation == "sdpa"


def test_bf16_true_is_honoured():
    assert choose(load_config(None, {"bf16": True}), torch.device("cpu")).dtype == torch.bfloat16


def test_lora_with_the_default_settings_trains_only_adapters_and_checkpointing_keeps_grads():
    from tiny import make_model

    model = make_model()
    enable_gradient_checkpointing(model)
    model = add_lora(model, load_config(None, {"lora_dropout": 0.0}))
    trainable, total = count_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # r=32 on q, k, v, o of 2 layers (hidden 32, kv 16): sum of r*(in+out)
    assert trainable == 2 * 32 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))
    model.train()
    ids = torch.randint(0, 100, (2, 12))
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_unknown_target_modules_name_the_model_linear_layers():
    import pytest

    from fullscale.errors import ModelError
    from tiny import make_model

    with pytest.raises(ModelError, match="q_proj"):
        add_lora(make_model(), load_config(None, {"lora_target_modules": ["query"]}))
