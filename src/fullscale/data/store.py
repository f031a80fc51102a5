"""The token store: tokenized examples as flat arrays in one file, memory-mapped by every process.

Python lists of ints cost ~45-75 bytes a token, in every rank and again in every DataLoader
worker that touches them. The store holds each split as four arrays (token ids and labels as
int32, example offsets as int64, source row numbers as int64) in one file:

    FSTORE01 | header length (8 bytes, little endian) | header JSON | arrays, each 64-byte aligned

The header holds the arrays' dtypes, offsets and lengths, the cache key, the data statistics and
the console messages. A split is a block of arrays, or an index into one: the train and eval
splits of one file share its block. Readers map the arrays read-only (np.memmap): resident memory does not grow
with the data, ranks of one node and their DataLoader workers share the same page cache, and a
warm start opens the file instead of rebuilding lists. It is written to a temporary file, fsynced
and renamed into place (a reader sees a whole store or none); one whose header, sizes or key do
not check out is not used (the caller rebuilds it). No pickle: a store cannot run code.

`Examples` is a split as a sequence: `examples[i]` is {"input_ids", "labels", "row"} with lists
made on access (a batch's worth at a time), `examples.lengths()` the token counts without touching
the tokens.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"FSTORE01"
ALIGN = 64
SPLITS = ("train", "eval")
FIELDS = (("input_ids", np.int32), ("labels", np.int32), ("offsets", np.int64), ("rows", np.int64))


class _Split(Sequence):
    """A sequence of examples {"input_ids", "labels", "row"} made on access (a batch's worth at a
    time): indexing, slices and equality like a list; subclasses give `_item(i)` for 0 <= i < len."""

    def _item(self, i: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._item(i)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(self[i] == other[i] for i in range(len(self)))

    __hash__ = None  # sequence semantics, like list


class StoreGuard:
    """The store file an Examples maps, and its size when opened: a file cut shorter under a live
    run (by something else) would kill it with SIGBUS at the first page past the new end; checked
    before each example is read (one fstat), it is a DataError that says what happened."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = Path(path), size
        self.fd: int | None = os.open(path, os.O_RDONLY)   # the mapped inode, even if the path is replaced

    def check(self) -> None:
        if self.fd is None:   # unpickled in another process (spawned DataLoader workers)
            self.fd = os.open(self.path, os.O_RDONLY)
        if os.fstat(self.fd).st_size < self.size:
            from fullscale.errors import DataError

            raise DataError(
                f"the token store {self.path} was cut short while this run read it ({os.fstat(self.fd).st_size:,} "
                f"of {self.size:,} bytes): something else wrote to or truncated it (a cleanup job, a full "
                "disk?). Run the same command again: a store that does not check out is rebuilt, and the run "
                "resumes from its last checkpoint")

    def __getstate__(self):
        return {"path": self.path, "size": self.size, "fd": None}

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass


class Examples(_Split):
    """Examples over a block of arrays (a token store's, or in memory), optionally a choice of them
    (`index`: positions in the block, e.g. the train split of a file whose other rows are eval)."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, rows: np.ndarray,
                 index: np.ndarray | None = None, guard: StoreGuard | None = None):
        self.input_ids, self.labels, self.offsets, self.rows = input_ids, labels, offsets, rows
        self.index = index
        self.guard = guard

    def __len__(self) -> int:
        return len(self.rows) if self.index is None else len(self.index)

    def _item(self, i: int) -> dict:
        if self.guard is not None:
            self.guard.check()
        j = i if self.index is None else int(self.index[i])
        a, b = int(self.offsets[j]), int(self.offsets[j + 1])
        return {"input_ids": self.input_ids[a:b].tolist(), "labels": self.labels[a:b].tolist(),
                "row": int(self.rows[j])}

    def lengths(self) -> np.ndarray:
        """Tokens of each example (int64), read from the offsets only."""
        sizes = np.diff(self.offsets)
        return sizes if self.index is None else sizes[self.index]

    def label_counts(self, ignore_index: int = -100) -> np.ndarray:
        """Tokens with loss in each example (int64), one pass over the labels."""
        marks = np.concatenate([[0], np.cumsum(self.labels != ignore_index, dtype=np.int64)])
        counts = marks[self.offsets[1:]] - marks[self.offsets[:-1]]
        return counts if self.index is None else counts[self.index]

    def __repr__(self) -> str:
        return f"Examples({len(self)} examples)"


def mixed_count(num: int, weight: float) -> int:
    """Examples a source of `num` examples gives an epoch at `weight`: every one floor(weight)
    times, plus a seeded sample of the fraction (at least one example from a source that has any)."""
    whole = math.floor(weight)
    return max(1 if num else 0, whole * num + round((weight - whole) * num))


def mixed_positions(num: int, weight: float, seed: int, epoch: int = 0) -> np.ndarray:
    """The positions (into a source's examples) that the mix takes in `epoch`: every example
    floor(weight) times, plus the fraction's sample, drawn from (seed, epoch); sorted."""
    whole = math.floor(weight)
    extra = mixed_count(num, weight) - whole * num
    taken = np.tile(np.arange(num, dtype=np.int64), whole)
    if extra:
        rng = np.random.default_rng(seed if epoch == 0 else [seed, epoch])
        taken = np.concatenate([taken, np.sort(rng.choice(num, size=extra, replace=False))])
    return np.sort(taken, kind="stable")


class Mixture(_Split):
    """Examples drawn from several splits (a mix of sources, each its own store): example i is
    example `positions[i]` of split `parts[which[i]]`. A source of fractional weight takes a new
    sample of its fraction each epoch (set_epoch): `fractions` holds (start, end, examples in the
    source, weight, seed) of each such source's block."""

    def __init__(self, parts: list, which: np.ndarray, positions: np.ndarray, *,
                 fractions: list[tuple[int, int, int, float, int]] | None = None):
        self.parts, self.which, self.positions = parts, which, positions
        self.fractions, self.epoch = fractions or [], 0

    @property
    def resamples(self) -> bool:
        return bool(self.fractions)

    def set_epoch(self, epoch: int) -> None:
        """The examples of `epoch`: the same count from each source, the fractions drawn anew."""
        if epoch == self.epoch or not self.fractions:
            return
        self.positions = self.positions.copy()
        for start, end, num, weight, seed in self.fractions:
            self.positions[start:end] = mixed_positions(num, weight, seed, epoch)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.positions)

    def _item(self, i: int) -> dict:
        return self.parts[int(self.which[i])][int(self.positions[i])]

    def lengths(self) -> np.ndarray:
        out = np.empty(len(self), dtype=np.int64)
        for k, part in enumerate(self.parts):
            mine = self.which == k
            out[mine] = lengths_of(part)[self.positions[mine]]
        return out

    def __repr__(self) -> str:
        return f"Mixture({len(self)} examples from {len(self.parts)} sources)"


def lengths_of(examples) -> np.ndarray:
    """Token counts of a split (int64): from the store's offsets when it is one, else counted."""
    if isinstance(examples, (Examples, Mixture)):
        return examples.lengths()
    return np.fromiter((len(ex["input_ids"]) for ex in examples), dtype=np.int64, count=len(examples))


def example_lengths(examples) -> list[int]:
    """Token counts of a split, as a list."""
    return lengths_of(examples).tolist()


def _block_of(examples) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """(the block's four arrays, the index into it or None) of a split given as Examples or a list."""
    if isinstance(examples, Examples):
        return ({"input_ids": examples.input_ids, "labels": examples.labels, "offsets": examples.offsets,
                 "rows": examples.rows}, examples.index)
    n = len(examples)
    lengths = lengths_of(examples)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.empty(int(offsets[-1]), dtype=np.int32)
    labels = np.empty(int(offsets[-1]), dtype=np.int32)
    for i, ex in enumerate(examples):   # one example at a time: no second full copy as Python ints
        ids[offsets[i]:offsets[i + 1]] = ex["input_ids"]
        labels[offsets[i]:offsets[i + 1]] = ex["labels"]
    rows = np.fromiter((ex["row"] for ex in examples), dtype=np.int64, count=n)
    return {"input_ids": ids, "labels": labels, "offsets": offsets, "rows": rows}, None


