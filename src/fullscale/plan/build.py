"""The plan of a run: build_plan (every row, the verdict, a recommendation that fits), the
checks train() runs before loading the weights (check_model, check_plan)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from fullscale.config import Config
from fullscale.errors import ConfigError
from fullscale.plan.memory import CPU_HEAP_FACTOR, SATURATING_TOKENS, MemoryEstimate, Settings, Sharding, Target
from fullscale.plan.resources import DataEstimate, DiskEstimate, _choices, device_memory, estimate_data, estimate_disk
from fullscale.plan.shape import GB, MB, ModelShape, _load_model_config, _text_config, inspect_model

# ----------------------------------------------------------------------------- the plan

@dataclass
class Timing:
    """From --probe: real steps of the real model on synthetic tokens of the longest batch."""

    micro_step_seconds: float
    optimizer_seconds: float
    step_seconds: float
    eval_batch_seconds: float
    measured_peak_bytes: int | None      # CUDA: peak allocated; CPU: peak RSS of a micro-step above the loaded model
    planned_peak_bytes: int              # the plan's number for the same quantity
    allocator_pinned: bool               # CPU: whether the probe pinned glibc's allocator
    num_steps: int
    num_evals: int
    eval_batches: int
    total_seconds: float


@dataclass
class Plan:
    """Memory, disk and (with a probe) time for one config on one kind of device."""

    config_source: str
    model: ModelShape
    device: str
    device_memory: int
    memory_source: str
    margin: float
    num_processes: int
    sharding: Sharding
    dtype: str
    attn_implementation: str
    max_seq_length: int
    target_batch: int
    settings: Settings
    memory: MemoryEstimate
    without_checkpointing: MemoryEstimate
    with_checkpointing: MemoryEstimate
    recommendation: Settings | None
    recommended_memory: MemoryEstimate | None
    max_seq_length_that_fits: int | None
    disk: DiskEstimate
    data: DataEstimate | None = None
    timing: Timing | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return int(self.device_memory * (1 - self.margin))

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.usable

    @property
    def pin_allocator(self) -> bool:
        """On the CPU: whether glibc's default heap (up to CPU_HEAP_FACTOR x the live tensors) could
        outgrow the usable memory, so that the allocator should be pinned (pin_cpu_allocator) for
        the resident memory to stay at the estimate. Pinning costs speed on small tensors, so a run
        with room to spare keeps glibc's default."""
        return self.device == "cpu" and self.memory.peak * CPU_HEAP_FACTOR > self.usable

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"].pop("linears", None)
        for key in ("memory", "without_checkpointing", "with_checkpointing", "recommended_memory"):
            est = getattr(self, key)
            if est is not None:
                out[key].update(train_peak=est.train_peak, eval_peak=est.eval_peak, peak=est.peak)
        out["disk"]["fits"] = self.disk.fits
        out.update(usable=self.usable, fits=self.fits, pin_allocator=self.pin_allocator)
        return out

    def refusal(self) -> str:
        """The error text when the run does not fit: what, by how much, and settings that fit."""
        m = self.memory
        which = "evaluation" if m.eval_peak > m.train_peak else "training"
        text = (f"the run does not fit in the memory of one {self.device} process: estimated {which} peak "
                f"{_size(m.peak)} (weights {_size(m.weights)}, activations {_size(m.activations)}, logits {_size(m.logits)}, "
                f"evaluation batch {_size(m.eval)}) > {_size(self.usable)} usable ({_size(self.device_memory)} from "
                f"{self.memory_source}, less a {self.margin:.0%} margin).")
        if self.recommendation is not None:
            r = self.recommendation
            text += (f" Settings that fit the same effective batch of {self.target_batch} (peak "
                     f"{_size(self.recommended_memory.peak)}): {r.overrides()}.")
        else:
            text += " Nothing fits, even batch 1 with gradient checkpointing"
            if self.max_seq_length_that_fits:
                text += f" (max_seq_length {self.max_seq_length_that_fits} would)"
            text += ("; shard the model over several GPUs (accelerate launch --config_file "
                     "configs/accelerate/fsdp.yaml, or deepspeed_zero3_offload.yaml), or use a larger device.")
        return text + " `fullscale plan CONFIG.yaml` shows the table; plan_check: false starts anyway."


