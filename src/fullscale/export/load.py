"""Loading a trained model back for use: load_trained_model (a run, best_model/, a checkpoint, an
adapter export or a merged directory)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fullscale import checkpoint as ckpt
from fullscale.errors import first_line
from fullscale.errors import CheckpointError, ModelError
from fullscale.model import load_tokenizer_from
from fullscale.export.source import (Source, _device, _is_merged_dir, _named_dtype, resolve_base, resolve_dtype,
                                     resolve_source, source_from_dir)

# ----------------------------------------------------------------------------- loading

def _load_adapter_model(source: Source, *, dtype: torch.dtype, device: torch.device):
    """Base (in `dtype`) + the unmerged adapter, in eval mode on `device`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        base = AutoModelForCausalLM.from_pretrained(source.base, dtype=dtype, trust_remote_code=source.trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load the base model {source.base} ({source.base_origin}): {first_line(exc)}. "
                         "Give a local directory saved with save_pretrained (--base DIR)") from None
    try:
        model = PeftModel.from_pretrained(base, str(source.adapter_dir), is_trainable=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"the adapter in {source.adapter_dir} does not fit the base {source.base}: "
                              f"{first_line(exc)}. Check that it was trained on this base") from None
    return model.to(device).eval()


def load_trained_model(base_model_name: str | None, adapter_path: str | os.PathLike, device: str = "cpu",
                       merge_adapter: bool = False, *, dtype: str | torch.dtype = "auto",
                       trust_remote_code: bool = False):
    """Load a trained model and its tokenizer, ready for generation: returns (model, tokenizer).

    `adapter_path`: a run directory (its best model), a best_model/ or checkpoint directory, an
    adapter export, or a merged export (then `base_model_name` is not used). `base_model_name`:
    the base model (directory or hub id), or None to read it from the run or the export's
    provenance; a local base is checked against the fingerprint the run recorded. `merge_adapter`:
    merge the adapter into the base (a plain transformers model). `dtype`: auto (the run's training
    dtype; a merged directory's saved dtype), bf16, fp16 or fp32. `trust_remote_code`: run the
    model's custom code; off unless the caller turns it on (never taken from the files loaded).
    """
    path = Path(adapter_path)
    if not path.exists():
        raise CheckpointError(f"no such model or run directory: {path}")
    target = _device(device)
    if _is_merged_dir(path):
        from transformers import AutoModelForCausalLM

        tokenizer = load_tokenizer_from(str(path), trust_remote_code=trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype="auto" if dtype in ("auto", None) else _named_dtype(dtype),
                trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot load the model in {path}: {first_line(exc)}") from None
        return model.to(target).eval(), tokenizer
    in_run = (path.parent / "config.yaml").is_file()
    if in_run and path.name == "best_model":
        source = resolve_source(path.parent, "best", for_what="generate")
    elif in_run and ckpt.CHECKPOINT_RE.match(path.name):
        source = resolve_source(path.parent, ckpt.CHECKPOINT_RE.match(path.name).group(1), for_what="generate")
    elif (path / "adapter_config.json").is_file():
        source = source_from_dir(path)
    elif path.is_dir():
        source = resolve_source(path, "best", for_what="generate")
    else:
        raise CheckpointError(f"{path} is not a model directory, an adapter or a run directory")
    source.trust_remote_code = trust_remote_code
    resolve_base(source, base_model_name)
    torch_dtype = resolve_dtype(dtype, source)
    tokenizer = load_tokenizer_from(str(source.adapter_dir) if source.has_tokenizer else source.base,
                                trust_remote_code=source.trust_remote_code)
    model = _load_adapter_model(source, dtype=torch_dtype, device=target)
    if merge_adapter:
        model = model.merge_and_unload(safe_merge=True)
    return model, tokenizer
