"""Time from real steps (--probe), the step counts of a run, and the CPU allocator pinned so the
resident memory follows the tensors."""

from __future__ import annotations

import math
import time

import torch

from fullscale.config import Config
from fullscale.errors import ConfigError
from fullscale.monitor import process_status_kb
from fullscale.plan.build import Plan, Timing
from fullscale.plan.shape import MB

# ----------------------------------------------------------------------------- the CPU allocator

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def pin_cpu_allocator(threshold: int = MB) -> bool:
    """Give freed CPU tensors back to the OS: fix glibc's mmap threshold, so that every allocation
    of `threshold` bytes or more is its own mapping, unmapped when it is freed.

    By default glibc raises that threshold as large blocks are freed (up to 32 MiB); activations
    then come from the heap, where a freed tensor leaves a hole that later tensors of other sizes
    cannot reuse. Measured on training steps of small models, the peak resident memory was then
    1.35-4.0x the live tensors, depending on shapes and checkpointing; with the threshold fixed it
    equals the live tensors that the plan estimates (within a few percent). The price is a page
    fault per 4 KiB of every fresh large tensor: the demo's micro-step took ~1.8x as long on one
    thread, which is why train pins only when memory is tight (`Plan.pin_allocator`). Call it once,
    before the model is loaded. Returns False (and changes nothing) where the C library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))


# ----------------------------------------------------------------------------- time: a probe of real steps

def probe(config: Config, plan: Plan, *, device: torch.device | str, num_steps: int = 3) -> Timing:
    """Load the real model + LoRA on `device` and time `num_steps` micro-steps (after one warm-up)
    on synthetic tokens of the longest batch (per_device batch x max_seq_length, padded rows
    so the attention mask path is taken), one optimizer update and one evaluation batch.
    A step is `gradient_accumulation_steps` micro-steps and an update; the run's time assumes
    every batch is the longest, so it is an upper bound."""
    from fullscale.loss import token_loss_sum
    from fullscale.model import build_model, choose

    device = torch.device(device)
    pinned = plan.pin_allocator and pin_cpu_allocator()   # as train does when memory is tight
    model = build_model(config, choose(config, device)).to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    vocab = plan.model.vocab_size

    def batch(rows: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (rows, config.max_seq_length), generator=g)
        mask = torch.ones_like(ids)
        mask[1:, -1] = 0   # rows after the first one token shorter: a padded batch, as real data gives
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    train_batch = batch(config.per_device_train_batch_size)

    def micro_step() -> None:
        logits = model(**train_batch, use_cache=False).logits
        loss_sum, count = token_loss_sum(logits, train_batch["input_ids"])
        (loss_sum / count).backward()
        del logits

    try:
        micro_step()                         # warm-up: kernels, allocator pools, lazy initialisation
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        _reset_peak(device)
        resident = (process_status_kb("VmRSS") or 0) * 1024 if device.type == "cpu" else 0
        start = time.perf_counter()
        for _ in range(num_steps):
            micro_step()
        sync()
        micro = (time.perf_counter() - start) / num_steps
        peak = _peak_bytes(device) - resident
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        update = time.perf_counter() - start
        eval_batch = batch(config.per_device_eval_batch_size)
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(**eval_batch, use_cache=False).logits
            token_loss_sum(logits, eval_batch["input_ids"])
            del logits
        sync()
        eval_seconds = time.perf_counter() - start
    except torch.OutOfMemoryError as exc:
        raise ConfigError(f"the probe ran out of device memory ({str(exc).splitlines()[0]}); "
                          f"{plan.refusal() if not plan.fits else 'the estimate was too low: lower the batch'}") from None
    steps, evals, eval_batches = count_steps(config, num_processes=plan.num_processes)
    step = config.gradient_accumulation_steps * micro + update
    m = plan.memory
    planned = (m.train_peak - m.runtime if device.type == "cuda"
               else m.activations + m.logits + m.gradients + m.runtime)
    return Timing(micro_step_seconds=micro, optimizer_seconds=update, step_seconds=step,
                  eval_batch_seconds=eval_seconds, measured_peak_bytes=peak, planned_peak_bytes=planned,
                  allocator_pinned=bool(pinned), num_steps=steps, num_evals=evals,
                  eval_batches=eval_batches, total_seconds=steps * step + evals * eval_batches * eval_seconds)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return (process_status_kb("VmHWM") or 0) * 1024


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the peak resident set size (VmHWM) of this process (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def count_steps(config: Config, *, num_processes: int) -> tuple[int, int, int]:
    """(optimizer steps, evaluations, batches per evaluation) of the run, from the row counts."""
    from fullscale import sampler
    from fullscale.config import train_sources
    from fullscale.data import count_rows, eval_split_size, mixed_count

    sources = train_sources(config)
    num_train = num_eval = 0
    for source in sources:   # each source holds out its own eval_split (a mix), then counts at its weight
        rows = count_rows(source["path"], dataset_config=source["dataset_config"],
                          dataset_split=source["dataset_split"])
        held = 0 if config.eval_file else eval_split_size(rows, config.eval_split)
        num_eval += held
        num_train += mixed_count(rows - held, source["weight"])
    if config.eval_file:
        num_eval = count_rows(config.eval_file)
    global_batch = config.per_device_train_batch_size * num_processes
    _, steps = sampler.run_length(num_train, global_batch_size=global_batch, num_processes=num_processes,
                                  accumulation=config.gradient_accumulation_steps, max_steps=config.max_steps,
                                  num_epochs=config.num_train_epochs)
    evals = ((steps // config.eval_steps) if config.eval_steps else 0) + 2 if num_eval else 0
    batches = math.ceil(num_eval / (config.per_device_eval_batch_size * num_processes)) if num_eval else 0
    return steps, evals, batches
