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
import hashlib
import json
import math
import os
import random
import sys
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

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


# --------------------------------------------------------------------------------------
# Loading


class _Rows(NamedTuple):
    rows: list[tuple[int, dict | None, str | None]]
    unit: str  # "line" (jsonl: row numbers are line numbers) or "row"


def load_rows(path: str | os.PathLike) -> list[tuple[int, dict | None, str | None]]:
    """Read a .jsonl/.json/.csv/.parquet file or a datasets save_to_disk directory.

    Returns one (row_number, row, error) per row: row is a dict and error None, or row None
    and error a reason (a malformed .jsonl line gives (line, None, "invalid JSON: ...") and
    does not fail the file). Row numbers are 1-based: line numbers for .jsonl, row indices
    otherwise (the .csv header not counted). A missing file, an unsupported extension or an
    unreadable file raises DataError naming the path and the supported types.
    """
    return _read(path).rows


def _read(path: str | os.PathLike) -> _Rows:
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {str(path)!r}. Check the path; supported: {SUPPORTED_FILES}.")
    if p.is_dir():
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


def _mapped(read: _Rows, columns: dict[str, str] | None) -> _Rows:
    """The rows with the file's column names replaced by the format's ({"prompt": "question"} renames
    each row's "question" to "prompt")."""
    if not columns:
        return read
    for _, row, _ in read.rows:
        if row is not None:
            for target, source in columns.items():
                if source in row and target not in row:
                    row[target] = row.pop(source)
    return read


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


def _read_jsonl(p: Path) -> _Rows:
    rows = []
    # Bytes, decoded per line: one bad byte or line costs that row only, not the whole file.
    with p.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            row = _parse_json_line(number, raw)
            if row is not None:
                rows.append(row)
    return _Rows(rows, "line")


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
    column_sets = Counter(frozenset(row) for _, row in records)
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


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja errors raised by the template itself ("roles must alternate", ...)
        raise _Invalid(f"the chat template cannot render this conversation: {exc}") from exc


def _convert_messages(row: dict, tokenizer) -> tuple[str, list[tuple[str, str]]]:
    """The rendered conversation and, per assistant message, the rendered text before and after it.

    The assistant tokens are those between render(messages[:i], add_generation_prompt=True)
    and render(messages[:i+1]): the reply and the template's end marker, so the model learns
    to stop. This holds only if each rendering is a prefix of the next (checked here).
    """
    messages = _validate_messages(row)
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        last = i == len(messages) - 1
        after = full if last else _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (after.startswith(before) and full.startswith(after)):
            raise _TemplateUnstable(f"at message {i + 1}")
        spans.append((before, None if last else after))  # None: up to the end of the conversation
    return full, spans


# --------------------------------------------------------------------------------------
# Tokenization


def _tokenize(tokenizer, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        encoded = tokenizer(texts[start : start + _TOKENIZE_CHUNK], add_special_tokens=add_special_tokens,
                            return_attention_mask=False, verbose=False)  # verbose: no "longer than" warning
        ids.extend(list(x) for x in encoded["input_ids"])
    return ids


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
                  "alpaca": _convert_alpaca, "messages": lambda r: _convert_messages(r, tokenizer),
                  "sharegpt": lambda r: _convert_messages({"messages": _sharegpt_messages(r)}, tokenizer)}
    convert = converters[fmt]
    items, numbers, skipped = [], [], []
    for number, row, error in rows:
        try:
            if error is not None:
                raise _Invalid(error)
            items.append(convert(row))
            numbers.append(number)
        except _Invalid as exc:
            if invalid_rows == "error":
                raise DataError(
                    f"{source.path} {source.unit} {number}: {exc}. Fix the {source.unit}, or set "
                    f"`invalid_rows: skip` to skip invalid rows and report them."
                ) from None
            skipped.append((number, str(exc)))
        except _TemplateUnstable as exc:
            raise _template_unstable_error(source, number, str(exc)) from None
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


