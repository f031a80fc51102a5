"""`fullscale status RUN_DIR`: where a run stands, read from its files while it runs or after.

Everything comes from the run directory, so it works from another terminal, another process or
after the run: status.json (rewritten atomically at every log), metrics.jsonl (which may end in
a half-written line while the run writes it), the checkpoint directories and
training_result.json. Nothing here writes to the run directory.

Whether a run is alive: status.json names the pid and host of the process that writes it.
On the same host the process is checked directly (a process that exited, a zombie, or a newer
process that reuses the pid are all "gone"). On another host only the heartbeat can tell: a
"running" status not rewritten for longer than `stale_after()` means the run died.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from fullscale.errors import CheckpointError
from fullscale.units import format_duration, format_number, format_size

STALE_FLOOR_SECONDS = 15 * 60   # never call a run dead sooner than this without seeing its process
STALE_FACTOR = 3                # ... nor sooner than this many times the longest gap between its records
NUM_RECENT_HEALTH = 5           # health events shown in full (all are counted)
RUN_FILES = ("config.yaml", "status.json", "metrics.jsonl")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "Infinity": math.inf, "-Infinity": -math.inf}


# ----------------------------------------------------------------------------- reading the run directory

def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """The run directory as a Path; CheckpointError when it is not one."""
    path = Path(run_dir)
    hint = "give the output_dir of a run started with fullscale train"
    if not path.is_dir():
        raise CheckpointError(f"no such run directory: {path}; {hint}")
    if not any((path / name).is_file() for name in RUN_FILES):
        raise CheckpointError(f"{path} is not a fullscale run directory (it has none of {', '.join(RUN_FILES)}); "
                              f"{hint}")
    return path


def _finite_or_float(value: Any) -> Any:
    """metrics.jsonl writes nan/inf as strings (JSON has no literal for them); read them back as floats."""
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, list):
        return [_finite_or_float(v) for v in value]
    return value


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of metrics.jsonl in file order, with "nan"/"inf" read back as floats.

    A line that does not parse (the run is writing it, or a kill cut it) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        text = path.read_text()
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "event" in rec:
            records.append({k: _finite_or_float(v) for k, v in rec.items()})
    return records


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {k: _finite_or_float(v) for k, v in data.items()}


def checkpoint_summary(run_dir: Path) -> dict[str, Any]:
    """Count, steps, latest, best and disk use of the run's checkpoints.

    The run may rotate a checkpoint away while we list it, so a listing that meets a vanishing
    file is simply taken again."""
    from fullscale.checkpoint import CheckpointManager, dir_size

    manager = CheckpointManager(run_dir)
    for attempt in range(3):
        try:
            infos = manager.list()
            valid = [i for i in infos if i.valid is not False]
            best = manager.best_step()
            return {
                "count": len(valid),
                "steps": [i.step for i in valid],
                "invalid": [{"step": i.step, "reason": i.reason} for i in infos if i.valid is False],
                "latest": valid[-1].step if valid else None,
                "best": best if best in {i.step for i in valid} else None,
                "eval_losses": {str(i.step): i.eval_loss for i in valid},
                "sizes": {str(i.step): i.size for i in valid},
                "checkpoints_bytes": sum(i.size for i in infos),
                "best_model_bytes": dir_size(run_dir / "best_model") if (run_dir / "best_model").is_dir() else 0,
                "run_dir_bytes": manager.disk_usage(),
            }
        except FileNotFoundError:
            if attempt == 2:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- is it alive?

def process_alive(pid: int, *, updated: float | None) -> bool:
    """True when `pid` runs on this host and is the process that wrote a status at `updated`: not
    gone, not a zombie (exited, not yet reaped), not a newer process that reuses the pid."""
    import psutil

    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        start = process.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:   # exists, but not ours to inspect
        return True
    return not (updated is not None and start > updated + 2.0)


def stale_after(records: list[dict[str, Any]]) -> float:
    """Seconds without a status update after which a run on another host is taken as dead:
    STALE_FACTOR times the longest gap between consecutive records (an evaluation or a
    checkpoint save makes gaps), and never less than STALE_FLOOR_SECONDS."""
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    longest = max((b - a for a, b in zip(times, times[1:])), default=0.0)
    return max(STALE_FLOOR_SECONDS, STALE_FACTOR * longest)


def format_ago(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def liveness(status: dict[str, Any], records: list[dict[str, Any]], *, now: float,
             run_dir: str = "RUN_DIR") -> tuple[str, bool, str]:
    """(state, running, detail) from status.json's phase, pid, host and heartbeat.

    state is one of running, stalled, not running, finished, stopped, failed, unknown."""
    phase = status.get("phase")
    updated = status.get("updated") if isinstance(status.get("updated"), (int, float)) else None
    age = now - updated if updated is not None else None
    ago = f"last update {format_ago(age)} ago"
    if phase == "finished":
        return "finished", False, f"finished ({status.get('stop_reason') or '?'}; {ago})"
    if phase == "stopped":
        return "stopped", False, (f"stopped ({status.get('stop_reason') or '?'}; {ago}); resumable: "
                                  f"fullscale resume {run_dir}")
    if phase == "failed":
        return "failed", False, f"failed ({ago}): {status.get('error') or 'unknown error'}"
    if phase not in ("starting", "running"):
        if updated is None:
            return "unknown", False, "no status yet (the run has not reached its first step)"
        return "unknown", False, f"unknown (no status.json; {ago})"
    pid, host = status.get("pid"), status.get("host")
    if host == socket.gethostname():
        if not process_alive(pid, updated=updated):
            return "not running", False, f"not running (process gone; {ago})"
        if age is not None and age > stale_after(records):
            return "stalled", True, f"stalled? (process {pid} is alive but wrote nothing for {format_ago(age)})"
        return phase, True, f"{phase} (pid {pid}, {ago})"
    if age is None or age > stale_after(records):
        return "not running", False, f"not running (heartbeat stale: {ago}; the run was on host {host})"
    return phase, True, f"{phase} on host {host} (pid {pid}, {ago})"


# ----------------------------------------------------------------------------- the status

def _last(records: list[dict[str, Any]], event: str) -> dict[str, Any] | None:
    return next((r for r in reversed(records) if r.get("event") == event), None)


def _from_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What status.json would say, rebuilt from metrics.jsonl (for a run that has no status.json)."""
    out: dict[str, Any] = {}
    start, train, ev, end = (_last(records, e) for e in ("train_start", "train", "eval", "train_end"))
    if start:
        out.update(step=0, total_steps=start.get("total_steps"))
    if train:
        out.update(step=train["step"], epoch=train.get("epoch"), train_loss=train.get("loss"),
                   last_train_loss=(train.get("step_losses") or [train.get("loss")])[-1],
                   learning_rate=train.get("learning_rate"), tokens_per_second=train.get("tokens_per_second"),
                   peak_memory_gb=train.get("peak_gb"), updated=train.get("time"))
    if ev:
        out.update(last_eval_loss=ev.get("eval_loss"), best_eval_loss=ev.get("best_eval_loss"),
                   best_step=ev.get("best_step"))
    if end:
        out.update(stop_reason=end.get("stop_reason"), step=end["step"], updated=end.get("time"))
    return out


