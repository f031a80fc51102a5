"""Data: load a dataset file, convert its rows to token ids with the prompt masked out of the
labels, truncate, split off an eval set, and collate batches.

Pipeline, one function per step:

    load_rows -> detect_format -> convert rows to text (validate, render) -> split
              -> tokenize, mask prompt labels, truncate -> (pack) -> collate

The result of prepare_data is cached on disk between runs (see "Tokenization cache" below),
keyed by the data files' contents, the tokenizer and every setting that changes the result.
Large datasets are converted and tokenized in worker processes.

Nothing is dropped or cut silently: every skipped row and every truncated row is counted
with its row number (its line number for .jsonl), and the counts go to the console.
A bad row is skipped and reported (``invalid_rows: skip``) or stops the run with a
`DataError` naming the file and row (``invalid_rows: error``).
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fullscale.config import is_hub_name
from fullscale.errors import ConfigError, DataError
from fullscale.packing import PackingStats, collate_packed, pack_examples  # noqa: F401 (re-exported)

FORMATS = ("text", "prompt_completion", "alpaca", "messages", "sharegpt")
CHAT_FORMATS = ("messages", "sharegpt")  # rendered with the tokenizer's chat template
INVALID_ROWS = ("skip", "error")
IGNORE_INDEX = -100  # label value that the loss ignores (torch cross_entropy's default)

SUPPORTED_FILES = ".jsonl, .json, .csv, .parquet, or a directory written by datasets' save_to_disk"

# The columns each format needs. Detection tries the most specific format first, so a file
# with both 'messages' and 'text' columns is read as chat data.
REQUIRED_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
DETECT_ORDER = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")

# The classic Alpaca prompt (tatsu-lab/stanford_alpaca), with and without the input section.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

_TOKENIZE_CHUNK = 2048  # texts per tokenizer call: fast batching without holding everything twice
PARALLEL_MIN_ROWS = 50_000  # rows from which conversion and tokenization run in worker processes
_PARALLEL_CHUNK = 4096  # rows per worker task
_MAX_LISTED = 5  # row numbers listed per category in console messages


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


# --------------------------------------------------------------------------------------
# Loading


class _Rows(NamedTuple):
    rows: list[tuple[int, dict | None, str | None]]
    unit: str  # "line" (jsonl: row numbers are line numbers) or "row"


def count_rows(path: str | os.PathLike, *, dataset_config: str | None = None, dataset_split: str = "train") -> int:
    """The rows of a data source (a file, a directory, a hub dataset id), read once."""
    return sum(1 for _ in _read(path, dataset_config=dataset_config, dataset_split=dataset_split).rows)


def load_rows(path: str | os.PathLike) -> list[tuple[int, dict | None, str | None]]:
    """Read a .jsonl/.json/.csv/.parquet file or a datasets save_to_disk directory.

    Returns one (row_number, row, error) per row: row is a dict and error None, or row None
    and error a reason (a malformed .jsonl line gives (line, None, "invalid JSON: ...") and
    does not fail the file). Row numbers are 1-based: line numbers for .jsonl, row indices
    otherwise (the .csv header not counted). A missing file, an unsupported extension or an
    unreadable file raises DataError naming the path and the supported types.
    """
    return list(_read(path).rows)


def _read(path: str | os.PathLike, *, dataset_config: str | None = None, dataset_split: str = "train") -> _Rows:
    p = Path(path)
    if not p.exists():
        if is_hub_name(str(path)):
            return _Rows(_DatasetRows(str(path), dataset_config, dataset_split), "row")
        raise DataError(f"data file not found: {str(path)!r}. Check the path; supported: {SUPPORTED_FILES}.")
    if p.is_dir():
        if not any((p / marker).is_file() for marker in _SAVED_MARKERS):   # a folder of data files
            return _Rows(_DatasetRows(str(p), dataset_config, dataset_split), "row")
        return _Rows(_read_saved_dataset(p), "row")
    suffix = p.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
               ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(
            f"unsupported data file type {suffix or '(no extension)'!r}: {str(path)!r}. "
            f"Supported: {SUPPORTED_FILES}. Convert the file or rename it to match its content."
        )
    try:
        return readers[suffix](p)
    except DataError:
        raise
    except (OSError, ValueError) as exc:  # permissions, a corrupt parquet, ...
        raise DataError(
            f"cannot read data file {str(path)!r}: {exc}. Check that it is a valid {suffix} file "
            f"(supported: {SUPPORTED_FILES})."
        ) from exc


class _MappedRows:
    """Rows with a file's column names replaced by the format's, applied as they are read."""

    def __init__(self, rows, columns: dict[str, str]):
        self.rows, self.columns = rows, columns

    def __iter__(self):
        for number, row, error in self.rows:
            if row is not None:
                for target, source in self.columns.items():
                    if source in row and target not in row:
                        row[target] = row.pop(source)
            yield number, row, error

    def __len__(self) -> int:
        return len(self.rows)


def _mapped(read: _Rows, columns: dict[str, str] | None) -> _Rows:
    """The rows with the file's column names replaced by the format's ({"prompt": "question"} renames
    each row's "question" to "prompt")."""
    return _Rows(_MappedRows(read.rows, columns), read.unit) if columns else read


def _parse_json_line(number: int, raw: bytes) -> tuple[int, dict | None, str | None] | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return number, None, f"not valid UTF-8 (byte {exc.start} of the line)"
    if number == 1:
        text = text.lstrip("\ufeff")  # a byte-order mark some editors write
    if not text.strip():
        return None  # blank lines are not rows
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return number, None, f"invalid JSON: {exc.msg} at column {exc.colno}"
    if not isinstance(value, dict):
        return number, None, f"expected a JSON object, got {_json_type(value)}"
    return number, value, None


class _JsonlRows:
    """The rows of a JSON Lines file, parsed line by line each time they are iterated: a large file
    is never held whole (its rows go to conversion a chunk at a time)."""

    def __init__(self, path: Path):
        self.path = path
        self._count: int | None = None

    def __iter__(self):
        # Bytes, decoded per line: one bad byte or line costs that row only, not the whole file.
        with self.path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                row = _parse_json_line(number, raw)
                if row is not None:
                    yield row

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(1 for _ in self)
        return self._count

    def raw_chunks(self, size: int):
        """The file's lines, `size` at a time, as (line number, bytes) not yet parsed: worker
        processes parse them (the main process only reads)."""
        with self.path.open("rb") as f:
            chunk = []
            for number, raw in enumerate(f, start=1):
                chunk.append((number, raw))
                if len(chunk) == size:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk


def _read_jsonl(p: Path) -> _Rows:
    with p.open("rb"):   # unreadable: fail here, as the other readers do
        pass
    return _Rows(_JsonlRows(p), "line")


def _read_json(p: Path) -> _Rows:
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not valid UTF-8 (byte {exc.start}). Re-save the file as UTF-8.") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line in a .json file: read it as JSON Lines
            return _Rows([r for n, line in enumerate(raw.splitlines(), 1) if (r := _parse_json_line(n, line))], "line")
        raise DataError(
            f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}. Fix the file, or write it "
            f"as .jsonl (one object per line) so that a bad row is skipped instead of failing the file."
        ) from exc
    records = value
    if isinstance(value, dict):
        lists = {k: v for k, v in value.items() if k in ("data", "records", "rows") and isinstance(v, list)}
        records = next(iter(lists.values())) if len(lists) == 1 else None
    if not isinstance(records, list):
        raise DataError(
            f"{p}: expected a JSON list of objects (or {{\"data\": [...]}}), got {_json_type(value)}"
            + (f" with keys {sorted(value)[:10]}" if isinstance(value, dict) else "")
            + ". Write the rows as a list of objects, or as .jsonl (one object per line)."
        )
    rows = []
    for number, item in enumerate(records, start=1):
        if isinstance(item, dict):
            rows.append((number, item, None))
        else:
            rows.append((number, None, f"expected a JSON object, got {_json_type(item)}"))
    return _Rows(rows, "row")