def _build_examples(items, numbers, *, fmt, tokenizer, max_seq_length, source: _Source, stats: DataStats):
    """Tokenize, mask, truncate; fill the token counts of `stats`. Returns the examples as
    fullscale.tokenstore.Examples over int32 arrays: each chunk's token lists become arrays as soon
    as it is tokenized, so preparing never holds the whole data as Python ints."""
    import numpy as np

    from fullscale.tokenstore import Examples

    ids_parts, label_parts, lengths, rows = [], [], [], []
    try:
        chunks = (_tokenize_items_parallel_chunks(fmt, items, tokenizer) if len(items) >= PARALLEL_MIN_ROWS
                  else (_tokenize_items(fmt, items[i:i + _PARALLEL_CHUNK], tokenizer)
                        for i in range(0, len(items), _PARALLEL_CHUNK)))
        position = 0
        for encoded in chunks:
            chunk_numbers = numbers[position:position + len(encoded)]
            position += len(encoded)
            chunk_ids, chunk_labels = [], []
            for number, (ids, labels) in zip(chunk_numbers, encoded):
                truncated = len(ids) > max_seq_length
                ids, labels = ids[:max_seq_length], labels[:max_seq_length]
                num_label_tokens = len(labels) - labels.count(IGNORE_INDEX)
                # labels[0] never carries loss (the model predicts token t+1 from tokens <= t).
                if num_label_tokens - (labels[0] != IGNORE_INDEX) == 0:
                    stats.skipped.append((number, f"prompt longer than max_seq_length={max_seq_length}: nothing to learn"))
                    continue
                if truncated:
                    stats.truncated_rows.append(number)
                stats.num_tokens += len(ids)
                stats.num_label_tokens += num_label_tokens
                chunk_ids += ids
                chunk_labels += labels
                lengths.append(len(ids))
                rows.append(number)
            ids_parts.append(np.array(chunk_ids, dtype=np.int32))
            label_parts.append(np.array(chunk_labels, dtype=np.int32))
    except _TemplateUnstable as exc:
        raise _template_unstable_error(source, numbers[exc.index], str(exc)) from None
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    empty = np.zeros(0, dtype=np.int32)
    examples = Examples(np.concatenate(ids_parts) if ids_parts else empty,
                        np.concatenate(label_parts) if label_parts else empty, offsets,
                        np.asarray(rows, dtype=np.int64))
    stats.skipped.sort()
    stats.num_examples = len(examples)
    stats.num_skipped = len(stats.skipped)
    stats.num_truncated = len(stats.truncated_rows)
    return examples


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


