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