def _read_csv(p: Path) -> _Rows:
    rows = []
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # the default (128 KiB) rejects long documents
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for number, record in enumerate(reader, start=1):
                # Empty cells are null; cells past the header (key None) are dropped.
                rows.append((number, {k: (v if v != "" else None) for k, v in record.items() if k is not None}, None))
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not valid UTF-8 (after data row {len(rows)}). Re-save the file as UTF-8.") from exc
    except csv.Error as exc:
        raise DataError(f"{p}: malformed CSV at data row {len(rows) + 1}: {exc}. Fix the quoting there.") from exc
    finally:
        csv.field_size_limit(old_limit)
    return _Rows(rows, "row")


def _read_parquet(p: Path) -> _Rows:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(p).to_pylist()
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/ArrowIOError types
        raise DataError(f"cannot read parquet file {str(p)!r}: {exc}. Check that the file is complete.") from exc
    return _Rows([(n, r, None) for n, r in enumerate(records, start=1)], "row")


_SAVED_MARKERS = ("state.json", "dataset_dict.json", "dataset_info.json")   # what save_to_disk writes


class _DatasetRows:
    """The rows of a dataset loaded with `datasets.load_dataset`: a hub id (from the local cache when
    offline) or a directory of data files. Arrow-backed: iterated a row at a time, never held whole."""

    def __init__(self, name: str, config: str | None, split: str):
        import datasets

        self.name, self.config, self.split = name, config, split
        try:
            self.dataset = datasets.load_dataset(name, config, split=split)
        except Exception as exc:  # noqa: BLE001 - offline, unknown name, bad config or split: all "cannot load"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"cannot load the dataset {name!r} (dataset_config {config!r}, dataset_split {split!r}) with "
                f"datasets.load_dataset: {first[:300]}. Check the name, dataset_config and dataset_split; without "
                f"network a hub dataset must be in the local cache; or give a local file ({SUPPORTED_FILES}) or a "
                "directory of data files") from None

    def __iter__(self):
        for number, row in enumerate(self.dataset, start=1):
            yield number, row, None

    def __len__(self) -> int:
        return self.dataset.num_rows

    def fingerprint(self) -> str:
        return f"{self.name}:{self.config}:{self.split}:{getattr(self.dataset, '_fingerprint', '')}"


def dataset_fingerprint(name: str, config: str | None, split: str) -> str:
    """What identifies a hub dataset's contents (datasets' own fingerprint of its cached files)."""
    return _DatasetRows(name, config, split).fingerprint()


def _read_saved_dataset(p: Path) -> list[tuple[int, dict | None, str | None]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:  # FileNotFoundError when the directory is not a saved dataset
        raise DataError(
            f"{str(p)!r} is a directory but not a dataset written by datasets' save_to_disk ({exc}). "
            f"Point train_file/eval_file at a file ({SUPPORTED_FILES}) or at a save_to_disk directory."
        ) from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(
                f"{str(p)!r} holds a DatasetDict without a 'train' split (splits: {', '.join(ds)}). "
                f"Save the split you want on its own (ds['{next(iter(ds), 'name')}'].save_to_disk(...))."
            )
        ds = ds["train"]
    return [(n, r, None) for n, r in enumerate(ds.to_list(), start=1)]


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------
# Format detection


def _match_format(columns: set[str]) -> str | None:
    for fmt in DETECT_ORDER:
        if all(c in columns for c in REQUIRED_COLUMNS[fmt]):
            return fmt
    return None


def _expected_columns() -> str:
    return "; ".join(
        f"{fmt}: {', '.join(REQUIRED_COLUMNS[fmt])}" + (" (+ optional input)" if fmt == "alpaca" else "")
        for fmt in DETECT_ORDER
    )


def detect_format(columns: set[str], *, path) -> str:
    """The dataset format that `columns` fit, trying messages > alpaca > prompt_completion > text.

    Raises DataError listing the columns found and the ones each format expects when none fits.
    """
    fmt = _match_format(set(columns))
    if fmt is not None:
        return fmt
    found = ", ".join(sorted(columns)) or "(none)"
    hint = ""
    if "conversations" in columns:
        hint = (" A 'conversations' column looks like ShareGPT data: convert it to a 'messages' column of "
                "{'role', 'content'} objects.")
    raise DataError(
        f"{path}: cannot detect the dataset format from its columns ({found}). Expected columns: "
        f"{_expected_columns()}.{hint} Rename the columns, or set dataset_format to one of {', '.join(FORMATS)}."
    )


def _choose_format(records: list[tuple[int, dict]], *, path, dataset_format: str) -> tuple[str, str | None]:
    """The format for these rows and, under auto, the console message saying which was chosen.

    Detection looks at every row, not just the first: each distinct column set votes with its
    number of rows (JSON Lines rows need not share their keys).
    """
    return _choose_format_from(Counter(frozenset(row) for _, row in records), path=path, dataset_format=dataset_format)


def _choose_format_from(column_sets: Counter, *, path, dataset_format: str) -> tuple[str, str | None]:
    """_choose_format from the column sets of the valid rows and their counts."""
    records = bool(column_sets)
    all_columns = set().union(*column_sets) if column_sets else set()
    if dataset_format != "auto":
        required = REQUIRED_COLUMNS[dataset_format]
        if records and not any(all(c in cols for c in required) for cols in column_sets):
            detected = _match_format(all_columns)
            hint = f" The columns fit '{detected}': set dataset_format: {detected} (or auto)." if detected else ""
            raise DataError(
                f"{path}: dataset_format '{dataset_format}' needs the column(s) {', '.join(required)}, but no row "
                f"has them (columns found: {', '.join(sorted(all_columns)) or '(none)'}).{hint}"
            )
        return dataset_format, None
    votes: Counter[str] = Counter()
    for cols, count in column_sets.items():
        fmt = _match_format(set(cols))
        if fmt is not None:
            votes[fmt] += count
    if not votes:
        detect_format(all_columns, path=path)  # raises with the columns found and expected
    best = max(votes.values())
    fmt = next(f for f in DETECT_ORDER if votes.get(f) == best)
    message = f"dataset_format auto: detected '{fmt}' (columns: {', '.join(sorted(all_columns))})"
    others = sum(votes.values()) - votes[fmt]
    if others:
        message += f"; {others:,} rows look like another format and will be skipped"
    return fmt, message


# --------------------------------------------------------------------------------------
# Row conversion: validate a row and turn it into text (no tokens yet)


class _Invalid(Exception):
    """A row that cannot be used; the message is the reason shown with its row number."""


class _TemplateUnstable(Exception):
    """The chat template renders a prefix of a conversation differently from the full one."""

    def __init__(self, detail: str, index: int = -1):
        super().__init__(detail)
        self.index = index  # which item, when raised while tokenizing a batch


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))  # pandas/csv NaN


def _required_str(row: dict, key: str) -> str:
    if key not in row:
        raise _Invalid(f"missing '{key}'")
    value = row[key]
    if _is_null(value):
        raise _Invalid(f"null '{key}'")
    if not isinstance(value, str):
        hint = " (conversational prompt/completion is not supported: use a 'messages' column)" if isinstance(
            value, list) else ""
        raise _Invalid(f"'{key}' must be a string, got {_json_type(value)}{hint}")
    if not value.strip():
        raise _Invalid(f"empty '{key}'")
    return value


