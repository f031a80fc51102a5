"""Which layers of a model get LoRA, said in the model's own layer names.

`lora_target_modules: attention` (the default) means the attention projections, whatever the
model calls them: the Linear/Conv1D layers inside its attention blocks. A model with no attention
at all (a pure state-space model such as Mamba) gets its mixers' projections instead. `all-linear`
means every linear projection but the output layer, fused MoE expert tensors included. An explicit
list is the user's: each name is checked against the model's layers.

What is left out is always said, with why: routers (their output picks experts; never a
projection), layers peft refuses (out_proj and conv1d of Mamba-based models, whose fused kernels
read the weight directly), experts peft cannot wrap (DBRX's, stored as 2-D weights read by
attribute). On MoE model types whose layers transformers 5 renamed, peft rewrites a target named
gate_proj/up_proj/down_proj/gate into the experts' tensors (a bridge for adapters made before),
so a dense MLP or shared expert named like that would silently get no LoRA: fullscale adapts
those through peft's ParamWrapper on their weight, which saves, loads back and merges like any
other LoRA tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_ATTENTION_BLOCK = re.compile(r"(^|_)(attn|attention)$|^(self_attn|self_attention|mixer)$")
_ROUTER_NAMES = re.compile(r"^(gate|router|shared_experts?_gate)$")
_STATE_PARAMS = {"A_log": "state-space", "A": "state-space", "dt_bias": "state-space",
                 "recurrent_param": "recurrent"}


def suffix(name: str) -> str:
    """A layer's kind: its name and the nearest named (not numbered) block, e.g. "self_attn.q_proj"."""
    parts = name.split(".")
    parent = next((p for p in reversed(parts[:-1]) if not p.isdigit()), "")
    return f"{parent}.{parts[-1]}" if parent else parts[-1]


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


def unwrappable_experts(model) -> list[str]:
    """Kinds of expert weights that are neither a Linear nor a 3-D fused tensor (DBRX keeps its
    experts as 2-D weights, read by attribute in the experts' forward): peft cannot wrap them."""
    found = set()
    for name, param in model.named_parameters():
        parts = name.split(".")
        if param.dim() == 2 and any("expert" in p for p in parts[:-1]) and not name.endswith(".weight"):
            found.add(".".join(parts[-3:]))
    return sorted(found)


def is_router(model, name: str) -> bool:
    """A layer that scores experts (or gates a shared expert): named gate/router inside a block
    that holds experts, or anything inside a module named router."""
    parts = name.split(".")
    if any(p == "router" for p in parts[:-1]):
        return True
    if not _ROUTER_NAMES.match(parts[-1]):
        return False
    parent = model.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else model
    return any("expert" in child for child, _ in parent.named_children())


def _state_kinds(module) -> set[str]:
    """What makes a block carry a state from one position to the next: a state-space or recurrent
    parameter of its own, a short causal convolution among its children, a linear-attention class."""
    kinds = {_STATE_PARAMS[p] for p, _ in module.named_parameters(recurse=False) if p in _STATE_PARAMS}
    if any(isinstance(c, torch.nn.Conv1d) and c.kernel_size[0] > 1 for c in module.children()):
        kinds.add("convolution")
    cls = type(module).__name__.lower()
    if "deltanet" in cls or "linearattention" in cls:
        kinds.add("linear attention")
    return kinds


def stateful_layers(model) -> dict[str, str]:
    """Blocks whose output at one position depends on earlier positions through a state of their
    own (state-space mixers, short causal convolutions, linear attention, recurrences), by kind:
    {"mamba": "state-space, convolution", ...}. Their state runs across packed examples unless
    their forward is given the boundaries, which transformers' PyTorch paths are not."""
    found: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        kinds = _state_kinds(module)
        if kinds:
            found.setdefault(name.rsplit(".", 1)[-1] or type(module).__name__, set()).update(kinds)
    return {k: ", ".join(sorted(v)) for k, v in sorted(found.items())}


def _stateful_prefixes(model) -> list[str]:
    return [name + "." for name, module in model.named_modules() if _state_kinds(module)]


