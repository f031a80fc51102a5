"""Preparing the data of a run: read, detect the format, convert and tokenize every row, split
off eval, report (row numbers, skips, truncations), cache in the token store; several sources
mixed by weight."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

from fullscale.data.store import mixed_count  # noqa: F401 - re-exported (fullscale.data)
from fullscale.data.cache import _load_cached, _return_freed_memory, _save_cached, cache_dir, cache_key
from fullscale.data.formats import (CHAT_FORMATS, FORMATS, REQUIRED_COLUMNS, _choose_format_from, _match_format,
                                    alpaca_templates)
from fullscale.data.readers import SUPPORTED_FILES, _mapped, _read
from fullscale.data.records import IGNORE_INDEX, INVALID_ROWS, DataStats, PreparedData, _Source
from fullscale.data.tokenize import _convert_and_tokenize, _part
from fullscale.errors import ConfigError, DataError

_MAX_LISTED = 5  # row numbers listed per category in console messages


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
    at_least = f" to at least {stats.needed_length}" if stats.needed_length else ""
    shorter = (" (or a shorter alpaca_template: the classic one adds about 200 characters to each prompt)"
               if fmt == "alpaca" else "")
    fix = (f"Increase max_seq_length (now {max_seq_length}){at_least}, or shorten the prompts{shorter}."
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
    from fullscale.config import train_data, train_sources

    common = dict(max_seq_length=config.max_seq_length, seed=config.seed, tokenizer=tokenizer,
                  invalid_rows=config.invalid_rows, alpaca=run_alpaca_templates(config))
    if isinstance(config.train_file, list):
        return prepare_mix(train_sources(config), eval_file=config.eval_file, eval_split=config.eval_split,
                           **common)
    return prepare_data(train_file=train_data(config), eval_file=config.eval_file,
                        eval_split=config.eval_split, dataset_format=config.dataset_format,
                        columns=config.dataset_columns, dataset_config=config.dataset_config,
                        dataset_split=config.dataset_split, **common)


def run_alpaca_templates(config) -> tuple[str, str | None] | None:
    """The run's Alpaca templates (None: the classic pair)."""
    if config.alpaca_template is None and config.alpaca_template_with_input is None:
        return None
    return alpaca_templates(config.alpaca_template, config.alpaca_template_with_input)


def eval_split_size(num: int, eval_split: float) -> int:
    """Rows held out of `num` valid rows for evaluation: ceil(num * eval_split), at least one, and
    at least one left to train on (none below two rows)."""
    if eval_split <= 0 or num < 2:
        return 0
    return min(num - 1, max(1, math.ceil(num * eval_split)))


def _mixed_stats(parts: list[tuple[str, Any, DataStats]], counts: list) -> DataStats:
    """One DataStats for a mix: rows, skips and truncations summed (reasons name their source),
    tokens and label tokens of the examples as mixed (repeats counted)."""
    from fullscale.data.store import lengths_of

    out = DataStats()
    for (name, examples, stats), count in zip(parts, counts):
        out.num_rows += stats.num_rows
        out.num_skipped += stats.num_skipped
        out.num_truncated += stats.num_truncated
        out.skipped += [(n, f"{name}: {why}") for n, why in stats.skipped]
        out.truncated_rows += stats.truncated_rows
        out.num_examples += int(count.sum())
        lengths = lengths_of(examples)
        out.num_tokens += int((lengths * count).sum())
        out.num_label_tokens += int((examples.label_counts(IGNORE_INDEX) * count).sum())
    return out