def format_alpaca_prompt(*, instruction: str, input: str | None = None) -> str:
    """The classic Alpaca prompt for an instruction (and optional input), ending in '### Response:\\n'."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def _convert_prompt_completion(row: dict) -> tuple[str, str]:
    return _required_str(row, "prompt"), _required_str(row, "completion")


def _convert_alpaca(row: dict) -> tuple[str, str]:
    instruction = _required_str(row, "instruction")
    output = _required_str(row, "output")
    extra = row.get("input")
    if _is_null(extra):
        extra = None
    elif not isinstance(extra, str):
        raise _Invalid(f"'input' must be a string, got {_json_type(extra)}")
    return format_alpaca_prompt(instruction=instruction, input=extra if extra and extra.strip() else None), output


# ShareGPT rows: {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_call": "assistant"}


def _sharegpt_messages(row: dict) -> list[dict]:
    """A ShareGPT row's turns as {role, content} messages (validated as messages afterwards)."""
    turns = row.get("conversations")
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise _Invalid("'conversations' must be a list of {from, value} objects, got a string") from None
    if not isinstance(turns, list) or not turns:
        raise _Invalid(f"'conversations' must be a non-empty list of {{from, value}} objects, got {_json_type(turns)}")
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or "from" not in turn:
            raise _Invalid(f"turn {i} of {len(turns)} must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise _Invalid(f"turn {i} of {len(turns)} is from {turn['from']!r} (expected one of: "
                           f"{', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": role, "content": turn.get("value")})
    return messages


