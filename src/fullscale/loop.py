"""fit(run): the training loop, top to bottom, and the named parts of one step.

    window -> forward/backward (accumulate) -> clip -> health decision (before the update)
           -> update -> log -> stop? -> evaluate -> save

Where the guarantees live in a step:
- loss normalisation: `forward_backward` divides each micro-batch's summed token loss by the
  label tokens of the whole window across all ranks, so any split of the batch over micro-batches
  and processes gives the same gradient;
- health before the update: `health_decision` sees the global loss and gradient norm (the step's
  one host sync) before the optimizer runs, so a bad update is skipped, rolled back or stops;
- preemption: the signal flag of every rank travels in the step's one reduction (with the loss),
  and `decide_stop` acts on it after the update; the checkpoint of `evaluate_and_save` is then
  written before the process exits;
- exact resume: the loop's position is TrainState (epoch, micro-batch in the epoch, the log
  window), saved with every checkpoint and restored before fit() starts.
"""

from __future__ import annotations

import math
import time

import torch

from fullscale import faults, sampler
from fullscale.data.batching import model_inputs
from fullscale.data.store import example_lengths
from fullscale.loss import num_label_tokens, token_loss_sum
from fullscale.monitor import format_memory, memory_stats
from fullscale.run import rng_state, set_rng_state

_SEVERITY = {"warn": 0, "skip": 1, "rollback": 2, "abort": 3}

# The stop reasons, strongest first: a step's decisions meet in stronger(), so a later one never
# replaces a stronger one. A health abort always wins; a signal beats the end of the schedule (the
# end's evaluation then waits for the resume, so the save is quick); the end beats early stopping
# decided at the same step.
STOP_PRECEDENCE = ("health_abort", "preempted", "max_steps", "epochs", "early_stopping")


def stronger(stop: str | None, new: str | None) -> str | None:
    """The stop reason that stands when `new` is decided after `stop` (None: go on)."""
    if stop is None or new is None:
        return stop or new
    return min(stop, new, key=STOP_PRECEDENCE.index)


def fit(run) -> str:
    """The training loop over `run` (a fullscale.run.Run); returns the stop reason."""
    loop, state = Loop(run), run.state
    stop = loop.begin()
    while stop is None and state.step < run.total_steps:
        batches = loop.epoch_batches()
        it = loop.loader(batches)
        while stop is None and state.micro_in_epoch < len(batches) and state.step < run.total_steps:
            step = state.step + 1
            faults.current_step = step
            window = loop.fetch(it, len(batches))
            loss, norm = loop.forward_backward(window)
            action, events = loop.health_decision(step, loss, norm)
            if action == "rollback":
                if loop.roll_back(step):
                    stop = loop.pending_evaluation()
                    break  # the data position changed: rebuild this epoch's batches
                action = "skip"
            if action == "abort":
                stop = loop.abort(step, events, batches, len(window))
                break
            loop.update(step, loss, len(window), apply=action != "skip")
            stop = loop.after_update(step, loss, norm, num_batches=len(batches))
            stop = loop.decide_stop(step, stop)
            stop = loop.evaluate_and_save(step, stop)
        if state.micro_in_epoch >= len(batches):
            state.epoch += 1
            state.micro_in_epoch = 0
    run.fit_seconds = time.perf_counter() - loop.start
    return stop or loop.end


def most_severe(events) -> str | None:
    return max((e.action for e in events), key=_SEVERITY.__getitem__, default=None)


