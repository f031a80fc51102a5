"""fullscale.sharding under a real 2-process gloo group (the FSDP training runs are in test_resume.py)."""

import os
import re
import subprocess
from pathlib import Path

from conftest import torchrun

ROOT = Path(__file__).parents[2]


def test_full_states_round_trip_through_uneven_fsdp_shards():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(torchrun(Path(__file__).parent / "scripts" / "sharded_state_roundtrip.py"),
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    # The two ranks share the pipe: their lines may interleave.
    assert sorted(re.findall(r"([01]) ok", proc.stdout)) == ["0", "1"], proc.stdout


def test_the_launch_environment_decides_fsdp(monkeypatch):
    from fullscale import sharding

    for key in ("ACCELERATE_USE_FSDP", "FULLSCALE_USE_FSDP"):
        monkeypatch.setenv(key, "false")   # set through monkeypatch so that both are restored afterwards
    assert sharding.requested() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "SHARD_GRAD_OP")
    settings = sharding.take_over_from_accelerate()
    assert settings.version == 2 and not settings.reshard_after_forward and not settings.offload
    # accelerate no longer sees FSDP (it would shard a second time); the memory plan still does.
    assert os.environ["ACCELERATE_USE_FSDP"] == "false" and sharding.requested() is not None
    from fullscale.plan import Sharding

    assert Sharding.from_env().kind == "fsdp"


def test_the_launch_environment_decides_deepspeed(monkeypatch):
    from fullscale import zero

    for key in ("ACCELERATE_USE_DEEPSPEED", "FULLSCALE_USE_DEEPSPEED"):
        monkeypatch.setenv(key, "false")
    assert zero.requested() is None
    # What `accelerate launch --config_file configs/accelerate/deepspeed_zero3_offload.yaml` sets.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    settings = zero.take_over_from_accelerate()
    assert (settings.stage, settings.offload_optimizer, settings.offload_params) == (3, "cpu", "cpu")
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "false" and zero.requested() is not None
    from fullscale.config import Config
    from fullscale.plan import Sharding

    plan = Sharding.from_env()
    assert plan.kind == "zero3" and plan.offload_params and plan.offload_optimizer
    cfg = Config(gradient_accumulation_steps=3, max_grad_norm=0.5)
    ds = zero.engine_config(settings, cfg)
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