def _validate_messages(row: dict) -> list[dict]:
    if "messages" not in row:
        raise _Invalid("missing 'messages'")
    messages = row["messages"]
    if _is_null(messages):
        raise _Invalid("null 'messages'")
    if isinstance(messages, str):  # a CSV cell holding the list as JSON
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise _Invalid("'messages' must be a list of {role, content} objects, got a string") from None
    if not isinstance(messages, list):
        raise _Invalid(f"'messages' must be a list of {{role, content}} objects, got {_json_type(messages)}")
    if not messages:
        raise _Invalid("empty 'messages'")
    for i, message in enumerate(messages, start=1):
        where = f"message {i} of {len(messages)}"
        if not isinstance(message, dict):
            raise _Invalid(f"{where} must be an object with 'role' and 'content', got {_json_type(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise _Invalid(f"{where} has no 'role'")
        if role not in KNOWN_ROLES:
            raise _Invalid(f"{where} has unknown role {role!r} (expected one of: {', '.join(KNOWN_ROLES)})")
        content = message.get("content")
        if role == "assistant" and message.get("tool_calls") and (_is_null(content) or content == ""):
            continue  # a tool call carries no text content
        if "content" not in message or _is_null(content):
            raise _Invalid(f"{where} ({role}) has no 'content'")
        if not isinstance(content, str):
            raise _Invalid(f"{where} ({role}): 'content' must be a string, got {_json_type(content)}")
        if not content.strip() and role != "system":  # an empty system prompt is common and harmless
            raise _Invalid(f"{where} ({role}) has empty 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise _Invalid("no assistant message: nothing to learn")
    return messages


def _render(tokenizer, conversations: list[list[dict]], *, add_generation_prompt: bool) -> list[str | _Invalid]:
    """Each conversation rendered by the chat template, or the _Invalid its rendering raised. One
    call for the batch (a fifth less template work than one call each); a batch that fails is
    rendered one conversation at a time to find the one that raised."""
    if not conversations:
        return []
    try:
        return list(tokenizer.apply_chat_template(conversations, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt))
    except Exception:
        pass
    out: list[str | _Invalid] = []
    for messages in conversations:
        try:
            out.append(tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt))
        except Exception as exc:  # jinja errors raised by the template itself ("roles must alternate", ...)
            out.append(_Invalid(f"the chat template cannot render this conversation: {exc}"))
    return out


def _convert_conversations(conversations: list[list[dict]], tokenizer) -> list:
    """Per validated conversation, its rendering and, per assistant message, the rendered text before
    and after it: (full, spans), or the _Invalid / _TemplateUnstable that stops the row.

    The assistant tokens are those between render(messages[:i], add_generation_prompt=True)
    and render(messages[:i+1]): the reply and the template's end marker, so the model learns
    to stop. This holds only if each rendering is a prefix of the next (checked here).
    """
    fulls = _render(tokenizer, conversations, add_generation_prompt=False)
    # Every prefix rendering needed, in two batches (with and without the generation prompt).
    wanted: dict[bool, list] = {True: [], False: []}
    for c, messages in enumerate(conversations):
        if isinstance(fulls[c], _Invalid):
            continue
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                if i:
                    wanted[True].append((c, i))
                if i != len(messages) - 1:
                    wanted[False].append((c, i + 1))
    rendered = {}
    for gen, keys in wanted.items():
        for key, text in zip(keys, _render(tokenizer, [conversations[c][:i] for c, i in keys],
                                           add_generation_prompt=gen)):
            rendered[gen, *key] = text
    out = []
    for c, messages in enumerate(conversations):
        full = fulls[c]
        if isinstance(full, _Invalid):
            out.append(full)
            continue
        spans, problem = [], None
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            last = i == len(messages) - 1
            before = rendered[True, c, i] if i else ""
            after = full if last else rendered[False, c, i + 1]
            problem = next((t for t in (before, after) if isinstance(t, _Invalid)), None)
            if problem is None and not (after.startswith(before) and full.startswith(after)):
                problem = _TemplateUnstable(f"at message {i + 1}")
            if problem is not None:
                break
            spans.append((before, None if last else after))  # None: up to the end of the conversation
        out.append(problem if problem is not None else (full, spans))
    return out


# --------------------------------------------------------------------------------------
# Tokenization


def _tokenize(tokenizer, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    encode = _direct_encoder(tokenizer, texts, add_special_tokens=add_special_tokens)
    ids: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        batch = texts[start : start + _TOKENIZE_CHUNK]
        if encode is not None:
            ids.extend(e.ids for e in encode(batch, add_special_tokens=add_special_tokens))
            continue
        encoded = tokenizer(batch, add_special_tokens=add_special_tokens,
                            return_attention_mask=False, verbose=False)  # verbose: no "longer than" warning
        ids.extend(list(x) for x in encoded["input_ids"])
    return ids


def _direct_encoder(tokenizer, texts: list[str], *, add_special_tokens: bool):
    """The Rust tokenizer's batch encoder without offsets, when it gives the very ids the tokenizer's
    own call gives (checked on the first texts): about twice as fast, most of it the Python side of
    the call. None (the tokenizer's call is used) for slow tokenizers, a backend with truncation or
    padding set, or any disagreement."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None)
    if encode is None or backend.truncation is not None or backend.padding is not None or not texts:
        return None
    sample = texts[:4]
    try:
        direct = [e.ids for e in encode(sample, add_special_tokens=add_special_tokens)]
    except Exception:
        return None
    reference = tokenizer(sample, add_special_tokens=add_special_tokens, return_attention_mask=False,
                          verbose=False)["input_ids"]
    return encode if direct == [list(x) for x in reference] else None


def _token_boundary(prefix_ids: list[int], full_ids: list[int]) -> int | None:
    """Where the tokens of a rendered prefix end inside the full conversation's tokens.

    Exact when the prefix tokenizes to a prefix of the full tokens. A BPE merge across the
    boundary (e.g. two newlines) may change the last token or two; then the common prefix is
    the boundary. Anything more means the template and tokenizer are not prefix-stable: None.
    """
    n = len(prefix_ids)
    if full_ids[:n] == prefix_ids:
        return n
    common = 0
    for a, b in zip(prefix_ids, full_ids):
        if a != b:
            break
        common += 1
    return common if n - common <= 2 else None


def _tokenize_items(fmt: str, items: list, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per converted item, before truncation."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "text":
        # Loss on every token; the BOS label is never used (labels are shifted inside the model).
        return [(ids + eos, ids + eos) for ids in _tokenize(tokenizer, items, add_special_tokens=True)]
    if fmt in ("prompt_completion", "alpaca"):
        prompts = _tokenize(tokenizer, [p for p, _ in items], add_special_tokens=True)  # with BOS
        completions = _tokenize(tokenizer, [c for _, c in items], add_special_tokens=False)
        return [
            (p + c + eos, [IGNORE_INDEX] * len(p) + c + eos) for p, c in zip(prompts, completions)
        ]
    # messages: the template writes BOS itself, so no special tokens are added here.
    fulls = _tokenize(tokenizer, [full for full, _ in items], add_special_tokens=False)
    # Tokenize every rendered prefix (empty and full-conversation ones need no tokenizing).
    prefixes = [text for _, spans in items for pair in spans for text in pair if text]
    prefix_ids = iter(_tokenize(tokenizer, prefixes, add_special_tokens=False))
    out = []
    for index, ((_, spans), ids) in enumerate(zip(items, fulls)):
        labels = [IGNORE_INDEX] * len(ids)
        for before, after in spans:
            start = _token_boundary(next(prefix_ids), ids) if before else 0
            end = _token_boundary(next(prefix_ids), ids) if after else len(ids)
            if start is None or end is None:
                raise _TemplateUnstable("its tokens differ from the full conversation's", index)
            labels[start:end] = ids[start:end]
        out.append((ids, labels))
    return out


# --------------------------------------------------------------------------------------
# Preparing one split


class _Source(NamedTuple):
    path: str
    unit: str  # "line" or "row"


def _convert_rows(rows, *, fmt: str, tokenizer, source: _Source, invalid_rows: str):
    """Validate and render every row. Returns (items, row numbers, skipped (row, reason))."""
    converters = {"text": lambda r: _required_str(r, "text"), "prompt_completion": _convert_prompt_completion,
                  "alpaca": _convert_alpaca, "messages": _validate_messages,
                  "sharegpt": lambda r: _validate_messages({"messages": _sharegpt_messages(r)})}
    convert = converters[fmt]
    results = []   # per row: (number, converted item or the exception that stops it)
    for number, row, error in rows:
        try:
            if error is not None:
                raise _Invalid(error)
            results.append((number, convert(row)))
        except _Invalid as exc:
            results.append((number, exc))
    if fmt in CHAT_FORMATS:   # validated messages -> renderings, the chunk's conversations at once
        valid = [k for k, (_, item) in enumerate(results) if not isinstance(item, Exception)]
        for k, item in zip(valid, _convert_conversations([results[k][1] for k in valid], tokenizer)):
            results[k] = (results[k][0], item)
    items, numbers, skipped = [], [], []
    for number, item in results:   # in row order: the first bad row is the one reported
        if isinstance(item, _TemplateUnstable):
            raise _template_unstable_error(source, number, str(item)) from None
        if isinstance(item, _Invalid):
            if invalid_rows == "error":
                raise DataError(
                    f"{source.path} {source.unit} {number}: {item}. Fix the {source.unit}, or set "
                    f"`invalid_rows: skip` to skip invalid rows and report them."
                ) from None
            skipped.append((number, str(item)))
            continue
        items.append(item)
        numbers.append(number)
    return items, numbers, skipped


def _template_unstable_error(source: _Source, number: int, detail: str) -> DataError:
    return DataError(
        f"{source.path} {source.unit} {number}: the tokenizer's chat template is not prefix-stable "
        f"({detail}): rendering the conversation up to an assistant message does not give the start of the "
        f"full conversation, so the assistant tokens cannot be located for loss masking. This happens with "
        f"templates that rewrite earlier turns (for example, dropping reasoning from past assistant turns). "
        f"Fix: set a chat template that renders each turn independently, split the conversations into one "
        f"example per assistant turn, or convert the data to dataset_format prompt_completion."
    )


TOO_LONG = "prompt longer than max_seq_length={}: nothing to learn"


def _prepare_chunk(rows, *, fmt: str, tokenizer, source: _Source, invalid_rows: str, max_seq_length: int) -> dict:
    """Convert, tokenize, mask and truncate one chunk of rows. Returns compact arrays (what a worker
    sends back): per converted item its row number, whether it was kept, too long or truncated, its
    tokens and label tokens; the kept items' ids and labels, flat int32; the invalid rows skipped.
    Raises DataError at the first invalid row under invalid_rows="error"; a template that is not
    stable comes back as ("unstable", detail, row number)."""
    import numpy as np

    items, numbers, skipped = _convert_rows(rows, fmt=fmt, tokenizer=tokenizer, source=source,
                                            invalid_rows=invalid_rows)
    try:
        encoded = _tokenize_items(fmt, items, tokenizer)
    except _TemplateUnstable as exc:
        return {"unstable": (str(exc), numbers[exc.index])}
    n = len(encoded)
    kept = np.zeros(n, dtype=bool)
    truncated = np.zeros(n, dtype=bool)
    tokens = np.zeros(n, dtype=np.int64)
    label_tokens = np.zeros(n, dtype=np.int64)
    flat_ids: list[int] = []
    flat_labels: list[int] = []
    for i, (ids, labels) in enumerate(encoded):
        truncated[i] = len(ids) > max_seq_length
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        num_label_tokens = len(labels) - labels.count(IGNORE_INDEX)
        # labels[0] never carries loss (the model predicts token t+1 from tokens <= t).
        if num_label_tokens - (labels[0] != IGNORE_INDEX) == 0:
            truncated[i] = False
            continue
        kept[i] = True
        tokens[i], label_tokens[i] = len(ids), num_label_tokens
        flat_ids += ids
        flat_labels += labels
    return {"numbers": np.asarray(numbers, dtype=np.int64), "skipped": skipped, "kept": kept, "truncated": truncated,
            "tokens": tokens, "label_tokens": label_tokens, "ids": np.array(flat_ids, dtype=np.int32),
            "labels": np.array(flat_labels, dtype=np.int32)}


class _Tokenized(NamedTuple):
    """A file's rows, converted and tokenized: per converted item (file order) its row number and
    counts; the kept items' tokens as one block of arrays."""

    source: _Source
    num_rows: int
    skipped: list[tuple[int, str]]     # invalid rows (conversion)
    numbers: Any                       # np.int64 per item
    kept: Any                          # bool per item
    truncated: Any
    tokens: Any
    label_tokens: Any
    block: Any                         # fullscale.tokenstore.Examples over the kept items
    kept_rank: Any                     # item index -> its position in `block` (for kept items)


def _chunks(rows, size: int):
    from itertools import islice

    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def _convert_and_tokenize(rows, *, num_rows: int, fmt: str, tokenizer, source: _Source, invalid_rows: str,
                          max_seq_length: int) -> _Tokenized:
    """Every row, a chunk at a time (in worker processes from PARALLEL_MIN_ROWS rows on), into arrays:
    neither the parsed rows nor their texts nor Python token lists are ever held for the whole file."""
    import numpy as np

    from fullscale.tokenstore import Examples

    settings = dict(fmt=fmt, source=source, invalid_rows=invalid_rows, max_seq_length=max_seq_length)
    workers = num_data_workers(num_rows)
    if workers:
        results = _in_workers(_worker_chunks(rows, _PARALLEL_CHUNK), settings, tokenizer, workers)
    else:
        results = (_prepare_chunk(chunk, tokenizer=tokenizer, **settings) for chunk in _chunks(rows, _PARALLEL_CHUNK))
    parts: dict[str, list] = {k: [] for k in ("numbers", "kept", "truncated", "tokens", "label_tokens")}
    skipped: list[tuple[int, str]] = []
    # The tokens go to unnamed temporary files as they come and are mapped back at the end: the
    # process's resident memory holds a chunk of them at a time, never the whole data.
    spill = {key: tempfile.TemporaryFile(dir=cache_dir() if cache_dir() and cache_dir().is_dir() else None)
             for key in ("ids", "labels")}
    try:
        for result in results:
            if "unstable" in result:
                detail, number = result["unstable"]
                raise _template_unstable_error(source, number, detail)
            skipped += result["skipped"]
            for key in parts:
                parts[key].append(result[key])
            for key, fh in spill.items():
                result[key].tofile(fh)
        for fh in spill.values():
            fh.flush()
        ids, labels = (_map_back(spill[key], np.int32) for key in ("ids", "labels"))
    finally:
        for fh in spill.values():
            fh.close()   # a mapping keeps the unnamed file alive until it is dropped

    def joined(key, dtype):
        # One array at a time, its chunks freed as soon as it is whole: the tokens are held twice
        # only for the one being joined (ids, then labels: 4 bytes a token each).
        chunks = parts.pop(key)
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)

    kept = joined("kept", bool)
    tokens = joined("tokens", np.int64)
    offsets = np.zeros(int(kept.sum()) + 1, dtype=np.int64)
    np.cumsum(tokens[kept], out=offsets[1:])
    numbers = joined("numbers", np.int64)
    block = Examples(ids, labels, offsets, numbers[kept])
    return _Tokenized(source=source, num_rows=num_rows, skipped=skipped, numbers=numbers, kept=kept,
                      truncated=joined("truncated", bool), tokens=tokens, label_tokens=joined("label_tokens", np.int64),
                      block=block, kept_rank=np.cumsum(kept) - 1)


def _map_back(fh, dtype):
    import numpy as np

    count = fh.seek(0, os.SEEK_END) // np.dtype(dtype).itemsize
    return np.memmap(fh, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype=dtype)


def _part(tok: _Tokenized, items, *, name: str, num_rows: int, skipped: list, max_seq_length: int):
    """(examples, stats) of the items `items` (indices, file order) of `tok`."""
    import numpy as np

    from fullscale.tokenstore import Examples

    items = np.asarray(items, dtype=np.int64)
    kept = tok.kept[items]
    too_long = items[~kept]
    stats = DataStats(num_rows=num_rows, skipped=list(skipped) + [
        (int(n), TOO_LONG.format(max_seq_length)) for n in tok.numbers[too_long]])
    stats.skipped.sort()
    stats.truncated_rows = [int(n) for n in tok.numbers[items[tok.truncated[items]]]]
    stats.num_tokens = int(tok.tokens[items].sum())
    stats.num_label_tokens = int(tok.label_tokens[items].sum())
    index = tok.kept_rank[items[kept]]
    block = tok.block
    whole = len(index) == len(block) and (len(index) == 0 or bool((index == np.arange(len(index))).all()))
    examples = block if whole else Examples(block.input_ids, block.labels, block.offsets, block.rows, index=index)
    stats.num_examples = len(examples)
    stats.num_skipped = len(stats.skipped)
    stats.num_truncated = len(stats.truncated_rows)
    return examples, stats


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _listed(unit: str, numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_MAX_LISTED])
    more = f", and {len(numbers) - _MAX_LISTED:,} more" if len(numbers) > _MAX_LISTED else ""
    return f"{unit}{'s' if len(numbers) > 1 else ''} {shown}{more}"


