"""Plan a run before it starts: peak memory per device, time per step, disk; and settings that fit.

Everything here reads the model's config.json only: the model is built on the meta device (shapes
and dtypes, no storage), LoRA is added to it with the run's settings, and bytes are counted from
those tensors and from a per-layer formula for the activations. Nothing is loaded, so
`check_plan()` runs in well under a second before `train()` loads the weights.

Memory of one process (bytes; under DDP every process holds the whole model):

    weights      base parameters + buffers in the training dtype, counted exactly on the meta model
    lora         the adapter: r x (in + out) per target Linear, in fp32 (peft keeps adapters in fp32)
    gradients    one per trainable parameter, same dtype
    optimizer    AdamW: exp_avg + exp_avg_sq per trainable parameter, and a 4-byte `step` per tensor
    activations  what autograd keeps for the backward of the longest batch (per_device batch x
                 max_seq_length), layer by layer (see `_layer_saved`), plus the backward's transient
    logits       logits (B x T x V in the model dtype, held by the loop through the backward), and the
                 fp32 log-softmax of the loss with its two gradients
    eval         the evaluation batch under no_grad: its logits and loss, or one layer's temporaries

Training peak = weights + lora + optimizer + gradients + activations + logits (+ runtime).
Evaluation peak = weights + lora + optimizer + eval (+ runtime); gradients are freed by then.
The activation formula is exact for the Llama family (Llama, Mistral, Qwen2, ...: RMSNorm, rotary
attention, gated MLP) against the tensors autograd saves (tests/unit/test_plan.py), and within a
few percent of the peak resident memory of real CPU steps (tests/integration/test_plan.py); other
decoder architectures get the same formula as an estimate. FSDP / ZeRO sharding divides the rows as
`Target.memory` says; that and every CUDA-specific row (bool dropout masks, the CUDA context) are
reasoned, not measured: this project's tests have no GPU.

On the CPU the rows are live tensor bytes. glibc's default heap can hold several times more
(fragmentation); `Plan.pin_allocator` says when that could matter and `pin_cpu_allocator()` makes
the resident memory follow the tensors.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fullscale.config import Config
from fullscale.errors import ConfigError, ModelError
from fullscale.monitor import process_status_kb

GB = 1024**3   # "GB" in fullscale is 2^30 bytes, as in the memory statistics of monitor.py
MB = 1024**2
FP32 = 4
# The CUDA context, cuBLAS workspaces and kernels live outside PyTorch's allocator; a typical size
# (not measured by this project's tests, which run without a GPU).
CUDA_RUNTIME_BYTES = GB // 2
# On the CPU the first full-size step allocates ~4.3 MiB that are not the model's tensors (MKL and
# oneDNN scratch, autograd bookkeeping); measured, independent of batch, length and depth.
CPU_RUNTIME_BYTES = 9 * MB // 2
# glibc's default heap held up to 4.0x the live tensors of a CPU training step (fragmentation; see
# pin_cpu_allocator). When that much could outgrow the usable RAM, train pins the allocator.
CPU_HEAP_FACTOR = 4.0
CHECKPOINT_STAGING = 2  # checkpoints beyond save_total_limit: the best one kept outside it, one being written
SATURATING_TOKENS = 4096  # tokens per micro-step beyond which a larger micro-batch barely speeds a GPU up


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
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_cfg, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=config.trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot build the model of {path} from its config.json: {exc}") from None
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
    heads = text.num_attention_heads
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
        head_dim=getattr(text, "head_dim", None) or hidden // heads, vocab_size=text.vocab_size,
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


# ----------------------------------------------------------------------------- activations

@dataclass(frozen=True)
class Workload:
    """One micro-batch as the plan sees it: the longest one, every row max_seq_length tokens."""

    batch: int
    seq: int
    gradient_checkpointing: bool
    dropout: float
    attn: str                  # sdpa, flash_attention_2 or eager
    padded: bool               # an attention mask is passed (a padded batch of several rows)
    mask_bytes: int            # bytes per element of a dropout mask: 1 on CUDA (bool), the dtype's on CPU


def _lora_saved(linears: list[LinearInfo], *, n: int, width: int, in_rg: bool, s: int, a: int,
                w: Workload, input_kept: bool = False) -> int:
    """Bytes LoRA keeps for the Linears that share one input of `width` features (n tokens).

    peft computes lora_B(lora_A(dropout(x.to(a)))): lora_A keeps its input and lora_B keeps
    lora_A's output (n x r). Each Linear has its own dropout, so with dropout each keeps its own
    dropped copy (and the mask, when the input needs a gradient); without dropout they share x
    itself (free when another op keeps it already: `input_kept`), or each keeps its own cast copy
    when the base dtype differs from the adapter's."""
    adapted = [li for li in linears if li.lora_rank]
    if not adapted:
        return 0
    total = sum(n * li.lora_rank * a for li in adapted)
    if w.dropout > 0:
        total += len(adapted) * n * width * (a + (w.mask_bytes if in_rg else 0))
    elif s == a:
        total += 0 if input_kept else n * width * s
    else:
        total += len(adapted) * n * width * a
    return total


def _attention_saved(shape: ModelShape, w: Workload, *, s: int) -> int:
    """Bytes the attention kernel keeps: q, k, v, its output and the log-sum-exp (flash/sdpa kernels),
    or the full score matrices (eager)."""
    b, t = w.batch, w.seq
    n = b * t
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    lse = b * shape.num_heads * t * FP32
    if w.attn == "eager":
        # matmul(q, k^T) keeps q and the repeated k; softmax (fp32) keeps its output; matmul(p, v)
        # keeps p (the same tensor in fp32, a cast copy otherwise) and the repeated v.
        kv_rep = q if shape.num_kv_heads != shape.num_heads else kv
        scores = b * shape.num_heads * t * t * (FP32 if s == FP32 else FP32 + s)
        return n * q * s + 2 * n * kv_rep * s + scores
    if w.padded and w.attn == "sdpa":
        # With a padding mask, transformers repeats k/v to every head and sdpa turns the boolean
        # mask into a float one (B x 1 x T x T) per layer, which the backward keeps.
        return 3 * n * q * s + n * q * s + lse + b * t * t * s
    return n * q * s + 2 * n * kv * s + n * q * s + lse


