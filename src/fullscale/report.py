"""`fullscale report RUN_DIR`: one self-contained HTML file with the run's plots and tables.

The file needs nothing but a browser: each plot is a matplotlib SVG inlined as a data: URI
(no scripts, no fonts or styles fetched from anywhere), so it can be mailed, attached to an
issue or opened on a machine with no network. It reads the same files as `fullscale status`
and works on a run that is still going or stopped (its curves end where the run is, the x axis
spans the planned steps) and on a run without evaluation.

Plots: train/eval loss, learning rate, grad norm, tokens/s and memory over steps, each with the
resumes (dashed purple lines) and health events (dotted red lines, labelled detector/action)
marked. Where a step appears twice in metrics.jsonl (a health rollback redid it), the later
record is the one drawn. Non-finite values are gaps in the curve and red crosses at the top.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path
from typing import Any

from fullscale.errors import UserError
from fullscale.plots import build_plots, is_number
from fullscale.status import check_run_dir, collect_status, read_json, read_metrics, to_json
from fullscale.units import format_number, format_size

MAX_TABLE_ROWS = 200       # rows of the health/resume tables


# ----------------------------------------------------------------------------- HTML

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; margin: 24px auto;
       max-width: 1320px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.state { font-size: 15px; padding: 6px 10px; border-radius: 4px; display: inline-block; background: #eef; }
.state.running, .state.starting { background: #e6f4ea; } .state.failed, .state.not-running { background: #fdecea; }
.state.stalled { background: #fff4e5; }
.muted { color: #666; font-size: 12px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 10px; margin: 14px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 10px; }
.card .k { color: #666; font-size: 12px; } .card .v { font-size: 17px; font-weight: 600; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 14px; }
figure.plot { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 6px; }
figure.plot img { width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: #555; padding: 4px 2px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #b00020; font-weight: 600; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(headers: list[str], rows: list[list[Any]], *, numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{cell}</td>" for i, cell in enumerate(row))
        + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cards(s: dict[str, Any]) -> str:
    from fullscale.units import format_duration

    step = f"{format_number(s['step'], '.4f')} / {s['total_steps'] if s['total_steps'] is not None else '?'}"
    if s["progress"] is not None:
        step += f" ({100 * s['progress']:.0f}%)"
    best = "-" if s["best_eval_loss"] is None else f"{format_number(s['best_eval_loss'], '.4f')} @ {s['best_step']}"
    items = [
        ("step", step),
        ("epoch", format_number(s["epoch"], ".2f")),
        ("train loss (last log)", format_number(s["train_loss"], ".4f")),
        ("last eval loss", format_number(s["last_eval_loss"], ".4f")),
        ("best eval loss", best),
        ("tokens/s", "-" if s["tokens_per_second"] is None else f"{s['tokens_per_second']:,.0f}"),
        ("elapsed", "-" if s["elapsed_seconds"] is None else format_duration(s["elapsed_seconds"])),
        ("ETA", "-" if s["eta_seconds"] is None else format_duration(s["eta_seconds"])),
        ("peak memory", "-" if s["peak_memory_gb"] is None else f"{format_number(s['peak_memory_gb'], '.2f')} GB"),
        ("resumes", str(s["num_resumes"] or 0)),
        ("health events", str(s["health"]["count"])),
        ("stop reason", s["stop_reason"] or "-"),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{_esc(k)}</div><div class="v">{_esc(v)}</div></div>' for k, v in items
    ) + "</div>"


def _checkpoint_table(run_dir: Path, s: dict[str, Any]) -> str:
    from fullscale.checkpoint import CheckpointManager

    try:
        infos = CheckpointManager(run_dir).list()
    except FileNotFoundError:  # rotated away while listed: the summary already has the numbers
        infos = []
    c = s["checkpoints"]
    rows = []
    for info in infos:
        notes = [n for n, on in (("best", info.step == c["best"]), ("latest", info.step == c["latest"])) if on]
        if info.reason:
            notes.append(f'<span class="bad">{_esc(info.reason)}</span>')
        valid = {True: "yes", False: '<span class="bad">NO</span>', None: "yes (unverified)"}[info.valid]
        rows.append([f"checkpoint-{info.step}", _esc(format_number(info.eval_loss, ".4f")),
                     _esc(format_size(info.size)), valid, ", ".join(notes)])
    if (run_dir / "best_model").is_dir():
        rows.append(["best_model/", _esc(format_number(s["best_eval_loss"], ".4f")),
                     _esc(format_size(c["best_model_bytes"])), "", _esc(f"the best adapter (step {s['best_step']})")])
    if not rows:
        return "<p>No checkpoints yet.</p>"
    return (_table(["checkpoint", "eval loss", "size", "valid", "notes"], rows, numeric={1, 2})
            + f'<p class="muted">{_esc(format_size(c["run_dir_bytes"]))} in the run directory.</p>'
            + _best_at_step_0(s))


def _best_at_step_0(s: dict[str, Any]) -> str:
    """Why the best model is the base model, when no evaluation improved on step 0's."""
    if s["best_step"] != 0 or not s["step"]:
        return ""
    return ('<p class="bad">The best evaluation is still the one at step 0, before any training: no later '
            'evaluation improved on it by more than early_stopping_min_delta. best_model/ therefore holds the '
            "adapter of step 0, whose B matrices are zero, so an export or merge of the best model gives the base "
            "model back. Lower the learning rate, train longer, or check the data; "
            "<code>fullscale export RUN --checkpoint latest</code> exports the last adapter instead.</p>")


