"""DeepSpeed ZeRO for fullscale: stages 1-3, with optimizer and parameter offload, behind the same
loop, checkpoints and exact resume as DDP and FSDP.

It is asked for the way users already ask for DeepSpeed: `accelerate launch --config_file
configs/accelerate/deepspeed_zero3.yaml` (which sets ACCELERATE_USE_DEEPSPEED and the
ACCELERATE_DEEPSPEED_* variables), or those variables under torchrun. fullscale reads them, hides
them from accelerate (which then sets up plain multi-process) and builds the DeepSpeed engine
itself from its own config: the micro-batch, accumulation and clipping come from the fullscale
config, so the two can never disagree silently. Without a GPU DeepSpeed runs on its CPU
accelerator with gloo, which is how the tests run every stage.

What a checkpoint holds under ZeRO is what it holds under DDP: the full adapter (the fp32 master
weights, gathered from their partitions) and the full AdamW state in torch's own format, written
by rank 0 under the same crash-safe protocol. On resume every rank reads them and DeepSpeed keeps
its partition, so a run may move between DDP, FSDP and any ZeRO stage. The frozen base weights are
never gathered.

The loop drives the engine as it drives DDP: fullscale normalises the loss by the label tokens of
the whole accumulation window (so DeepSpeed's own scaling by the accumulation steps is off), marks
the window's last micro-batch as the accumulation boundary, and reads the global gradient norm
before the update for the health checks. DeepSpeed clips by the same max_grad_norm inside its step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from fullscale.errors import ConfigError
from fullscale.sharding import env_flag

ADAM_STATES = ("exp_avg", "exp_avg_sq")


@dataclass
class ZeroSettings:
    stage: int = 2
    offload_optimizer: str = "none"     # none or cpu: AdamW states (and their update) in CPU RAM
    offload_params: str = "none"        # none or cpu (stage 3): partitioned base weights in CPU RAM
    gradient_accumulation_steps: str = ""   # as the accelerate config gives them ("" when absent)
    gradient_clipping: str = ""
    config_file: str = ""

    def describe(self) -> str:
        what = {1: "optimizer states", 2: "gradients and optimizer states",
                3: "weights, gradients and optimizer states"}.get(self.stage, "?")
        off = [w for w, d in (("optimizer", self.offload_optimizer), ("parameters", self.offload_params)) if d == "cpu"]
        return f"DeepSpeed ZeRO-{self.stage}: {what} partitioned" + (
            f", {' and '.join(off)} offloaded to CPU" if off else "")


def requested(env: Mapping[str, str] | None = None) -> ZeroSettings | None:
    """The DeepSpeed settings of this launch (accelerate's environment variables), or None."""
    env = os.environ if env is None else env
    if not (env_flag(env, "ACCELERATE_USE_DEEPSPEED") or env_flag(env, "FULLSCALE_USE_DEEPSPEED")):
        return None
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2").strip() or "2"
    return ZeroSettings(stage=int(stage) if stage.isdigit() else -1,
                        offload_optimizer=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower() or "none",
                        offload_params=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower() or "none",
                        gradient_accumulation_steps=env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "").strip(),
                        gradient_clipping=env.get("ACCELERATE_GRADIENT_CLIPPING", "").strip(),
                        config_file=env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip())


def take_over_from_accelerate() -> ZeroSettings | None:
    """Read the DeepSpeed request, then hide it from accelerate (fullscale builds the engine)."""
    settings = requested()
    if settings is not None:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
        os.environ["FULLSCALE_USE_DEEPSPEED"] = "true"   # for the memory plan (fullscale.plan.Sharding)
    return settings


def check(settings: ZeroSettings, config) -> None:
    """Every setting fullscale cannot honour, at once (exit 2 before the model is loaded)."""
    problems = []
    try:
        import_deepspeed()
    except ImportError as exc:
        problems.append(f"this launch asks for DeepSpeed, which cannot be imported ({exc}); pip install deepspeed, "
                        "or launch with configs/accelerate/ddp.yaml or fsdp.yaml")
    if settings.stage not in (1, 2, 3):
        problems.append(f"zero_stage {settings.stage}: fullscale runs ZeRO stages 1, 2 and 3; set zero_stage in the "
                        "accelerate config's deepspeed_config")
    for key, value in (("offload_optimizer_device", settings.offload_optimizer),
                       ("offload_param_device", settings.offload_params)):
        if value not in ("none", "cpu"):
            problems.append(f"{key}: {value}: fullscale offloads to cpu only (none or cpu)")
    if settings.offload_params == "cpu" and settings.stage != 3:
        problems.append(f"offload_param_device: cpu needs zero_stage 3 (the config has {settings.stage}); DeepSpeed "
                        "partitions and offloads the weights only at stage 3")
    if settings.config_file and settings.config_file.lower() != "none":
        problems.append(f"deepspeed_config_file {settings.config_file}: fullscale builds the DeepSpeed config from "
                        "its own settings; give zero_stage, offload_optimizer_device and offload_param_device in the "
                        "accelerate config's deepspeed_config instead (configs/accelerate/deepspeed_*.yaml)")
    if settings.gradient_accumulation_steps not in ("", "auto"):
        try:
            steps = int(settings.gradient_accumulation_steps)
        except ValueError:
            steps = None
        if steps != config.gradient_accumulation_steps:
            problems.append(f"the accelerate config sets gradient_accumulation_steps: {settings.gradient_accumulation_steps} "
                            f"but the fullscale config has gradient_accumulation_steps: {config.gradient_accumulation_steps}; "
                            "make them equal (or remove it from the accelerate config)")
    if settings.gradient_clipping not in ("", "auto", "none"):
        try:
            clip = float(settings.gradient_clipping)
        except ValueError:
            clip = None
        if clip != float(config.max_grad_norm):
            problems.append(f"the accelerate config sets gradient_clipping: {settings.gradient_clipping} but the "
                            f"fullscale config has max_grad_norm: {config.max_grad_norm}; make them equal (or remove "
                            "it from the accelerate config)")
    if problems:
        raise ConfigError(problems)


