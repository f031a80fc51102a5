"""Fault injection for the crash-safety tests and scripts/fault_injection.py.

`FULLSCALE_FAULT=<point>@<step>[,<point>@<step>...]` makes the process SIGKILL itself (or, for
`enospc`, fail a write as a full disk would) when it reaches that point at that optimizer step.
Value faults change the run instead: `nan` (the loss of that step becomes NaN) and `lr_spike`
(the learning rate of the next update is multiplied by 100).
Points: `micro` (inside an accumulation window), `step` (after the optimizer step, before
logging), `eval` (inside an evaluation), `save_file` (a checkpoint file written, before the
others), `before_manifest`, `before_rename`, `between_renames` (the old directory moved aside, the new one
not yet in place: only when a directory is replaced, as best_model/ or an export with --force), `rename_error` (the rename of a staged directory into place fails, after the old one was moved
aside), `rotation` (while rotating), `enospc` (disk full
during a checkpoint write), `sigterm` (a SIGTERM to this process during the step, after its
backward pass, as a scheduler's preemption sends: the step's update still runs, then the save), `sigterm_eval` (a SIGTERM inside an evaluation), `sigterm_startup` (a SIGTERM while the run
starts, after the data is prepared), `main_error` (the main process fails while it decides on
the run directory, as a bug there would). Unset in normal runs: each check is one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

_SPEC = os.environ.get("FULLSCALE_FAULT", "")
_POINTS: set[tuple[str, int]] = set()
for item in filter(None, (s.strip() for s in _SPEC.split(","))):
    name, _, step = item.partition("@")
    _POINTS.add((name, int(step or 0)))

current_step = 0


def hit(point: str, step: int | None = None) -> None:
    """Kill this process (SIGKILL: no cleanup, like a crash) if `point` is armed for this step."""
    if _POINTS and (point, current_step if step is None else step) in _POINTS:
        if point == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if point == "main_error":
            raise RuntimeError("injected failure of the main process")
        if point == "rename_error":
            raise OSError(errno.EIO, "Input/output error (injected)")
        if point.startswith("sigterm"):
            _POINTS.discard((point, current_step if step is None else step))  # once: the run goes on to save
            os.kill(os.getpid(), signal.SIGTERM)
            return
        os.kill(os.getpid(), signal.SIGKILL)


def active(point: str, step: int | None = None) -> bool:
    """True once when `point` is armed for this step (for faults that change values, not kill)."""
    key = (point, current_step if step is None else step)
    if _POINTS and key in _POINTS:
        _POINTS.discard(key)
        return True
    return False


def arm(spec: str) -> None:
    """Arm faults in this process (tests that train in-process)."""
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, step = item.partition("@")
        _POINTS.add((name, int(step or 0)))
