"""The data order: a seeded permutation per epoch, cut into global micro-batches, one shard per rank.

The order depends only on (seed, epoch, number of examples, global batch size), never on how
many times the run was interrupted, so a resume at (epoch, micro-batch index) sees exactly the
batches an uninterrupted run would have seen. A global micro-batch holds
per_device_batch x num_processes examples; rank r takes its r-th slice, so one process with
batch 8 and two processes with batch 4 put the same examples into each optimizer step.

With `lengths` (group_by_length), the shuffled order is cut into spans of GROUP_SPAN global
micro-batches; each span is sorted by length and cut into micro-batches, whose order inside the
span is shuffled again (a step does not always follow a longer one). Padding drops to almost
nothing while the data stays shuffled at the scale of an epoch.
"""

from __future__ import annotations

import math

import torch


def epoch_order(num_examples: int, *, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=g).tolist()


GROUP_SPAN = 64


def global_micro_batches(num_examples: int, *, seed: int, epoch: int, global_batch_size: int,
                         num_processes: int, lengths: list[int] | None = None) -> list[list[int]]:
    """The epoch's global micro-batches. A last partial batch is kept when every rank gets at
    least one example, else dropped (a rank with nothing to compute would stall the others).
    `lengths` (one per example) groups examples of similar length into the same micro-batch."""
    order = epoch_order(num_examples, seed=seed, epoch=epoch)
    if lengths is not None:
        order = _group_by_length(order, lengths, seed=seed, epoch=epoch, global_batch_size=global_batch_size)
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


def run_length(num_examples: int, *, global_batch_size: int, num_processes: int, accumulation: int,
               max_steps: int, num_epochs: float) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps of the run): max_steps when set, else the epochs'
    steps (at least one). What the run trains and what the plan counts, from one place."""
    per_epoch = steps_per_epoch(num_examples, global_batch_size=global_batch_size, num_processes=num_processes,
                                accumulation=accumulation)
    return per_epoch, (max_steps if max_steps > 0 else max(1, math.ceil(num_epochs * per_epoch)))


def _group_by_length(order: list[int], lengths: list[int], *, seed: int, epoch: int,
                     global_batch_size: int) -> list[int]:
    """The order with each span of GROUP_SPAN micro-batches sorted by length (longest first, ties
    in shuffled order) and its micro-batches shuffled; the last short micro-batch stays last."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
    span = GROUP_SPAN * global_batch_size
    out: list[int] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])   # stable: ties keep the shuffle
        pieces = [chunk[i:i + global_batch_size] for i in range(0, len(chunk), global_batch_size)]
        full = [b for b in pieces if len(b) == global_batch_size]
        short = [b for b in pieces if len(b) < global_batch_size]
        for k in torch.randperm(len(full), generator=g).tolist():
            out.extend(full[k])
        for b in short:
            out.extend(b)
    return out


def padding_share(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of the tokens of dynamically padded micro-batches that are padding."""
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    return 1.0 - sum(lengths[i] for b in batches for i in b) / padded if padded else 0.0
