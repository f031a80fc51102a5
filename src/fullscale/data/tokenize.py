"""Tokenization: texts to ids (the Rust encoder when it agrees), prompt masking and truncation a
chunk of rows at a time, in worker processes for large data, into flat arrays spilled to disk."""

from __future__ import annotations

import gc
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from fullscale.data.cache import cache_dir
from fullscale.data.formats import _TemplateUnstable, _convert_rows, _template_unstable_error
from fullscale.data.readers import _JsonlRows, _MappedRows, _parse_json_line
from fullscale.data.records import IGNORE_INDEX, DataStats, _Source

_TOKENIZE_CHUNK = 2048  # texts per tokenizer call: fast batching without holding everything twice
PARALLEL_MIN_ROWS = 50_000  # rows from which conversion and tokenization run in worker processes
_PARALLEL_CHUNK = 4096  # rows per worker task


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



TOO_LONG = "prompt of {} tokens, longer than max_seq_length={}: nothing to learn (needs max_seq_length >= {})"


def _prepare_chunk(rows, *, fmt: str, tokenizer, source: _Source, invalid_rows: str, max_seq_length: int,
                   alpaca: tuple[str, str | None] | None = None) -> dict:
    """Convert, tokenize, mask and truncate one chunk of rows. Returns compact arrays (what a worker
    sends back): per converted item its row number, whether it was kept, too long or truncated, its
    tokens and label tokens; the kept items' ids and labels, flat int32; the invalid rows skipped.
    Raises DataError at the first invalid row under invalid_rows="error"; a template that is not
    stable comes back as ("unstable", detail, row number)."""
    import numpy as np

    items, numbers, skipped = _convert_rows(rows, fmt=fmt, tokenizer=tokenizer, source=source,
                                            invalid_rows=invalid_rows, alpaca=alpaca)
    try:
        encoded = _tokenize_items(fmt, items, tokenizer)
    except _TemplateUnstable as exc:
        return {"unstable": (str(exc), numbers[exc.index])}
    n = len(encoded)
    kept = np.zeros(n, dtype=bool)
    truncated = np.zeros(n, dtype=bool)
    tokens = np.zeros(n, dtype=np.int64)
    label_tokens = np.zeros(n, dtype=np.int64)
    needed = np.zeros(n, dtype=np.int64)   # too long: the max_seq_length that keeps one label token
    flat_ids: list[int] = []
    flat_labels: list[int] = []
    for i, (ids, labels) in enumerate(encoded):
        truncated[i] = len(ids) > max_seq_length
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        num_label_tokens = len(labels) - labels.count(IGNORE_INDEX)
        # labels[0] never carries loss (the model predicts token t+1 from tokens <= t).
        if num_label_tokens - (labels[0] != IGNORE_INDEX) == 0:
            truncated[i] = False
            full = encoded[i][1]
            needed[i] = next((p + 1 for p in range(1, len(full)) if full[p] != IGNORE_INDEX), len(full) + 1)
            continue
        kept[i] = True
        tokens[i], label_tokens[i] = len(ids), num_label_tokens
        flat_ids += ids
        flat_labels += labels
    return {"numbers": np.asarray(numbers, dtype=np.int64), "skipped": skipped, "kept": kept, "truncated": truncated,
            "tokens": tokens, "label_tokens": label_tokens, "needed": needed, "ids": np.array(flat_ids, dtype=np.int32),
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
    needed: Any                        # for the items too long to keep: the max_seq_length they need
    block: Any                         # fullscale.data.store.Examples over the kept items
    kept_rank: Any                     # item index -> its position in `block` (for kept items)


def _chunks(rows, size: int):
    from itertools import islice

    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def _convert_and_tokenize(rows, *, num_rows: int, fmt: str, tokenizer, source: _Source, invalid_rows: str,
                          max_seq_length: int, alpaca: tuple[str, str | None] | None = None) -> _Tokenized:
    """Every row, a chunk at a time (in worker processes from PARALLEL_MIN_ROWS rows on), into arrays:
    neither the parsed rows nor their texts nor Python token lists are ever held for the whole file."""
    import numpy as np

    from fullscale.data.store import Examples

    settings = dict(fmt=fmt, source=source, invalid_rows=invalid_rows, max_seq_length=max_seq_length, alpaca=alpaca)
    workers = num_data_workers(num_rows)
    if workers:
        results = _in_workers(_worker_chunks(rows, _PARALLEL_CHUNK), settings, tokenizer, workers)
    else:
        results = (_prepare_chunk(chunk, tokenizer=tokenizer, **settings) for chunk in _chunks(rows, _PARALLEL_CHUNK))
    parts: dict[str, list] = {k: [] for k in ("numbers", "kept", "truncated", "tokens", "label_tokens", "needed")}
    skipped: list[tuple[int, str]] = []
    # The tokens go to unnamed temporary files as they come and are mapped back at the end: the
    # process's resident memory holds a chunk of them at a time, never the whole data.
    where = cache_dir() if cache_dir() and cache_dir().is_dir() else None   # beside the store, else the temp dir
    spill = {key: tempfile.TemporaryFile(dir=where) for key in ("ids", "labels")}
    try:
        for result in results:
            if "unstable" in result:
                detail, number = result["unstable"]
                raise _template_unstable_error(source, number, detail)
            skipped += result["skipped"]
            for key in parts:
                parts[key].append(result[key])
            for key in spill:
                spill[key] = _spill(spill[key], result[key], where)
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
                      needed=joined("needed", np.int64), block=block, kept_rank=np.cumsum(kept) - 1)


