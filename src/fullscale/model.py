"""Load the base model and tokenizer, choose dtype and attention, add LoRA through peft."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fullscale.config import Config
from fullscale.errors import ModelError, first_line
from fullscale.targets import (DEFAULT_TARGETS, LoraTargets, describe_wrapped, fused_expert_parameters,  # noqa: F401
                               layer_listing, linear_layers, peft_target_modules, resolve_lora_targets, suffix,
                               wrapped_layers)

_suffix = suffix

log = logging.getLogger("fullscale")


@dataclass
class ModelChoices:
    """What was chosen for this device, and why; printed and recorded."""

    dtype: torch.dtype
    attn_implementation: str
    tf32: bool
    attention_reason: str = ""      # why this kernel (attn_implementation: auto)

    def describe(self) -> str:
        why = f" ({self.attention_reason})" if self.attention_reason else ""
        return (f"dtype {str(self.dtype).replace('torch.', '')}, attention {self.attn_implementation}{why}, "
                f"tf32 {'on' if self.tf32 else 'off'}")


def choose(config: Config, device: torch.device) -> ModelChoices:
    """Resolve the `auto` settings for `device`; never pick a kernel that is not installed."""
    on_cuda = device.type == "cuda"
    if config.bf16 == "auto":
        use_bf16 = on_cuda and torch.cuda.is_bf16_supported()
    else:
        use_bf16 = bool(config.bf16)
    dtype = torch.bfloat16 if use_bf16 else torch.float32

    has_flash = importlib.util.find_spec("flash_attn") is not None
    why = ""
    if config.attn_implementation == "auto":
        supports_sdpa, supports_flash = attention_support(config)
        if on_cuda and has_flash and use_bf16 and supports_flash:
            attn, why = "flash_attention_2", "flash-attn installed, CUDA, bf16"
        elif supports_sdpa:
            attn = "sdpa"
            why = ("the model has no flash-attention kernel" if on_cuda and has_flash and use_bf16 and not supports_flash
                   else "flash-attn not installed" if on_cuda and not has_flash else
                   "flash-attn needs CUDA and bf16" if has_flash else "")
        else:
            attn, why = "eager", "the model does not support sdpa"
    elif config.attn_implementation == "flash_attention_2" and not (on_cuda and has_flash):
        why = "flash-attn is not installed" if not has_flash else "the device is not a CUDA GPU"
        log.warning("attn_implementation flash_attention_2 requested but %s; using sdpa", why)
        attn = "sdpa"
    else:
        attn = config.attn_implementation

    tf32 = False
    if on_cuda and config.tf32 is not False:
        major, _ = torch.cuda.get_device_capability(device)
        tf32 = major >= 8
    return ModelChoices(dtype=dtype, attn_implementation=attn, tf32=tf32, attention_reason=why)


def attention_support(config: Config) -> tuple[bool, bool]:
    """(sdpa, flash_attention_2) support of the model's class, read from its config.json; where the
    class cannot be told (custom code, no config), sdpa is assumed as transformers does."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        model_cfg = AutoConfig.from_pretrained(resolve_model_path(config), trust_remote_code=config.trust_remote_code)
        cls = AutoModelForCausalLM._model_mapping[type(model_cfg)]
    except Exception:  # noqa: BLE001 - unknown: keep the transformers default
        return True, True
    flash = getattr(cls, "_supports_flash_attn", getattr(cls, "_supports_flash_attn_2", False))
    return bool(getattr(cls, "_supports_sdpa", False)), bool(flash)


def resolve_model_path(config: Config) -> str:
    if config.model_name_or_path:
        return os.path.expanduser(config.model_name_or_path)
    from fullscale.demo import DEMO_BASE

    return str(DEMO_BASE)


def load_tokenizer(config: Config):
    """The base model's tokenizer, with a pad token (the eos token when it has none)."""
    return load_tokenizer_from(resolve_model_path(config), trust_remote_code=config.trust_remote_code)


