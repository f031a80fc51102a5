"""What the machine has: the device's memory (or the RAM), the disk the checkpoints need, and the
host RAM and disk of the data."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fullscale.config import Config
from fullscale.errors import ConfigError
from fullscale.plan.memory import CHECKPOINT_STAGING
from fullscale.plan.shape import GB, MB, ModelShape

# ----------------------------------------------------------------------------- device

def device_memory(config: Config, device: torch.device, *, num_processes: int) -> tuple[int, str]:
    """Bytes one process may use, and where the number comes from: memory_budget_gb when set, else
    the GPU's total memory, else on the CPU the available RAM shared by this node's processes."""
    if config.memory_budget_gb is not None:
        return int(config.memory_budget_gb * GB), "memory_budget_gb"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("planning for a GPU on a machine without one: set memory_budget_gb to the GPU's "
                              "memory (e.g. memory_budget_gb=80), or plan on the machine that trains")
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"total memory of {props.name}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes) or 1)
    available = _mem_available()
    share = f", shared by {local} processes" if local > 1 else ""
    return available // max(1, local), f"available RAM (MemAvailable{share})"


def _mem_available() -> int:
    """The RAM available without swapping (Linux MemAvailable), through psutil."""
    import psutil

    return psutil.virtual_memory().available


def _choices(config: Config, device: torch.device):
    """dtype and attention for `device`; a GPU can be planned without one present."""
    from fullscale.model import ModelChoices, choose

    if device.type != "cuda" or torch.cuda.is_available():
        return choose(config, device)
    dtype = torch.float32 if config.bf16 is False else torch.bfloat16
    attn = "sdpa" if config.attn_implementation == "auto" else config.attn_implementation
    return ModelChoices(dtype=dtype, attn_implementation=attn, tf32=False)


# ----------------------------------------------------------------------------- disk

@dataclass
class DiskEstimate:
    checkpoint_bytes: int        # one checkpoint: adapter + optimizer + small state files
    num_checkpoints: int         # the most that exist at once
    best_model_bytes: int
    needed_bytes: int
    free_bytes: int | None
    path: str

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.needed_bytes <= self.free_bytes


def estimate_disk(shape: ModelShape, config: Config) -> DiskEstimate:
    """Checkpoints on disk: adapter (safetensors) + optimizer.pt (two states, steps) + ~64 KB of
    state files each; save_total_limit of them, the best one when it is older, and one being
    written before the oldest is removed; plus best_model/ (adapter + tokenizer files)."""
    adapter = shape.lora_bytes + 16 * 1024
    optimizer = 2 * shape.lora_bytes + shape.lora_tensors * 1024 + 4096
    checkpoint = adapter + optimizer + 64 * 1024
    best = adapter + 16 * MB   # tokenizer files: a few MB for the common vocabularies
    count = config.save_total_limit + CHECKPOINT_STAGING
    path = Path(config.output_dir or "runs").absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    return DiskEstimate(checkpoint_bytes=checkpoint, num_checkpoints=count, best_model_bytes=best,
                        needed_bytes=count * checkpoint + best, free_bytes=free, path=str(path))


# Measured by benchmarks/bench_data.py (200k chat rows, 9.5M tokens, 2 cores; RESULTS.md): the
# local main process's peak while preparing, over its size after imports, and the resident growth
# of a rank that only maps the store.
PREPARE_BYTES_PER_TOKEN = 40
STORE_BYTES_PER_TOKEN = 8          # int32 ids + int32 labels
STORE_BYTES_PER_EXAMPLE = 16       # int64 offset + int64 row number
BYTES_PER_TOKEN_OF_FILE = 0.25     # tokens per byte of a data file, roughly (JSON, ~4 characters a token)


@dataclass
class DataEstimate:
    """Host memory for the data: the token store (mapped, shared by a node's processes through the page
    cache), and the one-off peak of the process that prepares it."""

    file_bytes: int
    tokens: int                    # estimated from the file size (or counted, for a prepared store)
    store_bytes: int
    prepare_peak_bytes: int
    source: str


def estimate_data(config: Config) -> DataEstimate | None:
    """The data's host RAM and disk, from the size of its files (None when they cannot be read)."""
    from fullscale.config import train_sources

    sources = [s["path"] for s in train_sources(config)]
    files = [Path(f) for f in (*sources, config.eval_file) if f]
    try:
        size = sum(sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) if f.is_dir() else f.stat().st_size
                   for f in files)
    except OSError:
        return None
    tokens = int(size * BYTES_PER_TOKEN_OF_FILE)
    return DataEstimate(file_bytes=size, tokens=tokens, store_bytes=tokens * STORE_BYTES_PER_TOKEN,
                        prepare_peak_bytes=tokens * PREPARE_BYTES_PER_TOKEN,
                        source=f"~{BYTES_PER_TOKEN_OF_FILE:g} tokens per byte of the data files")
