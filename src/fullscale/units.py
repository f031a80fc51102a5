"""How fullscale writes numbers, sizes and durations for people: one home, no heavy imports
(`fullscale status` imports this and stays under a second)."""

from __future__ import annotations

import math
from typing import Any


def format_number(x: Any, fmt: str = ".4g") -> str:
    """A value as text: '-' for None, yes/no for a bool, an int as it is, a float by `fmt` (nan and
    inf shown as such, never hidden), a list or mapping as JSON."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return format(x, fmt) if math.isfinite(x) else str(x)
    if isinstance(x, (list, dict)):
        import json

        return json.dumps(x)
    return str(x)


def format_size(n: int | float | None) -> str:
    """Bytes in binary units: 512 B, 1.5 KB, 2.0 GB ('-' for None)."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def format_duration(seconds: float) -> str:
    """H:MM:SS, or M:SS under an hour; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
