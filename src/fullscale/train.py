"""train(config): build the components in dependency order, then one readable fit() loop.

Vocabulary: a *micro-step* is one forward/backward on one micro-batch; a *step* is one
optimizer update over `gradient_accumulation_steps` micro-steps (an accumulation window).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fullscale import checkpoint as ckpt
from fullscale import sampler
from fullscale.config import Config, effective_early_stopping
from fullscale.early_stop import EarlyStopping
from fullscale.errors import CheckpointError, ConfigError
from fullscale.evaluate import EvalResult, evaluate
from fullscale.loss import token_loss_sum
from fullscale.model import ModelChoices, build_model, choose, count_parameters, load_tokenizer, resolve_model_path
from fullscale.monitor import Monitor, format_duration, format_memory, memory_stats, write_json

STOP_REASONS = ("max_steps", "epochs", "early_stopping", "preempted", "health_abort")

# Settings whose change makes a resumed run a different run (refused on resume).
EXACTNESS_KEYS = (
    "model_name_or_path", "train_file", "eval_file", "eval_split", "dataset_format", "max_seq_length",
    "invalid_rows", "packing", "seed", "learning_rate", "per_device_train_batch_size",
    "gradient_accumulation_steps", "warmup_ratio", "weight_decay", "lr_scheduler_type", "max_grad_norm",
    "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "num_train_epochs", "max_steps",
    "bf16",
)


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint (trainer_state.json)."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0          # micro-batches of this epoch already consumed (a window boundary)
    tokens_seen: int = 0             # real (non-padding) tokens trained on, all ranks
    train_seconds: float = 0.0       # wall time spent training before this process started
    train_loss_sum: float = 0.0      # sum of per-step losses (for the run's mean train loss)
    last_train_loss: float | None = None
    last_eval_loss: float | None = None
    num_resumes: int = 0


# ----------------------------------------------------------------------------- setup helpers

def build_accelerator():
    from accelerate import Accelerator

    # Without a GPU, accelerate only sets up several processes (gloo) when told the run is on the CPU.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=multi_process and not torch.cuda.is_available())


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_num_workers(config: Config, device: torch.device, num_processes: int) -> int:
    """Data loader workers: never more than this process's share of the cores. On CPU the cores
    run the model, and collating token lists is cheap, so auto is 0 there."""
    cores = max(1, (os.cpu_count() or 1) // max(1, num_processes))
    if config.dataloader_num_workers == "auto":
        return 0 if device.type == "cpu" else min(4, cores - 1)
    return min(int(config.dataloader_num_workers), cores)


def total_steps_for(config: Config, steps_in_epoch: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * steps_in_epoch))


def build_optimizer(model, config: Config):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def build_scheduler(optimizer, config: Config, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(config.lr_scheduler_type, optimizer,
                         num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


class _Loader:
    """This rank's micro-batches of one epoch, from a given position, through a DataLoader."""

    def __init__(self, examples: list[dict], *, pad_token_id: int, num_workers: int, pin_memory: bool):
        self.examples = examples
        self.pad_token_id = pad_token_id
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def iterate(self, index_batches: list[list[int]]):
        from torch.utils.data import DataLoader

        from fullscale.data import collate

        pad = self.pad_token_id
        loader = DataLoader(self.examples, batch_sampler=index_batches, num_workers=self.num_workers,
                            collate_fn=lambda ex: collate(ex, pad_token_id=pad), pin_memory=self.pin_memory)
        return iter(loader)


def eval_batches(examples: list[dict], *, batch_size: int, rank: int, num_processes: int, pad_token_id: int):
    """Evaluation batches for this rank: longest first (little padding), round-robin over ranks."""
    from fullscale.data import collate

    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for j, chunk in enumerate(chunks):
        if j % num_processes == rank:
            yield collate([examples[i] for i in chunk], pad_token_id=pad_token_id)


# ----------------------------------------------------------------------------- run directory

def prepare_run_dir(config: Config, manager: ckpt.CheckpointManager, say) -> ckpt.CheckpointInfo | None:
    """Main process only: clean leftovers, choose the checkpoint to resume from (or none)."""
    run_dir = manager.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for note in manager.cleanup():
        say(note)
    if not manager.checkpoint_dirs():
        return None
    if config.resume == "never":
        steps = [s for s, _ in manager.checkpoint_dirs()]
        raise ConfigError(
            f"output_dir {run_dir} already holds a run (checkpoints at steps {steps}) and resume is 'never'; "
            "choose another output_dir for a fresh run, or set resume: auto to continue this one "
            "(fullscale never deletes a run to start over)")
    return manager.newest_verified(say=say)


