"""Health checks: each row of the monitoring table is a detector with a rule and an action.

| detector  | watches            | rule (robust statistics over the last `health_window` steps)                | default  |
|-----------|--------------------|------------------------------------------------------------------------------|----------|
| nonfinite | loss, grad norm    | NaN or Inf, checked before the optimizer step                               | skip     |
| spike     | train loss         | loss > level + health_spike_threshold x noise, > 1.25 x level, > level + 0.2;| rollback |
|           |                    | median of the last 10 losses, noise = robust std (MAD) of step-to-step changes |          |
| grad      | grad norm          | norm > health_grad_threshold x median norm and > 2 x the window's largest    | warn     |
| overfit   | eval vs train loss | eval loss rose over health_overfit_evals evaluations while train loss fell   | warn     |
| lr        | learning rate      | lr < 1% of its peak before 90% of the steps, after warmup (a scheduler bug)  | warn     |
| memory    | memory in use      | median of the last logs > (1 + health_memory_growth) x that of the 2nd window | warn     |

Actions: `warn` (log it), `skip` (do not apply this update), `rollback` (return to the last
checkpoint and scale the learning rate by health_rollback_lr_factor), `abort` (stop with a
diagnostic). A NaN or Inf is never hidden: it is logged as such. `health_max_nonfinite`
non-finite steps in a row end in abort, not an endless skip; more than
`health_max_rollbacks` rollbacks end in abort too. The monitor's state is saved with
checkpoints, so a resumed run makes the same decisions.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MIN_HISTORY = 10          # steps of history before spike/grad rules apply
RECENT = 10               # steps whose median is the loss level a spike is measured against
LR_COLLAPSE_FRACTION = 0.01
LR_COLLAPSE_BEFORE = 0.9
SPIKE_MIN_RATIO = 1.25    # a spike is at least 25% above the level...
SPIKE_MIN_NATS = 0.2      # ...and 0.2 nats per token above it (near convergence, noise is relative)


@dataclass
class HealthEvent:
    step: int
    detector: str
    action: str
    message: str
    value: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def _median_mad(values) -> tuple[float, float]:
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    return med, mad


class HealthMonitor:
    """Decides, from per-step values, whether the run is healthy and what to do if not."""

    def __init__(self, config, *, total_steps: int, warmup_steps: int):
        self.c = config
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.losses: deque[float] = deque(maxlen=config.health_window)
        self.grad_norms: deque[float] = deque(maxlen=config.health_window)
        self.memory: list[float] = []            # one value per log, first window kept
        self.evals: list[tuple[int, float, float | None]] = []  # (step, eval loss, mean train loss)
        self.consecutive_nonfinite = 0
        self.num_rollbacks = 0
        self.lr_scale = 1.0
        self.peak_lr = 0.0
        self.warned: set[str] = set()             # one-shot warnings already given
        self.num_events = 0

    # -- per step, before the optimizer step
    def check_step(self, *, step: int, loss: float, grad_norm: float) -> list[HealthEvent]:
        c = self.c
        events: list[HealthEvent] = []
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.consecutive_nonfinite += 1
            what = "loss" if not math.isfinite(loss) else "grad norm"
            if self.consecutive_nonfinite >= c.health_max_nonfinite or c.health_nonfinite_action == "abort":
                events.append(HealthEvent(step, "nonfinite", "abort",
                                          f"non-finite {what} ({loss} / grad norm {grad_norm}) for "
                                          f"{self.consecutive_nonfinite} step(s) in a row", loss))
            else:
                events.append(HealthEvent(step, "nonfinite", "skip",
                                          f"non-finite {what} (loss {loss}, grad norm {grad_norm}); update skipped "
                                          f"({self.consecutive_nonfinite}/{c.health_max_nonfinite} in a row)", loss))
            return self._count(events)
        self.consecutive_nonfinite = 0

        if len(self.losses) >= MIN_HISTORY and c.health_spike_threshold > 0:
            # Level: the median of the last few steps (a falling loss moves it). Noise: the robust
            # spread of step-to-step changes over the window (a trend does not inflate it).
            history = list(self.losses)
            med = statistics.median(history[-RECENT:])
            diffs = [b - a for a, b in zip(history, history[1:])]
            _, mad = _median_mad(diffs)
            sigma = 1.4826 * mad / math.sqrt(2)
            limit = med + c.health_spike_threshold * max(sigma, 1e-3 * abs(med))
            limit = max(limit, SPIKE_MIN_RATIO * med, med + SPIKE_MIN_NATS)
            if loss > limit:
                action = c.health_spike_action
                if action == "rollback" and self.num_rollbacks >= c.health_max_rollbacks:
                    action = "abort"
                events.append(HealthEvent(step, "spike", action,
                                          f"loss spike: {loss:.4g} against a median of {med:.4g} over the last "
                                          f"{min(RECENT, len(history))} steps (limit {limit:.4g})", loss,
                                          {"median": med, "limit": limit}))
        if len(self.grad_norms) >= MIN_HISTORY and c.health_grad_threshold > 0:
            # Grad norms are heavy-tailed near convergence: a single large one is clipped anyway,
            # so only a norm far above both the median and everything in the window counts.
            med = statistics.median(self.grad_norms)
            if grad_norm > c.health_grad_threshold * max(med, 1e-12) and grad_norm > 2 * max(self.grad_norms):
                events.append(HealthEvent(step, "grad", c.health_grad_action,
                                          f"exploding gradient: norm {grad_norm:.4g} is "
                                          f"{grad_norm / max(med, 1e-12):.1f}x the median {med:.4g}", grad_norm,
                                          {"median": med}))
        if not any(e.action in ("skip", "rollback", "abort") for e in events):
            # Only applied updates shape the statistics; a skipped spike must not raise the baseline.
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
        return self._count(events)

    # -- after the optimizer step
    def check_lr(self, *, step: int, lr: float) -> list[HealthEvent]:
        self.peak_lr = max(self.peak_lr, lr)
        if ("lr" in self.warned or step <= self.warmup_steps or step >= LR_COLLAPSE_BEFORE * self.total_steps
                or self.peak_lr <= 0):
            return []
        if lr < LR_COLLAPSE_FRACTION * self.peak_lr:
            self.warned.add("lr")
            return self._count([HealthEvent(
                step, "lr", self.c.health_lr_action,
                f"learning rate collapsed to {lr:.3g} (peak {self.peak_lr:.3g}) at step {step} of {self.total_steps}, "
                f"long before the end of the schedule: check lr_scheduler_type, warmup_ratio and max_steps", lr)])
        return []

    # -- at each log
    def check_memory(self, *, step: int, memory_gb: float) -> list[HealthEvent]:
        if not math.isfinite(memory_gb):
            return []
        self.memory.append(memory_gb)
        w = max(3, self.c.health_memory_window)
        if "memory" in self.warned or len(self.memory) < 3 * w:
            return []
        first = statistics.median(self.memory[w:2 * w])  # the first window is warm-up (allocator, caches)
        last = statistics.median(self.memory[-w:])
        if last > (1 + self.c.health_memory_growth) * first:
            self.warned.add("memory")
            return self._count([HealthEvent(
                step, "memory", self.c.health_memory_action,
                f"memory keeps growing: {first:.3f} GB early in the run, {last:.3f} GB now "
                f"(+{100 * (last / first - 1):.0f}%); a leak (tensors kept across steps?)", last,
                {"first_gb": first, "last_gb": last})])
        return []

    # -- at each evaluation
    def check_eval(self, *, step: int, eval_loss: float, train_loss: float | None) -> list[HealthEvent]:
        if "overfit" in self.warned and self.evals and eval_loss < min(e for _, e, _ in self.evals):
            self.warned.discard("overfit")  # improving again: a later episode gets its own warning
        self.evals.append((step, eval_loss, train_loss))
        n = self.c.health_overfit_evals
        if "overfit" in self.warned:
            return []
        if n < 2 or len(self.evals) < n + 1:
            return []
        recent = self.evals[-(n + 1):]
        evals = [e for _, e, _ in recent]
        trains = [t for _, _, t in recent[1:]]
        if any(t is None or not math.isfinite(t) for t in trains):
            return []
        eval_rising = all(b > a for a, b in zip(evals, evals[1:]))
        train_falling = all(b < a for a, b in zip(trains, trains[1:]))
        if eval_rising and train_falling:
            self.warned.add("overfit")
            return self._count([HealthEvent(
                step, "overfit", self.c.health_overfit_action,
                f"overfitting: eval loss rose over {n} evaluations ({evals[0]:.4g} -> {evals[-1]:.4g}) while "
                f"train loss fell ({trains[0]:.4g} -> {trains[-1]:.4g}); the best model is kept in best_model/",
                eval_loss)])
        return []

    def _count(self, events: list[HealthEvent]) -> list[HealthEvent]:
        self.num_events += len(events)
        return events

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "memory": self.memory,
                "evals": self.evals, "consecutive_nonfinite": self.consecutive_nonfinite,
                "num_rollbacks": self.num_rollbacks, "lr_scale": self.lr_scale, "peak_lr": self.peak_lr,
                "warned": sorted(self.warned), "num_events": self.num_events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.extend(state["losses"])
        self.grad_norms.extend(state["grad_norms"])
        self.memory = list(state["memory"])
        self.evals = [tuple(e) for e in state["evals"]]
        self.consecutive_nonfinite = state["consecutive_nonfinite"]
        self.num_rollbacks = state["num_rollbacks"]
        self.lr_scale = state["lr_scale"]
        self.peak_lr = state["peak_lr"]
        self.warned = set(state["warned"])
        self.num_events = state["num_events"]
