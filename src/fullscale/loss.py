"""The causal-LM loss as a sum over label tokens, so callers normalise by the right count.

`LabelledHead` makes the model's output layer (the lm_head) run only at the positions whose
next token carries a label: prompt and padding positions need no logits. With a 128k-token
vocabulary the logits are the largest tensor of a step, and in instruction data most positions
are prompt; this saves their lm_head matmul, their share of the fp32 loss, and the memory.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) targets aligned with the logits: position t predicts labels[t + 1]; the last
    position has none. Shifting the labels (not slicing the logits) copies no (B, T, V) tensor."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over label tokens, and their count.

    logits: (B, T, V) at every position, or (N, V) at the N labelled positions only (what the
    model returns under `LabelledHead.only_labelled`); labels: (B, T) with -100 where no loss is
    taken. Computed in fp32 whatever the model's dtype.
    """
    targets = next_token_targets(labels)
    if logits.dim() == 2:
        # The labelled positions' targets, in LabelledHead's order. Labels on the host (as the loop
        # passes them): this selection needs no device sync, and only the targets are copied.
        targets = targets[targets != IGNORE_INDEX]
    targets = targets.to(logits.device, non_blocking=True)
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def num_label_tokens(labels: torch.Tensor) -> int:
    """Label tokens that take loss in a (B, T) label tensor (after the one-token shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class LabelledHead:
    """A forward pre-hook on the model's output embeddings that keeps only the hidden states of
    labelled positions while `only_labelled(labels)` is active; the model then returns (N, V)
    logits. Outside that context (generation, export checks) the model is unchanged. A model
    without get_output_embeddings(), or whose head sees an unexpected shape, keeps full logits
    (token_loss_sum takes both)."""

    def __init__(self, model: torch.nn.Module):
        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        self._positions: torch.Tensor | None = None   # flat indices of the labelled positions
        self._shape: tuple[int, ...] = ()
        self._handle = head.register_forward_pre_hook(self._select) if head is not None else None

    def _select(self, module, args):
        positions = self._positions
        if positions is None or not args or args[0].dim() != 3 or tuple(args[0].shape[:2]) != self._shape:
            return None
        hidden = args[0]
        return (hidden.flatten(0, 1).index_select(0, positions.to(hidden.device, non_blocking=True)), *args[1:])

    @contextlib.contextmanager
    def only_labelled(self, labels: torch.Tensor) -> Iterator[None]:
        """While active, the head sees only the positions whose next token carries a label. With
        `labels` on the host (the loop passes a batch's before its copy to the device) the positions
        are found there, so a boolean selection on the device (a sync) is never needed."""
        mask = next_token_targets(labels) != IGNORE_INDEX
        self._shape = tuple(mask.shape)
        self._positions = mask.flatten().nonzero().squeeze(1)
        try:
            yield
        finally:
            self._positions = None

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def perplexity(loss_sum: float, num_tokens: int) -> float:
    """exp(mean loss) of a summed loss over `num_tokens` label tokens (nan without tokens, inf past
    the float range)."""
    if not num_tokens:
        return float("nan")
    loss = loss_sum / num_tokens
    return math.exp(loss) if loss < 700 else float("inf")
