"""The report's plots: curves from metrics.jsonl (a redone step's later record drawn, non-finite
values as gaps and red crosses at the top, long curves thinned to each bucket's min and max), with
the resumes (dashed purple lines) and health events (dotted red lines, labelled detector/action)
marked; each a matplotlib SVG as a data: URI."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

MAX_POINTS = 4000          # per curve; longer curves keep each bucket's min and max (spikes stay visible)
MAX_EVENT_LABELS = 8       # labelled markers per plot; further events are drawn unlabelled
RESUME_COLOR, HEALTH_COLOR = "#7b3fb5", "#d62728"

Series = tuple[list[float], list[float]]


# ----------------------------------------------------------------------------- series from metrics.jsonl

def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _series(records: list[dict[str, Any]], event: str, key: str) -> Series:
    """(steps, values) of `key` in `event` records, one value per step (the later record wins)."""
    by_step: dict[int, float] = {}
    for r in records:
        if r.get("event") == event and is_number(r.get(key)) and isinstance(r.get("step"), int):
            by_step[r["step"]] = float(r[key])
    steps = sorted(by_step)
    return [float(s) for s in steps], [by_step[s] for s in steps]


def _per_step_losses(records: list[dict[str, Any]]) -> Series:
    """Every step's train loss: a train record at step s with k step_losses covers steps s-k+1..s."""
    by_step: dict[int, float] = {}
    for r in records:
        losses = r.get("step_losses")
        if r.get("event") == "train" and isinstance(losses, list) and isinstance(r.get("step"), int):
            first = r["step"] - len(losses) + 1
            for i, loss in enumerate(losses):
                if is_number(loss):
                    by_step[first + i] = float(loss)
    steps = sorted(by_step)
    return [float(s) for s in steps], [by_step[s] for s in steps]


