"""Reading rows from a source: JSON Lines (lazily, line by line), JSON, CSV, Parquet, a datasets
save_to_disk directory, a hub dataset id or a directory of data files (datasets.load_dataset).
Each row comes as (row number, row or None, reason it is invalid or None); a column mapping
renames a source's columns to the format's as the rows are read."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from fullscale.config import is_hub_name
from fullscale.errors import DataError

SUPPORTED_FILES = ".jsonl, .json, .csv, .parquet, or a directory written by datasets' save_to_disk"


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
        return number, None, f"invalid JSON at column {exc.colno}: {exc.msg.rstrip(' :')}"
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
