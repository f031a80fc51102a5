"""Early stopping on eval loss, with its whole state in a state_dict() so resume keeps it."""

from __future__ import annotations

import math
from typing import Any


class EarlyStopping:
    """Stop after `patience` evaluations in a row that do not beat the best by more than `min_delta`.

    The first evaluation always sets the best. `patience == 0` disables stopping (the best
    metric is still tracked, for best_model/ and rotation).
    """

    def __init__(self, *, patience: int, min_delta: float):
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.num_bad_evals = 0

    def update(self, metric: float, step: int) -> bool:
        """Record one evaluation; returns True when it is a new best."""
        if math.isfinite(metric) and (self.best is None or metric < self.best - self.min_delta):
            self.best, self.best_step, self.num_bad_evals = metric, step, 0
            return True
        self.num_bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.num_bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "num_bad_evals": self.num_bad_evals,
                "patience": self.patience, "min_delta": self.min_delta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.best_step = state["best_step"]
        self.num_bad_evals = state["num_bad_evals"]