def peft_refuses(model, names: list[str]) -> set[str]:
    """The layers peft refuses to adapt on this model type (out_proj, conv1d of Mamba-based models)."""
    try:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    except ImportError:   # another peft: its own error will say
        return set()
    probe = LoraConfig(target_modules=["x"])
    refused = set()
    for name in names:
        try:
            _check_lora_target_modules_mamba(probe, model, name.rsplit(".", 1)[-1])
        except ValueError:
            refused.add(name)
    return refused


def peft_remaps(model, names: list[str]) -> set[str]:
    """The layers whose names peft rewrites into MoE expert tensors on this model type (its bridge
    for adapters made with transformers 4): targeted by name, they would get no LoRA."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        return set()
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    probe = LoraConfig(target_modules=sorted(leaves))
    try:
        convert_peft_config_for_transformers(probe, model=model, conversions=None)
    except Exception:  # noqa: BLE001 - a conversion that cannot run rewrites nothing
        return set()
    kept = set(probe.target_modules or ())
    return {n for n in names if n.rsplit(".", 1)[-1] not in kept}


@dataclass
class LoraTargets:
    """What peft is asked to wrap, and how to say it."""

    modules: list[str] | str                 # names, or a full-match regex
    parameters: list[str]                    # tensors wrapped by peft's ParamWrapper (fused experts, remapped layers)
    meaning: str                             # in the user's words
    layers: list[str] = field(default_factory=list)       # every Linear/Conv1D layer meant to get LoRA
    left_out: dict[str, str] = field(default_factory=dict)  # kind -> why it gets none

    def describe_left_out(self) -> str:
        by_reason: dict[str, list[str]] = {}
        for kind, why in self.left_out.items():
            by_reason.setdefault(why, []).append(kind)
        return "; ".join(f"{', '.join(sorted(kinds))} ({why})" for why, kinds in by_reason.items())


def _kinds(names) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[suffix(n)] = counts.get(suffix(n), 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "(none)"


def layer_listing(model) -> str:
    return ", ".join(sorted({suffix(n) for n in linear_layers(model)})) or "(none)"


def _attention_layers(model, linear: list[str]) -> list[str]:
    """Linear layers inside attention blocks: modules named like *attn*/*attention* (linear attention
    included), or holding q_proj, k_proj and v_proj (RecurrentGemma's temporal_block); a module
    named mixer only when it is not a state-space mixer."""
    stateful = _stateful_prefixes(model)
    blocks = set()
    for name, module in model.named_modules():
        children = {c for c, _ in module.named_children()}
        last = name.rsplit(".", 1)[-1]
        if not (_ATTENTION_BLOCK.search(last) or {"q_proj", "k_proj", "v_proj"} <= children):
            continue
        if last == "mixer" and any((name + ".").startswith(p) for p in stateful):
            continue   # a state-space mixer (Mamba's), not attention; linear attention (linear_attn) is attention
        blocks.add(name)
    return [n for n in linear if n.rsplit(".", 1)[0] in blocks]


def _split(model, wanted: list[str], meaning: str, *, experts: list[str] | None = None) -> LoraTargets:
    """Targets for the Linear layers `wanted` (full names): routers and layers peft refuses are
    left out and said; layers peft would rewrite go through ParamWrapper."""
    left_out: dict[str, str] = {}
    routers = [n for n in wanted if is_router(model, n)]
    for n in routers:
        left_out[suffix(n)] = "routers: their output picks experts; not a projection"
    wanted = [n for n in wanted if n not in routers]
    refused = peft_refuses(model, wanted)
    for n in refused:
        left_out[suffix(n)] = ("peft does not adapt out_proj or conv1d of Mamba-based models: their fused kernels "
                               "read the weight directly")
    wanted = [n for n in wanted if n not in refused]
    remapped = peft_remaps(model, wanted)
    modules = [n for n in wanted if n not in remapped]
    parameters = sorted(experts or []) + sorted(f"{n}.weight" for n in remapped)
    return LoraTargets(modules=modules, parameters=parameters, meaning=meaning, layers=wanted, left_out=left_out)


def resolve_lora_targets(model, config) -> LoraTargets:
    """lora_target_modules for this model (see the module docstring). Raises ModelError."""
    from fullscale.errors import ModelError

    linear = linear_layers(model)
    wanted = config.lora_target_modules
    if wanted == "all-linear":
        targets = _split(model, linear, "all linear layers", experts=fused_expert_parameters(model))
        for kind in unwrappable_experts(model):
            targets.left_out[kind] = ("expert weights stored 2-D and read by attribute in the experts' forward: "
                                      "peft cannot wrap them")
        return targets
    if wanted != "attention":
        unmatched = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in linear)]
        if unmatched:
            raise ModelError(
                f"lora_target_modules: {', '.join(unmatched)} match no Linear/Conv1D layer of this model. Its layers "
                f"are: {layer_listing(model)}. Name some of them, leave lora_target_modules out for the attention "
                "projections, or use all-linear")
        chosen = [n for n in linear if any(n == t or n.endswith("." + t) for t in wanted)]
        targets = _split(model, chosen, "the layers named in lora_target_modules")
        if not targets.layers:
            raise ModelError(f"lora_target_modules: none of {', '.join(wanted)} can get LoRA on this model "
                             f"({targets.describe_left_out()}). Its layers are: {layer_listing(model)}")
        return targets
    attention = _attention_layers(model, linear)
    if attention:
        return _split(model, attention, "the attention projections")
    mixers = [n for n in linear if any(n.startswith(p) for p in _stateful_prefixes(model))]
    if mixers:
        targets = _split(model, mixers, "the state-space mixers' projections (the model has no attention)")
        if targets.layers:
            return targets
    raise ModelError(
        f"cannot find the attention projections of this model (no Linear/Conv1D inside a module named like "
        f"*attn* or *attention*, or holding q_proj, k_proj and v_proj). Its layers are: {layer_listing(model)}. "
        "Set lora_target_modules to some of them, or all-linear")


def peft_target_modules(model, targets: LoraTargets) -> list[str] | str | None:
    """What peft's target_modules gets: the layers' own names (q_proj, ...) where no other layer
    shares them, else their kinds as a full-match regex ("attn.c_proj" but not "mlp.c_proj"); None
    when only parameters are wrapped."""
    if not targets.modules:
        return None
    if isinstance(targets.modules, str):
        return targets.modules
    chosen = set(targets.modules)
    leaves = {n.rsplit(".", 1)[-1] for n in chosen}
    others = {n.rsplit(".", 1)[-1] for n in linear_layers(model) if n not in chosen}
    if not leaves & others:
        return sorted(leaves)
    pairs = sorted({tuple(suffix(n).rsplit(".", 1)) for n in chosen})
    return r".*\.(?:" + "|".join(rf"{re.escape(a)}(?:\.\d+)*\.{re.escape(b)}" for a, b in pairs) + r")$"


def wrapped_layers(peft_model) -> tuple[set[str], set[str]]:
    """(Linear/Conv1D layers that got LoRA, expert tensors that got LoRA), in the base model's names."""
    from peft.tuners.lora import LoraLayer

    layers, tensors = set(), set()
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = re.sub(r"^base_model\.model\.", "", re.sub(r"(\.base_layer)+$", "", name))
        if type(module).__name__ == "ParamWrapper":
            param = getattr(module, "parameter_name", "weight")
            (layers if param == "weight" else tensors).add(base if param == "weight" else f"{base}.{param}")
        else:
            layers.add(base)
    return layers, tensors


def describe_parameters(targets: LoraTargets) -> str:
    """The tensors peft's ParamWrapper adapts, by kind ("mlp.experts.gate_up_proj, mlp.down_proj.weight x2")."""
    counts: dict[str, int] = {}
    for name in targets.parameters:
        kind = ".".join(name.split(".")[-3:]) if not name.endswith(".weight") else suffix(name[:-7]) + ".weight"
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(k if v == 1 else f"{k} x{v}" for k, v in sorted(counts.items()))


def describe_wrapped(model) -> str:
    """The layers LoRA wraps, by kind: "self_attn.q_proj x4, ..., mlp.experts.gate_up_proj x2 (fused experts)"."""
    layers, tensors = wrapped_layers(model)
    parts = [_kinds(layers)] if layers else []
    if tensors:
        parts.append(_kinds(tensors) + " (fused experts)")
    return ", ".join(parts) or "(none)"
