"""Batches: examples padded to their longest, labels padded with IGNORE_INDEX."""

from __future__ import annotations

import torch

from fullscale.data.records import IGNORE_INDEX

# --------------------------------------------------------------------------------------
# Batching


def collate(examples: list[dict], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch on the right to its longest example (not to max_seq_length).

    Returns int64 tensors [batch, longest]: input_ids (pad_token_id on pads), attention_mask
    (0 on pads), labels (-100 on pads).
    """
    longest = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a collated batch the model takes, copied to `device` when given (the labels
    stay on the host, where fullscale.loss finds the labelled positions). A packed batch has
    position_ids and no attention_mask: with sdpa, transformers then builds a block-diagonal mask,
    so packed examples do not see each other."""
    return {k: batch[k] if device is None else batch[k].to(device, non_blocking=True)
            for k in MODEL_INPUTS if k in batch}
