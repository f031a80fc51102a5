"""The data order: a seeded permutation per epoch, cut into global micro-batches, one shard per rank.

The order depends only on (seed, epoch, number of examples, global batch size), never on how
many times the run was interrupted, so a resume at (epoch, micro-batch index) sees exactly the
batches an uninterrupted run would have seen. A global micro-batch holds
per_device_batch x num_processes examples; rank r takes its r-th slice, so one process with
batch 8 and two processes with batch 4 put the same examples into each optimizer step.
"""

from __future__ import annotations

import math

import torch


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=g).tolist()


def global_micro_batches(num_examples: int, *, seed: int, epoch: int, global_batch_size: int,
                         num_processes: int) -> list[list[int]]:
    """The epoch's global micro-batches. A last partial batch is kept when every rank gets at
    least one example, else dropped (a rank with nothing to compute would stall the others)."""
    order = epoch_order(num_examples, seed=seed, epoch=epoch)
    batches = [order[i:i + global_batch_size] for i in range(0, num_examples, global_batch_size)]
    if batches and len(batches[-1]) < num_processes:
        batches.pop()
    return batches


def rank_slice(batch: list[int], *, rank: int, num_processes: int) -> list[int]:
    """This rank's share of a global micro-batch (contiguous, sizes differ by at most one)."""
    base, extra = divmod(len(batch), num_processes)
    start = rank * base + min(rank, extra)
    return batch[start:start + base + (1 if rank < extra else 0)]


def micro_batches_per_epoch(num_examples: int, *, global_batch_size: int, num_processes: int) -> int:
    full, rem = divmod(num_examples, global_batch_size)
    return full + (1 if rem >= num_processes else 0)


def steps_per_epoch(num_examples: int, *, global_batch_size: int, num_processes: int, accumulation: int) -> int:
    """Optimizer steps per epoch; a last short accumulation window still makes a step."""
    return math.ceil(micro_batches_per_epoch(num_examples, global_batch_size=global_batch_size,
                                             num_processes=num_processes) / accumulation)
