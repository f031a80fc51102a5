"""The engine: how this launch carries out the distributed part of a step, chosen once from the
launch environment (build_accelerator reads it). fit() and the Run call only this interface:

    DDPEngine    one process or DDP through accelerate: each rank holds the whole model
    FSDPEngine   FSDP2 (fullscale.sharding): parameters, gradients and AdamW states sharded
    ZeROEngine   DeepSpeed ZeRO 1-3 (fullscale.zero): the model is a DeepSpeed engine

Per micro-batch: `accumulating(last)` (gradients reduced across ranks only on the window's last
micro-batch) and `backward(loss)`; per window: `clip_grad_norm`, then `apply_update` or
`discard_update`. For checkpoints: `gathered_adapter` / `gathered_optimizer_state` (full tensors,
a collective on every rank under FSDP and ZeRO) and `load` (each rank keeps its part).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from fullscale import sharding, zero


class DDPEngine:
    """One process, or DDP through accelerate."""

    partitioned = False   # parameters or optimizer states split over ranks (a forward is then a collective)

    def __init__(self, accelerator, model, optimizer, *, max_grad_norm: float):
        self.accelerator, self.model, self.optimizer, self.max_grad_norm = accelerator, model, optimizer, max_grad_norm

    def accumulating(self, last: bool):
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """The window's global gradient norm before clipping; clipped to max_grad_norm (0: not clipped)."""
        if self.max_grad_norm > 0:
            return self.accelerator.clip_grad_norm_(params, self.max_grad_norm)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))

    def apply_update(self) -> None:
        """The optimizer step, and the gradients cleared for the next window."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard_update(self) -> None:
        """Drop the window's gradients: the update is not applied."""
        self.optimizer.zero_grad(set_to_none=True)

    def gathered_adapter(self) -> dict[str, torch.Tensor] | None:
        """The full adapter (None: the model holds it whole, peft saves it as is)."""
        return None

    def gathered_optimizer_state(self) -> dict[str, Any]:
        """The optimizer state in torch's format, full tensors."""
        return self.optimizer.state_dict()

    def load(self, unwrapped, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        """A checkpoint's adapter (as saved by peft) and optimizer state."""
        import peft

        peft.set_peft_model_state_dict(unwrapped, weights)
        self.optimizer.load_state_dict(optimizer_state)


class FSDPEngine(DDPEngine):
    """FSDP2: the adapter and its optimizer states are sharded; saving gathers them."""

    partitioned = True

    def accumulating(self, last: bool):
        return contextlib.nullcontext() if last else sharding.no_sync(self.model)

    def clip_grad_norm(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        return sharding.clip_grad_norm(params, self.max_grad_norm)

    def gathered_adapter(self) -> dict[str, torch.Tensor] | None:
        return sharding.trainable_state(self.model)

    def gathered_optimizer_state(self) -> dict[str, Any]:
        return sharding.optimizer_state(self.optimizer)

    def load(self, unwrapped, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        sharding.load_trainable_state(unwrapped, _by_name(unwrapped, weights))
        sharding.load_optimizer_state(self.optimizer, optimizer_state)


class ZeROEngine(DDPEngine):
    """DeepSpeed ZeRO: the model is a DeepSpeed engine and the optimizer its ZeRO optimizer."""

    partitioned = True

    def accumulating(self, last: bool):
        self.model.set_gradient_accumulation_boundary(last)   # DeepSpeed reduces into its partitions
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)   # fullscale normalises by the window's tokens

    def clip_grad_norm(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        return zero.grad_norm(self.model)   # DeepSpeed clips inside its step

    def apply_update(self) -> None:
        self.model.step()

    def discard_update(self) -> None:
        zero.discard_update(self.model, self.optimizer)

    def gathered_adapter(self) -> dict[str, torch.Tensor] | None:
        return zero.trainable_state(self.model)

    def gathered_optimizer_state(self) -> dict[str, Any]:
        return zero.optimizer_state(self.model, self.optimizer)

    def load(self, unwrapped, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        zero.load_state(self.model, self.optimizer, _by_name(unwrapped, weights), optimizer_state)


def _by_name(unwrapped, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved adapter's full tensors by parameter name (each rank then keeps its part)."""
    return {n: weights[sharding.adapter_key(n)] for n, p in unwrapped.named_parameters() if p.requires_grad}


def build_engine(accelerator, model, optimizer, *, fsdp, deepspeed, max_grad_norm: float) -> DDPEngine:
    """The engine for what the launch asked for (the FSDP or DeepSpeed plugin build_accelerator took
    over from accelerate, else DDP)."""
    kind = FSDPEngine if fsdp is not None else ZeROEngine if deepspeed is not None else DDPEngine
    return kind(accelerator, model, optimizer, max_grad_norm=max_grad_norm)
