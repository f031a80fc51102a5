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
    before a resume that the resumed run redoes."""

    def __init__(self, run_dir: Path, names: list[str], *, config: dict[str, Any], resuming: bool,
                 skip: set[tuple[str, int]] | None = None):
        self.run_dir = Path(run_dir)
        self.skip = skip or set()
        self.wandb = self.mlflow = None
        wanted = [n for n in names if n in TRACKERS]
        if not wanted:
            return
        state = self._state() if resuming else {}
        name = self.run_dir.resolve().name
        for tracker in wanted:
            try:
                self._start(tracker, state, name, config)
            except Exception as exc:  # noqa: BLE001 - the library's own error, said in one line
                from fullscale.errors import first_line

                self.close()
                raise ConfigError(f"report_to: {tracker} cannot start a run: {first_line(exc)}. Fix its settings "
                                  f"(see fullscale.trackers), or leave {tracker} out of report_to") from None
        from fullscale.checkpoint import write_text

        write_text(self.run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")

    def _start(self, tracker: str, state: dict, name: str, config: dict[str, Any]) -> None:
        if tracker == "wandb":
            import wandb

            run_id = state.get("wandb") or uuid.uuid4().hex[:12]   # wandb ids: lowercase letters, digits
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "fullscale"), name=name, id=run_id,
                                    resume="allow", dir=str(self.run_dir), config=config, reinit="finish_previous")
            state["wandb"] = run_id
        else:
            import mlflow

            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "fullscale"))
            self.mlflow = mlflow.start_run(run_id=state.get("mlflow"), run_name=None if state.get("mlflow") else name)
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