def write(path: Path, splits: dict[str, Any], header: dict[str, Any]) -> None:
    """Write the splits (each a list of examples, Examples, or None) and `header` to `path` atomically.
    Splits that are choices of one block (a train and an eval split of one file) share it on disk."""
    layout: dict[str, Any] = {"blocks": {}, "splits": {}}
    blobs, position, blocks = [], 0, {}

    def place(key: str, data: np.ndarray, dtype) -> dict:
        nonlocal position
        data = np.asarray(data)
        if data.dtype != np.dtype(dtype):
            data = data.astype(dtype)
        position = -(-position // ALIGN) * ALIGN
        spec = {"dtype": np.dtype(dtype).str, "offset": position, "length": int(len(data))}
        blobs.append((position, data))
        position += data.nbytes
        return spec

    for name in SPLITS:
        if splits.get(name) is None:
            continue
        arrays, index = _block_of(splits[name])
        ident = id(arrays["input_ids"])
        if ident not in blocks:
            blocks[ident] = f"b{len(blocks)}"
            layout["blocks"][blocks[ident]] = {field: place(f"{blocks[ident]}.{field}", arrays[field], dtype)
                                               for field, dtype in FIELDS}
        split = {"block": blocks[ident]}
        if index is not None:
            split["index"] = place(f"{name}.index", index, np.int64)
        layout["splits"][name] = split
    body = json.dumps({**header, "arrays": layout}).encode()
    start = -(-(len(MAGIC) + 8 + len(body)) // ALIGN) * ALIGN
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(MAGIC + len(body).to_bytes(8, "little") + body)
            for offset, data in blobs:
                fh.seek(start + offset)
                for i in range(0, len(data), 1 << 22):   # in slices: a memory-mapped source stays mapped
                    np.ascontiguousarray(data[i:i + (1 << 22)]).tofile(fh)
            fh.truncate(start + position)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)   # atomic: concurrent writers each put a whole file in place
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header and where the arrays start; ValueError when the file is not a whole store."""
    with open(path, "rb") as fh:
        if fh.read(len(MAGIC)) != MAGIC:
            raise ValueError("not a fullscale token store")
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size < 1 << 30:
            raise ValueError("bad header size")
        header = json.loads(fh.read(size).decode())
    start = -(-(len(MAGIC) + 8 + size) // ALIGN) * ALIGN
    return header, start


def open_splits(path: Path) -> tuple[dict[str, Any], dict[str, Examples]]:
    """(header, {split: Examples}) of the store at `path`, memory-mapped; ValueError when it is damaged."""
    header, start = read_header(path)
    file_size = path.stat().st_size

    def mapped(spec: dict, dtype) -> np.ndarray:
        if np.dtype(spec["dtype"]) != np.dtype(dtype):
            raise ValueError(f"an array has dtype {spec['dtype']}")
        begin, count = start + spec["offset"], spec["length"]
        if begin + count * np.dtype(dtype).itemsize > file_size:
            raise ValueError("an array runs past the end of the file (truncated)")
        return np.memmap(path, dtype=dtype, mode="r", offset=begin, shape=(count,)) if count else np.zeros(0, dtype)

    layout = header["arrays"]
    blocks = {}
    for name, fields in layout["blocks"].items():
        arrays = {field: mapped(fields[field], dtype) for field, dtype in FIELDS}
        offsets = arrays["offsets"]
        if len(offsets) != len(arrays["rows"]) + 1 or int(offsets[-1]) != len(arrays["input_ids"]) \
                or len(arrays["labels"]) != len(arrays["input_ids"]) or int(offsets[0]) != 0:
            raise ValueError(f"inconsistent arrays in block {name}")
        blocks[name] = arrays
    out = {}
    guard = StoreGuard(path, file_size)
    for name, split in layout["splits"].items():
        index = mapped(split["index"], np.int64) if "index" in split else None
        arrays = blocks[split["block"]]
        if index is not None and len(index) and (int(index.max()) >= len(arrays["rows"]) or int(index.min()) < 0):
            raise ValueError(f"the {name} index points outside its block")
        out[name] = Examples(**arrays, index=index, guard=guard)
    return header, out
