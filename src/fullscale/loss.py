"""The causal-LM loss as a sum over label tokens, so callers normalise by the right count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over label tokens, and their count.

    logits: (B, T, V); labels: (B, T) with -100 where no loss is taken. Position t predicts
    labels[t + 1]. Computed in fp32 whatever the model's dtype.
    """
    shift_logits = logits[:, :-1, :].float()          # (B, T-1, V)
    shift_labels = labels[:, 1:]                       # (B, T-1)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (shift_labels != IGNORE_INDEX).sum()
    return total, count


def num_label_tokens(labels: torch.Tensor) -> int:
    """Label tokens that take loss in a (B, T) label tensor (after the one-token shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
