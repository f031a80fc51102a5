"""FSDP for fullscale: the base model's weights sharded over the processes (PyTorch FSDP2,
`fully_shard`), with complete, ordinary checkpoints.

fullscale shards the model itself instead of handing it to accelerate's FSDP plugin, so the same
code runs on GPUs and, with the gloo backend, on CPUs (where the tests run it). It is asked for
the way users already ask for FSDP: `accelerate launch --config_file configs/accelerate/fsdp.yaml`
(which sets ACCELERATE_USE_FSDP and the FSDP_* variables), or those variables under torchrun.

What a checkpoint holds under FSDP is what it holds without it: the full adapter (gathered from
the shards: LoRA is small) and the full optimizer state in torch's own format (states keyed by
parameter index, as optimizer.state_dict() gives them), written by rank 0 under the same
crash-safe protocol; on resume every rank reads them and keeps its shard. The
frozen base weights are never gathered.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch

from fullscale.errors import ConfigError


@dataclass
class FSDPSettings:
    version: int = 2
    offload: bool = False              # sharded parameters and gradients in CPU RAM (GPU runs only)
    reshard_after_forward: bool = True
    layer_classes: list[str] = field(default_factory=list)   # empty: the model's _no_split_modules

    def describe(self) -> str:
        layers = ", ".join(self.layer_classes) or "the model's decoder layers"
        return (f"FSDP{self.version}: base weights sharded per {layers}"
                f"{', parameters offloaded to CPU' if self.offload else ''}"
                f"{'' if self.reshard_after_forward else ', not resharded after forward'}")


def env_flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    """A boolean launch variable as accelerate writes them ("true", "1", ...)."""
    value = env.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def requested(env: Mapping[str, str] | None = None) -> FSDPSettings | None:
    """The FSDP settings of this launch (accelerate's environment variables), or None."""
    env = os.environ if env is None else env
    if not (env_flag(env, "ACCELERATE_USE_FSDP") or env_flag(env, "FULLSCALE_USE_FSDP")):
        return None
    classes = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return FSDPSettings(version=int(env.get("FSDP_VERSION", "1") or 1),
                        offload=env_flag(env, "FSDP_OFFLOAD_PARAMS"),
                        reshard_after_forward=env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
                        not in ("false", "0", "no", "off", "shard_grad_op", "no_shard"),
                        layer_classes=[c.strip() for c in classes.split(",") if c.strip()])


def take_over_from_accelerate() -> FSDPSettings | None:
    """Read the FSDP request, then hide it from accelerate (it would shard the model a second
    time, and only on accelerator devices): accelerate then sets up plain multi-process."""
    settings = requested()
    if settings is not None:
        os.environ["ACCELERATE_USE_FSDP"] = "false"
        os.environ["FULLSCALE_USE_FSDP"] = "true"   # for the memory plan (fullscale.plan.Sharding)
    return settings


def check(settings: FSDPSettings, *, device: torch.device) -> None:
    problems = []
    if settings.version != 2:
        problems.append(f"FSDP version {settings.version}: fullscale shards with FSDP2 only; set fsdp_version: 2 in the "
                        "accelerate config (configs/accelerate/fsdp.yaml)")
    if settings.offload and device.type == "cpu":
        problems.append("fsdp_offload_params: true on a machine without a GPU: the parameters are in CPU RAM already; "
                        "use configs/accelerate/fsdp.yaml (no offload)")
    if problems:
        raise ConfigError(problems)


def shard(model: torch.nn.Module, settings: FSDPSettings, *, device: torch.device, num_processes: int) -> torch.nn.Module:
    """fully_shard each decoder layer, then the whole model (embeddings, norm, head). In place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    names = set(settings.layer_classes) or _no_split_modules(model)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        found = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__})
        raise ConfigError(f"FSDP: no module of class {sorted(names)} in the model to shard by; set "
                          f"fsdp_transformer_layer_cls_to_wrap in the accelerate config to one of {found}")
    mesh = init_device_mesh(device.type, (num_processes,))
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": settings.reshard_after_forward}
    if settings.offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _no_split_modules(model: torch.nn.Module) -> set[str]:
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(model: torch.nn.Module) -> Iterator[None]:
    """Inside an accumulation window: no gradient reduce-scatter until its last micro-batch."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local(t: torch.Tensor) -> torch.Tensor:
    """A full, ordinary tensor from a DTensor (a collective: every rank calls it), or t itself.
    An offloaded shard (in CPU RAM, on a GPU mesh) is gathered on the mesh's device (NCCL)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    mesh = t.device_mesh
    if t.device.type != mesh.device_type:
        t = DTensor.from_local(t.to_local().to(mesh.device_type), mesh, t.placements, run_check=False,
                               shape=t.shape, stride=t.stride())
    return t.full_tensor()


def _shard_of(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a full tensor, laid out as the DTensor `like` (no communication: every
    rank holds the full value), on like's device."""
    from torch.distributed.tensor import distribute_tensor

    mesh = like.device_mesh
    return distribute_tensor(value.to(mesh.device_type), mesh, like.placements).to_local().to(like.device)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full trainable (LoRA) parameters by name, on the CPU; every rank calls it, every rank
    gets it. The frozen base weights are not gathered."""
    return {n: local(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Put full tensors (by parameter name) into the sharded parameters: each rank keeps its shard."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            value = full[n].to(p.dtype)
            if isinstance(p, DTensor):
                p.to_local().copy_(_shard_of(value, p))
            else:
                p.copy_(value)


def adapter_key(name: str, adapter: str = "default") -> str:
    """A parameter name as peft saves it in adapter_model.safetensors (without the adapter name)."""
    return name.replace(f".{adapter}.", ".")


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with every sharded state gathered to a full CPU tensor (a collective:
    every rank calls it). The same format as without FSDP, so a run may resume under either."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: local(v).cpu() if torch.is_tensor(v) else v for k, v in state.items()}
                   for i, state in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
    """Load a full optimizer state: each rank keeps the shard of each state its parameter has."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, state in full["state"].items():
        p = params[int(i)]
        if not isinstance(p, DTensor):
            continue
        for k, v in state.items():
            if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape):
                state[k] = DTensor.from_local(_shard_of(v, p), p.device_mesh, p.placements, run_check=False,
                                              shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(full)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm over the shards (clipped in place when max_norm > 0), as a plain tensor."""
    if max_norm > 0:
        return local(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [local(p.grad).norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads))
