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

The modules, by stage: shape (the model from config.json), memory (activations and every row of
one process), resources (device, disk, data), build (the plan, the recommendation, the checks
train() runs), probe (time from real steps, step counts, the CPU allocator), table (the text).
"""

from fullscale.plan.shape import (  # noqa: F401
    GB,
    MB,
    FP32,
    LinearInfo,
    ModelShape,
    inspect_model,
)
from fullscale.plan.memory import (  # noqa: F401
    CUDA_RUNTIME_BYTES,
    CPU_RUNTIME_BYTES,
    CPU_HEAP_FACTOR,
    CHECKPOINT_STAGING,
    SATURATING_TOKENS,
    Workload,
    _layer_saved,
    ActivationEstimate,
    estimate_activations,
    estimate_eval_activations,
    MemoryEstimate,
    Settings,
    Sharding,
    Target,
)
from fullscale.plan.resources import (  # noqa: F401
    device_memory,
    DiskEstimate,
    estimate_disk,
    PREPARE_BYTES_PER_TOKEN,
    STORE_BYTES_PER_TOKEN,
    STORE_BYTES_PER_EXAMPLE,
    BYTES_PER_TOKEN_OF_FILE,
    DataEstimate,
    estimate_data,
)
from fullscale.plan.build import (  # noqa: F401
    Timing,
    Plan,
    _size,
    build_plan,
    recommend,
    EVAL_BATCH_LIMIT,
    largest_eval_batch,
    POSITION_LIMIT_KEYS,
    check_model,
    check_plan,
)
from fullscale.plan.probe import (  # noqa: F401
    M_MMAP_THRESHOLD,
    pin_cpu_allocator,
    probe,
    count_steps,
)
from fullscale.plan.table import (  # noqa: F401
    format_plan,
)
