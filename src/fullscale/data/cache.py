"""The tokenization cache: one token store per (data contents, tokenizer, settings)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from fullscale.config import is_hub_name
from fullscale.data.readers import dataset_fingerprint
from fullscale.data.records import DataStats, PreparedData
from fullscale.data.store import open_splits
from fullscale.data.store import write as write_store
from fullscale.fingerprint import cache_root, digest_path, tokenizer_fingerprint

# --------------------------------------------------------------------------------------
# Tokenization cache
#
# One file per (data contents, tokenizer, settings): <cache_dir>/<key>.npz holding every
# example's tokens, labels and row number as flat int arrays plus a JSON record of the format,
# statistics and console messages. No pickle: a cache file cannot run code. Written to a
# temporary file and renamed into place, so a reader sees a whole entry or none; an entry that
# cannot be read (truncated, corrupt, from another version) is rebuilt.

CACHE_VERSION = 4  # bump when the cached layout or meaning changes (3: the memory-mapped token store, 4: needed lengths)


def _code_digest() -> str:
    """The data stages' own code: a change in how rows become tokens makes new entries."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def cache_dir() -> Path | None:
    """Where tokenized data is cached: $FULLSCALE_CACHE/tokenized, else
    $XDG_CACHE_HOME/fullscale/tokenized (~/.cache/fullscale/tokenized). None when
    FULLSCALE_CACHE is off (or 0, false, none): caching disabled."""
    root = cache_root()
    return root / "tokenized" if root is not None else None


def cache_key(*, train_file, eval_file, eval_split: float, dataset_format: str, max_seq_length: int, seed: int,
              invalid_rows: str, tokenizer, columns: dict[str, str] | None = None, dataset_config: str | None = None,
              dataset_split: str = "train", alpaca: tuple[str, str | None] | None = None) -> str:
    """The cache entry's name: a hash of everything prepare_data's result depends on. The seed
    and eval_split count only when they choose the eval split (no eval_file)."""
    import tokenizers
    import transformers

    splits = eval_file is None and eval_split > 0
    h = hashlib.sha256()
    h.update(json.dumps({
        "version": CACHE_VERSION, "code": _code_digest(),
        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "dataset_format": dataset_format, "max_seq_length": max_seq_length, "invalid_rows": invalid_rows,
        "eval_split": eval_split if splits else None, "seed": seed if splits else None,
        "train_name": Path(train_file).name, "eval_name": Path(eval_file).name if eval_file else None,
        "tokenizer": tokenizer_fingerprint(tokenizer), "columns": columns or None, "alpaca": alpaca,
    }, sort_keys=True).encode())
    # The contents, not the path: a moved or copied file hits, an edited one misses. (The file
    # names are in the key because messages and errors quote them.)
    if Path(train_file).exists() or not is_hub_name(str(train_file)):
        digest_path(train_file, h)   # (a missing file raises OSError: prepare_data then says which)
    else:   # a hub dataset: datasets' fingerprint of its cached files, and which part of it
        h.update(dataset_fingerprint(str(train_file), dataset_config, dataset_split).encode())
    h.update(b"\0eval\0")
    if eval_file is not None:
        digest_path(eval_file, h)
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
    meta = {"version": CACHE_VERSION, "key": key, "format": data.format, "has_eval": data.eval is not None,
            "train_stats": asdict(data.train_stats),
            "eval_stats": asdict(data.eval_stats) if data.eval_stats is not None else None,
            "messages": list(data.messages), "files": files}
    write_store(path, {"train": data.train, "eval": data.eval}, meta)


def _load_cached(path: Path, key: str, *, files: dict[str, str | None]) -> PreparedData:
    """The cached result, memory-mapped (fullscale.data.store); its messages name this call's files
    (the same contents may have been cached from another directory)."""
    meta, splits = open_splits(path)
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