def prepare_mix(sources: list[dict], *, eval_file, eval_split: float, max_seq_length: int, seed: int,
                tokenizer, invalid_rows: str = "skip", cache: bool = True,
                alpaca: tuple[str, str | None] | None = None) -> PreparedData:
    """Several train sources (config.train_sources entries), each prepared as prepare_data does (its
    own format, store, skip report by row number), mixed by weight into one train split.

    A source of weight w gives mixed_count(n, w) of its n examples an epoch (the sampler shuffles
    the mix); the fractional part is a sample drawn anew each epoch. Without eval_file, each source holds out eval_split of its own rows and the eval
    split is all of them, unweighted; an eval_file is prepared on its own (its format detected)."""
    import numpy as np

    from fullscale.data.store import Mixture, mixed_positions

    messages: list[str] = []
    trains, evals, formats, from_store = [], [], [], []
    for k, source in enumerate(sources):
        data = prepare_data(train_file=source["path"], eval_file=None,
                            eval_split=0.0 if eval_file else eval_split, dataset_format=source["dataset_format"],
                            max_seq_length=max_seq_length, seed=seed, tokenizer=tokenizer, invalid_rows=invalid_rows,
                            cache=cache, columns=source["dataset_columns"], dataset_config=source["dataset_config"],
                            dataset_split=source["dataset_split"], alpaca=alpaca)
        messages += data.messages
        formats.append(data.format)
        from_store.append(data.from_store)
        trains.append((str(source["path"]), data.train, data.train_stats, source["weight"]))
        if data.eval is not None:
            evals.append((str(source["path"]), data.eval, data.eval_stats))
    if eval_file:
        held = prepare_data(train_file=eval_file, eval_file=None, eval_split=0.0, dataset_format="auto",
                            max_seq_length=max_seq_length, seed=seed, tokenizer=tokenizer, invalid_rows=invalid_rows,
                            cache=cache, alpaca=alpaca)
        messages += held.messages
        from_store.append(held.from_store)
        evals = [(str(eval_file), held.train, held.train_stats)]
    positions = [mixed_positions(len(ex), w, seed + k) for k, (_, ex, _, w) in enumerate(trains)]
    counts = [np.bincount(p, minlength=len(ex)) for p, (_, ex, _, _) in zip(positions, trains)]
    which = np.concatenate([np.full(len(p), k, dtype=np.int32) for k, p in enumerate(positions)])
    # A fractional weight samples its fraction anew each epoch (seeded by the epoch): the sampler
    # calls set_epoch, and every epoch the source gives the same number of examples.
    fractions, start = [], 0
    for k, ((_, ex, _, w), p) in enumerate(zip(trains, positions)):
        if w != int(w):
            fractions.append((start, start + len(p), len(ex), w, seed + k))
        start += len(p)
    train = Mixture([ex for _, ex, _, _ in trains], which, np.concatenate(positions), fractions=fractions)
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
                 dataset_split: str = "train", alpaca: tuple[str, str | None] | None = None) -> PreparedData:
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
    - `alpaca`: the (template, template with input) of alpaca rows (None: the classic pair).
    """
    _check_arguments(dataset_format=dataset_format, eval_split=eval_split, max_seq_length=max_seq_length,
                     invalid_rows=invalid_rows, train_file=train_file)
    settings = dict(train_file=train_file, eval_file=eval_file, eval_split=eval_split, dataset_format=dataset_format,
                    max_seq_length=max_seq_length, seed=seed, invalid_rows=invalid_rows, columns=columns or None,
                    dataset_config=dataset_config, dataset_split=dataset_split, alpaca=alpaca)
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
             dataset_config: str | None = None, dataset_split: str = "train",
             alpaca: tuple[str, str | None] | None = None) -> PreparedData:
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
    work = dict(fmt=fmt, tokenizer=tokenizer, invalid_rows=invalid_rows, max_seq_length=max_seq_length, alpaca=alpaca)
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
        held[order[:eval_split_size(n, eval_split)]] = True
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


def check_invalid_share(data: PreparedData, config) -> None:
    """A few bad rows are skipped and reported; a file that is mostly bad is a wrong file or format."""
    checked = [(f"train_file {name}", stats) for name, stats in data.sources] if data.sources else [
        ("train_file", data.train_stats)]
    for name, stats in checked + [("eval_file", data.eval_stats)]:
        if stats is None or not stats.num_rows or config.invalid_rows != "skip":
            continue
        share = stats.num_skipped / stats.num_rows
        if share > config.max_invalid_share:
            reasons = "; ".join(f"row {n}: {why}" for n, why in stats.skipped[:3])
            raise DataError(
                f"{name}: {stats.num_skipped:,} of {stats.num_rows:,} rows ({100 * share:.0f}%) are invalid and would "
                f"be skipped, more than max_invalid_share={config.max_invalid_share:g} (first reasons: {reasons}). "
                "Check the file and dataset_format; raise max_invalid_share to train on the valid rows anyway")