def _spill(fh, array, where: Path | None):
    """Append `array` to the spill file `fh`; returns the file to go on with. When the cache's disk
    is full, what was written moves to the system's temporary directory and the writing goes on
    there (a full cache disk never stops a run); a full temporary directory is a DiskSpaceError."""
    start = fh.tell()
    try:
        array.tofile(fh)
        return fh
    except OSError as exc:   # numpy says "N requested and M written", without an errno
        failure = exc
    from fullscale.checkpoint import disk_error

    if where is None:
        raise disk_error(Path(tempfile.gettempdir()), failure, what="the tokenized data (temporary files)",
                         needed=array.nbytes) from None
    moved = tempfile.TemporaryFile()
    fh.flush()
    fh.seek(0)
    left = start
    while left:
        block = fh.read(min(left, 1 << 24))
        moved.write(block)
        left -= len(block)
    fh.close()
    return _spill(moved, array, None)


def _map_back(fh, dtype):
    import numpy as np

    count = fh.seek(0, os.SEEK_END) // np.dtype(dtype).itemsize
    return np.memmap(fh, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype=dtype)


def _part(tok: _Tokenized, items, *, name: str, num_rows: int, skipped: list, max_seq_length: int):
    """(examples, stats) of the items `items` (indices, file order) of `tok`."""
    import numpy as np

    from fullscale.data.store import Examples

    items = np.asarray(items, dtype=np.int64)
    kept = tok.kept[items]
    too_long = items[~kept]
    stats = DataStats(num_rows=num_rows, skipped=list(skipped) + [
        (int(n), TOO_LONG.format(int(need) - 1, max_seq_length, int(need)))
        for n, need in zip(tok.numbers[too_long], tok.needed[too_long])])
    stats.needed_length = int(tok.needed[too_long].min()) if len(too_long) else None
    stats.skipped.sort()
    stats.truncated_rows = [int(n) for n in tok.numbers[items[tok.truncated[items]]]]
    stats.num_tokens = int(tok.tokens[items].sum())
    stats.num_label_tokens = int(tok.label_tokens[items].sum())
    index = tok.kept_rank[items[kept]]
    block = tok.block
    whole = len(index) == len(block) and (len(index) == 0 or bool((index == np.arange(len(index))).all()))
    examples = block if whole else Examples(block.input_ids, block.labels, block.offsets, block.rows, index=index,
                                            guard=getattr(block, "guard", None))
    stats.num_examples = len(examples)
    stats.num_skipped = len(stats.skipped)
    stats.num_truncated = len(stats.truncated_rows)
    return examples, stats



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