def prepare_data(*, train_file, eval_file, eval_split: float, dataset_format: str, max_seq_length: int,
                 seed: int, tokenizer, invalid_rows: str = "skip", cache: bool = True,
                 columns: dict[str, str] | None = None) -> PreparedData:
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
    """
    _check_arguments(dataset_format=dataset_format, eval_split=eval_split, max_seq_length=max_seq_length,
                     invalid_rows=invalid_rows, train_file=train_file)
    settings = dict(train_file=train_file, eval_file=eval_file, eval_split=eval_split, dataset_format=dataset_format,
                    max_seq_length=max_seq_length, seed=seed, invalid_rows=invalid_rows, columns=columns or None)
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


def _prepare(*, train_file, eval_file, eval_split: float, dataset_format: str, max_seq_length: int,
             seed: int, tokenizer, invalid_rows: str, columns: dict[str, str] | None = None) -> PreparedData:
    """prepare_data without the cache."""
    messages: list[str] = []

    # 1. Read the train file and settle the format (eval_file must fit the same one).
    train_read = _mapped(_read(train_file), columns)
    train_source = _Source(str(train_file), train_read.unit)
    valid = [(n, row) for n, row, err in train_read.rows if err is None]
    if not valid:  # nothing to detect from: say why instead of "no columns"
        stats = DataStats(num_rows=len(train_read.rows), skipped=[(n, e) for n, _, e in train_read.rows])
        raise _no_examples_error(train_source.path, stats, fmt=dataset_format, unit=train_source.unit,
                                 max_seq_length=max_seq_length)
    fmt, detected = _choose_format(valid, path=train_source.path, dataset_format=dataset_format)
    if detected:
        messages.append(detected)
    _check_tokenizer(tokenizer, fmt)
    if tokenizer.eos_token_id is None and fmt not in CHAT_FORMATS:
        messages.append("the tokenizer has no eos_token: examples end without one, so the model will not learn "
                        "to stop")

    # 2. Validate and render rows (invalid ones are skipped or raise here), then split off eval.
    def convert(rows, source: _Source):
        if len(rows) >= PARALLEL_MIN_ROWS:
            return _convert_rows_parallel(rows, fmt=fmt, tokenizer=tokenizer, source=source, invalid_rows=invalid_rows)
        return _convert_rows(rows, fmt=fmt, tokenizer=tokenizer, source=source, invalid_rows=invalid_rows)

    items, numbers, skipped = convert(train_read.rows, train_source)
    train_part = _Part(train_source.path, train_source, len(train_read.rows), items, numbers, skipped)
    del train_read, valid   # the parsed rows: only their rendered texts are needed from here
    eval_part = None
    if not items:
        pass  # reported below with every skip reason
    elif eval_file is not None:
        eval_read = _mapped(_read(eval_file), columns)
        eval_source = _Source(str(eval_file), eval_read.unit)
        eval_valid = [(n, row) for n, row, err in eval_read.rows if err is None]
        required = REQUIRED_COLUMNS[fmt]
        column_sets = {frozenset(row) for _, row in eval_valid}
        if eval_valid and not any(all(c in cols for c in required) for cols in column_sets):
            found = set().union(*column_sets)
            detected = _match_format(found)
            theirs = f", which is dataset_format '{detected}'" if detected else ""
            raise DataError(
                f"{eval_source.path}: the eval data must be in the train data's format, '{fmt}' (columns "
                f"{', '.join(required)}), but its rows have the columns {', '.join(sorted(found)) or '(none)'}{theirs}. "
                f"Convert eval_file to '{fmt}' rows (or leave eval_file out to hold out eval_split of {train_source.path})")
        eval_part = _Part(eval_source.path, eval_source, len(eval_read.rows), *convert(eval_read.rows, eval_source))
    elif eval_split > 0 and len(items) >= 2:
        train_part, eval_part = _split_eval(train_part, eval_split=eval_split, seed=seed)
        messages.append(f"eval: {len(eval_part.items):,} of {len(items):,} valid rows of {train_source.path} held "
                        f"out (eval_split={eval_split}, seed={seed})")
    elif eval_split > 0:
        messages.append(f"eval: none (eval_split={eval_split} needs at least 2 valid rows, found {len(items)})")

    # 3. Tokenize, mask and truncate each part.
    results = []
    for part in (train_part, eval_part):
        if part is None:
            results.append((None, None))
            continue
        stats = DataStats(num_rows=part.num_rows, skipped=list(part.skipped))
        examples = _build_examples(part.items, part.numbers, fmt=fmt, tokenizer=tokenizer,
                                   max_seq_length=max_seq_length, source=part.source, stats=stats)
        messages.append(_summary(part.name, stats, unit=part.source.unit, max_seq_length=max_seq_length))
        if not examples:
            raise _no_examples_error(part.name, stats, fmt=fmt, unit=part.source.unit, max_seq_length=max_seq_length)
        results.append((examples, stats))
    (train, train_stats), (eval_examples, eval_stats) = results
    return PreparedData(train=train, eval=eval_examples, format=fmt, train_stats=train_stats,
                        eval_stats=eval_stats, messages=messages)


class _Part(NamedTuple):
    """One split's converted rows, before tokenization."""

    name: str  # how the console names it
    source: _Source
    num_rows: int  # rows of the file in this part, invalid ones included
    items: list
    numbers: list[int]
    skipped: list[tuple[int, str]]


