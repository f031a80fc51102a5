"""train(config): build the components in dependency order, then one readable fit() loop.

Vocabulary: a *micro-step* is one forward/backward on one micro-batch; a *step* is one
optimizer update over `gradient_accumulation_steps` micro-steps (an accumulation window).

Exactness: everything that decides what the next step computes (adapter, optimizer, scheduler,
every RNG per rank, the data position at a window boundary, early stopping, pending log values)
is saved in each checkpoint and restored on resume, so a run killed any number of times ends
bitwise equal to an uninterrupted one on the CPU in fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fullscale import checkpoint as ckpt
from fullscale import faults, sampler
from fullscale import resumption as resuming
from fullscale import sharding, zero
from fullscale.config import Config, effective_early_stopping, train_data
from fullscale.data.prepare import check_invalid_share, run_alpaca_templates
from fullscale.early_stop import EarlyStopping
from fullscale.engine import build_engine
from fullscale.errors import ConfigError
from fullscale.health import HealthMonitor
from fullscale.loop import fit
from fullscale.loss import LabelledHead
from fullscale.model import build_model, choose, count_parameters, describe_wrapped, load_tokenizer, resolve_model_path
from fullscale.targets import describe_parameters
from fullscale.monitor import Monitor, format_memory, memory_stats, write_json
from fullscale.preemption import PreemptionFlag
from fullscale.prompts import prompt_format, write_prompt_format
from fullscale.run import Run, TrainState, on_main, set_seed
from fullscale.trackers import TRACKERS, Trackers
from fullscale.units import format_duration, format_number


# ----------------------------------------------------------------------------- setup helpers

def build_accelerator():
    """The Accelerator, and the FSDP or DeepSpeed settings of the launch (fullscale shards the model
    itself, see fullscale.sharding and fullscale.zero; accelerate then sets up plain multi-process)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")   # an installed DeepSpeed, imported by accelerate, says so quietly
    from accelerate import Accelerator

    fsdp = sharding.take_over_from_accelerate()
    deepspeed = zero.take_over_from_accelerate()
    # Without a GPU, accelerate only sets up several processes (gloo) when told the run is on the CPU.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=multi_process and not torch.cuda.is_available()), fsdp, deepspeed


