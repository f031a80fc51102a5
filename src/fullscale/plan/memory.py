"""Memory of one process: what autograd keeps for the backward (per layer), and every row of
the training and evaluation peaks, for a setting and a sharding."""

from __future__ import annotations

import os
from dataclasses import dataclass

from fullscale.errors import ConfigError
from fullscale.plan.shape import FP32, GB, MB, LinearInfo, ModelShape

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