def _size(n: int | float) -> str:
    return f"{n / GB:.2f} GB" if abs(n) >= GB else f"{n / MB:.1f} MB"


def build_plan(config: Config, *, num_processes: int = 1, device: torch.device | str | None = None,
               target_batch: int | None = None, config_source: str = "", sharding: Sharding | None = None) -> Plan:
    """Estimate memory and disk for `config` on `device` (default: cuda when available, else cpu),
    and find settings that fit. `sharding` defaults to what `accelerate launch` set in the
    environment (DDP when nothing). Reads config.json only; loads no weights."""
    sharding = sharding or Sharding.from_env()
    device = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = _choices(config, device)
    shape = inspect_model(config, dtype=choices.dtype, attn_implementation=choices.attn_implementation)
    memory_bytes, source = device_memory(config, device, num_processes=num_processes)
    target = Target(shape=shape, device_type=device.type, attn=choices.attn_implementation,
                    seq=config.max_seq_length, dropout=config.lora_dropout, num_processes=num_processes,
                    packing=config.packing, sharding=sharding)
    current = Settings(config.per_device_train_batch_size, config.gradient_accumulation_steps,
                       config.gradient_checkpointing, config.per_device_eval_batch_size)
    effective = config.per_device_train_batch_size * num_processes * config.gradient_accumulation_steps
    target_batch = target_batch or effective
    usable = int(memory_bytes * (1 - config.memory_margin))
    memory = target.memory(current)
    recommendation = recommend(target, current, target_batch=target_batch, usable=usable)
    notes = []
    if target_batch % num_processes:
        notes.append(f"target batch {target_batch} is not a multiple of {num_processes} processes; "
                     f"the recommendation rounds it up")
    if not shape.llama_like:
        notes.append(f"the activation formula is exact for Llama-family layers; {shape.model_type} layers "
                     "differ, so the activation rows are an estimate (check with --probe)")
    if num_processes > 1 and sharding.kind == "ddp":
        notes.append(f"per process under DDP (each of the {num_processes} holds the whole model); FSDP or ZeRO-3 "
                     f"(plan with --accelerate-config configs/accelerate/fsdp.yaml) shard the weights "
                     f"({_size(memory.weights)})")
    if sharding.kind != "ddp":
        notes.append(f"{sharding.describe()}: the sharded rows are an estimate that this project has not "
                     "measured on GPUs; check with --probe under accelerate launch")
    if device.type == "cpu":
        notes.append(f"CPU rows are live tensor bytes; glibc's default heap can hold up to {CPU_HEAP_FACTOR:g}x "
                     "more (fragmentation), so when that could outgrow the RAM the run pins the allocator "
                     "(pin_cpu_allocator: resident memory = the tensors, slower on small tensors)")
    eval_batch = largest_eval_batch(target, current, usable=usable)
    if eval_batch is not None and eval_batch >= 2 * current.per_device_eval_batch_size:
        notes.append(f"evaluation keeps no gradients: per_device_eval_batch_size up to {eval_batch} fits (now "
                     f"{current.per_device_eval_batch_size}); a larger eval batch evaluates faster")
    disk = estimate_disk(shape, config)
    if not disk.fits:
        notes.append(f"not enough disk at {disk.path}: checkpoints need about {_size(disk.needed_bytes)}, "
                     f"{_size(disk.free_bytes)} free; lower save_total_limit or free space")
    return Plan(
        config_source=config_source, model=shape, device=device.type, device_memory=memory_bytes,
        memory_source=source, margin=config.memory_margin, num_processes=num_processes, sharding=sharding,
        dtype=str(choices.dtype).replace("torch.", ""), attn_implementation=choices.attn_implementation,
        max_seq_length=config.max_seq_length, target_batch=target_batch, settings=current, memory=memory,
        without_checkpointing=target.memory(replace(current, gradient_checkpointing=False)),
        with_checkpointing=target.memory(replace(current, gradient_checkpointing=True)),
        recommendation=recommendation,
        recommended_memory=target.memory(recommendation) if recommendation else None,
        max_seq_length_that_fits=None if recommendation else _longest_that_fits(target, usable),
        disk=disk, data=estimate_data(config), notes=notes)


