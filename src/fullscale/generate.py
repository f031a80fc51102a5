"""Quick greedy generations, through the chat template when the tokenizer has one."""

from __future__ import annotations

import torch

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
def generate_reply(model, tokenizer, prompt: str | list[dict], *, max_new_tokens: int = 64) -> str:
    """Greedy continuation of `prompt` (a user message, or a list of chat messages)."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        if not isinstance(prompt, str):
            prompt = "\n".join(m["content"] for m in prompt)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    device = next(model.parameters()).device
    ids = ids.to(device)
    was_training = model.training
    model.eval()
    stop = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stop or None, pad_token_id=pad, use_cache=True)
    if was_training:
        model.train()
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def generate_from(path, prompts: list[str], *, base: str | None = None, max_new_tokens: int = 64,
                  device: str = "cpu", trust_remote_code: bool = False) -> list[str]:
    """Greedy replies to `prompts` from a model directory (merged, adapter export, best_model/) or a
    run directory's best model; see fullscale.export.load_trained_model."""
    from fullscale.export import load_trained_model

    model, tokenizer = load_trained_model(base, path, device=device, trust_remote_code=trust_remote_code)
    return [generate_reply(model, tokenizer, p, max_new_tokens=max_new_tokens) for p in prompts]
