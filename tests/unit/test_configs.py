"""Every shipped config validates: configs/*.yaml with fullscale's loader, configs/accelerate/*.yaml
with accelerate's own loader and launch checks; and the example configs fit the GPUs their comments
name, by the plan (with local config.json files of the same architectures: no network)."""

from pathlib import Path

import pytest

from fullscale.config import load_config

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
EXPECTED_ACCELERATE = {"ddp.yaml", "fsdp.yaml", "fsdp_offload.yaml", "deepspeed_zero2.yaml",
                       "deepspeed_zero2_offload.yaml", "deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml"}


def test_the_shipped_configs_are_there():
    assert len(CONFIGS) >= 2
    assert EXPECTED_ACCELERATE <= {p.name for p in ACCELERATE}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_validates(path, monkeypatch):
    # Paths in the examples are relative to the repository root, where the README runs them.
    monkeypatch.chdir(ROOT)
    config = load_config(path.relative_to(ROOT))
    assert config.model_name_or_path and config.train_file
    assert Path(config.train_file).is_file()


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_every_accelerate_config_loads_and_passes_accelerate_launch_checks(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cfg = load_config_from_file(str(path))
    kind = str(cfg.distributed_type.value)
    assert kind == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[path.stem.split("_")[0]]
    assert cfg.num_processes >= 1 and cfg.mixed_precision in ("no", "bf16")
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "fullscale", "train", "x.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.use_fsdp == (kind == "FSDP") and args.use_deepspeed == (kind == "DEEPSPEED")
    if kind == "DEEPSPEED":
        ds = cfg.deepspeed_config
        assert ds["zero_stage"] == int(path.stem.split("zero")[1][0])
        assert (ds["offload_optimizer_device"] == "cpu") == path.stem.endswith("_offload")


@pytest.mark.parametrize("name", ["fsdp.yaml", "fsdp_offload.yaml"])
def test_fsdp_configs_make_an_fsdp2_plugin_wrapping_decoder_layers(name, monkeypatch):
    """What accelerate launch puts in the environment builds the plugin train() will get."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = ROOT / "configs" / "accelerate" / name
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "fullscale", "train", "x.yaml"])
    args, _, _ = _validate_launch_command(args)
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert ("CPUOffload" in type(plugin.cpu_offload).__name__) == (name == "fsdp_offload.yaml")
    # What fullscale reads from that environment (it shards the model itself: fullscale.sharding).
    from fullscale import sharding

    settings = sharding.requested()
    assert settings.version == 2 and settings.layer_classes == ["LlamaDecoderLayer"]
    assert settings.reshard_after_forward and settings.offload == (name == "fsdp_offload.yaml")


# ----------------------------------------------------------------------------- the examples fit their GPUs

LLAMA_31 = {  # the published architectures (config.json of meta-llama/Llama-3.1-8B and -70B)
    "meta-llama/Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8),
    "meta-llama/Llama-3.1-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                     num_attention_heads=64, num_key_value_heads=8),
}


@pytest.mark.parametrize("name, processes, launch", [
    ("llama-8b-lora.yaml", 1, None),
    ("multi-gpu.yaml", 8, None),
])
def test_the_example_configs_fit_80_gb_gpus_by_the_plan(name, processes, launch, tmp_path, monkeypatch):
    from transformers import LlamaConfig

    from fullscale.plan import Sharding, build_plan

    monkeypatch.chdir(ROOT)
    config = load_config(Path("configs") / name)
    arch = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                       tie_word_embeddings=False, **LLAMA_31[config.model_name_or_path])
    arch.save_pretrained(tmp_path / "model")
    local = load_config(Path("configs") / name, [f"model_name_or_path={tmp_path / 'model'}", "memory_budget_gb=80"])
    sharding = Sharding.from_accelerate_config(ROOT / "configs" / "accelerate" / launch)[0] if launch else Sharding()
    plan = build_plan(local, num_processes=processes, device="cuda", sharding=sharding)
    assert plan.dtype == "bfloat16"
    assert plan.fits, plan.refusal()


def test_the_configs_command_lists_copies_and_never_overwrites(tmp_path, capsys, monkeypatch):
    from fullscale.cli import main

    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert "llama-8b-lora.yaml" in listing and "accelerate/fsdp.yaml" in listing
    assert main(["configs", "llama-8b-lora.yaml", "accelerate/ddp.yaml", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "accelerate" / "ddp.yaml").is_file() and (tmp_path / "data" / "example.jsonl").is_file()
    # The copy works where it lands: its data path is relative to the file.
    monkeypatch.chdir(tmp_path.parent)
    config = load_config(tmp_path / "llama-8b-lora.yaml")
    assert Path(config.train_file) == tmp_path / "data" / "example.jsonl"
    before = (tmp_path / "llama-8b-lora.yaml").read_bytes()
    (tmp_path / "llama-8b-lora.yaml").write_text("# mine\n")
    assert main(["configs", "llama-8b-lora.yaml", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "llama-8b-lora.yaml").read_text() == "# mine\n" and before
    assert main(["configs", "no-such.yaml"]) == 2
