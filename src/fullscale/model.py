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
from fullscale.errors import ModelError

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
    return model


def _load_error(what: str, path: str, exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in str(exc):
        return (f"cannot load the {what} from {path}: it needs custom code. If you trust this repository, "
                "set trust_remote_code: true")
    hint = ("check that the directory holds config.json and the weights saved with save_pretrained"
            if Path(path).exists() else
            "it is not a local directory, and a hub download failed (offline?); give a local directory "
            "saved with save_pretrained")
    return f"cannot load the {what} from {path}: {text}. {hint}"


# The default lora_target_modules means "the attention projections", whatever a model calls them:
# the Linear/Conv1D layers inside its attention blocks (q/k/v/o, fused qkv_proj, query_key_value,
# c_attn, Wqkv, MLA's q_a/q_b/kv_a/kv_b, out_proj, dense ...).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_ATTENTION_BLOCK = re.compile(r"(^|_)(attn|attention)$|^(self_attn|self_attention|mixer)$")


def linear_layers(model) -> list[str]:
    """Full names of the model's Linear and transformers Conv1D layers (GPT-2 style), output layer excluded."""
    from transformers.pytorch_utils import Conv1D

    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]


def fused_expert_parameters(model) -> list[str]:
    """Suffixes ("mlp.experts.gate_up_proj") of the 3-D expert weights of MoE blocks that hold
    their experts fused in one tensor instead of one Linear each."""
    found = set()
    for name, param in model.named_parameters():
        parts = name.split(".")
        if param.dim() == 3 and len(parts) >= 3 and "expert" in parts[-2]:
            found.add(".".join(parts[-3:]))
    return sorted(found)


@dataclass
class LoraTargets:
    """What peft is asked to wrap, and how to say it."""

    modules: list[str] | str                 # names, a full-match regex, or "all-linear"
    parameters: list[str]                    # fused MoE expert weights (peft ParamWrapper)
    meaning: str                             # in the user's words


def _suffix(name: str) -> str:
    """A layer's kind: its name and the nearest named (not numbered) block, e.g. "self_attn.q_proj"."""
    parts = name.split(".")
    parent = next((p for p in reversed(parts[:-1]) if not p.isdigit()), "")
    return f"{parent}.{parts[-1]}" if parent else parts[-1]


def resolve_lora_targets(model, config: Config) -> LoraTargets:
    """lora_target_modules for this model: the default resolves to its attention projections, an
    explicit list is checked name by name, all-linear adds fused MoE experts. Raises ModelError."""
    linear = linear_layers(model)
    listing = ", ".join(sorted({_suffix(n) for n in linear})) or "(none)"
    wanted = config.lora_target_modules
    if wanted == "all-linear":
        return LoraTargets("all-linear", fused_expert_parameters(model), "all linear layers")
    if "lora_target_modules" in config.explicit:
        unmatched = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in linear)]
        if unmatched:
            raise ModelError(
                f"lora_target_modules: {', '.join(unmatched)} match no Linear/Conv1D layer of this model. Its layers "
                f"are: {listing}. Name some of them, leave lora_target_modules out for the attention projections, or "
                "use all-linear")
        return LoraTargets(list(wanted), [], "the layers named in lora_target_modules")
    attention = [n for n in linear if len(n.split(".")) >= 2 and _ATTENTION_BLOCK.search(n.split(".")[-2])]
    if not attention:
        raise ModelError(
            f"cannot find the attention projections of this model (no Linear/Conv1D inside a module named like "
            f"*attn* or *attention*). Its layers are: {listing}. Set lora_target_modules to some of them, or all-linear")
    names = {n.rsplit(".", 1)[-1] for n in attention}
    outside = {n.rsplit(".", 1)[-1] for n in linear} - names
    if names <= set(DEFAULT_TARGETS) and not (names & outside):
        return LoraTargets(list(DEFAULT_TARGETS), [], "the attention projections")   # peft matches by name
    # Other names, or names shared with the MLP (GPT-2's c_proj): a regex on the block and the layer.
    pairs = sorted({_suffix(n) for n in attention})
    regex = r".*\.(?:" + "|".join(re.escape(p) for p in pairs) + r")$"
    return LoraTargets(regex, [], "the attention projections")


def describe_wrapped(model) -> str:
    """The modules LoRA wraps, by kind: "self_attn.q_proj x4, ..., mlp.experts.gate_up_proj x2 (expert weights)"."""
    from peft.tuners.lora import LoraLayer

    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            kind = _suffix(re.sub(r"\.base_layer$", "", name))
            if type(module).__name__ == "ParamWrapper":
                param = getattr(module, "parameter_name", "weight")
                kind = f"{kind}.{param} ({'fused experts' if 'expert' in kind else 'parameter'})"
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def add_lora(model, config: Config):
    """Wrap `model` with LoRA adapters (peft); the base weights are frozen. Fused MoE experts
    (peft's ParamWrapper, which takes no dropout) get LoRA without dropout; every other layer keeps
    lora_dropout."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_lora_targets(model, config)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0 if targets.parameters else config.lora_dropout,
        target_modules=targets.modules,
        target_parameters=targets.parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        listing = ", ".join(sorted({_suffix(n) for n in linear_layers(model)}))
        raise ModelError(f"peft cannot add LoRA to this model ({exc}). Its layers are: {listing}; set "
                         "lora_target_modules to some of them") from None
    if targets.parameters and config.lora_dropout:
        from peft.tuners.lora import LoraLayer

        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and type(module).__name__ != "ParamWrapper":
                for adapter in module.lora_dropout:
                    module.lora_dropout[adapter] = torch.nn.Dropout(p=config.lora_dropout)
    peft_model.fullscale_targets = targets
    return peft_model


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


def build_model(config: Config, choices: ModelChoices):
    """Base model + LoRA (+ gradient checkpointing), ready to train. Returns the peft model."""
    model = load_base_model(config, choices)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = add_lora(model, config)
    return model