def recommend(target: Target, current: Settings, *, target_batch: int, usable: int) -> Settings | None:
    """The fastest settings that fit `usable` bytes for the effective batch `target_batch`.

    Per process the batch is split into micro-batch x accumulation (the micro-batch a divisor of
    it). Checkpointing recomputes the forward (about a third more compute), so the largest
    micro-batch that fits without it wins, unless checkpointing fits a larger one and the one
    without holds fewer than SATURATING_TOKENS tokens (too small to keep a GPU busy).
    The eval batch is the largest (halving from the configured one) that fits beside the states."""
    per_process = -(-target_batch // target.num_processes)
    sizes = [b for b in range(per_process, 0, -1) if per_process % b == 0]

    def largest(gc: bool) -> int | None:
        for b in sizes:
            s = Settings(b, per_process // b, gc, 1)
            if target.memory(s).train_peak <= usable:
                return b
        return None

    plain, ckpt = largest(False), largest(True)
    if plain is not None and (plain == ckpt or plain * target.seq >= SATURATING_TOKENS):
        b, gc = plain, False
    elif ckpt is not None:
        b, gc = ckpt, True
    else:
        return None
    eval_b = current.per_device_eval_batch_size
    while eval_b > 1 and target.memory(Settings(b, per_process // b, gc, eval_b)).eval_peak > usable:
        eval_b //= 2
    choice = Settings(b, per_process // b, gc, eval_b)
    return choice if target.memory(choice).peak <= usable else None


EVAL_BATCH_LIMIT = 256   # beyond this a larger eval batch gains nothing measurable


def largest_eval_batch(target: Target, current: Settings, *, usable: int) -> int | None:
    """The largest per_device_eval_batch_size (doubling from the current one, up to
    EVAL_BATCH_LIMIT) whose evaluation peak fits beside the training state; None when the
    current settings do not fit at all."""
    if target.memory(current).peak > usable:
        return None
    best = current.per_device_eval_batch_size
    while best * 2 <= EVAL_BATCH_LIMIT and target.memory(replace(current, per_device_eval_batch_size=best * 2)).peak <= usable:
        best *= 2
    return best


def _longest_that_fits(target: Target, usable: int) -> int | None:
    """The longest max_seq_length (a multiple of 64) that fits at batch 1 with checkpointing, if any."""
    one = Settings(1, 1, True, 1)

    def fits(k: int) -> bool:
        return replace(target, seq=64 * k).memory(one).peak <= usable

    lo, hi = 0, target.seq // 64          # fits(lo) holds (0: nothing), fits(hi + 1) does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return 64 * lo or None


POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def check_model(config: Config) -> int | None:
    """Before anything is loaded: the model directory holds a base model, and max_seq_length fits
    its positions (a longer row fails only at the first batch that long, possibly hours in).
    Returns the model's position limit when the default max_seq_length is above it (the caller
    lowers it); an explicit max_seq_length above it is refused."""
    from fullscale.model import check_model_source

    check_model_source(config)
    path, model_cfg = _load_model_config(config)
    text = _text_config(model_cfg)
    limit = next((getattr(text, k) for k in POSITION_LIMIT_KEYS if isinstance(getattr(text, k, None), int)), None)
    if limit and config.max_seq_length > limit:
        key = next(k for k in POSITION_LIMIT_KEYS if getattr(text, k, None) == limit)
        if "max_seq_length" not in config.explicit:
            return limit
        raise ConfigError(f"max_seq_length: {config.max_seq_length} is more than the {limit} positions of the model "
                          f"{path} ({key} in its config.json); set max_seq_length to {limit} or less")
    return None


def check_plan(config: Config, *, num_processes: int, device: torch.device | str) -> Plan:
    """The plan of `config` on `device`; raises ConfigError with settings that fit when the
    estimated peak exceeds the device memory less the margin (unless plan_check is false).

    Reads config.json only, so call it before loading the model: an impossible run stops in a
    second instead of after loading the weights. FSDP / DeepSpeed sharding is read from the
    environment that `accelerate launch` sets."""
    plan = build_plan(config, num_processes=num_processes, device=device)
    if config.plan_check and not plan.fits:
        raise ConfigError(plan.refusal())
    return plan
