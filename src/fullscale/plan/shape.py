"""The model as the plan sees it: shapes and dtypes from config.json, built on the meta device
(no weights), with LoRA added as the run would add it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fullscale.config import Config
from fullscale.errors import ModelError, first_line

GB = 1024**3   # "GB" in fullscale is 2^30 bytes, as in the memory statistics of monitor.py
MB = 1024**2
FP32 = 4


# ----------------------------------------------------------------------------- the model, from config.json

@dataclass
class LinearInfo:
    """One Linear of a decoder layer: where its input comes from, its size, its LoRA rank (0: none)."""

    name: str
    group: str          # attn_in (q/k/v), attn_out (o), mlp_in (gate/up), mlp_out (down)
    in_features: int
    out_features: int
    lora_rank: int


@dataclass
class ModelShape:
    """What the plan needs to know about the model, read from config.json through a meta model."""

    path: str
    model_type: str
    decoder_layer: str            # class name of a decoder layer (the FSDP wrap unit)
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int
    num_parameters: int           # base model parameters (shared ones once)
    weight_bytes: int             # base parameters, exact
    buffer_bytes: int             # buffers (rotary frequencies, ...), exact
    lora_parameters: int
    lora_bytes: int
    lora_tensors: int
    lora_dtype_bytes: int
    gated_mlp: bool
    layer_bytes: int = 0          # base parameters of one decoder layer (the FSDP / ZeRO-3 unit)
    linears: list[LinearInfo] = field(default_factory=list)   # of one decoder layer
    llama_like: bool = True       # the activation formula is exact for this family


def _text_config(cfg):
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _load_model_config(config: Config):
    from transformers import AutoConfig

    from fullscale.model import resolve_model_path

    path = resolve_model_path(config)
    try:
        return path, AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot read config.json"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("check that the directory holds the config.json written by save_pretrained" if Path(path).exists()
                else "it is not a local directory and the hub could not be reached; give a local model directory")
        raise ModelError(f"cannot read the model config of {path}: {first}. {hint}") from None


def inspect_model(config: Config, *, dtype: torch.dtype, attn_implementation: str = "sdpa") -> ModelShape:
    """Build the model and its LoRA on the meta device from config.json and measure them exactly."""
    from transformers import AutoModelForCausalLM

    from fullscale.model import add_lora

    path, model_cfg = _load_model_config(config)
    model = None
    for attn in dict.fromkeys((attn_implementation, "eager")):   # eager where the model has no sdpa (Mamba)
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(model_cfg, dtype=dtype, attn_implementation=attn,
                                                         trust_remote_code=config.trust_remote_code)
            break
        except Exception as exc:  # noqa: BLE001
            error = exc
    if model is None:
        raise ModelError(f"cannot build the model of {path} from its config.json: {first_line(error)}") from None
    params = list(model.parameters())            # shared (tied) parameters once
    num_parameters = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    with torch.device("meta"):
        model = add_lora(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    layers = _decoder_layers(model, _text_config(model_cfg))
    layer_bytes = sum(p.numel() * p.element_size() for p in layers[0].parameters() if not p.requires_grad) \
        if layers else 0
    text = _text_config(model_cfg)
    hidden = text.hidden_size
    # A pure state-space model (Mamba) has no attention heads: its mixers' heads stand in for the
    # per-head terms, which its layers do not have (the activation formula is then an estimate).
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "num_heads", None) or 1
    linears = _layer_linears(layers[0], hidden) if layers else []
    intermediate = getattr(text, "intermediate_size", None) or max(
        (li.in_features for li in linears if li.group == "mlp_out"), default=4 * hidden)
    mlp_names = {li.name.rsplit(".", 1)[-1] for li in linears if li.group == "mlp_in"}
    gated = bool(mlp_names & {"gate_proj", "w1", "gate_up_proj", "w3"}) or \
        sum(1 for li in linears if li.group == "mlp_in") >= 2
    names = {li.name.rsplit(".", 1)[-1] for li in linears}
    llama_like = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    return ModelShape(
        path=path, model_type=getattr(model_cfg, "model_type", "?"),
        decoder_layer=type(layers[0]).__name__ if layers else "?",
        num_layers=len(layers) or text.num_hidden_layers, hidden_size=hidden, intermediate_size=intermediate,
        num_heads=heads, num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or max(1, hidden // heads), vocab_size=text.vocab_size,
        dtype_bytes=torch.empty((), dtype=dtype, device="meta").element_size(),
        num_parameters=num_parameters, weight_bytes=weight_bytes, buffer_bytes=buffer_bytes,
        lora_parameters=sum(p.numel() for p in trainable),
        lora_bytes=sum(p.numel() * p.element_size() for p in trainable), lora_tensors=len(trainable),
        lora_dtype_bytes=trainable[0].element_size() if trainable else FP32,
        gated_mlp=gated, layer_bytes=layer_bytes, linears=linears, llama_like=llama_like,
    )


def _decoder_layers(model, text_cfg) -> list:
    """The decoder layers: the longest ModuleList of identical blocks (num_hidden_layers of them)."""
    want = getattr(text_cfg, "num_hidden_layers", None)
    best: list = []
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and \
                len({type(m) for m in module}) == 1 and (len(module) == want or len(module) > len(best)):
            if len(module) == want:
                return list(module)
            best = list(module)
    return best


def _layer_linears(layer, hidden: int) -> list[LinearInfo]:
    """The Linears of one decoder layer (LoRA-wrapped or not), grouped by where their input comes from."""
    out = []
    for name, module in layer.named_modules():
        base = getattr(module, "base_layer", None)
        if base is not None and isinstance(base, torch.nn.Linear):
            rank = int(next(iter(module.r.values()), 0)) if getattr(module, "r", None) else 0
            lin = base
        elif isinstance(module, torch.nn.Linear) and ".lora_" not in f".{name}" and not name.endswith("base_layer"):
            rank, lin = 0, module
        else:
            continue
        leaf = name.rsplit(".", 1)[-1]
        in_attention = "attn" in name or "attention" in name
        if in_attention:
            group = "attn_out" if leaf in ("o_proj", "out_proj", "dense", "wo", "c_proj") else "attn_in"
        else:
            group = "mlp_in" if lin.in_features == hidden else "mlp_out"
        out.append(LinearInfo(name=name, group=group, in_features=lin.in_features,
                              out_features=lin.out_features, lora_rank=rank))
    return out