def _thin(xs: list[float], ys: list[float], max_points: int = MAX_POINTS) -> Series:
    """At most ~max_points points: each bucket keeps its min and max (a spike is never thinned away)."""
    if len(xs) <= max_points:
        return xs, ys
    bucket = math.ceil(len(xs) / (max_points // 2))
    out_x, out_y = [], []
    for i in range(0, len(xs), bucket):
        chunk = [(y, x) for x, y in zip(xs[i:i + bucket], ys[i:i + bucket]) if math.isfinite(y)]
        if not chunk:
            out_x.append(xs[i])
            out_y.append(math.nan)
            continue
        lo, hi = min(chunk), max(chunk)
        for y, x in sorted({lo, hi}, key=lambda p: p[1]):
            out_x.append(x)
            out_y.append(y)
    return out_x, out_y


# ----------------------------------------------------------------------------- plots

def _svg_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _label(ax, step: float, y: float, text: str, *, color: str, va: str) -> None:
    """A vertical label just right of the event line at `step` (y in axes fraction)."""
    ax.annotate(text, xy=(step, y), xycoords=ax.get_xaxis_transform(), xytext=(2, 0), textcoords="offset points",
                rotation=90, ha="left", va=va, fontsize=7.5, color=color,
                bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.75})


class _Plotter:
    """Builds each plot as a matplotlib Figure (no pyplot: no global state, no GUI backend)."""

    def __init__(self, records: list[dict[str, Any]], *, xmax: float | None, log_loss: bool = False):
        self.records = records
        self.xmax = xmax
        self.log_loss = log_loss
        self.resumes = [r for r in records if r.get("event") == "resume"]
        self.health = [r for r in records if r.get("event") == "health"]

    def new(self, title: str, ylabel: str):
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        fig = Figure(figsize=(6.4, 3.3), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        return fig, ax

    def finish(self, fig, ax, *, has_data: bool, empty_text: str) -> str:
        if not has_data:
            ax.text(0.5, 0.5, empty_text, transform=ax.transAxes, ha="center", va="center", color="#666")
        if self.xmax:
            ax.set_xlim(0, self.xmax)
        handles = ax.get_legend_handles_labels()[0] + self._mark_events(ax)
        if handles:
            ax.legend(handles=handles, fontsize=8, loc="best")
        return _svg_data_uri(fig)

    def _mark_events(self, ax) -> list:
        """Draw the resume and health markers; returns their legend entries."""
        from matplotlib.lines import Line2D

        top = ax.get_xaxis_transform()   # x in data, y in axes fraction
        for i, r in enumerate(self.resumes):
            step = r.get("from_step", r.get("step"))
            ax.axvline(step, color=RESUME_COLOR, linestyle="--", linewidth=1.2)
            if i < MAX_EVENT_LABELS:
                _label(ax, step, 0.98, f"resume @{step}", color=RESUME_COLOR, va="top")
        for i, r in enumerate(self.health):
            step = r.get("step")
            if not is_number(step):
                continue
            ax.axvline(step, color=HEALTH_COLOR, linestyle=":", linewidth=1.2)
            ax.plot([step], [1.0], marker="v", color=HEALTH_COLOR, transform=top, clip_on=False, markersize=6)
            if i < MAX_EVENT_LABELS:
                _label(ax, step, 0.02, f"{r.get('detector')}/{r.get('action')}", color=HEALTH_COLOR, va="bottom")
        entries = []
        if self.resumes:
            entries.append(Line2D([], [], color=RESUME_COLOR, linestyle="--", label="resume"))
        if self.health:
            entries.append(Line2D([], [], color=HEALTH_COLOR, linestyle=":", marker="v", label="health event"))
        return entries

    def curve(self, ax, xs: list[float], ys: list[float], **style) -> bool:
        """Draw one curve (thinned); non-finite values are gaps plus red crosses at the top."""
        if not xs:
            return False
        bad = [x for x, y in zip(xs, ys) if not math.isfinite(y)]
        tx, ty = _thin(xs, [y if math.isfinite(y) else math.nan for y in ys])
        ax.plot(tx, ty, **style)
        if len([y for y in ys if math.isfinite(y)]) == 1:  # a lone point draws no line
            ax.plot(tx, ty, linestyle="none", marker="o", color=ax.lines[-1].get_color())
        if bad:
            ax.plot(bad, [0.97] * len(bad), linestyle="none", marker="x", color=HEALTH_COLOR,
                    transform=ax.get_xaxis_transform(), clip_on=False, label=f"non-finite ({len(bad)})")
        return True

    # -- the plots
    def loss(self) -> str:
        fig, ax = self.new("Loss", "loss")
        xs, ys = _per_step_losses(self.records)
        lx, ly = _series(self.records, "train", "loss")
        if len(lx) == len(xs):  # a log every step: the logged means are the step losses
            drawn = self.curve(ax, xs, ys, color="#1f77b4", linewidth=1.4, label="train")
        else:
            drawn = self.curve(ax, xs, ys, color="#1f77b4", alpha=0.35, linewidth=0.8, label="train (each step)")
            drawn |= self.curve(ax, lx, ly, color="#1f77b4", linewidth=1.6, label="train (logged mean)")
        ex, ey = _series(self.records, "eval", "eval_loss")
        if self.curve(ax, ex, ey, color="#ff7f0e", linewidth=1.6, marker="o", markersize=3.5, label="eval"):
            drawn = True
            best = next((r for r in reversed(self.records) if r.get("event") == "eval"), None)
            if best and is_number(best.get("best_eval_loss")) and math.isfinite(best["best_eval_loss"]):
                label = f"best eval {best['best_eval_loss']:.4f} @ {best['best_step']}"
                ax.plot([best["best_step"]], [best["best_eval_loss"]], marker="*", markersize=13, color="#2ca02c",
                        linestyle="none", clip_on=False, label=label)
        if self.log_loss and drawn and all(y > 0 for line in ax.lines for y in line.get_ydata() if math.isfinite(y)):
            ax.set_yscale("log")   # late-run gaps between train and eval show on a log axis
        return self.finish(fig, ax, has_data=drawn, empty_text="no train or eval loss logged yet")

    def single(self, key: str, title: str, ylabel: str, color: str, *, log_when_wide: bool = False,
               smooth: int = 0) -> str:
        fig, ax = self.new(title, ylabel)
        xs, ys = _series(self.records, "train", key)
        if smooth and len(ys) > smooth:   # each log as a faint line, the running mean of `smooth` logs on top
            drawn = self.curve(ax, xs, ys, color=color, alpha=0.3, linewidth=0.8, label="each log")
            self.curve(ax, xs, _running_mean(ys, smooth), color=color, linewidth=1.6,
                       label=f"mean of {smooth} logs")
        else:
            drawn = self.curve(ax, xs, ys, color=color, linewidth=1.4)
        positive = [y for y in ys if math.isfinite(y) and y > 0]
        if log_when_wide and positive and len(positive) == len(ys) and max(positive) / min(positive) > 100:
            ax.set_yscale("log")
        return self.finish(fig, ax, has_data=drawn, empty_text=f"no {ylabel} logged yet")

    def memory(self) -> str:
        fig, ax = self.new("Memory", "GB")
        cuda = any("allocated_gb" in r for r in self.records if r.get("event") == "train")
        keys = (("allocated_gb", "allocated"), ("reserved_gb", "reserved"), ("peak_gb", "peak")) if cuda else \
               (("rss_gb", "resident (RSS)"), ("peak_gb", "peak"))
        drawn = False
        for key, label in keys:
            xs, ys = _series(self.records, "train", key)
            drawn |= self.curve(ax, xs, ys, linewidth=1.4, label=label)
        peaks = [y for line in ax.lines for y in line.get_ydata() if math.isfinite(y)]
        ax.set_ylim(0, 1.15 * max(peaks) if peaks and max(peaks) > 0 else 1)  # 0-based, curves off the frame
        return self.finish(fig, ax, has_data=drawn, empty_text="no memory logged yet")


def _running_mean(ys: list[float], window: int) -> list[float]:
    """The mean of the last `window` finite values at each point (fewer at the start)."""
    out, recent = [], []
    for y in ys:
        if math.isfinite(y):
            recent = (recent + [y])[-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


def build_plots(records: list[dict[str, Any]], *, xmax: float | None,
                log_loss: bool = False) -> list[tuple[str, str, str]]:
    """(id, caption, data URI) of every plot; `log_loss`: the loss on a log axis."""
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": "fullscale", "svg.fonttype": "path", "font.size": 9}):
        p = _Plotter(records, xmax=xmax, log_loss=log_loss)
        scale = " (log scale)" if log_loss else ""
        return [
            ("loss", f"Train loss (each step and logged mean) and eval loss{scale}; the star is the best evaluation.",
             p.loss()),
            ("learning_rate", "Learning rate after each logged step.",
             p.single("learning_rate", "Learning rate", "learning rate", "#9467bd")),
            ("grad_norm", "Gradient norm before clipping (log scale when it spans more than 100x).",
             p.single("grad_norm", "Gradient norm", "grad norm", "#8c564b", log_when_wide=True)),
            ("tokens_per_second", "Training throughput between logs (evaluation and saving excluded), with the "
             "running mean of 10 logs.",
             p.single("tokens_per_second", "Throughput", "tokens/s", "#17becf", smooth=10)),
            ("memory", "Memory of the main process.", p.memory()),
        ]
