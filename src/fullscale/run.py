"""The state of one run: TrainState (what a resume restores: the position, the log window,
counters) and the Run (the components train() built, and what the loop asks of them: evaluate,
save the best model and checkpoints, restore, roll back, write status.json). Decisions of the
main process reach every rank through on_main and raise_together."""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fullscale import checkpoint as ckpt
from fullscale import resumption as resuming
from fullscale.config import Config
from fullscale.data.prepare import run_alpaca_templates
from fullscale.data.store import example_lengths
from fullscale.early_stop import EarlyStopping
from fullscale.errors import DiskSpaceError, UserError
from fullscale.evaluate import EvalResult, evaluate
from fullscale.fingerprint import versions
from fullscale.health import HealthEvent, HealthMonitor
from fullscale.loss import IGNORE_INDEX, LabelledHead
from fullscale.model import resolve_model_path
from fullscale.monitor import Monitor, write_json
from fullscale.preemption import PreemptionFlag
from fullscale.prompts import prompt_format, write_prompt_format
from fullscale.units import format_number


@dataclass
class TrainState:
    """Where the run is: the loop's position, the log window and the run's counters. fit() works on
    it directly, and a checkpoint is its state_dict() (trainer_state.json "train_state"), so a
    resume continues from the same values, the log window included."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0          # micro-batches of this epoch already consumed (a window boundary)
    tokens_seen: int = 0             # real (non-padding) tokens trained on, all ranks
    train_seconds: float = 0.0       # wall time spent in this run, all processes so far
    train_loss_sum: float = 0.0      # sum of finite per-step losses (for the run's mean train loss)
    train_loss_count: int = 0
    last_train_loss: float | None = None
    last_eval_loss: float | None = None
    num_resumes: int = 0
    pending_losses: list[float] = field(default_factory=list)  # the log window: per-step losses not yet logged
    pending_tokens: int = 0          # real tokens of the log window, this rank's (one rank holds them after a save)
    pending_eval_losses: list[float] = field(default_factory=list)  # train losses since the last evaluation
    eval_pending: bool = False       # saved at an eval step before its evaluation ran (a signal came first)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """In place (fit() and the Run hold this object); a key an older checkpoint lacks keeps its default."""
        fresh = TrainState()
        for f in fields(self):
            value = saved.get(f.name, getattr(fresh, f.name))
            setattr(self, f.name, list(value) if isinstance(value, list) else value)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG of this process, in types torch.load(weights_only=True) accepts."""
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
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def eval_batches(examples: list[dict], *, batch_size: int, rank: int, num_processes: int, pad_token_id: int,
                 even: bool = False):
    """Evaluation batches for this rank: longest first (little padding), round-robin over ranks.
    `even`: every rank gets the same number of batches (a sharded forward is a collective); a rank
    short of one runs the shortest example with no label, which adds nothing to the loss."""
    from fullscale.data import collate

    sizes = example_lengths(examples)
    order = sorted(range(len(examples)), key=lambda i: (-sizes[i], i))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine = [chunk for j, chunk in enumerate(chunks) if j % num_processes == rank]
    for chunk in mine:
        yield collate([examples[i] for i in chunk], pad_token_id=pad_token_id)
    if even and order:
        for _ in range(math.ceil(len(chunks) / num_processes) - len(mine)):
            batch = collate([examples[order[-1]]], pad_token_id=pad_token_id)
            batch["labels"].fill_(IGNORE_INDEX)
            yield batch


