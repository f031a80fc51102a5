"""The merge and its verification: base + adapter merged, saved, loaded back, and its logits
compared with the unmerged adapter model's on held-out examples."""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fullscale.errors import first_line
from fullscale.errors import UserError
from fullscale.loss import perplexity
from fullscale.model import load_tokenizer_from
from fullscale.export.load import _load_adapter_model
from fullscale.export.source import DTYPE_NAMES, ExportError, Source

log = logging.getLogger("fullscale")

# How far the merged model's logits may be from the adapter model's (base + unmerged adapter, same
# dtype) on the verification examples: max |merged - adapter| <= atol + rtol * max |adapter logit|.
#
#   dtype  atol  rtol  bound at max |logit| 21.5  measured (demo run, 60 eval examples, CPU)
#   fp32   1e-4  1e-5  3.2e-4                     2.9e-5  (only the summation order differs)
#   fp16   0.02  0.01  0.24                       0.063   (W + BA rounded to fp16, 10-bit mantissa)
#   bf16   0.10  0.05  1.18                       0.38    (W + BA rounded to bf16, 7-bit mantissa: a few
#                                                          bf16 ulps of logits around 16-32, where one ulp is 0.125)
#
# A wrong merge (wrong scaling, a missing module, another base) differs by whole logits, far beyond.
MERGE_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (0.02, 0.01),
    torch.bfloat16: (0.10, 0.05),
}

VERIFY_MAX_EXAMPLES = 8        # held-out examples the merge is checked on
VERIFY_MAX_TOKENS = 2048       # and at most this many tokens (the reference logits are kept)
VERIFY_BATCH_SIZE = 4

# Used to verify a merge when the run's eval data cannot be rebuilt (moved files, no config).
FIXED_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "def add(a, b):\n    return a + b\n",
    "1, 2, 3, 5, 8, 13, 21, 34",
)


@dataclass
class Verification:
    """Merged vs adapter model on held-out examples."""

    dtype: str
    data: str                     # what the examples were
    num_examples: int
    num_tokens: int
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    adapter_perplexity: float
    merged_perplexity: float

    reference_dtype: str = ""     # the precision the reference logits were computed in (the run's)
    merged_loss: float = 0.0      # the merged model's mean token loss (perplexity may overflow; the loss may not)

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in (self.max_abs_diff, self.tolerance, self.merged_loss))

    @property
    def passed(self) -> bool:
        """Within the tolerance, and every figure finite: an overflow (inf) or a NaN never passes."""
        return self.finite and self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        against = f" against the trained model in {self.reference_dtype}" if self.reference_dtype else ""
        return (f"max |logit difference| {self.max_abs_diff:.3g}{against} (tolerance {self.tolerance:.3g} for "
                f"{self.dtype}); perplexity trained {self.adapter_perplexity:.6g}, merged {self.merged_perplexity:.6g}; "
                f"on {self.num_examples} {self.data} ({self.num_tokens:,} tokens)")