def _events_tables(s: dict[str, Any], records: list[dict[str, Any]]) -> str:
    out = []
    health = [r for r in records if r.get("event") == "health"]
    if health:
        rows = [[_esc(r.get("step")), _esc(r.get("detector")), _esc(r.get("action")),
                 _esc(format_number(r.get("value"), ".4g")), _esc(r.get("message", ""))]
                for r in health[-MAX_TABLE_ROWS:]]
        more = f" (the last {MAX_TABLE_ROWS} of {len(health)})" if len(health) > MAX_TABLE_ROWS else ""
        out.append(f"<h3>Health events{more}</h3>"
                   + _table(["step", "detector", "action", "value", "message"], rows, numeric={0, 3}))
    else:
        out.append("<p>No health events.</p>")
    if s["resumes"]:
        rows = [[_esc(r["from_step"]), _esc(r["checkpoint"]), _esc(r["reason"]), _esc(r["steps_redone"]),
                 _esc(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"])) if is_number(r["time"]) else "-")]
                for r in s["resumes"][-MAX_TABLE_ROWS:]]
        out.append("<h3>Resumes</h3>" + _table(["from step", "checkpoint", "reason", "steps redone", "at"], rows,
                                               numeric={0, 3}))
    return "".join(out)


def _key_value_table(data: dict[str, Any], fmt: str = ".4g") -> str:
    rows = [[f"<code>{_esc(k)}</code>", _esc(format_number(v, fmt))] for k, v in data.items()]
    return _table(["key", "value"], rows)


def _config_tables(config: dict[str, Any]) -> str:
    """The keys the run set (values other than the defaults) first, the defaults folded below."""
    from fullscale.config import FIELDS

    def default(key):
        f = FIELDS.get(key)
        if f is None:
            return object()
        return f.default_factory() if callable(getattr(f, "default_factory", None)) else f.default

    chosen = {k: v for k, v in config.items() if v != default(k)}
    rest = {k: v for k, v in config.items() if k not in chosen}
    return (f"<h3>Set for this run ({len(chosen)})</h3>" + _key_value_table(chosen)
            + f"<details><summary>defaults ({len(rest)} keys)</summary>{_key_value_table(rest)}</details>")


def _samples_table(records: list[dict[str, Any]]) -> str:
    """The generations of the first and the latest evaluation that made some (eval_samples)."""
    samples = [r for r in records if r.get("event") == "sample"]
    if not samples:
        return "<p>No sample generations (eval_samples: 0, or no evaluation yet).</p>"
    steps = sorted({r["step"] for r in samples})
    shown = [steps[0]] + ([steps[-1]] if steps[-1] != steps[0] else [])
    rows = [[_esc(r["step"]), _esc(r.get("row")), _esc(r.get("prompt", "")[-200:]), _esc(r.get("output", "")),
             _esc(r.get("expected", ""))] for r in samples if r["step"] in shown]
    return (_table(["step", "eval row", "prompt", "model", "expected"], rows, numeric={0, 1})
            + f'<p class="muted">Greedy, at the first and the latest evaluation of {len(steps)}; every one is in '
              "metrics.jsonl (\"sample\" events) and TensorBoard (text).</p>")


def _config(run_dir: Path) -> dict[str, Any] | None:
    import yaml

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def render_html(run_dir: Path, *, status: dict[str, Any], records: list[dict[str, Any]],
                plots: list[tuple[str, str, str]]) -> str:
    name = run_dir.resolve().name
    result = read_json(run_dir / "training_result.json")
    config = _config(run_dir)
    state_class = status["state"].replace(" ", "-")
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    figures = "".join(
        f'<figure class="plot" id="plot-{pid}"><img alt="{_esc(caption)}" src="{uri}">'
        f"<figcaption>{_esc(caption)}</figcaption></figure>" for pid, caption, uri in plots)
    if result:
        result_html = _key_value_table({k: v for k, v in result.items() if k != "config"})
    else:
        result_html = "<p>No training_result.json yet: the run has not finished.</p>"
    config_html = _config_tables(config) if config else "<p>No config.yaml.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="{GENERATOR}">
<title>fullscale report: {_esc(name)}</title>
<style>{CSS}</style></head>
<body>
<h1>fullscale run <code>{_esc(name)}</code></h1>
<div class="muted">{_esc(run_dir.resolve())} &middot; report generated {_esc(generated)}</div>
<p><span class="state {_esc(state_class)}" id="run-state">{_esc(status['detail'])}</span></p>
{_cards(status)}
<h2>Curves</h2>
<p class="muted">Dashed purple lines: resumes (from the step of the checkpoint loaded). Dotted red lines with a
&#9660; at the top: health events, labelled detector/action. Red crosses at the top: non-finite values.</p>
<div class="plots">{figures}</div>
<h2>Result</h2>
{result_html}
<h2>Sample generations</h2>
{_samples_table(records)}
<h2>Checkpoints</h2>
{_checkpoint_table(run_dir, status)}
<h2>Events</h2>
{_events_tables(status, records)}
<h2>Config</h2>
{config_html}
<h2>Status (as <code>fullscale status --json</code>)</h2>
<details><summary>show</summary><pre>{_esc(to_json(status))}</pre></details>
</body></html>
"""


def build_report(run_dir: str | os.PathLike, *, out: str | os.PathLike | None = None,
                 log_loss: bool = False) -> Path:
    """Write the HTML report of `run_dir` (default RUN_DIR/report.html) atomically; returns its path.
    `log_loss`: the loss plot on a log axis."""
    run = check_run_dir(run_dir)
    status = collect_status(run)
    records = read_metrics(run)
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    last = max(steps, default=0)
    planned = status["total_steps"] if isinstance(status["total_steps"], int) else 0
    # Until a run has finished, its curves end where it is, on an axis that spans the planned steps.
    xmax = last if status["state"] == "finished" else max(last, planned)
    plots = build_plots(records, xmax=xmax or None, log_loss=log_loss)
    text = render_html(run, status=status, records=records, plots=plots)
    path = Path(out) if out else run / "report.html"
    check_report_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write the report {path}: {exc.strerror or exc}; choose another --out") from None
    return path


GENERATOR = "fullscale report"


class ReportError(UserError):
    """The report cannot be written where asked."""


def check_report_path(path: Path) -> None:
    """The report writes only a new file or a previous fullscale report, and inside a run directory
    only its top-level report.html: never a user's file, a directory, or a file of a run."""
    from fullscale import rundir

    if path.is_dir():
        raise ReportError(f"--out {path} is a directory; give the path of an HTML file, e.g. {path / 'report.html'}")
    run = rundir.inside_run(path.parent) if path.parent.exists() else None
    if run is not None and (path.resolve().parent != run or path.name != "report.html"):
        raise ReportError(f"--out {path} is inside the run directory {run}, whose files are fullscale's records; "
                          f"write the report outside it, or to {run / 'report.html'} (the default)")
    if path.exists():
        try:
            with open(path, "rb") as fh:
                head = fh.read(2048).decode("utf-8", errors="replace")
        except OSError:
            head = ""
        if f'content="{GENERATOR}"' not in head and "<title>fullscale report" not in head:   # (older reports)
            raise ReportError(f"--out {path} exists and is not a fullscale report; fullscale does not write over "
                              "other files. Choose another --out (or remove that file yourself)")