def _summary(name: str, stats: DataStats, *, unit: str, max_seq_length: int) -> str:
    parts = [f"{name}: {_count(stats.num_rows, 'row')} -> {_count(stats.num_examples, 'example')}, "
             f"{_count(stats.num_tokens, 'token')} ({stats.num_label_tokens:,} with loss)"]
    if stats.num_truncated:
        parts.append(f"{stats.num_truncated:,} truncated to max_seq_length={max_seq_length} "
                     f"({_listed(unit, stats.truncated_rows)})")
    if stats.num_skipped:
        reasons = "; ".join(f"{unit} {n}: {reason}" for n, reason in stats.skipped[:_MAX_LISTED])
        more = f"; and {stats.num_skipped - _MAX_LISTED:,} more" if stats.num_skipped > _MAX_LISTED else ""
        parts.append(f"{stats.num_skipped:,} skipped ({reasons}{more})")
    return ", ".join(parts)


def _no_examples_error(name: str, stats: DataStats, *, fmt: str, unit: str, max_seq_length: int) -> DataError:
    if stats.num_rows == 0:
        return DataError(f"{name}: no rows to train on (the data is empty). Check train_file/eval_file.")
    reasons = "; ".join(f"{unit} {n}: {reason}" for n, reason in stats.skipped[:_MAX_LISTED])
    fix = (f"Increase max_seq_length (now {max_seq_length}) or shorten the prompts."
           if all("max_seq_length" in r for _, r in stats.skipped)
           else f"Fix the rows, or check that dataset_format '{fmt}' is the right one.")
    return DataError(f"{name}: none of its {stats.num_rows:,} rows can be used as dataset_format '{fmt}' "
                     f"({reasons}). {fix}")


# --------------------------------------------------------------------------------------
# Public entry point


def _check_arguments(*, dataset_format, eval_split, max_seq_length, invalid_rows, train_file):
    problems = []
    if train_file is None:
        problems.append("train_file is not set: give a dataset file (" + SUPPORTED_FILES + ")")
    if dataset_format != "auto" and dataset_format not in FORMATS:
        problems.append(f"dataset_format: {dataset_format!r} is not one of auto, {', '.join(FORMATS)}")
    if not (isinstance(eval_split, (int, float)) and 0 <= eval_split < 1):
        problems.append(f"eval_split: {eval_split!r} must be a fraction in [0, 1)")
    if not (isinstance(max_seq_length, int) and max_seq_length >= 2):
        problems.append(f"max_seq_length: {max_seq_length!r} must be an integer >= 2")
    if invalid_rows not in INVALID_ROWS:
        problems.append(f"invalid_rows: {invalid_rows!r} is not one of {', '.join(INVALID_ROWS)}")
    if problems:
        raise ConfigError(problems)


def prepare_for(config, tokenizer) -> PreparedData:
    """prepare_data with a run's config (its data keys; no train_file: the demo data). A list of
    sources is prepared source by source (each its own token store) and mixed by weight."""
    from fullscale.config import train_sources
    from fullscale.demo import DEMO_TRAIN

    common = dict(max_seq_length=config.max_seq_length, seed=config.seed, tokenizer=tokenizer,
                  invalid_rows=config.invalid_rows)
    if isinstance(config.train_file, list):
        return prepare_mix(train_sources(config), eval_file=config.eval_file, eval_split=config.eval_split,
                           **common)
    return prepare_data(train_file=config.train_file or str(DEMO_TRAIN), eval_file=config.eval_file,
                        eval_split=config.eval_split, dataset_format=config.dataset_format,
                        columns=config.dataset_columns, dataset_config=config.dataset_config,
                        dataset_split=config.dataset_split, **common)


def mixed_count(num: int, weight: float) -> int:
    """Examples a source of `num` examples gives an epoch at `weight`: every one floor(weight)
    times, plus a seeded sample of the fraction (at least one example from a source that has any)."""
    whole = math.floor(weight)
    return max(1 if num else 0, whole * num + round((weight - whole) * num))