@dataclass
class Run:
    """The components of one training run, built by train() and driven by fit()."""

    config: Config
    accelerator: Any
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    data: Any
    stopper: EarlyStopping
    state: TrainState
    monitor: Monitor
    manager: ckpt.CheckpointManager
    preemption: PreemptionFlag
    health: HealthMonitor
    fingerprints: dict[str, Any]
    total_steps: int
    run_dir: Path
    num_workers: int
    head: LabelledHead                 # logits only at labelled positions (see fullscale.loss)
    eval_seconds: float = 0.0
    fit_seconds: float = 0.0
    engine: Any = None                 # DDP, FSDP2 or ZeRO: the distributed part of a step (fullscale.engine)
    run_lock: Any = None               # the main process's lock on run_dir (fullscale.rundir.RunLock)
    epoch_done: float | None = None    # fractional epochs done at the last log (status.json)
    logged_loss: float | None = None   # the mean train loss of the last log, as the console shows it
    _running: dict = field(default_factory=dict)   # the last log's status values, kept by later rewrites
    _phase: str = "starting"           # the phase status.json says (a rewrite after an evaluation keeps it)
    _time_base: float = field(default_factory=time.perf_counter)

    @property
    def device(self):
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str) -> None:
        self.monitor.print(text)

    def write_status(self, phase: str, **values: Any) -> None:
        """status.json: what `fullscale status` shows, rewritten atomically at each log."""
        if not self.is_main:
            return
        import socket

        s = self.state
        if self.run_lock is not None:
            self.run_lock.heartbeat()
        if phase == "running" and values:
            self._running = dict(values)   # a log's figures, kept by the rewrites until the next log
        self._phase = phase
        values = {**self._running, **values}
        epoch = values.pop("epoch", self.epoch_done if self.epoch_done is not None else s.epoch)
        write_json(self.run_dir / "status.json", {
            "phase": phase, "pid": os.getpid(), "host": socket.gethostname(), "updated": time.time(),
            "step": s.step, "total_steps": self.total_steps, "epoch": epoch,
            "last_train_loss": s.last_train_loss, "train_loss": self.logged_loss, "last_eval_loss": s.last_eval_loss,
            "best_eval_loss": self.stopper.best, "best_step": self.stopper.best_step,
            "elapsed_seconds": self.elapsed(), "num_resumes": s.num_resumes, **values,
        })

    def elapsed(self) -> float:
        """Wall time of the whole run so far, across resumes."""
        return self.state.train_seconds + (time.perf_counter() - self._time_base)

    # -- evaluation
    def evaluate(self, step: int) -> EvalResult:
        acc = self.accelerator
        batches = eval_batches(self.data.eval, batch_size=self.config.per_device_eval_batch_size,
                               rank=acc.process_index, num_processes=acc.num_processes,
                               pad_token_id=self.tokenizer.pad_token_id, even=self.engine.partitioned)
        # The unwrapped model: DDP's forward syncs buffers across ranks, and ranks may hold
        # different numbers of eval batches.
        result = evaluate(acc.unwrap_model(self.model), batches, accelerator=acc, head=self.head)
        self.eval_seconds += result.seconds
        improved = self.stopper.update(result.eval_loss, step)
        self.state.last_eval_loss = result.eval_loss
        s = self.stopper
        self.monitor.event("eval", step, eval_loss=result.eval_loss, eval_perplexity=result.eval_perplexity,
                           eval_tokens=result.num_tokens, eval_seconds=result.seconds, is_best=improved,
                           best_eval_loss=s.best, best_step=s.best_step, num_bad_evals=s.num_bad_evals)
        note = " (best)" if improved else f" (best {format_number(s.best, '.4f')} at step {s.best_step}; {s.num_bad_evals} without improvement)"
        self.say(f"eval step {step}: loss {result.eval_loss:.4f}, perplexity {result.eval_perplexity:.3g}{note} "
                 f"[{result.seconds:.1f}s]")
        if improved:
            self.save_best_model(step, result.eval_loss)
        self.show_samples(step)
        self.write_status(self._phase)   # `fullscale status` shows this evaluation at once, not at the next log
        return result

    def show_samples(self, step: int) -> None:
        """Greedy generations for a few fixed eval rows (eval_samples), on the main process: printed,
        in metrics.jsonl ("sample" events) and TensorBoard (text). A sharded model is skipped (its
        forward is a collective of every rank)."""
        if not self.is_main or not self.config.eval_samples or self.engine.partitioned:
            return
        from fullscale.generate import eval_samples

        t0 = time.perf_counter()
        samples = eval_samples(self.accelerator.unwrap_model(self.model), self.tokenizer, self.data.eval,
                               count=self.config.eval_samples, max_new_tokens=self.config.eval_sample_tokens)
        self.eval_seconds += time.perf_counter() - t0   # not training throughput
        table = ["| row | prompt | model | expected |", "|---|---|---|---|"]
        for s in samples:
            self.monitor.event("sample", step, **s)
            self.say(f"  sample (eval row {s['row']}): {s['prompt'][-60:]!r} -> {s['output'][:80]!r} "
                     f"(expected {s['expected'][:80]!r})")
            table.append("| " + " | ".join([str(s["row"])] + [s[k].replace("|", "\\|").replace("\n", " ")
                                                           for k in ("prompt", "output", "expected")]) + " |")
        if samples:
            self.monitor.text("samples", "\n".join(table), step)

    def save_best_model(self, step: int, eval_loss: float) -> None:
        """best_model/: adapter + tokenizer of the best eval loss, replaced atomically. Every rank
        calls it (under FSDP or DeepSpeed the adapter is gathered); rank 0 writes."""
        adapter = self.engine.gathered_adapter()
        failure: Exception | None = None

        def write(d: Path) -> None:
            self.save_adapter(d, adapter)
            self.tokenizer.save_pretrained(d)
            write_prompt_format(d, prompt_format(self.data.format, alpaca=run_alpaca_templates(self.config)))

        if self.is_main:
            try:
                ckpt.write_staged(self.run_dir, "best_model", write, what="best_model/", needed=self.adapter_bytes(),
                                  manifest={"step": step, "eval_loss": eval_loss,
                                            "provenance": {"base_model": resolve_model_path(self.config),
                                                           "fingerprints": self.fingerprints}})
            except Exception as exc:   # noqa: BLE001 - re-raised on every rank by raise_together
                failure = exc
        self.raise_together(failure)

    def raise_together(self, failure: Exception | None) -> None:
        """A failure of the main process's write stops every rank (none waits in a collective on a
        writer that is gone): the main process raises it, the others a DiskSpaceError (exit 1) saying so."""
        error = [None if failure is None else str(failure) if isinstance(failure, DiskSpaceError)
                 else f"the main process failed while saving: {type(failure).__name__}: {failure}"]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(error)
        if failure is not None:
            raise failure
        if error[0]:
            raise DiskSpaceError(error[0])

    def adapter_bytes(self) -> int:
        """Bytes of the trainable parameters (an adapter file; a checkpoint adds two AdamW moments)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        return sum(p.numel() * 4 for p in unwrapped.parameters() if p.requires_grad)

    def save_adapter(self, directory: Path, adapter: dict[str, torch.Tensor] | None) -> None:
        """adapter_model.safetensors + adapter_config.json, as peft writes them (from the gathered
        full tensors under FSDP or DeepSpeed)."""
        model = self.accelerator.unwrap_model(self.model)
        if adapter is None:
            model.save_pretrained(directory)
        else:
            model.save_pretrained(directory, state_dict=adapter)

    # -- checkpoints
    def save_checkpoint(self, step: int, stop_reason: str | None) -> None:
        """Every rank calls this (RNG states and the log window's token counts are gathered); rank 0 writes."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        rngs = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
        # The window's tokens, summed: the main process holds them from here on (the sum is unchanged).
        tokens = self.reduce_tokens(self.state.pending_tokens)
        self.state.pending_tokens = tokens if self.is_main else 0
        # Under FSDP or DeepSpeed, gather the adapter and the optimizer states on every rank (collectives).
        adapter = self.engine.gathered_adapter()
        optimizer_state = self.engine.gathered_optimizer_state()
        self.state.train_seconds, self._time_base = self.elapsed(), time.perf_counter()
        failure: Exception | None = None
        if self.is_main:
            payload = {"train_state": self.state.state_dict(), "early_stopping": self.stopper.state_dict(),
                       "health": self.health.state_dict(),
                       "config": self.config.to_dict(), "fingerprints": self.fingerprints,
                       "total_steps": self.total_steps, "last_eval_loss": self.state.last_eval_loss,
                       "processes": acc.num_processes, "stop_reason": stop_reason}

            def write(d: Path) -> None:
                self.save_adapter(d, adapter)
                torch.save(optimizer_state, d / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), d / "scheduler.pt")
                for r, s in enumerate(rngs):
                    torch.save(s, d / f"rng_state_{r}.pt")
                (d / ckpt.STATE).write_text(json.dumps(payload, indent=2, default=str))
                (d / "config.yaml").write_text(self.config.to_yaml())

            t0 = time.perf_counter()
            try:
                path = self.manager.save(step, write, manifest={"config_fingerprint": self.fingerprints["config"],
                                                                "versions": versions()},
                                         estimate=3 * self.adapter_bytes() + (1 << 16))
                removed = self.manager.rotate(best_step=self.stopper.best_step)
                self.monitor.event("checkpoint", step, path=path.name, size_bytes=ckpt.dir_size(path),
                                   removed=removed, seconds=time.perf_counter() - t0, stop_reason=stop_reason)
            except Exception as exc:   # noqa: BLE001 - re-raised on every rank by raise_together
                failure = exc
        self.raise_together(failure)

    def reduce_tokens(self, tokens: int) -> int:
        """Sum a host-side count over ranks."""
        if self.accelerator.num_processes == 1:
            return tokens
        t = torch.tensor(float(tokens), device=self.device)
        return int(self.accelerator.reduce(t, reduction="sum").item())

    def restore(self, path: Path, saved: dict[str, Any]) -> None:
        """Adapter, optimizer, scheduler, this rank's RNG, position, early stopping."""
        import safetensors.torch

        weights = safetensors.torch.load_file(str(path / "adapter_model.safetensors"))
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        self.engine.load(self.accelerator.unwrap_model(self.model), weights, optimizer_state)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        saved_lr = (saved.get("config") or {}).get("learning_rate")
        if saved_lr and saved_lr != self.config.learning_rate:
            # force_resume with another learning_rate: the schedule continues at the new peak (the
            # optimizer and scheduler states carry the old one).
            factor = self.config.learning_rate / saved_lr
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
            self.scheduler._last_lr = [lr * factor for lr in self.scheduler.get_last_lr()]
            for group in self.optimizer.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
        rng_file = path / f"rng_state_{self.accelerator.process_index}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            self.say(f"{rng_file.name} not in {path.name} (the run now has more processes); dropout of this "
                     "rank continues from a fresh seed, so the run is no longer bitwise exact")
        self.state.load_state_dict(saved["train_state"])
        if not self.is_main:
            self.state.pending_tokens = 0   # the saved count is the window's sum over ranks
        self.stopper.load_state_dict(saved["early_stopping"])
        if "health" in saved:
            self.health = HealthMonitor(self.config, total_steps=self.total_steps,
                                        warmup_steps=self.health.warmup_steps)
            self.health.load_state_dict(saved["health"])
        self.apply_lr_scale()

    def apply_lr_scale(self) -> None:
        """The scheduler's lr times the health monitor's scale (lowered by rollbacks)."""
        if self.health.lr_scale != 1.0:
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr * self.health.lr_scale

    def health_event(self, event: HealthEvent) -> None:
        self.monitor.event("health", event.step, detector=event.detector, action=event.action,
                           message=event.message, value=event.value, **event.details)
        self.say(f"health [{event.detector} -> {event.action}] step {event.step}: {event.message}")

    def rollback(self, step: int) -> int | None:
        """Return to the newest checkpoint with a lower learning rate; the health state is kept.
        Returns the checkpoint's step, or None when there is none to return to."""
        info = self.manager.latest()
        if info is None:
            return None
        # The checkpoint's statistics come back (the history after it is undone); the count of
        # rollbacks, the lr scale and the one-shot warnings carry on.
        keep = self.health.state_dict()
        self.restore(info.path, ckpt.load_state(info.path))
        for key in ("num_rollbacks", "lr_scale", "warned", "num_events"):
            setattr(self.health, key, keep[key] if key != "warned" else set(keep[key]))
        self.health.num_rollbacks += 1
        self.health.lr_scale *= self.config.health_rollback_lr_factor
        self.apply_lr_scale()
        if self.is_main:
            resuming.truncate_metrics(self.run_dir, info.step, keep_events=("health",))
            self.monitor.reopen(purge_step=info.step + 1, reason=f"rollback at step {step}")
        self.monitor.event("rollback", info.step, from_step=step, to_step=info.step,
                           lr_scale=self.health.lr_scale, num_rollbacks=self.health.num_rollbacks)
        self.say(f"rolled back from step {step} to {info.path.name}; learning rate now x{self.health.lr_scale:g}")
        return info.step


# ----------------------------------------------------------------------------- train

class MainProcessError(UserError):
    """What the main process reported to the other ranks when a decision it takes alone failed."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def on_main(accelerator, decide):
    """Run `decide()` on the main process only and give its result to every rank. An error there is
    raised on every rank (the original on the main process), so no rank waits in a collective for a
    process that already failed."""
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None, None]
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            box[0] = decide()
        except BaseException as exc:   # noqa: BLE001 - re-raised below, after the other ranks know
            error = exc
            code = exc.exit_code if isinstance(exc, UserError) else 1
            box[1] = (str(exc) if isinstance(exc, UserError) else
                      f"the main process failed: {type(exc).__name__}: {exc}", code)
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    if error is not None:
        raise error
    if box[1] is not None:
        raise MainProcessError(*box[1])
    return box[0]
