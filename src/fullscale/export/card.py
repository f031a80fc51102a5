"""What an export says about itself: provenance (manifest.json) and the README.md model card."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fullscale.export.source import Source
from fullscale.export.verify import Verification
from fullscale.fingerprint import versions


@dataclass
class ExportResult:
    """What an export wrote and where it came from: the card and the provenance describe it."""

    path: Path
    source: Source
    merged: bool
    dtype: str | None = None
    verification: Verification | None = None
    notes: list[str] = field(default_factory=list)
    prompt_format: dict | None = None   # how the run's prompts looked (prompt_format.json)
    base_id: str | None = None          # the base as recorded for others: a hub id (portable) or the local path


# ----------------------------------------------------------------------------- provenance and model card

def provenance(result: ExportResult) -> dict[str, Any]:
    """What the export is and where it came from (manifest.json "provenance"; the model card shows it)."""
    s = result.source
    best = (s.result or {}).get("best_eval_loss")
    return {
        "base_model": s.base,
        "base_model_id": result.base_id,
        "fingerprints": s.fingerprints,
        "source": {"run_dir": str(s.run_dir.resolve()) if s.run_dir else None, "adapter": s.label.rstrip("/"),
                   "step": s.step, "eval_loss": s.eval_loss},
        "run": {"total_steps": (s.result or {}).get("total_steps"), "best_eval_loss": best,
                "best_step": (s.result or {}).get("best_step"), "stop_reason": (s.result or {}).get("stop_reason")},
        "merged": result.merged,
        "dtype": result.dtype,
        "verification": asdict(result.verification) if result.verification else None,
        "config": s.config,
        "versions": versions(short_torch=True),
    }


def model_card(result: ExportResult) -> str:
    """README.md: what the export is, how to load it, and its provenance. No timestamps (repeatable)."""
    s, p = result.source, provenance(result)
    fp = s.fingerprints or {}
    lines = [
        "---",
        f"base_model: {json.dumps(result.base_id or s.base)}",
        f"library_name: {'transformers' if result.merged else 'peft'}",
        "pipeline_tag: text-generation",
        "tags:",
        "- fullscale",
        "- lora",
        *(["- merged"] if result.merged else []),
        "---",
        "",
        f"# {'Merged model (base + LoRA adapter)' if result.merged else 'LoRA adapter'} trained with fullscale",
        "",
    ]
    lines += _usage(result) if not result.merged else _merged_usage(result)
    run = p["run"]
    rows = [
        ("base model", f"`{result.base_id or s.base}`"),
        ("base model used for the export", f"`{s.base}`" if result.base_id not in (None, s.base) else None),
        ("base model fingerprint (config.json + weights)", fp.get("model")),
        ("tokenizer fingerprint", fp.get("tokenizer")),
        ("train data fingerprint", fp.get("train_data")),
        ("eval data fingerprint", fp.get("eval_data")),
        ("config fingerprint", fp.get("config")),
        ("run directory", f"`{p['source']['run_dir']}`" if p["source"]["run_dir"] else None),
        ("exported from", f"`{s.label}`"),
        ("step of this adapter", s.step),
        ("eval loss of this adapter", _num(s.eval_loss)),
        ("steps trained in the run", run["total_steps"]),
        ("best eval loss of the run", f"{_num(run['best_eval_loss'])} at step {run['best_step']}"
         if run["best_eval_loss"] is not None else None),
        ("stop reason", run["stop_reason"]),
        ("versions", ", ".join(f"{k} {v}" for k, v in p["versions"].items())),
    ]
    lines += ["## Provenance", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    lines += ["", "## Prompt format", "", _prompt_format_text(result.prompt_format)]
    for note in result.notes:
        lines += ["", f"Note: {note}."]
    if s.config is not None:
        lines += ["", "## fullscale config", "", "```yaml", yaml.safe_dump(s.config, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _merged_usage(result: ExportResult) -> list[str]:
    """How to load a merged export, and its verification."""
    s = result.source
    lines = [
        f"The LoRA adapter merged into a copy of `{result.base_id or s.base}` ({result.dtype}). Loads with plain "
        "transformers, no peft:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        "```",
        "",
        "## Merge verification",
        "",
        f"The saved merged model was loaded back and compared with the adapter model (base + unmerged adapter, "
        f"{result.dtype}) on {result.verification.num_examples} {result.verification.data} "
        f"({result.verification.num_tokens} tokens):",
        "",
        "| | |",
        "|---|---|",
        f"| max abs logit difference | {result.verification.max_abs_diff:.3g} |",
        f"| tolerance ({result.dtype}) | {result.verification.tolerance:.3g} |",
        f"| perplexity, trained model ({result.verification.reference_dtype or 'its training precision'}) | "
        f"{result.verification.adapter_perplexity:.6g} |",
        f"| perplexity, merged model | {result.verification.merged_perplexity:.6g} |",
        "",
    ]
    return lines


def _usage(result: ExportResult) -> list[str]:
    """How to load an adapter export (and serve it)."""
    s = result.source
    lines = [
        f"A LoRA adapter for `{result.base_id or s.base}`, with the base's tokenizer (and chat template) and "
        "generation config.",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"base = AutoModelForCausalLM.from_pretrained({json.dumps(result.base_id or s.base)})",
        'model = PeftModel.from_pretrained(base, "path/to/this/directory")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        "```",
        "",
        "or `fullscale.load_trained_model(None, \"path/to/this/directory\")`.",
        "",
    ]
    rank = (s.config or {}).get("lora_rank")
    if isinstance(rank, int) and rank > 16:
        lines += [f"Serving with vLLM: `--enable-lora --max-lora-rank {rank}` (vLLM's default rank limit is 16, "
                  f"below this adapter's rank {rank}).", ""]
    return lines


def _prompt_format_text(record: dict | None) -> str:
    """How to prompt the model as it was trained (prompt_format.json holds the same)."""
    if record is None:
        return "Not recorded (a run made before fullscale wrote prompt_format.json)."
    fmt = record["format"]
    if fmt.split("+")[0] == "alpaca":
        return (f"Trained on alpaca rows: prompt with the template below (`{{instruction}}` replaced), then read the "
                f"completion.\n\n```\n{record['alpaca_template']}\n```")
    if any(f in ("messages", "sharegpt") for f in fmt.split("+")):
        return (f"Trained on chat data ({fmt}): prompt through the tokenizer's chat template with "
                "`add_generation_prompt=True`.")
    return (f"Trained on {fmt} rows: the prompt as plain text, tokenized with the tokenizer's special tokens "
            "(`tokenizer(prompt)`), no chat template.")


def _num(x: float | None) -> str | None:
    return None if x is None else f"{x:.6g}"
