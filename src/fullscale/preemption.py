"""SIGTERM / SIGINT: finish the current optimizer step, save a resumable checkpoint, exit 75.

Schedulers send SIGTERM before they kill a job (Slurm with --signal, Kubernetes at the start of
terminationGracePeriodSeconds); Ctrl-C sends SIGINT. The handler only records the signal; the
loop checks the flag at step boundaries (every rank's flag travels in the step's loss reduction,
so all agree) and saves.
A second signal while saving is ignored, so it cannot corrupt the checkpoint being written.
"""

from __future__ import annotations

import signal
import sys
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; a requeue script can test for it


class StartupInterrupted(BaseException):
    """A signal came during start-up (model loading, tokenizing): nothing to save yet, exit 75.
    A BaseException, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return (f"{signal.Signals(self.signum).name} received during start-up, before the first step: nothing to save "
                "yet. Run the same command again to start (a scheduler can requeue on exit code 75)")


class PreemptionFlag:
    """The signal handler. During start-up (`starting`) a signal stops at once with
    StartupInterrupted; once the loop runs it only sets the flag the loop checks at step boundaries."""

    def __init__(self):
        self.signum: int | None = None
        self.starting = True
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.starting:
            raise StartupInterrupted(signum)
        if self.signum is None:
            self.signum = signum
            name = signal.Signals(signum).name
            print(f"\nfullscale: {name} received; finishing this step, then saving a resumable checkpoint",
                  file=sys.stderr, flush=True)
        else:
            print("fullscale: already stopping; the checkpoint is being written, please wait",
                  file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def raised(self) -> bool:
        """A signal came to this process."""
        return self.signum is not None

    def agreed(self, accelerator, device) -> bool:
        """True on every rank when any rank got a signal (one small all-reduce when distributed)."""
        import torch

        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor(1.0 if self.signum is not None else 0.0, device=device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
