"""The records the data stages pass along: a split's statistics, the prepared data, a row's source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from fullscale.config import INVALID_ROWS  # noqa: F401 (re-exported: one home, the config's choices)
from fullscale.loss import IGNORE_INDEX  # noqa: F401 (re-exported: one home, the loss)


@dataclass
class DataStats:
    """Counts for one split, printed by the trainer.

    `num_rows` = `num_examples` + `num_skipped`. Row numbers are 1-based as in the file
    (line numbers for .jsonl; the header line is not counted for .csv).
    """

    num_rows: int = 0
    num_examples: int = 0
    num_truncated: int = 0
    num_skipped: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)
    truncated_rows: list[int] = field(default_factory=list)
    num_tokens: int = 0  # input tokens over all examples, after truncation
    num_label_tokens: int = 0  # tokens that carry loss (label != -100)
    needed_length: int | None = None  # the smallest max_seq_length that keeps a row skipped as too long


@dataclass
class PreparedData:
    """Tokenized train (and eval) examples, each {"input_ids", "labels", "row"}."""

    train: list[dict]
    eval: list[dict] | None
    format: str  # the format used (the detected one under "auto")
    train_stats: DataStats
    eval_stats: DataStats | None
    messages: list[str]  # human-readable lines for the console
    from_store: bool = False  # read from an existing token store (this process tokenized nothing)
    sources: list[tuple[str, DataStats]] | None = None  # a mix: each train source's own statistics


class _Source(NamedTuple):
    path: str
    unit: str  # "line" or "row"
