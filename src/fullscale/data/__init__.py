"""Data: read a source's rows, convert them to token ids with the prompt masked out of the labels,
truncate, split off an eval set, store the result in a memory-mapped token store, and collate
batches. One module per stage:

    readers    rows from a file, a directory, a datasets save_to_disk dir or a hub id, lazily
    formats    detect the format from the columns, validate a row, render it to text (chat
               templates, assistant spans)
    tokenize   texts to ids, prompt masking, truncation, a chunk at a time (worker processes for
               large data) into flat arrays
    store      the token store: flat int32 arrays + offsets in one file, memory-mapped by every
               process (`Examples`, `Mixture`)
    cache      one store per (data contents, tokenizer, settings), written atomically, reused
    prepare    the entry points: prepare_data (one source), prepare_mix (sources by weight),
               prepare_for (a run's config); statistics and the console report
    batching   padding a batch (packed rows: fullscale.packing)

Nothing is dropped or cut silently: every skipped row and every truncated row is counted
with its row number (its line number for .jsonl), and the counts go to the console.
A bad row is skipped and reported (``invalid_rows: skip``) or stops the run with a
`DataError` naming the file and row (``invalid_rows: error``).
"""

from fullscale.data.batching import collate
from fullscale.data.cache import CACHE_VERSION, cache_dir, cache_key, tokenizer_fingerprint
from fullscale.data.formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    CHAT_FORMATS,
    FORMATS,
    REQUIRED_COLUMNS,
    alpaca_templates,
    detect_format,
    format_alpaca_prompt,
)
from fullscale.data.prepare import eval_split_size, mixed_count, prepare_data, prepare_for, prepare_mix
from fullscale.data.readers import SUPPORTED_FILES, count_rows, dataset_fingerprint, load_rows
from fullscale.data.records import IGNORE_INDEX, INVALID_ROWS, DataStats, PreparedData
from fullscale.data.tokenize import PARALLEL_MIN_ROWS, num_data_workers
from fullscale.packing import PackingStats, collate_packed, pack_examples

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_WITH_INPUT", "CACHE_VERSION", "CHAT_FORMATS", "FORMATS", "IGNORE_INDEX",
    "INVALID_ROWS", "PARALLEL_MIN_ROWS", "REQUIRED_COLUMNS", "SUPPORTED_FILES", "DataStats", "alpaca_templates", "PackingStats",
    "PreparedData", "cache_dir", "cache_key", "collate", "collate_packed", "count_rows", "dataset_fingerprint",
    "detect_format", "eval_split_size", "format_alpaca_prompt", "load_rows", "mixed_count", "num_data_workers", "pack_examples",
    "prepare_data", "prepare_for", "prepare_mix", "tokenizer_fingerprint",
]
