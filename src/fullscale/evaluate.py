"""Evaluation loss and perplexity, streamed: per-batch sums, no logits kept."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fullscale import faults
from fullscale.data.batching import model_inputs
from fullscale.loss import perplexity, token_loss_sum


@dataclass
class EvalResult:
    eval_loss: float
    eval_perplexity: float
    num_tokens: int
    seconds: float


@torch.no_grad()
def evaluate(model, batches, *, accelerator, head=None) -> EvalResult:
    """Mean token loss over `batches` (this rank's share), summed across ranks.

    Only two scalars per batch are kept, on the device; the host reads them once at the end.
    """
    import time

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    device = accelerator.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_tokens = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        labels = batch["labels"]   # on the host: the labelled positions are found there (no device sync)
        inputs = model_inputs(batch, device)
        with head.only_labelled(labels) if head else contextlib.nullcontext():
            logits = model(**inputs, use_cache=False).logits
        total, count = token_loss_sum(logits, labels)
        loss_sum += total.double()
        num_tokens += count
        del logits
        faults.hit("eval")
        faults.hit("sigterm_eval")
    if accelerator.num_processes > 1:
        loss_sum = accelerator.reduce(loss_sum, reduction="sum")
        num_tokens = accelerator.reduce(num_tokens, reduction="sum")
    if was_training:
        model.train()
    n = int(num_tokens.item())
    loss = float(loss_sum.item() / n) if n else float("nan")
    ppl = perplexity(float(loss_sum.item()), n)
    return EvalResult(eval_loss=loss, eval_perplexity=ppl, num_tokens=n, seconds=time.perf_counter() - start)