def load_tokenizer_from(path: str, *, trust_remote_code: bool = False):
    """The tokenizer in `path` (a model, an adapter export, a hub id) with a pad token, as in training:
    the eos token when it has none; one with neither is refused."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - many failure types; all mean "cannot load"
        raise ModelError(_load_error("tokenizer", path, exc)) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"the tokenizer of {path} has neither a pad token nor an eos token: batches cannot be padded and "
                "completions cannot end. Add them (tokenizer.add_special_tokens({'eos_token': ..., 'pad_token': ...}), "
                "with the model's embeddings resized) and save the tokenizer with save_pretrained")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model_source(config: Config) -> None:
    """Refuse a model directory that is not a base model: a LoRA adapter given as the model."""
    import json

    path = Path(resolve_model_path(config))
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        try:
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            base = None
        raise ModelError(
            f"model_name_or_path {path} is a LoRA adapter (adapter_config.json, no config.json), not a base model"
            f"{f'; its base is {base}' if base else ''}. Set model_name_or_path to the base model"
            f"{f' ({base})' if base else ''}; to train on top of this adapter, merge it first "
            f"(fullscale export RUN_DIR --merge, or peft merge_and_unload) and train on the merged model")


def load_base_model(config: Config, choices: ModelChoices):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(config)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=choices.dtype,
            attn_implementation=choices.attn_implementation,
            trust_remote_code=config.trust_remote_code,
            output_loading_info=True,
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelError(_load_error("model", path, exc)) from None
    # transformers initialises weights it did not find at random and says so only in a log line it
    # is quiet about here: a base with missing tensors would train (and export) layers of noise.
    missing = sorted((info or {}).get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:8]) + (f", and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelError(
            f"the base model in {path} lacks {len(missing)} weight tensor(s) its config.json needs ({shown}); "
            "transformers would initialise them at random. The weight files are incomplete or from another model: "
            "re-download or re-save the model (save_pretrained) and check its *.safetensors files")
    check_model_config(model, path)
    return model


def check_model_config(model, path) -> None:
    """Settings a model's config.json must have that transformers only trips over in the first
    forward, with a traceback: said here, with the key to set."""
    cfg = model.config
    if getattr(cfg, "model_type", None) == "dbrx" and getattr(getattr(cfg, "attn_config", None), "clip_qkv", 0) is None:
        raise ModelError(
            f"the DBRX config of {path} has attn_config.clip_qkv: null, and transformers' DBRX attention clamps the "
            "queries, keys and values to +-clip_qkv in every forward (it fails without a value). Set "
            "attn_config.clip_qkv in its config.json (DBRX's released models use 8)")


def _load_error(what: str, path: str, exc: Exception) -> str:
    import json

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in str(exc):
        return (f"cannot load the {what} from {path}: it needs custom code. If you trust this repository, "
                "set trust_remote_code: true")
    if what == "tokenizer" and Path(path).is_dir():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
            f = Path(path) / name
            try:
                if f.is_file():
                    json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError) as bad:
                return (f"cannot load the tokenizer from {path}: {f} is not valid JSON ({first_line(bad)}). The "
                        "file is damaged or truncated: copy it again from where the model came from, or save the "
                        "tokenizer again with save_pretrained")
        return (f"cannot load the tokenizer from {path}: {text}. Check its tokenizer files (tokenizer.json, "
                "tokenizer_config.json, tokenizer.model), or save the tokenizer again with save_pretrained")
    hint = ("check that the directory holds config.json and the weights saved with save_pretrained"
            if Path(path).exists() else
            "it is not a local directory, and a hub download failed (offline?); give a local directory "
            "saved with save_pretrained")
    return f"cannot load the {what} from {path}: {text}. {hint}"


def add_lora(model, config: Config):
    """Wrap `model` with LoRA adapters (peft); the base weights are frozen. Tensors wrapped by
    peft's ParamWrapper (fused MoE experts, layers peft would rename) take no dropout; every other
    layer keeps lora_dropout. What was asked and what peft wrapped are compared layer by layer."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from transformers.pytorch_utils import Conv1D

    targets = resolve_lora_targets(model, config)
    conv1d = any(isinstance(model.get_submodule(n), Conv1D) for n in targets.modules)   # GPT-2's (in, out) weights
    lora = LoraConfig(
        fan_in_fan_out=conv1d,
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0 if targets.parameters else config.lora_dropout,
        target_modules=peft_target_modules(model, targets),
        target_parameters=targets.parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # peft's bridge for transformers-4 MoE adapters warns about rank patterns for names it
            # made up itself; fullscale checks what was wrapped below.
            warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys", category=RuntimeWarning)
            peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(f"peft cannot add LoRA to this model ({_peft_reason(exc)}). Its layers are: "
                         f"{layer_listing(model)}; set lora_target_modules to some of them") from None
    layers, _ = wrapped_layers(peft_model)
    missing, extra = set(targets.layers) - layers, layers - set(targets.layers)
    if extra:
        raise ModelError(f"peft wrapped layers fullscale did not ask for ({', '.join(sorted(extra)[:6])}); set "
                         f"lora_target_modules to some of: {layer_listing(model)}")
    for name in missing:
        targets.left_out[suffix(name)] = "peft did not wrap it"
    if targets.parameters and config.lora_dropout:
        from peft.tuners.lora import LoraLayer

        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and type(module).__name__ != "ParamWrapper":
                for adapter in module.lora_dropout:
                    module.lora_dropout[adapter] = torch.nn.Dropout(p=config.lora_dropout)
    peft_model.fullscale_targets = targets
    return peft_model


def _peft_reason(exc: Exception) -> str:
    """peft's message without its internal names (base_layer, lora_A.default)."""
    text = str(exc).split(". Please", 1)[0]
    return re.sub(r"^\[PEFT:[^\]]*\]\s*", "", text).strip()


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing; use_cache off; input grads on so LoRA layers get gradients."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    model.enable_input_require_grads()


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def check_vocabulary(model, tokenizer, path) -> None:
    """A tokenizer with more tokens than the model's embedding table would index past it (a
    tokenizer of another model, or tokens added without resizing the embeddings)."""
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ModelError(
            f"the tokenizer of {path} has {len(tokenizer):,} tokens but the model's embedding table has {rows:,} "
            f"rows: token ids from {rows:,} on have no embedding. The tokenizer belongs to another model, or "
            "tokens were added to it without model.resize_token_embeddings(len(tokenizer)); use the tokenizer "
            "saved with the model, or resize the embeddings and save the model again")


def build_model(config: Config, choices: ModelChoices, tokenizer=None):
    """Base model + LoRA (+ gradient checkpointing), ready to train. Returns the peft model."""
    model = load_base_model(config, choices)
    if tokenizer is not None:
        check_vocabulary(model, tokenizer, resolve_model_path(config))
    model.config.use_cache = False
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = add_lora(model, config)
    return model
