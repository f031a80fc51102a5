"""The tokenization cache of prepare_data: a hit returns identical data, anything that changes the
result misses, a corrupt entry is rebuilt, and the worker-process path gives the serial result."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

from tiny import make_tokenizer  # noqa: E402

import fullscale.data.tokenize as data_module  # noqa: E402
from fullscale.data import cache_dir, prepare_data  # noqa: E402
from fullscale.errors import DataError  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FULLSCALE_CACHE", str(tmp_path / "cache"))  # never the real ~/.cache


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"say {i} " + "x" * (i % 23)},
                          {"role": "assistant", "content": f"{i} " + "y" * (i % 17)}]} for i in range(n)]


def prepare(path, tokenizer, **over):
    kwargs = dict(train_file=path, eval_file=None, eval_split=0.1, dataset_format="auto", max_seq_length=64,
                  seed=0, tokenizer=tokenizer, invalid_rows="skip")
    kwargs.update(over)
    return prepare_data(**kwargs)


def same_data(a, b) -> bool:
    return (a.train, a.eval, a.format, a.train_stats, a.eval_stats) == (b.train, b.eval, b.format, b.train_stats,
                                                                        b.eval_stats)


def entries() -> list[Path]:
    return sorted(cache_dir().glob("*.store"))


def test_the_second_call_reads_the_cache_and_returns_identical_data(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", chat_rows(40) + [{"messages": []}])  # one invalid row
    first = prepare(path, tokenizer)
    assert len(entries()) == 1 and any("cached in" in m for m in first.messages)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(data_module, "_tokenize_items", no_tokenizing)
    second = prepare(path, tokenizer)
    assert same_data(first, second)
    assert second.train_stats.num_skipped == 1 and second.train_stats.skipped == first.train_stats.skipped
    assert any("read from the cache" in m for m in second.messages)
    assert second.messages[:-1] == first.messages[:-1]   # the data's own messages come back too


@pytest.mark.parametrize("change", ["data", "max_seq_length", "format", "invalid_rows", "split", "seed", "tokenizer"])
def test_anything_that_changes_the_result_misses_the_cache(tmp_path, tokenizer, change):
    path = write_jsonl(tmp_path / "train.jsonl", chat_rows(30))
    prepare(path, tokenizer)
    over: dict = {"tokenizer": tokenizer}
    if change == "data":
        write_jsonl(path, chat_rows(31))
    elif change == "max_seq_length":
        over["max_seq_length"] = 32
    elif change == "format":
        over["dataset_format"] = "messages"  # the same result, but a different setting: its own entry
    elif change == "invalid_rows":
        over["invalid_rows"] = "error"
    elif change == "split":
        over["eval_split"] = 0.2
    elif change == "seed":
        over["seed"] = 1
    elif change == "tokenizer":
        other = make_tokenizer()
        other.chat_template = other.chat_template.replace("<|end|>", "<|end|>\n")
        over["tokenizer"] = other
    data = prepare(path, **over)
    assert not any("read from the cache" in m for m in data.messages)
    assert len(entries()) == 2


def test_the_seed_does_not_matter_when_an_eval_file_gives_the_eval_data(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(20))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", chat_rows(5))
    prepare(train, tokenizer, eval_file=evaluation, eval_split=0.0, seed=0)
    again = prepare(train, tokenizer, eval_file=evaluation, eval_split=0.0, seed=1)
    assert any("read from the cache" in m for m in again.messages)


def test_a_copied_data_file_hits_and_an_edited_eval_file_misses(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(20))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", chat_rows(5))
    prepare(train, tokenizer, eval_file=evaluation, eval_split=0.0)
    (tmp_path / "copy").mkdir()
    copy = write_jsonl(tmp_path / "copy" / "train.jsonl", chat_rows(20))
    copy_eval = write_jsonl(tmp_path / "copy" / "eval.jsonl", chat_rows(5))
    hit = prepare(copy, tokenizer, eval_file=copy_eval, eval_split=0.0)
    assert any("read from the cache" in m for m in hit.messages)
    # The messages name the files of this call, not those the entry was cached from.
    text = "\n".join(hit.messages)
    assert str(copy) in text and str(copy_eval) in text and str(train) not in text
    write_jsonl(evaluation, chat_rows(6))
    miss = prepare(train, tokenizer, eval_file=evaluation, eval_split=0.0)
    assert not any("read from the cache" in m for m in miss.messages) and len(miss.eval) == 6


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_corrupt_cache_entry_is_ignored_and_rebuilt(tmp_path, tokenizer, damage):
    path = write_jsonl(tmp_path / "train.jsonl", chat_rows(30))
    first = prepare(path, tokenizer)
    (entry,) = entries()
    raw = entry.read_bytes()
    # The damaged file replaces the entry (a new inode, as a copy or a sync would put it there):
    # `first` still maps the old one. (Cutting a mapped file in place under a live reader is a
    # SIGBUS for any memory-mapped reader.)
    damaged = entry.with_name("damaged")
    damaged.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"not a store" * 100, "empty": b""}[damage])
    os.replace(damaged, entry)
    rebuilt = prepare(path, tokenizer)
    assert same_data(first, rebuilt)
    assert any("unreadable" in m and "rebuilt" in m for m in rebuilt.messages)
    again = prepare(path, tokenizer)   # the rebuilt entry is whole again
    assert any("read from the cache" in m for m in again.messages) and same_data(first, again)


def test_the_cache_is_written_atomically_and_leaves_no_temporary_files(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", chat_rows(10))
    prepare(path, tokenizer)
    assert [p.suffix for p in cache_dir().iterdir()] == [".store"]


def test_errors_are_not_cached(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", chat_rows(10) + [{"messages": "not a list"}])
    for _ in range(2):
        with pytest.raises(DataError, match="line 11"):
            prepare(path, tokenizer, invalid_rows="error")
    assert entries() == []


@pytest.mark.parametrize("missing", ["train", "eval"])
def test_a_missing_data_file_is_still_a_data_error_naming_it(tmp_path, tokenizer, missing):
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(10))
    over = {"eval_file": tmp_path / "nowhere.jsonl", "eval_split": 0.0} if missing == "eval" else {}
    with pytest.raises(DataError, match="not found.*nowhere.jsonl"):
        prepare(tmp_path / "nowhere.jsonl" if missing == "train" else train, tokenizer, **over)


def test_an_unwritable_cache_does_not_stop_the_run(tmp_path, tokenizer, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("FULLSCALE_CACHE", str(blocker))
    data = prepare(write_jsonl(tmp_path / "train.jsonl", chat_rows(10)), tokenizer)
    assert data.train and any("not cached" in m for m in data.messages)


def test_fullscale_cache_off_disables_the_cache(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("FULLSCALE_CACHE", "off")
    assert cache_dir() is None
    data = prepare(write_jsonl(tmp_path / "train.jsonl", chat_rows(10)), tokenizer)
    assert not any(m.startswith("tokenized data:") for m in data.messages)


def test_the_default_cache_is_under_the_home_cache_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("FULLSCALE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "fullscale" / "tokenized"


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "text"])
def test_worker_processes_give_the_same_result_as_one_process(tmp_path, tokenizer, monkeypatch, fmt):
    rows = {"messages": chat_rows(300),
            "prompt_completion": [{"prompt": f"q{i} " * (i % 7 + 1), "completion": f"a{i}"} for i in range(300)],
            "text": [{"text": f"t{i} " * (i % 30 + 1)} for i in range(300)]}[fmt]
    rows[17] = {"nothing": "useful"}                      # an invalid row inside a worker's chunk
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    serial = prepare(path, tokenizer, max_seq_length=48, cache=False)
    monkeypatch.setattr(data_module, "PARALLEL_MIN_ROWS", 50)
    monkeypatch.setattr(data_module, "_PARALLEL_CHUNK", 64)   # 5 chunks over 2+ workers
    assert data_module.num_data_workers(300) >= 1
    parallel = prepare(path, tokenizer, max_seq_length=48, cache=False)
    assert same_data(serial, parallel)
    assert parallel.messages == serial.messages


def test_worker_processes_report_the_first_invalid_row_in_file_order(tmp_path, tokenizer, monkeypatch):
    rows = chat_rows(300)
    rows[250] = {"messages": "not a list"}
    rows[120] = {"messages": []}
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    monkeypatch.setattr(data_module, "PARALLEL_MIN_ROWS", 50)
    monkeypatch.setattr(data_module, "_PARALLEL_CHUNK", 64)
    with pytest.raises(DataError, match="line 121"):
        prepare(path, tokenizer, invalid_rows="error", cache=False)


def test_worker_count_stays_within_the_cores_and_is_zero_for_small_data(monkeypatch):
    import os

    assert data_module.num_data_workers(1_000) == 0
    assert 1 <= data_module.num_data_workers(10_000_000) <= (os.cpu_count() or 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * (os.cpu_count() or 1)))   # more processes than cores
    assert data_module.num_data_workers(10_000_000) == 1