def collect_status(run_dir: str | os.PathLike, *, now: float | None = None) -> dict[str, Any]:
    """Everything `fullscale status` shows, as one JSON-able dict (non-finite numbers as floats)."""
    run = check_run_dir(run_dir)
    now = time.time() if now is None else now
    records = read_metrics(run)
    saved = read_json(run / "status.json")
    result = read_json(run / "training_result.json")
    values = _from_metrics(records)
    if saved:
        values.update({k: v for k, v in saved.items() if v is not None})
    else:
        values["phase"] = "finished" if _last(records, "train_end") else None
    state, running, detail = liveness(values, records, now=now, run_dir=str(run))

    eta = values.get("eta_seconds")
    if running and isinstance(eta, (int, float)) and isinstance(values.get("updated"), (int, float)):
        eta = max(0.0, eta - (now - values["updated"]))  # status.json's ETA was computed at its update
    elif not running:
        eta = None
    health = [r for r in records if r.get("event") == "health"]
    by_detector: dict[str, int] = {}
    for h in health:
        by_detector[str(h.get("detector"))] = by_detector.get(str(h.get("detector")), 0) + 1
    resumes = [r for r in records if r.get("event") == "resume"]
    step, total = values.get("step"), values.get("total_steps")
    return {
        "run_dir": str(run),
        "state": state,
        "running": running,
        "detail": detail,
        "phase": values.get("phase"),
        "pid": values.get("pid"),
        "host": values.get("host"),
        "updated": values.get("updated"),
        "seconds_since_update": now - values["updated"] if isinstance(values.get("updated"), (int, float)) else None,
        "step": step,
        "total_steps": total,
        "progress": step / total if isinstance(step, int) and isinstance(total, int) and total > 0 else None,
        "epoch": values.get("epoch"),
        "last_train_loss": values.get("last_train_loss"),
        "train_loss": values.get("train_loss", values.get("last_train_loss")),
        "last_eval_loss": values.get("last_eval_loss"),
        "best_eval_loss": values.get("best_eval_loss"),
        "best_step": values.get("best_step"),
        "learning_rate": values.get("learning_rate"),
        "tokens_per_second": values.get("tokens_per_second"),
        "elapsed_seconds": values.get("elapsed_seconds"),
        "eta_seconds": eta,
        "peak_memory_gb": values.get("peak_memory_gb"),
        "num_resumes": values.get("num_resumes", len(resumes)),
        "stop_reason": values.get("stop_reason"),
        "error": values.get("error"),
        "checkpoints": checkpoint_summary(run),
        "health": {"count": len(health), "by_detector": by_detector, "recent": health[-NUM_RECENT_HEALTH:]},
        "resumes": [{k: r.get(k) for k in ("step", "from_step", "steps_redone", "checkpoint", "reason", "time")}
                    for r in resumes],
        "has_result": result is not None,
    }


