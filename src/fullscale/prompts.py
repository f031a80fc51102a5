"""How a run's prompts look, so that generation prompts the way the rows were built: the record
(prompt_format.json in the run directory, best_model/ and every export) and the encoding of a
prompt through it. A leaf module: fullscale.generate and fullscale.export both read it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPT_FORMAT_FILE = "prompt_format.json"   # in the run directory, best_model/ and every export
CHAT = ("messages", "sharegpt")



def prompt_format(fmt: str, *, alpaca: tuple[str, str | None] | None = None) -> dict:
    """The record of how a run's prompts look: its data format ("alpaca", "prompt_completion+messages"
    for a mix, ...) and, for alpaca, the templates."""
    record: dict = {"format": fmt}
    if "alpaca" in fmt.split("+"):
        from fullscale.data.formats import alpaca_templates

        record["alpaca_template"], record["alpaca_template_with_input"] = alpaca or alpaca_templates()
    return record


def write_prompt_format(directory: Path, record: dict | None) -> None:
    if record is not None:
        from fullscale.checkpoint import write_text

        write_text(Path(directory) / PROMPT_FORMAT_FILE, json.dumps(record, indent=2) + "\n")


def read_prompt_format(path) -> dict | None:
    """The prompt format of a model, an export, a best_model/ or checkpoint directory, or a run: its
    own prompt_format.json, else its run's, else the run config's dataset_format when it names one."""
    path = Path(path)
    for place in (path, path.parent):
        try:
            record = json.loads((place / PROMPT_FORMAT_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("format"), str):
            return record
    for place in (path, path.parent):
        try:
            import yaml

            fmt = (yaml.safe_load((place / "config.yaml").read_text()) or {}).get("dataset_format")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(fmt, str) and fmt != "auto":
            return prompt_format(fmt)
    return None


def encode_prompt(tokenizer, prompt: str | list[dict], record: dict | None) -> tuple[torch.Tensor, str]:
    """(input ids, the format used) for `prompt` as the run's rows were built: the chat template
    with a generation prompt for chat data; the Alpaca template; the prompt as is (with the
    tokenizer's special tokens, as training tokenized prompts) for prompt_completion and text.
    Without a record: the chat template when the tokenizer has one."""
    formats = (record or {}).get("format", "").split("+")
    chat = any(f in CHAT for f in formats) or (record is None and tokenizer.chat_template)
    if chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        used = "the chat template" + ("" if record else " (the run's format is unknown)")
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids, used
    if not isinstance(prompt, str):
        prompt = "\n".join(m["content"] for m in prompt)
    if formats[0] == "alpaca":
        from fullscale.data.formats import format_alpaca_prompt

        templates = (record["alpaca_template"], record.get("alpaca_template_with_input"))
        return tokenizer(format_alpaca_prompt(instruction=prompt, templates=templates),
                         return_tensors="pt").input_ids, "alpaca (the run's template)"
    used = formats[0] if record else "plain text (the run's format is unknown, the tokenizer has no chat template)"
    return tokenizer(prompt, return_tensors="pt").input_ids, used