def _split_eval(part: _Part, *, eval_split: float, seed: int) -> tuple[_Part, _Part]:
    """Hold out ceil(n * eval_split) valid rows (at least 1, at most n - 1), chosen by `seed`.

    Invalid rows stay with train (they belong to no split). Both parts keep file order.
    """
    n = len(part.items)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[: min(n - 1, max(1, math.ceil(n * eval_split)))])
    keep = [i for i in range(n) if i not in held_out]
    out = [i for i in range(n) if i in held_out]
    train = _Part(f"{part.name} (train split)", part.source, part.num_rows - len(out),
                  [part.items[i] for i in keep], [part.numbers[i] for i in keep], part.skipped)
    evaluation = _Part(f"{part.name} (eval split)", part.source, len(out),
                       [part.items[i] for i in out], [part.numbers[i] for i in out], [])
    return train, evaluation


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


def _map_in_workers(function, tasks: list, tokenizer, num_workers: int) -> list:
    """`function` over `tasks` in `num_workers` processes; results in task order. Fork where the
    platform has it (the tokenizer is inherited, not pickled), spawn elsewhere."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if sys.platform == "linux" else "spawn"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "fork() in a multi-threaded process": the
        # workers only run Python and the tokenizer, never the parent's threads (torch, CUDA)
        pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=multiprocessing.get_context(method),
                                   initializer=_init_worker, initargs=(tokenizer,))
        try:
            return list(pool.map(function, tasks))  # the first failure in task order raises here
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failure, the queued chunks are dropped


def _convert_chunk(task):
    rows, fmt, source, invalid_rows = task
    return _convert_rows(rows, fmt=fmt, tokenizer=_WORKER_TOKENIZER, source=source, invalid_rows=invalid_rows)


def _convert_rows_parallel(rows, *, fmt: str, tokenizer, source: _Source, invalid_rows: str):
    """_convert_rows in worker processes; the first invalid row in file order raises (under "error")."""
    tasks = [(rows[i:i + _PARALLEL_CHUNK], fmt, source, invalid_rows) for i in range(0, len(rows), _PARALLEL_CHUNK)]
    items, numbers, skipped = [], [], []
    for chunk_items, chunk_numbers, chunk_skipped in _map_in_workers(_convert_chunk, tasks, tokenizer,
                                                                     num_data_workers(len(rows))):
        items += chunk_items
        numbers += chunk_numbers
        skipped += chunk_skipped
    return items, numbers, skipped


def _tokenize_chunk(task):
    fmt, items, offset = task
    try:
        return _tokenize_items(fmt, items, _WORKER_TOKENIZER)
    except _TemplateUnstable as exc:  # its index does not survive pickling: send it back as a value
        return ("unstable", str(exc), offset + exc.index)


def _tokenize_items_parallel_chunks(fmt: str, items: list, tokenizer):
    """_tokenize_items over chunks in worker processes, yielded chunk by chunk in order (the caller
    turns each into arrays before the next arrives)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    tasks = [(fmt, items[i:i + _PARALLEL_CHUNK], i) for i in range(0, len(items), _PARALLEL_CHUNK)]
    method = "fork" if sys.platform == "linux" else "spawn"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pool = ProcessPoolExecutor(max_workers=num_data_workers(len(items)),
                                   mp_context=multiprocessing.get_context(method),
                                   initializer=_init_worker, initargs=(tokenizer,))
        try:
            for result in pool.map(_tokenize_chunk, tasks):
                if isinstance(result, tuple) and result and result[0] == "unstable":
                    raise _TemplateUnstable(result[1], result[2])
                yield result
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

CACHE_VERSION = 2  # bump when the cached layout or meaning changes (2: the memory-mapped token store)


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
              invalid_rows: str, tokenizer, columns: dict[str, str] | None = None) -> str:
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
    _digest_path(train_file, h)
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
