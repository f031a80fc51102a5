"""The plan as a readable table (`fullscale plan`)."""

from __future__ import annotations

from fullscale.plan.build import Plan, _size
from fullscale.plan.shape import MB

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
    lines += _after_memory(plan)
    for note in plan.notes:
        lines.append(f"note     {note}")
    return "\n".join(lines)


def _after_memory(plan: Plan) -> list[str]:
    """The recommendation, disk, data and time lines."""
    s = plan.settings
    lines: list[str] = []
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
    return lines