def import_deepspeed():
    """deepspeed, on its CPU accelerator where there is no GPU, with its per-step logging quiet."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def engine_config(settings: ZeroSettings, config) -> dict[str, Any]:
    """The DeepSpeed config, from the fullscale config. DeepSpeed runs in fp32 mode: fullscale has
    already chosen the weights' dtype (its bf16 key) and keeps the adapter in fp32."""
    pin = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": settings.stage}
    if settings.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if settings.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": float(config.max_grad_norm),
        "zero_optimization": zero,
        # fullscale's torch AdamW over the adapter: its states are small, so DeepSpeed's CPU Adam
        # (a compiled op) is not needed for offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, settings: ZeroSettings, config):
    """The DeepSpeed engine around the (peft) model, and its ZeRO optimizer around fullscale's AdamW.
    The learning-rate scheduler stays fullscale's: built on the same AdamW, whose param groups
    ZeRO keeps. The AdamW states are created now (as torch would at the first step), so a
    checkpoint can be loaded into them before any update."""
    deepspeed = import_deepspeed()
    if not torch.distributed.is_initialized():
        # One process started without a launcher: DeepSpeed still needs a process group.
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.setdefault("LOCAL_RANK", "0")
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                             init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                        config=engine_config(settings, config))
    inner = zero_optimizer.optimizer
    for flat in _flat_partitions(zero_optimizer):
        if not inner.state.get(flat):
            inner.state[flat] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                 **{k: torch.zeros_like(flat, memory_format=torch.preserve_format)
                                    for k in ADAM_STATES}}
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)   # stages 1-2: map the
    if link is not None:                                                         # states per parameter
        link()
    return engine, zero_optimizer


def _flat_partitions(zero_optimizer) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, the tensors AdamW updates (stage 3 hands them to
    AdamW one sub-group at a time, so its param groups are empty between steps)."""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        flats = getattr(zero_optimizer, attr, None)
        if flats is not None:
            return list(flats)
    raise RuntimeError(f"unknown ZeRO optimizer {type(zero_optimizer).__name__}: fullscale cannot find its fp32 "
                       "partitions (a DeepSpeed version fullscale was not tested with?)")


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether the weights are partitioned over the processes (ZeRO-3)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def grad_norm(engine) -> torch.Tensor:
    """The global L2 norm of the window's gradients, before DeepSpeed clips and steps (a collective:
    every rank calls it, every rank gets it)."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    params = [p for _, p in _trainable(engine)]
    if is_partitioned(engine.module):
        # ZeRO-3: this rank's partition of each gradient, then one all-reduce of the squares.
        squares = torch.stack([safe_get_local_grad(p).float().square().sum() for p in params]).sum()
        torch.distributed.all_reduce(squares)
        return squares.sqrt()
    return torch.linalg.vector_norm(torch.stack([safe_get_full_grad(p).float().norm() for p in params]))


def trainable_state(engine) -> dict[str, torch.Tensor]:
    """The full fp32 adapter weights by parameter name, on the CPU (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in _trainable(engine)}


def optimizer_state(engine, zero_optimizer) -> dict[str, Any]:
    """The AdamW state as torch's optimizer.state_dict() of the adapter parameters writes it (a
    collective), so DDP, FSDP and DeepSpeed checkpoints are one format."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = zero_optimizer.optimizer
    step = next(iter(inner.state.values()))["step"]
    params = _trainable(engine)
    state = {i: {"step": step.detach().cpu().clone(),
                 **{k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in ADAM_STATES}}
             for i, (_, p) in enumerate(params)}
    group = {k: v for k, v in inner.param_groups[0].items() if k != "params"}
    return {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]}


def load_state(engine, zero_optimizer, trainable: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> None:
    """Put full adapter weights and a full AdamW state (both by the order and names of the trainable
    parameters) into the engine: the fp32 masters, the weights the forward uses, and the states;
    each rank keeps its partition."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = _trainable(engine)
    with torch.no_grad():
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0,
                                               enabled=is_partitioned(engine.module)):
            for n, p in params:
                p.data.copy_(trainable[n].to(p.dtype).reshape(p.data.shape))
        for i, (n, p) in enumerate(params):
            safe_set_full_fp32_param(p, trainable[n].float().to(p.device))
            state = optimizer["state"].get(i) or optimizer["state"].get(str(i))
            if state is None:
                continue
            for k in ADAM_STATES:
                safe_set_full_optimizer_state(p, state[k].float().to(p.device), k)
    inner = zero_optimizer.optimizer
    first = optimizer["state"].get(0) or optimizer["state"].get("0")
    for flat_state in inner.state.values():
        if first is not None:
            flat_state["step"] = torch.as_tensor(first["step"], dtype=torch.float32).clone().cpu()
    saved_group = {k: v for k, v in optimizer["param_groups"][0].items() if k != "params"}
    for group in inner.param_groups:
        group.update({k: v for k, v in saved_group.items() if k in group or k == "initial_lr"})


def discard_update(engine, zero_optimizer) -> None:
    """Drop the window's gradients without changing the model or the optimizer (a skipped or rolled-
    back step). DeepSpeed holds the reduced gradients in its own buffers until its step, so the
    step runs and everything it touched is put back: one code path for every stage and offload."""
    keep = trainable_state(engine), optimizer_state(engine, zero_optimizer)
    engine.step()
    load_state(engine, zero_optimizer, *keep)