def num_real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a collated batch (host-side count, no device sync)."""
    mask = batch.get("real_mask", batch.get("attention_mask"))
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def build_loader(examples: list[dict], index_batches: list[list[int]], *, pad_token_id: int, num_workers: int,
                 pin_memory: bool, packed: bool = False):
    """This rank's micro-batches, in the given order. A private generator keeps the DataLoader
    from drawing its seed from the global torch RNG (which would shift dropout after a resume)."""
    from torch.utils.data import DataLoader

    from fullscale import data as data_module

    collate = data_module.collate_packed if packed else data_module.collate
    return DataLoader(examples, batch_sampler=index_batches, num_workers=num_workers,
                      collate_fn=lambda ex: collate(ex, pad_token_id=pad_token_id), pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0))


class Loop:
    """The parts of a step, and what fit() keeps besides the TrainState (which holds the position
    and the log window): timing, the lengths for grouping, whether a signal came."""

    def __init__(self, run):
        self.run, self.config, self.state, self.model = run, run.config, run.state, run.model
        self.acc, self.device = run.accelerator, run.device
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.has_eval = bool(run.data.eval)
        self.end = "max_steps" if self.config.max_steps > 0 else "epochs"   # the stop at the end of the schedule
        self.lengths = example_lengths(run.data.train) if self.config.group_by_length else None
        self.steps_done, self.start = 0, time.perf_counter()
        self.log_start = self.start   # when the log window began (its tokens per second)
        self.signalled = False        # a preemption signal on any rank, as of this step's reduction

    # -- before the first step
    def begin(self) -> str | None:
        """The length-grouping note, the base model's evaluation at step 0, and an evaluation a
        signal cut off before a resume."""
        if self.lengths is not None:
            kw = dict(num_examples=len(self.lengths), seed=self.config.seed, epoch=self.state.epoch,
                      global_batch_size=self.config.per_device_train_batch_size * self.world,
                      num_processes=self.world)
            grouped = sampler.padding_share(sampler.global_micro_batches(**kw, lengths=self.lengths), self.lengths)
            shuffled = sampler.padding_share(sampler.global_micro_batches(**kw), self.lengths)
            self.run.say(f"group_by_length: padding {100 * grouped:.1f}% of the tokens of a batch "
                         f"(shuffled: {100 * shuffled:.1f}%)")
        if self.state.step == 0 and self.has_eval:
            self.run.evaluate(0)  # the base model's starting point
        stop = self.pending_evaluation()
        self.model.train()
        return stop

    def epoch_batches(self) -> list[list[int]]:
        """This epoch's global micro-batches (seeded by the epoch: a resume rebuilds the same), over
        this epoch's examples (a mix draws its fractional sources anew each epoch)."""
        train = self.run.data.train
        if getattr(train, "resamples", False):
            train.set_epoch(self.state.epoch)
            if self.lengths is not None:
                self.lengths = example_lengths(train)
        return sampler.global_micro_batches(len(self.run.data.train), seed=self.config.seed, epoch=self.state.epoch,
                                            global_batch_size=self.config.per_device_train_batch_size * self.world,
                                            num_processes=self.world, lengths=self.lengths)

    def loader(self, batches: list[list[int]]):
        """This rank's micro-batches from the epoch's position on."""
        mine = [sampler.rank_slice(b, rank=self.rank, num_processes=self.world) for b in batches]
        return iter(build_loader(self.run.data.train, mine[self.state.micro_in_epoch:],
                                 pad_token_id=self.run.tokenizer.pad_token_id, num_workers=self.run.num_workers,
                                 pin_memory=self.device.type == "cuda", packed=self.config.packing))

    # -- one step
    def fetch(self, it, num_batches: int) -> list[dict[str, torch.Tensor]]:
        """The accumulation window's micro-batches, fetched first: the loss is normalised by the
        label tokens of the whole window."""
        n_micro = min(self.config.gradient_accumulation_steps, num_batches - self.state.micro_in_epoch)
        return [next(it) for _ in range(n_micro)]

    def forward_backward(self, window: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """Forward and backward of every micro-batch of the window, then the clip; returns the
        window's global (loss, gradient norm): the step's one host sync, which also brings whether
        any rank got a preemption signal (`signalled`, when distributed)."""
        run, world, device = self.run, self.world, self.device
        # What the window changes besides the update (dropout's random state, the log window's
        # tokens): an abort saves the run as it was before the discarded step.
        self.before_window = (rng_state(), self.state.pending_tokens)
        # torch.full, not torch.tensor: a fill on the device, no host-to-device copy that would wait for it.
        n_tokens = torch.full((), float(sum(num_label_tokens(b["labels"]) for b in window)), device=device)
        if world > 1:
            n_tokens = self.acc.reduce(n_tokens, reduction="sum")
        n_tokens = n_tokens.clamp(min=1.0)
        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(window):
            self.state.pending_tokens += num_real_tokens(batch)  # counted on the host, before the copy: no sync
            labels = batch["labels"]   # kept on the host: the labelled positions are found there, no sync
            inputs = model_inputs(batch, device)
            last = i == len(window) - 1
            with run.engine.accumulating(last):
                with run.head.only_labelled(labels):
                    logits = self.model(**inputs, use_cache=False).logits  # (N labelled, V)
                loss_sum, _ = token_loss_sum(logits, labels)
                if faults.active("nan"):
                    loss_sum = loss_sum * float("nan")
                # DDP (FSDP, ZeRO) average gradients over ranks; x world makes it the window's token mean.
                run.engine.backward(loss_sum / n_tokens * world)
            step_loss += loss_sum.detach() / n_tokens
            del logits
            if not last:
                faults.hit("micro")
        grad_norm = run.engine.clip_grad_norm(self.params)
        faults.hit("sigterm")   # a signal during the step: its update still runs, then the save
        if world > 1:   # the loss and the signal flag of every rank, in one all-reduce
            flag = torch.full((), float(run.preemption.raised), device=device)
            step_loss, flag = self.acc.reduce(torch.stack([step_loss.float(), flag]), reduction="sum").unbind()
            loss, norm, signalled = torch.stack([step_loss, grad_norm.float(), flag]).tolist()
            self.signalled = signalled > 0
        else:
            loss, norm = torch.stack([step_loss.float(), grad_norm.float()]).tolist()
        return loss, norm

    def health_decision(self, step: int, loss: float, norm: float):
        """(the most severe action, the events) of the checks on this step's loss and norm, before
        the update; every rank sees the same global values, so all take the same decision. The
        update of a skip, rollback or abort is discarded here."""
        events = self.run.health.check_step(step=step, loss=loss, grad_norm=norm)
        action = most_severe(events)
        for event in events:
            self.run.health_event(event)
        if action in ("rollback", "abort", "skip"):
            self.run.engine.discard_update()   # this update is not applied
        return action, events

    def roll_back(self, step: int) -> bool:
        """Back to the newest checkpoint with a lower lr (the windows come back with it); False when
        there is none (the update is then skipped instead)."""
        if self.run.rollback(step) is not None:
            self.log_start = time.perf_counter()   # the log window is the checkpoint's
            return True
        self.run.say(f"no checkpoint to roll back to at step {step}; the update is skipped instead")
        return False

    def abort(self, step: int, events, batches: list[list[int]], n_micro: int) -> str:
        """A health abort: the rows of the batch and the recent history said, the run saved."""
        run, state = self.run, self.state
        rows = sorted(row for b in batches[state.micro_in_epoch:state.micro_in_epoch + n_micro] for i in b
                      for row in run.data.train[i].get("rows") or [run.data.train[i]["row"]])  # packed: rows
        run.say(f"health abort at step {step}: {events[-1].message}. Batch rows: {rows}. "
                f"Recent losses: {[round(x, 4) for x in list(run.health.losses)[-8:]]}; recent grad norms: "
                f"{[round(x, 4) for x in list(run.health.grad_norms)[-8:]]}")
        run.monitor.event("health_abort", step, rows=rows, message=events[-1].message,
                          recent_losses=list(run.health.losses)[-8:])
        rngs, state.pending_tokens = self.before_window   # the checkpoint before the bad update, as it was
        set_rng_state(rngs)
        run.save_checkpoint(state.step, "health_abort")
        return "health_abort"

    def update(self, step: int, loss: float, n_micro: int, *, apply: bool) -> None:
        """The optimizer step (unless skipped), the schedule, and the position moved on."""
        run, state = self.run, self.state
        if apply:
            run.engine.apply_update()
        run.scheduler.step()
        run.apply_lr_scale()
        state.step = step
        state.micro_in_epoch += n_micro
        self.steps_done += 1
        state.pending_losses.append(loss)
        state.pending_eval_losses.append(loss)

    def after_update(self, step: int, loss: float, norm: float, *, num_batches: int) -> str | None:
        """The live bar, the first step's memory, the fault points, the lr check and, every
        logging_steps, the log; returns a stop the checks decided."""
        run, stop = self.run, None
        if run.monitor.is_tty:   # the live bar: every step on a terminal
            spent = time.perf_counter() - self.start - run.eval_seconds
            run.monitor.tick(step, loss=loss, steps_per_s=self.steps_done / max(spent, 1e-9),
                             eta_s=spent / self.steps_done * (run.total_steps - step))
        if self.steps_done == 1:
            mem = memory_stats(self.device)
            run.monitor.event("memory", step, phase="after_first_step", **mem)
            run.say(f"memory after the first step: {format_memory(mem)}")
        faults.hit("step")
        if faults.active("lr_spike"):
            for group in run.optimizer.param_groups:
                group["lr"] *= 100.0  # the next update runs at 100x the scheduled rate
        lr = run.optimizer.param_groups[0]["lr"]
        for event in run.health.check_lr(step=step, lr=lr):
            run.health_event(event)
            if event.action == "abort":
                stop = "health_abort"
        if step % self.config.logging_steps == 0 or step == run.total_steps:
            stop = stronger(stop, self.log(step, lr, norm, num_batches=num_batches))
        return stop

    def log(self, step: int, lr: float, norm: float, *, num_batches: int) -> str | None:
        """The log of the window since the last one (token counts summed over ranks here, once):
        metrics.jsonl, the console, status.json, and the memory check."""
        run, state = self.run, self.state
        tokens = run.reduce_tokens(state.pending_tokens)
        now = time.perf_counter()
        tokens_per_s = tokens / max(now - self.log_start, 1e-9)
        losses = state.pending_losses
        finite = [x for x in losses if math.isfinite(x)]
        state.tokens_seen += tokens
        state.train_loss_sum += sum(finite)
        state.train_loss_count += len(finite)
        state.last_train_loss = losses[-1]
        mean_loss = sum(losses) / len(losses)   # a NaN step shows as NaN, never hidden
        mem = memory_stats(self.device)
        eta = (now - self.start - run.eval_seconds) / self.steps_done * (run.total_steps - step)
        epoch = state.epoch + state.micro_in_epoch / num_batches   # fractional epochs done
        run.epoch_done, run.logged_loss = epoch, mean_loss
        run.monitor.event("train", step, loss=mean_loss, step_losses=losses, learning_rate=lr,
                          grad_norm=norm, tokens_per_second=tokens_per_s, epoch=epoch, **mem)
        run.monitor.progress(step, loss=mean_loss, lr=lr, tokens_per_s=tokens_per_s, eta_s=eta,
                             memory=mem, epoch=epoch, grad_norm=norm)
        run.write_status("running", epoch=epoch, tokens_per_second=tokens_per_s, eta_seconds=eta,
                         learning_rate=lr, peak_memory_gb=mem["peak_gb"])
        stop = None
        for event in run.health.check_memory(step=step, memory_gb=mem.get("allocated_gb", mem.get("rss_gb"))):
            run.health_event(event)
            if event.action == "abort":
                stop = "health_abort"
        state.pending_losses, state.pending_tokens, self.log_start = [], 0, time.perf_counter()
        return stop

    def decide_stop(self, step: int, stop: str | None) -> str | None:
        """The stop reason after the update, by STOP_PRECEDENCE: what the step's checks decided (a
        health abort), a preemption signal on any rank, the end of the schedule."""
        if step >= self.run.total_steps:
            stop = stronger(stop, self.end)
        # Distributed: the flags came with the step's reduction; one process: its own flag (no sync).
        signalled = self.signalled if self.world > 1 else self.run.preemption.agreed(self.acc, self.device)
        return stronger(stop, "preempted") if signalled else stop

    def evaluate_and_save(self, step: int, stop: str | None, *, save: bool = False) -> str | None:
        """Evaluate at eval_steps and once at the end; save at save_steps and at the end, after the
        evaluation, so the checkpoint holds this step's early-stopping state. A signal that comes
        before an eval step's evaluation saves at once with the evaluation marked pending: the
        resumed run does it first, so the run's evaluations are the same as if never stopped.
        Evaluation and saving are not counted in the training throughput."""
        t0 = time.perf_counter()
        run, state, config = self.run, self.state, self.config
        at_eval_step = bool(config.eval_steps) and step % config.eval_steps == 0
        due = self.has_eval and (at_eval_step or step >= run.total_steps or stop not in (None, "preempted"))
        state.eval_pending = due and stop == "preempted"
        if due and stop not in ("preempted", "health_abort"):
            result = run.evaluate(step)
            self.model.train()
            finite = [x for x in state.pending_eval_losses if math.isfinite(x)]
            train_mean = sum(finite) / len(finite) if finite else None
            state.pending_eval_losses = []
            for event in run.health.check_eval(step=step, eval_loss=result.eval_loss, train_loss=train_mean):
                run.health_event(event)
                if event.action == "abort":
                    stop = "health_abort"
            if run.stopper.should_stop:
                stop = stronger(stop, "early_stopping")
            # A signal during the evaluation stops a run that would go on; a run this step ends
            # (any stop already decided) is saved as finished, with nothing left to resume.
            if stop is None and run.preemption.agreed(self.acc, self.device):
                stop = "preempted"
        if save or step % config.save_steps == 0 or stop is not None:
            run.save_checkpoint(step, stop)
        self.log_start += time.perf_counter() - t0
        return stop

    def pending_evaluation(self) -> str | None:
        """The evaluation a signal cut off before it started (resume, or a rollback to such a
        checkpoint); the checkpoint is then saved again without the mark, with any stop it decides."""
        if not self.state.eval_pending:
            return None
        self.state.eval_pending = False
        stop = self.evaluate_and_save(self.state.step, self.end if self.state.step >= self.run.total_steps else None,
                                      save=True)
        self.model.train()
        return stop