def _mixed_positions(num: int, weight: float, seed: int):
    """The positions (into a source's examples) that the mix takes: mixed_count of them, in order."""
    import numpy as np

    whole = math.floor(weight)
    extra = mixed_count(num, weight) - whole * num
    taken = np.tile(np.arange(num, dtype=np.int64), whole)
    if extra:
        sample = np.sort(np.random.default_rng(seed).choice(num, size=extra, replace=False))
        taken = np.concatenate([taken, sample])
    return np.sort(taken, kind="stable")


def _mixed_stats(parts: list[tuple[str, Any, DataStats]], counts: list) -> DataStats:
    """One DataStats for a mix: rows, skips and truncations summed (reasons name their source),
    tokens and label tokens of the examples as mixed (repeats counted)."""
    import numpy as np

    from fullscale.tokenstore import example_lengths

    out = DataStats()
    for (name, examples, stats), count in zip(parts, counts):
        out.num_rows += stats.num_rows
        out.num_skipped += stats.num_skipped
        out.num_truncated += stats.num_truncated
        out.skipped += [(n, f"{name}: {why}") for n, why in stats.skipped]
        out.truncated_rows += stats.truncated_rows
        out.num_examples += int(count.sum())
        lengths = np.asarray(example_lengths(examples), dtype=np.int64)
        out.num_tokens += int((lengths * count).sum())
        out.num_label_tokens += int((examples.label_counts(IGNORE_INDEX) * count).sum())
    return out


def prepare_mix(sources: list[dict], *, eval_file, eval_split: float, max_seq_length: int, seed: int,
                tokenizer, invalid_rows: str = "skip", cache: bool = True) -> PreparedData:
    """Several train sources (config.train_sources entries), each prepared as prepare_data does (its
    own format, store, skip report by row number), mixed by weight into one train split.

    A source of weight w gives mixed_count(n, w) of its n examples an epoch (the sampler shuffles
    the mix). Without eval_file, each source holds out eval_split of its own rows and the eval
    split is all of them, unweighted; an eval_file is prepared on its own (its format detected)."""
    import numpy as np

    from fullscale.tokenstore import Mixture

    messages: list[str] = []
    trains, evals, formats, from_store = [], [], [], []
    for k, source in enumerate(sources):
        data = prepare_data(train_file=source["path"], eval_file=None,
                            eval_split=0.0 if eval_file else eval_split, dataset_format=source["dataset_format"],
                            max_seq_length=max_seq_length, seed=seed, tokenizer=tokenizer, invalid_rows=invalid_rows,
                            cache=cache, columns=source["dataset_columns"], dataset_config=source["dataset_config"],
                            dataset_split=source["dataset_split"])
        messages += data.messages
        formats.append(data.format)
        from_store.append(data.from_store)
        trains.append((str(source["path"]), data.train, data.train_stats, source["weight"]))
        if data.eval is not None:
            evals.append((str(source["path"]), data.eval, data.eval_stats))
    if eval_file:
        held = prepare_data(train_file=eval_file, eval_file=None, eval_split=0.0, dataset_format="auto",
                            max_seq_length=max_seq_length, seed=seed, tokenizer=tokenizer, invalid_rows=invalid_rows,
                            cache=cache)
        messages += held.messages
        from_store.append(held.from_store)
        evals = [(str(eval_file), held.train, held.train_stats)]
    positions = [_mixed_positions(len(ex), w, seed + k) for k, (_, ex, _, w) in enumerate(trains)]
    counts = [np.bincount(p, minlength=len(ex)) for p, (_, ex, _, _) in zip(positions, trains)]
    which = np.concatenate([np.full(len(p), k, dtype=np.int32) for k, p in enumerate(positions)])
    train = Mixture([ex for _, ex, _, _ in trains], which, np.concatenate(positions))
    train_stats = _mixed_stats([(n, ex, st) for n, ex, st, _ in trains], counts)
    shares = ", ".join(f"{name} x{w:g} -> {int(c.sum()):,} ({100 * c.sum() / max(1, len(train)):.0f}%)"
                       for (name, _, _, w), c in zip(trains, counts))
    messages.append(f"mix: {len(train):,} train examples an epoch from {len(trains)} sources ({shares})")
    eval_examples = eval_stats = None
    if evals:
        eval_examples = Mixture([ex for _, ex, _ in evals],
                                np.concatenate([np.full(len(ex), k, dtype=np.int32) for k, (_, ex, _) in enumerate(evals)]),
                                np.concatenate([np.arange(len(ex), dtype=np.int64) for _, ex, _ in evals]))
        eval_stats = _mixed_stats(evals, [np.ones(len(ex), dtype=np.int64) for _, ex, _ in evals])
    return PreparedData(train=train, eval=eval_examples, format="+".join(dict.fromkeys(formats)),
                        train_stats=train_stats, eval_stats=eval_stats, messages=messages,
                        from_store=all(from_store),
                        sources=[(name, st) for name, _, st, _ in trains])


def prepare_data(*, train_file, eval_file, eval_split: float, dataset_format: str, max_seq_length: int,
                 seed: int, tokenizer, invalid_rows: str = "skip", cache: bool = True,
                 columns: dict[str, str] | None = None, dataset_config: str | None = None,
                 dataset_split: str = "train") -> PreparedData:
    """Load, convert, tokenize and mask the train (and eval) data.

    - Format: `dataset_format` or, under "auto", detected from the columns of all rows
      (messages > alpaca > prompt_completion > text); eval_file is read in the same format.
    - Labels: -100 on prompt tokens; loss on the completion/output + EOS, on each assistant
      message + its end marker (messages), on everything (text).
    - Rows longer than max_seq_length are truncated on the right and counted; a row with no
      label left after truncation is skipped with its reason.
    - Invalid rows are skipped and reported (invalid_rows="skip") or raise DataError
      ("error"); a file with no usable row always raises DataError.
    - Eval: eval_file if given; else, when eval_split > 0, ceil(n * eval_split) of the train
      file's valid rows (at least 1 when n >= 2), chosen by `seed`. Rows skipped as invalid
      are counted in train_stats. Examples keep file order.
    - Cache: the result is stored under cache_dir() and read back by a later call with the same
      data contents, tokenizer and settings (cache=False, or FULLSCALE_CACHE=off, turns it off).
      Errors are never cached; an unreadable entry is rebuilt.
    - From PARALLEL_MIN_ROWS rows on, rows are converted and tokenized in worker processes.
    - `columns` maps a format's column to the file's name for it ({"prompt": "question"}): renamed
      on reading, before the format is detected.
    - train_file may also be a Hugging Face dataset id or a directory of data files, loaded with
      datasets.load_dataset(train_file, dataset_config, split=dataset_split).
    """
    _check_arguments(dataset_format=dataset_format, eval_split=eval_split, max_seq_length=max_seq_length,
                     invalid_rows=invalid_rows, train_file=train_file)
    settings = dict(train_file=train_file, eval_file=eval_file, eval_split=eval_split, dataset_format=dataset_format,
                    max_seq_length=max_seq_length, seed=seed, invalid_rows=invalid_rows, columns=columns or None,
                    dataset_config=dataset_config, dataset_split=dataset_split)
    directory = cache_dir() if cache else None
    try:
        key = cache_key(tokenizer=tokenizer, **settings) if directory is not None else None
    except OSError:  # a missing or unreadable file: _prepare says which, as a DataError
        key = None
    if key is None:
        return _prepare(tokenizer=tokenizer, **settings)
    path = directory / f"{key}.store"
    files = {"train": str(train_file), "eval": str(eval_file) if eval_file else None}
    note = None
    if path.exists():
        try:
            data = _load_cached(path, key, files=files)
        except Exception as exc:  # noqa: BLE001 - truncated zip, bad CRC, missing array, bad JSON: all "rebuild"
            note = f"tokenized data: the cache entry {path} is unreadable ({type(exc).__name__}: {exc}); rebuilt"
        else:
            data.messages.append(f"tokenized data: read from the cache ({path})")
            data.from_store = True
            return data
    data = _prepare(tokenizer=tokenizer, **settings)
    try:
        _save_cached(path, key, data, files=files)
    except OSError as exc:  # a read-only or full cache disk never stops a run
        data.messages.append(f"tokenized data: not cached ({exc}); set FULLSCALE_CACHE to a writable directory")
        return data
    # From here on the examples are views into the store: the lists just built are freed, and
    # the memory a run holds for its data does not grow with the data.
    messages = data.messages + [note or f"tokenized data: cached in {path}"]
    del data
    _return_freed_memory()
    try:
        data = _load_cached(path, key, files=files)
    except Exception as exc:  # noqa: BLE001 - the store just written cannot be read back: say so, rebuild
        raise DataError(f"the token store {path} just written cannot be read back ({exc}); check the disk of "
                        "FULLSCALE_CACHE, or set FULLSCALE_CACHE=off") from None
    data.messages = messages
    return data


