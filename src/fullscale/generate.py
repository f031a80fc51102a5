"""Greedy generations in the prompt format the run trained on (prompt_format.json), through the
chat template for chat data and when the format is unknown."""

from __future__ import annotations

import torch

from fullscale.prompts import encode_prompt, read_prompt_format

# End-of-turn markers of common chat templates; a generation stops at any that is a single token.
END_OF_TURN = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|endoftext|>")


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the tokenizer's eos, the model's generation-config eos ids, and the
    end-of-turn markers of common chat templates that this tokenizer has."""
    ids = {tokenizer.eos_token_id}
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(t for t in ids if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id)


@torch.no_grad()
def generate_reply(model, tokenizer, prompt: str | list[dict], *, max_new_tokens: int = 64,
                   record: dict | None = None) -> str:
    """Greedy continuation of `prompt` (a user message, or a list of chat messages) in the prompt
    format `record` (read_prompt_format; None: the chat template when the tokenizer has one)."""
    ids, _ = encode_prompt(tokenizer, prompt, record)
    device = next(model.parameters()).device
    ids = ids.to(device)
    # Never past the model's positions (an unbounded max_new_tokens would run until memory ends).
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions:
        max_new_tokens = max(0, min(max_new_tokens, positions - ids.shape[1]))
        if max_new_tokens == 0:
            from fullscale.errors import UserError

            raise UserError(f"the prompt has {ids.shape[1]} tokens, as many as the model's {positions} positions: "
                            "no room to generate; give a shorter prompt")
    was_training = model.training
    model.eval()
    stop = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stop or None, pad_token_id=pad, use_cache=True)
    if was_training:
        model.train()
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@torch.no_grad()
def continue_ids(model, tokenizer, ids: list[int], *, max_new_tokens: int) -> list[int]:
    """The greedy continuation of token ids (an eval row's prompt exactly as it was tokenized for
    training), up to an end-of-turn or eos token."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    stop = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stop or None, pad_token_id=pad, use_cache=True)
    return out[0, len(ids):].tolist()


def eval_samples(model, tokenizer, examples, *, count: int, max_new_tokens: int) -> list[dict]:
    """Greedy generations for the first `count` eval examples that have a prompt: each example's
    tokens before its first label are the prompt, its label tokens the expected reply."""
    from fullscale.data import IGNORE_INDEX

    was_training = model.training
    model.eval()
    samples = []
    try:
        for i in range(len(examples)):
            if len(samples) == count:
                break
            ex = examples[i]
            first = next((p for p, label in enumerate(ex["labels"]) if label != IGNORE_INDEX and p > 0), None)
            if first is None:
                continue
            prompt, expected = ex["input_ids"][:first], [t for t in ex["labels"][first:] if t != IGNORE_INDEX]
            # Enough to see the reply and what follows it; no longer (each token is a forward pass).
            out = continue_ids(model, tokenizer, prompt, max_new_tokens=min(max_new_tokens, len(expected) + 16))
            samples.append({"row": ex["row"], "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                            "output": tokenizer.decode(out, skip_special_tokens=True).strip(),
                            "expected": tokenizer.decode(expected, skip_special_tokens=True).strip()})
    finally:
        if was_training:
            model.train()
    return samples


def generate_from(path, prompts: list[str], *, base: str | None = None, max_new_tokens: int = 64,
                  device: str = "cpu", trust_remote_code: bool = False) -> tuple[list[str], str]:
    """(greedy replies to `prompts`, the prompt format used) from a model directory (merged, adapter
    export, best_model/) or a run directory's best model; see fullscale.export.load_trained_model."""
    from fullscale.export import load_trained_model

    model, tokenizer = load_trained_model(base, path, device=device, trust_remote_code=trust_remote_code)
    record = read_prompt_format(path)
    used = encode_prompt(tokenizer, prompts[0], record)[1] if prompts else ""
    return [generate_reply(model, tokenizer, p, max_new_tokens=max_new_tokens, record=record) for p in prompts], used
