"""Quick greedy generations, through the chat template when the tokenizer has one."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_reply(model, tokenizer, prompt: str | list[dict], *, max_new_tokens: int = 64) -> str:
    """Greedy continuation of `prompt` (a user message, or a list of chat messages)."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    device = next(model.parameters()).device
    ids = ids.to(device)
    was_training = model.training
    model.eval()
    stop = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")}
            if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stop or None, pad_token_id=tokenizer.pad_token_id,
                         use_cache=True)
    if was_training:
        model.train()
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