def _scan(rows) -> tuple[int, Counter, list[tuple[int, str]]]:
    """One pass over the rows: their number, the column sets of the valid ones with their counts,
    and the invalid ones (row, reason) while no valid row has been seen."""
    count, column_sets, invalid = 0, Counter(), []
    for number, row, error in rows:
        count += 1
        if error is None:
            column_sets[frozenset(row)] += 1
        elif not column_sets:
            invalid.append((number, error))
    return count, column_sets, invalid


def _prepare(*, train_file, eval_file, eval_split: float, dataset_format: str, max_seq_length: int,
             seed: int, tokenizer, invalid_rows: str, columns: dict[str, str] | None = None,
             dataset_config: str | None = None, dataset_split: str = "train") -> PreparedData:
    """prepare_data without the cache."""
    import numpy as np

    messages: list[str] = []

    # 1. Read the train file and settle the format (eval_file must fit the same one).
    train_read = _mapped(_read(train_file, dataset_config=dataset_config, dataset_split=dataset_split), columns)
    train_source = _Source(str(train_file), train_read.unit)
    num_rows, column_sets, invalid = _scan(train_read.rows)
    if not column_sets:  # nothing to detect from: say why instead of "no columns"
        stats = DataStats(num_rows=num_rows, skipped=invalid)
        raise _no_examples_error(train_source.path, stats, fmt=dataset_format, unit=train_source.unit,
                                 max_seq_length=max_seq_length)
    fmt, detected = _choose_format_from(column_sets, path=train_source.path, dataset_format=dataset_format)
    if detected:
        messages.append(detected)
    _check_tokenizer(tokenizer, fmt)
    if tokenizer.eos_token_id is None and fmt not in CHAT_FORMATS:
        messages.append("the tokenizer has no eos_token: examples end without one, so the model will not learn "
                        "to stop")
    eval_read = eval_source = None
    if eval_file is not None:
        eval_read = _mapped(_read(eval_file), columns)
        eval_source = _Source(str(eval_file), eval_read.unit)
        eval_rows, eval_sets, _ = _scan(eval_read.rows)
        required = REQUIRED_COLUMNS[fmt]
        if eval_sets and not any(all(c in cols for c in required) for cols in eval_sets):
            found = set().union(*eval_sets)
            theirs = _match_format(found)
            theirs = f", which is dataset_format '{theirs}'" if theirs else ""
            raise DataError(
                f"{eval_source.path}: the eval data must be in the train data's format, '{fmt}' (columns "
                f"{', '.join(required)}), but its rows have the columns {', '.join(sorted(found)) or '(none)'}{theirs}. "
                f"Convert eval_file to '{fmt}' rows (or leave eval_file out to hold out eval_split of {train_source.path})")

    # 2. Validate, render, tokenize, mask and truncate the rows a chunk at a time (invalid ones are
    # skipped or raise here); then split off eval by converted row, as a choice of indices.
    work = dict(fmt=fmt, tokenizer=tokenizer, invalid_rows=invalid_rows, max_seq_length=max_seq_length)
    train_tok = _convert_and_tokenize(train_read.rows, num_rows=num_rows, source=train_source, **work)
    n = len(train_tok.numbers)
    everything = np.arange(n)
    parts = [(train_tok, everything, train_source.path, num_rows, train_tok.skipped)]
    if not n:
        pass  # reported below with every skip reason
    elif eval_read is not None:
        eval_tok = _convert_and_tokenize(eval_read.rows, num_rows=eval_rows, source=eval_source, **work)
        parts.append((eval_tok, np.arange(len(eval_tok.numbers)), eval_source.path, eval_tok.num_rows,
                      eval_tok.skipped))
    elif eval_split > 0 and n >= 2:
        order = list(range(n))
        random.Random(seed).shuffle(order)
        held = np.zeros(n, dtype=bool)
        held[order[: min(n - 1, max(1, math.ceil(n * eval_split)))]] = True
        out = everything[held]
        parts = [(train_tok, everything[~held], f"{train_source.path} (train split)", num_rows - len(out),
                  train_tok.skipped),
                 (train_tok, out, f"{train_source.path} (eval split)", len(out), [])]
        messages.append(f"eval: {len(out):,} of {n:,} valid rows of {train_source.path} held "
                        f"out (eval_split={eval_split}, seed={seed})")
    elif eval_split > 0:
        messages.append(f"eval: none (eval_split={eval_split} needs at least 2 valid rows, found {n})")

    # 3. Each part's examples (views into its file's block) and statistics.
    results = []
    for tok, items, name, part_rows, skipped in parts:
        examples, stats = _part(tok, items, name=name, num_rows=part_rows, skipped=skipped,
                                max_seq_length=max_seq_length)
        messages.append(_summary(name, stats, unit=tok.source.unit, max_seq_length=max_seq_length))
        if not len(examples):
            raise _no_examples_error(name, stats, fmt=fmt, unit=tok.source.unit, max_seq_length=max_seq_length)
        results.append((examples, stats))
    (train, train_stats), (eval_examples, eval_stats) = results[0], (results[1] if len(results) > 1 else (None, None))
    return PreparedData(train=train, eval=eval_examples, format=fmt, train_stats=train_stats,
                        eval_stats=eval_stats, messages=messages)


def _check_tokenizer(tokenizer, fmt: str) -> None:
    if fmt in CHAT_FORMATS and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"dataset_format '{fmt}' needs a tokenizer with a chat template, and this tokenizer has none. "
            "Fix: use a model whose tokenizer ships one (usually the -Instruct/-Chat variant), set "
            "tokenizer.chat_template, or convert the data to prompt_completion (columns prompt, completion)."
        )


# --------------------------------------------------------------------------------------
# Worker processes for large datasets
#
# Rendering chat templates, locating assistant spans and building label lists is Python work
# that one core does at a few thousand rows a second; from PARALLEL_MIN_ROWS rows on it runs in
# chunks in worker processes (results come back in file order, so the output is the same).

_WORKER_TOKENIZER = None  # set in each worker process by _init_worker


