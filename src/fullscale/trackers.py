"""Experiment trackers besides TensorBoard: Weights & Biases and MLflow, as `report_to` names them.

Each gets the scalars TensorBoard gets (the "train" and "eval" events, one tag per value: loss,
learning_rate, grad_norm, tokens_per_second, memory; eval/loss, eval/perplexity, ...) at the
same steps, and the sample generations as text. One tracker run per fullscale run: its id is kept
in RUN_DIR/trackers.json and a resume continues that run. The steps a resume redoes were logged
before the kill with the very values the resumed run computes (resume is exact), so they are
not logged twice: wandb's steps only go forward, and a chart must not hold a step twice.

Offline use is each library's own: WANDB_MODE=offline (then `wandb sync`), an MLflow file store
(MLFLOW_TRACKING_URI=file:./mlruns, MLflow's default). WANDB_PROJECT and MLFLOW_EXPERIMENT_NAME
name the project (default "fullscale"). The library itself is imported only when named.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from fullscale.errors import ConfigError

TRACKERS = ("wandb", "mlflow")
STATE_FILE = "trackers.json"
SCALAR_EVENTS = ("train", "eval")   # what TensorBoard and the trackers chart; other events are records


def scalars(kind: str, values: dict[str, Any]) -> dict[str, float]:
    """The chartable values of an event as tags: train/loss, eval/loss (not eval/eval_loss), ..."""
    if kind not in SCALAR_EVENTS:
        return {}
    out = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            name = key[len(kind) + 1:] if key.startswith(f"{kind}_") else key
            out[f"{kind}/{name}"] = value
    return out


class Trackers:
    """The trackers of one run on the main process; `skip` holds the (event, step) pairs logged
    before a resume that the resumed run redoes.

    A tracker cannot take back what it has: W&B drops a step at or below its last one, MLflow
    keeps both points. So when the steps after some step will not be the ones logged (a rollback
    redoes them at a lower learning rate, a force_resume continues with other settings), the
    trackers continue in a new tracker run from there (`restart`; `new_segment` at the start),
    grouped with the run's earlier ones (W&B group, MLflow tag fullscale.run) and listed in
    trackers.json under "segments"."""

    def __init__(self, run_dir: Path, names: list[str], *, config: dict[str, Any], resuming: bool,
                 skip: set[tuple[str, int]] | None = None, new_segment: str | None = None):
        self.run_dir = Path(run_dir)
        self.skip = skip or set()
        self.wandb = self.mlflow = None
        self.wanted = [n for n in names if n in TRACKERS]
        self.config = config
        self.name = self.run_dir.resolve().name
        if not self.wanted:
            return
        state = self._state() if resuming else {}
        if resuming and new_segment:
            state = self._new_segment(state)
            self.skip = set()
        self._start_all(state, self.name if not new_segment else f"{self.name} ({new_segment})")

    def _new_segment(self, state: dict) -> dict:
        """The tracker runs so far moved to state["segments"]; the next ones start fresh."""
        current = {k: state[k] for k in TRACKERS if k in state}
        segments = list(state.get("segments", []))
        if current:
            segments.append(current)
        return {"segments": segments}

    def _start_all(self, state: dict, name: str) -> None:
        for tracker in self.wanted:
            try:
                self._start(tracker, state, name, self.config)
            except Exception as exc:  # noqa: BLE001 - the library's own error, said in one line
                from fullscale.errors import first_line

                self.close()
                raise ConfigError(f"report_to: {tracker} cannot start a run: {first_line(exc)}. Fix its settings "
                                  f"(see fullscale.trackers), or leave {tracker} out of report_to") from None
        from fullscale.checkpoint import write_text

        write_text(self.run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")

    def restart(self, step: int, reason: str) -> None:
        """Continue in new tracker runs from `step` on (what came after it is being redone with other
        values); a tracker that fails to start is dropped with a warning, as during the run."""
        if not self.wanted:
            return
        self.close()
        self.skip = {(kind, s) for kind, s in self.skip if s <= step}
        state = self._new_segment(self._state())
        try:
            self._start_all(state, f"{self.name} (from step {step}: {reason})")
        except ConfigError as exc:
            print(f"warning: {exc}; the trackers get nothing more from this run (metrics.jsonl and TensorBoard "
                  "have everything)", file=sys.stderr)
            self.wanted = []

    def _start(self, tracker: str, state: dict, name: str, config: dict[str, Any]) -> None:
        if tracker == "wandb":
            import wandb

            run_id = state.get("wandb") or uuid.uuid4().hex[:12]   # wandb ids: lowercase letters, digits
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "fullscale"), name=name, id=run_id,
                                    group=self.name, resume="allow", dir=str(self.run_dir), config=config,
                                    reinit="finish_previous")
            state["wandb"] = run_id
        else:
            import mlflow

            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "fullscale"))
            self.mlflow = mlflow.start_run(run_id=state.get("mlflow"), run_name=None if state.get("mlflow") else name,
                                           tags=None if state.get("mlflow") else {"fullscale.run": self.name})
            if "mlflow" not in state:
                mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                                   for k, v in config.items()})
            state["mlflow"] = self.mlflow.info.run_id

    def _state(self) -> dict[str, str]:
        try:
            state = json.loads((self.run_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def log(self, kind: str, step: int, tags: dict[str, float]) -> None:
        """The chartable values of one event, as scalars() tags them."""
        if not tags or (kind, step) in self.skip:
            return
        self._guard("wandb", lambda: self.wandb.log(tags, step=step))
        self._guard("mlflow", lambda: __import__("mlflow").log_metrics({k: float(v) for k, v in tags.items()},
                                                                      step=step))

    def _guard(self, tracker: str, call) -> None:
        """A tracker that fails while the run goes on (network, quota) is dropped with one warning:
        metrics.jsonl and TensorBoard keep everything, and training never stops for a chart."""
        if getattr(self, tracker) is None:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001
            from fullscale.errors import first_line

            print(f"warning: report_to {tracker} failed ({first_line(exc)}); it gets nothing more from this run "
                  "(metrics.jsonl and TensorBoard have everything)", file=sys.stderr)
            setattr(self, tracker, None)

    def text(self, tag: str, text: str, step: int) -> None:
        if ("sample", step) in self.skip:
            return
        self._guard("wandb", lambda: self.wandb.log({tag: __import__("wandb").Html(f"<pre>{text}</pre>")}, step=step))
        self._guard("mlflow", lambda: __import__("mlflow").log_text(text, f"{tag}/step-{step}.md"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.mlflow is not None:
            import mlflow

            mlflow.end_run()
            self.mlflow = None
