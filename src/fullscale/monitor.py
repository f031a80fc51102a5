"""What a run reports: metrics.jsonl, TensorBoard, the console progress line, memory statistics.

Only the main process writes; other ranks get a Monitor that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from fullscale.trackers import scalars
from fullscale.units import format_duration, format_number


# ----------------------------------------------------------------------------- memory

def process_status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS: resident now, VmHWM: its peak); None without /proc."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_stats(device: torch.device) -> dict[str, float]:
    """Memory in GB. CUDA: allocated, reserved, peak, free (of the device's total_memory).
    CPU: the process's resident set and its peak."""
    gb = 1024**3
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        reserved = torch.cuda.memory_reserved(device)
        return {
            "allocated_gb": torch.cuda.memory_allocated(device) / gb,
            "reserved_gb": reserved / gb,
            "peak_gb": torch.cuda.max_memory_allocated(device) / gb,
            "free_gb": (total - reserved) / gb,
            "total_gb": total / gb,
        }
    rss = process_status_kb("VmRSS")
    peak = process_status_kb("VmHWM")
    if rss is None:
        import resource

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"rss_gb": float("nan"), "peak_gb": peak_kb / 1024**2}
    return {"rss_gb": rss / 1024**2, "peak_gb": (peak or rss) / 1024**2}


def format_memory(stats: dict[str, float]) -> str:
    if "allocated_gb" in stats:
        return (f"alloc {stats['allocated_gb']:.2f} GB, reserved {stats['reserved_gb']:.2f} GB, "
                f"peak {stats['peak_gb']:.2f} GB, free {stats['free_gb']:.2f} GB")
    return f"RSS {stats['rss_gb']:.2f} GB, peak {stats['peak_gb']:.2f} GB"


def fit_line(parts: list[str], width: int, *, keep: int = 1) -> str:
    """`parts` joined by ' | ', the last ones dropped until the line fits `width` (the first `keep`
    always stay), then cut: a line rewritten in place must never wrap."""
    parts = list(parts)
    while len(parts) > keep and len(" | ".join(parts)) > width:
        parts.pop()
    return " | ".join(parts)[:max(1, width)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": JSON has no literal for them; keep them visible
    if isinstance(value, torch.Tensor):
        return _jsonable(value.item())
    return value


# ----------------------------------------------------------------------------- monitor

class Monitor:
    """Fan-out of one event to metrics.jsonl, TensorBoard and the console."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, total_steps: int,
                 stream=None, purge_step: int | None = None, files: bool = True, trackers=None):
        self.enabled = enabled
        self.trackers = trackers   # fullscale.trackers.Trackers (wandb, mlflow), or None
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.run_dir = Path(run_dir)
        self._line_open = False
        self._memory = ""   # the last log's memory figure, shown by the live bar between logs
        self.writer = None
        self._jsonl = None
        if not enabled or not files:
            return
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "runs"), purge_step=purge_step)

    def reopen(self, *, purge_step: int, reason: str = "rollback") -> None:
        """After metrics.jsonl was rewritten (a rollback): append to the new file, purge
        TensorBoard events after `purge_step` so curves do not overlap, and continue the trackers
        (W&B, MLflow), which cannot purge, in new tracker runs from there."""
        if not self.enabled or self._jsonl is None:
            return
        if self.trackers is not None:
            self.trackers.restart(purge_step - 1, reason)
        self._jsonl.close()
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if self.writer is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer.close()
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "runs"), purge_step=purge_step)

    # -- records
    def event(self, kind: str, step: int, **values: Any) -> None:
        """One JSON line per event (train log, eval, checkpoint, resume, health, ...)."""
        if not self.enabled or self._jsonl is None:
            return
        record = {"event": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in values.items()})
        try:
            self._jsonl.write(json.dumps(record) + "\n")
        except OSError as exc:
            from fullscale.checkpoint import disk_error, is_disk_error

            if is_disk_error(exc):
                raise disk_error(self.run_dir, exc, what="metrics.jsonl") from None
            raise
        tags = scalars(kind, values)
        if self.writer is not None:
            for tag, v in tags.items():
                self.writer.add_scalar(tag, v, step)
        if self.trackers is not None and tags:
            self.trackers.log(kind, step, tags)

    def text(self, tag: str, text: str, step: int) -> None:
        """A text record for TensorBoard (sample generations)."""
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)
        if self.enabled and self.trackers is not None:
            self.trackers.text(tag, text, step)

    # -- console
    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def columns(self) -> int:
        """The terminal's width now (it may be resized during a run); 80 when unknown."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return 80

    def progress(self, step: int, *, loss: float, lr: float, tokens_per_s: float, eta_s: float,
                 memory: dict[str, float], epoch: float, grad_norm: float | None = None) -> None:
        """The line of a log step: one plain line each (a pipe, `| tee`, a log file get one line per
        log step); on a terminal it is fitted to the width, above the live bar."""
        if not self.enabled:
            return
        width = len(str(self.total_steps))
        mem = memory.get("allocated_gb", memory.get("rss_gb", float("nan")))
        self._memory = f"mem {mem:.2f} GB"
        parts = [f"step {step:>{width}}/{self.total_steps}", f"loss {format_number(loss)}", f"epoch {epoch:.2f}",
                 f"ETA {format_duration(eta_s)}", f"{tokens_per_s:,.0f} tok/s", f"lr {lr:.3g}", self._memory,
                 *([f"gnorm {format_number(grad_norm)}"] if grad_norm is not None else [])]
        if self.is_tty:
            self.stream.write("\r\x1b[2K" + fit_line(parts, self.columns() - 1) + "\n")
            self._line_open = False
        else:
            order = [0, 2, 1, 5, 7, 4, 3, 6] if grad_norm is not None else [0, 2, 1, 5, 4, 3, 6]
            self.stream.write(" | ".join(parts[i] for i in order) + "\n")
        self.stream.flush()

    def tick(self, step: int, *, loss: float | None, steps_per_s: float, eta_s: float) -> None:
        """The live bar, redrawn after every step on a terminal (nothing elsewhere): the bar, the
        step, the last loss, speed, ETA and memory, fitted to the width so it never wraps."""
        if not self.enabled or not self.is_tty or not self.total_steps:
            return
        width = self.columns() - 1
        parts = [f"{step}/{self.total_steps}", f"loss {format_number(loss)}", f"ETA {format_duration(eta_s)}",
                 f"{steps_per_s:.3g} steps/s", *([self._memory] if self._memory else [])]
        bar = 20 if width >= 60 else 0   # a fixed width: the bar does not jump as the figures change
        text = fit_line(parts, width - bar - 3 if bar else width)
        if bar:
            done = int(bar * min(1.0, step / self.total_steps))
            text = f"[{'#' * done}{'.' * (bar - done)}] {text}"
        self.stream.write("\r\x1b[2K" + text[:width])
        self.stream.flush()
        self._line_open = True

    def close(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename) so a reader never sees half a file."""
    from fullscale.checkpoint import write_text

    write_text(path, json.dumps({k: _jsonable(v) for k, v in data.items()}, indent=2, default=str) + "\n")