def to_json(status: dict[str, Any]) -> str:
    """One JSON object; nan/inf written as the strings metrics.jsonl uses."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(status), indent=2, default=str)


# ----------------------------------------------------------------------------- text

def format_status(s: dict[str, Any]) -> str:
    """The status as a few aligned lines for a terminal."""

    lines = [f"{s['run_dir']}: {s['detail']}"]

    def row(name: str, text: str) -> None:
        lines.append(f"  {name:<12} {text}")

    if s["step"] is not None:
        total = s["total_steps"] if s["total_steps"] is not None else "?"
        pct = f" ({100 * s['progress']:.1f}%)" if s["progress"] is not None else ""
        epoch = f", epoch {s['epoch']:.2f}" if isinstance(s["epoch"], (int, float)) else ""
        row("step", f"{s['step']}/{total}{pct}{epoch}")
    row("train loss", f"{format_number(s['train_loss'], '.4f')} (mean of the last logged steps)")
    no_eval = s["last_eval_loss"] is None
    row("eval loss", "- (no evaluation yet)" if no_eval else f"{format_number(s['last_eval_loss'], '.4f')} (last)")
    if s["best_eval_loss"] is not None:
        row("best eval", f"{format_number(s['best_eval_loss'], '.4f')} at step {s['best_step']}")
    speed = []
    if s["tokens_per_second"] is not None:
        speed.append(f"{s['tokens_per_second']:,.0f} tokens/s")
    if s["elapsed_seconds"] is not None:
        speed.append(f"elapsed {format_duration(s['elapsed_seconds'])}")
    if s["eta_seconds"] is not None:
        finish = time.strftime("%H:%M", time.localtime(time.time() + s["eta_seconds"]))
        speed.append(f"ETA {format_duration(s['eta_seconds'])} (about {finish})")
    if speed:
        row("speed", "; ".join(speed))
    if s["learning_rate"] is not None:
        row("lr", format_number(s["learning_rate"], ".3g"))
    if s["peak_memory_gb"] is not None:
        row("peak memory", f"{format_number(s['peak_memory_gb'], '.2f')} GB")
    if s["num_resumes"]:
        last = s["resumes"][-1] if s["resumes"] else None
        row("resumes", f"{s['num_resumes']}" + (f" (last from {last['checkpoint']}, {last['reason']})" if last else ""))
    c = s["checkpoints"]
    if c["count"]:
        if c["best"] is not None:
            best = f"checkpoint-{c['best']}"
        elif s["best_step"] is not None and c["best_model_bytes"]:
            best = f"step {s['best_step']} kept in best_model/ only"
        else:
            best = "-"
        row("checkpoints", f"{c['count']} (latest checkpoint-{c['latest']}, best {best}); "
                           f"{format_size(c['checkpoints_bytes'])} in checkpoints, "
                           f"{format_size(c['run_dir_bytes'])} in the run directory")
    else:
        row("checkpoints", f"none yet; {format_size(c['run_dir_bytes'])} in the run directory")
    for bad in c["invalid"]:
        row("", f"checkpoint-{bad['step']} is not usable: {bad['reason']}")
    h = s["health"]
    if h["count"]:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(h["by_detector"].items()))
        row("health", f"{h['count']} event{'s' if h['count'] != 1 else ''} ({kinds}); last {len(h['recent'])}:")
        for e in h["recent"]:
            row("", f"step {e.get('step')}: {e.get('detector')} -> {e.get('action')}: {e.get('message', '')}")
    else:
        row("health", "no events")
    if s["stop_reason"]:
        row("stop reason", str(s["stop_reason"]))
    return "\n".join(lines)