def _role(li: LinearInfo) -> str:
    """gate, up or both (a fused gate_up projection, or a name this plan does not know)."""
    leaf = li.name.rsplit(".", 1)[-1]
    return {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up"}.get(leaf, "both")


def _layer_saved(shape: ModelShape, w: Workload, *, x_rg: bool) -> tuple[int, bool]:
    """Bytes autograd keeps for one decoder layer, and whether its output needs a gradient.

    `x_rg`: the layer input needs a gradient (every layer after the first LoRA layer; all of
    them under gradient checkpointing, which turns on input gradients). Frozen weights keep
    nothing for their own (absent) gradient, so a tensor is kept only where it feeds a LoRA
    weight or lies on the path of one."""
    n = w.batch * w.seq
    h, i, s, a = shape.hidden_size, shape.intermediate_size, shape.dtype_bytes, shape.lora_dtype_bytes
    q = shape.num_heads * shape.head_dim
    groups = {g: [li for li in shape.linears if li.group == g] for g in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
    has_lora = {g: any(li.lora_rank for li in lis) for g, lis in groups.items()}
    total = 0
    # RMSNorm keeps its fp32 input and 1/rms (x * rsqrt(mean(x^2))); weight * x keeps only the weight.
    norm = n * h * FP32 + n * FP32
    if x_rg:
        total += norm
    total += _lora_saved(groups["attn_in"], n=n, width=h, in_rg=x_rg, s=s, a=a, w=w)
    attn_rg = x_rg or has_lora["attn_in"]
    if attn_rg:
        total += _attention_saved(shape, w, s=s)
    # sdpa and flash kernels keep their output, which o_proj reads as a view; eager makes a copy.
    total += _lora_saved(groups["attn_out"], n=n, width=q, in_rg=attn_rg, s=s, a=a, w=w,
                         input_kept=attn_rg and w.attn != "eager")
    mid_rg = attn_rg or has_lora["attn_out"]
    if mid_rg:
        total += norm
    total += _lora_saved(groups["mlp_in"], n=n, width=h, in_rg=mid_rg, s=s, a=a, w=w)
    mlp_rg = mid_rg or has_lora["mlp_in"]
    if shape.gated_mlp:
        # act(gate) keeps gate's output; act(gate) * up keeps up (for act's gradient) and act(gate)
        # (for up's gradient), each only when that gradient is needed.
        gate_rg = mid_rg or any(li.lora_rank for li in groups["mlp_in"] if _role(li) in ("gate", "both"))
        up_rg = mid_rg or any(li.lora_rank for li in groups["mlp_in"] if _role(li) in ("up", "both"))
        total += (2 * gate_rg + up_rg) * n * i * s
    elif mlp_rg:
        total += n * i * s  # the activation keeps its input
    total += _lora_saved(groups["mlp_out"], n=n, width=i, in_rg=mlp_rg, s=s, a=a, w=w)
    return total, mlp_rg or has_lora["mlp_out"]


@dataclass
class ActivationEstimate:
    """Bytes of one micro-step's forward/backward above the resident model, by part."""

    saved: int        # kept for the backward at the end of the forward (layer activations, final norm)
    transient: int    # the backward's extra at its peak: the loss, the final norm or one layer's gradients
    logits: int       # logits (held by the loop) + fp32 log-softmax + its two gradients
    peak: int         # the micro-step's peak: saved + logits part + transient, as they overlap

    @property
    def activations(self) -> int:
        """Everything but the logits row, so that activations + logits = peak."""
        return self.peak - self.logits


def estimate_activations(shape: ModelShape, w: Workload) -> ActivationEstimate:
    """Peak bytes of one training micro-step on the longest batch (see `_layer_saved`).

    Forward: the layers keep their saved tensors (under checkpointing only each layer's input),
    the final norm keeps its fp32 input, the logits (B x T x V) are held by the loop through the
    backward and the loss keeps its fp32 log-softmax (B x (T-1) x V). The backward's peak is the
    largest of: the loss (two more log-softmax-sized gradients), the final RMSNorm (five fp32
    temporaries of B x T x hidden), the last layer's MLP (three B x T x intermediate gradients),
    and under checkpointing the last layer recomputed on top of it. Measured on the CPU against
    the allocator's live bytes, this holds to a few percent (tests/integration/test_plan.py)."""
    b, t = w.batch, w.seq
    n = b * t
    h, i, s = shape.hidden_size, shape.intermediate_size, shape.dtype_bytes
    lse = b * (t - 1) * shape.vocab_size * FP32           # fp32 log-softmax of the shifted logits
    logits = n * shape.vocab_size * s
    rotary = 2 * t * shape.head_dim * s                   # cos/sin, shared by every layer
    final_norm = n * h * FP32 + n * FP32
    layer_full, _ = _layer_saved(shape, w, x_rg=True)
    if w.gradient_checkpointing:
        saved = shape.num_layers * n * h * s + rotary + final_norm
    else:
        saved, x_rg = rotary + final_norm, False
        for _ in range(shape.num_layers):
            layer, x_rg = _layer_saved(shape, w, x_rg=x_rg)
            saved += layer
    if w.padded and w.attn == "eager":
        saved += b * t * t * s                            # the additive mask, built once
    grad_hidden = n * h * s
    loss_phase = 2 * lse
    norm_phase = 5 * n * h * FP32 + (grad_hidden if s != FP32 else 0) - lse
    mlp_phase = (3 if shape.gated_mlp else 2) * n * i * s + grad_hidden - n * h * FP32 - lse
    if w.gradient_checkpointing:
        # The last layer is recomputed (its input is already kept) before its backward runs.
        mlp_phase += layer_full - (n * h * FP32 if s == FP32 else 0)
        if s != FP32:
            mlp_phase += n * h * FP32   # measured: in bf16 an fp32 gradient of the residual outlives the first layer
    transient = max(loss_phase, norm_phase, mlp_phase)
    peak = saved + logits + lse + transient
    return ActivationEstimate(saved=saved, transient=transient, logits=logits + 3 * lse, peak=peak)


def estimate_eval_activations(shape: ModelShape, *, batch: int, seq: int) -> int:
    """Peak bytes of one evaluation batch under no_grad.

    The embeddings output stays referenced through the forward, beside the residual stream; on top
    of them the largest of: the attention of one layer (its normed input, q, k, v, the kernel's
    output, and o_proj's base output, scaled LoRA output and their sum in the adapter dtype), its
    gated MLP (normed input, act(gate), up, their product, down's output), the RMSNorm's fp32
    temporaries, or the logits with the loss's fp32 copy and log-softmax."""
    n = batch * seq
    h, i, s, a = shape.hidden_size, shape.intermediate_size, shape.dtype_bytes, shape.lora_dtype_bytes
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    lse = batch * (seq - 1) * shape.vocab_size * FP32
    logits = n * shape.vocab_size * s
    cast = a if s != a else 0                          # peft casts the input to the adapter dtype
    attention = n * h * s + 2 * n * q * s + 2 * n * kv * s + n * h * (s + 2 * a) + n * q * cast
    mlp = 2 * n * h * s + (3 if shape.gated_mlp else 2) * n * i * s
    norm = 3 * n * h * FP32
    return 2 * n * h * s + max(logits + 2 * lse, attention, mlp, norm)


# ----------------------------------------------------------------------------- memory of one process

@dataclass
class MemoryEstimate:
    """Bytes per process for one setting of batch sizes and checkpointing."""

    weights: int            # base parameters + buffers
    lora: int
    gradients: int          # of the trainable parameters (+ DDP's gradient buckets when distributed)
    optimizer: int          # AdamW states
    activations: int        # training micro-step, without the logits row
    logits: int             # logits + loss of the training micro-step
    eval: int               # evaluation batch, no grads
    runtime: int            # CUDA context / CPU scratch

    @property
    def train_peak(self) -> int:
        return self.weights + self.lora + self.gradients + self.optimizer + self.activations + self.logits + self.runtime

    @property
    def eval_peak(self) -> int:
        # Evaluation runs between steps: gradients are freed (zero_grad(set_to_none=True)), states are not.
        return self.weights + self.lora + self.optimizer + self.eval + self.runtime

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.eval_peak)


@dataclass(frozen=True)
class Settings:
    """The knobs the plan may change."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    per_device_eval_batch_size: int

    def overrides(self) -> str:
        return (f"per_device_train_batch_size={self.per_device_train_batch_size} "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} "
                f"gradient_checkpointing={str(self.gradient_checkpointing).lower()} "
                f"per_device_eval_batch_size={self.per_device_eval_batch_size}")


@dataclass(frozen=True)
class Sharding:
    """How the run spreads the model over its processes: DDP (every process holds everything), FSDP
    or DeepSpeed ZeRO-3 (weights, adapter, gradients and states sharded; one decoder layer gathered
    at a time, the next one prefetched), ZeRO-2 (gradients and states sharded), each with offload."""

    kind: str = "ddp"                 # ddp, fsdp, zero2, zero3
    offload_params: bool = False      # sharded weights live in CPU RAM
    offload_optimizer: bool = False   # optimizer states live in CPU RAM

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Sharding:
        """What `accelerate launch` told this process (its environment variables), read as
        training reads them (fullscale.sharding, fullscale.zero)."""
        from fullscale import sharding, zero

        fsdp = sharding.requested(env)
        if fsdp is not None:
            return cls("fsdp", offload_params=fsdp.offload, offload_optimizer=fsdp.offload)
        ds = zero.requested(env)
        if ds is not None:
            return cls({3: "zero3", 2: "zero2"}.get(ds.stage, "ddp"), offload_params=ds.offload_params != "none",
                       offload_optimizer=ds.offload_optimizer != "none")
        return cls()

    @classmethod
    def from_accelerate_config(cls, path: str | os.PathLike) -> tuple[Sharding, int]:
        """The sharding and total process count of an `accelerate launch --config_file` file."""
        from accelerate.commands.config.config_args import load_config_from_file

        try:
            cfg = load_config_from_file(str(path))
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read the accelerate config {path}: {exc}") from None
        kind = str(getattr(cfg.distributed_type, "value", cfg.distributed_type))
        processes = max(1, int(cfg.num_processes or 1))
        if kind == "FSDP":
            offload = bool((cfg.fsdp_config or {}).get("fsdp_offload_params", False))
            return cls("fsdp", offload_params=offload, offload_optimizer=offload), processes
        if kind == "DEEPSPEED":
            ds = cfg.deepspeed_config or {}
            stage = int(ds.get("zero_stage", 2))
            return cls("zero3" if stage == 3 else "zero2" if stage == 2 else "ddp",
                       offload_params=ds.get("offload_param_device", "none") not in ("none", None),
                       offload_optimizer=ds.get("offload_optimizer_device", "none") not in ("none", None)), processes
        return cls(), processes

    def describe(self) -> str:
        names = {"ddp": "DDP (every process holds the whole model)", "fsdp": "FSDP (sharded weights)",
                 "zero2": "DeepSpeed ZeRO-2 (sharded gradients and states)",
                 "zero3": "DeepSpeed ZeRO-3 (sharded weights)"}
        extra = [w for w, on in (("parameters", self.offload_params), ("optimizer", self.offload_optimizer)) if on]
        return names[self.kind] + (f", {' and '.join(extra)} offloaded to CPU" if extra else "")


@dataclass(frozen=True)
class Target:
    """What the estimate is for: the model on a device kind, with the run's sequence length."""

    shape: ModelShape
    device_type: str        # cuda or cpu
    attn: str
    seq: int
    dropout: float
    num_processes: int
    packing: bool = False   # packed rows carry a block-diagonal attention mask, like padded batches
    sharding: Sharding = Sharding()

    def memory(self, settings: Settings) -> MemoryEstimate:
        shape = self.shape
        mask_bytes = 1 if self.device_type == "cuda" else shape.lora_dtype_bytes   # CUDA's fused dropout: bool masks
        b = settings.per_device_train_batch_size
        w = Workload(batch=b, seq=self.seq, gradient_checkpointing=settings.gradient_checkpointing,
                     dropout=self.dropout, attn=self.attn, padded=b > 1 or self.packing, mask_bytes=mask_bytes)
        act = estimate_activations(shape, w)
        weights, lora = shape.weight_bytes + shape.buffer_bytes, shape.lora_bytes
        grads = lora * (2 if self.num_processes > 1 else 1)   # DDP copies gradients into its buckets
        optimizer = 2 * lora + FP32 * shape.lora_tensors
        kind, procs = self.sharding.kind, max(1, self.num_processes)
        if kind in ("fsdp", "zero3"):
            # The decoder layers are sharded; one is gathered for compute and the next prefetched. The
            # rest (embeddings, final norm, lm_head) is counted whole: it is gathered through the step.
            layers = shape.layer_bytes * shape.num_layers
            rest = weights - layers
            weights = rest + 2 * shape.layer_bytes + (0 if self.sharding.offload_params else layers // procs)
            lora, grads = -(-lora // procs), -(-lora // procs)
            optimizer = -(-optimizer // procs)
        elif kind == "zero2":
            grads, optimizer = -(-lora // procs), -(-optimizer // procs)
        if self.sharding.offload_optimizer:
            optimizer = 0
        return MemoryEstimate(
            weights=weights, lora=lora, gradients=grads, optimizer=optimizer,
            activations=act.activations, logits=act.logits,
            eval=estimate_eval_activations(shape, batch=settings.per_device_eval_batch_size, seq=self.seq),
            runtime=CUDA_RUNTIME_BYTES if self.device_type == "cuda" else CPU_RUNTIME_BYTES)


# ----------------------------------------------------------------------------- device

def device_memory(config: Config, device: torch.device, *, num_processes: int) -> tuple[int, str]:
    """Bytes one process may use, and where the number comes from: memory_budget_gb when set, else
    the GPU's total memory, else on the CPU the available RAM shared by this node's processes."""
    if config.memory_budget_gb is not None:
        return int(config.memory_budget_gb * GB), "memory_budget_gb"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("planning for a GPU on a machine without one: set memory_budget_gb to the GPU's "
                              "memory (e.g. memory_budget_gb=80), or plan on the machine that trains")
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"total memory of {props.name}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes) or 1)
    available = _mem_available()
    share = f", shared by {local} processes" if local > 1 else ""
    return available // max(1, local), f"available RAM (MemAvailable{share})"


def _mem_available() -> int:
    """The RAM available without swapping (Linux MemAvailable), through psutil."""
    import psutil

    return psutil.virtual_memory().available


def _choices(config: Config, device: torch.device):
    """dtype and attention for `device`; a GPU can be planned without one present."""
    from fullscale.model import ModelChoices, choose

    if device.type != "cuda" or torch.cuda.is_available():
        return choose(config, device)
    dtype = torch.float32 if config.bf16 is False else torch.bfloat16
    attn = "sdpa" if config.attn_implementation == "auto" else config.attn_implementation
    return ModelChoices(dtype=dtype, attn_implementation=attn, tf32=False)


# ----------------------------------------------------------------------------- disk

@dataclass
class DiskEstimate:
    checkpoint_bytes: int        # one checkpoint: adapter + optimizer + small state files
    num_checkpoints: int         # the most that exist at once
    best_model_bytes: int
    needed_bytes: int
    free_bytes: int | None
    path: str

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.needed_bytes <= self.free_bytes


def estimate_disk(shape: ModelShape, config: Config) -> DiskEstimate:
    """Checkpoints on disk: adapter (safetensors) + optimizer.pt (two states, steps) + ~64 KB of
    state files each; save_total_limit of them, the best one when it is older, and one being
    written before the oldest is removed; plus best_model/ (adapter + tokenizer files)."""
    adapter = shape.lora_bytes + 16 * 1024
    optimizer = 2 * shape.lora_bytes + shape.lora_tensors * 1024 + 4096
    checkpoint = adapter + optimizer + 64 * 1024
    best = adapter + 16 * MB   # tokenizer files: a few MB for the common vocabularies
    count = config.save_total_limit + CHECKPOINT_STAGING
    path = Path(config.output_dir or "runs").absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    return DiskEstimate(checkpoint_bytes=checkpoint, num_checkpoints=count, best_model_bytes=best,
                        needed_bytes=count * checkpoint + best, free_bytes=free, path=str(path))


# Measured by benchmarks/bench_data.py (200k chat rows, 9.5M tokens, 2 cores; RESULTS.md): the
# local main process's peak while preparing, over its size after imports, and the resident growth
# of a rank that only maps the store.
PREPARE_BYTES_PER_TOKEN = 40
STORE_BYTES_PER_TOKEN = 8          # int32 ids + int32 labels
STORE_BYTES_PER_EXAMPLE = 16       # int64 offset + int64 row number
BYTES_PER_TOKEN_OF_FILE = 0.25     # tokens per byte of a data file, roughly (JSON, ~4 characters a token)


@dataclass
class DataEstimate:
    """Host memory for the data: the token store (mapped, shared by a node's processes through the page
    cache), and the one-off peak of the process that prepares it."""

    file_bytes: int
    tokens: int                    # estimated from the file size (or counted, for a prepared store)
    store_bytes: int
    prepare_peak_bytes: int
    source: str


def estimate_data(config: Config) -> DataEstimate | None:
    from fullscale.demo import DEMO_TRAIN

    from fullscale.config import train_sources

    sources = [s["path"] for s in train_sources(config)] or [str(DEMO_TRAIN)]
    files = [Path(f) for f in (*sources, config.eval_file) if f]
    try:
        size = sum(sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) if f.is_dir() else f.stat().st_size
                   for f in files)
    except OSError:
        return None
    tokens = int(size * BYTES_PER_TOKEN_OF_FILE)
    return DataEstimate(file_bytes=size, tokens=tokens, store_bytes=tokens * STORE_BYTES_PER_TOKEN,
                        prepare_peak_bytes=tokens * PREPARE_BYTES_PER_TOKEN,
                        source=f"~{BYTES_PER_TOKEN_OF_FILE:g} tokens per byte of the data files")


# ----------------------------------------------------------------------------- the plan

@dataclass
class Timing:
    """From --probe: real steps of the real model on synthetic tokens of the longest batch."""

    micro_step_seconds: float
    optimizer_seconds: float
    step_seconds: float
    eval_batch_seconds: float
    measured_peak_bytes: int | None      # CUDA: peak allocated; CPU: peak RSS of a micro-step above the loaded model
    planned_peak_bytes: int              # the plan's number for the same quantity
    allocator_pinned: bool               # CPU: whether the probe pinned glibc's allocator
    num_steps: int
    num_evals: int
    eval_batches: int
    total_seconds: float


@dataclass
class Plan:
    """Memory, disk and (with a probe) time for one config on one kind of device."""

    config_source: str
    model: ModelShape
    device: str
    device_memory: int
    memory_source: str
    margin: float
    num_processes: int
    sharding: Sharding
    dtype: str
    attn_implementation: str
    max_seq_length: int
    target_batch: int
    settings: Settings
    memory: MemoryEstimate
    without_checkpointing: MemoryEstimate
    with_checkpointing: MemoryEstimate
    recommendation: Settings | None
    recommended_memory: MemoryEstimate | None
    max_seq_length_that_fits: int | None
    disk: DiskEstimate
    data: DataEstimate | None = None
    timing: Timing | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return int(self.device_memory * (1 - self.margin))

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.usable

    @property
    def pin_allocator(self) -> bool:
        """On the CPU: whether glibc's default heap (up to CPU_HEAP_FACTOR x the live tensors) could
        outgrow the usable memory, so that the allocator should be pinned (pin_cpu_allocator) for
        the resident memory to stay at the estimate. Pinning costs speed on small tensors, so a run
        with room to spare keeps glibc's default."""
        return self.device == "cpu" and self.memory.peak * CPU_HEAP_FACTOR > self.usable

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"].pop("linears", None)
        for key in ("memory", "without_checkpointing", "with_checkpointing", "recommended_memory"):
            est = getattr(self, key)
            if est is not None:
                out[key].update(train_peak=est.train_peak, eval_peak=est.eval_peak, peak=est.peak)
        out["disk"]["fits"] = self.disk.fits
        out.update(usable=self.usable, fits=self.fits, pin_allocator=self.pin_allocator)
        return out

    def refusal(self) -> str:
        """The error text when the run does not fit: what, by how much, and settings that fit."""
        m = self.memory
        which = "evaluation" if m.eval_peak > m.train_peak else "training"
        text = (f"the run does not fit in the memory of one {self.device} process: estimated {which} peak "
                f"{_size(m.peak)} (weights {_size(m.weights)}, activations {_size(m.activations)}, logits {_size(m.logits)}, "
                f"evaluation batch {_size(m.eval)}) > {_size(self.usable)} usable ({_size(self.device_memory)} from "
                f"{self.memory_source}, less a {self.margin:.0%} margin).")
        if self.recommendation is not None:
            r = self.recommendation
            text += (f" Settings that fit the same effective batch of {self.target_batch} (peak "
                     f"{_size(self.recommended_memory.peak)}): {r.overrides()}.")
        else:
            text += " Nothing fits, even batch 1 with gradient checkpointing"
            if self.max_seq_length_that_fits:
                text += f" (max_seq_length {self.max_seq_length_that_fits} would)"
            text += ("; shard the model over several GPUs (accelerate launch --config_file "
                     "configs/accelerate/fsdp.yaml, or deepspeed_zero3_offload.yaml), or use a larger device.")
        return text + " `fullscale plan CONFIG.yaml` shows the table; plan_check: false starts anyway."


def _size(n: int | float) -> str:
    return f"{n / GB:.2f} GB" if abs(n) >= GB else f"{n / MB:.1f} MB"


def build_plan(config: Config, *, num_processes: int = 1, device: torch.device | str | None = None,
               target_batch: int | None = None, config_source: str = "", sharding: Sharding | None = None) -> Plan:
    """Estimate memory and disk for `config` on `device` (default: cuda when available, else cpu),
    and find settings that fit. `sharding` defaults to what `accelerate launch` set in the
    environment (DDP when nothing). Reads config.json only; loads no weights."""
    sharding = sharding or Sharding.from_env()
    device = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = _choices(config, device)
    shape = inspect_model(config, dtype=choices.dtype, attn_implementation=choices.attn_implementation)
    memory_bytes, source = device_memory(config, device, num_processes=num_processes)
    target = Target(shape=shape, device_type=device.type, attn=choices.attn_implementation,
                    seq=config.max_seq_length, dropout=config.lora_dropout, num_processes=num_processes,
                    packing=config.packing, sharding=sharding)
    current = Settings(config.per_device_train_batch_size, config.gradient_accumulation_steps,
                       config.gradient_checkpointing, config.per_device_eval_batch_size)
    effective = config.per_device_train_batch_size * num_processes * config.gradient_accumulation_steps
    target_batch = target_batch or effective
    usable = int(memory_bytes * (1 - config.memory_margin))
    memory = target.memory(current)
    recommendation = recommend(target, current, target_batch=target_batch, usable=usable)
    notes = []
    if target_batch % num_processes:
        notes.append(f"target batch {target_batch} is not a multiple of {num_processes} processes; "
                     f"the recommendation rounds it up")
    if not shape.llama_like:
        notes.append(f"the activation formula is exact for Llama-family layers; {shape.model_type} layers "
                     "differ, so the activation rows are an estimate (check with --probe)")
    if num_processes > 1 and sharding.kind == "ddp":
        notes.append(f"per process under DDP (each of the {num_processes} holds the whole model); FSDP or ZeRO-3 "
                     f"(plan with --accelerate-config configs/accelerate/fsdp.yaml) shard the weights "
                     f"({_size(memory.weights)})")
    if sharding.kind != "ddp":
        notes.append(f"{sharding.describe()}: the sharded rows are an estimate that this project has not "
                     "measured on GPUs; check with --probe under accelerate launch")
    if device.type == "cpu":
        notes.append(f"CPU rows are live tensor bytes; glibc's default heap can hold up to {CPU_HEAP_FACTOR:g}x "
                     "more (fragmentation), so when that could outgrow the RAM the run pins the allocator "
                     "(pin_cpu_allocator: resident memory = the tensors, slower on small tensors)")
    eval_batch = largest_eval_batch(target, current, usable=usable)
    if eval_batch is not None and eval_batch >= 2 * current.per_device_eval_batch_size:
        notes.append(f"evaluation keeps no gradients: per_device_eval_batch_size up to {eval_batch} fits (now "
                     f"{current.per_device_eval_batch_size}); a larger eval batch evaluates faster")
    disk = estimate_disk(shape, config)
    if not disk.fits:
        notes.append(f"not enough disk at {disk.path}: checkpoints need about {_size(disk.needed_bytes)}, "
                     f"{_size(disk.free_bytes)} free; lower save_total_limit or free space")
    return Plan(
        config_source=config_source, model=shape, device=device.type, device_memory=memory_bytes,
        memory_source=source, margin=config.memory_margin, num_processes=num_processes, sharding=sharding,
        dtype=str(choices.dtype).replace("torch.", ""), attn_implementation=choices.attn_implementation,
        max_seq_length=config.max_seq_length, target_batch=target_batch, settings=current, memory=memory,
        without_checkpointing=target.memory(replace(current, gradient_checkpointing=False)),
        with_checkpointing=target.memory(replace(current, gradient_checkpointing=True)),
        recommendation=recommendation,
        recommended_memory=target.memory(recommendation) if recommendation else None,
        max_seq_length_that_fits=None if recommendation else _longest_that_fits(target, usable),
        disk=disk, data=estimate_data(config), notes=notes)


def recommend(target: Target, current: Settings, *, target_batch: int, usable: int) -> Settings | None:
    """The fastest settings that fit `usable` bytes for the effective batch `target_batch`.

    Per process the batch is split into micro-batch x accumulation (the micro-batch a divisor of
    it). Checkpointing recomputes the forward (about a third more compute), so the largest
    micro-batch that fits without it wins, unless checkpointing fits a larger one and the one
    without holds fewer than SATURATING_TOKENS tokens (too small to keep a GPU busy).
    The eval batch is the largest (halving from the configured one) that fits beside the states."""
    per_process = -(-target_batch // target.num_processes)
    sizes = [b for b in range(per_process, 0, -1) if per_process % b == 0]

    def largest(gc: bool) -> int | None:
        for b in sizes:
            s = Settings(b, per_process // b, gc, 1)
            if target.memory(s).train_peak <= usable:
                return b
        return None

    plain, ckpt = largest(False), largest(True)
    if plain is not None and (plain == ckpt or plain * target.seq >= SATURATING_TOKENS):
        b, gc = plain, False
    elif ckpt is not None:
        b, gc = ckpt, True
    else:
        return None
    eval_b = current.per_device_eval_batch_size
    while eval_b > 1 and target.memory(Settings(b, per_process // b, gc, eval_b)).eval_peak > usable:
        eval_b //= 2
    choice = Settings(b, per_process // b, gc, eval_b)
    return choice if target.memory(choice).peak <= usable else None


EVAL_BATCH_LIMIT = 256   # beyond this a larger eval batch gains nothing measurable


def largest_eval_batch(target: Target, current: Settings, *, usable: int) -> int | None:
    """The largest per_device_eval_batch_size (doubling from the current one, up to
    EVAL_BATCH_LIMIT) whose evaluation peak fits beside the training state; None when the
    current settings do not fit at all."""
    if target.memory(current).peak > usable:
        return None
    best = current.per_device_eval_batch_size
    while best * 2 <= EVAL_BATCH_LIMIT and target.memory(replace(current, per_device_eval_batch_size=best * 2)).peak <= usable:
        best *= 2
    return best


def _longest_that_fits(target: Target, usable: int) -> int | None:
    """The longest max_seq_length (a multiple of 64) that fits at batch 1 with checkpointing, if any."""
    one = Settings(1, 1, True, 1)

    def fits(k: int) -> bool:
        return replace(target, seq=64 * k).memory(one).peak <= usable

    lo, hi = 0, target.seq // 64          # fits(lo) holds (0: nothing), fits(hi + 1) does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return 64 * lo or None


POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def check_model(config: Config) -> int | None:
    """Before anything is loaded: the model directory holds a base model, and max_seq_length fits
    its positions (a longer row fails only at the first batch that long, possibly hours in).
    Returns the model's position limit when the default max_seq_length is above it (the caller
    lowers it); an explicit max_seq_length above it is refused."""
    from fullscale.model import check_model_source

    check_model_source(config)
    path, model_cfg = _load_model_config(config)
    text = _text_config(model_cfg)
    limit = next((getattr(text, k) for k in POSITION_LIMIT_KEYS if isinstance(getattr(text, k, None), int)), None)
    if limit and config.max_seq_length > limit:
        key = next(k for k in POSITION_LIMIT_KEYS if getattr(text, k, None) == limit)
        if "max_seq_length" not in config.explicit:
            return limit
        raise ConfigError(f"max_seq_length: {config.max_seq_length} is more than the {limit} positions of the model "
                          f"{path} ({key} in its config.json); set max_seq_length to {limit} or less")
    return None


def check_plan(config: Config, *, num_processes: int, device: torch.device | str) -> Plan:
    """The plan of `config` on `device`; raises ConfigError with settings that fit when the
    estimated peak exceeds the device memory less the margin (unless plan_check is false).

    Reads config.json only, so call it before loading the model: an impossible run stops in a
    second instead of after loading the weights. FSDP / DeepSpeed sharding is read from the
    environment that `accelerate launch` sets."""
    plan = build_plan(config, num_processes=num_processes, device=device)
    if config.plan_check and not plan.fits:
        raise ConfigError(plan.refusal())
    return plan


# ----------------------------------------------------------------------------- the CPU allocator

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def pin_cpu_allocator(threshold: int = MB) -> bool:
    """Give freed CPU tensors back to the OS: fix glibc's mmap threshold, so that every allocation
    of `threshold` bytes or more is its own mapping, unmapped when it is freed.

    By default glibc raises that threshold as large blocks are freed (up to 32 MiB); activations
    then come from the heap, where a freed tensor leaves a hole that later tensors of other sizes
    cannot reuse. Measured on training steps of small models, the peak resident memory was then
    1.35-4.0x the live tensors, depending on shapes and checkpointing; with the threshold fixed it
    equals the live tensors that the plan estimates (within a few percent). The price is a page
    fault per 4 KiB of every fresh large tensor: the demo's micro-step took ~1.8x as long on one
    thread, which is why train pins only when memory is tight (`Plan.pin_allocator`). Call it once,
    before the model is loaded. Returns False (and changes nothing) where the C library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))


# ----------------------------------------------------------------------------- time: a probe of real steps

def probe(config: Config, plan: Plan, *, device: torch.device | str, num_steps: int = 3) -> Timing:
    """Load the real model + LoRA on `device` and time `num_steps` micro-steps (after one warm-up)
    on synthetic tokens of the longest batch (per_device batch x max_seq_length, padded rows
    so the attention mask path is taken), one optimizer update and one evaluation batch.
    A step is `gradient_accumulation_steps` micro-steps and an update; the run's time assumes
    every batch is the longest, so it is an upper bound."""
    from fullscale.loss import token_loss_sum
    from fullscale.model import build_model, choose

    device = torch.device(device)
    pinned = plan.pin_allocator and pin_cpu_allocator()   # as train does when memory is tight
    model = build_model(config, choose(config, device)).to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    vocab = plan.model.vocab_size

    def batch(rows: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (rows, config.max_seq_length), generator=g)
        mask = torch.ones_like(ids)
        mask[1:, -1] = 0   # rows after the first one token shorter: a padded batch, as real data gives
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    train_batch = batch(config.per_device_train_batch_size)

    def micro_step() -> None:
        logits = model(**train_batch, use_cache=False).logits
        loss_sum, count = token_loss_sum(logits, train_batch["input_ids"])
        (loss_sum / count).backward()
        del logits

    try:
        micro_step()                         # warm-up: kernels, allocator pools, lazy initialisation
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        _reset_peak(device)
        resident = (process_status_kb("VmRSS") or 0) * 1024 if device.type == "cpu" else 0
        start = time.perf_counter()
        for _ in range(num_steps):
            micro_step()
        sync()
        micro = (time.perf_counter() - start) / num_steps
        peak = _peak_bytes(device) - resident
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        update = time.perf_counter() - start
        eval_batch = batch(config.per_device_eval_batch_size)
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(**eval_batch, use_cache=False).logits
            token_loss_sum(logits, eval_batch["input_ids"])
            del logits
        sync()
        eval_seconds = time.perf_counter() - start
    except torch.OutOfMemoryError as exc:
        raise ConfigError(f"the probe ran out of device memory ({str(exc).splitlines()[0]}); "
                          f"{plan.refusal() if not plan.fits else 'the estimate was too low: lower the batch'}") from None
    steps, evals, eval_batches = count_steps(config, num_processes=plan.num_processes)
    step = config.gradient_accumulation_steps * micro + update
    m = plan.memory
    planned = (m.train_peak - m.runtime if device.type == "cuda"
               else m.activations + m.logits + m.gradients + m.runtime)
    return Timing(micro_step_seconds=micro, optimizer_seconds=update, step_seconds=step,
                  eval_batch_seconds=eval_seconds, measured_peak_bytes=peak, planned_peak_bytes=planned,
                  allocator_pinned=bool(pinned), num_steps=steps, num_evals=evals,
                  eval_batches=eval_batches, total_seconds=steps * step + evals * eval_batches * eval_seconds)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return (process_status_kb("VmHWM") or 0) * 1024


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the peak resident set size (VmHWM) of this process (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def count_steps(config: Config, *, num_processes: int) -> tuple[int, int, int]:
    """(optimizer steps, evaluations, batches per evaluation) of the run, from the row counts."""
    from fullscale import sampler
    from fullscale.config import train_sources
    from fullscale.data import count_rows, mixed_count
    from fullscale.demo import DEMO_TRAIN

    sources = train_sources(config) or [{"path": str(DEMO_TRAIN), "weight": 1.0, "dataset_config": None,
                                         "dataset_split": "train"}]
    num_train = num_eval = 0
    for source in sources:   # each source holds out its own eval_split (a mix), then counts at its weight
        rows = count_rows(source["path"], dataset_config=source["dataset_config"],
                          dataset_split=source["dataset_split"])
        held = 0
        if not config.eval_file and config.eval_split > 0 and rows > 1:
            held = min(rows - 1, max(1, math.ceil(rows * config.eval_split)))
        num_eval += held
        num_train += mixed_count(rows - held, source["weight"])
    if config.eval_file:
        num_eval = count_rows(config.eval_file)
    global_batch = config.per_device_train_batch_size * num_processes
    per_epoch = sampler.steps_per_epoch(num_train, global_batch_size=global_batch, num_processes=num_processes,
                                        accumulation=config.gradient_accumulation_steps)
    steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.num_train_epochs * per_epoch))
    evals = ((steps // config.eval_steps) if config.eval_steps else 0) + 2 if num_eval else 0
    batches = math.ceil(num_eval / (config.per_device_eval_batch_size * num_processes)) if num_eval else 0
    return steps, evals, batches


# ----------------------------------------------------------------------------- the table

def format_plan(plan: Plan) -> str:
    """The plan as a readable table."""
    m, shape = plan.memory, plan.model
    s = plan.settings
    off, on = plan.without_checkpointing, plan.with_checkpointing
    lines: list[str] = [
        f"fullscale plan{': ' + plan.config_source if plan.config_source else ''}",
        f"model    {shape.path} ({shape.model_type}, {shape.num_layers} layers, hidden {shape.hidden_size}, "
        f"{shape.num_parameters:,} parameters) in {plan.dtype}, attention {plan.attn_implementation}; "
        f"decoder layer {shape.decoder_layer}",
        f"LoRA     {shape.lora_parameters:,} trainable parameters in {shape.lora_tensors} tensors",
        f"device   {plan.device}: {_size(plan.device_memory)} ({plan.memory_source}); usable {_size(plan.usable)} "
        f"with a {plan.margin:.0%} margin",
        f"batch    {s.per_device_train_batch_size} per device x {plan.num_processes} process"
        f"{'es' if plan.num_processes > 1 else ''} x {s.gradient_accumulation_steps} accumulation = "
        f"{s.per_device_train_batch_size * plan.num_processes * s.gradient_accumulation_steps} effective; "
        f"max_seq_length {plan.max_seq_length}; eval batch {s.per_device_eval_batch_size}",
        f"parallel {plan.sharding.describe()}",
        "",
        "memory per process",
    ]
    gc_now = s.gradient_checkpointing
    other = on if not gc_now else off

    def row(name: str, value: int, alternative: int | None = None) -> None:
        alt = f"   (checkpointing {'on' if not gc_now else 'off'}: {_size(alternative)})" if alternative is not None else ""
        lines.append(f"  {name:<52}{_size(value):>10}{alt}")

    row(f"weights ({plan.dtype}, buffers included)", m.weights)
    row("LoRA adapter (fp32)", m.lora)
    row("gradients" + (" (+ DDP buckets)" if plan.num_processes > 1 and plan.sharding.kind == "ddp" else ""),
        m.gradients)
    row("AdamW states (2 per parameter)", m.optimizer)
    row(f"activations ({s.per_device_train_batch_size} x {plan.max_seq_length} tokens, "
        f"checkpointing {'on' if gc_now else 'off'})", m.activations, other.activations)
    row(f"logits + loss (vocabulary {shape.vocab_size:,})", m.logits)
    row("runtime (CUDA context)" if plan.device == "cuda" else "runtime (CPU scratch)", m.runtime)
    row("training peak", m.train_peak, other.train_peak)
    row(f"evaluation peak (batch {s.per_device_eval_batch_size}, no grads)", m.eval_peak)
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'peak':<52}{_size(m.peak):>10}   {verdict} in {_size(plan.usable)}")
    lines.append("")
    if plan.recommendation is not None:
        r, rm = plan.recommendation, plan.recommended_memory
        if r == s:
            lead = "recommended (the current settings)"
        elif plan.fits:
            lead = "the current settings fit; faster ones that also fit"
        else:
            lead = "recommended"
        lines.append(f"{lead} for an effective batch of {plan.target_batch}: {r.overrides()}  (peak {_size(rm.peak)})")
    else:
        hint = (f"; max_seq_length {plan.max_seq_length_that_fits} would fit at batch 1"
                if plan.max_seq_length_that_fits else "")
        lines.append(f"recommended: nothing fits this device, even batch 1 with gradient checkpointing{hint}; "
                     "shard over GPUs with configs/accelerate/fsdp.yaml or deepspeed_zero3_offload.yaml")
    d = plan.disk
    free = _size(d.free_bytes) if d.free_bytes is not None else "unknown"
    lines.append(f"disk     checkpoint ~{d.checkpoint_bytes / MB:.1f} MB (adapter + optimizer) x {d.num_checkpoints} "
                 f"(save_total_limit + best + one being written) + best_model/ = ~{_size(d.needed_bytes)}; "
                 f"free at {d.path}: {free}{'' if d.fits else '  NOT ENOUGH'}")
    if plan.data is not None:
        dd = plan.data
        lines.append(f"data     host RAM: {_size(dd.file_bytes)} of data files, ~{dd.tokens:,} tokens ({dd.source}): token "
                     f"store ~{_size(dd.store_bytes)} on disk, memory-mapped and shared by the node's processes (each "
                     f"keeps only the pages it reads); preparing it once per node (or ahead with `fullscale prepare`) "
                     f"peaks at ~{_size(dd.prepare_peak_bytes)} more in the local main process")
    t = plan.timing
    if t is not None:
        from fullscale.units import format_duration

        lines.append(f"time     micro-step {t.micro_step_seconds:.3f} s, update {t.optimizer_seconds:.3f} s -> step "
                     f"{t.step_seconds:.3f} s; {t.num_steps:,} steps + {t.num_evals} evaluations x {t.eval_batches} "
                     f"batches ({t.eval_batch_seconds:.3f} s each) = at most {format_duration(t.total_seconds)} "
                     "(every batch the longest)")
        if t.measured_peak_bytes and t.measured_peak_bytes > 0:
            what = ("peak allocated (CUDA)" if plan.device == "cuda"
                    else "peak resident memory of a micro-step above the loaded model")
            heap = "" if plan.device == "cuda" or t.allocator_pinned else \
                " (glibc's default heap, fragmentation included: room to spare, allocator not pinned)"
            lines.append(f"probe    {what}: measured {_size(t.measured_peak_bytes)}, planned "
                         f"{_size(t.planned_peak_bytes)} ({t.planned_peak_bytes / t.measured_peak_bytes - 1:+.0%})"
                         f"{heap}")
    else:
        lines.append("time     run with --probe to time real steps on this device")
    for note in plan.notes:
        lines.append(f"note     {note}")
    return "\n".join(lines)