def num_data_workers(num_rows: int) -> int:
    """Worker processes for `num_rows` rows: none below PARALLEL_MIN_ROWS, else at most this
    process's share of the cores (a multi-process launch runs one prepare_data per process)."""
    if num_rows < PARALLEL_MIN_ROWS:
        return 0
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    cores = max(1, (os.cpu_count() or 1) // local_processes)
    return min(cores, math.ceil(num_rows / _PARALLEL_CHUNK))


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    # Everything inherited (torch, transformers, the tokenizer) out of the collector's sight: its
    # full collections would walk those objects again and again (a third of a chunk's time).
    gc.freeze()


def _worker_chunks(rows, size: int):
    """Chunks of `rows` to send to worker processes: a JSON Lines file's raw lines (parsed, and
    their columns renamed, in the worker), other sources' rows as read."""
    columns, inner = (rows.columns, rows.rows) if isinstance(rows, _MappedRows) else (None, rows)
    if isinstance(inner, _JsonlRows):
        for chunk in inner.raw_chunks(size):
            yield "lines", chunk, columns
    else:
        for chunk in _chunks(rows, size):
            yield "rows", chunk, None


def _rows_of(kind: str, payload, columns):
    if kind == "rows":
        return payload
    rows = [row for row in (_parse_json_line(number, raw) for number, raw in payload) if row is not None]
    return list(_MappedRows(rows, columns)) if columns else rows


def _prepare_chunk_in_worker(task):
    (kind, payload, columns), settings = task
    return _prepare_chunk(_rows_of(kind, payload, columns), tokenizer=_WORKER_TOKENIZER, **settings)


def _in_workers(chunks, settings: dict, tokenizer, num_workers: int):
    """_prepare_chunk over `chunks` in `num_workers` processes, results yielded in chunk order, with
    at most two chunks per worker in flight (the rows are read as the workers need them). Fork where
    the platform has it (the tokenizer is inherited, not pickled), spawn elsewhere. The first
    failure in chunk order raises; the queued chunks are then dropped."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if sys.platform == "linux" else "spawn"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "fork() in a multi-threaded process": the
        # workers only run Python and the tokenizer, never the parent's threads (torch, CUDA)
        pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=multiprocessing.get_context(method),
                                   initializer=_init_worker, initargs=(tokenizer,))
        try:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.submit(_prepare_chunk_in_worker, (chunk, settings)))
                if len(pending) >= 2 * num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------
# Tokenization cache
#
# One file per (data contents, tokenizer, settings): <cache_dir>/<key>.npz holding every
# example's tokens, labels and row number as flat int arrays plus a JSON record of the format,
# statistics and console messages. No pickle: a cache file cannot run code. Written to a
# temporary file and renamed into place, so a reader sees a whole entry or none; an entry that
# cannot be read (truncated, corrupt, from another version) is rebuilt.

CACHE_VERSION = 3  # bump when the cached layout or meaning changes (3: the memory-mapped token store)


def cache_dir() -> Path | None:
    """Where tokenized data is cached: $FULLSCALE_CACHE/tokenized, else
    $XDG_CACHE_HOME/fullscale/tokenized (~/.cache/fullscale/tokenized). None when
    FULLSCALE_CACHE is off (or 0, false, none): caching disabled."""
    root = os.environ.get("FULLSCALE_CACHE", "").strip()
    if root.lower() in ("off", "0", "false", "none", "no"):
        return None
    if root:
        return Path(root).expanduser() / "tokenized"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fullscale" / "tokenized"


def _digest_path(path, h) -> None:
    """Every byte of a data file, or of every file of a save_to_disk directory (with their names)."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    from fullscale.resumption import file_sha256   # cached by inode, size and mtime: a large file is read once

    for f in files:
        h.update(f"{f.relative_to(p) if p.is_dir() else ''}:{f.stat().st_size}:{file_sha256(f)}\n".encode())


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the tokens: the fast tokenizer's full definition (vocabulary, merges,
    normalizer, pre- and post-processing) or a slow one's vocabulary and files, its special
    tokens and chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        for name in getattr(tokenizer, "vocab_files_names", {}):
            file = getattr(tokenizer, name, None)
            if isinstance(file, str) and os.path.isfile(file):
                _digest_path(file, h)
    settings = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": getattr(tokenizer, "special_tokens_map", None),
        "ids": [getattr(tokenizer, f"{t}_token_id", None) for t in ("bos", "eos", "pad", "unk")],
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
        "added_tokens": sorted((k, v) for k, v in tokenizer.get_added_vocab().items()),
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(*, train_file, eval_file, eval_split: float, dataset_format: str, max_seq_length: int, seed: int,
              invalid_rows: str, tokenizer, columns: dict[str, str] | None = None, dataset_config: str | None = None,
              dataset_split: str = "train") -> str:
    """The cache entry's name: a hash of everything prepare_data's result depends on. The seed
    and eval_split count only when they choose the eval split (no eval_file)."""
    import tokenizers
    import transformers

    splits = eval_file is None and eval_split > 0
    h = hashlib.sha256()
    h.update(json.dumps({
        "version": CACHE_VERSION, "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "dataset_format": dataset_format, "max_seq_length": max_seq_length, "invalid_rows": invalid_rows,
        "eval_split": eval_split if splits else None, "seed": seed if splits else None,
        "train_name": Path(train_file).name, "eval_name": Path(eval_file).name if eval_file else None,
        "tokenizer": tokenizer_fingerprint(tokenizer), "columns": columns or None,
    }, sort_keys=True).encode())
    # The contents, not the path: a moved or copied file hits, an edited one misses. (The file
    # names are in the key because messages and errors quote them.)
    if Path(train_file).exists() or not is_hub_name(str(train_file)):
        _digest_path(train_file, h)   # (a missing file raises OSError: prepare_data then says which)
    else:   # a hub dataset: datasets' fingerprint of its cached files, and which part of it
        h.update(dataset_fingerprint(str(train_file), dataset_config, dataset_split).encode())
    h.update(b"\0eval\0")
    if eval_file is not None:
        _digest_path(eval_file, h)
    return h.hexdigest()[:32]


def _return_freed_memory() -> None:
    """Give the heap freed by preparation back to the OS (glibc keeps it otherwise: ~100 MB after
    200k rows), so the process that prepared does not stay larger than the ranks that only opened
    the store. A no-op where the C library is not glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _save_cached(path: Path, key: str, data: PreparedData, *, files: dict[str, str | None]) -> None:
    from fullscale import tokenstore

    meta = {"version": CACHE_VERSION, "key": key, "format": data.format, "has_eval": data.eval is not None,
            "train_stats": asdict(data.train_stats),
            "eval_stats": asdict(data.eval_stats) if data.eval_stats is not None else None,
            "messages": list(data.messages), "files": files}
    tokenstore.write(path, {"train": data.train, "eval": data.eval}, meta)


def _load_cached(path: Path, key: str, *, files: dict[str, str | None]) -> PreparedData:
    """The cached result, memory-mapped (fullscale.tokenstore); its messages name this call's files
    (the same contents may have been cached from another directory)."""
    from fullscale import tokenstore

    meta, splits = tokenstore.open_splits(path)
    if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
        raise ValueError("written by another version, or for other data")
    if "train" not in splits or (meta["has_eval"] and "eval" not in splits):
        raise ValueError("a split is missing")

    def stats(d: dict | None) -> DataStats | None:
        if d is None:
            return None
        return DataStats(**{**d, "skipped": [tuple(x) for x in d["skipped"]]})

    return PreparedData(train=splits["train"], eval=splits["eval"] if meta["has_eval"] else None,
                        format=meta["format"], train_stats=stats(meta["train_stats"]),
                        eval_stats=stats(meta["eval_stats"]), messages=_rename(meta["messages"], meta.get("files"), files))


def _rename(messages: list[str], old: dict[str, str | None] | None, new: dict[str, str | None]) -> list[str]:
    out = list(messages)
    for name, path in (old or {}).items():
        if path and new.get(name) and path != new[name]:
            out = [m.replace(path, str(new[name])) for m in out]
    return out



# --------------------------------------------------------------------------------------
# Batching


def collate(examples: list[dict], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch on the right to its longest example (not to max_seq_length).

    Returns int64 tensors [batch, longest]: input_ids (pad_token_id on pads), attention_mask
    (0 on pads), labels (-100 on pads).
    """
    longest = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