def _write_merged(staging: Path, source: Source, dtype: torch.dtype, *, device: torch.device,
                  say: Callable[[str], None]) -> Verification:
    """Merge the adapter into the base, save it in `dtype`, load the saved model back and compare it
    with the trained model (base + unmerged adapter in the run's training precision) on held-out
    examples. The merge itself runs in the more precise of the two dtypes. Raises ExportError when
    they differ, or when any logit, loss or difference is not finite."""
    from transformers import AutoModelForCausalLM

    from fullscale.export.source import resolve_dtype

    tokenizer = load_tokenizer_from(str(staging), trust_remote_code=source.trust_remote_code)
    batches, data = verification_batches(source, tokenizer)
    trained = resolve_dtype("auto", source)
    model = _load_adapter_model(source, dtype=trained, device=device)
    say(f"computing reference logits of the trained model ({DTYPE_NAMES[trained]}, {device}) on {data}")
    reference, adapter_loss = _logits_on(model, batches, device)
    if not all(bool(torch.isfinite(r).all()) for r in reference) or not math.isfinite(adapter_loss[0]):
        raise ExportError(
            f"merge verification cannot run: the trained model itself (base + adapter in {DTYPE_NAMES[trained]}) "
            f"gives non-finite logits on {data}. Nothing was written. Check the adapter (fullscale checkpoints RUN "
            "--verify) and the run's health events")
    merge_dtype = trained if _precision(trained) >= _precision(dtype) else dtype
    if merge_dtype != trained:
        del model
        gc.collect()
        model = _load_adapter_model(source, dtype=merge_dtype, device=device)
    merged = model.merge_and_unload(safe_merge=True)
    merged.to(dtype).save_pretrained(staging)
    del model, merged
    gc.collect()

    say("loading the saved merged model back (plain transformers) to verify it")
    reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=dtype,
                                                    trust_remote_code=source.trust_remote_code).to(device).eval()
    max_diff, max_logit = 0.0, 0.0
    loss_sum, num_tokens = 0.0, 0
    with torch.no_grad():
        for batch, ref in zip(batches, reference):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).logits
            got = logits[batch["attention_mask"].bool()].float().cpu()          # (real tokens, V)
            diff = float((got - ref).abs().max())
            max_diff = max(max_diff, diff if math.isfinite(diff) else math.inf)  # an overflow or a NaN never passes
            max_logit = max(max_logit, float(ref.abs().max()))
            total, count = _loss(logits, batch["labels"])
            loss_sum, num_tokens = loss_sum + total, num_tokens + count
    del reloaded
    atol, rtol = MERGE_TOLERANCES[dtype]
    n_examples = sum(int(b["input_ids"].shape[0]) for b in batches)
    verification = Verification(
        dtype=DTYPE_NAMES[dtype], data=data, num_examples=n_examples,
        num_tokens=sum(int(b["attention_mask"].sum()) for b in batches), max_abs_diff=max_diff,
        max_abs_logit=max_logit, tolerance=atol + rtol * max_logit,
        adapter_perplexity=perplexity(*adapter_loss), merged_perplexity=perplexity(loss_sum, num_tokens),
        reference_dtype=DTYPE_NAMES[trained], merged_loss=loss_sum / max(num_tokens, 1))
    if not verification.passed:
        overflow = "" if verification.finite else (
            f" The merged model's logits are not finite: {verification.dtype} overflows on this model (logits or "
            "activations past its range; fp16 stops at 65504). Merge in bf16 or fp32.")
        raise ExportError(
            f"merge verification failed: the merged model does not compute what the trained model computes "
            f"({verification.describe()}).{overflow} Nothing was written. Merge in fp32 (--dtype fp32), check that "
            "the base is the full-precision model the adapter was trained on, or ship the adapter (export without "
            "--merge)")
    return verification


def _precision(dtype: torch.dtype) -> int:
    return {torch.float32: 3, torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)


def verification_batches(source: Source, tokenizer) -> tuple[list[dict[str, torch.Tensor]], str]:
    """A few held-out examples as padded batches: the run's eval examples (rebuilt with its config),
    else FIXED_TEXTS. Returns (batches, a description of the examples)."""
    from fullscale.data import collate

    examples, data = None, None
    try:
        examples = _run_eval_examples(source, tokenizer)
        data = "held-out eval examples of the run"
    except (UserError, OSError) as exc:
        log.warning("cannot rebuild the run's eval examples (%s); verifying on fixed texts", first_line(exc))
    if not examples:
        examples, data = _fixed_examples(tokenizer), "fixed texts"
    chosen, tokens = [], 0
    for ex in examples[:VERIFY_MAX_EXAMPLES]:
        ids = ex["input_ids"][: VERIFY_MAX_TOKENS]
        if chosen and tokens + len(ids) > VERIFY_MAX_TOKENS:
            break
        chosen.append({"input_ids": ids, "labels": ex["labels"][: len(ids)]})
        tokens += len(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [collate(chosen[i:i + VERIFY_BATCH_SIZE], pad_token_id=pad)
               for i in range(0, len(chosen), VERIFY_BATCH_SIZE)]
    return batches, data


def _run_eval_examples(source: Source, tokenizer) -> list[dict] | None:
    if source.config is None:
        return None
    from fullscale.config import build_config
    from fullscale.data import prepare_for

    data = prepare_for(build_config(dict(source.config)), tokenizer)
    return data.eval


def _fixed_examples(tokenizer) -> list[dict]:
    texts = list(FIXED_TEXTS)
    if tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}], tokenize=False))
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token or "\0")).input_ids
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def _logits_on(model, batches, device) -> tuple[list[torch.Tensor], tuple[float, int]]:
    """Logits at the real (non-padding) tokens of each batch, as fp32 on the CPU; and the loss sum/count."""
    out, loss_sum, num_tokens = [], 0.0, 0
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits                                  # (B, T, V)
            out.append(logits[batch["attention_mask"].bool()].float().cpu())        # (real tokens, V)
            total, count = _loss(logits, batch["labels"])
            loss_sum, num_tokens = loss_sum + total, num_tokens + count
    return out, (loss_sum, num_tokens)


def _loss(logits, labels) -> tuple[float, int]:
    from fullscale.loss import token_loss_sum

    total, count = token_loss_sum(logits, labels)
    return float(total), int(count)