def check_compatible(config: Config, saved: dict[str, Any], say) -> list[str]:
    """Keys whose change would make the resumed run a different run; harmless changes are reported."""
    changed = [k for k in EXACTNESS_KEYS if k in saved and saved[k] != getattr(config, k)]
    harmless = [k for k in Config.keys() if k not in EXACTNESS_KEYS and k in saved
                and saved[k] != getattr(config, k) and k != "resume"]
    if harmless:
        say(f"resume: accepted changed settings {', '.join(harmless)}")
    return changed


def truncate_metrics(run_dir: Path, step: int) -> int:
    """Drop metrics.jsonl records written after `step` (they are about to be redone)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1  # a line cut by a kill
            continue
        if rec.get("step", 0) > step or (rec.get("step", 0) == step and rec.get("event") == "train_end"):
            dropped += 1
            continue
        kept.append(line)
    tmp = path.with_name("metrics.jsonl.tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    os.replace(tmp, path)
    return dropped


# ----------------------------------------------------------------------------- train

def train(config: Config, *, stream=None) -> dict[str, Any]:
    """Run (or resume) the training described by `config`; returns the training result."""
    import peft
    import safetensors.torch
    from accelerate.utils import broadcast_object_list, gather_object

    from fullscale.data import prepare_data

    # 1. Processes and device.
    accelerator = build_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    device = accelerator.device
    run_dir = Path(config.output_dir)
    manager = ckpt.CheckpointManager(run_dir, save_total_limit=config.save_total_limit)
    console = Monitor(run_dir, enabled=False, tensorboard=False, total_steps=0, stream=stream)
    console.enabled = is_main  # printing only, until the run directory is ready

    def say(text: str) -> None:
        console.print(text)

    # 2. Run directory: leftovers, resume point (decided once, on the main process).
    resume_from = [None]
    error = [None]
    if is_main:
        try:
            info = prepare_run_dir(config, manager, say)
            resume_from[0] = str(info.path) if info else None
        except ConfigError as exc:
            error[0] = str(exc)
    if world > 1:
        broadcast_object_list(resume_from)
        broadcast_object_list(error)
    if error[0]:
        raise ConfigError(error[0].removeprefix("config error: "))
    resume_path = Path(resume_from[0]) if resume_from[0] else None
    saved_state = ckpt.load_state(resume_path) if resume_path else None
    if saved_state:
        changed = check_compatible(config, saved_state["config"], say)
        if changed:
            detail = ", ".join(f"{k}: {saved_state['config'][k]!r} -> {getattr(config, k)!r}" for k in changed)
            raise ConfigError(
                f"cannot resume {run_dir} with a different run's settings ({detail}). Resuming would not give "
                f"the run that was started. Use another output_dir for a new run, or restore these settings")

    # 3. Seed, tokenizer, data, model, optimizer, scheduler: in dependency order.
    set_seed(config.seed)
    choices = choose(config, device)
    if choices.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tokenizer = load_tokenizer(config)
    data = prepare_data(train_file=config.train_file or _demo_train_file(), eval_file=config.eval_file,
                        eval_split=config.eval_split, dataset_format=config.dataset_format,
                        max_seq_length=config.max_seq_length, seed=config.seed, tokenizer=tokenizer,
                        invalid_rows=config.invalid_rows)
    for line in data.messages:
        say(line)
    model = build_model(config, choices)
    trainable, total = count_parameters(model)
    say(f"model {resolve_model_path(config)}: {choices.describe()}; LoRA r={config.lora_rank} "
        f"alpha={config.lora_alpha} on {config.lora_target_modules}: {trainable:,} trainable of {total:,} "
        f"parameters ({100 * trainable / total:.2f}%)")
    model.to(device)
    optimizer = build_optimizer(model, config)
    global_batch = config.per_device_train_batch_size * world
    micro_per_epoch = sampler.micro_batches_per_epoch(len(data.train), global_batch_size=global_batch, num_processes=world)
    if micro_per_epoch == 0:
        raise ConfigError(f"the train data has {len(data.train)} examples, fewer than one batch across {world} "
                          "processes; add data or lower per_device_train_batch_size")
    accum = config.gradient_accumulation_steps
    steps_in_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = total_steps_for(config, steps_in_epoch)
    scheduler = build_scheduler(optimizer, config, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    patience = effective_early_stopping(config)
    stopper = EarlyStopping(patience=patience, min_delta=config.early_stopping_min_delta)
    state = TrainState()
    has_eval = bool(data.eval)
    if not has_eval and config.eval_steps:
        say("no eval data: evaluation and early stopping are off")

    # 4. Resume: adapter, optimizer, scheduler, RNG, data position, early stopping.
    if resume_path is not None:
        unwrapped = accelerator.unwrap_model(model)
        weights = safetensors.torch.load_file(str(resume_path / "adapter_model.safetensors"))
        peft.set_peft_model_state_dict(unwrapped, weights)
        optimizer.load_state_dict(torch.load(resume_path / "optimizer.pt", weights_only=True, map_location="cpu"))
        scheduler.load_state_dict(torch.load(resume_path / "scheduler.pt", weights_only=True))
        rng_file = resume_path / f"rng_state_{rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
        state = TrainState(**saved_state["train_state"])
        stopper.load_state_dict(saved_state["early_stopping"])
        state.num_resumes += 1

    # 5. Records: config.yaml, metrics.jsonl, TensorBoard (continuing at the resume step).
    if is_main:
        (run_dir / "config.yaml").write_text(config.to_yaml())
        if resume_path is None:
            for stale in ("metrics.jsonl", "training_result.json"):
                (run_dir / stale).unlink(missing_ok=True)
        else:
            truncate_metrics(run_dir, state.step)
    monitor = Monitor(run_dir, enabled=is_main, tensorboard=config.uses_tensorboard and is_main,
                      total_steps=total_steps, stream=stream, purge_step=state.step + 1 if resume_path else None)
    if resume_path is not None:
        say(f"resuming from {resume_path.name} (step {state.step}/{total_steps}, epoch {state.epoch})")
        monitor.event("resume", state.step, from_step=state.step, checkpoint=resume_path.name,
                      num_resumes=state.num_resumes)
    else:
        monitor.event("train_start", 0, total_steps=total_steps, num_train_examples=len(data.train),
                      num_eval_examples=len(data.eval or []), trainable_parameters=trainable,
                      total_parameters=total, processes=world, dtype=str(choices.dtype),
                      attn_implementation=choices.attn_implementation)
    mem = memory_stats(device)
    monitor.event("memory", state.step, phase="after_lora", **mem)
    say(f"memory after loading + LoRA: {format_memory(mem)}")
    say(f"{len(data.train):,} train / {len(data.eval or []):,} eval examples; effective batch "
        f"{config.per_device_train_batch_size} x {world} processes x {accum} accumulation = "
        f"{config.per_device_train_batch_size * world * accum}; {steps_in_epoch} steps per epoch, {total_steps} steps")

    loader = _Loader(data.train, pad_token_id=tokenizer.pad_token_id,
                     num_workers=resolve_num_workers(config, device, world), pin_memory=device.type == "cuda")

    def run_eval(step: int) -> EvalResult:
        batches = eval_batches(data.eval, batch_size=config.per_device_eval_batch_size, rank=rank,
                               num_processes=world, pad_token_id=tokenizer.pad_token_id)
        # The unwrapped model: DDP's forward syncs buffers across ranks, and ranks may hold
        # different numbers of eval batches.
        result = evaluate(accelerator.unwrap_model(model), batches, accelerator=accelerator)
        improved = stopper.update(result.eval_loss, step)
        state.last_eval_loss = result.eval_loss
        monitor.event("eval", step, eval_loss=result.eval_loss, eval_perplexity=result.eval_perplexity,
                      eval_tokens=result.num_tokens, eval_seconds=result.seconds, is_best=improved,
                      best_eval_loss=stopper.best, num_bad_evals=stopper.num_bad_evals)
        say(f"eval step {step}: loss {result.eval_loss:.4f}, perplexity {result.eval_perplexity:.3g}"
            f"{' (best)' if improved else f' (best {stopper.best:.4f} at step {stopper.best_step})'} "
            f"[{result.seconds:.1f}s]")
        if improved and is_main:
            save_best_model(step, result.eval_loss)
        return result

    def save_best_model(step: int, eval_loss: float) -> None:
        staging = ckpt.staging_dir(run_dir, "best_model")
        accelerator.unwrap_model(model).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        ckpt.commit_directory(staging, run_dir / "best_model",
                              manifest={"step": step, "eval_loss": eval_loss,
                                        "provenance": {"base_model": resolve_model_path(config)}})

    def save_checkpoint(step: int) -> None:
        rngs = gather_object([rng_state()]) if world > 1 else [rng_state()]
        if is_main:
            payload = {"train_state": asdict(state), "early_stopping": stopper.state_dict(),
                       "config": config.to_dict(), "total_steps": total_steps, "last_eval_loss": state.last_eval_loss,
                       "processes": world}

            def write(d: Path) -> None:
                accelerator.unwrap_model(model).save_pretrained(d)
                torch.save(optimizer.state_dict(), d / "optimizer.pt")
                torch.save(scheduler.state_dict(), d / "scheduler.pt")
                for r, s in enumerate(rngs):
                    torch.save(s, d / f"rng_state_{r}.pt")
                (d / ckpt.STATE).write_text(json.dumps(payload, indent=2, default=str))
                (d / "config.yaml").write_text(config.to_yaml())

            path = manager.save(step, write, manifest={"config_fingerprint": config.fingerprint(EXACTNESS_KEYS),
                                                      "versions": _versions()})
            removed = manager.rotate(best_step=stopper.best_step)
            monitor.event("checkpoint", step, path=path.name, size_bytes=ckpt.dir_size(path), removed=removed)
        accelerator.wait_for_everyone()

    # 6. The loop.
    start_time = time.perf_counter()
    eval_seconds = 0.0
    steps_this_process = 0
    stop_reason = None
    if resume_path is None and has_eval:
        eval_seconds += run_eval(0).seconds
        if stopper.should_stop:
            stop_reason = "early_stopping"
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    log_losses: list[torch.Tensor] = []       # per-step losses since the last log, on the device
    log_tokens = 0                             # real tokens since the last log, this rank
    log_start = time.perf_counter()
    last_grad_norm = None

    while stop_reason is None and state.step < total_steps:
        batches = sampler.global_micro_batches(len(data.train), seed=config.seed, epoch=state.epoch,
                                               global_batch_size=global_batch, num_processes=world)
        mine = [sampler.rank_slice(b, rank=rank, num_processes=world) for b in batches]
        it = loader.iterate(mine[state.micro_in_epoch:])
        while state.micro_in_epoch < len(batches) and state.step < total_steps:
            # One accumulation window: fetch its micro-batches first, to normalise by all its tokens.
            n_micro = min(accum, len(batches) - state.micro_in_epoch)
            window = [next(it) for _ in range(n_micro)]
            local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
            n_tokens = torch.tensor(float(local_tokens), device=device)
            if world > 1:
                n_tokens = accelerator.reduce(n_tokens, reduction="sum")  # label tokens, all ranks
            n_tokens = n_tokens.clamp(min=1.0)
            step_loss = torch.zeros((), device=device)
            for i, batch in enumerate(window):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                sync = i == n_micro - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False).logits
                    loss_sum, _ = token_loss_sum(logits, batch["labels"])
                    # DDP averages gradients over ranks; scale so the result is the mean over all
                    # label tokens of the window on every rank.
                    accelerator.backward(loss_sum / n_tokens * world)
                step_loss += loss_sum.detach() / n_tokens
                log_tokens += int(batch["attention_mask"].sum())  # host-side count, no sync
                del logits
            if config.max_grad_norm > 0:
                last_grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
            else:
                last_grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            steps_this_process += 1
            state.micro_in_epoch += n_micro
            log_losses.append(step_loss)

            # Logging: the only host sync in the training phase.
            if state.step % config.logging_steps == 0 or state.step == total_steps:
                losses = torch.stack(log_losses)
                tokens = torch.tensor(float(log_tokens), device=device)
                if world > 1:
                    losses = accelerator.reduce(losses, reduction="sum")
                    tokens = accelerator.reduce(tokens, reduction="sum")
                losses_host = losses.tolist()
                now = time.perf_counter()
                span = max(now - log_start, 1e-9)
                tok_s = tokens.item() / span
                state.tokens_seen += int(tokens.item())
                state.train_loss_sum += sum(losses_host)
                state.last_train_loss = losses_host[-1]
                lr = scheduler.get_last_lr()[0]
                gn = float(last_grad_norm) if last_grad_norm is not None else None
                mem = memory_stats(device)
                per_step = (now - start_time - eval_seconds) / steps_this_process
                eta = per_step * (total_steps - state.step)
                epoch_f = state.epoch + state.micro_in_epoch / len(batches)  # fractional epochs done
                mean_loss = sum(losses_host) / len(losses_host)
                monitor.event("train", state.step, loss=mean_loss, step_losses=losses_host, learning_rate=lr,
                              grad_norm=gn, tokens_per_second=tok_s, epoch=epoch_f, **mem)
                monitor.progress(state.step, loss=mean_loss, lr=lr, tokens_per_s=tok_s, eta_s=eta,
                                 memory=mem, epoch=epoch_f, grad_norm=gn)
                log_losses, log_tokens, log_start = [], 0, time.perf_counter()

            if config.max_steps <= 0 and state.step >= total_steps:
                stop_reason = "epochs"
            elif state.step >= total_steps:
                stop_reason = "max_steps"

            # Evaluate at eval_steps and once at the end; then save at save_steps and at the end,
            # after the evaluation so the checkpoint holds the early-stopping state of this step.
            t0 = time.perf_counter()
            is_eval_step = bool(config.eval_steps) and state.step % config.eval_steps == 0
            if has_eval and (is_eval_step or stop_reason is not None):
                run_eval(state.step)
                eval_seconds += time.perf_counter() - t0
                if stopper.should_stop and stop_reason is None:
                    stop_reason = "early_stopping"
            if state.step % config.save_steps == 0 or stop_reason is not None:
                save_checkpoint(state.step)
            log_start += time.perf_counter() - t0  # evaluation and saving are not training throughput
            if stop_reason is not None:
                break
        if state.micro_in_epoch >= len(batches):
            state.epoch += 1
            state.micro_in_epoch = 0
        if stop_reason is None and state.step >= total_steps:
            stop_reason = "max_steps" if config.max_steps > 0 else "epochs"

    # 7. The result.
    if stop_reason is None:
        stop_reason = "max_steps" if config.max_steps > 0 else "epochs"
    elapsed = state.train_seconds + (time.perf_counter() - start_time)
    mem = memory_stats(device)
    result = {
        "train_loss": state.train_loss_sum / state.step if state.step else None,
        "final_train_loss": state.last_train_loss,
        "eval_loss": state.last_eval_loss,
        "best_eval_loss": stopper.best,
        "best_step": stopper.best_step,
        "total_steps": state.step,
        "planned_steps": total_steps,
        "stop_reason": stop_reason,
        "elapsed_hours": elapsed / 3600,
        "eval_share": eval_seconds / max(time.perf_counter() - start_time, 1e-9),
        "peak_memory_gb": mem["peak_gb"],
        "tokens_per_second": state.tokens_seen / max(elapsed, 1e-9),
        "num_resumes": state.num_resumes,
        "config": config.to_dict(),
    }
    if is_main:
        write_json(run_dir / "training_result.json", result)
        monitor.event("train_end", state.step, stop_reason=stop_reason, best_eval_loss=stopper.best,
                      best_step=stopper.best_step)
        say(f"done: {stop_reason} at step {state.step}/{total_steps} in {format_duration(elapsed)}; "
            f"best eval loss {_fmt(stopper.best)} at step {stopper.best_step}; peak memory {mem['peak_gb']:.2f} GB")
        say(f"run directory {run_dir}: config.yaml, metrics.jsonl, runs/ (TensorBoard), "
            f"{', '.join(p.name for _, p in manager.checkpoint_dirs())}, best_model/, training_result.json")
    monitor.close()
    accelerator.wait_for_everyone()
    result["_model"] = model
    result["_tokenizer"] = tokenizer
    result["_data"] = data
    return result


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _demo_train_file() -> str:
    from fullscale.demo import DEMO_TRAIN

    return str(DEMO_TRAIN)


def _versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    import fullscale

    return {"fullscale": fullscale.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__}