def resolve_num_workers(config: Config, device: torch.device, num_processes: int) -> int:
    """Data loader workers: never more than this process's share of the cores. On CPU the cores
    run the model and collating token lists is cheap, so auto is 0 there."""
    cores = max(1, (os.cpu_count() or 1) // max(1, num_processes))
    if config.dataloader_num_workers == "auto":
        return 0 if device.type == "cpu" else min(4, cores - 1)
    return min(int(config.dataloader_num_workers), cores)


def build_optimizer(model, config: Config):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def warmup_steps(config: Config, total_steps: int) -> int:
    """The schedule's warmup steps (the health checks hold their lr rule until they are done)."""
    return math.ceil(config.warmup_ratio * total_steps)


def build_scheduler(optimizer, config: Config, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(config, total_steps),
                         num_training_steps=total_steps)


def check_packing(model, config: Config, tokenizer, choices) -> None:
    """packing: true trains only on a model proven to keep packed examples apart (fullscale.packing)."""
    from fullscale.packing import ISOLATION_TOLERANCE, isolation_error

    diff, cannot = isolation_error(model, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    if cannot or diff > ISOLATION_TOLERANCE:
        why = cannot or (f"an example packed after another gets logits up to {diff:.3g} away from the same example "
                         f"alone (in fp32, tolerance {ISOLATION_TOLERANCE:g}), so it attends across the boundary")
        raise ConfigError(
            f"packing: true is refused for this model ({type(model.get_base_model()).__name__}, attention "
            f"{choices.attn_implementation}): {why}. Packed examples would see each other. Set packing: false "
            "(group_by_length: true cuts most of the padding without packing)")


# ----------------------------------------------------------------------------- the run

def train(config: Config, *, stream=None) -> dict[str, Any]:
    """Run (or resume) the training described by `config`; returns the training result.

    From its first line a SIGTERM/SIGINT stops cleanly: during start-up with StartupInterrupted
    (nothing to save yet), in the loop after the step with a checkpoint. The main process holds the
    run directory's lock (fullscale.rundir) until it returns."""
    preemption = PreemptionFlag()
    preemption.install()
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        # Past `ulimit -f` a write then fails with EFBIG (reported, the save cleaned up) instead of
        # the default action: killing the process mid-save.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    lock: list[Any] = []
    try:
        return _train(config, stream=stream, preemption=preemption, lock=lock)
    finally:
        preemption.restore()
        for held in lock:
            held.release()


@dataclass
class Launch:
    """What every build step of a run needs: the processes, the device, the run directory."""

    config: Config
    accelerator: Any
    fsdp: Any                          # the FSDP plugin taken over from accelerate, or None
    deepspeed: Any                     # the DeepSpeed plugin, or None
    run_dir: Path
    manager: ckpt.CheckpointManager
    console: Monitor                   # console lines before the run's monitor exists
    lock: list                         # the run directory's lock, once taken (main process)
    forced: list = field(default_factory=list)   # what force_resume continued despite (the trackers start anew)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self):
        return self.accelerator.device


def _train(config: Config, *, stream, preemption: PreemptionFlag, lock: list) -> dict[str, Any]:
    """The run, built in dependency order, then trained and closed."""
    launch = build_launch(config, stream=stream, lock=lock)
    resume_path, saved = build_run_dir(launch)
    build_memory_plan(launch)
    choices, fps, changes = build_fingerprints(launch, saved)
    tokenizer, data = build_data(launch)
    model, optimizer, scheduler, counts = build_model_and_optimizer(launch, data, choices, fps, saved, tokenizer)
    monitor, reached = build_records(launch, data, resume_path, saved, total_steps=counts["total_steps"],
                                     stream=stream)
    run = build_run(launch, model=model, optimizer=optimizer, scheduler=scheduler, tokenizer=tokenizer, data=data,
                    monitor=monitor, preemption=preemption, fingerprints=fps, total_steps=counts["total_steps"])
    start_or_resume(run, resume_path, saved, reached=reached, changes=changes, choices=choices, counts=counts)
    stop_reason = run_to_the_end(run, saved)
    result = finish(run, stop_reason)
    result["_model"], result["_tokenizer"], result["_data"] = model, tokenizer, data
    return result


def build_launch(config: Config, *, stream, lock: list) -> Launch:
    """1. Processes and device (the launch environment read once), the console."""
    accelerator, fsdp, deepspeed = build_accelerator()
    if fsdp is not None:
        sharding.check(fsdp, device=accelerator.device)
    if deepspeed is not None:
        zero.check(deepspeed, config)
    run_dir = Path(config.output_dir)
    return Launch(config=config, accelerator=accelerator, fsdp=fsdp, deepspeed=deepspeed, run_dir=run_dir,
                  manager=ckpt.CheckpointManager(run_dir, save_total_limit=config.save_total_limit),
                  console=Monitor(run_dir, enabled=accelerator.is_main_process, tensorboard=False, total_steps=0,
                                  stream=stream, files=False), lock=lock)


def build_run_dir(launch: Launch) -> tuple[Path | None, dict[str, Any] | None]:
    """2. The run directory, decided once on the main process: ours (or refused), locked for this
    run, leftovers cleaned; the checkpoint to resume from and its state (or none)."""
    from fullscale import rundir
    from fullscale.plan import check_model

    config, console = launch.config, launch.console

    def decide_run_dir() -> tuple[str | None, int | None]:
        faults.hit("main_error", 0)
        limit = check_model(config)   # reads config.json only: a wrong model directory stops here
        if limit is not None:
            console.print(f"max_seq_length: the default {config.max_seq_length} is more than the model's {limit} "
                          f"positions; using {limit}")
            config.max_seq_length = limit
        rundir.claim(launch.run_dir)
        launch.lock.append(rundir.RunLock(launch.run_dir).acquire())
        info = resuming.prepare_run_dir(config, launch.manager, console.print)
        return (str(info.path) if info else None), limit

    resume_path, limit = on_main(launch.accelerator, decide_run_dir)
    if limit is not None:
        config.max_seq_length = limit   # on every rank
    resume_path = Path(resume_path) if resume_path else None
    return resume_path, (ckpt.load_state(resume_path) if resume_path else None)


def build_memory_plan(launch: Launch) -> None:
    """2b. The memory plan from config.json (no weights): a run that cannot fit stops before
    anything loads."""
    from fullscale.plan import check_plan, pin_cpu_allocator

    def decide_plan() -> bool:
        plan = check_plan(launch.config, num_processes=launch.world, device=launch.device)
        launch.console.print(f"memory plan: peak {plan.memory.peak / 2**30:.2f} GB of {plan.usable / 2**30:.2f} GB "
                             f"usable per process ({plan.memory_source}); `fullscale plan` shows every row")
        return plan.pin_allocator

    if on_main(launch.accelerator, decide_plan):
        pin_cpu_allocator()  # glibc's heap could outgrow the RAM: freed tensors go back to the OS


def build_fingerprints(launch: Launch, saved: dict[str, Any] | None):
    """3. The seed, the dtype/attention choices, and the fingerprints of the model, tokenizer and
    data, compared with the run being resumed: (choices, fingerprints, accepted changes)."""
    config, console = launch.config, launch.console
    set_seed(config.seed)
    choices = choose(config, launch.device)
    if choices.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model_path = resolve_model_path(config)
    train_file = train_data(config)
    fps = resuming.fingerprints(config, model_path=model_path, train_file=train_file, num_processes=launch.world)
    changes: list[str] = []
    if saved:
        saved_fp = saved.get("fingerprints", {})
        current = fps
        if saved_fp.get("version") != resuming.FINGERPRINT_VERSION:   # a run made by an earlier fullscale
            current = {**fps, **resuming.legacy_fingerprints(config, model_path=model_path, train_file=train_file)}
        breaking, changes = resuming.compare(config, saved["config"], saved_fp, current)
        if breaking and not config.force_resume:
            raise resuming.refuse(launch.run_dir, breaking)
        if breaking:
            console.print(f"force_resume: continuing despite {'; '.join(breaking)}")
            changes += breaking
            launch.forced += breaking
        if changes:
            console.print(f"resume: accepted changed settings: {'; '.join(changes)}")
    return choices, fps, changes


def build_data(launch: Launch):
    """4. The tokenizer and the data, tokenized once per node: the local main process prepares (or
    finds) the token store, the other ranks of the node wait, then open the same store (memory-mapped)."""
    from fullscale.data import prepare_for

    config, console, world = launch.config, launch.console, launch.world
    tokenizer = load_tokenizer(config)
    with launch.accelerator.local_main_process_first():
        data = prepare_for(config, tokenizer)
    for line in data.messages:
        console.print(line)
    if world > 1:
        from accelerate.utils import gather_object

        tokenized = sum(not opened for opened in gather_object([data.from_store]))
        console.print(f"data: tokenized by {tokenized} of {world} processes; the others opened its token store "
                      "(memory-mapped, shared through the page cache)")
    check_invalid_share(data, config)
    faults.hit("sigterm_startup", 0)
    return tokenizer, data


def build_model_and_optimizer(launch: Launch, data, choices, fps: dict[str, Any], saved, tokenizer):
    """5. Packing, the model with LoRA (what it wraps fingerprinted), sharding, the optimizer, the
    step counts and the schedule, and the engine's wrapping (DeepSpeed or accelerate)."""
    config, console, world, device = launch.config, launch.console, launch.world, launch.device
    packing = None
    if config.packing:
        from fullscale.data import pack_examples

        if getattr(data.train, "resamples", False):
            launch.console.print(
                "warning: packing fixes the rows at the start, so a source of fractional weight gives the same "
                "sample of its examples every epoch (the rest of that source is never seen); without packing "
                "each epoch draws a new sample. Use whole weights, or packing: false, to see them all")
        data.train, packing = pack_examples(data.train, max_seq_length=config.max_seq_length, seed=config.seed,
                                            lazy=True)   # bins of indices into the token store
    model = build_model(config, choices, tokenizer)
    trainable, total = count_parameters(model)
    targets = model.fullscale_targets
    # What LoRA wraps is part of what a resume must continue: the names of the adapter's tensors.
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    fps["lora_modules"] = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    recorded = (saved or {}).get("fingerprints", {}).get("lora_modules")
    if recorded not in (None, fps["lora_modules"]):
        if not config.force_resume:
            raise resuming.refuse(launch.run_dir, ["the layers LoRA wraps (lora_target_modules resolved on this "
                                                   "model) changed"])
        launch.forced.append("the layers LoRA wraps changed")
    console.print(f"model {resolve_model_path(config)}: {choices.describe()}; LoRA r={config.lora_rank} "
                  f"alpha={config.lora_alpha} on {targets.meaning}: {describe_wrapped(model)}; {trainable:,} "
                  f"trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    if targets.left_out:
        console.print(f"no LoRA on: {targets.describe_left_out()}")
    if targets.parameters and config.lora_dropout:
        console.print(f"LoRA through peft's ParamWrapper ({describe_parameters(targets)}) runs without dropout "
                      f"(it takes none); lora_dropout={config.lora_dropout:g} applies to every other layer")
    model.to(device)
    if packing is not None:
        check_packing(model, config, tokenizer, choices)   # before any efficiency is reported
        console.print(packing.describe())
    if launch.fsdp is not None:
        sharding.shard(model, launch.fsdp, device=device, num_processes=world)   # before the optimizer sees them
        console.print(launch.fsdp.describe())
    optimizer = build_optimizer(model, config)
    global_batch = config.per_device_train_batch_size * world
    steps_in_epoch, total_steps = sampler.run_length(
        len(data.train), global_batch_size=global_batch, num_processes=world,
        accumulation=config.gradient_accumulation_steps, max_steps=config.max_steps,
        num_epochs=config.num_train_epochs)
    if steps_in_epoch == 0:
        raise ConfigError(f"the train data has {len(data.train)} examples, fewer than one batch across {world} "
                          "processes; add data or lower per_device_train_batch_size")
    total_steps = steps_after_a_batch_change(saved, config, total_steps, num_examples=len(data.train),
                                             global_batch=global_batch, world=world)
    scheduler = build_scheduler(optimizer, config, total_steps)
    if launch.deepspeed is not None:
        model, optimizer = zero.initialize(model, optimizer, launch.deepspeed, config)
        console.print(launch.deepspeed.describe())
    elif launch.fsdp is None:
        model, optimizer = launch.accelerator.prepare(model, optimizer)
    counts = {"total_steps": total_steps, "steps_in_epoch": steps_in_epoch, "trainable": trainable, "total": total,
              "global_batch": global_batch}
    return model, optimizer, scheduler, counts


def build_records(launch: Launch, data, resume_path: Path | None, saved, *, total_steps: int, stream):
    """6. The records: config.yaml and prompt_format.json, metrics.jsonl continued after the resume
    step (the steps it redoes dropped), the trackers, TensorBoard. Returns (monitor, the last step
    the records had reached)."""
    config, run_dir, is_main = launch.config, launch.run_dir, launch.accelerator.is_main_process
    resume_step = saved["train_state"]["step"] if saved else 0
    reached = resume_step
    redone: set[tuple[str, int]] = set()   # (event, step) records the resume redoes (the trackers have them)
    if is_main:
        if resume_path is not None:
            # A lowered save_total_limit (say after a full disk) applies first, before anything is
            # written: the records below and the next save need the space the extra checkpoints
            # hold. The newest and the best stay. Every refusal of the resume came before this.
            removed = launch.manager.rotate(best_step=(saved.get("early_stopping") or {}).get("best_step"))
            if removed:
                launch.console.print(f"save_total_limit={config.save_total_limit}: removed "
                                     f"{', '.join(f'checkpoint-{s}' for s in removed)} (older than the newest, "
                                     "not the best)")
        ckpt.write_text(run_dir / "config.yaml", config.to_yaml())   # write-and-rename: never half a file
        write_prompt_format(run_dir, prompt_format(data.format, alpaca=run_alpaca_templates(config)))
        if resume_path is None:
            for stale in ("metrics.jsonl", "training_result.json"):
                (run_dir / stale).unlink(missing_ok=True)
        else:
            redone = resuming.logged_after(run_dir, resume_step)
            reached = resuming.truncate_metrics(run_dir, resume_step,
                                                eval_redone=bool(saved["train_state"].get("eval_pending")))
    trackers: list[Trackers] = []   # on the main process; its failure to start stops every rank

    def start_trackers() -> None:
        if any(name in TRACKERS for name in config.report_to):
            # After a force_resume the redone steps are not the ones logged: a new tracker run from here.
            forced = f"force_resume at step {resume_step}" if launch.forced and resume_path is not None else None
            trackers.append(Trackers(run_dir, config.report_to, config=config.to_dict(),
                                     resuming=resume_path is not None, skip=redone, new_segment=forced))

    on_main(launch.accelerator, start_trackers)
    monitor = Monitor(run_dir, enabled=is_main, tensorboard=config.uses_tensorboard and is_main,
                      total_steps=total_steps, stream=stream, purge_step=resume_step + 1 if resume_path else None,
                      trackers=trackers[0] if trackers else None)
    return monitor, reached


def build_run(launch: Launch, *, model, optimizer, scheduler, tokenizer, data, monitor, preemption, fingerprints,
              total_steps: int) -> Run:
    """7. The Run: the components, the health monitor, the engine."""
    config, accelerator = launch.config, launch.accelerator
    return Run(config=config, accelerator=accelerator, model=model, tokenizer=tokenizer, optimizer=optimizer,
               scheduler=scheduler, data=data, monitor=monitor, manager=launch.manager, preemption=preemption,
               stopper=EarlyStopping(patience=effective_early_stopping(config),
                                     min_delta=config.early_stopping_min_delta),
               state=TrainState(), fingerprints=fingerprints, total_steps=total_steps,
               health=HealthMonitor(config, total_steps=total_steps,
                                    warmup_steps=warmup_steps(config, total_steps)),
               run_dir=launch.run_dir, num_workers=resolve_num_workers(config, launch.device, launch.world),
               head=LabelledHead(accelerator.unwrap_model(model)), run_lock=launch.lock[0] if launch.lock else None,
               engine=build_engine(accelerator, model, optimizer, fsdp=launch.fsdp, deepspeed=launch.deepspeed,
                                   max_grad_norm=config.max_grad_norm))


def _position_in_new_batches(saved, global_batch: int) -> tuple[int, int] | None:
    """(examples of the epoch done, micro-batches of `global_batch` that covers) when a checkpoint
    was saved with another global micro-batch; None when it was not."""
    old = (saved or {}).get("fingerprints", {}).get("global_micro_batch")
    micro = (saved or {}).get("train_state", {}).get("micro_in_epoch", 0)
    if not old or old == global_batch:
        return None
    done = micro * old
    return done, done // global_batch


def steps_after_a_batch_change(saved, config: Config, total_steps: int, *, num_examples: int, global_batch: int,
                               world: int) -> int:
    """The run's steps after a force_resume onto another global micro-batch (epochs, not max_steps):
    the steps done, the rest of this epoch in the new micro-batches, then the epochs left."""
    moved = _position_in_new_batches(saved, global_batch)
    if moved is None or config.max_steps > 0:
        return total_steps
    state = saved["train_state"]
    accumulation = config.gradient_accumulation_steps
    batches = sampler.micro_batches_per_epoch(num_examples, global_batch_size=global_batch, num_processes=world)
    per_epoch = math.ceil(batches / accumulation)
    rest = math.ceil(max(0, batches - moved[1]) / accumulation)
    later = max(0, math.ceil(config.num_train_epochs * per_epoch) - (state["epoch"] + 1) * per_epoch)
    return state["step"] + rest + later


def carry_data_position(run: Run, saved) -> None:
    """A force_resume onto another global micro-batch: the position inside the epoch is kept in
    examples (the epoch's order of examples does not depend on the batch), not in micro-batches of
    the new size, which would train the examples between the two positions twice or never. Where
    the examples done are not a whole number of new micro-batches, the partial one is redone."""
    old = (saved.get("fingerprints") or {}).get("global_micro_batch")
    new = run.config.per_device_train_batch_size * run.accelerator.num_processes
    state = run.state
    moved = _position_in_new_batches(saved, new)
    if moved is None or not state.micro_in_epoch:
        return
    done, state.micro_in_epoch = moved
    again = done - state.micro_in_epoch * new
    run.say(f"force_resume: {done:,} examples of epoch {state.epoch} were done in micro-batches of {old}; the run "
            f"goes on from micro-batch {state.micro_in_epoch} of {new} examples"
            f"{f' ({again} examples of the last one are trained again)' if again else ''}"
            f"{'; group_by_length groups by the batch size, so the rest of this epoch is grouped anew' if run.config.group_by_length else ''}")


def start_or_resume(run: Run, resume_path: Path | None, saved, *, reached: int, changes: list[str], choices,
                    counts: dict[str, int]) -> None:
    """8. Resume (adapter, optimizer, scheduler, RNG, data position, early stopping) or start; the
    opening lines."""
    config, data, total_steps = run.config, run.data, run.total_steps
    world = run.accelerator.num_processes
    resume_step = saved["train_state"]["step"] if saved else 0
    if resume_path is not None:
        run.restore(resume_path, saved)
        run.state.num_resumes += 1
        carry_data_position(run, saved)
        run.say(f"resuming from {resume_path.name}: step {resume_step}/{total_steps}, epoch {run.state.epoch}"
                f"{f'; redoing steps {resume_step + 1}-{reached}' if reached > resume_step else ''}")
        run.monitor.event("resume", resume_step, from_step=resume_step, steps_redone=reached - resume_step,
                          checkpoint=resume_path.name, num_resumes=run.state.num_resumes,
                          reason=saved.get("stop_reason") or "interrupted", changed_settings=changes)
    else:
        run.monitor.event("train_start", 0, total_steps=total_steps, num_train_examples=len(data.train),
                          num_eval_examples=len(data.eval or []), trainable_parameters=counts["trainable"],
                          total_parameters=counts["total"], processes=world, dtype=str(choices.dtype),
                          attn_implementation=choices.attn_implementation)
    mem = memory_stats(run.device)
    run.monitor.event("memory", resume_step, phase="after_lora", **mem)
    run.say(f"memory after loading + LoRA: {format_memory(mem)}")
    run.say(f"{len(data.train):,} train / {len(data.eval or []):,} eval examples; effective batch "
            f"{config.per_device_train_batch_size} x {world} processes x {config.gradient_accumulation_steps} "
            f"accumulation = {counts['global_batch'] * config.gradient_accumulation_steps}; "
            f"{counts['steps_in_epoch']} steps per epoch, {total_steps} steps")
    if not data.eval:
        run.say("no eval data: evaluation, best_model/ and early stopping are off")


def run_to_the_end(run: Run, saved) -> str:
    """9. fit(), unless the run being resumed already finished; returns the stop reason."""
    finished = saved.get("stop_reason") if saved else None
    if finished == "health_abort" and run.config.force_resume:
        run.say(f"continuing the run a health check stopped at step {run.state.step} (force_resume), from the state "
                "before the bad update")
        finished = None
    if finished and finished != "preempted":
        how = (" To continue it from the state before the bad update, change what caused it (e.g. a lower "
               "learning_rate) and add force_resume=true" if finished == "health_abort" else "")
        run.say(f"this run already finished ({finished} at step {run.state.step}); nothing to do.{how}")
        return finished
    run.write_status("starting")
    run.preemption.starting = False   # from here a signal finishes the step and saves
    try:
        return fit(run)
    except BaseException as exc:
        with contextlib.suppress(Exception):   # best effort: the disk may be what failed
            run.write_status("failed", error=f"{type(exc).__name__}: {exc}"[:500])
        raise


def finish(run: Run, stop_reason: str) -> dict[str, Any]:
    """training_result.json and the closing lines."""
    state, stopper = run.state, run.stopper
    elapsed = run.elapsed()
    mem = memory_stats(run.device)
    result = {
        "train_loss": state.train_loss_sum / state.train_loss_count if state.train_loss_count else None,
        "final_train_loss": state.last_train_loss,
        "eval_loss": state.last_eval_loss,
        "best_eval_loss": stopper.best,
        "best_step": stopper.best_step,
        "total_steps": state.step,
        "planned_steps": run.total_steps,
        "stop_reason": stop_reason,
        "elapsed_hours": elapsed / 3600,
        "eval_share": run.eval_seconds / run.fit_seconds if run.fit_seconds else None,
        "peak_memory_gb": mem["peak_gb"],
        "tokens_per_second": state.tokens_seen / max(elapsed, 1e-9),
        "num_resumes": state.num_resumes,
        "health_events": run.health.num_events,
        "num_rollbacks": run.health.num_rollbacks,
        "config": run.config.to_dict(),
    }
    run.write_status("stopped" if stop_reason == "preempted" else "finished", stop_reason=stop_reason,
                     peak_memory_gb=mem["peak_gb"], tokens_per_second=result["tokens_per_second"])
    if run.is_main:
        write_json(run.run_dir / "training_result.json", result)
        run.monitor.event("train_end", state.step, stop_reason=stop_reason, best_eval_loss=stopper.best,
                          best_step=stopper.best_step)
        if stop_reason == "preempted":
            run.say(f"stopped by a signal at step {state.step}/{run.total_steps}; a resumable checkpoint is saved. "
                    f"Run the same command (or fullscale resume {run.run_dir}) to continue")
        else:
            run.say(f"done: {stop_reason} at step {state.step}/{run.total_steps} in {format_duration(elapsed)}; "
                    f"best eval loss {format_number(stopper.best, '.4f')} at step {stopper.best_step}; peak memory "
                    f"{mem['peak_gb']:.2f} GB")
        share = result["eval_share"]
        if share is not None and run.data.eval:
            run.say(f"evaluation took {100 * share:.0f}% of the training wall time ({run.eval_seconds:.1f}s)")
            if share > run.config.eval_time_budget:
                run.say(f"warning: evaluation used more than eval_time_budget={run.config.eval_time_budget:g} of the "
                        "time; evaluate less often (raise eval_steps), use a smaller eval set (eval_split, or a "
                        "smaller eval_file), or raise per_device_eval_batch_size if memory allows")
                run.monitor.event("eval_budget", state.step, eval_share=share, budget=run.config.eval_time_budget)
        names = ", ".join(p.name for _, p in run.manager.checkpoint_dirs())
        run.say(f"run directory {run.run_dir}: config.yaml, metrics.jsonl, runs/ (TensorBoard), {names}, "
                f"{'best_model/, ' if (run.run_dir / 'best_model').exists() else ''}training_result.json")
    run.monitor.close()
    run.accelerator.wait_for_everyone()
    return result
